"""Sequence transforms: fast path == dense matrix == trusted references (scipy, PyWavelets)."""

import math

import numpy as np
import pytest
import pywt
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stamp_lib.core import transforms

close = torch.testing.assert_close  # tolerances stated where the computations differ

LENGTHS = [1, 2, 3, 5, 7, 8, 13, 16, 17, 31, 64, 97, 100, 128, 257]
POW2 = [1, 2, 4, 8, 16, 64, 256]


def _all_for(s):
    out = [transforms.build("identity"), transforms.build("dct"), transforms.build("dwt")]
    if s > 1:
        out.append(transforms.build("dwt", levels=1))
    if s & (s - 1) == 0:
        out.append(transforms.build("wht"))
    return out


@pytest.fixture(params=["scipy", "torch"])
def fft_backend(request):
    transforms.set_fft_backend(request.param)
    yield request.param
    transforms.set_fft_backend("scipy")


@pytest.mark.parametrize("s", LENGTHS)
def test_fast_equals_dense_and_inverse_exact_fp64(s, fft_backend):
    g = torch.Generator().manual_seed(s)
    X = torch.randn(2, 3, s, 5, generator=g, dtype=torch.float64)
    for T in _all_for(s):
        M = T.matrix(s, torch.float64)
        tol = dict(rtol=0, atol=1e-12, msg=lambda m: f"{T}, s={s}: {m}")
        close(T.forward(X), M @ X, **tol)
        close(T.inverse(T.forward(X)), X, **tol)
        close(T.inverse(X), M.T @ X, **tol)
        close(M @ M.T, torch.eye(s, dtype=torch.float64), **tol)


@pytest.mark.parametrize("s", [3, 16, 17, 100, 256])
def test_float32_orthonormal_and_close_to_fp64(s):
    X = torch.randn(4, s, 8)
    for T in _all_for(s):
        M = T.matrix(s)
        assert M.dtype == torch.float32
        close(M @ M.T, torch.eye(s), rtol=0, atol=1e-5)
        ref = T.forward(X.double()).float()
        Y = T.forward(X)
        assert Y.dtype == torch.float32
        close(Y, ref, rtol=0, atol=1e-5)
        close(T.inverse(Y), X, rtol=0, atol=1e-5)


@pytest.mark.parametrize("s", LENGTHS)
def test_dct_matches_scipy(s, fft_backend):
    X = torch.randn(3, s, 6, dtype=torch.float64)
    ref = scipy.fft.dct(X.numpy(), type=2, norm="ortho", axis=-2)
    np.testing.assert_allclose(transforms.build("dct").forward(X).numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(
        transforms.build("dct").inverse(torch.from_numpy(ref)).numpy(), X.numpy(), atol=1e-12
    )


@pytest.mark.parametrize("s", [2, 4, 8, 32, 256, 1024])
@pytest.mark.parametrize("levels", [1, 2, 3, None])
def test_haar_matches_pywt_periodization(s, levels):
    L = transforms.max_levels_1d(s) if levels is None else levels
    if L > transforms.max_levels_1d(s):
        pytest.skip("too many levels for s")
    X = torch.randn(2, s, 5, dtype=torch.float64)
    coeffs = pywt.wavedec(X.numpy(), "haar", mode="periodization", level=L, axis=-2)
    ref = np.concatenate(coeffs, axis=-2)
    # Same sign convention as pywt: detail = (x_even - x_odd)/sqrt(2).
    np.testing.assert_allclose(transforms.build("dwt", levels=levels).forward(X).numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("grid", [(2, 2), (4, 4), (8, 8), (16, 16), (8, 16)])
def test_haar2d_matches_pywt_wavedec2(grid):
    h, w = grid
    T = transforms.build("dwt", grid=grid)
    X = torch.randn(3, h * w, 4, dtype=torch.float64)
    coeffs = pywt.wavedec2(X.numpy().reshape(3, h, w, 4), "haar", mode="periodization",
                           level=T.levels, axes=(1, 2))
    parts = [coeffs[0].reshape(3, -1, 4)] + [b.reshape(3, -1, 4) for lv in coeffs[1:] for b in lv]
    np.testing.assert_allclose(T.forward(X).numpy(), np.concatenate(parts, axis=1), atol=1e-12)


@pytest.mark.parametrize("grid", [(1, 1), (3, 5), (7, 6), (5, 5), (16, 16), (2, 9)])
@pytest.mark.parametrize("levels", [1, 2, None])
def test_haar2d_fast_equals_dense_any_grid(grid, levels):
    h, w = grid
    try:
        T = transforms.build("dwt", grid=grid, levels=levels)
    except ValueError:
        assert levels is not None and levels > min(transforms.max_levels_1d(h), transforms.max_levels_1d(w))
        return
    s = h * w
    X = torch.randn(2, s, 3, dtype=torch.float64)
    M = T.matrix(s, torch.float64)
    close(M @ M.T, torch.eye(s, dtype=torch.float64), rtol=0, atol=1e-12)
    close(T.forward(X), M @ X, rtol=0, atol=1e-12)
    close(T.inverse(T.forward(X)), X, rtol=0, atol=1e-12)
    assert sum(r * c for _, r, c in T.band_sizes()) == s


def test_haar2d_ll_band_is_block_mean():
    """After 3 levels on 16x16, the 2x2 LL band is 8 * the mean of each 8x8 block."""
    T = transforms.build("dwt", grid=(16, 16), levels=3)
    X = torch.randn(256, 3, dtype=torch.float64)
    Y = T.forward(X)
    blocks = X.reshape(2, 8, 2, 8, 3).mean(dim=(1, 3)).reshape(4, 3)
    close(Y[:4], 8 * blocks, rtol=0, atol=1e-12)


def test_wht_sequency_order():
    for s in [2, 4, 8, 32, 128]:
        M = transforms.build("wht").matrix(s, torch.float64)
        changes = ((M[:, 1:] * M[:, :-1]) < 0).sum(dim=1)
        assert changes.tolist() == list(range(s))
        close(M.abs(), torch.full((s, s), 1 / math.sqrt(s), dtype=torch.float64), rtol=0, atol=1e-15)


def test_wht_matches_scipy_hadamard_rows():
    from scipy.linalg import hadamard

    s = 64
    H = torch.from_numpy(hadamard(s).astype(np.float64)) / math.sqrt(s)
    M = transforms.build("wht").matrix(s, torch.float64)
    # the same rows as scipy's (Sylvester-order) Hadamard matrix, only reordered
    P = M @ H.T
    close(P, P.round(), rtol=0, atol=1e-12)
    P = P.round()  # a 0/1 matrix from here on: the counts below are exact integers
    assert set(P.unique().tolist()) <= {0.0, 1.0}
    assert P.sum(0).tolist() == [1.0] * s
    assert P.sum(1).tolist() == [1.0] * s


def test_energy_preserved():
    X = torch.randn(5, 64, 7, dtype=torch.float64)
    for T in _all_for(64) + [transforms.build("dwt", grid=(8, 8))]:
        close(T.forward(X).pow(2).sum(), X.pow(2).sum(), rtol=1e-12, atol=0, msg=str(T))


def test_klt_orders_eigenvalues_and_maximises_concentration():
    g = torch.Generator().manual_seed(0)
    s, d, rho = 32, 16, 0.9
    # AR(1) along the sequence
    e = torch.randn(200, s, d, generator=g, dtype=torch.float64)
    X = torch.empty_like(e)
    X[:, 0] = e[:, 0]
    for t in range(1, s):
        X[:, t] = rho * X[:, t - 1] + math.sqrt(1 - rho**2) * e[:, t]
    K = transforms.KLT.fit(X)
    assert torch.all(K.eigenvalues[:-1] >= K.eigenvalues[1:])
    M = K.matrix(s, torch.float64)
    close(M @ M.T, torch.eye(s, dtype=torch.float64), rtol=0, atol=1e-10)
    close(K.inverse(K.forward(X)), X, rtol=0, atol=1e-10)
    # in-sample, the first k KLT rows hold at least as much energy as any other transform
    from stamp_lib.core.metrics import energy_profile

    pk = energy_profile(K.forward(X))
    for T in [transforms.build(n) for n in ("identity", "dct", "wht", "dwt")]:
        assert torch.all(pk >= energy_profile(T.forward(X)) - 1e-10), T


# --- KLT sign convention: largest-magnitude entry of each row positive, ties -> first token ----
def _klt_with_eigh(monkeypatch, S, tamper):
    """KLT.from_autocorrelation(S) with torch.linalg.eigh's eigenvectors passed through
    ``tamper(V)`` first (S is the same for v and -v, so a solver may return either)."""
    real_eigh = torch.linalg.eigh
    calls = []

    def eigh(A, *args, **kw):
        w, V = real_eigh(A, *args, **kw)
        calls.append(1)
        return w, tamper(V)

    with monkeypatch.context() as m:
        m.setattr(torch.linalg, "eigh", eigh)
        K = transforms.KLT.from_autocorrelation(S)
    assert calls, "KLT no longer calls torch.linalg.eigh: update this test"
    return K


def _flips(s, seed):
    g = torch.Generator().manual_seed(seed)
    return [-torch.ones(s, dtype=torch.float64),
            torch.tensor([(-1.0) ** k for k in range(s)], dtype=torch.float64),
            torch.where(torch.rand(s, generator=g) < 0.5, -1.0, 1.0).double()]


def test_klt_signs_follow_the_rule_whatever_signs_eigh_returns(monkeypatch):
    """Generic basis (no ties): row k = +-q_k with its largest-magnitude entry positive."""
    s = 12
    g = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(s, s, generator=g, dtype=torch.float64))
    lam = torch.linspace(2.0, 0.1, s, dtype=torch.float64)  # distinct: q_k is unique up to sign
    S = Q @ torch.diag(lam) @ Q.T
    rows = Q.T.clone()  # row k = eigenvector of the k-th largest eigenvalue
    pivot = rows.abs().argmax(dim=1)
    expected = rows * torch.sign(rows[torch.arange(s), pivot]).unsqueeze(1)
    K = transforms.KLT.from_autocorrelation(S)
    close(K.M, expected, rtol=0, atol=1e-10)
    for flip in _flips(s, seed=0):
        Kf = _klt_with_eigh(monkeypatch, S, lambda V: V * flip)
        # the same bytes: a sign flip is exact and |V| does not change
        assert torch.equal(Kf.M, K.M), flip


def test_klt_sign_ties_go_to_the_first_token(monkeypatch):
    """Walsh eigenvectors: every entry ties in magnitude (+-1/sqrt(s)), so the rule makes the
    first entry positive, and the KLT of S = H^T diag(lam) H is H itself (scipy's Sylvester
    Hadamard has a positive first column) even when the solver returns flipped vectors with
    round-off in them, as another LAPACK would."""
    from scipy.linalg import hadamard

    s = 16
    H = torch.from_numpy(hadamard(s).astype(np.float64)) / math.sqrt(s)
    lam = torch.linspace(3.0, 0.2, s, dtype=torch.float64)
    S = H.T @ torch.diag(lam) @ H
    g = torch.Generator().manual_seed(1)
    for flip in _flips(s, seed=1):
        noise = 1e-13 * torch.randn(s, s, generator=g, dtype=torch.float64)
        K = _klt_with_eigh(monkeypatch, S, lambda V: V * flip + noise)
        close(K.M, H, rtol=0, atol=1e-11)


def test_klt_signs_on_a_stationary_autocorrelation(monkeypatch):
    """AR(1), S_ij = rho^|i-j| (Toeplitz): every eigenvector is symmetric or skew-symmetric,
    so its largest magnitude sits at two mirrored tokens; the first of them is positive."""
    s, rho = 16, 0.9
    i = torch.arange(s, dtype=torch.float64)
    S = rho ** (i[:, None] - i[None, :]).abs()
    g = torch.Generator().manual_seed(2)
    for flip in [torch.ones(s, dtype=torch.float64), *_flips(s, seed=2)]:
        noise = 1e-13 * torch.randn(s, s, generator=g, dtype=torch.float64)
        M = _klt_with_eigh(monkeypatch, S, lambda V: V * flip + noise).M
        for k, row in enumerate(M):
            top = int(row.abs().argmax())
            first = min(top, s - 1 - top)
            close(row.abs(), row.abs().flip(0), rtol=0, atol=1e-10)  # (skew-)symmetric
            assert row[first] > 0, (k, row)


@settings(max_examples=40, deadline=None)
@given(s=st.integers(1, 70), d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_property_roundtrip_any_length(s, d, seed):
    X = torch.randn(s, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for T in _all_for(s):
        close(T.inverse(T.forward(X)), X, rtol=0, atol=1e-10)
        close(T.forward(X), T.forward_dense(X), rtol=0, atol=1e-10)


# --- bad input -------------------------------------------------------------------------------
def test_errors_name_the_problem():
    T = transforms.build("dct")
    with pytest.raises(ValueError, match="rank"):
        T.forward(torch.randn(8))
    with pytest.raises(ValueError, match="NaN"):
        T.forward(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="Inf"):
        T.forward(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="floating"):
        T.forward(torch.ones(4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        T.forward(np.ones((4, 4)))
    with pytest.raises(ValueError, match="power-of-two"):
        transforms.build("wht").forward(torch.randn(12, 3))
    with pytest.raises(ValueError, match="levels"):
        transforms.build("dwt", levels=5).forward(torch.randn(16, 3))  # 16 allows 4
    with pytest.raises(ValueError, match="too many"):
        transforms.build("dwt", levels=5, grid=(16, 16))
    with pytest.raises(ValueError, match="256 tokens but the sequence has s=100"):
        transforms.build("dwt", grid=(16, 16)).forward(torch.randn(100, 3))
    K = transforms.KLT.fit(torch.randn(4, 16, 3))
    with pytest.raises(ValueError, match="built for s=16"):
        K.forward(torch.randn(32, 3))
    with pytest.raises(ValueError, match="unknown transform"):
        transforms.build("fft")
    with pytest.raises(ValueError, match="only apply to 'dwt'"):
        transforms.build("dct", levels=2)
    with pytest.raises(ValueError, match="singular"):
        transforms.Dense(torch.zeros(4, 4))


def test_dwt_level_limits_are_exact():
    # levels = ceil(log2 s) is the maximum; it leaves one approximation row
    for s in [2, 3, 5, 16, 17, 100]:
        L = transforms.max_levels_1d(s)
        transforms.build("dwt", levels=L).forward(torch.randn(s, 2))
        with pytest.raises(ValueError):
            transforms.build("dwt", levels=L + 1).forward(torch.randn(s, 2))


def test_dense_nonorthogonal_inverse():
    M = torch.tensor([[2.0, 1.0], [0.0, 0.5]], dtype=torch.float64)
    T = transforms.Dense(M)
    assert not T.orthogonal
    X = torch.randn(2, 3, dtype=torch.float64)
    close(T.inverse(T.forward(X)), X, rtol=0, atol=1e-12)


# --- dtypes, batches, threads -------------------------------------------------------------------
def _with_grid_and_klt(s, h, w):
    K = transforms.KLT.fit(torch.randn(20, s, 8, generator=torch.Generator().manual_seed(s)))
    return _all_for(s) + [transforms.build("dwt", grid=(h, w)), K]


def _assert_columns_within(A, B, rel, what):
    """||A[..., :, j] - B[..., :, j]||_2 <= rel * ||B[..., :, j]||_2 for every column j."""
    err = (A.double() - B.double()).norm(dim=-2)
    bound = rel * B.double().norm(dim=-2)
    assert bool((err <= bound).all()), (what, float((err / bound).max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_computed_in_float32(dtype, fft_backend):
    """float16/bfloat16 in, the same dtype out, computed in float32: each output is the float64
    result rounded once to ``dtype`` (relative error <= eps/2, plus float32 round-off)."""
    s = 64
    X = torch.randn(3, s, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    eps = torch.finfo(dtype).eps
    for T in _with_grid_and_klt(s, 8, 8):
        M = T.matrix(s, torch.float64)
        Y = T.forward(X)
        assert Y.dtype == dtype, T
        close(Y.double(), M @ X.double(), rtol=eps, atol=1e-5, msg=lambda m: f"{T}: {m}")
        # fast vs dense: both round the same float32 values once (default tolerances of dtype)
        close(Y, T.forward_dense(X), msg=lambda m: f"{T}: {m}")
        Xr = T.inverse(Y)
        assert Xr.dtype == dtype and T.inverse_dense(Y).dtype == dtype, T
        close(Xr.double(), M.T @ Y.double(), rtol=eps, atol=1e-5, msg=lambda m: f"{T}: {m}")
        # round trip, two roundings of at most eps/2 each; L orthogonal spreads the first over
        # the whole column, so the bound holds column-wise in norm, not entry-wise
        _assert_columns_within(Xr, X, 1.01 * eps, T)


def test_low_precision_autograd():
    """bfloat16 leaf: the dense float32 path carries the graph; d||LX||^2/dX = 2X up to the
    rounding of Y and of the gradient to bfloat16 (eps/2 each, relative, column-wise)."""
    X = torch.randn(16, 4).to(torch.bfloat16).requires_grad_()
    eps = torch.finfo(torch.bfloat16).eps
    for T in _all_for(16):
        Y = T.forward(X)
        assert Y.dtype == torch.bfloat16
        (g,) = torch.autograd.grad(Y.float().pow(2).sum(), X)
        assert g.dtype == torch.bfloat16
        _assert_columns_within(g, 2 * X.detach(), 1.01 * eps, T)


def test_unsupported_float_dtype_is_named():
    f8 = getattr(torch, "float8_e4m3fn", None)
    if f8 is None:
        pytest.skip("this torch has no float8")
    X = torch.randn(8, 4).to(f8)
    for T in _all_for(8):
        with pytest.raises(TypeError, match=r"float8_e4m3fn.*\.float\(\)"):
            T.forward(X)
        with pytest.raises(TypeError, match="float8_e4m3fn"):
            T.inverse_dense(X)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        transforms.KLT.fit(X)


@pytest.mark.parametrize("s, grid", [(64, (8, 8)), (100, (10, 10))])
def test_batch_strides_and_threads_agree(s, grid, fft_backend):
    """Different computations of the same L X: a batch vs one sample at a time, a strided view
    vs a contiguous copy, one thread vs two (the DCT passes torch's thread count to scipy)."""
    g = torch.Generator().manual_seed(s)
    X = torch.randn(4, s, 96, generator=g)
    Xt = torch.randn(4, 96, s, generator=g).transpose(-1, -2)  # non-contiguous (..., s, d)
    tol = dict(rtol=0, atol=1e-5)
    n = torch.get_num_threads()
    try:
        for T in _with_grid_and_klt(s, *grid):
            Y = T.forward(X)
            close(Y, torch.stack([T.forward(x) for x in X]), **tol, msg=lambda m: f"{T}: {m}")
            close(T.forward(Xt), T.forward(Xt.contiguous()), **tol, msg=lambda m: f"{T}: {m}")
            close(T.inverse(Xt), T.inverse(Xt.contiguous()), **tol, msg=lambda m: f"{T}: {m}")
            torch.set_num_threads(1)
            Y1, X1 = T.forward(X), T.inverse(X)
            torch.set_num_threads(2)
            close(Y1, T.forward(X), **tol, msg=lambda m: f"{T}: {m}")
            close(X1, T.inverse(X), **tol, msg=lambda m: f"{T}: {m}")
            torch.set_num_threads(n)
    finally:
        torch.set_num_threads(n)


def test_autograd_flows_through_every_transform():
    X = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    for T in _all_for(16) + [transforms.build("dwt", grid=(4, 4))]:
        (g,) = torch.autograd.grad(T.forward(X).pow(2).sum(), X)
        close(g, 2 * X, rtol=0, atol=1e-12, msg=str(T))  # orthogonal: d||LX||^2/dX = 2X
        with torch.no_grad():  # a leaf that requires grad, grad mode off: the fast path
            close(T.forward(X), T.forward_dense(X.detach()), rtol=0, atol=1e-12, msg=str(T))


def test_results_never_alias_the_workspace():
    """Fast paths reuse scratch buffers; what they return must be fresh tensors."""
    X = torch.randn(2, 512, 1024)  # large enough (> 1 MiB) to use the workspace
    for T in _all_for(512):
        Y1 = T.forward(X)
        Y1c = Y1.clone()
        X1 = T.inverse(Y1)
        X1c = X1.clone()
        T.forward(torch.randn_like(X))
        T.inverse(torch.randn_like(X))
        # the same bytes must come back: torch.equal, not a tolerance
        assert torch.equal(Y1, Y1c) and torch.equal(X1, X1c), T
        close(X1, X, rtol=0, atol=1e-4, msg=str(T))
    transforms.clear_workspace()


@pytest.mark.parametrize("grid, levels", [((16, 16), 3), ((16, 16), 4), ((8, 4), 2), ((4, 4), 1), ((64, 32), 5),
                                          ((12, 12), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_haar2d_butterflies_equal_the_stepwise_path(monkeypatch, grid, levels, dtype):
    """Grids that stay even at every level take unscaled butterflies written into the output and
    one scaling by powers of two; the stepwise path (two 1/sqrt2 per level) is the reference."""
    T = transforms.build("dwt", grid=grid, levels=levels)
    assert T._even()
    s = grid[0] * grid[1]
    X = torch.randn(3, 2, s, 5, dtype=dtype, generator=torch.Generator().manual_seed(s + levels))
    fast_y, fast_x = T.forward(X), T.inverse(X)
    monkeypatch.setattr(transforms, "_FAST_HAAR2D", False)
    tol = dict(rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-13)
    close(fast_y, T.forward(X), **tol)
    close(fast_x, T.inverse(X), **tol)
    monkeypatch.setattr(transforms, "_FAST_HAAR2D", True)
    # the unscaled pair: L = D U and L^-1 = U^T D, D the per-row powers of two
    D = T._row_scale(X)
    close(T._forward_unscaled(X) * D, fast_y, **tol)
    close(T._inverse_unscaled(X * D), fast_x, **tol)
    Xc = X.clone()
    Y = T._forward_unscaled(Xc, inplace=True)
    assert Y.data_ptr() == Xc.data_ptr()  # in place
    close(Y * D, fast_y, **tol)
    Z = (fast_y * D).contiguous()
    back = T._inverse_unscaled(Z, inplace=True)
    assert back.data_ptr() == Z.data_ptr()
    close(back, X, **tol)


def test_haar2d_odd_levels_keep_the_stepwise_path():
    T = transforms.build("dwt", grid=(12, 12), levels=3)  # 12 -> 6 -> 3: the last level is odd
    assert not T._even() and not T._unscaled_ok(torch.randn(144, 2))
    X = torch.randn(2, 144, 3, dtype=torch.float64)
    close(T.forward(X), T.matrix(144, torch.float64) @ X, rtol=0, atol=1e-12)


def test_workspace_buffers_are_shared_by_tag_and_grow():
    """One flat buffer per tag, whatever the shape asked for; small requests are fresh tensors."""
    transforms.clear_workspace()
    like = torch.empty(0)
    a = transforms._scratch("t", (512, 1024), like)
    b = transforms._scratch("t", (1024, 512), like)
    assert a.data_ptr() == b.data_ptr() and b.shape == (1024, 512)
    c = transforms._scratch("t", (1024, 1024), like)  # grows
    assert c.numel() == 1024 * 1024 and transforms._scratch("u", (512, 1024), like).data_ptr() != c.data_ptr()
    assert transforms._scratch("t", (4, 4), like).data_ptr() != c.data_ptr()  # small: fresh
    transforms.clear_workspace()
