r"""GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers"). Quantizes the weight one input column at a time and spreads each
column's rounding error over the columns not yet quantized, using the layer Hessian
:math:`H = X^\top X` of the objective :math:`\lVert X W^\top - X \hat W^\top \rVert_F^2`. With
:math:`U` the upper Cholesky factor of :math:`H^{-1}` (:math:`H^{-1} = U^\top U`), column j
is rounded and the rest of the row updated as

.. math::  \hat w_j = \operatorname{round}(w_j),\qquad e = (w_j - \hat w_j) / U_{jj},\qquad
           w_{j:} \leftarrow w_{j:} - e\, U_{j, j:},

applied in blocks of columns with lazy updates of the columns after the block (the reference
implementation, ``gptq.py`` of IST-DASLab/gptq). Rounding uses :func:`stamp_lib.core.quant.round_to_grid`
on :func:`stamp_lib.core.quant.minmax_grid` grids, the same grid semantics as
:func:`stamp_lib.core.quant.fake_quant`; with :math:`H = I` GPTQ is exactly round-to-nearest.
"""

from __future__ import annotations

import math

import torch

from ..core import quant

__all__ = ["gptq_quantize", "HessianAccumulator", "hessian_accumulator"]


def _grid_slice(grid: quant.Grid, g: int) -> quant.Grid:
    """Group g of a grid with a groups axis (dim 1); axes of size 1 are shared."""
    return quant.Grid(*(t[:, g:g + 1] if t.dim() >= 2 and t.shape[1] > 1 else t for t in grid))


def _grid_cat(grids: list[quant.Grid]) -> quant.Grid:
    return quant.Grid(*(torch.cat([g[k].expand(g.lo.shape[0], 1, 1) for g in grids], dim=1)
                        for k in range(len(quant.Grid._fields))))


def _aligned_block(block_size: int, group: int | None) -> int:
    """Largest block <= block_size whose boundaries contain every group boundary, or the reverse."""
    if group is None:
        return block_size
    if group <= block_size:
        return block_size - block_size % group
    return max(b for b in range(1, block_size + 1) if group % b == 0)


def gptq_quantize(
    W: torch.Tensor,
    H: torch.Tensor,
    bits=4,
    *,
    group_size: int | None = None,
    symmetric: bool = True,
    clip_ratio: float = 1.0,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    static_groups: bool = False,
    compute_dtype: torch.dtype = torch.float64,
    return_grid: bool = False,
):
    r"""GPTQ fake-quantized weight (Frantar et al. 2023), with :mod:`stamp_lib.core.quant` grids.

    Args:
        W: (out, in) floating weight; rows are output channels.
        H: (in, in) symmetric positive semi-definite Hessian proxy :math:`X^\top X` (any positive
            scaling; see :class:`HessianAccumulator`), moved to W's device.
        bits: int in [2, 16] or a 1-D tensor of one width per output row.
        group_size: None for one grid per output row, computed on the original W before the
            loop; else one grid per row and per group of ``group_size`` input columns (in must be a
            multiple), computed from the *updated* weights when the loop reaches the group.
        symmetric, clip_ratio: grid options of :func:`quant.minmax_grid`.
        block_size: columns per lazy-update block (a speed knob: the result depends on it only
            through rounding). With groups the block is shrunk so that group starts are block
            starts; the grid of a group is then always computed from the exact current weights.
            (The reference computes a group that starts mid-block from weights that lack the
            block's pending updates; the two agree whenever groups and blocks align, e.g.
            group_size = block_size = 128.)
        damp: ``damp * mean(diag H)`` is added to the diagonal before inverting.
        act_order: process columns by decreasing ``diag(H)`` (and return them in the original
            order). With ``group_size`` this uses static groups (below), as the reference's
            ``--static-groups``, so that every group is still a contiguous block of original columns.
        static_groups: with ``group_size``, compute all group grids from W (after zeroing dead
            columns) before the loop.
        compute_dtype: float64 (default) or float32 for the algorithm; the result has W's dtype.
        return_grid: also return the :class:`quant.Grid` used, broadcastable against the result
            viewed as (out, n_groups, group) in the original column order (n_groups = 1 without
            groups).
    Returns:
        The fake-quantized weight (W's dtype and device), every entry on its row's (group's) grid;
        or ``(Wq, grid)`` with ``return_grid``.

    As in the reference: the per-row grid is taken before dead inputs are handled; dead inputs
    (``H_jj == 0``) get ``H_jj = 1`` and ``W[:, j] = 0`` (then quantized like any column). Unlike
    the reference's quantizer (range always containing 0, integer zero point, 2^b symmetric levels)
    the grid is :func:`quant.minmax_grid`'s, so that ``H = I`` gives exactly
    ``quant.fake_quant(W, bits, symmetric, clip_ratio, block_size=group_size)``.
    """
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or not W.is_floating_point():
        raise ValueError(f"W must be a floating (out, in) tensor, got {getattr(W, 'shape', type(W))}"
                         f"{'' if not isinstance(W, torch.Tensor) else ' ' + str(W.dtype)}")
    out_f, in_f = W.shape
    if out_f == 0 or in_f == 0:
        raise ValueError(f"W is empty: shape {tuple(W.shape)}")
    if not isinstance(H, torch.Tensor) or H.shape != (in_f, in_f):
        raise ValueError(f"H must be an (in, in) = ({in_f}, {in_f}) tensor for W of shape {tuple(W.shape)}, "
                         f"got {getattr(H, 'shape', type(H))}")
    if compute_dtype not in (torch.float32, torch.float64):
        raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
    if not bool(torch.isfinite(W).all()):
        raise ValueError("W contains non-finite values")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("H contains non-finite values")
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp < math.inf:
        raise ValueError(f"damp must be a finite number >= 0, got {damp!r}")
    if group_size is not None:
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
            raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
        if in_f % group_size:
            raise ValueError(f"in={in_f} input columns are not a multiple of group_size={group_size}")
        if group_size == in_f:
            group_size = None  # one group per row is the per-row grid
    qkw = dict(symmetric=symmetric, clip_ratio=clip_ratio)
    dev = W.device
    Wc = W.detach().to(compute_dtype).clone()
    Hc = H.detach().to(device=dev, dtype=compute_dtype).clone()
    scale_h = float(Hc.abs().max())
    if float((Hc - Hc.T).abs().max()) > 1e-6 * max(scale_h, 1e-300):
        raise ValueError("H is not symmetric (max |H - H^T| > 1e-6 max |H|)")
    if bool((torch.diagonal(Hc) < 0).any()):
        raise ValueError("H has negative diagonal entries: it is not a Gram matrix X^T X")

    static = group_size is not None and (static_groups or act_order)
    grid = None
    if group_size is None:
        grid = quant.minmax_grid(Wc, bits, block_size=None, **qkw)  # (out, 1, 1), before dead columns
    dead = torch.diagonal(Hc) == 0
    Hc[dead, dead] = 1
    Wc[:, dead] = 0
    if static:
        grid = quant.minmax_grid(Wc, bits, block_size=group_size, **qkw)  # (out, n_groups, 1)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(Hc), descending=True, stable=True)
        Wc = Wc[:, perm]
        Hc = Hc[perm][:, perm]
    Hc.diagonal().add_(damp * torch.diagonal(Hc).mean())
    L, info = torch.linalg.cholesky_ex(Hc)
    if int(info) == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if int(info) != 0:
        raise ValueError(f"H + damp*mean(diag H)*I is not positive definite (damp={damp}); increase damp "
                         "or accumulate H over more calibration tokens")

    clip_const = clip_ratio < 1 and not symmetric  # fake_quant maps zero-range blocks to c * min
    Q = torch.zeros_like(Wc)
    dyn_grids: list[quant.Grid] = []
    cur = grid
    B = block_size if static else _aligned_block(block_size, group_size)
    for i1 in range(0, in_f, B):
        i2 = min(i1 + B, in_f)
        W1 = Wc[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            if group_size is not None:
                if static:
                    orig = int(perm[col]) if perm is not None else col
                    cur = _grid_slice(grid, orig // group_size)
                elif col % group_size == 0:
                    src = Wc[:, col:col + group_size] if i == 0 else W1[:, i:i + group_size]
                    cur = quant.minmax_grid(src, bits, block_size=None, **qkw)
                    dyn_grids.append(cur)
            w = W1[:, i]
            q = quant.round_to_grid(w.view(out_f, 1, 1), cur)
            if clip_const:
                q = torch.where(cur.exact, cur.lo.expand_as(q), q)
            q = q.view(out_f)
            Q[:, col] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        Wc[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    Q = Q.to(W.dtype)
    if not return_grid:
        return Q
    if group_size is not None and not static:
        grid = _grid_cat(dyn_grids)
    return Q, grid


class HessianAccumulator:
    r"""Running :math:`\sum x x^\top` over the rows of every ``add(x)`` and their count (each batch's
    product in the input's precision, float32 for float32 inputs; the running sum in float64).

    ``H`` = sum / count (GPTQ is invariant to the scale of H, so the reference's 2/n factor is
    irrelevant). ``add(x)`` takes (..., d): every leading index is one sample (token). The sum
    lives on ``device`` (default: that of the first x)."""

    def __init__(self, d: int | None = None, device=None):
        if d is not None and (not isinstance(d, int) or d < 1):
            raise ValueError(f"d must be a positive int or None, got {d!r}")
        self.d = d
        self.device = device
        self.sum: torch.Tensor | None = None
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        """Accumulate the rows of ``x`` (..., d) (floating, finite)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or not x.is_floating_point():
            raise ValueError(f"x must be a floating tensor (..., d), got {getattr(x, 'shape', type(x))}")
        if self.d is None:
            self.d = x.shape[-1]
        if x.shape[-1] != self.d:
            raise ValueError(f"x has {x.shape[-1]} features, the accumulator has d={self.d}")
        dev = self.device if self.device is not None else x.device
        x2 = x.detach().reshape(-1, self.d).to(device=dev)
        if not x2.is_floating_point() or x2.dtype in (torch.float16, torch.bfloat16):
            x2 = x2.float()
        if not bool(torch.isfinite(x2).all()):
            raise ValueError("x contains non-finite values")
        xtx = (x2.T @ x2).double()  # products in the input's precision (float32: ~3x faster), sums in float64
        if self.sum is None:
            self.sum = xtx
        else:  # in place: no third d x d matrix while adding (the same sums)
            self.sum.add_(xtx)
            del xtx
        self.device = dev
        self.count += x2.shape[0]

    @property
    def H(self) -> torch.Tensor:  # noqa: N802 - the paper's symbol
        """E[x x^T] over all rows added (float64, (d, d))."""
        if self.count == 0:
            raise ValueError("no samples added yet: call add(x) first")
        return self.sum / self.count

    def take(self) -> torch.Tensor:
        """:attr:`H` computed in the memory of the running sum, which the accumulator gives up (no
        second d x d matrix; the same values). The accumulator is empty afterwards."""
        H = self.H if self.sum is None else self.sum.div_(self.count)
        self.sum, self.count = None, 0
        return H


hessian_accumulator = HessianAccumulator
"""Alias of :class:`HessianAccumulator` (the name the model layer calls)."""
