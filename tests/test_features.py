"""stamp_lib.methods.features: every feature transform keeps a linear layer exact once its weight
is folded, inverts its forward, refuses what it cannot be, keeps half-precision dtypes, and the
Hadamard rotation's fast paths agree with its dense twin."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stamp_lib.core import hadamard
from stamp_lib.methods import features
from stamp_lib.methods.features import HadamardRotation, Rotation, Scale

ORDERS = [64, 96, 512, 576]  # Sylvester, Paley I (12 x 8), Sylvester, Paley II (36 x 16)
PROPS = settings(max_examples=25, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _orthogonal(d, seed=0):
    Q, Rq = torch.linalg.qr(torch.randn(d, d, generator=_gen(seed), dtype=torch.float64))
    return Q * torch.sign(torch.diagonal(Rq))  # a Haar-random orthogonal matrix


def _positive(d, seed=0):
    return torch.exp(torch.randn(d, generator=_gen(seed), dtype=torch.float64))  # spread over e^-3 .. e^3


def _transforms(d):
    """One of each kind at feature size d (d a Hadamard order)."""
    H = features.hadamard_rotation(d, seed=5)
    Hu = features.hadamard_rotation(d)
    Hk = features.hadamard_rotation(d, seed=5)
    Hk.matmul_max = 0  # the Kronecker path
    Hd = features.hadamard_rotation(d, seed=5)
    Hd.matmul_max = 10**9  # the dense (cached matrix) path
    return {"rotation": Rotation(_orthogonal(d)), "scale": Scale(_positive(d)), "hadamard": H,
            "hadamard-unseeded": Hu, "hadamard-kron": Hk, "hadamard-dense": Hd}


def _assert_layer_exact(T, d, seed=0, out=17):
    """(x R) @ fold_weight(W).T == x @ W.T for a random layer, float64."""
    g = _gen(seed)
    x = torch.randn(3, 11, d, generator=g, dtype=torch.float64)
    W = torch.randn(out, d, generator=g, dtype=torch.float64)
    ref = x @ W.T
    got = T.forward(x) @ T.fold_weight(W).T
    # float64 rounding of two products of length d: far below any quantization effect
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12 * math.sqrt(d) * float(ref.abs().max()))


# =============================================================================================
# construction
# =============================================================================================
def test_rotation_refuses_a_non_square_matrix():
    for R in (torch.randn(3, 4), torch.randn(4), torch.randn(2, 2, 2)):
        with pytest.raises(ValueError, match=r"^myrot: R must be a square \(d, d\) tensor, got torch.Size"):
            Rotation(R, name="myrot")
    with pytest.raises(ValueError, match="R must be a square"):
        Rotation([[1.0, 0.0], [0.0, 1.0]])


@pytest.mark.parametrize("how", ["scaled", "perturbed", "singular"])
def test_rotation_refuses_a_non_orthogonal_matrix(how):
    Q = _orthogonal(6)
    R = {"scaled": 2 * Q, "perturbed": Q + 1e-3 * torch.eye(6, dtype=torch.float64),
         "singular": torch.ones(6, 6, dtype=torch.float64)}[how]
    with pytest.raises(ValueError, match=r"^myrot: R is not orthogonal \(max \|R R\^T - I\| = [0-9.e+-]+\)$"):
        Rotation(R, name="myrot")
    Rotation(R, check=False)  # on request the check is skipped
    # within the documented tolerance (1e-4, float64) an orthogonal matrix in float32 is accepted
    Rotation(Q.float())
    Rotation(Q + 1e-6 * torch.eye(6, dtype=torch.float64))


@pytest.mark.parametrize("r,what", [([1.0, 0.0, 2.0], "zero"), ([1.0, -0.5, 2.0], "negative"),
                                    ([1.0, float("nan"), 2.0], "nan"), ([1.0, float("inf"), 2.0], "inf"),
                                    ([1.0, float("-inf"), 2.0], "-inf")])
def test_scale_refuses_non_positive_or_non_finite(r, what):
    with pytest.raises(ValueError, match=r"^sq: the scales must be finite and positive$"):
        Scale(torch.tensor(r), name="sq")


def test_scale_refuses_other_shapes():
    for r in (torch.ones(2, 3), torch.ones(0), torch.tensor(2.0)):
        with pytest.raises(ValueError, match=r"^sq: r must be a non-empty 1-D tensor, got shape"):
            Scale(r, name="sq")
    assert Scale([0.5, 2.0]).d == 2  # a list is taken as a tensor


# =============================================================================================
# the maps
# =============================================================================================
@pytest.mark.parametrize("kind", ["rotation", "scale", "hadamard", "hadamard-unseeded", "hadamard-kron",
                                  "hadamard-dense"])
@pytest.mark.parametrize("d", [64, 96])
def test_forward_inverse_round_trip_and_layer_exact(kind, d):
    T = _transforms(d)[kind]
    x = torch.randn(4, 7, d, generator=_gen(d), dtype=torch.float64)
    x0 = x.clone()
    y = T.forward(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert not torch.allclose(y, x)  # it does something
    torch.testing.assert_close(T.inverse(y), x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(T.forward(T.inverse(x)), x, rtol=1e-12, atol=1e-12)
    assert torch.equal(x, x0)  # the input is never modified
    _assert_layer_exact(T, d)
    # a single row and an empty batch keep their shapes
    assert T.forward(x[0, 0]).shape == (d,)
    assert T.forward(x[:0]).shape == (0, 7, d)


@pytest.mark.parametrize("n", ORDERS)
@pytest.mark.parametrize("seed", [None, 0, 11])
def test_hadamard_fold_weight_exact_on_both_paths(n, seed):
    assert hadamard.hadamard_plan(n).n == n  # an order with a construction
    fast, dense = HadamardRotation(n, seed=seed), HadamardRotation(n, seed=seed)
    fast.matmul_max, dense.matmul_max = 0, 10**9
    Rd = dense.R
    assert Rd.dtype == torch.float64 and Rd.shape == (n, n)
    torch.testing.assert_close(Rd @ Rd.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(fast.R, Rd, rtol=0, atol=0)  # one construction, whatever the path
    g = _gen(n)
    x = torch.randn(2, 9, n, generator=g, dtype=torch.float64)
    W = torch.randn(13, n, generator=g, dtype=torch.float64)
    for T in (fast, dense):
        torch.testing.assert_close(T.forward(x), x @ Rd, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(T.inverse(x), x @ Rd.T, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(T.fold_weight(W), W @ Rd, rtol=1e-12, atol=1e-12)
        _assert_layer_exact(T, n, seed=n)
    # a strided (transposed) input goes through both paths alike
    xt = torch.randn(n, 6, generator=g, dtype=torch.float64).T
    torch.testing.assert_close(fast.forward(xt), xt @ Rd, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense.forward(xt), xt @ Rd, rtol=1e-12, atol=1e-12)
    # float32 on both paths against the float64 result
    for T in (fast, dense):
        y = T.forward(x.float())
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), x @ Rd, rtol=1e-5, atol=1e-5)


def test_hadamard_seeds():
    a, b, c = (HadamardRotation(96, seed=s) for s in (3, 3, 4))
    torch.testing.assert_close(a.R, b.R, rtol=0, atol=0)  # a seed is reproducible
    assert not torch.equal(a.R, c.R)
    unsigned = HadamardRotation(96).R
    # a seed flips the signs of whole rows of the same Hadamard matrix
    ratio = a.R / unsigned
    assert bool((ratio.abs() == 1).all())
    assert bool((ratio == ratio[:, :1]).all())
    assert bool((ratio[:, 0] == 1).any()) and bool((ratio[:, 0] == -1).any())


@pytest.mark.parametrize("dt", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["rotation", "scale", "hadamard-kron", "hadamard-dense"])
def test_half_precision_comes_back_in_its_dtype(kind, dt):
    d = 96
    T = _transforms(d)[kind]
    x = torch.randn(5, d, generator=_gen(1), dtype=torch.float64).to(dt)
    W = torch.randn(7, d, generator=_gen(2), dtype=torch.float64).to(dt)
    xd, Wd = x.double(), W.double()
    ref = {"forward": T.forward(xd), "inverse": T.inverse(xd), "fold_weight": T.fold_weight(Wd)}
    for op, arg in (("forward", x), ("inverse", x), ("fold_weight", W)):
        out = getattr(T, op)(arg)
        assert out.dtype == dt and out.shape == arg.shape, (op, out.dtype)
        torch.testing.assert_close(out.double(), ref[op], rtol=2e-2, atol=2e-2 * float(ref[op].abs().max()))


@pytest.mark.parametrize("kind", ["rotation", "scale", "hadamard", "hadamard-kron"])
def test_a_wrong_feature_size_names_the_transform(kind):
    T = _transforms(64)[kind]
    T.name = f"my-{kind}"
    for op, what in (("forward", "x"), ("inverse", "y"), ("fold_weight", "W")):
        with pytest.raises(ValueError, match=rf"^my-{kind}: {what} has 48 features, the transform has d=64$"):
            getattr(T, op)(torch.randn(3, 48, dtype=torch.float64))


def test_hadamard_names_and_bad_orders():
    assert HadamardRotation(64).name == "hadamard64"
    assert HadamardRotation(64, seed=2).name == "hadamard64-s2"
    T = HadamardRotation(64, seed=2)
    with pytest.raises(ValueError, match=r"^hadamard64-s2: x has 32 features, the transform has d=64$"):
        T.forward(torch.randn(1, 32))
    with pytest.raises(ValueError, match="n=52"):
        HadamardRotation(52)
    with pytest.raises(TypeError, match="hadamard64-s2: expected a floating tensor"):
        T.forward(torch.ones(2, 64, dtype=torch.int32))


def test_assigning_a_new_matrix_or_scale_takes_effect():
    """The per-dtype conversions are cached; a new matrix (or scale vector) must not see the old one."""
    x = torch.randn(3, 8, generator=_gen(0), dtype=torch.float32)
    Q1, Q2 = _orthogonal(8, 1), _orthogonal(8, 2)
    T = Rotation(Q1)
    torch.testing.assert_close(T.forward(x), x @ Q1.float())
    T.R = Q2
    torch.testing.assert_close(T.forward(x), x @ Q2.float())
    torch.testing.assert_close(T.inverse(x), x @ Q2.float().T)
    S = Scale(torch.full((8,), 2.0))
    torch.testing.assert_close(S.forward(x), 2 * x)
    S.r = torch.full((8,), 4.0)
    torch.testing.assert_close(S.forward(x), 4 * x)
    torch.testing.assert_close(S.fold_weight(x), x / 4)


# =============================================================================================
# properties
# =============================================================================================
@PROPS
@given(n=st.sampled_from(hadamard.hadamard_orders(256)), seed=st.one_of(st.none(), st.integers(0, 2**31 - 1)),
       data_seed=st.integers(0, 2**16))
def test_property_hadamard_is_orthogonal_and_folds_exactly(n, seed, data_seed):
    T = HadamardRotation(n, seed=seed)
    Rd = T.R
    torch.testing.assert_close(Rd @ Rd.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    # +-1/sqrt(n) entries
    torch.testing.assert_close(Rd.abs(), torch.full((n, n), 1 / math.sqrt(n), dtype=torch.float64),
                               rtol=0, atol=1e-15)
    for mm in (0, 10**9) if n > 1 else (10**9,):  # Kronecker and dense paths (n = 1: see below)
        T.matmul_max = mm
        _assert_layer_exact(T, n, seed=data_seed, out=5)
        x = torch.randn(4, n, generator=_gen(data_seed), dtype=torch.float64)
        torch.testing.assert_close(T.forward(x), x @ Rd, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(T.inverse(T.forward(x)), x, rtol=1e-12, atol=1e-12)


def test_order_one_on_the_kronecker_path():
    for seed in (None, 3):
        T = HadamardRotation(1, seed=seed)
        T.matmul_max = 0
        x = torch.randn(4, 1, dtype=torch.float64)
        torch.testing.assert_close(T.forward(x), x @ T.R, rtol=0, atol=0)
        torch.testing.assert_close(T.inverse(T.forward(x)), x, rtol=0, atol=0)
        torch.testing.assert_close(T.fold_weight(x), x @ T.R, rtol=0, atol=0)


@PROPS
@given(d=st.integers(1, 40), seed=st.integers(0, 2**16), log_spread=st.floats(0.0, 6.0))
def test_property_rotation_and_scale_fold_exactly(d, seed, log_spread):
    R = Rotation(_orthogonal(d, seed))
    r = torch.exp(log_spread * torch.randn(d, generator=_gen(seed + 1), dtype=torch.float64))
    S = Scale(r)
    for T in (R, S):
        _assert_layer_exact(T, d, seed=seed, out=3)
        x = torch.randn(5, d, generator=_gen(seed + 2), dtype=torch.float64)
        torch.testing.assert_close(T.inverse(T.forward(x)), x, rtol=1e-12, atol=1e-12)
