"""The per-thread workspace of the fast paths (sequence transforms, Hadamard products).

On CPU every fresh multi-megabyte tensor is mmap-ed and page-faulted in by the OS, which costs more
than the arithmetic of a Haar level or a Hadamard stage; intermediate results therefore live in a
small per-thread pool of flat buffers, one per tag (results returned to callers are always fresh).
Users that never hold buffers at the
same time share a tag ("ws0"/"ws1": a Hadamard product's spare, a 2-D Haar level's two halves),
so the working set of one quantized layer stays small enough for the caches.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["scratch", "clear_workspace"]

_WS = threading.local()
_WS_MIN_BYTES = 1 << 20


def scratch(tag: str, shape, like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``shape`` like ``like`` that the caller may overwrite until its next call with
    ``tag`` (tensors under 1 MiB are fresh)."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if numel * like.element_size() < _WS_MIN_BYTES:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    pool = _WS.__dict__.setdefault("pool", {})
    key = (tag, like.dtype, like.device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        if buf is None and len(pool) > 16:
            pool.clear()
        buf = pool[key] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel].view(shape)


def clear_workspace() -> None:
    """Release the scratch buffers kept between calls by the fast paths."""
    _WS.__dict__.pop("pool", None)
