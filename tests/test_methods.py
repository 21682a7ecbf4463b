"""stamp_lib.methods: Hadamard rotations (QuaRot), SmoothQuant scales and GPTQ, against exact
integer arithmetic, NumPy, round-to-nearest and a naive (unblocked, explicit-inverse) GPTQ."""

import math

import numpy as np
import pytest
import torch

from stamp_lib import features, methods

MODEL_SIZES = [576, 640, 1536, 2048, 3072, 4096, 8192, 14336]  # SmolLM2, Gemma-3-270M, Llama-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


# =============================================================================================
# Hadamard
# =============================================================================================
def test_every_small_order_is_exact_in_integers():
    orders = methods.hadamard_orders(200)
    assert len(orders) > 30
    for n in orders:
        H = methods.hadamard_matrix(n, torch.int64)
        assert H.shape == (n, n)
        assert bool((H.abs() == 1).all()), n
        assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.int64)), n


def test_orders_up_to_200_hold_the_paley_and_sylvester_orders():
    orders = set(methods.hadamard_orders(200))
    # Paley I (q = 11, 19, 23, 31, 43, 47, 59, 67, 71, 79, 83), Paley II (q = 13, 17, 29, 37, 53),
    # powers of two, and 40 = 20 x 2
    for n in [1, 2, 4, 8, 12, 20, 24, 28, 32, 36, 40, 44, 48, 60, 68, 72, 76, 80, 84, 108, 128]:
        assert n in orders, n
    # 52 (q = 25, 51), 92, 100 (q = 49, 99), 172 (q = 171, 85) need prime powers or other constructions
    for n in [3, 6, 10, 52, 92, 100, 172]:
        assert n not in orders, n


def _freivalds(H: torch.Tensor, n: int, k: int = 8) -> None:
    """H @ H.T == n I checked exactly on k random integer vectors (float64 sums of integers below
    2^53 are exact); a wrong H passes with probability <= 7^-k. H is int8, used in row blocks."""
    g = torch.Generator().manual_seed(n)
    V = torch.randint(-3, 4, (n, k), generator=g).to(torch.float64)
    HtV = torch.zeros(n, k, dtype=torch.float64)
    for i in range(0, n, 2048):
        HtV += H[i:i + 2048].to(torch.float64).T @ V[i:i + 2048]
    HHtV = torch.cat([H[i:i + 2048].to(torch.float64) @ HtV for i in range(0, n, 2048)])
    assert torch.equal(HHtV, n * V)


@pytest.mark.parametrize("n", MODEL_SIZES)
def test_model_sizes_are_hadamard_exactly(n):
    H = methods.hadamard_matrix(n, torch.int8)
    assert H.shape == (n, n)
    assert bool((H.abs() == 1).all())
    _freivalds(H, n)
    if n <= 1536:  # the full product, exactly (integer-valued float64)
        Hd = H.to(torch.float64)
        assert torch.equal(Hd @ Hd.T, n * torch.eye(n, dtype=torch.float64))


def test_freivalds_check_catches_a_flipped_sign():
    H = methods.hadamard_matrix(576, torch.int8).clone()
    H[100, 7] *= -1
    with pytest.raises(AssertionError):
        _freivalds(H, 576)


def test_plans_for_model_sizes():
    got = {n: (p.m, p.p, p.kind) for n in MODEL_SIZES for p in [methods.hadamard_plan(n)]}
    assert got[576] == (36, 16, "paley2")
    assert got[1536] == (12, 128, "paley1")
    assert got[640] == (20, 32, "paley1")
    assert got[14336] == (28, 512, "paley2")
    assert got[3072] == (12, 256, "paley1")
    for n in (2048, 4096, 8192):
        assert got[n] == (1, n, "sylvester")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [4, 12, 20, 28, 36, 40, 48, 576, 640, 1536, 3072])
@pytest.mark.parametrize("seed", [None, 7])
def test_fast_equals_dense(n, seed):
    R = methods.hadamard_rotation(n, seed=seed)
    assert isinstance(R, features.Rotation) and R.d == n
    g = torch.Generator().manual_seed(n)
    x = torch.randn(3, 5, n, generator=g, dtype=torch.float64)
    W = torch.randn(7, n, generator=g, dtype=torch.float64)
    Rd = R.matrix()
    torch.testing.assert_close(R.forward(x), x @ Rd)
    torch.testing.assert_close(R.inverse(x), x @ Rd.T)
    torch.testing.assert_close(R.fold_weight(W), W @ Rd)
    torch.testing.assert_close(R.forward(x), R.forward_dense(x))
    torch.testing.assert_close(R.inverse(x), R.inverse_dense(x))
    torch.testing.assert_close(R.fold_weight(W), R.fold_weight_dense(W))
    # the dense twin is D H / sqrt(n) with H from hadamard_matrix
    H = methods.hadamard_matrix(n)
    D = torch.ones(n, dtype=torch.float64) if seed is None else R.signs
    assert bool((D.abs() == 1).all())
    torch.testing.assert_close(Rd, D[:, None] * H / math.sqrt(n))
    # float32 fast path against the float64 dense result
    y32 = R.forward(x.float())
    assert y32.dtype == torch.float32
    assert _rel(y32.double(), x @ Rd) < 1e-6


def test_fast_equals_dense_14336():
    n = 14336
    R = methods.hadamard_rotation(n)
    H = methods.hadamard_matrix(n, torch.int8)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xH = sum(x[:, i:i + 2048] @ H[i:i + 2048].to(torch.float64) for i in range(0, n, 2048))
    xHt = torch.cat([x @ H[i:i + 2048].to(torch.float64).T for i in range(0, n, 2048)], dim=1)
    torch.testing.assert_close(R.forward(x), xH / math.sqrt(n))
    torch.testing.assert_close(R.inverse(x), xHt / math.sqrt(n))


@pytest.mark.parametrize("n", [12, 36, 640])
def test_rotation_is_orthogonal_and_inverse(n):
    R = methods.hadamard_rotation(n, seed=1)
    Rd = R.matrix()
    torch.testing.assert_close(Rd @ Rd.T, torch.eye(n, dtype=torch.float64))
    x = torch.randn(6, n, dtype=torch.float64)
    torch.testing.assert_close(R.inverse(R.forward(x)), x)
    torch.testing.assert_close(R.forward(R.inverse(x)), x)
    assert not torch.allclose(R.forward(x), x)


@pytest.mark.parametrize("n", [28, 576, 640])
@pytest.mark.parametrize("seed", [None, 3])
def test_fold_weight_preserves_the_linear_layer(n, seed):
    R = methods.hadamard_rotation(n, seed=seed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, n, generator=g, dtype=torch.float64)
    W = torch.randn(33, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(R.forward(x) @ R.fold_weight(W).T, x @ W.T)


def test_seeds_and_half_precision():
    a, b, c = (methods.hadamard_rotation(40, seed=s) for s in (None, 1, 2))
    assert not torch.equal(b.signs, c.signs)
    torch.testing.assert_close(methods.hadamard_rotation(40, seed=1).matrix(), b.matrix())
    x = torch.randn(4, 40, dtype=torch.float64)
    for dt in (torch.bfloat16, torch.float16):
        y = b.forward(x.to(dt))
        assert y.dtype == dt
        torch.testing.assert_close(y.double(), x.to(dt).double() @ b.matrix(), rtol=1e-2, atol=1e-2)
    assert "seed=None" in repr(a) and "paley1" in repr(a)


def test_orders_without_construction_raise_clear_errors():
    with pytest.raises(ValueError, match=r"n=6 .*multiples of 4"):
        methods.hadamard_matrix(6)
    with pytest.raises(ValueError, match=r"(?s)n=11008.*172 x 64: Paley I needs q=171 prime.*3\^2\*19") as e:
        methods.hadamard_rotation(11008)
    assert "max_factor=None" in str(e.value) and "random orthogonal" in str(e.value)
    with pytest.raises(ValueError, match="n=52"):
        methods.hadamard_plan(52)
    # a construction with a huge dense factor exists for 11008 (Paley I, q = 5503): only on request
    p = methods.hadamard_plan(11008, max_factor=None)
    assert (p.m, p.p, p.kind, p.q) == (5504, 2, "paley1", 5503)
    for bad in (0, -4, 2.5, True, "12"):
        with pytest.raises(ValueError, match="positive int"):
            methods.hadamard_plan(bad)
    R = methods.hadamard_rotation(12)
    with pytest.raises(ValueError, match="d=12"):
        R.forward(torch.randn(3, 16))
    with pytest.raises(TypeError, match="floating"):
        R.forward(torch.ones(3, 12, dtype=torch.long))


# =============================================================================================
# SmoothQuant
# =============================================================================================
@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.85, 1.0])
def test_smoothquant_scales_match_numpy(alpha):
    rng = np.random.default_rng(0)
    a = np.abs(rng.standard_cauchy(64))
    w = np.abs(rng.normal(size=64)) * 0.1
    a[3], w[5], a[7], w[9] = 0.0, 0.0, 1e-9, 1e-8  # a dead channel, an empty weight column, tiny values
    s = methods.smoothquant_scales(torch.tensor(a), torch.tensor(w, dtype=torch.float32), alpha)
    eps = 1e-5
    w32 = w.astype(np.float32).astype(np.float64)  # the value the float32 tensor holds
    ref = np.maximum(a, eps) ** alpha / np.maximum(w32, eps) ** (1 - alpha)
    ref[(a == 0) | (w == 0)] = 1.0
    assert s.dtype == torch.float64 and s.shape == (64,)
    np.testing.assert_allclose(s.numpy(), ref, rtol=1e-12)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert s[3] == 1 and s[5] == 1


def _outlier_activations(n=512, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    X[:, [2, 17, 30]] *= 40.0  # outlier channels, as in LLM activations
    W = torch.randn(24, d, generator=g, dtype=torch.float64) * 0.05
    return X, W


@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_smoothquant_equalizes_ranges(alpha):
    X, W = _outlier_activations()
    W2 = torch.randn(10, X.shape[1], dtype=torch.float64)
    a = X.abs().amax(0)
    w = methods.weight_input_absmax(W, W2)
    torch.testing.assert_close(w, torch.cat([W, W2]).abs().amax(0))
    T = methods.smoothquant_transform(a, w, alpha)
    assert isinstance(T, features.Scale)
    Xs, Ws, W2s = T.forward(X), T.fold_weight(W), T.fold_weight(W2)
    # the layer is unchanged
    torch.testing.assert_close(Xs @ Ws.T, X @ W.T)
    xmax = Xs.abs().amax(0)
    wmax = torch.cat([Ws, W2s]).abs().amax(0)
    # max_i |X_ij / s_j| = (a_j w_j)^(1 - alpha) and max_i |W_ij s_j| = (a_j w_j)^alpha
    torch.testing.assert_close(xmax, (a * w) ** (1 - alpha))
    torch.testing.assert_close(wmax, (a * w) ** alpha)
    if alpha == 0.5:
        torch.testing.assert_close(xmax, wmax)
    # smoothing shrinks the activation outliers
    assert float(xmax.max() / xmax.median()) < float(a.max() / a.median())


def test_smoothquant_bad_inputs():
    a = torch.rand(8) + 0.1
    w = torch.rand(8) + 0.1
    bad = a.clone()
    bad[2] = -1.0
    with pytest.raises(ValueError, match="act_absmax must be non-negative"):
        methods.smoothquant_scales(bad, w)
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"weight_absmax contains non-finite values \(1 NaN"):
        methods.smoothquant_scales(a, bad)
    bad[2] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        methods.smoothquant_scales(bad, w)
    with pytest.raises(ValueError, match="8 channels but weight_absmax has 9"):
        methods.smoothquant_scales(a, torch.rand(9))
    with pytest.raises(ValueError, match="1-D"):
        methods.smoothquant_scales(a.view(2, 4), w)
    with pytest.raises(ValueError, match="1-D"):
        methods.smoothquant_scales(torch.zeros(0), torch.zeros(0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        methods.smoothquant_scales([1.0, 2.0], w)
    for alpha in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            methods.smoothquant_scales(a, w, alpha)
    with pytest.raises(ValueError, match="eps"):
        methods.smoothquant_scales(a, w, eps=0.0)
    with pytest.raises(ValueError, match="weight 1 has 5 input features"):
        methods.weight_input_absmax(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least one"):
        methods.weight_input_absmax()
