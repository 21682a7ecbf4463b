"""stamp_lib.methods: Hadamard rotations (QuaRot), SmoothQuant scales and GPTQ, against exact
integer arithmetic, NumPy, round-to-nearest and a naive (unblocked, explicit-inverse) GPTQ."""

import math

import numpy as np
import pytest
import torch

from stamp_lib.core import hadamard, quant
from stamp_lib.methods import features, gptq, smoothquant

MODEL_SIZES = [576, 640, 1536, 2048, 3072, 4096, 8192, 14336]  # SmolLM2, Gemma-3-270M, Llama-3


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


# =============================================================================================
# Hadamard
# =============================================================================================
def test_every_small_order_is_exact_in_integers():
    orders = hadamard.hadamard_orders(200)
    assert len(orders) > 30
    for n in orders:
        H = hadamard.hadamard_matrix(n, torch.int64)
        assert H.shape == (n, n)
        assert bool((H.abs() == 1).all()), n
        assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.int64)), n


def test_orders_up_to_200_hold_the_paley_and_sylvester_orders():
    orders = set(hadamard.hadamard_orders(200))
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
    H = hadamard.hadamard_matrix(n, torch.int8)
    assert H.shape == (n, n)
    assert bool((H.abs() == 1).all())
    _freivalds(H, n)
    if n <= 1536:  # the full product, exactly (integer-valued float64)
        Hd = H.to(torch.float64)
        assert torch.equal(Hd @ Hd.T, n * torch.eye(n, dtype=torch.float64))


def test_freivalds_check_catches_a_flipped_sign():
    H = hadamard.hadamard_matrix(576, torch.int8).clone()
    H[100, 7] *= -1
    with pytest.raises(AssertionError):
        _freivalds(H, 576)


def test_plans_for_model_sizes():
    got = {n: (p.m, p.p, p.kind) for n in MODEL_SIZES for p in [hadamard.hadamard_plan(n)]}
    assert got[576] == (36, 16, "paley2")
    assert got[1536] == (12, 128, "paley1")
    assert got[640] == (20, 32, "paley1")
    assert got[14336] == (28, 512, "paley2")
    assert got[3072] == (12, 256, "paley1")
    for n in (2048, 4096, 8192):
        assert got[n] == (1, n, "sylvester")


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n", [4, 12, 20, 28, 36, 40, 48, 512, 576, 640, 1536, 3072])
@pytest.mark.parametrize("seed", [None, 7])
@pytest.mark.parametrize("path", ["auto", "kron"])
def test_fast_equals_dense(n, seed, path, monkeypatch):
    R = features.hadamard_rotation(n, seed=seed)
    if path == "kron":
        R.matmul_max = 0  # force the Kronecker path at every order
    kron_calls = []
    real_kron = features.kron_apply
    monkeypatch.setattr(features, "kron_apply",
                        lambda y, fs, *a: kron_calls.append(len(fs)) or real_kron(y, fs, *a))
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
    # the path asked for is the one taken: Kronecker products when forced, above 128 by default
    assert bool(kron_calls) == (path == "kron" or n > 128), (n, path, kron_calls)
    # the dense twin is D H / sqrt(n) with H from hadamard_matrix
    H = hadamard.hadamard_matrix(n)
    if seed is None:
        assert R.signs is None
        D = torch.ones(n, dtype=torch.float64)
    else:
        D = R.signs
        assert bool((D.abs() == 1).all()) and bool((D == 1).any()) and bool((D == -1).any())
    torch.testing.assert_close(Rd, D[:, None] * H / math.sqrt(n))
    # float32 fast path against the float64 dense result
    y32 = R.forward(x.float())
    assert y32.dtype == torch.float32
    assert _rel(y32.double(), x @ Rd) < 1e-6


def test_fast_equals_dense_14336():
    n = 14336
    R = features.hadamard_rotation(n)
    H = hadamard.hadamard_matrix(n, torch.int8)
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xH = sum(x[:, i:i + 2048] @ H[i:i + 2048].to(torch.float64) for i in range(0, n, 2048))
    xHt = torch.cat([x @ H[i:i + 2048].to(torch.float64).T for i in range(0, n, 2048)], dim=1)
    torch.testing.assert_close(R.forward(x), xH / math.sqrt(n))
    torch.testing.assert_close(R.inverse(x), xHt / math.sqrt(n))


@pytest.mark.parametrize("n", [12, 36, 640])
def test_rotation_is_orthogonal_and_inverse(n):
    R = features.hadamard_rotation(n, seed=1)
    Rd = R.matrix()
    torch.testing.assert_close(Rd @ Rd.T, torch.eye(n, dtype=torch.float64))
    x = torch.randn(6, n, dtype=torch.float64)
    torch.testing.assert_close(R.inverse(R.forward(x)), x)
    torch.testing.assert_close(R.forward(R.inverse(x)), x)
    assert not torch.allclose(R.forward(x), x)


@pytest.mark.parametrize("n", [28, 576, 640])
@pytest.mark.parametrize("seed", [None, 3])
def test_fold_weight_preserves_the_linear_layer(n, seed):
    R = features.hadamard_rotation(n, seed=seed)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, n, generator=g, dtype=torch.float64)
    W = torch.randn(33, n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(R.forward(x) @ R.fold_weight(W).T, x @ W.T)


def test_seeds_and_half_precision():
    a, b, c = (features.hadamard_rotation(40, seed=s) for s in (None, 1, 2))
    assert not torch.equal(b.signs, c.signs)
    torch.testing.assert_close(features.hadamard_rotation(40, seed=1).matrix(), b.matrix())
    x = torch.randn(4, 40, dtype=torch.float64)
    for dt in (torch.bfloat16, torch.float16):
        y = b.forward(x.to(dt))
        assert y.dtype == dt
        torch.testing.assert_close(y.double(), x.to(dt).double() @ b.matrix(), rtol=1e-2, atol=1e-2)
    assert "seed=None" in repr(a) and "paley1" in repr(a)


def test_orders_without_construction_raise_clear_errors():
    with pytest.raises(ValueError, match=r"n=6 .*multiples of 4"):
        hadamard.hadamard_matrix(6)
    with pytest.raises(ValueError, match=r"(?s)n=11008.*172 x 64: Paley I needs q=171 prime.*3\^2\*19") as e:
        features.hadamard_rotation(11008)
    assert "max_factor=None" in str(e.value) and "random orthogonal" in str(e.value)
    with pytest.raises(ValueError, match="n=52"):
        hadamard.hadamard_plan(52)
    # a construction with a huge dense factor exists for 11008 (Paley I, q = 5503): only on request
    p = hadamard.hadamard_plan(11008, max_factor=None)
    assert (p.m, p.p, p.kind, p.q) == (5504, 2, "paley1", 5503)
    for bad in (0, -4, 2.5, True, "12"):
        with pytest.raises(ValueError, match="positive int"):
            hadamard.hadamard_plan(bad)
    R = features.hadamard_rotation(12)
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
    s = smoothquant.smoothquant_scales(torch.tensor(a), torch.tensor(w, dtype=torch.float32), alpha)
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
    w = smoothquant.weight_input_absmax(W, W2)
    torch.testing.assert_close(w, torch.cat([W, W2]).abs().amax(0))
    T = smoothquant.smoothquant_transform(a, w, alpha)
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
        smoothquant.smoothquant_scales(bad, w)
    bad[2] = float("nan")
    with pytest.raises(ValueError, match=r"weight_absmax contains non-finite values \(1 NaN"):
        smoothquant.smoothquant_scales(a, bad)
    bad[2] = float("inf")
    with pytest.raises(ValueError, match="Inf"):
        smoothquant.smoothquant_scales(bad, w)
    with pytest.raises(ValueError, match="8 channels but weight_absmax has 9"):
        smoothquant.smoothquant_scales(a, torch.rand(9))
    with pytest.raises(ValueError, match="1-D"):
        smoothquant.smoothquant_scales(a.view(2, 4), w)
    with pytest.raises(ValueError, match="1-D"):
        smoothquant.smoothquant_scales(torch.zeros(0), torch.zeros(0))
    with pytest.raises(TypeError, match="torch.Tensor"):
        smoothquant.smoothquant_scales([1.0, 2.0], w)
    for alpha in (-0.1, 1.5, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match="alpha"):
            smoothquant.smoothquant_scales(a, w, alpha)
    with pytest.raises(ValueError, match="eps"):
        smoothquant.smoothquant_scales(a, w, eps=0.0)
    with pytest.raises(ValueError, match="weight 1 has 5 input features"):
        smoothquant.weight_input_absmax(torch.randn(3, 4), torch.randn(3, 5))
    with pytest.raises(ValueError, match="at least one"):
        smoothquant.weight_input_absmax()


# =============================================================================================
# GPTQ
# =============================================================================================
def _correlated(n, d, seed):
    """Inputs X = Z A: a random mixing A makes H = X^T X far from diagonal (calibration and
    held-out sets share A)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    A += 0.3 * torch.eye(d, dtype=torch.float64)
    Z = torch.randn(2 * n, d, generator=g, dtype=torch.float64)
    X = Z @ A
    return X[:n], X[n:]


def _output_error(X, W, Wq):
    return float(((X @ (W - Wq).T) ** 2).sum())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [None, 16, 32])
@pytest.mark.parametrize("bits", [3, 4])
def test_identity_hessian_is_round_to_nearest(symmetric, group_size, bits):
    g = torch.Generator().manual_seed(bits)
    W = torch.randn(24, 64, generator=g, dtype=torch.float64)
    W[3] = 0.5  # a constant row (zero range: kept)
    ref = quant.fake_quant(W, bits, symmetric=symmetric, block_size=group_size)
    eye = torch.eye(64, dtype=torch.float64)
    for kw in (dict(damp=0.0), dict(damp=0.01), dict(damp=0.0, block_size=5), dict(act_order=True),
               dict(static_groups=True)):
        Q = gptq.gptq_quantize(W, eye, bits, group_size=group_size, symmetric=symmetric, **kw)
        torch.testing.assert_close(Q, ref, rtol=0, atol=1e-12, msg=f"{kw}")


def test_identity_hessian_is_round_to_nearest_clip_and_row_bits():
    W = torch.randn(16, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W[5] = -0.25
    eye = torch.eye(32, dtype=torch.float64)
    bits = torch.arange(16) % 3 + 2
    for sym in (True, False):
        ref = quant.fake_quant(W, bits, symmetric=sym, clip_ratio=0.8, block_size=8)
        Q = gptq.gptq_quantize(W, eye, bits, symmetric=sym, clip_ratio=0.8, group_size=8, damp=0.0)
        torch.testing.assert_close(Q, ref, rtol=0, atol=1e-12)


def _naive_gptq(W, H, bits, symmetric, damp):
    """Column-by-column optimal brain quantization with the explicit inverse Hessian of the
    remaining columns (Frantar et al. 2022/2023, eq. for OBQ), per-row grid of the original W."""
    W = W.clone()
    H = H.clone()
    H.diagonal().add_(damp * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    grid = quant.minmax_grid(W, bits, symmetric)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        q = quant.round_to_grid(W[:, j].view(-1, 1, 1), grid).view(-1)
        Q[:, j] = q
        d = Hinv[j, j]
        W[:, j:] -= ((W[:, j] - q) / d)[:, None] * Hinv[j, j:][None, :]
        Hinv = Hinv - Hinv[:, j:j + 1] @ Hinv[j:j + 1, :] / d  # eliminate column j
    return Q


@pytest.mark.parametrize("symmetric", [True, False])
def test_matches_naive_obq_with_explicit_inverse(symmetric):
    X, _ = _correlated(512, 48, seed=3)
    W = torch.randn(20, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    H = X.T @ X
    ref = _naive_gptq(W, H, 4, symmetric, damp=0.01)
    for bs in (128, 16, 1):
        Q = gptq.gptq_quantize(W, H, 4, symmetric=symmetric, damp=0.01, block_size=bs)
        torch.testing.assert_close(Q, ref, rtol=0, atol=1e-9, msg=f"block_size={bs}")
    assert not torch.allclose(ref, quant.fake_quant(W, 4, symmetric=symmetric))


GPTQ_CASES = [  # (out, in, bits, symmetric, group_size, act_order)
    (64, 128, 4, True, None, False),
    (64, 128, 3, False, None, True),
    (48, 96, 4, False, 32, False),
    (32, 256, 3, True, 64, True),
]


@pytest.mark.parametrize("out_f,in_f,bits,symmetric,group_size,act_order", GPTQ_CASES)
def test_gptq_beats_rtn_on_held_out_correlated_inputs(out_f, in_f, bits, symmetric, group_size, act_order):
    Xc, Xt = _correlated(8 * in_f, in_f, seed=in_f)
    W = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(out_f), dtype=torch.float64)
    acc = gptq.hessian_accumulator(in_f)
    for chunk in Xc.split(300):
        acc.add(chunk)
    Q = gptq.gptq_quantize(W, acc.H, bits, symmetric=symmetric, group_size=group_size, act_order=act_order)
    rtn = quant.fake_quant(W, bits, symmetric=symmetric, block_size=group_size)
    ratio = _output_error(Xt, W, Q) / _output_error(Xt, W, rtn)
    print(f"GPTQ/RTN held-out output error: W {out_f}x{in_f}, {bits} bits, sym={symmetric}, "
          f"group={group_size}, act_order={act_order}: {ratio:.3f}")
    assert ratio < 0.75
    # float32 arithmetic gives the same quality
    Q32 = gptq.gptq_quantize(W.float(), acc.H, bits, symmetric=symmetric, group_size=group_size,
                                act_order=act_order, compute_dtype=torch.float32)
    assert Q32.dtype == torch.float32
    assert _output_error(Xt, W, Q32.double()) / _output_error(Xt, W, rtn) < 0.75


def _assert_on_grid(Q, grid, group):
    Qb = Q.unflatten(-1, (Q.shape[-1] // group, group))
    k = (Qb - grid.lo) / grid.step
    k = torch.where(grid.exact, torch.zeros_like(k), k)
    torch.testing.assert_close(k, k.round(), rtol=0, atol=1e-6)
    assert bool(((k.round() >= grid.qmin) & (k.round() <= grid.qmax)).all())
    torch.testing.assert_close(quant.round_to_grid(Qb, grid), Qb, rtol=0, atol=1e-12)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_every_value_on_the_rtn_grid_of_its_row(symmetric, act_order):
    X, _ = _correlated(600, 64, seed=5)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    Q, grid = gptq.gptq_quantize(W, X.T @ X, 3, symmetric=symmetric, act_order=act_order, return_grid=True)
    rtn_grid = quant.minmax_grid(W, 3, symmetric)
    for a, b in zip(grid, rtn_grid):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_on_grid(Q, rtn_grid, 64)
    assert not torch.allclose(Q, quant.fake_quant(W, 3, symmetric=symmetric))


@pytest.mark.parametrize("symmetric", [True, False])
def test_group_grids_come_from_updated_weights(symmetric):
    X, _ = _correlated(600, 96, seed=6)
    W = torch.randn(16, 96, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    H = X.T @ X
    Q, grid = gptq.gptq_quantize(W, H, 4, symmetric=symmetric, group_size=32, return_grid=True)
    _assert_on_grid(Q, grid, 32)
    static = quant.minmax_grid(W, 4, symmetric, block_size=32)
    # the first group sees the original weights; later groups see the updated ones
    torch.testing.assert_close(grid.step[:, :1], static.step[:, :1], rtol=0, atol=0)
    assert not torch.allclose(grid.step[:, 1:], static.step[:, 1:])
    # the block size only moves rounding: same result with blocks of 5 (shrunk to 4) and 48 (-> 32)
    for bs in (5, 48, 200):
        Qb = gptq.gptq_quantize(W, H, 4, symmetric=symmetric, group_size=32, block_size=bs)
        torch.testing.assert_close(Qb, Q, rtol=0, atol=1e-9)
    # act_order with groups: static groups from the original W
    Qa, grid_a = gptq.gptq_quantize(W, H, 4, symmetric=symmetric, group_size=32, act_order=True,
                                       return_grid=True)
    for a, b in zip(grid_a, static):
        torch.testing.assert_close(a.expand_as(b) if a.shape != b.shape else a, b, rtol=0, atol=0)
    _assert_on_grid(Qa, static, 32)


def test_dead_inputs():
    X, _ = _correlated(400, 40, seed=8)
    j = 11
    X[:, j] = 0.0  # an input that is always zero
    g = torch.Generator().manual_seed(9)
    W = torch.randn(12, 40, generator=g, dtype=torch.float64)
    W[:, j] = 0.1 * torch.randn(12, generator=g, dtype=torch.float64)
    keep = [k for k in range(40) if k != j]
    assert bool((W[:, j] < W[:, keep].amax(1)).all() and (W[:, j] > W[:, keep].amin(1)).all())
    H = X.T @ X
    Q = gptq.gptq_quantize(W, H, 4, damp=0.0, block_size=16)
    # the other columns are GPTQ of the problem without input j (same row grids)
    Qr = gptq.gptq_quantize(W[:, keep], H[keep][:, keep], 4, damp=0.0, block_size=16)
    torch.testing.assert_close(Q[:, keep], Qr, rtol=0, atol=1e-9)
    # the dead column is the weight zeroed, then rounded on the row grid
    grid = quant.minmax_grid(W, 4, True)
    zero_on_grid = quant.round_to_grid(torch.zeros(12, 1, 1, dtype=torch.float64), grid).view(12)
    torch.testing.assert_close(Q[:, j], zero_on_grid)


def test_dtypes_and_devices_of_the_result():
    X, _ = _correlated(300, 32, seed=1)
    H = (X.T @ X).float()
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        W = torch.randn(8, 32).to(dt)
        Q = gptq.gptq_quantize(W, H, 4)
        assert Q.dtype == dt and Q.shape == W.shape and Q.device == W.device


def test_gptq_bad_inputs():
    W = torch.randn(8, 32, dtype=torch.float64)
    H = torch.eye(32, dtype=torch.float64)
    with pytest.raises(ValueError, match="W must be a floating"):
        gptq.gptq_quantize(W[0], H)
    with pytest.raises(ValueError, match="W must be a floating"):
        gptq.gptq_quantize(W.long(), H)
    with pytest.raises(ValueError, match=r"H must be an \(in, in\) = \(32, 32\)"):
        gptq.gptq_quantize(W, torch.eye(31))
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="W contains non-finite"):
        gptq.gptq_quantize(Wn, H)
    with pytest.raises(ValueError, match="not a multiple of group_size=5"):
        gptq.gptq_quantize(W, H, group_size=5)
    Ha = H.clone()
    Ha[0, 1] = 0.5
    with pytest.raises(ValueError, match="not symmetric"):
        gptq.gptq_quantize(W, Ha)
    with pytest.raises(ValueError, match="damp"):
        gptq.gptq_quantize(W, H, damp=-0.1)
    with pytest.raises(ValueError, match="block_size"):
        gptq.gptq_quantize(W, H, block_size=0)
    with pytest.raises(ValueError, match="compute_dtype"):
        gptq.gptq_quantize(W, H, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="bits must be in"):
        gptq.gptq_quantize(W, H, bits=1)
    indefinite = 2 * torch.ones(32, 32, dtype=torch.float64) - H  # diagonal 1, eigenvalues 63 and -1
    with pytest.raises(ValueError, match="not positive definite.*increase damp"):
        gptq.gptq_quantize(W, indefinite, damp=0.0)


# =============================================================================================
# Hessian accumulator
# =============================================================================================
def test_hessian_accumulator_matches_concatenated_gram():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(2, 5, 16, generator=g), torch.randn(7, 16, generator=g),
             torch.randn(3, 1, 4, 16, generator=g)]
    acc = gptq.HessianAccumulator()
    for p in parts:
        acc.add(p)
    X = torch.cat([p.reshape(-1, 16) for p in parts]).double()
    assert acc.count == X.shape[0] == 29
    assert acc.H.dtype == torch.float64
    torch.testing.assert_close(acc.H, X.T @ X / 29)
    # the lower-case name the model layer calls accumulates the same (with or without a size given)
    for made in (gptq.hessian_accumulator(), gptq.hessian_accumulator(16)):
        for p in parts:
            made.add(p)
        assert made.count == 29
        torch.testing.assert_close(made.H, acc.H, rtol=0, atol=0)


def test_hessian_accumulator_errors():
    acc = gptq.hessian_accumulator(8)
    with pytest.raises(ValueError, match="no samples"):
        _ = acc.H
    with pytest.raises(ValueError, match="6 features, the accumulator has d=8"):
        acc.add(torch.randn(3, 6))
    with pytest.raises(ValueError, match="floating"):
        acc.add(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="non-finite"):
        acc.add(torch.full((2, 8), float("inf")))
    with pytest.raises(ValueError, match="positive int"):
        gptq.HessianAccumulator(0)
