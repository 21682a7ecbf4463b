r"""Attach STaMP to any torch / transformers / diffusers model without touching its code.

For every ``nn.Linear`` whose qualified name matches the given patterns (see
:func:`stamp_lib.capture.select_modules`), a forward pre-hook replaces the input X (..., s, d) by

.. math::  \hat X = L^{-1}\, Q_b(L\, X R)\, R^{-1}

(L: sequence transform along the tokens, R: optional orthogonal feature transform, Q_b:
per-token min-max fake quantization with per-row bits b). Because the layer is linear,
quantizing the input and applying :math:`L^{-1}` before the matmul gives the same result as the
paper's :math:`L^{-1}(Q(LX) W^T)` up to float rounding; the bias is untouched. All of it is
fake quantization in floating point: it measures accuracy, not speed.

Weights are quantized separately (:func:`quantized_weights`, round-to-nearest per output
channel or per group), so any weight quantizer composes with any activation setting.

Every attachment is undone on exit of the context manager (or ``handle.remove()``); weights
are restored bit for bit.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import quant, transforms
from .capture import select_modules

__all__ = ["ActQuant", "stamp_inputs", "quantized_weights", "random_hadamard"]


@dataclass
class ActQuant:
    """Activation-quantization settings for the wrapped linear inputs.

    Attributes:
        transform: a :class:`~stamp_lib.transforms.SequenceTransform`, a name for
            :func:`~stamp_lib.transforms.build`, a ``{module name: transform}`` dict (e.g. one KLT
            per layer), or ``None`` (identity).
        bits: int, a spec such as ``"64x8+4"`` (first 64 rows at 8 bits, the rest at 4), or a
            callable ``s -> LongTensor(s)``; ``None`` switches quantization off (the hook then
            still applies and undoes the transforms, which must give the plain model's outputs).
        levels, grid: passed to ``transforms.build`` when ``transform`` is a name.
        symmetric, clip_ratio, block_size: see :func:`stamp_lib.quant.fake_quant`.
        block_tokens: if set, the sequence is cut into consecutive blocks of this many tokens and
            each block is transformed and quantized on its own (a causal-safe variant: a token's
            quantization then depends only on tokens of its own block). s must be a multiple.
        feature_transform: optional orthogonal d x d matrix R applied on the right before
            quantization (e.g. :func:`random_hadamard`); its transpose undoes it.
    """

    transform: object = None
    bits: object = 4
    levels: int | None = None
    grid: tuple[int, int] | None = None
    symmetric: bool = False
    clip_ratio: float = 1.0
    block_size: int | None = None
    block_tokens: int | None = None
    feature_transform: torch.Tensor | None = None
    _bits_cache: dict = field(default_factory=dict, repr=False)

    def knobs(self) -> dict:
        """The settings as a plain dict, for results files."""
        t = self.transform
        tname = (
            "identity" if t is None else t if isinstance(t, str) else
            "per-layer" if isinstance(t, dict) else getattr(t, "name", type(t).__name__)
        )
        return {
            "transform": tname,
            "levels": self.levels,
            "grid": list(self.grid) if self.grid else None,
            "bits": self.bits if isinstance(self.bits, (int, str)) or self.bits is None else "custom",
            "granularity": "per-token" if self.block_size is None else f"per-block-{self.block_size}",
            "symmetric": self.symmetric,
            "clip_ratio": self.clip_ratio,
            "block_tokens": self.block_tokens,
            "feature_transform": None if self.feature_transform is None else "orthogonal",
        }

    def bits_for(self, s: int) -> torch.Tensor | None:
        if self.bits is None:
            return None
        if s not in self._bits_cache:
            b = self.bits
            if isinstance(b, str):
                out = quant.bits_from_spec(b, s)
            elif callable(b):
                out = b(s)
            else:
                out = b
            self._bits_cache[s] = out
        return self._bits_cache[s]

    def transform_for(self, name: str):
        t = self.transform
        if isinstance(t, dict):
            if name not in t:
                raise KeyError(f"no transform given for module {name!r}")
            return t[name]
        if t is None:
            return transforms.Identity()
        if isinstance(t, str):
            key = (t, self.levels, self.grid)
            cache = self.__dict__.setdefault("_built", {})
            if key not in cache:
                cache[key] = transforms.build(t, levels=self.levels, grid=self.grid)
            return cache[key]
        return t


def apply_act_quant(x: torch.Tensor, T, cfg: ActQuant) -> torch.Tensor:
    """:math:`L^{-1} Q(L x R) R^{-1}` on one input tensor (..., s, d)."""
    R = cfg.feature_transform
    s = x.shape[-2]
    y = x
    if cfg.block_tokens is not None:
        bt = cfg.block_tokens
        if s % bt:
            raise ValueError(f"sequence length {s} is not a multiple of block_tokens={bt}")
        y = y.unflatten(-2, (s // bt, bt))
        s = bt
    if R is not None:
        y = y @ R.to(device=y.device, dtype=y.dtype)
    b = cfg.bits_for(s)
    y = T.forward(y)
    if b is not None:
        y = quant.fake_quant(y, b, symmetric=cfg.symmetric, clip_ratio=cfg.clip_ratio,
                             block_size=cfg.block_size)
    y = T.inverse(y)
    if R is not None:
        y = y @ R.to(device=y.device, dtype=y.dtype).T
    if cfg.block_tokens is not None:
        y = y.flatten(-3, -2)
    return y


@contextlib.contextmanager
def stamp_inputs(model: nn.Module, patterns, cfg: ActQuant, types=(nn.Linear,),
                 on_apply: Callable[[str, torch.Tensor, torch.Tensor], None] | None = None):
    """Quantize the inputs of the selected modules with STaMP for the duration of the block.

    ``on_apply(name, x, x_hat)`` (optional) sees every replaced input, e.g. to measure SQNR.
    Yields the ``{name: module}`` dict of wrapped modules."""
    mods = select_modules(model, patterns, types)

    def make(name):
        T = cfg.transform_for(name)

        def pre_hook(module, args, kwargs):
            if not args:
                raise TypeError(f"{name}: expected the input as first positional argument")
            x = args[0]
            x_hat = apply_act_quant(x, T, cfg).to(x.dtype)
            if on_apply is not None:
                on_apply(name, x, x_hat)
            return (x_hat, *args[1:]), kwargs

        return pre_hook

    handles = []
    try:
        for name, m in mods.items():
            handles.append(m.register_forward_pre_hook(make(name), with_kwargs=True))
        yield mods
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def quantized_weights(model: nn.Module, patterns, bits: int = 4, group_size: int | None = None,
                      symmetric: bool = True, clip_ratio: float = 1.0, types=(nn.Linear,)):
    """Round-to-nearest fake quantization of the selected weights, per output channel (or per
    group of ``group_size`` input features); the original weights are restored on exit."""
    mods = select_modules(model, patterns, types)
    saved = {}
    try:
        with torch.no_grad():
            for name, m in mods.items():
                saved[name] = m.weight.detach().clone()
                Wq = quant.fake_quant(m.weight.detach().float(), bits, symmetric=symmetric,
                                      clip_ratio=clip_ratio, block_size=group_size)
                m.weight.copy_(Wq.to(m.weight.dtype))
        yield mods
    finally:
        with torch.no_grad():
            for name, W in saved.items():
                mods[name].weight.copy_(W)


def random_hadamard(d: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A random orthogonal Hadamard-like feature transform (QuaRot style): diag(+-1) H / sqrt(d)
    for power-of-two d; otherwise a random orthogonal matrix from a seeded QR."""
    g = torch.Generator().manual_seed(seed)
    if d & (d - 1) == 0:
        H = transforms.build("wht").matrix(d, torch.float64)
        signs = torch.randint(0, 2, (d,), generator=g).double() * 2 - 1
        return (H * signs).to(dtype)
    Q, Rm = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (Q * torch.sign(torch.diagonal(Rm))).to(dtype)
