"""Sequence transforms: fast path == dense matrix == trusted references (scipy, PyWavelets)."""

import math

import numpy as np
import pytest
import pywt
import scipy.fft
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stamp_lib import transforms

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
        assert torch.allclose(T.forward(X), M @ X, atol=1e-12), (T, s)
        assert torch.allclose(T.inverse(T.forward(X)), X, atol=1e-12), (T, s)
        assert torch.allclose(T.inverse(X), M.T @ X, atol=1e-12), (T, s)
        assert torch.allclose(M @ M.T, torch.eye(s, dtype=torch.float64), atol=1e-12), (T, s)


@pytest.mark.parametrize("s", [3, 16, 17, 100, 256])
def test_float32_orthonormal_and_close_to_fp64(s):
    X = torch.randn(4, s, 8)
    for T in _all_for(s):
        M = T.matrix(s)
        assert M.dtype == torch.float32
        assert torch.allclose(M @ M.T, torch.eye(s), atol=1e-5)
        ref = T.forward(X.double()).float()
        assert torch.allclose(T.forward(X), ref, atol=1e-5)
        assert torch.allclose(T.inverse(T.forward(X)), X, atol=1e-5)


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
    assert torch.allclose(M @ M.T, torch.eye(s, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(T.forward(X), M @ X, atol=1e-12)
    assert torch.allclose(T.inverse(T.forward(X)), X, atol=1e-12)
    assert sum(r * c for _, r, c in T.band_sizes()) == s


def test_haar2d_ll_band_is_block_mean():
    """After 3 levels on 16x16, the 2x2 LL band is 8 * the mean of each 8x8 block."""
    T = transforms.build("dwt", grid=(16, 16), levels=3)
    X = torch.randn(256, 3, dtype=torch.float64)
    Y = T.forward(X)
    blocks = X.reshape(2, 8, 2, 8, 3).mean(dim=(1, 3)).reshape(4, 3)
    assert torch.allclose(Y[:4], 8 * blocks, atol=1e-12)


def test_wht_sequency_order():
    for s in [2, 4, 8, 32, 128]:
        M = transforms.build("wht").matrix(s, torch.float64)
        changes = ((M[:, 1:] * M[:, :-1]) < 0).sum(dim=1)
        assert changes.tolist() == list(range(s))
        assert torch.allclose(M.abs(), torch.full((s, s), 1 / math.sqrt(s), dtype=torch.float64))


def test_wht_matches_scipy_hadamard_rows():
    from scipy.linalg import hadamard

    s = 64
    H = torch.from_numpy(hadamard(s).astype(np.float64)) / math.sqrt(s)
    M = transforms.build("wht").matrix(s, torch.float64)
    # the same rows as scipy's (Sylvester-order) Hadamard matrix, only reordered
    P = M @ H.T
    assert torch.allclose(P, P.round(), atol=1e-12)
    P = P.round()
    assert set(P.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(P.sum(0), torch.ones(s, dtype=torch.float64))
    assert torch.equal(P.sum(1), torch.ones(s, dtype=torch.float64))


def test_energy_preserved():
    X = torch.randn(5, 64, 7, dtype=torch.float64)
    for T in _all_for(64) + [transforms.build("dwt", grid=(8, 8))]:
        assert torch.allclose(T.forward(X).pow(2).sum(), X.pow(2).sum())


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
    assert torch.allclose(M @ M.T, torch.eye(s, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(K.inverse(K.forward(X)), X, atol=1e-10)
    # in-sample, the first k KLT rows hold at least as much energy as any other transform
    from stamp_lib.metrics import energy_profile

    pk = energy_profile(K.forward(X))
    for T in [transforms.build(n) for n in ("identity", "dct", "wht", "dwt")]:
        assert torch.all(pk >= energy_profile(T.forward(X)) - 1e-10), T


def test_klt_deterministic_signs():
    X = torch.randn(10, 8, 4, dtype=torch.float64)
    assert torch.equal(transforms.KLT.fit(X).M, transforms.KLT.fit(X.clone()).M)


@settings(max_examples=40, deadline=None)
@given(s=st.integers(1, 70), d=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_property_roundtrip_any_length(s, d, seed):
    X = torch.randn(s, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for T in _all_for(s):
        assert torch.allclose(T.inverse(T.forward(X)), X, atol=1e-10)
        assert torch.allclose(T.forward(X), T.forward_dense(X), atol=1e-10)


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
    assert torch.allclose(T.inverse(T.forward(X)), X)


def test_autograd_flows_through_every_transform():
    X = torch.randn(16, 4, dtype=torch.float64, requires_grad=True)
    for T in _all_for(16) + [transforms.build("dwt", grid=(4, 4))]:
        (g,) = torch.autograd.grad(T.forward(X).pow(2).sum(), X)
        assert torch.allclose(g, 2 * X)  # orthogonal: d||LX||^2/dX = 2X


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
        assert torch.equal(Y1, Y1c) and torch.equal(X1, X1c), T
        assert torch.allclose(X1, X, atol=1e-4), T
    transforms.clear_workspace()
