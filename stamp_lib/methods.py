r"""Quantization-method primitives that STaMP is combined with (pure torch, no models).

Three published methods, as small functions the model layer (recipes, hooks) calls:

**Hadamard feature rotation (QuaRot: Ashkboos et al. 2024, "QuaRot: Outlier-Free 4-Bit Inference
in Rotated LLMs").** A Hadamard matrix :math:`H \in \{\pm 1\}^{n \times n}` has
:math:`H H^\top = n I`, so :math:`R = H / \sqrt n` (or :math:`D H / \sqrt n` with a random sign
diagonal D) is orthogonal; a linear layer computes the same output from :math:`X R` and the folded
weight :math:`W R` (:mod:`stamp_lib.features`), while the rotation spreads outlier features
over all channels. Orders that are not powers of two are built as a Kronecker product
:math:`H_n = H_m \otimes H_{2^k}` of a Paley matrix and a Sylvester (Walsh-Hadamard) matrix
(:math:`(A \otimes B)(A \otimes B)^\top = A A^\top \otimes B B^\top = m 2^k I`):

* Paley I, q prime, :math:`q \equiv 3 \pmod 4`, order :math:`q + 1`:
  :math:`H = I + \begin{pmatrix} 0 & \mathbf 1^\top \\ -\mathbf 1 & Q \end{pmatrix}`;
* Paley II, q prime, :math:`q \equiv 1 \pmod 4`, order :math:`2(q + 1)`: the symmetric conference
  matrix :math:`C = \begin{pmatrix} 0 & \mathbf 1^\top \\ \mathbf 1 & Q \end{pmatrix}` with every 0
  replaced by :math:`\left(\begin{smallmatrix} 1 & -1 \\ -1 & -1 \end{smallmatrix}\right)` and
  every :math:`\pm 1` by :math:`\pm\left(\begin{smallmatrix} 1 & 1 \\ 1 & -1 \end{smallmatrix}\right)`;

where :math:`Q_{ab} = \chi(a - b)` is the Jacobsthal matrix of the Legendre symbol
:math:`\chi` modulo q. :math:`x H` then costs :math:`O(n (m + \log n))` per row: a dense
:math:`m \times m` product and a fast Walsh-Hadamard transform over the :math:`2^k` factor.

**SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models").** Per input channel j,

.. math::  s_j = \frac{\max |X_j|^{\alpha}}{\max |W_j|^{1-\alpha}},\qquad
           Y = (X \operatorname{diag}(s)^{-1}) (W \operatorname{diag}(s))^\top,

which moves quantization difficulty from activations to weights; at :math:`\alpha = 1/2`
both smoothed ranges equal :math:`\sqrt{\max|X_j| \max|W_j|}`.

**GPTQ (Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers").** Quantizes the weight one input column at a time and spreads each
column's rounding error over the columns not yet quantized, using the layer Hessian
:math:`H = X^\top X` of the objective :math:`\lVert X W^\top - X \hat W^\top \rVert_F^2`. With
:math:`U` the upper Cholesky factor of :math:`H^{-1}` (:math:`H^{-1} = U^\top U`), column j
is rounded and the rest of the row updated as

.. math::  \hat w_j = \operatorname{round}(w_j),\qquad e = (w_j - \hat w_j) / U_{jj},\qquad
           w_{j:} \leftarrow w_{j:} - e\, U_{j, j:},

applied in blocks of columns with lazy updates of the columns after the block (the reference
implementation, ``gptq.py`` of IST-DASLab/gptq). Rounding uses :func:`stamp_lib.quant.round_to_grid`
on :func:`stamp_lib.quant.minmax_grid` grids, the same grid semantics as
:func:`stamp_lib.quant.fake_quant`; with :math:`H = I` GPTQ is exactly round-to-nearest.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch

from . import quant
from .features import Rotation, Scale

__all__ = [
    "MAX_FACTOR",
    "HadamardPlan",
    "hadamard_plan",
    "hadamard_orders",
    "hadamard_matrix",
    "HadamardRotation",
    "hadamard_rotation",
    "smoothquant_scales",
    "smoothquant_transform",
    "weight_input_absmax",
    "gptq_quantize",
    "HessianAccumulator",
    "hessian_accumulator",
]


# =============================================================================================
# Hadamard matrices
# =============================================================================================
def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    if q % 2 == 0:
        return q == 2
    f = 3
    while f * f <= q:
        if q % f == 0:
            return False
        f += 2
    return True


def _factor_text(q: int) -> str:
    """``"171 = 3^2*19"`` style factorization, for error messages."""
    parts, r, f = [], q, 2
    while f * f <= r:
        e = 0
        while r % f == 0:
            r //= f
            e += 1
        if e:
            parts.append(f"{f}^{e}" if e > 1 else str(f))
        f += 1
    if r > 1:
        parts.append(str(r))
    return "*".join(parts) if parts else str(q)


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


class HadamardPlan(NamedTuple):
    """How a Hadamard matrix of order ``n`` is built: ``H_n = H_m (x) H_p`` with ``p = n // m`` a
    power of two (Sylvester) and ``H_m`` from ``kind`` ("sylvester" when m = 1, "paley1" with
    m = q + 1, "paley2" with m = 2 (q + 1))."""

    n: int
    m: int
    p: int
    kind: str
    q: int | None


def _paley_kind(m: int) -> tuple[str, int] | None:
    """The Paley construction of order m with a prime q, or None."""
    q = m - 1
    if q % 4 == 3 and _is_prime(q):
        return "paley1", q
    if m % 2 == 0:
        q = m // 2 - 1
        if q % 4 == 1 and _is_prime(q):
            return "paley2", q
    return None


MAX_FACTOR = 256
"""Default bound on the dense factor m of :func:`hadamard_plan`: above it the Kronecker "fast" path
is essentially a dense matmul (e.g. 11008 = 5504 x 2 with Paley I, q = 5503)."""


@lru_cache(maxsize=256)
def hadamard_plan(n: int, max_factor: int | None = MAX_FACTOR) -> HadamardPlan:
    """The construction :func:`hadamard_matrix` uses for order ``n``, with the smallest Paley factor.

    ``n = m * 2^k`` where m is 1 (Sylvester) or a Paley order (I: m = q + 1, q prime = 3 mod 4;
    II: m = 2 (q + 1), q prime = 1 mod 4), ``m <= max_factor`` (None: no bound). Raises
    ``ValueError`` naming n, every factorization tried and why it failed, and what to do instead."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the order n must be a positive int, got {n!r}")
    if max_factor is not None and (not isinstance(max_factor, int) or max_factor < 1):
        raise ValueError(f"max_factor must be a positive int or None, got {max_factor!r}")
    if _is_pow2(n):
        return HadamardPlan(n, 1, n, "sylvester", None)
    if n % 4:
        raise ValueError(
            f"no Hadamard matrix of order n={n} exists: orders other than 1 and 2 are multiples of 4. "
            "Use a block-diagonal rotation (a Hadamard of a power of two dividing n on each block), "
            "pad the features to a multiple of a supported order, or a random orthogonal matrix "
            "(features.Rotation(torch.linalg.qr(torch.randn(n, n)).Q))."
        )
    odd, a = n, 0
    while odd % 2 == 0:
        odd //= 2
        a += 1
    tried = []
    for j in range(a + 1):
        m = odd << j
        found = _paley_kind(m)
        if found is not None:
            kind, q = found
            if max_factor is None or m <= max_factor:
                return HadamardPlan(n, m, n // m, kind, q)
            tried.append(f"{n} = {m} x {n // m}: {kind} with q={q} exists, but m={m} > max_factor="
                         f"{max_factor} (its 'fast' path is a dense {m} x {m} product; pass "
                         "max_factor=None to use it anyway)")
            break
        why = [f"Paley I needs q={m - 1} prime = 3 mod 4 (q = {_factor_text(m - 1)}, {(m - 1) % 4} mod 4)"]
        if m % 2 == 0:
            q2 = m // 2 - 1
            why.append(f"Paley II needs q={q2} prime = 1 mod 4 (q = {_factor_text(q2)}, {q2 % 4} mod 4)")
        else:
            why.append("Paley II needs an even order")
        tried.append(f"{n} = {m} x {n // m}: " + "; ".join(why))
    raise ValueError(
        f"no Hadamard matrix of order n={n} from the constructions available here (a Paley matrix "
        "with a prime q, Kronecker a Sylvester power of two). Tried:\n  " + "\n  ".join(tried)
        + "\nOrders such as 172 exist (Williamson constructions, Sloane's library, used by QuaRot's "
        "hard-coded tables) but are not built here. Instead use a block-diagonal Hadamard over a "
        "supported divisor of n, pad the features, or a random orthogonal matrix "
        "(features.Rotation(torch.linalg.qr(torch.randn(n, n, dtype=torch.float64)).Q)); "
        "see hadamard_orders() for the available orders."
    )


def hadamard_orders(limit: int, max_factor: int | None = MAX_FACTOR) -> list[int]:
    """All orders ``n <= limit`` for which :func:`hadamard_matrix` has a construction."""
    out = []
    for n in range(1, limit + 1):
        try:
            hadamard_plan(n, max_factor)
        except ValueError:
            continue
        out.append(n)
    return out


def _jacobsthal(q: int) -> torch.Tensor:
    """Q_ab = chi(a - b) mod q (Legendre symbol), int64."""
    chi = torch.full((q,), -1, dtype=torch.int64)
    chi[0] = 0
    r = torch.arange(1, q, dtype=torch.int64)
    chi[(r * r) % q] = 1
    i = torch.arange(q)
    return chi[(i[:, None] - i[None, :]) % q]


@lru_cache(maxsize=32)
def _paley(kind: str, q: int) -> torch.Tensor:
    Q = _jacobsthal(q)
    k = q + 1
    C = torch.zeros(k, k, dtype=torch.int64)
    C[1:, 1:] = Q
    C[0, 1:] = 1
    if kind == "paley1":
        C[1:, 0] = -1
        return torch.eye(k, dtype=torch.int64) + C
    C[1:, 0] = 1
    plus = torch.tensor([[1, 1], [1, -1]])
    zero = torch.tensor([[1, -1], [-1, -1]])
    return torch.kron(C, plus) + torch.kron(torch.eye(k, dtype=torch.int64), zero)


@lru_cache(maxsize=32)
def _sylvester_int(p: int) -> torch.Tensor:
    H = torch.ones(1, 1, dtype=torch.int64)
    while H.shape[0] < p:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)], 0)
    return H


def _small_factor(plan: HadamardPlan) -> torch.Tensor:
    """The m x m factor (int64); [[1]] for a power of two."""
    if plan.kind == "sylvester":
        return torch.ones(1, 1, dtype=torch.int64)
    return _paley(plan.kind, plan.q)


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64, device=None, *,
                    max_factor: int | None = MAX_FACTOR) -> torch.Tensor:
    """A Hadamard matrix of order ``n``: entries +-1 and ``H @ H.T == n * I`` (exactly, in integers).

    Built as ``kron(H_m, H_p)`` per :func:`hadamard_plan` (Paley I/II with a prime q for m,
    Sylvester for the power of two p; Sylvester order, H_2 = [[1, 1], [1, -1]]). Not symmetric when
    m > 1. ``dtype`` may be floating or integer (int8 keeps a 14336^2 matrix at 205 MB). Raises
    ``ValueError`` for orders without a construction (see :func:`hadamard_plan`)."""
    return _matrix_from_plan(hadamard_plan(n, max_factor), dtype, device)


def _matrix_from_plan(plan: HadamardPlan, dtype: torch.dtype, device) -> torch.Tensor:
    A = _small_factor(plan).to(dtype=dtype, device=device)
    B = _sylvester_int(plan.p).to(dtype=dtype, device=device)
    return torch.kron(A, B) if plan.m > 1 else B


# ---------------------------------------------------------------------------------------------
# fast path: x (..., m * p) -> contract the m axis with a dense factor, the p axis by radix-16
# Walsh-Hadamard stages (small Sylvester matmuls)
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _sylvester_small(r: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return _sylvester_int(r).to(dtype=dtype, device=device)


def _kron_apply(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """``y[..., a_1, ..., a_J] = sum_j F_1[a_1, j_1] ... F_J[a_J, j_J] x[..., j_1, ..., j_J]``
    over the last dim of x viewed as (r_1, ..., r_J): i.e. ``x @ kron(F_1, ..., F_J).T``.

    Each step is one GEMM on the last axis, ``(rows * n / r, r) @ F^T``, followed by moving that
    axis to the front of the row's index; after J steps the axes are back in order. (A batched
    matmul over the other axes is 1.5-2x slower on CPU: thousands of tiny products.)"""
    n = x.shape[-1]
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    N = y.shape[0]
    for F in reversed(factors):
        r = F.shape[0]
        y = (y.reshape(-1, r) @ F.T).reshape(N, n // r, r).transpose(1, 2).reshape(N, n)
    return y.reshape(*lead, n)


def _radices(p: int, cap: int = 64) -> list[int]:
    """Balanced powers of two, each <= ``cap``, whose product is the power of two ``p`` (512 ->
    [32, 16], 4096 -> [64, 64]): fewer, larger GEMMs than radix 16 (measured 1.6-3x faster)."""
    m = p.bit_length() - 1
    if m == 0:
        return []
    per = math.ceil(m / math.ceil(m / (cap.bit_length() - 1)))
    out = []
    while m > 0:
        out.append(1 << min(per, m))
        m -= min(per, m)
    return out


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
        self._A = _small_factor(self.plan).to(torch.float64)
        self._dense = None
        self._cache: dict = {}

    # the dense twin ----------------------------------------------------------------------
    @property
    def R(self) -> torch.Tensor:  # noqa: N802 - the name of features.Rotation's matrix
        if self._dense is None:
            H = _matrix_from_plan(self.plan, torch.float64, None) / math.sqrt(self.d)
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
    def _factors(self, dtype, device, transpose: bool) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        key = (dtype, str(device), transpose)
        if key not in self._cache:
            fs = [_sylvester_small(r, dtype, str(device)) for r in _radices(self.plan.p)]
            if self.plan.m > 1:
                A = self._A if transpose else self._A.T  # x H contracts with A^T, x H^T with A
                fs.insert(0, A.to(dtype=dtype, device=device).contiguous())
            signs = None if self.signs is None else self.signs.to(dtype=dtype, device=device)
            self._cache[key] = (fs, signs)
        return self._cache[key]

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
        fs, signs = self._factors(work, x.device, transpose)
        if signs is not None and not transpose:
            y = y * signs
        y = _kron_apply(y, fs) * (1.0 / math.sqrt(self.d))
        if signs is not None and transpose:
            y = y * signs
        return y.to(out_dtype)

    def forward(self, x):
        self._check(x)
        return self._apply(x, transpose=False)

    def inverse(self, y):
        self._check(y, "y")
        return self._apply(y, transpose=True)

    def fold_weight(self, W):
        self._check(W, "W")
        return self._apply(W, transpose=False)

    def __repr__(self) -> str:
        p = self.plan
        return f"HadamardRotation(n={p.n} = {p.m} x {p.p} [{p.kind}], seed={self.seed})"


def hadamard_rotation(n: int, seed: int | None = None, name: str | None = None, *,
                      max_factor: int | None = MAX_FACTOR) -> HadamardRotation:
    """The orthogonal rotation ``R = D H_n / sqrt(n)`` as a :class:`HadamardRotation`
    (``seed=None``: no random signs). Raises ``ValueError`` for orders without a construction."""
    return HadamardRotation(n, seed=seed, name=name, max_factor=max_factor)


# =============================================================================================
# SmoothQuant
# =============================================================================================
def _absmax_vector(v, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (d,), got {type(v).__name__}")
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D tensor (one value per input channel), "
                         f"got shape {tuple(v.shape)}")
    v = v.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{what} contains non-finite values ({int(torch.isnan(v).sum())} NaN, "
                         f"{int(torch.isinf(v).sum())} Inf)")
    if bool((v < 0).any()):
        raise ValueError(f"{what} must be non-negative (absolute maxima), "
                         f"{int((v < 0).sum())} entries are negative")
    return v


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5,
                       *, eps: float = 1e-5) -> torch.Tensor:
    r"""SmoothQuant smoothing factors :math:`s_j = \max|X_j|^\alpha / \max|W_j|^{1-\alpha}`.

    Args:
        act_absmax: (d,) per-input-channel max |X_j| over the calibration tokens.
        weight_absmax: (d,) per-input-channel max |W_ij| over the output rows of every weight that
            reads this input (see :func:`weight_input_absmax`).
        alpha: migration strength in [0, 1] (0.5 in the paper for most models).
        eps: values below ``eps`` are clamped to it before the powers.
    Returns:
        float64 (d,) factors, finite and > 0, on ``act_absmax``'s device. Channels with zero
        activation or zero weight range get s = 1 (nothing to balance). Smoothing divides the
        activation by s and multiplies the weight's input columns by s (:func:`smoothquant_transform`).
    Raises:
        ValueError for shapes that differ or are not 1-D, non-finite or negative values, alpha
        outside [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    a = _absmax_vector(act_absmax, "act_absmax")
    w = _absmax_vector(weight_absmax, "weight_absmax").to(a.device)
    if a.shape != w.shape:
        raise ValueError(f"act_absmax has {a.numel()} channels but weight_absmax has {w.numel()}")
    s = a.clamp_min(eps) ** alpha / w.clamp_min(eps) ** (1.0 - alpha)
    s = torch.where((a == 0) | (w == 0), torch.ones_like(s), s)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):  # pragma: no cover - float64 range
        raise ValueError("smoothing factors overflowed; rescale the inputs")
    return s


def smoothquant_transform(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5,
                          *, eps: float = 1e-5, name: str = "smoothquant") -> Scale:
    """The SmoothQuant feature transform ``features.Scale(1 / s)``: ``forward(x) = x / s``,
    ``fold_weight(W) = W * s`` (columns), with s from :func:`smoothquant_scales`."""
    s = smoothquant_scales(act_absmax, weight_absmax, alpha, eps=eps)
    return Scale(1.0 / s, name=name)


def weight_input_absmax(*weights: torch.Tensor) -> torch.Tensor:
    """Per-input-channel max |W_ij| over the rows of all given weights (each (out_k, d)), e.g. the
    q, k and v projections that read the same normalized activation. float64 (d,)."""
    if not weights:
        raise ValueError("weight_input_absmax needs at least one weight")
    d = None
    out = None
    for k, W in enumerate(weights):
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise ValueError(f"weight {k} must be a 2-D (out, in) tensor, got {getattr(W, 'shape', type(W))}")
        if d is None:
            d = W.shape[1]
        elif W.shape[1] != d:
            raise ValueError(f"weight {k} has {W.shape[1]} input features, weight 0 has {d}")
        m = W.detach().abs().amax(dim=0).to(torch.float64)
        out = m if out is None else torch.maximum(out, m.to(out.device))
    return out


# =============================================================================================
# GPTQ
# =============================================================================================
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
    r"""GPTQ fake-quantized weight (Frantar et al. 2023), with :mod:`stamp_lib.quant` grids.

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
        self.sum = xtx if self.sum is None else self.sum + xtx
        self.device = dev
        self.count += x2.shape[0]

    @property
    def H(self) -> torch.Tensor:  # noqa: N802 - the paper's symbol
        """E[x x^T] over all rows added (float64, (d, d))."""
        if self.count == 0:
            raise ValueError("no samples added yet: call add(x) first")
        return self.sum / self.count


hessian_accumulator = HessianAccumulator
"""Alias of :class:`HessianAccumulator` (the name the model layer calls)."""
