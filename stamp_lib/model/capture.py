"""Capture the inputs of selected linear layers of any torch model, with forward pre-hooks only.

Contract
--------
* :func:`select_modules` picks modules (``nn.Linear`` by default) by qualified name: glob
  patterns (``fnmatch``, e.g. ``"*.self_attn.q_proj"``, ``"*.mlp.down_proj"``), regexes written
  ``"re:<regex>"`` (``re.fullmatch``) or compiled ``re.Pattern`` objects. A pattern that matches
  nothing is an error that lists some available names.
* :func:`capturing` is the low-level context manager: one forward *pre*-hook per selected
  module calls ``on_input(name, x)`` with the detached input tensor (batch, s, d). The model's
  code is not modified and its outputs are unchanged (the hooks only read); every hook is
  removed on exit, also when the forward raises.
* ``dedup=True``: modules that receive the very same tensor one after another (q/k/v take the
  same normed hidden state, gate/up too) are captured once; the later ones are recorded as
  aliases (``aliases[alias] = canonical``). Sameness is exact (same storage, shape, strides,
  dtype and version counter of a tensor still held alive), never a value comparison, so an alias
  always has bitwise-identical input. Only consecutive calls are compared.
* :func:`capture_inputs` runs the model over batches (tqdm progress) inside ``torch.no_grad()``
  and, per captured module, can (any combination):
  - keep the inputs in memory (``keep=True`` or name patterns), concatenated over batches;
  - stream them to disk (``out_dir``): one raw file per module, appended batch after batch, plus
    ``index.json`` written last (an interrupted capture leaves no index and cannot be opened);
    RAM then holds at most one module input at a time. Read back with :class:`ActivationStore`;
  - pass them to ``reduce(name, x)`` callbacks that accumulate statistics instead of storing,
    e.g. :class:`AutoCorrelation` (per-module sum of X X^T over batch and features, s x s).
  ``store_dtype`` (e.g. ``torch.float16``) casts what is kept or written; float16 overflow is an
  error, never a silent inf.
* A module called k times per forward contributes k captures per batch, appended in call order.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from . import hooks as hooks_

STORE_FORMAT = 1
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.int16, torch.float64: np.float64}


# ----------------------------------------------------------------------------- selection
select_modules = hooks_.select_modules  # one selection rule for capture and quantization


# ----------------------------------------------------------------------------- hooks
@dataclass
class Hooks:
    """Handle yielded by :func:`capturing`."""

    names: list[str]
    dedup: bool
    aliases: dict[str, str] = field(default_factory=dict)
    _last: tuple | None = None  # (name, tensor, its version) of the last capture; holding it keeps its memory alive
    _passes: int = 0
    _pass_aliases: dict = field(default_factory=dict)

    def new_pass(self) -> None:
        """Mark the start of a new forward pass (dedup only compares calls within a pass)."""
        self._end_pass()
        self._last = None

    def _end_pass(self) -> None:
        if self._last is None and not self._pass_aliases:
            return
        if self._passes == 0:
            self.aliases = dict(self._pass_aliases)
        elif self._pass_aliases != self.aliases:
            raise RuntimeError(f"inputs shared between modules changed from one pass to the next "
                               f"({self.aliases} vs {self._pass_aliases}); capture with dedup=False")
        self._passes += 1
        self._pass_aliases = {}


@contextlib.contextmanager
def capturing(model: nn.Module, patterns="*", on_input: Callable[[str, torch.Tensor], None] | None = None,
              dedup: bool = False, types=(nn.Linear,)):
    """Register a forward pre-hook on every selected module for the duration of the block.

    ``on_input(name, x)`` gets the detached first input of the module (do not modify it in place).
    Call ``hooks.new_pass()`` between forwards when ``dedup=True``."""
    mods = select_modules(model, patterns, types)
    hooks = Hooks(names=list(mods), dedup=dedup)

    def read(name, module, x):
        x = x.detach()
        if dedup:
            last = hooks._last
            if last is not None and hooks_.same_tensor(last[1], x, version=last[2]):
                hooks._pass_aliases[name] = last[0]
                return None
            hooks._last = (name, x, x._version)
        if on_input is not None:
            on_input(name, x)
        return None

    try:
        with hooks_.input_hooks(mods, read):
            yield hooks
            hooks._end_pass()
    finally:
        hooks._last = None


# ----------------------------------------------------------------------------- disk store
def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".bin"


class ActivationStore:
    """Per-module activations on disk: ``<name>.bin`` (raw, C order, rows appended) + ``index.json``.

    Writer: ``store = ActivationStore(dir, dtype)``; ``store.append(name, x)``; ``store.close(aliases)``.
    Reader: ``store = ActivationStore.open(dir)``; ``store.names``; ``store.load(name, rows=None)``
    returns a tensor (rows, *shape) read through ``np.memmap`` (only the requested rows are read)."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16):
        if dtype not in _NP_DTYPES:
            raise ValueError(f"store dtype must be one of {list(_NP_DTYPES)}, got {dtype}")
        self.path, self.dtype = Path(path), dtype
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "index.json").unlink(missing_ok=True)  # invalid until close()
        self.tensors: dict[str, dict] = {}
        self.aliases: dict[str, str] = {}
        self._files: dict = {}

    def append(self, name: str, x: torch.Tensor) -> None:
        x = x.to(device="cpu", dtype=self.dtype).contiguous()
        if x.dim() < 1:
            raise ValueError(f"{name}: cannot store a 0-d tensor")
        meta = self.tensors.get(name)
        if meta is None:
            fname = _file_name(name)
            if any(m["file"] == fname for m in self.tensors.values()):
                fname = f"{len(self.tensors)}_{fname}"
            meta = self.tensors[name] = {"file": fname, "shape": [0, *x.shape[1:]]}
            self._files[name] = open(self.path / fname, "wb")
        if list(x.shape[1:]) != meta["shape"][1:]:
            raise ValueError(f"{name}: row shape {tuple(x.shape[1:])} differs from earlier batches "
                             f"{tuple(meta['shape'][1:])}; a store needs a fixed sequence length")
        arr = x.view(torch.int16).numpy() if self.dtype == torch.bfloat16 else x.numpy()
        arr.tofile(self._files[name])
        meta["shape"][0] += x.shape[0]

    def close(self, aliases: dict[str, str] | None = None) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}
        self.aliases = dict(aliases or {})
        index = {"format": STORE_FORMAT, "dtype": str(self.dtype).replace("torch.", ""),
                 "tensors": self.tensors, "aliases": self.aliases}
        tmp = self.path / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(self.path / "index.json")

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ActivationStore":
        path = Path(path)
        try:
            index = json.loads((path / "index.json").read_text())
        except (OSError, ValueError):
            raise FileNotFoundError(f"{path} has no index.json: not an activation store, "
                                    "or an interrupted capture") from None
        if index.get("format") != STORE_FORMAT:
            raise ValueError(f"{path}: store format {index.get('format')} != {STORE_FORMAT}")
        self = cls.__new__(cls)
        self.path, self.dtype = path, getattr(torch, index["dtype"])
        self.tensors, self.aliases, self._files = index["tensors"], index["aliases"], {}
        return self

    @property
    def names(self) -> list[str]:
        """Every module name, aliases included."""
        return [*self.tensors, *self.aliases]

    def nbytes(self) -> int:
        return sum((self.path / m["file"]).stat().st_size for m in self.tensors.values())

    def load(self, name: str, rows=None) -> torch.Tensor:
        name = self.aliases.get(name, name)
        if name not in self.tensors:
            raise KeyError(f"{name!r} is not in the store; names: {self.names[:6]}...")
        meta = self.tensors[name]
        mm = np.memmap(self.path / meta["file"], dtype=_NP_DTYPES[self.dtype], mode="r", shape=tuple(meta["shape"]))
        arr = np.array(mm if rows is None else mm[rows])
        t = torch.from_numpy(arr)
        return t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t


# ----------------------------------------------------------------------------- driver
@dataclass
class Captured:
    """Result of :func:`capture_inputs`: ``acts`` (kept tensors, (N, s, d)), ``aliases``,
    ``store`` (an :class:`ActivationStore` or None), ``names`` (all selected modules)."""

    names: list[str]
    aliases: dict[str, str]
    acts: dict[str, torch.Tensor]
    store: ActivationStore | None = None
    seconds: float = 0.0

    def canonical(self, name: str) -> str:
        return self.aliases.get(name, name)

    def __getitem__(self, name: str) -> torch.Tensor:
        c = self.canonical(name)
        if c in self.acts:
            return self.acts[c]
        if self.store is not None and c in self.store.tensors:
            return self.store.load(c)
        raise KeyError(f"{name!r} was not kept; kept: {list(self.acts)[:6]}...")


def _batches(inputs, batch_size: int):
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() < 1 or len(inputs) == 0:
            raise ValueError(f"inputs must be a non-empty batch-first tensor, got shape {tuple(inputs.shape)}")
        return [inputs[i:i + batch_size] for i in range(0, len(inputs), batch_size)]
    return inputs


def _call(model, batch, forward):
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


@torch.no_grad()
def capture_inputs(model: nn.Module, inputs, patterns="*", *, batch_size: int = 1, dedup: bool = True,
                   keep=True, out_dir: str | os.PathLike | None = None, store_dtype: torch.dtype | None = None,
                   reduce: Callable | Iterable[Callable] | None = None, forward: Callable | None = None,
                   types=(nn.Linear,), progress: bool = True) -> Captured:
    """Run ``model`` over ``inputs`` and capture the inputs of the selected modules (see module doc).

    ``inputs``: a batch-first tensor (e.g. token windows (n, s)), split in batches of
    ``batch_size`` and called as ``model(batch)``; or any iterable of batches (tensor ->
    ``model(b)``, dict -> ``model(**b)``, tuple -> ``model(*b)``); ``forward(model, batch)``
    overrides the call. ``keep``: True / False / name patterns of the modules to keep in memory.
    ``out_dir``: stream every captured module to an :class:`ActivationStore` there.
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    names = list(select_modules(model, patterns, types))
    if keep is True or keep is False:
        keep_set = set(names) if keep else set()
    else:
        keep_set = set(select_modules(model, keep, types)) & set(names)
    reducers = [] if reduce is None else [reduce] if callable(reduce) else list(reduce)
    dtype = store_dtype
    store = ActivationStore(out_dir, dtype or next(model.parameters()).dtype) if out_dir is not None else None
    kept: dict[str, list] = {}

    def on_input(name, x):
        for r in reducers:
            r(name, x)
        if name not in keep_set and store is None:
            return
        y = x if dtype is None else x.to(dtype)
        if dtype == torch.float16 and not bool(torch.isfinite(y).all()) and bool(torch.isfinite(x).all()):
            raise OverflowError(f"{name}: inputs exceed the float16 range (max |x| = {float(x.abs().max()):.4g}); "
                                f"use store_dtype=torch.bfloat16 or torch.float32")
        if store is not None:
            store.append(name, y)
        if name in keep_set:
            kept.setdefault(name, []).append(y.to("cpu", copy=True))

    t0 = time.perf_counter()
    batches = _batches(inputs, batch_size)
    total = len(batches) if hasattr(batches, "__len__") else None
    with capturing(model, patterns, on_input, dedup=dedup, types=types) as hooks:
        for batch in tqdm(batches, total=total, desc="capture", disable=None if progress else True, leave=False):
            hooks.new_pass()
            _call(model, batch, forward)
    aliases = hooks.aliases
    if store is not None:
        store.close(aliases)
    acts = {n: torch.cat(v) for n, v in kept.items()}
    return Captured(names=names, aliases=aliases, acts=acts, store=store, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- benchmark
def capture_bytes(model: nn.Module, patterns="*", n_tokens: int = 1, bytes_per_value: int = 2, dedup: bool = True) -> int:
    """Size of the captured inputs of ``n_tokens`` tokens, computed from the selected modules'
    ``in_features``; with ``dedup`` the q/k/v-style groups are found by one probe forward of 2 tokens."""
    mods = select_modules(model, patterns)
    names = list(mods)
    if dedup:
        with capturing(model, patterns, None, dedup=True) as h:
            h.new_pass()
            with torch.no_grad():
                model(torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device))
        names = [n for n in names if n not in h.aliases]
    return n_tokens * bytes_per_value * sum(mods[n].in_features for n in names)
