r"""Theorem 1 of STaMP and the measured error it bounds.

For an orthogonal sequence transform L with rows :math:`l_i` and per-row min-max quantization
with :math:`b_i` bits,

.. math::
    \mathbb E\,\|L^{-1} Q(LX) - X\|_F^2 \;\le\; \frac d2 \sum_{i=1}^{s}
        \frac{\mathbb E\,\|l_i X\|^2}{(2^{b_i}-1)^2}.

Proof sketch (each step is a line of :func:`theorem1`):

1. orthogonality: :math:`\|L^{-1}E\|_F = \|E\|_F` with :math:`E = Q(LX) - LX`;
2. min-max rounding: every entry of row i has :math:`|E_{ij}| \le \Delta_i/2`,
   :math:`\Delta_i = (\max v - \min v)/(2^{b_i}-1)` with :math:`v = l_i X`;
3. range to norm: :math:`(\max v - \min v)^2 \le 2(\max^2 v + \min^2 v) \le 2\|v\|^2`;
4. so row i contributes at most :math:`d\,\Delta_i^2/4 \le (d/2)\|v\|^2/(2^{b_i}-1)^2`.

The bound holds for every sample, hence in expectation. With per-block ranges (blocks of B
features) step 3 applies per block and d becomes B. For the restricted symmetric grid,
:math:`\Delta = \max|v|/(2^{b-1}-1)` and the row term is :math:`d\,\|v\|^2/(2^b-2)^2`.
"""

from __future__ import annotations

import torch

from .checks import as_sequence_tensor, check_bits
from .metrics import row_energy
from .quant import stamp_fake_quant

__all__ = ["theorem1", "theorem1_terms", "theorem1_coefficients", "stamp_error"]


def theorem1_coefficients(bits: torch.Tensor, B: int, symmetric: bool = False) -> torch.Tensor:
    """Per-row factor c_i of Theorem 1, bound = sum_i c_i ||l_i X||^2 (float64): (B/2)/(2^b-1)^2
    asymmetric, B/(2^b-2)^2 restricted symmetric; B = d, or the block size for per-block ranges."""
    b = torch.as_tensor(bits).double()
    if symmetric:
        return B / (2.0**b - 2.0) ** 2
    return (B / 2.0) / (2.0**b - 1.0) ** 2


def theorem1_terms(
    X: torch.Tensor,
    T,
    bits,
    symmetric: bool = False,
    block_size: int | None = None,
    require_orthogonal: bool = True,
) -> torch.Tensor:
    """Per-row terms of Theorem 1's right-hand side, shape (s,) float64 (batch summed)."""
    X = as_sequence_tensor(X)
    if require_orthogonal and not getattr(T, "orthogonal", True):
        raise ValueError(
            f"Theorem 1 needs an orthogonal transform; {T!r} is not (pass require_orthogonal=False "
            "to evaluate the formula anyway, e.g. to show that it then fails)"
        )
    s, d = X.shape[-2], X.shape[-1]
    B = d if block_size is None else block_size
    if d % B:
        raise ValueError(f"feature dim d={d} is not a multiple of block_size={B}")
    b = check_bits(bits, s)
    e = row_energy(T.forward(X))  # ||l_i X||^2, step 1 keeps the norm
    return theorem1_coefficients(b, B, symmetric) * e


def theorem1(X: torch.Tensor, T, bits, **kw) -> float:
    """Theorem 1's bound :math:`(d/2)\\sum_i \\|l_i X\\|^2/(2^{b_i}-1)^2` (batched X sums)."""
    return float(theorem1_terms(X, T, bits, **kw).sum())


def stamp_error(X: torch.Tensor, T, bits, **quant_kw) -> float:
    """Measured :math:`\\|L^{-1} Q(LX) - X\\|^2` (batched X sums), float64 accumulation."""
    X = as_sequence_tensor(X)
    Xq = stamp_fake_quant(X, T, bits, **quant_kw)
    return float((Xq.double() - X.double()).pow(2).sum())
