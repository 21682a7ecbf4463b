r"""Hadamard matrices, the one construction every rotation uses.

A Hadamard matrix :math:`H \in \{\pm 1\}^{n \times n}` has :math:`H H^\top = n I`. Powers of two
are Sylvester's :math:`H_{2n} = \begin{pmatrix} H_n & H_n \\ H_n & -H_n \end{pmatrix}`; other
orders are built as a Kronecker product :math:`H_n = H_m \otimes H_{2^k}` of a Paley matrix and a
Sylvester matrix (:math:`(A \otimes B)(A \otimes B)^\top = A A^\top \otimes B B^\top = m 2^k I`):

* Paley I, q prime, :math:`q \equiv 3 \pmod 4`, order :math:`q + 1`:
  :math:`H = I + \begin{pmatrix} 0 & \mathbf 1^\top \\ -\mathbf 1 & Q \end{pmatrix}`;
* Paley II, q prime, :math:`q \equiv 1 \pmod 4`, order :math:`2(q + 1)`: the symmetric conference
  matrix :math:`C = \begin{pmatrix} 0 & \mathbf 1^\top \\ \mathbf 1 & Q \end{pmatrix}` with every 0
  replaced by :math:`\left(\begin{smallmatrix} 1 & -1 \\ -1 & -1 \end{smallmatrix}\right)` and
  every :math:`\pm 1` by :math:`\pm\left(\begin{smallmatrix} 1 & 1 \\ 1 & -1 \end{smallmatrix}\right)`;

where :math:`Q_{ab} = \chi(a - b)` is the Jacobsthal matrix of the Legendre symbol
:math:`\chi` modulo q.

Fast products: :func:`kron_apply` contracts one Kronecker factor at a time (one GEMM per factor),
with the power-of-two part split by :func:`pow2_radices` into small Sylvester factors. The
sequence-axis Walsh-Hadamard transform (:mod:`stamp_lib.core.transforms`) and the feature-axis
rotation (:mod:`stamp_lib.methods.features`) both use them.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch

from .workspace import scratch

__all__ = ["MAX_FACTOR", "HadamardPlan", "hadamard_plan", "hadamard_orders", "hadamard_matrix",
           "is_pow2", "pow2_radices", "sylvester", "kron_apply", "kron_apply_reference", "small_factor", "matrix_from_plan"]


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


def is_pow2(n: int) -> bool:
    """Whether ``n`` is a positive power of two (1 included)."""
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


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
    if is_pow2(n):
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


@lru_cache(maxsize=64)
def sylvester(p: int, dtype: torch.dtype = torch.float64, device: str = "cpu") -> torch.Tensor:
    """Sylvester's Hadamard matrix of the power of two ``p`` (natural order, H_2 = [[1, 1], [1, -1]]),
    cached per (p, dtype, device); do not modify it in place."""
    return _sylvester_int(p).to(dtype=dtype, device=device)


def small_factor(plan: HadamardPlan) -> torch.Tensor:
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
    return matrix_from_plan(hadamard_plan(n, max_factor), dtype, device)



def matrix_from_plan(plan: HadamardPlan, dtype: torch.dtype, device) -> torch.Tensor:
    """The dense Hadamard matrix ``kron(H_m, H_p)`` of ``plan``."""
    A = small_factor(plan).to(dtype=dtype, device=device)
    B = _sylvester_int(plan.p).to(dtype=dtype, device=device)
    return torch.kron(A, B) if plan.m > 1 else B


def kron_apply_reference(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """The reference twin of :func:`kron_apply` (and the previous fast path, kept for the
    before/after benchmark): """
    return _kron_apply_axes(x, factors)


def _kron_apply_axes(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
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



def pow2_radices(p: int, cap: int = 64) -> list[int]:
    """Balanced powers of two, each <= ``cap``, whose product is the power of two ``p`` (512 ->
    [32, 16], 4096 -> [64, 64] with the default cap): fewer, larger GEMMs than radix 2 (measured
    1.6-3x faster than radix 16 on the feature axis). ``[]`` for p = 1."""
    if not is_pow2(p):
        raise ValueError(f"pow2_radices needs a power of two, got {p!r}")
    if not is_pow2(cap) or cap < 2:
        raise ValueError(f"cap must be a power of two >= 2, got {cap!r}")
    m = p.bit_length() - 1
    if m == 0:
        return []
    per = math.ceil(m / math.ceil(m / (cap.bit_length() - 1)))
    out = []
    while m > 0:
        out.append(1 << min(per, m))
        m -= min(per, m)
    return out


def kron_apply(y: torch.Tensor, fs: list[torch.Tensor], signs: torch.Tensor | None = None) -> torch.Tensor:
    r"""``(y * signs) @ kron(F_1, ..., F_J).T`` for ``y`` (N, n), with no transposing copies: the
    last factor is one GEMM on the last axis, ``(N n / r_J, r_J) @ F_J^T``; every other factor
    contracts a middle axis of the (P, r_j, Q) view in place of its rows, ``F_j @ y_p`` (a
    broadcast batched matmul), so each factor reads and writes the tensor once (measured
    1.6-1.9x faster than :func:`kron_apply_reference`'s moving of axes, float32,
    1 thread, 512-2048 rows of 256 or 512). The steps ping-pong between the fresh result and
    one workspace buffer of this thread (the last step lands in the result), so a product
    touches two tensor-sized buffers whatever the number of factors."""
    N, n = y.shape
    steps = len(fs) + (signs is not None)
    result = torch.empty(N, n, dtype=y.dtype, device=y.device)
    spare = scratch("ws0", (N, n), y) if steps > 1 else None

    def dest(k, shape):  # steps counted from the end alternate result / spare
        return (result if (steps - 1 - k) % 2 == 0 else spare).view(shape)

    k = 0
    if signs is not None:
        y = torch.mul(y, signs, out=dest(k, (N, n)))
        k += 1
    r = fs[-1].shape[0]
    y = torch.mm(y.reshape(-1, r), fs[-1].T, out=dest(k, (N * n // r, r))).view(N, n)  # (a strided input: copied)
    k += 1
    P, Q = N * n // r, r
    for F in reversed(fs[:-1]):
        r = F.shape[0]
        P //= r
        y = torch.matmul(F, y.view(P, r, Q), out=dest(k, (P, r, Q))).view(N, n)
        Q *= r
        k += 1
    return y
