r"""Min-max fake quantization (simulated in floating point) and bit-allocation policies.

Fake quantization rounds values to the grid an integer kernel would use and returns them in
floating point, so accuracy effects are simulated exactly while speed and memory are not.

Per-token (per-row) asymmetric min-max quantization of a row :math:`v \in R^d` with b bits:

.. math::
    \Delta = \frac{\max v - \min v}{2^b - 1},\qquad
    \hat v = \min v + \Delta \cdot \operatorname{round}\!\left(\frac{v - \min v}{\Delta}\right),

so every element has :math:`|\hat v_j - v_j| \le \Delta / 2` - the assumption of Theorem 1. The
offset :math:`\min v` is kept in floating point (``round_zero_point=False``); integer kernels
round it to an integer zero point (``round_zero_point=True``), which can add up to another
:math:`\Delta/2` at the ends of the range. Symmetric quantization uses the restricted grid
:math:`\{-(2^{b-1}-1), \dots, 2^{b-1}-1\} \cdot \Delta` with :math:`\Delta = \max|v| / (2^{b-1}-1)`.
A clip ratio c < 1 shrinks the range to ``[c min v, c max v]`` (``c max|v|`` if symmetric) and
clamps what falls outside: Theorem 1 does not cover clipping.
"""

from __future__ import annotations

import heapq
import re
from typing import NamedTuple

import torch

from .checks import MAX_BITS, MIN_BITS, as_sequence_tensor, check_bits

__all__ = [
    "fake_quant",
    "fake_quant_rows",
    "stamp_fake_quant",
    "two_level_bits",
    "optimal_bits",
    "continuous_optimal_bits",
    "average_bits",
    "parse_bits",
    "bits_from_spec",
    "bits_label",
]


def _row_bits(bits, X: torch.Tensor) -> torch.Tensor:
    """Bits as a tensor broadcastable against ``X`` viewed as (..., s, n_blocks, block)."""
    s = X.shape[-2]
    b = check_bits(bits, s, device=X.device)
    return b.to(X.dtype).view(s, 1, 1)


class Grid(NamedTuple):
    """A per-row (per-block) uniform quantization grid, broadcastable against X viewed as
    (..., s, n_blocks, block): the grid points are ``lo + step * q`` for integers q in
    [qmin, qmax]. ``exact`` marks blocks with zero range (kept exactly)."""

    lo: torch.Tensor
    step: torch.Tensor
    qmin: torch.Tensor
    qmax: torch.Tensor
    exact: torch.Tensor


def _check_quant_args(X, clip_ratio, block_size):
    X = as_sequence_tensor(X)
    if not (isinstance(clip_ratio, (int, float)) and 0.0 < clip_ratio <= 1.0):
        raise ValueError(f"clip_ratio must be in (0, 1], got {clip_ratio!r}")
    d = X.shape[-1]
    if block_size is None:
        block_size = d
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if d % block_size:
        raise ValueError(f"feature dim d={d} is not a multiple of block_size={block_size}")
    return X, block_size


def minmax_grid(X: torch.Tensor, bits, symmetric: bool = False, clip_ratio: float = 1.0,
                block_size: int | None = None, round_zero_point: bool = False) -> Grid:
    """The min-max grid of every row (or block of ``block_size`` features) of ``X`` (..., s, d).

    Asymmetric: ``lo = c min v``, ``step = c (max v - min v) / (2^b - 1)``, q in [0, 2^b - 1]
    (with ``round_zero_point`` the offset is rounded to an integer multiple of the step, as integer
    kernels do). Symmetric (restricted): ``lo = 0``, ``step = c max|v| / (2^{b-1} - 1)``,
    q in [-(2^{b-1}-1), 2^{b-1}-1]. Shared by :func:`fake_quant` and by weight quantizers that
    fix the grid first and round later (GPTQ)."""
    X, B = _check_quant_args(X, clip_ratio, block_size)
    return _grid(_blocks(X, B), _row_bits(bits, X), symmetric, clip_ratio, round_zero_point)


def _blocks(X: torch.Tensor, B: int) -> torch.Tensor:
    return X.unflatten(-1, (X.shape[-1] // B, B))  # (..., s, nb, B)


def _grid(Xb, b, symmetric, clip_ratio, round_zero_point=False) -> Grid:
    """The grid of ``Xb`` (..., s, nb, B) for float bits ``b`` broadcastable as (s, 1, 1); unchecked."""
    if symmetric:
        qmax = 2.0 ** (b - 1) - 1
        amax = Xb.abs().amax(dim=-1, keepdim=True) * clip_ratio
        step = amax / qmax
        exact = step == 0  # a zero range, or a subnormal one whose step underflows
        step = torch.where(exact, torch.ones_like(amax), step)
        return Grid(torch.zeros_like(step), step, -qmax, qmax, exact)
    levels = 2.0 ** b - 1
    lo = Xb.amin(dim=-1, keepdim=True) * clip_ratio
    hi = Xb.amax(dim=-1, keepdim=True) * clip_ratio
    step = (hi - lo) / levels
    exact = step <= 0  # a zero range, or a subnormal one whose step underflows
    step = torch.where(exact, torch.ones_like(lo), step)
    if round_zero_point:
        lo = -torch.round(-lo / step) * step
    return Grid(lo, step, torch.zeros_like(levels), levels, exact)


def round_to_grid(Xb: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Round ``Xb`` (broadcastable against the grid) to its nearest grid point, clamped to the
    range; entries of zero-range blocks are kept (clamped to their single value when clipped)."""
    q = torch.clamp(torch.round((Xb - grid.lo) / grid.step), grid.qmin, grid.qmax)
    return torch.where(grid.exact, Xb, grid.lo + q * grid.step)


def fake_quant(
    X: torch.Tensor,
    bits,
    symmetric: bool = False,
    clip_ratio: float = 1.0,
    block_size: int | None = None,
    round_zero_point: bool = False,
) -> torch.Tensor:
    """Per-row (per-token) min-max fake quantization over the last dim of ``X`` (..., s, d).

    Args:
        X: floating tensor (..., s, d); each row X[..., i, :] gets its own range.
        bits: an int in [2, 16], or a 1-D tensor of length s (one width per row, shared over
            the leading batch dims and over blocks).
        symmetric: restricted symmetric grid around zero instead of asymmetric min-max.
        clip_ratio: in (0, 1]; scales the range before quantizing (values outside are clamped).
        block_size: if given, each row is split into blocks of ``block_size`` features with their
            own ranges (per-block quantization, e.g. 64 as in the paper's DiT experiments); d
            must be a multiple of it.
        round_zero_point: round the asymmetric offset to an integer zero point, as integer
            kernels do (breaks the |error| <= step/2 guarantee at the range ends).
    Returns:
        A tensor like ``X`` with every element on its row's (or block's) quantization grid.
    """
    X, B = _check_quant_args(X, clip_ratio, block_size)
    return _fake_quant(X, _row_bits(bits, X), symmetric, clip_ratio, B, round_zero_point)


_FUSED = True  # private: False restores the unfused per-call path (benchmarks time both in one run)


def _fake_quant(X, b, symmetric=False, clip_ratio=1.0, block_size=None, round_zero_point=False, out_scale=None,
                inplace: bool = False):
    """:func:`fake_quant` without validation: ``b`` float bits broadcastable as (s, 1, 1), no host syncs.

    ``out_scale``: per-row powers of two (s, 1), returns ``out_scale * Q(X)`` (exactly: a power of
    two scales without rounding), at no extra pass on the fused path. ``inplace``: the fused path
    may overwrite ``X`` (a buffer of the caller's that is not needed afterwards)."""
    Xb = _blocks(X, X.shape[-1] if block_size is None else block_size)
    if _FUSED and clip_ratio == 1 and not round_zero_point and X.dtype in (torch.float32, torch.float64):
        osc = None if out_scale is None else out_scale.unsqueeze(-1)  # (s, 1, 1) against (..., s, nb, B)
        return _fake_quant_unclipped(Xb, b, symmetric, osc, inplace).flatten(-2)
    grid = _grid(Xb, b, symmetric, clip_ratio, round_zero_point)
    out = round_to_grid(Xb, grid)
    if clip_ratio < 1 and not symmetric:  # a zero-range block clipped to its single value
        out = torch.where(grid.exact, grid.lo.expand_as(Xb), out)
    out = out.flatten(-2)
    return out if out_scale is None else out * out_scale


def _tiny(dtype: torch.dtype) -> float:
    """The smallest positive (subnormal) number of ``dtype``."""
    return torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def _fake_quant_unclipped(Xb: torch.Tensor, b: torch.Tensor, symmetric: bool, out_scale=None,
                          inplace: bool = False) -> torch.Tensor:
    r""":func:`_grid` and :func:`round_to_grid` fused for an unclipped min-max grid (``clip_ratio=1``,
    no zero-point rounding, float32/float64): two reductions, one fresh tensor and in-place passes
    (subtract, divide, round, multiply, add) instead of seven fresh tensors and twice as many small
    ops, with the same IEEE operations in the same order, so the same values (up to the sign of a
    zero).

    Nothing needs clamping there: :math:`0 \le v - lo \le fl(hi - lo)` and
    :math:`fl(hi - lo) / fl(fl(hi - lo)/L) \le L (1 + 2^{-22}) < L + 1/2` for every
    :math:`L = 2^b - 1 < 2^{16}` in float32 or float64 (symmetrically :math:`|v| / step < q_{max} + 1/2`),
    so the rounded value is already in ``[qmin, qmax]`` (for normal steps; a subnormal step may
    land one level past the end, still within step/2). A step of zero (a zero range, or a subnormal
    range whose step underflows) becomes the smallest subnormal ``tiny``: the entries differ from
    ``lo`` by exact multiples of ``tiny``, so ``lo + q * tiny`` returns them unchanged, as the
    unfused path keeps such blocks: no ``where`` either.
    ``out_scale`` (powers of two, broadcastable as (s, 1, 1)) multiplies ``step`` and ``lo`` (exact).
    ``inplace``: work in ``Xb``'s memory (no fresh tensor at all)."""
    if symmetric:  # lo = 0: v / step, rounded, times step; max|v| = max(max v, -min v), no |X| tensor
        amax = torch.maximum(Xb.amax(dim=-1, keepdim=True), Xb.amin(dim=-1, keepdim=True).neg_())
        step = amax / (2.0 ** (b - 1) - 1)
        step.clamp_min_(_tiny(Xb.dtype))
        q = (Xb.div_(step) if inplace else torch.div(Xb, step)).round_()
        return q.mul_(step if out_scale is None else step * out_scale)
    lo = Xb.amin(dim=-1, keepdim=True)
    rng = Xb.amax(dim=-1, keepdim=True) - lo
    step = rng / (2.0 ** b - 1)
    step.clamp_min_(_tiny(Xb.dtype))
    q = (Xb.sub_(lo) if inplace else torch.sub(Xb, lo)).div_(step).round_()
    if out_scale is not None:
        step, lo = step * out_scale, lo * out_scale
    return q.mul_(step).add_(lo)


def fake_quant_rows(X: torch.Tensor, bits, **kw) -> torch.Tensor:
    """Alias of :func:`fake_quant` for readability when quantizing weight rows (out, in)."""
    return fake_quant(X, bits, **kw)


def stamp_fake_quant(X: torch.Tensor, T, bits, *, feature=None, undo_feature: bool = True,
                     LX: torch.Tensor | None = None, validate: bool = True, overwrite: bool = False,
                     quantizer=None, **quant_kw) -> torch.Tensor:
    r"""The STaMP operator, the one implementation every caller uses:

    .. math::  \hat X = L^{-1}\, Q_b(L\, X R)\, R^{-1}

    Args:
        X: (..., s, d). T: a sequence transform L (``None`` = identity) acting on dim -2.
        bits: per-row bits of the *transformed* rows (int, or a length-s vector; see
            :func:`fake_quant`). With ``validate=False`` it must already be a float tensor
            broadcastable as (s, 1, 1) (the model hooks' sync-free path).
        feature: optional feature transform R (:mod:`stamp_lib.methods.features`); ``undo_feature=False``
            returns :math:`L^{-1} Q(L X R)` in the rotated basis, for a layer whose weight absorbed
            :math:`R^{-\top}` (QuaRot, SmoothQuant).
        LX: the already computed :math:`L X R`, to skip the forward transform (e.g. when its row
            energies were needed too).
        overwrite: with ``validate=False`` and no ``feature``: ``X`` is the caller's scratch and may
            be overwritten (the result may then share its memory); the per-call path passes a
            freshly rotated input this way, so that no further tensor-sized buffer is needed.
        quantizer: ``None`` (the per-row min-max quantizer below, with ``quant_kw``) or a method's own
            per-row quantizer ``quantizer(LX, b) -> Q`` (e.g. FlatQuant's, with its learned clipping),
            ``b`` the per-row bits as a float tensor (s, 1); it must not modify ``LX``.
        quant_kw: ``symmetric``, ``clip_ratio``, ``block_size``, ``round_zero_point``.
    """
    if quantizer is not None:
        if quant_kw:
            raise ValueError(f"stamp_fake_quant: quantizer= replaces the min-max quantizer; drop {sorted(quant_kw)}")
        if validate:
            _check_quant_args(X, 1.0, None)
            bits = _row_bits(bits, X)
        if LX is None:
            Y = X if feature is None else feature.forward(X)
            LX = Y if T is None else T.forward(Y)
        out = quantizer(LX, bits.reshape(-1, 1))
        out = out if T is None else T.inverse(out)
        return feature.inverse(out) if feature is not None and undo_feature else out
    overwrite = overwrite and not validate and feature is None and LX is None
    own_lx = False  # whether LX is a tensor of ours (then the quantizer may work in its memory)
    if LX is None:
        Y = X if feature is None else feature.forward(X)
        if not validate and T is not None and getattr(T, "_unscaled_ok", None) is not None and T._unscaled_ok(Y):
            # L = D U with D powers of two (the fast 2-D Haar): the min-max quantizer commutes with D
            # exactly, so L^-1 Q(L Y) = U^T (D^2 Q(U Y)), and D^2 rides on Q's last pass (no pass for D).
            # U Y goes to a workspace buffer (or over Y) and is quantized there in place
            over = overwrite and Y.is_contiguous()
            UY = T._forward_unscaled(Y, scratch=True, inplace=over)
            Q = _fake_quant(UY, bits, out_scale=T._row_scale(Y, squared=True), inplace=True, **quant_kw)
            out = T._inverse_unscaled(Q, inplace=over)  # a fresh tensor, or over Y (never the workspace)
            return feature.inverse(out) if feature is not None and undo_feature else out
        LX = Y if T is None else T.forward(Y)  # transforms return fresh tensors
        own_lx = T is not None or overwrite
    if validate:
        Q = fake_quant(LX, bits, **quant_kw)
    else:
        Q = _fake_quant(LX, bits, inplace=own_lx, **quant_kw)
    out = Q if T is None else T.inverse(Q)
    if feature is not None and undo_feature:
        out = feature.inverse(out)
    return out


# ---------------------------------------------------------------------------------------------
# Bit allocation
# ---------------------------------------------------------------------------------------------
def two_level_bits(s: int, hp_tokens: int = 64, hp_bits: int = 8, lp_bits: int = 4) -> torch.Tensor:
    """The paper's rule: the first ``hp_tokens`` rows at ``hp_bits``, all others at ``lp_bits``.

    With s=4096 and 64 rows at 8 bits over 4 this averages 4.0625 bits."""
    if not isinstance(s, int) or s < 1:
        raise ValueError(f"s must be a positive int, got {s!r}")
    if not isinstance(hp_tokens, int) or not 0 <= hp_tokens <= s:
        raise ValueError(f"hp_tokens must be an int in [0, s={s}], got {hp_tokens!r}")
    check_bits(hp_bits)
    check_bits(lp_bits)
    b = torch.full((s,), lp_bits, dtype=torch.long)
    b[:hp_tokens] = hp_bits
    return b


def average_bits(bits) -> float:
    """Average bit width of a bit vector."""
    return float(torch.as_tensor(bits, dtype=torch.float64).mean())


def _validate_energies(energies) -> torch.Tensor:
    e = torch.as_tensor(energies, dtype=torch.float64).flatten()
    if e.numel() == 0:
        raise ValueError("energies is empty")
    if not bool(torch.isfinite(e).all()) or bool((e < 0).any()):
        raise ValueError("energies must be finite and non-negative")
    return e


def continuous_optimal_bits(energies, avg_bits: float) -> torch.Tensor:
    r"""Unconstrained real-valued optimum of Theorem 1's bound under :math:`\sum_i b_i = s\,\bar b`.

    With :math:`(2^b-1)^{-2} \approx 4^{-b}`, the Lagrangian of
    :math:`\sum_i e_i 4^{-b_i} + \lambda \sum_i b_i` gives :math:`b_i = \log_2\sqrt{e_i} - C`,
    i.e. :math:`b_i = \bar b + \tfrac12\log_2 e_i - \tfrac12\,\overline{\log_2 e}`. Rows with zero
    energy are given the floor of the others (they would get -inf)."""
    e = _validate_energies(energies)
    pos = e > 0
    if not bool(pos.any()):
        return torch.full_like(e, float(avg_bits))
    le = torch.where(pos, torch.log2(e.clamp_min(1e-300)), torch.log2(e[pos].min()))
    return float(avg_bits) + 0.5 * (le - le.mean())


def optimal_bits(
    energies, avg_bits: float, min_bits: int = MIN_BITS, max_bits: int = MAX_BITS
) -> torch.Tensor:
    r"""Integer bit widths minimising Theorem 1's bound :math:`\sum_i e_i/(2^{b_i}-1)^2`.

    Subject to :math:`\sum_i b_i = \operatorname{round}(s\,\bar b)` and
    ``min_bits <= b_i <= max_bits``. The objective is separable and each term's gain from one
    more bit, :math:`e_i[(2^b-1)^{-2} - (2^{b+1}-1)^{-2}]`, decreases with b, so handing out
    bits one at a time to the row with the largest gain (a heap) is exactly optimal."""
    e = _validate_energies(energies)
    check_bits(min_bits)
    check_bits(max_bits)
    if min_bits > max_bits:
        raise ValueError(f"min_bits={min_bits} > max_bits={max_bits}")
    s = e.numel()
    budget = int(round(float(avg_bits) * s))
    if not min_bits * s <= budget <= max_bits * s:
        raise ValueError(
            f"average {avg_bits} bits over s={s} rows is outside [{min_bits}, {max_bits}]"
        )
    b = [min_bits] * s
    ev = e.tolist()

    def gain(i: int, bi: int) -> float:
        return ev[i] * ((2.0**bi - 1) ** -2 - (2.0 ** (bi + 1) - 1) ** -2)

    # ties broken by row index so that the result is deterministic (earlier rows first)
    heap = [(-gain(i, min_bits), i) for i in range(s)]
    heapq.heapify(heap)
    for _ in range(budget - min_bits * s):
        _, i = heapq.heappop(heap)
        b[i] += 1
        if b[i] < max_bits:
            heapq.heappush(heap, (-gain(i, b[i]), i))
    return torch.tensor(b, dtype=torch.long)


_SPEC = re.compile(r"^\s*(\d+)\s*x\s*(\d+)\s*\+\s*(\d+)\s*$")


def check_bits_value(b, what: str) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or not MIN_BITS <= b <= MAX_BITS:
        raise ValueError(f"{what} must be an int in [{MIN_BITS}, {MAX_BITS}], got {b!r}")
    return b


def parse_bits(bits) -> tuple[int, int, int]:
    """``(hp_tokens, hp_bits, lp_bits)`` from an int (``4`` -> ``(0, 4, 4)``) or a spec ``"64x8+4"``
    (the first 64 rows at 8 bits, the others at 4)."""
    if isinstance(bits, str):
        m = _SPEC.match(bits)
        if m is None:
            if bits.strip().isdigit():
                b = check_bits_value(int(bits), "bits")
                return 0, b, b
            raise ValueError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}] or a spec like '64x8+4' "
                             f"(64 rows at 8 bits, the rest at 4); got {bits!r}")
        hp, hb, lb = (int(g) for g in m.groups())
        return hp, check_bits_value(hb, "high-precision bits"), check_bits_value(lb, "low-precision bits")
    b = check_bits_value(bits, "bits")
    return 0, b, b


def bits_from_spec(spec, s: int) -> torch.Tensor:
    """The bit vector (s,) of a spec (see :func:`parse_bits`): ``"64x8+4"`` -> 64 rows at 8 bits,
    the rest at 4; ``"4"`` or ``4`` -> every row at 4."""
    hp, hb, lb = parse_bits(spec)
    return two_level_bits(s, hp, hb, lb)


def bits_label(bits) -> str:
    """A short human label for a bit vector: ``"4"``, ``"64x8+4"`` or ``"mixed (avg 4.25)"``."""
    b = torch.as_tensor(bits).flatten()
    vals = torch.unique(b)
    if vals.numel() == 1:
        return str(int(vals[0]))
    if vals.numel() == 2:
        hi, lo = int(vals.max()), int(vals.min())
        n_hi = int((b == hi).sum())
        if bool((b[:n_hi] == hi).all()):
            return f"{n_hi}x{hi}+{lo}"
    return f"mixed (avg {float(b.double().mean()):.4g})"

