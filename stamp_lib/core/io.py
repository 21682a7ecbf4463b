"""Files: the one atomic writer, the one file lock, and the folders every layer writes to.

Every file the library writes (results, caches, activation stores, full-size records) goes
through :func:`atomic_write`: the bytes land in a temporary file in the same folder (a unique
name, so two processes never share it), which is then renamed over the target. A reader sees
the old file or the new one, never a half-written one; a process killed mid-write leaves at most
a stray ``.tmp`` file that nothing reads.

Folders: :func:`cache_dir` (``STAMP_CACHE`` or ``<repo>/data/cache``, git-ignored) and
:func:`results_dir` (``STAMP_RESULTS`` or ``<repo>/data/results``). The loaders (``zoo``) and
the experiments take them from here, never from the book layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["REPO_ROOT", "atomic_write", "write_json", "jsonable", "file_lock", "cache_dir", "results_dir"]

REPO_ROOT = Path(__file__).resolve().parents[2]


def atomic_write(path: str | os.PathLike, data: bytes | str, mode: int = 0o644) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; folders are created.

    Returns the path. The temporary file is unique per call and removed if the write fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def jsonable(v: Any) -> Any:
    """``v`` as JSON-ready data: dict keys as strings, tuples as lists, numpy / torch scalars and
    arrays as lists or numbers, non-finite floats as strings."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(v.tolist())
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def write_json(path: str | os.PathLike, payload: dict, *, indent: int | None = 1, quiet: bool = False) -> Path:
    """Write ``payload`` as JSON through :func:`atomic_write` and print where (unless ``quiet``)."""
    path = atomic_write(path, json.dumps(jsonable(payload), indent=indent))
    if not quiet:
        print(f"wrote {path}")
    return path


@contextlib.contextmanager
def file_lock(path: str | os.PathLike):
    """Exclusive ``fcntl.flock`` on ``path`` (created if needed) for the duration of the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def cache_dir(*parts: str) -> Path:
    """The ignored cache folder (``STAMP_CACHE`` or ``<repo>/data/cache``), created on demand."""
    d = Path(os.environ.get("STAMP_CACHE", REPO_ROOT / "data" / "cache")).joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


def results_dir() -> Path:
    """Where results files go (``STAMP_RESULTS`` or ``<repo>/data/results``), created."""
    d = Path(os.environ.get("STAMP_RESULTS", REPO_ROOT / "data" / "results"))
    d.mkdir(parents=True, exist_ok=True)
    return d
