"""Study plumbing shared by every notebook: size switch, seeds, claims registry, results files,
glued numbers, full-size records, caches.

Conventions (chapters 1-4 follow them)
--------------------------------------
* **Size.** ``STUDY_SIZE`` (``small`` by default, or ``full``) is read by :func:`size`; the book
  build, pytest and JupyterLab all reach a notebook through that variable. Knobs are written
  ``N = study.pick(small_value, full_value)``.
* **Start and save.** A notebook starts with ``run = study.start("01_theorem1", knobs={...})``
  (seeds fixed, wall clock started) and ends with ``run.save()``, which
  writes ``<results>/<notebook>.json`` (``data/results/`` unless ``STAMP_RESULTS`` says otherwise)
  with every number, verdict, glued text and checked sentence, plus the provenance of the run
  (:func:`provenance`: commit, date, wall time, machine, package versions and the hash of the
  code that produced it). Neither prints anything on the page (the book removes stderr, where
  both write one line for a reader in JupyterLab): the knobs live in the results file, and
  ``run.settings()`` shows them as a collapsed block where a page wants them. Put both calls in
  cells tagged ``remove-cell``, and so the ``run.verdict`` cells.
* **Numbers.** ``run.record(name, value, **knobs)`` stores one number with *every* knob behind it.
  Put these calls in cells tagged ``hide-input`` (bookkeeping), not in the cells that do the
  science.
* **Numbers in the prose** come from the computation, never typed:
  ``run.glue("ch1_max_ratio", value, ".3f")`` and, in the Markdown, ``{glue:text}`ch1_max_ratio```.
  Never write "(printed above)".
* **Qualitative sentences** are asserted where they are computed:
  ``run.holds(ratio < 0.1, "the bound has more than an order of magnitude of slack")`` raises
  :class:`ProseContradicted` (and fails the build) when a change flips the sentence.
* **Claims.** Every claim of the paper the book tests is registered once, in :data:`CLAIMS`
  below (title, the claim, where the paper makes it, the paper's number). A chapter attaches its
  result with ``run.verdict(key, verdict, ours, numbers={...}, conditions={...})``; an unknown
  key or a verdict that does not start with one of :data:`VERDICTS` is an error right there. The
  claims page lists :data:`CLAIMS` and the verdicts found in the results files, generically:
  a new chapter's claims appear on it without editing it.
* **Full-size records.** ``make record-full`` runs the chapters with ``STUDY_SIZE=full`` and
  stores each results file in ``data/results/full/<notebook>.json.gz`` (tracked in git; gzip,
  because a chapter's every number with its knobs runs to megabytes of JSON; read it with
  :func:`read_full_record` or ``zcat``). The default build shows those recorded
  headline numbers beside its own (``run.findings()`` at the end of each chapter, and the claims
  page); :func:`full_record` flags a record as *stale* when the code behind it (the notebook's code
  cells and every ``stamp_lib`` module the notebook imported, except the drawing and bookkeeping
  modules under ``stamp_lib/book/``, see :func:`is_presentation`) has changed since it was recorded.
* :func:`cache_dir` is the ignored folder for dequantized weights and activations
  (``STAMP_CACHE`` overrides it).
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import gzip
import hashlib
import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..core.io import REPO_ROOT, atomic_write, jsonable, results_dir
from .claims import CLAIMS, claim, format_conditions, numbers_text, verdict_status
from .plotting import TEXT_COLS

SIZES = ("small", "full")
FULL_DIR = REPO_ROOT / "data" / "results" / "full"
# modules that only draw, lay out or book-keep (the claims registry lives here, and chapters
# add claims to it): they do not compute numbers, so they are not part of the code hash of a
# record and editing them leaves records fresh. (study.seed_everything is the exception; a
# change to it must be followed by make record-full.)
PRESENTATION_PREFIX = "stamp_lib/book/"
# the same modules before the package layout (records made then list them; they never count)
LEGACY_PRESENTATION_FILES = ("stamp_lib/plotting.py", "stamp_lib/study.py")


def is_presentation(path: str) -> bool:
    """Whether a file of a record's code hash only draws or book-keeps (never makes it stale)."""
    return path.startswith(PRESENTATION_PREFIX) or path in LEGACY_PRESENTATION_FILES


VERSIONED_PACKAGES = ("torch", "numpy", "scipy", "transformers", "gguf", "PyWavelets", "matplotlib",
                      "jupytext", "nbclient")


# what a verdict must not show on the claims page: constant names (HP_TOKENS) and raw reprs
_BOOKKEEPING = re.compile(r"\b[A-Z][A-Z0-9]*(?:_[A-Z][A-Z0-9]*)+\b|\b(?:PosixPath|tensor|np\.\w+|array)\(")


class ProseContradicted(AssertionError):
    """A sentence of the book that the computation no longer supports."""


# ---- size, seeds, folders --------------------------------------------------------------------

def size() -> str:
    """The study size from ``STUDY_SIZE`` (``small`` unless set); a bad value is an error."""
    s = os.environ.get("STUDY_SIZE", "small").strip().lower() or "small"
    if s not in SIZES:
        raise ValueError(f"STUDY_SIZE must be one of {SIZES}, got {s!r}")
    return s


def pick(small: Any, full: Any) -> Any:
    """Return ``small`` or ``full`` according to :func:`size`."""
    return small if size() == "small" else full


def seed_everything(seed: int = 0) -> None:
    """Fix Python, NumPy and torch seeds."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency in practice
        pass


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def notebook_code_hash(notebook: str | Path) -> str:
    """sha256 of the code cells of ``notebooks/<notebook>.md`` (or of the MyST file ``notebook``
    when it is a ``Path``): prose edits do not change it. ``KeyError`` if there is no such file."""
    path = notebook if isinstance(notebook, Path) else REPO_ROOT / "notebooks" / f"{notebook}.md"
    if not path.is_file():
        raise KeyError(f"no notebook {path}")
    import jupytext

    nb = jupytext.read(path)
    code = "\n\x00\n".join(c.source for c in nb.cells if c.cell_type == "code")
    return _sha(code.encode())


def _code_cells(text: str) -> list[str]:
    import jupytext

    return [c.source for c in jupytext.reads(text, fmt="md:myst").cells if c.cell_type == "code"]


def same_statements(old_text: str, new_text: str) -> bool:
    """Whether two versions of a MyST notebook run the same statements: the abstract syntax trees
    of their code cells, concatenated in order, are equal (cell boundaries, tags, comments and
    line wrapping do not count; any changed name, value or order does)."""
    import ast

    def tree(text):
        return ast.dump(ast.parse("\n".join(_code_cells(text))))

    return tree(old_text) == tree(new_text)


def code_files(notebook: str, modules: list[str] | None = None) -> dict[str, str]:
    """The code behind a notebook's numbers: ``{relative path: sha256}``.

    ``notebooks/<nb>.md#code`` (its code cells, if that notebook exists) and the file of every ``stamp_lib`` module in
    ``modules`` (default: those imported in this process), except the book plumbing (:func:`is_presentation`).
    """
    if modules is None:
        modules = [m for m in sys.modules if m == "stamp_lib" or m.startswith("stamp_lib.")]
    out = {}
    try:
        out[f"notebooks/{notebook}.md#code"] = notebook_code_hash(notebook)
    except KeyError:  # a run outside the book (a script, a test): no notebook to hash
        pass
    for m in sorted(set(modules)):
        f = getattr(sys.modules.get(m), "__file__", None)
        if not f:
            continue
        path = Path(f).resolve()
        if path.is_file() and path.is_relative_to(REPO_ROOT):
            rel = str(path.relative_to(REPO_ROOT))
            if not is_presentation(rel):
                out[rel] = _sha(path.read_bytes())
    return out


def current_hash(path: str) -> str | None:
    """The sha256 that :func:`code_files` would give ``path`` now (``None``: it is gone)."""
    if path.endswith("#code"):
        try:
            return notebook_code_hash(Path(path[: -len("#code")]).stem)
        except KeyError:
            return None
    p = REPO_ROOT / path
    return _sha(p.read_bytes()) if p.is_file() else None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict:
    """Commit (and whether stamp_lib/notebooks differ from it), date, machine, versions."""
    versions = {"python": platform.python_version()}
    for pkg in VERSIONED_PACKAGES:
        try:
            versions[pkg] = _metadata.version(pkg)
        except _metadata.PackageNotFoundError:
            pass
    machine = {"platform": platform.platform(), "arch": platform.machine(), "cpus": os.cpu_count()}
    try:
        import torch

        machine["torch_threads"] = torch.get_num_threads()
    except ImportError:  # pragma: no cover
        pass
    try:
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        machine["memory_gb"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    status = _git("status", "--porcelain", "--", "stamp_lib", "notebooks")
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": None if status is None else bool(status),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine,
        "versions": versions,
    }


# ---- one run of one notebook -----------------------------------------------------------------

class SavedPath(type(Path())):
    """The path :meth:`Run.save` wrote; as the value of a notebook cell it displays nothing
    (``save`` has printed it, relative to the repository)."""

    def _ipython_display_(self) -> None:
        pass


@dataclass
class Run:
    """One execution of one notebook: its knobs, numbers, verdicts, glued text and checks."""

    notebook: str
    knobs: dict = field(default_factory=dict)
    seed: int = 0
    records: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)
    glued: dict = field(default_factory=dict)
    checks: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def record(self, name: str, value: Any, **knobs: Any) -> Any:
        """Store one reported number with all the knobs that produced it; returns ``value``."""
        self.records.append({"name": name, "value": jsonable(value), "knobs": jsonable(knobs)})
        return value

    def verdict(self, key: str, verdict: str, ours: str, *, numbers: dict | None = None,
                conditions: dict | None = None, detail: str | None = None) -> None:
        """Attach this run's result to the registered claim ``key`` (see :data:`CLAIMS`).

        ``verdict``: starts with one of :data:`VERDICTS` (e.g. ``"confirmed"``,
        ``"new: optimal never worse"``). ``ours``: one or two sentences with our numbers (MyST
        Markdown). ``numbers``: the headline numbers ``{label: float}`` that the claims page and
        :meth:`findings` compare between this run and the full-size record. ``conditions``: model,
        sizes, bits (``{name: value}``). ``detail``: optional longer text. Stored in
        ``self.verdicts``; returns nothing. Raises ``KeyError`` for an unregistered key and
        ``ValueError`` for a malformed verdict or a repeated key.
        """
        c = claim(key)
        status = verdict_status(verdict)
        shown = [verdict, ours, detail or "", *map(str, (numbers or {})), *map(str, (conditions or {}))]
        shown += [str(x) for x in (conditions or {}).values()]
        bad = sorted({m.group(0) for t in shown for m in _BOOKKEEPING.finditer(t)})
        if bad:
            raise ValueError(f"{self.notebook}: the verdict on {key!r} would show bookkeeping on the "
                             f"claims page: {bad} (write the value or the words, not a constant name or a repr)")
        if any(v["key"] == key for v in self.verdicts):
            raise ValueError(f"{self.notebook}: claim {key!r} already has a verdict in this run")
        numbers = {str(k): float(v) for k, v in (numbers or {}).items()}
        v = {"key": key, "claim": c.title, "verdict": verdict, "status": status, "ours": ours,
             "numbers": numbers, "conditions": jsonable(conditions or {}), "size": size()}
        if detail:
            v["detail"] = detail
        self.verdicts.append(v)

    def glue(self, name: str, value: Any, fmt: str | None = None) -> None:
        """Format ``value`` (``fmt``, else :func:`stamp_lib.book.plotting.num` for numbers), glue it
        for the prose (``{glue:text}`name```) and keep it in ``self.glued`` for the results file.
        Returns nothing, so a glue call that ends a cell displays nothing."""
        if isinstance(value, str):
            text = value
        elif fmt is not None:
            text = format(value, fmt)
        else:
            from .plotting import num

            text = num(value)
        if name in self.glued:
            raise ValueError(f"glue name {name!r} used twice in {self.notebook}")
        self.glued[name] = text
        try:
            from IPython import get_ipython
            from myst_nb import glue
        except ImportError:  # pragma: no cover - the book environment has both
            return
        if get_ipython() is not None:
            glue(name, text, display=False)

    def holds(self, condition: Any, sentence: str) -> None:
        """Assert a qualitative sentence of the prose; :class:`ProseContradicted` if it is false."""
        ok = bool(condition)
        self.checks.append({"sentence": sentence, "holds": ok})
        if not ok:
            raise ProseContradicted(f"{self.notebook}: the text says {sentence!r}, which this run "
                                    "contradicts: fix the text or the code")

    def findings(self):
        """A table (Markdown) of this run's verdicts beside the full-size record's, for the
        chapter's "What we found"; see :func:`findings_table`."""
        return findings_table(self.notebook, self.verdicts, full_record(self.notebook))

    def save(self) -> Path:
        """Write ``<results>/<notebook>.json`` (numbers, verdicts, glue, checks, provenance) and
        print where. Returns the path as a :class:`SavedPath`, which shows nothing as a notebook
        cell's value (no ``PosixPath('/home/...')`` of the machine that ran it in the book)."""
        wall = time.perf_counter() - self.t0
        out = results_dir() / f"{self.notebook}.json"
        files = code_files(self.notebook)
        payload = {
            "notebook": self.notebook,
            "size": size(),
            "seed": self.seed,
            "knobs": jsonable(self.knobs),
            "wall_time_s": round(wall, 2),
            **provenance(),
            "code": {"files": files, "hash": _sha(json.dumps(files, sort_keys=True).encode())},
            "simulated": "fake quantization in floating point (no integer kernels)",
            "records": self.records,
            "verdicts": self.verdicts,
            "glued": self.glued,
            "checks": self.checks,
        }
        atomic_write(out, json.dumps(payload, indent=1, sort_keys=False))
        where = out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out
        print(f"[{self.notebook}] {len(self.records)} numbers, {len(self.verdicts)} verdicts, "
              f"wall time {wall:.1f} s -> {where}", file=sys.stderr)
        return SavedPath(out)

    def settings(self):
        """The size, seed and knobs of this run as a collapsed block (HTML ``<details>``), for a
        page that wants to show them; the results file holds them in any case."""
        from html import escape

        from IPython.display import HTML

        rows = [("STUDY_SIZE", size()), ("seed", self.seed), *self.knobs.items()]
        body = "".join(f"<tr><td><code>{escape(str(k))}</code></td><td>{escape(str(v))}</td></tr>"
                       for k, v in rows)
        return HTML(f"<details><summary>Settings of this run</summary><table>{body}</table></details>")


def start(notebook: str, knobs: dict | None = None, seed: int = 0) -> Run:
    """Begin a notebook run: fix seeds, start the wall clock. Prints nothing on the page (one
    line with the size and the knobs goes to stderr, which the book removes); the knobs are saved
    in the results file, and :meth:`Run.settings` shows them where a page wants them."""
    seed_everything(seed)
    run = Run(notebook=notebook, knobs=dict(knobs or {}), seed=seed)
    knob_text = ", ".join(f"{k}={v}" for k, v in run.knobs.items())
    print(textwrap.fill(f"[{notebook}] STUDY_SIZE={size()} seed={seed}" + (f"; {knob_text}" if knob_text else ""),
                        width=TEXT_COLS, subsequent_indent="  "), file=sys.stderr)
    return run


def load_results(folder: Path | None = None) -> dict[str, dict]:
    """Every results file of ``folder`` (default :func:`results_dir`), keyed by notebook name."""
    out = {}
    for p in sorted((folder or results_dir()).glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out


# ---- full-size records -----------------------------------------------------------------------

@dataclass
class FullRecord:
    """A results file recorded at ``STUDY_SIZE=full`` (``data/results/full/<notebook>.json.gz``).

    ``stale`` is true when a file of ``data["code"]["files"]`` has changed (or gone) since;
    ``changed`` lists them.
    """

    data: dict
    stale: bool
    changed: list

    def verdict(self, key: str) -> dict | None:
        return next((v for v in self.data.get("verdicts", []) if v.get("key") == key), None)

    def number(self, key: str, label: str) -> float | None:
        v = self.verdict(key)
        return None if v is None else v.get("numbers", {}).get(label)

    def when(self) -> str:
        """One line: date, commit, wall time, machine and whether the record is stale."""
        d = self.data
        commit = (d.get("commit") or "?")[:8] + ("+edits" if d.get("dirty") else "")
        m = d.get("machine", {})
        line = (f"recorded {str(d.get('date', '?'))[:10]} at commit {commit}, wall time "
                f"{d.get('wall_time_s', 0) / 60:.0f} min on {m.get('cpus', '?')} CPUs")
        for r in d.get("recertified", []):
            at = str(r.get("commit") or "?")[:8]
            if r.get("how") == "replay":
                line += (f"; code changes re-certified at {at} by a small-size replay "
                         f"({r['compared']} values equal before and after)")
            else:
                line += f"; code cells re-certified at {at} (same statements)"
        if self.stale:
            line += f"; STALE: changed since: {', '.join(self.changed)}"
        return line


def full_dir() -> Path:
    """Where full-size records are read: ``STAMP_FULL_RESULTS`` or :data:`FULL_DIR`."""
    return Path(os.environ.get("STAMP_FULL_RESULTS", FULL_DIR))


FULL_SUFFIX = ".json.gz"


def write_full_record(data: dict, folder: Path | None = None) -> Path:
    """Store a results file's ``data`` as ``<folder>/<notebook>.json.gz`` (default folder
    :func:`full_dir`): compact JSON, gzip without a time stamp, so equal data give equal bytes."""
    if not isinstance(data, dict) or not isinstance(data.get("notebook"), str):
        raise ValueError("write_full_record: data must be a results dict (the file Run.save "
                         "writes) with a 'notebook' name")
    folder = folder or full_dir()
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{data['notebook']}{FULL_SUFFIX}"
    atomic_write(out, gzip.compress(json.dumps(data, separators=(",", ":")).encode(), mtime=0))
    return out


def read_full_record(path: Path) -> dict:
    """The data of a stored full-size record (:func:`write_full_record`); ``ValueError`` naming
    the file if it is not one (truncated, not gzip, not JSON)."""
    try:
        return json.loads(gzip.decompress(path.read_bytes()))
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not a readable full-size record ({type(exc).__name__}: {exc}); "
                         f"restore it from git or re-record it with `make record-full`") from exc


def full_record(notebook: str, folder: Path | None = None) -> FullRecord | None:
    """The full-size record of ``notebook`` (in ``folder``, default :func:`full_dir`) with its
    staleness, or ``None`` if none is recorded."""
    p = (folder or full_dir()) / f"{notebook}{FULL_SUFFIX}"
    if not p.is_file():
        return None
    data = read_full_record(p)
    files = {f: h for f, h in data.get("code", {}).get("files", {}).items()
             if not is_presentation(f)}
    changed = [f for f, h in files.items() if current_hash(f) != h]
    return FullRecord(data=data, stale=bool(changed) or not files, changed=changed or
                      ([] if files else ["(no code hash in the record)"]))


def recertify(notebook: str, folder: Path | None = None, *, old_text: str | None = None) -> FullRecord:
    """Carry a full-size record over a change of its notebook that runs the same statements.

    Allowed only when the notebook's code cells are the one changed file of the record and
    :func:`same_statements` holds between the version at the record's commit (``old_text``,
    default ``git show <commit>:notebooks/<notebook>.md``) and the current one: then the record's
    hash of the code cells is renewed and a ``recertified`` entry (date, commit, what and why) is
    added, shown by :meth:`FullRecord.when`. Anything else raises ``ValueError`` naming the
    changed files: re-record instead (``make record-full``)."""
    folder = folder or full_dir()
    rec = full_record(notebook, folder)
    if rec is None:
        raise ValueError(f"no full-size record of {notebook!r} in {folder}")
    key = f"notebooks/{notebook}.md#code"
    if not rec.stale:
        return rec
    if rec.changed != [key]:
        raise ValueError(f"{notebook}: {', '.join(rec.changed)} changed since the record; only a change of the "
                         "notebook's code cells that runs the same statements can be carried over: re-record it")
    if old_text is None:
        commit = rec.data.get("commit")
        old_text = _git("show", f"{commit}:notebooks/{notebook}.md") if commit else None
        if old_text is None:
            raise ValueError(f"{notebook}: cannot read the notebook at the record's commit {commit!r}")
    new_text = (REPO_ROOT / "notebooks" / f"{notebook}.md").read_text()
    if not same_statements(old_text, new_text):
        raise ValueError(f"{notebook}: the code cells run other statements than at the record's commit: re-record it")
    data = dict(rec.data)
    data["code"] = {**data["code"], "files": {**data["code"]["files"], key: current_hash(key)}}
    data["recertified"] = [*data.get("recertified", []), {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": _git("rev-parse", "HEAD"), "files": [key],
        "why": "the code cells run the same statements (equal syntax trees); cell boundaries or format changed"}]
    write_full_record(data, folder)
    return full_record(notebook, folder)


def _leaves(x, path: str = ""):
    """``(path, value)`` of every leaf of a results file's comparable part (records by name)."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}/{i}")
    else:
        yield path, x


REPLAYED = ("records", "verdicts", "glued", "checks")  # the parts of a results file a replay compares


def compare_results(old: dict, new: dict, *, volatile: tuple[str, ...] = (), rtol: float = 1e-6,
                    atol: float = 1e-9) -> dict:
    """Compare two results files of one notebook (:data:`REPLAYED` parts; a record's leaves are
    ``/records/<name>|<knobs as JSON, lists of names sorted>|<occurrence>/...``):
    every leaf of ``old`` must be in ``new`` and equal (numbers within ``rtol``/``atol``), except
    leaves whose path matches a glob of ``volatile`` (timings, measured memory), which are counted,
    not compared. Returns ``{"compared", "volatile", "differ": [(path, old, new)], "missing",
    "added", "max_rel"}``; ``differ`` and ``missing`` empty means the same results."""
    def flat(d):  # records keyed by name, knobs and occurrence: a name may repeat with other knobs
        part = {k: d.get(k) for k in REPLAYED}
        seen: dict[str, int] = {}
        part["records"] = {}
        for r in d.get("records", []):
            knobs = {k: sorted(v) if isinstance(v, list) and all(isinstance(x, str) for x in v) else v
                     for k, v in (r.get("knobs") or {}).items()}  # a list of names may come from a set
            key = f"{r['name']}|{json.dumps(knobs, sort_keys=True)}"
            seen[key] = seen.get(key, 0) + 1
            part["records"][f"{key}|{seen[key]}"] = r.get("value")
        return dict(_leaves(part))

    a, b = flat(old), flat(new)
    out = {"compared": 0, "volatile": 0, "differ": [], "missing": [], "max_rel": 0.0,
           "added": sorted(k for k in b if k not in a)}
    for k, v in a.items():
        if any(fnmatch.fnmatchcase(k, g) for g in volatile):
            out["volatile"] += 1
            continue
        if k not in b:
            out["missing"].append(k)
            continue
        w = b[k]
        out["compared"] += 1
        if isinstance(v, (int, float)) and isinstance(w, (int, float)) and not isinstance(v, bool):
            if not (math.isclose(v, w, rel_tol=rtol, abs_tol=atol) or (math.isnan(v) and math.isnan(w))):
                out["differ"].append((k, v, w))
            elif v != w:
                out["max_rel"] = max(out["max_rel"], abs(v - w) / max(abs(v), abs(w)))
        elif v != w:
            out["differ"].append((k, v, w))
    return out


def recertify_by_replay(notebook: str, old: dict, new: dict, *, volatile: tuple[str, ...] = (),
                        folder: Path | None = None) -> FullRecord:
    """Carry a full-size record over code changes that leave the notebook's results unchanged.

    ``old`` is the notebook's small-size results file run with the code the record was made
    with (every file hash of the record equal), ``new`` the same run with the current code.
    When :func:`compare_results` finds every value of ``old`` in ``new`` and equal, the record's
    code hashes are renewed and a ``recertified`` entry says so (``how: "replay"``, the number of
    values compared, the volatile globs left out, the values added, the largest relative
    difference), shown by :meth:`FullRecord.when`. It is evidence at the small size only: the
    record says so; anything that differs raises ``ValueError`` (re-record instead)."""
    folder = folder or full_dir()
    rec = full_record(notebook, folder)
    if rec is None:
        raise ValueError(f"no full-size record of {notebook!r} in {folder}")
    if not rec.stale:
        return rec
    for d, which in ((old, "old"), (new, "new")):
        if d.get("notebook") != notebook or d.get("size") != "small":
            raise ValueError(f"{notebook}: the {which} results file is not a small-size run of this notebook")
        if d.get("dirty"):
            raise ValueError(f"{notebook}: the {which} run had uncommitted edits; replay from clean commits")
    theirs = {f: h for f, h in rec.data["code"]["files"].items() if not is_presentation(f)}
    base = old.get("code", {}).get("files", {})
    off = sorted(f for f, h in theirs.items() if base.get(f) != h)
    if off:
        raise ValueError(f"{notebook}: the old run's code is not the record's ({', '.join(off[:4])} differ); run the "
                         f"baseline at the record's commit {str(rec.data.get('commit'))[:8]}")
    now = new.get("code", {}).get("files", {})
    gone = sorted(f for f, h in now.items() if current_hash(f) != h)
    if gone or not now:
        raise ValueError(f"{notebook}: the new run is not of the current code ({', '.join(gone[:4])} changed since)")
    cmp = compare_results(old, new, volatile=volatile)
    if cmp["differ"] or cmp["missing"]:
        first = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in cmp["differ"][:3]) or ", ".join(cmp["missing"][:3])
        raise ValueError(f"{notebook}: the results changed ({len(cmp['differ'])} values differ, "
                         f"{len(cmp['missing'])} missing; {first}): re-record it")
    data = dict(rec.data)
    data["code"] = {**data["code"], "files": dict(now)}
    data["recertified"] = [*data.get("recertified", []), {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": new.get("commit"), "how": "replay", "files": rec.changed, "baseline_commit": old.get("commit"),
        "compared": cmp["compared"], "volatile": list(volatile), "volatile_values": cmp["volatile"],
        "added": cmp["added"], "max_rel_diff": cmp["max_rel"],
        "why": "a small-size run with the record's code and one with the changed code give the same results "
               "(every value compared; volatile ones, timings and measured memory, not compared); the full size "
               "was not re-run"}]
    write_full_record(data, folder)
    return full_record(notebook, folder)


def full_records(folder: Path | None = None) -> dict[str, FullRecord]:
    """Every full-size record, keyed by notebook name."""
    out = {}
    for p in sorted((folder or full_dir()).glob(f"*{FULL_SUFFIX}")):
        name = p.name[: -len(FULL_SUFFIX)]
        r = full_record(name, folder)
        if r is not None:
            out[name] = r
    return out


def findings_table(notebook: str, verdicts: list[dict], full: FullRecord | None):
    """Markdown: one row per verdict of this run, its numbers beside the full-size record's, and
    a line saying the conditions of both (and whether the record is stale)."""
    from IPython.display import Markdown

    from .plotting import table

    this = size()
    rows = []
    for v in verdicts:
        fv = full.verdict(v["key"]) if full is not None else None
        rows.append([CLAIMS[v["key"]].title, numbers_text(v), numbers_text(fv)])
    head = ["claim", f"this build ({this})",
            "full size (recorded)" + (", STALE" if full is not None and full.stale else "")]
    md = table(head, rows, align="lll").data
    notes = []
    if verdicts:
        notes.append(f"This build: {format_conditions(verdicts[0].get('conditions', {}))}.")
    if full is None:
        notes.append(f"No full-size record yet: `make record-full NB={notebook}` writes "
                     f"`data/results/full/{notebook}{FULL_SUFFIX}`.")
    else:
        fv0 = next(iter(full.data.get("verdicts", [])), {})
        notes.append(f"Full size: {format_conditions(fv0.get('conditions', {}))}; {full.when()}.")
    return Markdown(md + "\n\n" + " ".join(notes))
