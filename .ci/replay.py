"""Carry full-size records over code changes that leave a chapter's results unchanged.

A full-size record goes stale when any file of the code behind it changes
(``stamp_lib.book.study.full_record``), even a refactor that changes no number. Re-recording
costs the full run (hours on 2 cores for chapters 3 and 5). This script checks the weaker thing
that can be checked quickly, and says so in the record: the chapter run at ``STUDY_SIZE=small``
with the record's code and with the current code gives the same results, every value compared
(``study.compare_results``), except the globs named volatile (timings, measured memory).

Usage (two steps, each from a clean checkout, with the same thread count, e.g. OMP_NUM_THREADS=1):

    git worktree add /tmp/old <the records' commit>
    cd /tmp/old && python <repo>/.ci/replay.py baseline /tmp/baseline 02_real_activations 05_ablations
    cd <repo> && python .ci/replay.py certify /tmp/baseline 02_real_activations 05_ablations \\
        --volatile '06_causality=/records/overhead*'

``certify`` runs each chapter at small size with the current code, compares it with the
baseline's results file and, when they agree, renews the record's code hashes and adds a
``recertified`` entry (``how: "replay"``: commits, values compared, volatile globs, values
added); the book's record line then says "re-certified ... by a small-size replay". A chapter
whose results differ is left stale (exit 1): re-record it with ``make record-full``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import record_full  # noqa: E402

from stamp_lib.book import study  # noqa: E402


def _volatile(items: list[str]) -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {}
    for it in items:
        nb, sep, glob = it.partition("=")
        if not sep or not glob:
            raise SystemExit(f"replay: --volatile {it!r}: write NOTEBOOK=GLOB, e.g. '06_causality=/records/overhead*'")
        out.setdefault(nb, []).append(glob)
    return {k: tuple(v) for k, v in out.items()}


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python .ci/replay.py", description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("baseline", "certify"))
    p.add_argument("folder", type=Path, help="where the baseline's small-size results files are (written or read)")
    p.add_argument("notebooks", nargs="+", metavar="NOTEBOOK")
    p.add_argument("--volatile", action="append", default=[], metavar="NOTEBOOK=GLOB",
                   help="leaf paths of that chapter's results not compared (timings, measured memory)")
    a = p.parse_args(argv)
    volatile = _volatile(a.volatile)
    paths = record_full.chapters(a.notebooks)
    failed = 0
    for path in paths:
        nb = path.stem
        if a.step == "baseline":
            a.folder.mkdir(parents=True, exist_ok=True)
            record_full.execute(path, "small", a.folder)
            print(f"replay: baseline of {nb} in {a.folder}", flush=True)
            continue
        old_file = a.folder / f"{nb}.json"
        if not old_file.is_file():
            raise SystemExit(f"replay: no baseline {old_file}; run the baseline step at the record's commit first")
        new = record_full.execute(path, "small", Path(tempfile.mkdtemp(prefix="replay-")))
        try:
            rec = study.recertify_by_replay(nb, json.loads(old_file.read_text()), new, volatile=volatile.get(nb, ()))
        except ValueError as e:
            failed += 1
            print(f"replay: {nb} NOT re-certified: {e}", file=sys.stderr, flush=True)
            continue
        print(f"replay: {nb}: {rec.when()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
