r"""Sequence transforms: orthonormal s x s matrices L applied on the LEFT of X (..., s, d).

STaMP quantizes :math:`\hat X = L^{-1} Q(L X)`. Every transform here acts along dim -2 (the
token axis) of a tensor of shape ``(..., s, d)`` and offers

* ``forward(X)`` - the fast path (FFT, butterflies or lifting, never an s x s matmul);
* ``inverse(Y)`` - its exact inverse;
* ``matrix(s)`` - the dense s x s orthonormal matrix, built independently of the fast path,
  so that ``forward(X) == matrix(s) @ X`` is a real test;
* ``forward_dense(X)`` / ``inverse_dense(Y)`` - the dense path (a matmul), for benchmarks;
  also taken automatically when X requires grad (the fast paths write into buffers).

Transforms (all orthonormal, rows ordered so that energy of locally correlated sequences is
concentrated in the FIRST rows, which STaMP keeps at high precision):

==========  ==============================================================================
identity    :math:`L = I`.
dct         orthonormal DCT-II, ``scipy.fft.dct(norm="ortho")``; O(s d log s). CPU fast path:
            pocketfft's DCT-II/III through ``scipy.fft`` with ``workers=torch.get_num_threads()``;
            CUDA (or ``set_fft_backend("torch")``): one real FFT (Makhoul 1980) with torch.fft.
wht         Walsh-Hadamard in *sequency* order (row i has i sign changes); s a power of two;
            fast path: radix-16 butterflies (small matmuls), O(s d log s).
dwt         multi-level Haar DWT, 1-D: ``[cA_L, cD_L, cD_{L-1}, ..., cD_1]`` exactly as
            ``pywt.wavedec(x, "haar", mode="periodization")`` for power-of-two s. Any s: at an
            odd length the last element is carried unchanged into the approximation band,
            which keeps the transform orthogonal. O(s d).
dwt + grid  multi-level 2-D Haar over an h x w token grid (tokens flattened row-major, as
            DiTs do): ``[LL_L, (HL_L, LH_L, HH_L), ..., (HL_1, LH_1, HH_1)]`` where each band is
            flattened row-major; the same band order as ``pywt.wavedec2`` (cH, cV, cD).
klt         Karhunen-Loeve transform fitted from samples: eigenvectors of the sequence
            autocorrelation :math:`S = E[X X^T] / d` (s x s), rows by decreasing eigenvalue.
==========  ==============================================================================

Dtypes: float32 and float64 are computed as given. float16 and bfloat16 inputs are computed in
float32 and the result is cast back to the input dtype (the same rule for every transform, fast
and dense paths alike). Any other floating dtype (e.g. float8) raises a TypeError that names it.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .autocorr import sum_xxt
from .checks import as_sequence_tensor
from .hadamard import is_pow2, pow2_radices, sylvester
from .workspace import clear_workspace  # noqa: F401 - part of this module's API: the fast paths' buffers
from .workspace import scratch as _scratch

__all__ = [
    "SequenceTransform",
    "Identity",
    "DCT",
    "WHT",
    "HaarDWT",
    "HaarDWT2D",
    "MeanToken",
    "TokenApart",
    "KLT",
    "Dense",
    "canonical_signs",
    "haar_levels",
    "max_levels_1d",
    "build",
    "NAMES",
]

SQRT1_2 = 1.0 / math.sqrt(2.0)

_NATIVE_DTYPES = (torch.float32, torch.float64)
_UPCAST_DTYPES = (torch.float16, torch.bfloat16)  # computed in float32, returned in their dtype


def _as_input(X, what: str, check_finite: bool) -> torch.Tensor:
    """Validate ``X`` (..., s, d) and refuse floating dtypes the transforms cannot compute in."""
    if isinstance(X, torch.Tensor) and X.is_floating_point() and X.dtype not in _NATIVE_DTYPES + _UPCAST_DTYPES:
        raise TypeError(
            f"{what} has dtype {X.dtype}; sequence transforms compute in float32/float64 "
            f"(float16/bfloat16 are upcast to float32 and cast back): convert it first, e.g. {what}.float()"
        )
    return as_sequence_tensor(X, what, check_finite=check_finite)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a transform computes in for inputs of ``dtype`` (float16/bfloat16 -> float32)."""
    return torch.float32 if dtype in _UPCAST_DTYPES else dtype

_FAST_HAAR2D = True  # private: False restores the stepwise 2-D Haar (benchmarks time both in one run)


class SequenceTransform:
    """Base class. Subclasses implement ``_forward``, ``_inverse`` and ``_matrix``."""

    name = "base"
    orthogonal = True

    def __init__(self, check_finite: bool = True):
        self.check_finite = check_finite

    # -- public API ---------------------------------------------------------------------------
    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """Fast path: ``L @ X`` along dim -2 of ``X`` (..., s, d).

        Returns a fresh tensor of X's shape and dtype (float16/bfloat16 computed in float32).
        When X requires grad (and grad mode is on) the dense path is taken so autograd works."""
        X = _as_input(X, "X", self.check_finite)
        self._check_length(X.shape[-2])
        Xc = X.to(_compute_dtype(X.dtype))
        if Xc.requires_grad and torch.is_grad_enabled():
            Y = self._matrix_for(Xc) @ Xc  # the fast paths write into buffers (no autograd)
        else:
            Y = self._forward(Xc)
        return Y.to(X.dtype)

    def inverse(self, Y: torch.Tensor) -> torch.Tensor:
        """Fast path: ``L^{-1} @ Y`` along dim -2; same dtype rules as :meth:`forward`."""
        Y = _as_input(Y, "Y", self.check_finite)
        self._check_length(Y.shape[-2])
        Yc = Y.to(_compute_dtype(Y.dtype))
        if Yc.requires_grad and torch.is_grad_enabled():
            X = self._inverse_dense(Yc)
        else:
            X = self._inverse(Yc)
        return X.to(Y.dtype)

    def matrix(self, s: int, dtype: torch.dtype | None = None, device=None) -> torch.Tensor:
        """The dense s x s matrix L, built independently of the fast path (float64, then cast
        to ``dtype``, default the torch default dtype)."""
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"sequence length s must be a positive int, got {s!r}")
        self._check_length(s)
        dtype = dtype or torch.get_default_dtype()
        return self._matrix_cached(s).to(dtype=dtype, device=device)

    def forward_dense(self, X: torch.Tensor) -> torch.Tensor:
        """Dense path: ``matrix(s) @ X`` (O(s^2 d)); same dtype rules as :meth:`forward`."""
        X = _as_input(X, "X", self.check_finite)
        self._check_length(X.shape[-2])
        Xc = X.to(_compute_dtype(X.dtype))
        return (self._matrix_for(Xc) @ Xc).to(X.dtype)

    def inverse_dense(self, Y: torch.Tensor) -> torch.Tensor:
        """Dense path of the inverse: ``matrix(s)^{-1} @ Y`` (the transpose when orthogonal)."""
        Y = _as_input(Y, "Y", self.check_finite)
        self._check_length(Y.shape[-2])
        Yc = Y.to(_compute_dtype(Y.dtype))
        return self._inverse_dense(Yc).to(Y.dtype)

    def _matrix_for(self, X: torch.Tensor) -> torch.Tensor:
        return self.matrix(X.shape[-2], X.dtype, X.device)

    def _inverse_dense(self, Y: torch.Tensor) -> torch.Tensor:
        M = self._matrix_for(Y)
        if self.orthogonal:
            return M.transpose(-1, -2) @ Y
        return torch.linalg.solve(M, Y)

    # -- subclass hooks -----------------------------------------------------------------------
    def _check_length(self, s: int) -> None:
        """Raise a ValueError if this transform cannot act on sequences of length ``s``."""

    def _matrix_cached(self, s: int) -> torch.Tensor:
        cache = self.__dict__.setdefault("_matrices", {})
        if s not in cache:
            if len(cache) > 8:
                cache.clear()
            cache[s] = self._matrix(s)
        return cache[s]

    def _forward(self, X):  # pragma: no cover - abstract
        raise NotImplementedError

    def _inverse(self, Y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _matrix(self, s: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Identity(SequenceTransform):
    """:math:`L = I`: plain per-token quantization (the baseline)."""

    name = "identity"

    def _forward(self, X):
        return X.clone()

    def _inverse(self, Y):
        return Y.clone()

    def _matrix(self, s):
        return torch.eye(s, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# DCT-II (orthonormal): pocketfft through scipy on CPU, one real FFT (Makhoul 1980) elsewhere
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _dct_twiddle(s: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    k = torch.arange(s // 2 + 1, dtype=torch.float64)
    w = torch.polar(torch.ones_like(k), -math.pi * k / (2 * s))
    return w.to(dtype=torch.complex128 if dtype == torch.float64 else torch.complex64, device=device)


_FFT_BACKEND = "scipy"  # "scipy" | "torch"; the tests run both


def set_fft_backend(name: str) -> None:
    """Choose the CPU engine of the DCT fast path.

    ``"scipy"`` (default): ``scipy.fft.dct``/``idct`` (pocketfft, DCT-II/III) along dim -2 with
    ``workers=torch.get_num_threads()``, zero-copy on the tensor's memory. ``"torch"``: our
    Makhoul DCT on ``torch.fft.rfft`` (what CUDA tensors always use)."""
    global _FFT_BACKEND
    if name not in ("scipy", "torch"):
        raise ValueError(f"FFT backend must be 'scipy' or 'torch', got {name!r}")
    _FFT_BACKEND = name


def _scipy_dct(X: torch.Tensor, inverse: bool) -> torch.Tensor:
    """Orthonormal DCT-II (or its inverse, the DCT-III) of a CPU float32/float64 tensor along dim
    -2 by pocketfft, with as many workers as torch has threads. Reads X in place (strided views
    are fine) and returns a fresh tensor that owns its memory."""
    import scipy.fft

    x = X.detach().resolve_neg().numpy()
    f = scipy.fft.idct if inverse else scipy.fft.dct
    return torch.from_numpy(f(x, type=2, norm="ortho", axis=-2, workers=torch.get_num_threads()))


def _use_scipy(X: torch.Tensor) -> bool:
    return X.device.type == "cpu" and _FFT_BACKEND == "scipy" and X.dtype in _NATIVE_DTYPES


class DCT(SequenceTransform):
    r"""Orthonormal DCT-II along the sequence: equals ``scipy.fft.dct(x, norm="ortho", axis=-2)``.

    Row k of L is :math:`c_k \cos(\pi k (2n+1) / 2s)` with :math:`c_0 = \sqrt{1/s}` and
    :math:`c_k = \sqrt{2/s}`; :meth:`matrix` builds exactly this, independently of both fast
    paths below.

    * CPU (default backend ``"scipy"``): pocketfft's DCT-II / DCT-III via ``scipy.fft.dct`` /
      ``idct(type=2, norm="ortho", axis=-2, workers=torch.get_num_threads())``. It works along
      the strided axis in cache-sized column batches, which a chain of whole-tensor torch ops
      cannot: at (4096, 4096) float32 it runs about 2.5x faster than our Makhoul DCT on the
      same FFT engine (see ``python -m stamp_lib bench``).
    * CUDA, or ``set_fft_backend("torch")``: Makhoul (1980). Reorder x into
      :math:`v = [x_0, x_2, \dots, x_5, x_3, x_1]`, take one real FFT of length s and rotate it:
      :math:`z_k = e^{-i\pi k/2s} V_k`, :math:`y_k = \sqrt{2/s}\,\mathrm{Re}\,z_k` and
      :math:`y_{s-k} = -\sqrt{2/s}\,\mathrm{Im}\,z_k` (Hermitian symmetry of V), then
      :math:`y_0 /= \sqrt 2`. The inverse runs the same steps backwards with an inverse real
      FFT. The tests run this path on CPU too, against scipy and the dense matrix.
    """

    name = "dct"

    def _forward(self, X):
        if _use_scipy(X):
            return _scipy_dct(X, inverse=False)
        s = X.shape[-2]
        if s == 1:
            return X.clone()
        ne, h = (s + 1) // 2, s // 2 + 1
        v = torch.empty_like(X)
        v[..., :ne, :] = X[..., 0::2, :]
        v[..., ne:, :] = X[..., 1::2, :].flip(-2)
        z = torch.fft.rfft(v, dim=-2)
        z *= _dct_twiddle(s, X.dtype, str(X.device)).unsqueeze(-1)
        Y = v  # reuse the buffer (fresh, never the workspace)
        scale = math.sqrt(2.0 / s)
        torch.mul(z.real, scale, out=Y[..., :h, :])
        if s - h > 0:
            torch.mul(z.imag[..., 1 : s - h + 1, :].flip(-2), -scale, out=Y[..., h:, :])
        Y[..., 0, :] *= SQRT1_2
        return Y

    def _inverse(self, Y):
        if _use_scipy(Y):
            return _scipy_dct(Y, inverse=True)
        s = Y.shape[-2]
        if s == 1:
            return Y.clone()
        ne, h = (s + 1) // 2, s // 2 + 1
        scale = math.sqrt(s / 2.0)  # undo the sqrt(2/s) of the forward: Re z_k = Y_k sqrt(s/2)
        z = torch.empty(*Y.shape[:-2], h, Y.shape[-1], dtype=torch.complex128 if Y.dtype == torch.float64
                        else torch.complex64, device=Y.device)
        re, im = z.real, z.imag
        torch.mul(Y[..., :h, :], scale, out=re)
        re[..., 0, :] *= math.sqrt(2.0)
        im[..., 0, :] = 0.0
        if s - h > 0:
            # Im z_k = -Y_{s-k} sqrt(s/2) for k = 1 .. s-h
            torch.mul(Y[..., h:, :].flip(-2), -scale, out=im[..., 1 : s - h + 1, :])
        if s % 2 == 0:
            # k = s/2: Y_{s-k} = Y_k, so Im z = -Re z
            torch.neg(re[..., h - 1, :], out=im[..., h - 1, :])
        z *= _dct_twiddle(s, Y.dtype, str(Y.device)).conj().unsqueeze(-1)
        v = torch.fft.irfft(z, n=s, dim=-2)
        X = torch.empty_like(Y)
        X[..., 0::2, :] = v[..., :ne, :]
        X[..., 1::2, :] = v[..., ne:, :].flip(-2)
        return X

    def _matrix(self, s):
        n = torch.arange(s, dtype=torch.float64)
        k = n.unsqueeze(1)
        M = torch.cos(math.pi * k * (2 * n + 1) / (2 * s)) * math.sqrt(2.0 / s)
        M[0] *= SQRT1_2
        return M


# ---------------------------------------------------------------------------------------------
# Walsh-Hadamard in sequency order
# ---------------------------------------------------------------------------------------------
@lru_cache(maxsize=64)
def _sequency_perm(s: int) -> torch.Tensor:
    """Natural-order (Sylvester) row index of the sequency-ordered row k: bitrev(gray(k))."""
    m = s.bit_length() - 1
    k = torch.arange(s)
    g = k ^ (k >> 1)
    rev = torch.zeros_like(g)
    for b in range(m):
        rev |= ((g >> b) & 1) << (m - 1 - b)
    return rev


def _fwht_natural(X: torch.Tensor, scale: float = 1.0, fresh: bool = False) -> torch.Tensor:
    """``scale`` times the Walsh-Hadamard transform (Sylvester order) along dim -2, radix-16.

    ``s = 2^m`` is factored as a product of radices r_j <= 16; each stage contracts one axis of
    the (..., r_1, ..., r_J, d) view with the small Sylvester matrix H_r (a batched matmul)."""
    s, d = X.shape[-2], X.shape[-1]
    radices = pow2_radices(s, cap=16)
    lead = X.shape[:-2]
    batch = math.prod(lead)
    Y = X
    pre = 1
    for j, r in enumerate(radices):
        post = s // (pre * r)
        H = sylvester(r, X.dtype, str(X.device))
        if pre == 1:
            H = H * scale  # fold the normalisation into the first stage
        # view as (batch*pre, r, post*d) and contract the r axis with H_r (batched matmul)
        shape = (batch * pre, r, post * d)
        last = j == len(radices) - 1
        out = torch.empty(shape, dtype=X.dtype, device=X.device) if fresh and last else _scratch(f"wht{j % 2}", shape, X)
        torch.matmul(H, Y.reshape(batch * pre, r, post * d), out=out)
        Y = out
        pre *= r
    if fresh and not radices:
        Y = X.clone()
    return Y.reshape(*lead, s, d)


class WHT(SequenceTransform):
    r"""Orthonormal Walsh-Hadamard transform in sequency order (row i has i sign changes).

    Only for power-of-two s (a clear error otherwise; pad the sequence yourself if you need
    to, or use the DCT/DWT which accept any s). Sylvester's Kronecker structure
    :math:`H_{2^m} = H_{r_1} \otimes \dots \otimes H_{r_J}` gives the fast path; the rows are
    then permuted to sequency order (natural row = bit-reversed Gray code of the sequency)."""

    name = "wht"

    def _check_length(self, s):
        if not is_pow2(s):
            raise ValueError(
                f"the Walsh-Hadamard transform needs a power-of-two sequence length, got s={s}; "
                f"use 'dct' or 'dwt' (any s), or pad the sequence to {1 << (s - 1).bit_length()}"
            )

    def _forward(self, X):
        s = X.shape[-2]
        perm = _sequency_perm(s).to(X.device)
        return _fwht_natural(X, 1.0 / math.sqrt(s)).index_select(-2, perm)

    def _inverse(self, Y):
        s = Y.shape[-2]
        perm = _sequency_perm(s).to(Y.device)
        Z = _scratch("wht_in", Y.shape, Y)
        Z.index_copy_(-2, perm, Y)
        return _fwht_natural(Z, 1.0 / math.sqrt(s), fresh=True)

    def _matrix(self, s):
        # Independent construction: Walsh functions from the sign-change (sequency) definition,
        # w_k(n) = prod_j (-1)^{g_j(k) * n_{m-1-j}} with g the Gray code of k (Paley -> Walsh).
        m = s.bit_length() - 1
        k = torch.arange(s).unsqueeze(1)
        n = torch.arange(s).unsqueeze(0)
        g = k ^ (k >> 1)
        parity = torch.zeros(s, s, dtype=torch.long)
        for j in range(m):
            parity += ((g >> j) & 1) * ((n >> (m - 1 - j)) & 1)
        return (1.0 - 2.0 * (parity % 2).double()) / math.sqrt(s)


# ---------------------------------------------------------------------------------------------
# Haar DWT, 1-D
# ---------------------------------------------------------------------------------------------
def max_levels_1d(s: int) -> int:
    """Number of Haar levels until the approximation band has one row: ceil(log2 s)."""
    return max(0, math.ceil(math.log2(s))) if s > 1 else 0


def haar_levels(s: int, hp_tokens: int) -> int:
    """Haar levels whose approximation band keeps about ``hp_tokens`` of ``s`` rows: the rule every
    STaMP recipe uses, ``round(log2(s / hp_tokens))`` (5 for 2048 / 64), at least 1 and at most
    :func:`max_levels_1d` (s). On a 2-D grid each level quarters the band: pass ``s`` = the side's
    share, e.g. ``haar_levels(h * w, hp) // 2`` levels keep ``hp`` tokens of an h x w grid."""
    if not isinstance(s, int) or s < 2:
        raise ValueError(f"the sequence length s must be an int >= 2, got {s!r}")
    if not isinstance(hp_tokens, int) or not 1 <= hp_tokens <= s:
        raise ValueError(f"hp_tokens must be an int in [1, s={s}], got {hp_tokens!r}")
    return min(max(1, int(round(math.log2(s / hp_tokens)))), max_levels_1d(s))


def _haar_lengths(s: int, levels: int) -> list[int]:
    """Approximation length at the input of each level: [s, ceil(s/2), ...]."""
    out = [s]
    for _ in range(levels - 1):
        out.append((out[-1] + 1) // 2)
    return out


class HaarDWT(SequenceTransform):
    r"""Multi-level orthonormal Haar DWT along the sequence (1-D).

    One level maps :math:`x` (length n) to approximations :math:`a_k = (x_{2k}+x_{2k+1})/\sqrt2`
    and details :math:`d_k = (x_{2k}-x_{2k+1})/\sqrt2` (pywt's sign convention); for odd n the
    last element is appended to the approximations unchanged, so the level is still an
    orthogonal map. The next level acts on the approximations. Output order:
    ``[cA_L, cD_L, ..., cD_1]``. ``levels=None`` means the maximum, ceil(log2 s)."""

    name = "dwt"

    def __init__(self, levels: int | None = None, check_finite: bool = True):
        super().__init__(check_finite)
        if levels is not None and (not isinstance(levels, int) or levels < 0):
            raise ValueError(f"levels must be a non-negative int or None, got {levels!r}")
        self.levels = levels

    def __repr__(self):
        return f"HaarDWT(levels={self.levels})"

    def levels_for(self, s: int) -> int:
        return max_levels_1d(s) if self.levels is None else self.levels

    def _check_length(self, s):
        L = self.levels_for(s)
        if L > max_levels_1d(s):
            raise ValueError(
                f"{L} Haar levels need a sequence of at least {2 ** (L - 1) + 1} tokens; got s={s} "
                f"(at most {max_levels_1d(s)} levels for s={s})"
            )

    def _forward(self, X):
        # Unnormalised sums are carried between levels (a_l = 2^{l/2} * true approximation), so
        # each level costs one subtraction, one scaling of the details and one addition.
        s = X.shape[-2]
        Y = torch.empty_like(X)
        lengths = _haar_lengths(s, self.levels_for(s))
        if not lengths or self.levels_for(s) == 0:
            Y.copy_(X)
            return Y
        a, end = X, s
        for lvl, n in enumerate(lengths, start=1):
            h = n // 2
            even, odd = a[..., 0 : 2 * h : 2, :], a[..., 1 : 2 * h : 2, :]
            det = Y[..., end - h : end, :]
            torch.sub(even, odd, out=det)
            det.mul_(2.0 ** (-lvl / 2))
            new_a = _scratch(f"dwt{lvl % 2}", (*X.shape[:-2], n - h, X.shape[-1]), X)
            torch.add(even, odd, out=new_a[..., :h, :])
            if n % 2:  # the carried element must be scaled up to the unnormalised convention
                torch.mul(a[..., n - 1, :], 2.0 ** 0.5, out=new_a[..., h, :])
            a, end = new_a, end - h
        torch.mul(a, 2.0 ** (-len(lengths) / 2), out=Y[..., :end, :])
        return Y

    def _inverse(self, Y):
        s = Y.shape[-2]
        lengths = _haar_lengths(s, self.levels_for(s))
        if not lengths or self.levels_for(s) == 0:
            return Y.clone()
        L = len(lengths)
        # P_l = 2^{-l/2} A_l (A_l the true approximations): then x_even = P_l + 2^{-l/2} D_l and
        # x_odd = P_l - 2^{-l/2} D_l give P_{l-1} with one add and one sub per level.
        n_a = (lengths[-1] + 1) // 2
        a = torch.mul(Y[..., :n_a, :], 2.0 ** (-L / 2), out=_scratch("idwt_a", (*Y.shape[:-2], n_a, Y.shape[-1]), Y))
        for lvl in range(L, 0, -1):
            n = lengths[lvl - 1]
            h = n // 2
            det = Y[..., n - h : n, :]
            shape = (*Y.shape[:-2], n, Y.shape[-1])
            out = torch.empty(shape, dtype=Y.dtype, device=Y.device) if lvl == 1 else _scratch(f"idwt{lvl % 2}", shape, Y)
            ap = a[..., :h, :]
            c = 2.0 ** (-lvl / 2)
            torch.add(ap, det, alpha=c, out=out[..., 0 : 2 * h : 2, :])
            torch.sub(ap, det, alpha=c, out=out[..., 1 : 2 * h : 2, :])
            if n % 2:
                torch.mul(a[..., h, :], 2.0**0.5, out=out[..., n - 1, :])
            a = out
        return a

    def _matrix(self, s):
        # Independent construction: product of per-level analysis matrices P_l = diag(A_n, I).
        M = torch.eye(s, dtype=torch.float64)
        for n in _haar_lengths(s, self.levels_for(s)):
            h = n // 2
            A = torch.zeros(n, n, dtype=torch.float64)
            for k in range(h):
                A[k, 2 * k] = A[k, 2 * k + 1] = SQRT1_2  # approximation rows
                A[n - h + k, 2 * k] = SQRT1_2  # detail rows
                A[n - h + k, 2 * k + 1] = -SQRT1_2
            if n % 2:
                A[h, n - 1] = 1.0  # carried element, last approximation row
            P = torch.eye(s, dtype=torch.float64)
            P[:n, :n] = A
            M = P @ M
        return M


# ---------------------------------------------------------------------------------------------
# Haar DWT over a 2-D token grid
# ---------------------------------------------------------------------------------------------
class HaarDWT2D(SequenceTransform):
    r"""Multi-level orthonormal 2-D Haar DWT over an ``h x w`` grid of tokens.

    Tokens are flattened row-major (token ``i*w + j`` sits at row i, column j), as in DiTs. One
    level applies the 1-D Haar step along the columns (width) and then along the rows (height)
    of the current LL band; each Haar level moves the low-frequency energy into the first
    quarter. Output order: ``[LL_L, HL_L, LH_L, HH_L, ..., HL_1, LH_1, HH_1]`` where ``HL`` is
    high-pass along the height and low-pass along the width (pywt's cH), ``LH`` the opposite
    (cV) and each band is flattened row-major. Equals ``pywt.wavedec2(..., "haar",
    mode="periodization")`` for power-of-two grids. Odd band sizes carry the last row/column
    unchanged (orthogonal). ``levels=None`` means the maximum: min(ceil(log2 h), ceil(log2 w)).
    """

    name = "dwt2d"

    def __init__(self, grid: tuple[int, int], levels: int | None = None, check_finite: bool = True):
        super().__init__(check_finite)
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or not all(isinstance(g, int) and g >= 1 for g in grid)
        ):
            raise ValueError(f"grid must be a pair of positive ints (h, w), got {grid!r}")
        self.grid = (int(grid[0]), int(grid[1]))
        if levels is not None and (not isinstance(levels, int) or levels < 0):
            raise ValueError(f"levels must be a non-negative int or None, got {levels!r}")
        h, w = self.grid
        self.max_levels = min(max_levels_1d(h), max_levels_1d(w))
        self.levels = self.max_levels if levels is None else levels
        if self.levels > self.max_levels:
            raise ValueError(
                f"{self.levels} 2-D Haar levels are too many for a {h}x{w} grid "
                f"(at most {self.max_levels})"
            )

    def __repr__(self):
        return f"HaarDWT2D(grid={self.grid}, levels={self.levels})"

    def _check_length(self, s):
        h, w = self.grid
        if s != h * w:
            raise ValueError(f"grid {h}x{w} has {h * w} tokens but the sequence has s={s}")

    def band_sizes(self) -> list[tuple[str, int, int]]:
        """(name, rows, cols) of every band in output order."""
        h, w = self.grid
        levels = []
        for lvl in range(1, self.levels + 1):
            ch, cw, fh, fw = (h + 1) // 2, (w + 1) // 2, h // 2, w // 2
            levels.append([(f"HL{lvl}", fh, cw), (f"LH{lvl}", ch, fw), (f"HH{lvl}", fh, fw)])
            h, w = ch, cw
        out = [(f"LL{self.levels}", h, w)]
        for bands in reversed(levels):
            out.extend(bands)
        return out

    @staticmethod
    def _step(a, axis):
        """One Haar step along ``axis`` (-3 = height, -2 = width) of (..., H, W, d)."""
        n = a.shape[axis]
        h = n // 2
        pairs = a.narrow(axis, 0, 2 * h).unflatten(axis, (h, 2))
        even, odd = pairs.select(axis, 0), pairs.select(axis, 1)
        lo = (even + odd) * SQRT1_2
        hi = (even - odd) * SQRT1_2
        if n % 2:
            lo = torch.cat([lo, a.narrow(axis, n - 1, 1)], dim=axis)
        return lo, hi

    @staticmethod
    def _unstep(lo, hi, n, axis):
        """Inverse of :meth:`_step`: rebuild length ``n`` along ``axis`` from (lo, hi)."""
        h = n // 2
        lp = lo.narrow(axis, 0, h)
        even = (lp + hi) * SQRT1_2
        odd = (lp - hi) * SQRT1_2
        out = torch.stack([even, odd], dim=axis).flatten(axis - 1, axis)
        if n % 2:
            out = torch.cat([out, lo.narrow(axis, h, 1)], dim=axis)
        return out

    def _forward(self, X):
        if _FAST_HAAR2D and self._even():
            return self._forward_even(X)
        h, w = self.grid
        lead, d = X.shape[:-2], X.shape[-1]
        a = X.reshape(*lead, h, w, d)
        details = []
        for _ in range(self.levels):
            lo_w, hi_w = self._step(a, -2)  # along the width
            ll, hl = self._step(lo_w, -3)  # low-w: along the height -> LL, HL (cH)
            lh, hh = self._step(hi_w, -3)  # high-w: along the height -> LH (cV), HH
            details.append([hl, lh, hh])
            a = ll
        parts = [a.reshape(*lead, -1, d)]
        for bands in reversed(details):
            parts.extend(b.reshape(*lead, -1, d) for b in bands)
        return torch.cat(parts, dim=-2)

    def _inverse(self, Y):
        if _FAST_HAAR2D and self._even():
            return self._inverse_even(Y)
        lead, d = Y.shape[:-2], Y.shape[-1]
        sizes = self.band_sizes()
        pos = 0
        chunks = []
        for _, r, c in sizes:
            chunks.append(Y[..., pos : pos + r * c, :].reshape(*lead, r, c, d))
            pos += r * c
        a = chunks[0]
        # grid sizes at the input of each level
        dims = [self.grid]
        for _ in range(self.levels - 1):
            H, W = dims[-1]
            dims.append(((H + 1) // 2, (W + 1) // 2))
        for lvl in range(self.levels, 0, -1):
            hl, lh, hh = chunks[1 + 3 * (self.levels - lvl) : 4 + 3 * (self.levels - lvl)]
            H, W = dims[lvl - 1]
            lo_w = self._unstep(a, hl, H, -3)
            hi_w = self._unstep(lh, hh, H, -3)
            a = self._unstep(lo_w, hi_w, W, -2)
        return a.reshape(*lead, -1, d)

    # -- the fast path of grids that stay even at every level (16 x 16 with 3 levels, 64 x 64, ...) ----
    def _even(self) -> bool:
        """Whether every level halves an even h and an even w (no carried row or column)."""
        h, w = self.grid
        if self.levels == 0:
            return False
        for _ in range(self.levels):
            if h % 2 or w % 2:
                return False
            h, w = h // 2, w // 2
        return True

    def _row_scale(self, like: torch.Tensor, squared: bool = False) -> torch.Tensor:
        """(s, 1): the power of two that normalises each output row of the unscaled butterflies,
        2^-l on the detail bands of level l and 2^-L on the final LL band (``squared``: its square);
        cached per dtype and device."""
        cache = self.__dict__.setdefault("_scales", {})
        key = (like.dtype, like.device, squared)
        if key not in cache:
            h, w = self.grid
            n = h * w
            sc = torch.empty(n, 1, dtype=torch.float64)
            for lvl in range(1, self.levels + 1):
                sc[n // 4 : n] = 2.0 ** -lvl
                n //= 4
            sc[:n] = 2.0 ** -self.levels
            cache[key] = (sc * sc if squared else sc).to(dtype=like.dtype, device=like.device)
        return cache[key]

    def _forward_even(self, X):
        """:meth:`_forward_unscaled` times the per-row powers of two (one pass)."""
        Y = self._forward_unscaled(X)
        return Y.mul_(self._row_scale(Y))

    def _inverse_even(self, Y):
        """The rows scaled once by the same powers of two (the map is orthogonal, so the inverse's
        per-level factors 1/2 land on the same bands), then :meth:`_inverse_unscaled`."""
        lead, n, d = Y.shape[:-2], Y.shape[-2], Y.shape[-1]
        Z = _scratch("h2z", (math.prod(lead), n, d), Y)
        torch.mul(Y.reshape(-1, n, d), self._row_scale(Y), out=Z)
        return self._inverse_unscaled(Z).reshape(*lead, n, d)

    def _unscaled_ok(self, X: torch.Tensor) -> bool:
        """Whether :func:`stamp_lib.core.quant.stamp_fake_quant` may use the unscaled pair on X:
        the fast path of an even grid, a float32/float64 input without autograd."""
        return (_FAST_HAAR2D and X.dtype in _NATIVE_DTYPES and X.shape[-2] == self.grid[0] * self.grid[1]
                and not (X.requires_grad and torch.is_grad_enabled()) and self._even())

    def _forward_unscaled(self, X, scratch: bool = False, inplace: bool = False):
        r"""``U X`` with ``L = D U``: the butterflies of every level without their factors 1/2, written
        straight into the output. Along the width :math:`S = x_{2j} + x_{2j+1}`,
        :math:`D = x_{2j} - x_{2j+1}` (two scratch buffers), then along the height
        ``LL = S_{2i} + S_{2i+1}``, ``HL = S_{2i} - S_{2i+1}``, ``LH`` and ``HH`` from D, each into its
        band's rows (a level reads its LL band completely before the next level writes over it).
        ``D`` (:meth:`_row_scale`) holds powers of two, which scale without rounding, so ``D U X``
        equals scaling at every level bit for bit; it differs from the stepwise path only by that
        path's rounded :math:`1/\sqrt2` factors (float round-off). Needs an even grid at every level.
        ``scratch``: write into this thread's workspace instead of a fresh tensor (for a caller that
        consumes the result before the next call, as :func:`stamp_lib.core.quant.stamp_fake_quant`);
        ``inplace``: overwrite a contiguous ``X`` (each level reads its input completely first)."""
        h, w = self.grid
        lead, d = X.shape[:-2], X.shape[-1]
        B = math.prod(lead)
        if inplace and X.is_contiguous():
            Y = X.view(B, h * w, d)
        elif scratch:
            Y = _scratch("h2y", (B, h * w, d), X)
        else:
            Y = torch.empty(B, h * w, d, dtype=X.dtype, device=X.device)
        a = X.reshape(B, h, w, d)
        H, W = h, w
        for _ in range(self.levels):
            fh, fw = H // 2, W // 2
            S = _scratch("ws0", (B, fh, 2, fw, d), X)
            D = _scratch("ws1", (B, fh, 2, fw, d), X)
            ae, ao = a.unflatten(2, (fw, 2)).unbind(3)
            torch.add(ae, ao, out=S.view(B, H, fw, d))
            torch.sub(ae, ao, out=D.view(B, H, fw, d))
            ll, hl, lh, hh = Y[:, : 4 * fh * fw].view(B, 4, fh, fw, d).unbind(1)
            se, so = S.unbind(2)
            de, do = D.unbind(2)
            torch.add(se, so, out=ll)
            torch.sub(se, so, out=hl)  # HL: high along the height, low along the width (pywt's cH)
            torch.add(de, do, out=lh)
            torch.sub(de, do, out=hh)
            a, H, W = ll, fh, fw
        return Y.reshape(*lead, h * w, d)

    def _inverse_unscaled(self, Z, inplace: bool = False):
        """``U^T Z``, so that ``L^{-1} Y = U^T (D Y)``: unscaled butterflies per level, coarse to fine;
        each level's output overwrites the rows of the bands it has just read (``Z`` is consumed:
        pass a tensor of your own). The finest level writes a fresh tensor, or ``Z`` itself with
        ``inplace`` (a contiguous ``Z``)."""
        inplace = inplace and Z.is_contiguous()
        h, w = self.grid
        lead, n, d = Z.shape[:-2], Z.shape[-2], Z.shape[-1]
        B = math.prod(lead)
        Z = Z.reshape(B, n, d)
        out = None
        for lvl in range(self.levels, 0, -1):
            H, W = h >> (lvl - 1), w >> (lvl - 1)  # the grid at the input of this level
            fh, fw = H // 2, W // 2
            ll, hl, lh, hh = Z[:, : H * W].view(B, 4, fh, fw, d).unbind(1)
            lo = _scratch("ws0", (B, fh, 2, fw, d), Z)
            hi = _scratch("ws1", (B, fh, 2, fw, d), Z)
            lo_e, lo_o = lo.unbind(2)
            hi_e, hi_o = hi.unbind(2)
            torch.add(ll, hl, out=lo_e)
            torch.sub(ll, hl, out=lo_o)
            torch.add(lh, hh, out=hi_e)
            torch.sub(lh, hh, out=hi_o)
            if lvl == 1 and not inplace:
                out = torch.empty(B, H, fw, 2, d, dtype=Z.dtype, device=Z.device)
            else:
                out = Z[:, : H * W].view(B, H, fw, 2, d)
            oe, oo = out.unbind(3)
            lo, hi = lo.view(B, H, fw, d), hi.view(B, H, fw, d)
            torch.add(lo, hi, out=oe)
            torch.sub(lo, hi, out=oo)
        return out.reshape(*lead, n, d)

    def _matrix(self, s):
        # Independent construction: per level, kron(A_H, A_W) acts on the LL block (which
        # occupies the first H*W output rows, row-major), then a permutation puts its rows in
        # band order [LL, HL, LH, HH]; finer-level bands stay in the tail.
        M = torch.eye(s, dtype=torch.float64)
        H, W = self.grid
        for _ in range(self.levels):
            K = torch.kron(_haar_step_matrix(H), _haar_step_matrix(W))
            ch, cw = (H + 1) // 2, (W + 1) // 2
            lo_h, hi_h = torch.arange(ch), torch.arange(ch, H)
            lo_w, hi_w = torch.arange(cw), torch.arange(cw, W)
            perm = torch.cat([_grid_rows(i, j, W) for i, j in ((lo_h, lo_w), (hi_h, lo_w), (lo_h, hi_w), (hi_h, hi_w))])
            P = torch.eye(s, dtype=torch.float64)
            P[: H * W, : H * W] = K[perm]
            M = P @ M
            H, W = ch, cw
        return M


def _grid_rows(i: torch.Tensor, j: torch.Tensor, w: int) -> torch.Tensor:
    """Row-major indices of the tokens (i, j) of a grid of width w, rows i outer, columns j inner."""
    return (i.unsqueeze(1) * w + j.unsqueeze(0)).reshape(-1)


def _haar_step_matrix(n: int) -> torch.Tensor:
    """One orthonormal Haar step of length n: rows [approximations (+carry), details]."""
    h = n // 2
    A = torch.zeros(n, n, dtype=torch.float64)
    for k in range(h):
        A[k, 2 * k] = A[k, 2 * k + 1] = SQRT1_2
        A[n - h + k, 2 * k] = SQRT1_2
        A[n - h + k, 2 * k + 1] = -SQRT1_2
    if n % 2:
        A[h, n - 1] = 1.0
    return A


# ---------------------------------------------------------------------------------------------
# Token 0 apart
# ---------------------------------------------------------------------------------------------
class TokenApart(SequenceTransform):
    """``diag(1, L')``: token 0 passes unchanged (first row), ``inner`` transforms tokens 1..s-1.

    Orthogonal when ``inner`` is. Meant for LLMs whose first token carries a massive activation
    (the attention sink): a sequence transform would otherwise smear that one token over many
    rows. ``inner`` must accept length s - 1 (DCT and DWT do; the WHT needs a power of two)."""

    def __init__(self, inner: SequenceTransform):
        super().__init__(check_finite=inner.check_finite)
        self.inner = inner
        self.name = f"{inner.name} (token 0 apart)"
        self.orthogonal = inner.orthogonal

    def __repr__(self):
        return f"TokenApart({self.inner!r})"

    def _check_length(self, s):
        if s < 2:
            raise ValueError(f"TokenApart needs at least 2 tokens, got s={s}")
        self.inner._check_length(s - 1)

    def _forward(self, X):
        return torch.cat([X[..., :1, :], self.inner.forward(X[..., 1:, :])], dim=-2)

    def _inverse(self, Y):
        return torch.cat([Y[..., :1, :], self.inner.inverse(Y[..., 1:, :])], dim=-2)

    def _matrix(self, s):
        M = torch.zeros(s, s, dtype=torch.float64)
        M[0, 0] = 1.0
        M[1:, 1:] = self.inner.matrix(s - 1, dtype=torch.float64)
        return M


# ---------------------------------------------------------------------------------------------
# KLT and arbitrary dense transforms
# ---------------------------------------------------------------------------------------------
class Dense(SequenceTransform):
    """Any invertible s x s matrix as a transform (its fast path *is* the matmul).

    ``orthogonal`` is detected numerically; Theorem 1 only holds for orthogonal L."""

    name = "dense"

    def __init__(self, M: torch.Tensor, name: str | None = None, check_finite: bool = True):
        super().__init__(check_finite)
        M = torch.as_tensor(M, dtype=torch.float64)
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"a dense transform needs a square matrix, got shape {tuple(M.shape)}")
        if not bool(torch.isfinite(M).all()):
            raise ValueError("the transform matrix contains NaN/Inf")
        self.M = M
        self.s = M.shape[0]
        if name:
            self.name = name
        eye = torch.eye(self.s, dtype=torch.float64)
        self.orthogonal = bool(torch.allclose(M @ M.T, eye, atol=1e-8))
        if not self.orthogonal:
            inv, info = torch.linalg.inv_ex(M)  # one LU, no SVD
            if int(info) != 0 or not bool(torch.isfinite(inv).all()):
                raise ValueError("the transform matrix is singular (not invertible)")
            self.M_inv = inv

    def __repr__(self):
        return f"{type(self).__name__}(s={self.s}, name={self.name!r})"

    def _check_length(self, s):
        if s != self.s:
            raise ValueError(
                f"this {self.name} transform was built for s={self.s} but the sequence has s={s}"
            )

    def _forward(self, X):
        return self.M.to(device=X.device, dtype=X.dtype) @ X

    def _inverse(self, Y):
        Minv = self.M.T if self.orthogonal else self.M_inv
        return Minv.to(device=Y.device, dtype=Y.dtype) @ Y

    def _matrix(self, s):
        return self.M


SIGN_TIE_RTOL = 1e-8  # entries within this relative distance of the largest magnitude tie


def canonical_signs(R: torch.Tensor, tie_rtol: float = SIGN_TIE_RTOL) -> torch.Tensor:
    """Flip the sign of each ROW of ``R`` (k, s) so that its pivot is positive.

    The pivot of a row is its first entry (lowest column index) whose magnitude is at least
    ``(1 - tie_rtol)`` times the row's largest magnitude: the largest-magnitude entry, with
    ties broken towards the first token. Returns a new tensor; all-zero rows are left as they
    are. Flipping rows of R beforehand changes nothing (|R| is the same bytes), so
    ``canonical_signs(D @ R)`` equals ``canonical_signs(R)`` exactly for any diagonal D of +-1."""
    mag = R.abs()
    top = mag.amax(dim=-1, keepdim=True)
    cols = torch.arange(R.shape[-1], device=R.device).expand_as(R)
    pivot = torch.where(mag >= top * (1.0 - tie_rtol), cols, R.shape[-1]).amin(dim=-1, keepdim=True)
    signs = torch.sign(R.gather(-1, pivot.clamp(max=R.shape[-1] - 1)))
    signs[signs == 0] = 1.0
    return R * signs


class KLT(Dense):
    r"""Karhunen-Loeve transform along the sequence.

    Rows are the eigenvectors of the sequence autocorrelation :math:`S = E[X X^T]/d` (s x s,
    estimated from samples), sorted by decreasing eigenvalue, so that the first k rows capture
    the largest possible expected energy of any orthonormal transform (Ky Fan).

    Sign convention (see :func:`canonical_signs`): in every row, the entry of largest magnitude
    is positive; where several entries tie in magnitude (within a relative ``1e-8``, as the
    symmetric and skew-symmetric eigenvectors of a stationary, Toeplitz S always do), the first
    of them (lowest token index) is positive. So the rows do not depend on the signs the
    eigensolver happens to return, nor on round-off between tied entries. Eigenvectors of
    (nearly) repeated eigenvalues are not unique beyond their sign; no sign rule fixes that."""

    name = "klt"

    @classmethod
    def fit(cls, samples: torch.Tensor, check_finite: bool = True) -> "KLT":
        """Fit from samples of shape (n, s, d) (or (s, d)); computed in float64."""
        X = _as_input(samples, "samples", check_finite)
        S_sum, n = sum_xxt(X.to(torch.float64))
        S = S_sum / n
        return cls.from_autocorrelation(S, check_finite=check_finite)

    @classmethod
    def from_autocorrelation(cls, S: torch.Tensor, check_finite: bool = True) -> "KLT":
        """Build from a symmetric s x s autocorrelation matrix."""
        S = torch.as_tensor(S, dtype=torch.float64)
        if S.dim() != 2 or S.shape[0] != S.shape[1]:
            raise ValueError(f"autocorrelation must be square (s, s), got {tuple(S.shape)}")
        if not bool(torch.isfinite(S).all()):
            raise ValueError("autocorrelation contains NaN/Inf")
        S = 0.5 * (S + S.T)
        evals, evecs = torch.linalg.eigh(S)
        order = torch.argsort(evals, descending=True)
        evals, V = evals[order], evecs[:, order]
        rows = canonical_signs(V.T)  # row k = k-th eigenvector, documented sign
        obj = cls(rows.contiguous(), check_finite=check_finite)
        obj.eigenvalues = evals
        return obj


NAMES = ("identity", "dct", "wht", "dwt", "klt")


class MeanToken(SequenceTransform):
    r"""The Householder reflection :math:`H = I - 2 v v^\top / v^\top v`, :math:`v = e_1 - u`,
    :math:`u = \mathbf 1/\sqrt s`: orthogonal and symmetric (its own inverse), :math:`H e_1 = u`, so
    its first row is the normalised all-ones vector (row 0 of :math:`HX` is the mean token times
    :math:`\sqrt s`) and every other row :math:`e_i^\top + v^\top / (\sqrt s (1 - 1/\sqrt s))` is the
    token :math:`x_i` minus about the mean token (plus :math:`x_0/\sqrt s`): close to the identity.
    Fast path O(s d); :meth:`matrix` builds H independently. ``s = 1``: the identity."""

    name = "mean-token"

    def _forward(self, X):
        s = X.shape[-2]
        if s == 1:
            return X.clone()
        r = s ** 0.5
        c = (X[..., 0, :] - X.sum(-2) / r) / (1.0 - 1.0 / r)  # 2 v^T X / v^T v
        Y = X + (c / r).unsqueeze(-2)
        Y[..., 0, :] -= c
        return Y

    def _inverse(self, Y):
        return self._forward(Y)

    def _matrix(self, s):
        v = torch.full((s,), -1.0 / s ** 0.5, dtype=torch.float64)
        v[0] += 1.0
        vv = float(v @ v)
        return torch.eye(s, dtype=torch.float64) - (2.0 / vv) * torch.outer(v, v) if vv > 0 else torch.eye(
            s, dtype=torch.float64)


def build(name: str, levels: int | None = None, grid: tuple[int, int] | None = None, **kw) -> SequenceTransform:
    """Build a transform by name: ``"identity" | "dct" | "wht" | "dwt" | "mean"`` (``"mean"``: the
    :class:`MeanToken` control, which separates only the mean token).

    ``levels`` and ``grid`` apply to ``"dwt"`` only (``grid=(h, w)`` selects the 2-D Haar over
    a token grid). The KLT needs data: use :meth:`KLT.fit`."""
    key = str(name).lower()
    if key not in ("dwt",) and (levels is not None or grid is not None):
        raise ValueError(f"levels/grid only apply to 'dwt', not {name!r}")
    if key == "identity":
        return Identity(**kw)
    if key == "dct":
        return DCT(**kw)
    if key in ("wht", "hadamard", "walsh"):
        return WHT(**kw)
    if key in ("dwt", "haar"):
        return HaarDWT2D(grid, levels, **kw) if grid is not None else HaarDWT(levels, **kw)
    if key in ("mean", "mean-token"):
        return MeanToken(**kw)
    if key == "klt":
        raise ValueError("the KLT is fitted from data: use transforms.KLT.fit(samples)")
    raise ValueError(f"unknown transform {name!r}; choose one of 'identity', 'dct', 'wht', 'dwt', 'mean'")
