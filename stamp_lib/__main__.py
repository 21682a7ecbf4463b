"""``python -m stamp_lib <command> [args]``: the command lines of the experiments.

Commands: ``llm`` (one cell of the LLM table), ``diffusion`` (a galaxy row, or ``diffusion bench``),
``pixart`` (the PixArt-Sigma protocol), ``bench`` (the benchmarks), ``zeroshot`` (lm-eval zero-shot
accuracy with and without STaMP, beyond the paper)."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"llm": "stamp_lib.experiments.llm", "diffusion": "stamp_lib.experiments.diffusion",
            "pixart": "stamp_lib.experiments.pixart", "bench": "stamp_lib.experiments.bench",
            "zeroshot": "stamp_lib.experiments.zeroshot"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"python -m stamp_lib: unknown command {cmd!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    out = importlib.import_module(COMMANDS[cmd]).main(rest)
    return out if isinstance(out, int) else 0


if __name__ == "__main__":
    sys.exit(main())
