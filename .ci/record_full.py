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
    return p


def record(path: Path, full_dir: Path) -> float:
    """Execute one chapter at full size into a scratch folder, then move its record into place."""
    import jupytext
    from nbclient import NotebookClient

    scratch = Path(tempfile.mkdtemp(prefix="record-full-"))
    os.environ.update(STUDY_SIZE="full", STAMP_RESULTS=str(scratch))
    t0 = time.perf_counter()
    nb = jupytext.read(path)
    NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=nb.metadata.get("kernelspec", {}).get("name", "python3"),
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    out = scratch / f"{path.stem}.json"
    if not out.is_file():
        raise SystemExit(f"record_full: {path.name} ran but wrote no {out.name} (no run.save()?)")
    study.write_full_record(json.loads(out.read_text()), full_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    a = cli.parse(_parser(), argv, validate)
    paths = chapters(a.notebooks)
    full_dir = ROOT / "data" / "results" / "full"
    for path in paths:
        print(f"record_full: {path.name} at STUDY_SIZE=full ...", flush=True)
        try:
            wall = record(path, full_dir)
        except Exception as exc:  # noqa: BLE001 - report any failure with the chapter's name
            print(f"record_full: {path.name} FAILED: {type(exc).__name__}: {str(exc)[-2000:]}", file=sys.stderr)
            return 1
        print(f"record_full: wrote data/results/full/{path.stem}{study.FULL_SUFFIX} ({wall / 60:.1f} min)", flush=True)
    print("record_full: done; commit data/results/full/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
