"""Resumable runs: every finished cell of a long run kept in a file of its own.

A *cell* is one unit of a long run that is worth keeping: one ``(row, column)`` of the language-model
table, one configuration of the galaxy or PixArt protocol, one full-precision reference. A
:class:`CellStore` is a folder with one file per cell, named by the SHA-256 of the canonical JSON of
the cell's *key*:

* the key is what the caller passes (the experiment's name and every knob that changes the numbers:
  the recipe, the windows or noises, a fingerprint of the model's weights, ...), plus what the store
  adds itself: a hash of the library's computing code (every ``stamp_lib/**/*.py`` but
  ``stamp_lib/book/``, :func:`code_hash`) and the torch version. A changed knob or a changed line of
  code gives another file name, so the cell is computed again; the old file is simply not read.
* a file is written with :func:`stamp_lib.core.io.atomic_write` (a unique temporary file in the same
  folder, renamed over the target): a run killed at any moment leaves every finished cell intact and
  at most a stray ``.tmp`` file, never a half-written cell. Two processes writing the same folder
  cannot corrupt each other; the same key written twice is harmless (the last rename wins, both
  files are whole).
* a file holds a header, the SHA-256 of its payload and the payload (``torch.save`` of
  ``{"key": ..., "value": ...}``, read back with ``weights_only=True``). A reader that finds a file
  that is truncated, altered or made for another key ignores it, and the cell is computed again (and
  the file rewritten).

Values are dicts (lists, numbers, strings, ``None``) with tensors inside; tensors come back on the
CPU, bit for bit.

Where a store comes from (:func:`resolve`): a function of the experiments takes ``store=None`` (no
cells: every number computed, as before), a :class:`CellStore` or a folder. With the environment
variable ``STAMP_RESUME=1`` (which ``.ci/record_full.py`` sets) ``store=None`` means the default
store of that experiment, :func:`default_store`: ``cache_dir("cells", <experiment>)`` (under the
git-ignored ``data/cache``, or ``STAMP_CACHE``). ``store=False`` never uses one.

Counting: every store counts the cells it computed (written) and reused (read back),
:meth:`CellStore.counts`; results files record them. With ``STAMP_CELLS_TALLY=<file>`` every count is
also appended to that file as a line ``<experiment> computed|reused`` (how ``record_full`` learns
what a notebook kernel, another process, computed and reused).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from .io import REPO_ROOT, atomic_write, cache_dir

__all__ = ["ENV_RESUME", "ENV_TALLY", "CellStore", "code_hash", "canonical", "fingerprint", "default_store",
           "resolve", "resume_on", "read_tally"]

ENV_RESUME = "STAMP_RESUME"
ENV_TALLY = "STAMP_CELLS_TALLY"
_MAGIC = b"STAMP-CELL 1\n"
_SUFFIX = ".cell"
_MISSING = object()


@functools.lru_cache(maxsize=None)
def _code_hash(root: str) -> str:
    pkg = Path(root) / "stamp_lib"
    h = hashlib.sha256()
    for p in sorted(pkg.rglob("*.py")):
        rel = p.relative_to(pkg).as_posix()
        if rel.startswith("book/"):
            continue
        h.update(rel.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def code_hash() -> str:
    """SHA-256 (16 hex digits) of every ``stamp_lib/**/*.py`` except ``stamp_lib/book/``: the code
    that computes numbers (the book layer only presents them). Computed once per process, when
    this module is imported (with the experiments), so that a file edited during a long run does
    not relabel cells computed by the code already loaded."""
    return _code_hash(str(REPO_ROOT))


def canonical(key: Any) -> str:
    """The canonical JSON of ``key``: sorted keys, no spaces, tuples as lists, numpy/torch scalars
    as numbers, non-finite floats as strings. Anything else (an object without a JSON form) is a
    ``TypeError``: a key must name knobs, never an object's address."""
    return json.dumps(_plain(key), sort_keys=True, separators=(",", ":"), allow_nan=False)


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if hasattr(v, "tolist") and getattr(v, "ndim", 1) == 0:  # numpy / torch scalars
        return _plain(v.tolist())
    raise TypeError(f"a cell key holds only JSON data (dicts, lists, numbers, strings); got {type(v).__name__} "
                    f"(use fingerprint() for tensors and models)")


# ----------------------------------------------------------------------------- fingerprints
_FULL = 1 << 20  # tensors up to this many elements are hashed whole; larger ones by a strided sample
_SAMPLE = 1 << 16


def _tensor_bytes(t) -> bytes:
    import torch

    t = t.detach()
    if t.is_meta:  # an offloaded parameter: shape and dtype only
        return b"meta"
    flat = t.reshape(-1)
    if flat.numel() > _FULL:
        n = flat.numel()  # evenly spaced, first and last included (integer arithmetic: exact beyond 2**24)
        idx = torch.arange(_SAMPLE, dtype=torch.int64, device=flat.device) * (n - 1) // (_SAMPLE - 1)
        flat = flat[idx]
    flat = flat.cpu().contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b""


def fingerprint(obj: Any) -> str:
    """SHA-256 (24 hex digits) of what ``obj`` computes with: a tensor (dtype, shape, every byte; a
    strided sample of 65536 elements beyond 2**20), a module (class, configuration if it has one,
    device type, and every parameter and buffer by name as a tensor), a list/tuple/dict of these, or
    JSON data."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()[:24]


def _feed(h, obj) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        h.update(f"T{obj.dtype}{tuple(obj.shape)}".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, torch.nn.Module):
        h.update(f"M{type(obj).__module__}.{type(obj).__qualname__}".encode())
        cfg = getattr(obj, "config", None)
        if cfg is not None and hasattr(cfg, "to_dict"):
            d = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
            h.update(json.dumps(d, sort_keys=True, default=str).encode())
        devs = sorted({p.device.type for p in obj.parameters()})
        h.update(f"dev{devs}".encode())
        for name, t in list(obj.named_parameters()) + list(obj.named_buffers()):
            h.update(name.encode())
            _feed(h, t)
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            h.update(str(k).encode() + b":")
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[")
        for x in obj:
            _feed(h, x)
            h.update(b",")
        h.update(b"]")
    else:
        try:
            h.update(canonical(obj).encode())
        except (TypeError, ValueError):  # no JSON form: its type and repr (at worst a needless recompute)
            h.update(f"{type(obj).__qualname__}:{obj!r}".encode())


# ----------------------------------------------------------------------------- the store
def _to_cpu(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.detach().cpu().clone()  # a clone: a view would save its whole storage
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_to_cpu(x) for x in v)
    return v


class CellStore:
    """A folder of finished cells (see the module docstring).

    ``code``: the code hash folded into every key (default :func:`code_hash`). ``reuse=False``
    never reads a stored cell (every cell is computed) but still writes what it computes, so a
    later run can reuse it. ``experiment``: the name used in the tally file."""

    def __init__(self, folder: str | os.PathLike, *, code: str | None = None, reuse: bool = True,
                 experiment: str | None = None):
        self.folder = Path(folder)
        self.code = code_hash() if code is None else str(code)
        self.reuse = bool(reuse)
        self.experiment = experiment or self.folder.name
        self.computed = 0
        self.reused = 0
        self.ignored = 0  # corrupt, partial or foreign files met (and recomputed)

    def __repr__(self) -> str:
        return f"CellStore({str(self.folder)!r}, computed={self.computed}, reused={self.reused})"

    def full_key(self, key: Any) -> str:
        """The canonical JSON of ``key`` with the code hash and torch version folded in."""
        import torch

        return canonical({"cell": key, "code": self.code, "torch": torch.__version__})

    def path(self, key: Any) -> Path:
        """The file of ``key``'s cell (it may not exist)."""
        return self.folder / (hashlib.sha256(self.full_key(key).encode()).hexdigest()[:40] + _SUFFIX)

    def __contains__(self, key: Any) -> bool:
        return self._read(key) is not _MISSING

    def get(self, key: Any, default: Any = None) -> Any:
        """The stored value of ``key``'s cell (counted as reused), else ``default``: no file, a
        corrupt or partial one, one made for another key, or ``reuse=False``."""
        if not self.reuse:
            return default
        v = self._read(key)
        if v is _MISSING:
            return default
        self._count("reused")
        return v

    def put(self, key: Any, value: Any) -> Path:
        """Store ``value`` as ``key``'s cell, atomically (counted as computed); returns the file."""
        import torch

        full = self.full_key(key)
        buf = io.BytesIO()
        torch.save({"key": full, "value": _to_cpu(value)}, buf)
        payload = buf.getvalue()
        data = _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload
        path = atomic_write(self.path(key), data)
        self._count("computed")
        return path

    def cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        """``key``'s stored value, or ``compute()`` stored and returned."""
        v = self.get(key, _MISSING)
        if v is _MISSING:
            v = compute()
            self.put(key, v)
        return v

    def counts(self) -> dict:
        """``{"computed": n, "reused": m}`` so far (``ignored`` too when a bad file was met)."""
        out = {"computed": self.computed, "reused": self.reused}
        if self.ignored:
            out["ignored_bad_files"] = self.ignored
        return out

    def since(self, before: dict) -> dict:
        """:meth:`counts` minus an earlier ``counts()``: what one run computed and reused."""
        now = self.counts()
        return {k: now.get(k, 0) - before.get(k, 0) for k in now}

    # ------------------------------------------------------------------ internals
    def _read(self, key: Any):
        import torch

        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:
            return _MISSING
        try:
            if not data.startswith(_MAGIC):
                raise ValueError("no cell header")
            rest = data[len(_MAGIC):]
            digest, payload = rest[:64], rest[65:]
            if rest[64:65] != b"\n" or hashlib.sha256(payload).hexdigest().encode() != digest:
                raise ValueError("checksum mismatch (partial or altered file)")
            obj = torch.load(io.BytesIO(payload), weights_only=True, map_location="cpu")
            if not isinstance(obj, dict) or obj.get("key") != self.full_key(key):
                raise ValueError("made for another key")
            return obj["value"]
        except Exception:  # noqa: BLE001 - any unreadable file is ignored and the cell recomputed
            self.ignored += 1
            return _MISSING

    def _count(self, kind: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        tally = os.environ.get(ENV_TALLY)
        if tally:
            with contextlib.suppress(OSError):
                fd = os.open(tally, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{self.experiment} {kind}\n".encode())  # one short write: appended whole
                finally:
                    os.close(fd)


def resume_on() -> bool:
    """Whether ``STAMP_RESUME`` asks the experiments to use their default stores."""
    return os.environ.get(ENV_RESUME, "").strip().lower() in ("1", "true", "yes", "on")


def default_store(experiment: str, **kw) -> CellStore:
    """The default store of ``experiment``: ``cache_dir("cells", experiment)``."""
    return CellStore(cache_dir("cells", experiment), experiment=experiment, **kw)


def resolve(store, experiment: str) -> CellStore | None:
    """The store an experiment function uses: ``store`` itself (a :class:`CellStore`), a store on
    a folder (a path), none (``False``), or for ``None`` the default store when ``STAMP_RESUME=1``
    and none otherwise."""
    if store is False:
        return None
    if store is None:
        return default_store(experiment) if resume_on() else None
    if isinstance(store, CellStore):
        return store
    if isinstance(store, (str, os.PathLike)):
        return CellStore(store, experiment=experiment)
    raise TypeError(f"store must be a CellStore, a folder, None or False; got {type(store).__name__}")


def read_tally(path: str | os.PathLike) -> dict:
    """``{experiment: {"computed": n, "reused": m}}`` from a ``STAMP_CELLS_TALLY`` file (missing: ``{}``)."""
    out: dict = {}
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1] in ("computed", "reused"):
                d = out.setdefault(parts[0], {"computed": 0, "reused": 0})
                d[parts[1]] += 1
    return out


code_hash()  # at import: the code loaded with the experiments
