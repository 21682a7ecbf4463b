r"""Feature (right) transforms R for a linear layer's input: :math:`X \mapsto X R`.

STaMP's sequence transform acts on the left of an activation; methods such as QuaRot (a Hadamard
rotation) and SmoothQuant (a per-channel scale) act on the right, along the features. For a
linear layer :math:`Y = X W^\top + \beta` a right transform is exact when the weight absorbs its
inverse:

.. math::  (X R)\,(W R^{-\top})^\top = X W^\top,

so the layer sees the activation :math:`X R` (quantized in that basis) and the *folded* weight
:math:`W' = W R^{-\top}` (quantized in that basis too: ``fold_weight`` is applied before the
weight quantizer). The bias is untouched.

Contract of every feature transform (duck-typed; :class:`FeatureTransform` is the base):

* ``forward(x)``: :math:`x R` over the last dim of ``x`` (..., d);
* ``inverse(y)``: :math:`y R^{-1}`;
* ``fold_weight(W)``: :math:`W R^{-\top}` for a weight (out, d);
* ``d``: the feature size; ``name``: a short label for results files.

:class:`Rotation` (orthogonal R, :math:`R^{-\top} = R`) and :class:`Scale` (diagonal R) cover
QuaRot-style Hadamards (see :mod:`stamp_lib.methods` for real Hadamard matrices) and SmoothQuant.
"""

from __future__ import annotations

import torch

__all__ = ["FeatureTransform", "Rotation", "Scale"]


class FeatureTransform:
    """Base class: subclasses set ``d`` and ``name`` and implement the three maps."""

    d: int
    name: str = "feature"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def fold_weight(self, W: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, x: torch.Tensor, what: str = "x") -> None:
        if x.shape[-1] != self.d:
            raise ValueError(f"{self.name}: {what} has {x.shape[-1]} features, the transform has d={self.d}")


class Rotation(FeatureTransform):
    """An orthogonal d x d matrix R (checked to 1e-4 in float64 when built)."""

    def __init__(self, R: torch.Tensor, name: str = "rotation", check: bool = True):
        if not isinstance(R, torch.Tensor) or R.dim() != 2 or R.shape[0] != R.shape[1]:
            raise ValueError(f"{name}: R must be a square (d, d) tensor, got {getattr(R, 'shape', type(R))}")
        if check:
            Rd = R.double()
            err = float((Rd @ Rd.T - torch.eye(R.shape[0], dtype=torch.float64, device=R.device)).abs().max())
            if err > 1e-4:
                raise ValueError(f"{name}: R is not orthogonal (max |R R^T - I| = {err:.3g})")
        self.R = R
        self.d = R.shape[0]
        self.name = name

    def _mat(self, like: torch.Tensor) -> torch.Tensor:
        return self.R.to(device=like.device, dtype=like.dtype)

    def forward(self, x):
        self._check(x)
        return x @ self._mat(x)

    def inverse(self, y):
        self._check(y, "y")
        return y @ self._mat(y).T

    def fold_weight(self, W):
        self._check(W, "W")
        return W @ self._mat(W)


class Scale(FeatureTransform):
    """A diagonal R = diag(r) with r > 0: ``forward(x) = x * r``, ``fold_weight(W) = W / r``.

    SmoothQuant divides the activation by its smoothing factors s, so r = 1 / s."""

    def __init__(self, r: torch.Tensor, name: str = "scale"):
        r = torch.as_tensor(r)
        if r.dim() != 1 or r.numel() == 0:
            raise ValueError(f"{name}: r must be a non-empty 1-D tensor, got shape {tuple(r.shape)}")
        if not bool(torch.isfinite(r).all()) or bool((r <= 0).any()):
            raise ValueError(f"{name}: the scales must be finite and positive")
        self.r = r
        self.d = r.numel()
        self.name = name

    def forward(self, x):
        self._check(x)
        return x * self.r.to(device=x.device, dtype=x.dtype)

    def inverse(self, y):
        self._check(y, "y")
        return y / self.r.to(device=y.device, dtype=y.dtype)

    def fold_weight(self, W):
        self._check(W, "W")
        return W / self.r.to(device=W.device, dtype=W.dtype)
