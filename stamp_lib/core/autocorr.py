r"""The sequence autocorrelation :math:`S = E[X X^\top]` (s x s) and summaries of it.

The KLT (:class:`stamp_lib.core.transforms.KLT`) is the eigenbasis of S; the paper's argument for
the DCT is that S of real activations is close to (block-)Toeplitz. Everything that estimates or
summarises S lives here:

* :func:`sum_xxt` and :class:`AutoCorrelation`: :math:`\sum X X^\top` over samples and features,
  accumulated in float64 (the one estimator: the KLT fit and the capture reducers use it);
* :func:`token0_fraction`, :func:`toeplitz_projection`, :func:`toeplitz_fraction`,
  :func:`center_tokens`, :func:`correlation`. ``toeplitz_fraction(S)`` is
  :math:`\|P(S)\|_F^2/\|S\|_F^2`, where P averages S along its diagonals (1-D) or along every 2-D
  offset of a token grid (``grid=(h, w)``, row-major tokens): P is the orthogonal projection onto
  (block-)Toeplitz matrices, so the fraction is 1 exactly for a (block-)Toeplitz S.
"""

from __future__ import annotations

import torch

__all__ = ["sum_xxt", "AutoCorrelation", "token0_fraction", "toeplitz_projection", "toeplitz_fraction",
           "center_tokens", "correlation"]


def sum_xxt(X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over samples and features of X X^T (s, s), and the number of columns summed.

    One matmul per sample in the input's dtype (float32 activations: about 3x faster than a float64
    product on CPU, relative error ~1e-6 per entry), accumulated in float64."""
    X = X.reshape(-1, *X.shape[-2:])
    out = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float64, device=X.device)
    for x in X:
        out += (x @ x.T).double()
    return out, X.shape[0] * X.shape[2]


class AutoCorrelation:
    """``reduce`` callback: per module, the s x s sum over batch and features of X X^T (accumulated
    in float64 from products in the input's dtype, see :func:`sum_xxt`),
    and the number of (batch, feature) columns summed, so ``mean(name)`` = E[x x^T] over columns
    (the sequence autocorrelation S of the paper's KLT, up to the 1/d convention)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def __call__(self, name: str, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"{name}: need (..., s, d) inputs, got {tuple(x.shape)}")
        s, n = sum_xxt(x.detach())
        s = s.cpu()
        self.sums[name] = self.sums[name] + s if name in self.sums else s
        self.counts[name] = self.counts.get(name, 0) + n

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.counts[name]


def _check_square(S: torch.Tensor) -> torch.Tensor:
    S = torch.as_tensor(S)
    if S.dim() != 2 or S.shape[0] != S.shape[1] or S.shape[0] < 1:
        raise ValueError(f"expected a square (s, s) autocorrelation, got shape {tuple(S.shape)}")
    if not bool(torch.isfinite(S).all()):
        raise ValueError("the autocorrelation contains NaN/Inf")
    return S.double()


def token0_fraction(S: torch.Tensor) -> float:
    """Share of the expected energy held by token 0: ``S[0, 0] / trace(S)`` (1/s if all equal)."""
    S = _check_square(S)
    tr = float(torch.diagonal(S).sum())
    if tr <= 0:
        raise ValueError("the autocorrelation has zero trace")
    return float(S[0, 0]) / tr


def toeplitz_projection(S: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Nearest (Frobenius) Toeplitz matrix: every entry replaced by the mean of its diagonal.

    With ``grid=(h, w)`` (tokens row-major on an h x w grid, s = h w) the mean is taken over all
    pairs of tokens with the same 2-D offset (di, dj): the nearest block-Toeplitz matrix with
    Toeplitz blocks, the structure of a stationary 2-D field."""
    S = _check_square(S)
    s = S.shape[0]
    if grid is None:
        i = torch.arange(s)
        key = i[:, None] - i[None, :] + (s - 1)  # offset t - u in [0, 2s - 2]
        n_keys = 2 * s - 1
    else:
        h, w = grid
        if h * w != s:
            raise ValueError(f"grid {h}x{w} has {h * w} tokens but S is {s} x {s}")
        r, c = torch.arange(s) // w, torch.arange(s) % w
        di = r[:, None] - r[None, :] + (h - 1)
        dj = c[:, None] - c[None, :] + (w - 1)
        key = di * (2 * w - 1) + dj
        n_keys = (2 * h - 1) * (2 * w - 1)
    key = key.reshape(-1)
    sums = torch.zeros(n_keys, dtype=torch.float64).index_add_(0, key, S.reshape(-1))
    counts = torch.zeros(n_keys, dtype=torch.float64).index_add_(0, key, torch.ones(s * s, dtype=torch.float64))
    return (sums / counts.clamp_min(1))[key].reshape(s, s)


def center_tokens(S: torch.Tensor) -> torch.Tensor:
    r"""``C S C`` with :math:`C = I - \mathbf 1 \mathbf 1^\top / s`: S with the direction of the mean
    token removed (the autocorrelation of X minus, per window and feature, its mean over tokens).

    Real activations share a large token-independent component; it adds a constant to every entry
    of S, which is trivially Toeplitz and is captured by the first (constant) row of the DCT, the
    WHT and the 2-D Haar LL band. Centring shows the structure that is left."""
    S = _check_square(S)
    m_row = S.mean(dim=1, keepdim=True)
    return S - m_row - m_row.T + S.mean()


def toeplitz_fraction(S: torch.Tensor, grid: tuple[int, int] | None = None, skip: int = 0,
                      center: bool = False) -> float:
    r"""Fraction of :math:`\|S\|_F^2` explained by the nearest (block-)Toeplitz matrix, in [0, 1].

    ``skip`` drops the first ``skip`` tokens (rows and columns) first, e.g. ``skip=1`` to look at
    S without the attention-sink token (1-D only); ``center`` then removes the mean-token
    direction (:func:`center_tokens`)."""
    S = _check_square(S)
    if skip:
        if grid is not None:
            raise ValueError("skip is only defined for 1-D sequences (grid=None)")
        S = S[skip:, skip:]
    if center:
        S = center_tokens(S)
    P = toeplitz_projection(S, grid)
    tot = float(S.pow(2).sum())
    if tot == 0:
        raise ValueError("toeplitz_fraction of an all-zero matrix is undefined")
    return float(P.pow(2).sum()) / tot


def correlation(S: torch.Tensor) -> torch.Tensor:
    """Correlation coefficients ``S_tu / sqrt(S_tt S_uu)`` (zero rows left at zero)."""
    S = _check_square(S)
    dg = torch.diagonal(S).clamp_min(0).sqrt()
    den = dg[:, None] * dg[None, :]
    return torch.where(den > 0, S / den.clamp_min(1e-300), torch.zeros_like(S))
