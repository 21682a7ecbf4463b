"""stamp_lib.methods: Hadamard rotations (QuaRot), SmoothQuant scales and GPTQ, against exact
integer arithmetic, NumPy, round-to-nearest and a naive (unblocked, explicit-inverse) GPTQ."""

import math

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
