"""Record the full-size results of chapters into the repository (``make record-full``).

Usage: python .ci/record_full.py [NOTEBOOK ...]     (default: every chapter, notebooks/[0-8]*.md)

Each chapter is executed top to bottom (nbclient, cwd notebooks/, as in the book build) with
``STUDY_SIZE=full`` into a scratch results folder; its ``run.save()`` file is then stored as
``data/results/full/<chapter>.json.gz`` (``stamp_lib.book.study.write_full_record``) with its
numbers, verdicts, commit, date, wall time, machine, package versions and the hash of the code
behind it. The default book shows these records beside its own small-size numbers and flags them
stale once that code changes.
Commit the files afterwards. A failing chapter stops the script (exit 1) and leaves the previous
record of that chapter in place.

Resuming: the chapter runs with ``STAMP_RESUME=1``, so the experiment functions it calls
(``llm.run_table``, ``diffusion.reference`` / ``run_configs``, ``pixart.run_protocol``) keep every
finished cell in their default stores (``data/cache/cells/<experiment>``, git-ignored;
:mod:`stamp_lib.core.cells`), keyed by the cell's knobs and the library's code. Rerunning a chapter
that was killed or failed partway reuses the finished cells and computes only the rest, with the
same numbers; a changed knob or changed library code computes its cells again. The record says
how many cells were computed and reused (``cells``, counted through ``STAMP_CELLS_TALLY``).
``--no-resume`` runs without stores (everything computed, nothing kept).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stamp_lib.book import study  # noqa: E402
from stamp_lib.core import cells  # noqa: E402
from stamp_lib.experiments import cli  # noqa: E402

CELL_TIMEOUT = 4 * 3600  # a full-size cell may take over an hour on 2 cores (chapter 3's table)


def _notebook(name: str) -> Path:
    return ROOT / "notebooks" / f"{Path(name).stem}.md"


def chapters(names: list[str]) -> list[Path]:
    """The notebooks named (stem or path), or every chapter; ``SystemExit`` for an unknown one."""
    if not names:
        return sorted(p for p in (ROOT / "notebooks").glob("[0-8]*.md"))
    out = []
    for n in names:
        p = _notebook(n)
        if not p.is_file():
            raise SystemExit(f"record_full: no notebook {p.relative_to(ROOT)}")
        out.append(p)
    return out


def validate(a) -> None:
    """Every NOTEBOOK names a chapter file; ``cli.BadInput`` (one line, exit 2) otherwise."""
    for n in a.notebooks:
        p = _notebook(n)
        if not p.is_file():
            known = ", ".join(q.stem for q in sorted((ROOT / "notebooks").glob("[0-8]*.md")))
            raise cli.BadInput(f"NOTEBOOK {n}", f"there is no {p.relative_to(ROOT)}; name a chapter by its file stem "
                                                f"(one of {known}) or give none to record every chapter")


def _parser():
    p = cli.Parser(prog="python .ci/record_full.py", description=__doc__.split("\n\n")[0])
    p.add_argument("notebooks", nargs="*", metavar="NOTEBOOK",
                   help="chapter stems or paths, e.g. 03_llm (default: every chapter, notebooks/[0-8]*.md)")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="do not keep or reuse finished cells (default: STAMP_RESUME=1, resume from data/cache/cells)")
    return p


def execute(path: Path, size: str, scratch: Path) -> dict:
    """Execute one chapter top to bottom (nbclient, cwd notebooks/) at ``STUDY_SIZE=size`` with its
    results file written into ``scratch``; that file's data."""
    import jupytext
    from nbclient import NotebookClient

    os.environ.update(STUDY_SIZE=size, STAMP_RESULTS=str(scratch))
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    out = scratch / f"{path.stem}.json"
    if not out.is_file():
        raise SystemExit(f"{path.name} ran but wrote no {out.name} (no run.save()?)")
    return json.loads(out.read_text())


def record(path: Path, full_dir: Path, resume: bool = True) -> float:
    """Execute one chapter at full size into a scratch folder, then move its record into place
    (with ``cells``: the cells computed and reused, per experiment and in all)."""
    scratch = Path(tempfile.mkdtemp(prefix="record-full-"))
    tally = scratch / "cells.tally"
    os.environ[cells.ENV_TALLY] = str(tally)
    os.environ[cells.ENV_RESUME] = "1" if resume else "0"
    t0 = time.perf_counter()
    data = execute(path, "full", scratch)
    by = cells.read_tally(tally)
    data["cells"] = {"resume": resume, "computed": sum(d["computed"] for d in by.values()),
                     "reused": sum(d["reused"] for d in by.values()), "by_experiment": by}
    study.write_full_record(data, full_dir)
    print(f"record_full: {path.stem}: {data['cells']['computed']} cells computed, {data['cells']['reused']} reused",
          flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    a = cli.parse(_parser(), argv, validate)
    paths = chapters(a.notebooks)
    full_dir = ROOT / "data" / "results" / "full"
    for path in paths:
        print(f"record_full: {path.name} at STUDY_SIZE=full ...", flush=True)
        try:
            wall = record(path, full_dir, a.resume)
        except Exception as exc:  # noqa: BLE001 - report any failure with the chapter's name
            print(f"record_full: {path.name} FAILED: {type(exc).__name__}: {str(exc)[-2000:]}", file=sys.stderr)
            return 1
        print(f"record_full: wrote data/results/full/{path.stem}{study.FULL_SUFFIX} ({wall / 60:.1f} min)", flush=True)
    print("record_full: done; commit data/results/full/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
