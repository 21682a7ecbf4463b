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
* ``fold_reader(B)``: :math:`B R^\top` for a matrix that reads the transformed input (an SVDQuant
  low-rank branch), so that it can read the untransformed one: :math:`(x R) B^\top = x (B R^\top)^\top`;
* ``d``: the feature size; ``name``: a short label for results files.

:class:`Rotation` (orthogonal R, :math:`R^{-\top} = R`) and :class:`Scale` (diagonal R) cover
QuaRot-style Hadamards (:class:`HadamardRotation` below builds them from :mod:`stamp_lib.core.hadamard`)
and SmoothQuant.
"""

from __future__ import annotations

import math

import torch

from ..core.hadamard import (
    MAX_FACTOR,
    hadamard_plan,
    kron_apply,
    kron_apply_reference,
    matrix_from_plan,
    pow2_radices,
    small_factor,
    sylvester,
)

__all__ = ["FeatureTransform", "Rotation", "Scale", "HadamardRotation", "hadamard_rotation"]

_CACHE = True  # private: False restores the per-call conversions and products (benchmarks time both)


def _cast_cache(obj, attr: str, like: torch.Tensor) -> torch.Tensor:
    """``getattr(obj, attr)`` converted to ``like``'s dtype and device, once per (dtype, device).

    The per-call path of a quantized model calls the feature transform of every layer on every
    forward; converting the matrix (or scale vector) there is a host-to-device copy per layer and
    step on a GPU. The cache belongs to the tensor it was made from: assigning a new tensor to
    ``attr`` starts a new one (changing the tensor in place is not detected)."""
    src = getattr(obj, attr)
    if not _CACHE:
        return src.to(device=like.device, dtype=like.dtype)
    caches = obj.__dict__.setdefault("_casts", {})
    entry = caches.get(attr)
    if entry is None or entry[0] is not src:
        entry = caches[attr] = (src, {})
    key = (like.dtype, like.device)
    out = entry[1].get(key)
    if out is None:
        out = entry[1][key] = src.to(device=like.device, dtype=like.dtype)
    return out


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

    def fold_reader(self, B: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        r""":math:`B R^\top` for a matrix B (k, d) that reads the transformed input, so that
        :math:`(x R) B^\top = x (B R^\top)^\top`: the reader can take ``x`` itself (an SVDQuant
        low-rank branch does, instead of keeping ``x R`` alive)."""
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
        """R in ``like``'s dtype and device, converted once per (dtype, device)."""
        return _cast_cache(self, "R", like)

    def forward(self, x):
        self._check(x)
        return x @ self._mat(x)

    def inverse(self, y):
        self._check(y, "y")
        return y @ self._mat(y).T

    def fold_weight(self, W):
        self._check(W, "W")
        return W @ self._mat(W)

    def fold_reader(self, B):
        self._check(B, "B")
        return B @ self._mat(B).T


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

    def _vec(self, like: torch.Tensor) -> torch.Tensor:
        """r in ``like``'s dtype and device, converted once per (dtype, device)."""
        return _cast_cache(self, "r", like)

    def forward(self, x):
        self._check(x)
        return x * self._vec(x)

    def inverse(self, y):
        self._check(y, "y")
        return y / self._vec(y)

    def fold_weight(self, W):
        self._check(W, "W")
        return W / self._vec(W)

    def fold_reader(self, B):
        self._check(B, "B")
        return B * self._vec(B)


class HadamardRotation(Rotation):
    r"""QuaRot-style feature rotation :math:`R = D H / \sqrt n` (:class:`features.Rotation`).

    ``H = kron(H_m, H_p)`` from :func:`hadamard_matrix`; ``D = diag(signs)`` with random signs
    drawn from ``seed`` (``seed=None``: no signs, D = I). ``forward(x) = x R``,
    ``inverse(y) = y R^T`` and ``fold_weight(W) = W R`` (= ``W R^{-T}``) use the fast Kronecker
    path, O(n (m + log n)) per row, computed in float32 for half-precision inputs and in the
    input's dtype otherwise. ``R`` (and ``matrix()``) is the dense float64 twin, built on first
    use; ``forward_dense``/``inverse_dense``/``fold_weight_dense`` use it.

    Orders up to ``matmul_max`` (128) skip the Kronecker path: one matmul with the cached matrix
    in the working dtype is as fast there. Above it the Kronecker path wins (float32, 2048 rows,
    1 thread, Kronecker / dense time: 0.45 at n = 256, 0.6 at 512, 0.16 at 1024, 0.06 at 4096).
    Set ``matmul_max = 0`` on an instance to force the Kronecker path (the tests do)."""

    matmul_max: int = 128

    def __init__(self, n: int, seed: int | None = None, name: str | None = None, *,
                 max_factor: int | None = MAX_FACTOR):
        self.plan = hadamard_plan(n, max_factor)
        self.d = n
        self.name = name or (f"hadamard{n}" if seed is None else f"hadamard{n}-s{seed}")
        self.seed = seed
        if seed is None:
            self.signs = None
        else:
            g = torch.Generator().manual_seed(int(seed))
            self.signs = torch.randint(0, 2, (n,), generator=g).to(torch.float64) * 2 - 1
        self._A = small_factor(self.plan).to(torch.float64)
        self._dense = None
        self._cache: dict = {}

    # the dense twin ----------------------------------------------------------------------
    @property
    def R(self) -> torch.Tensor:  # noqa: N802 - the name of features.Rotation's matrix
        if self._dense is None:
            H = matrix_from_plan(self.plan, torch.float64, None) / math.sqrt(self.d)
            self._dense = H if self.signs is None else self.signs[:, None] * H
        return self._dense

    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """The dense n x n matrix R (built independently of the fast path)."""
        return self.R.to(dtype=dtype, device=device)

    def forward_dense(self, x):
        return Rotation.forward(self, x)

    def inverse_dense(self, y):
        return Rotation.inverse(self, y)

    def fold_weight_dense(self, W):
        return Rotation.fold_weight(self, W)

    # the fast path -----------------------------------------------------------------------
    def _factors(self, dtype, device, transpose: bool, scaled: bool = False
                 ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The Kronecker factors of H (``transpose``: of H^T) in ``dtype`` on ``device`` and the signs;
        ``scaled``: the first factor carries the 1/sqrt(n) (the fused path's one pass less)."""
        key = (dtype, str(device), transpose, scaled)
        if key not in self._cache:
            fs = [sylvester(r, dtype, str(device)) for r in self._radices(scaled)]
            if self.plan.m > 1:
                A = self._A if transpose else self._A.T  # x H contracts with A^T, x H^T with A
                fs.insert(0, A.to(dtype=dtype, device=device).contiguous())
            if not fs:  # order 1: no Kronecker factor at all; H_1 = [[1]]
                fs = [torch.ones(1, 1, dtype=dtype, device=device)]
            if scaled:
                fs[0] = (fs[0].to(torch.float64) / math.sqrt(self.d)).to(dtype).contiguous()
            signs = None if self.signs is None else self.signs.to(dtype=dtype, device=device)
            self._cache[key] = (fs, signs)
        return self._cache[key]

    def _radices(self, fused: bool) -> list[int]:
        """The Sylvester factor's radices. Any split of H_p = H_2^{(x)k} gives the same matrix; the
        fused path ends on radix 32 (its one plain GEMM, on the last axis) and splits the rest
        into radices <= 32, the fastest split measured (float32, 1 thread: 512 -> [16, 32] 1.3x,
        256 -> [8, 32], 4096 -> [16, 8, 32] 1.4x faster than the balanced [32, 16], [16, 16], [64, 64])."""
        p = self.plan.p
        if not fused or p <= 32:
            return pow2_radices(p)
        return pow2_radices(p // 32, cap=32) + [32]

    def _apply(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        out_dtype = x.dtype
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: expected a floating tensor, got {x.dtype}")
        work = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        y = x.to(work)
        if self.d <= self.matmul_max:
            key = ("matrix", work, str(x.device))
            if key not in self._cache:
                self._cache[key] = self.R.to(dtype=work, device=x.device)
            M = self._cache[key]
            return (y @ (M.T if transpose else M)).to(out_dtype)
        if not _CACHE:  # the previous path (benchmarks): factors moved by kron_apply_reference, a scaling pass
            fs, signs = self._factors(work, x.device, transpose)
            if signs is not None and not transpose:
                y = y * signs
            y = kron_apply_reference(y, fs) * (1.0 / math.sqrt(self.d))
            if signs is not None and transpose:
                y = y * signs
            return y.to(out_dtype)
        fs, signs = self._factors(work, x.device, transpose, scaled=True)
        lead = y.shape[:-1]
        y = kron_apply(y.reshape(-1, self.d), fs, None if transpose else signs)
        if signs is not None and transpose:
            y.mul_(signs)
        return y.reshape(*lead, self.d).to(out_dtype)

    def forward(self, x):
        self._check(x)
        return self._apply(x, transpose=False)

    def inverse(self, y):
        self._check(y, "y")
        return self._apply(y, transpose=True)

    def fold_weight(self, W):
        self._check(W, "W")
        return self._apply(W, transpose=False)

    def fold_reader(self, B):
        self._check(B, "B")
        return self._apply(B, transpose=True)  # B R^T, R orthogonal

    def __repr__(self) -> str:
        p = self.plan
        return f"HadamardRotation(n={p.n} = {p.m} x {p.p} [{p.kind}], seed={self.seed})"


def hadamard_rotation(n: int, seed: int | None = None, name: str | None = None, *,
                      max_factor: int | None = MAX_FACTOR) -> HadamardRotation:
    """The orthogonal rotation ``R = D H_n / sqrt(n)`` as a :class:`HadamardRotation`
    (``seed=None``: no random signs). Raises ``ValueError`` for orders without a construction."""
    return HadamardRotation(n, seed=seed, name=name, max_factor=max_factor)

