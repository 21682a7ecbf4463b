"""Quantizers, bit allocation, Theorem 1 and metrics: properties (hypothesis) and errors."""

import itertools
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from stamp_lib.core import bounds, metrics, quant, transforms

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=64)


def matrices(max_s=24, max_d=12):
    return st.integers(1, max_s).flatmap(
        lambda s: st.integers(1, max_d).flatmap(
            lambda d: st.lists(finite, min_size=s * d, max_size=s * d).map(
                lambda v: torch.tensor(v, dtype=torch.float64).reshape(s, d)
            )
        )
    )


def _step(X, bits):
    b = torch.as_tensor(bits, dtype=torch.float64)
    return (X.amax(-1) - X.amin(-1)) / (2.0**b - 1)


@settings(max_examples=150, deadline=None)
@given(X=matrices(), bits=st.integers(2, 16))
def test_error_at_most_half_step(X, bits):
    Xq = quant.fake_quant(X, bits)
    err = (Xq - X).abs().amax(-1)
    assert torch.all(err <= _step(X, bits) / 2 * (1 + 1e-9) + 1e-12)
    # values stay inside the row's range and on the grid
    assert torch.all(Xq.amax(-1) <= X.amax(-1) + 1e-9) and torch.all(Xq.amin(-1) >= X.amin(-1) - 1e-9)
    n_levels = torch.unique(Xq[0]).numel()
    assert n_levels <= 2**bits


@settings(max_examples=100, deadline=None)
@given(X=matrices(), data=st.data())
def test_per_row_bits_equal_rowwise_quantization(X, data):
    s = X.shape[0]
    b = torch.tensor(data.draw(st.lists(st.integers(2, 16), min_size=s, max_size=s)))
    Xq = quant.fake_quant(X, b)
    # exact, although the batch differs: min/max are exact and every other step is an elementwise,
    # correctly rounded IEEE operation, so no value can depend on the other rows (and a tolerance
    # would not help: one ulp more can move a value to the next grid point)
    for i in range(s):
        assert torch.equal(Xq[i : i + 1], quant.fake_quant(X[i : i + 1], int(b[i])))


@settings(max_examples=60, deadline=None)
@given(X=matrices(), sym=st.booleans())
def test_16_bits_close_to_identity(X, sym):
    Xq = quant.fake_quant(X, 16, symmetric=sym)
    scale = X.abs().amax(-1, keepdim=True).clamp_min(1e-12)
    assert torch.all((Xq - X).abs() <= scale * 2.0 / (2**15 - 1) + 1e-12)


@settings(max_examples=120, deadline=None)
@given(
    X=matrices(max_s=32, max_d=8),
    name=st.sampled_from(["identity", "dct", "dwt", "dwt1", "wht", "klt", "random"]),
    data=st.data(),
    sym=st.booleans(),
)
def test_theorem1_bound_holds(X, name, data, sym):
    """Theorem 1: for ANY input, ANY orthogonal transform and ANY bit vector, error <= bound."""
    s = X.shape[0]
    if name == "wht":
        assume(s & (s - 1) == 0)
    if name == "klt":
        T = transforms.KLT.fit(X.unsqueeze(0) + 0.1 * torch.randn(3, *X.shape, dtype=X.dtype))
    elif name == "random":
        seed = data.draw(st.integers(0, 1000))
        Q, _ = torch.linalg.qr(torch.randn(s, s, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
        T = transforms.Dense(Q)
    elif name == "dwt1":
        assume(s > 1)
        T = transforms.build("dwt", levels=1)
    else:
        T = transforms.build(name)
    b = torch.tensor(data.draw(st.lists(st.integers(2, 10), min_size=s, max_size=s)))
    err = bounds.stamp_error(X, T, b, symmetric=sym)
    bnd = bounds.theorem1(X, T, b, symmetric=sym)
    assert err <= bnd * (1 + 1e-9) + 1e-9


def test_theorem1_batched_sums_over_batch():
    X = torch.randn(3, 16, 8, dtype=torch.float64)
    T = transforms.build("dct")
    b = quant.two_level_bits(16, 4, 8, 4)
    assert math.isclose(bounds.theorem1(X, T, b), sum(bounds.theorem1(x, T, b) for x in X))
    assert math.isclose(bounds.stamp_error(X, T, b), sum(bounds.stamp_error(x, T, b) for x in X))


def test_theorem1_formula_by_hand():
    X = torch.randn(8, 6, dtype=torch.float64)
    T = transforms.build("wht")
    b = torch.tensor([8, 8, 4, 4, 4, 4, 3, 3])
    L = T.matrix(8, torch.float64)
    by_hand = sum((6 / 2) * float((L[i] @ X).pow(2).sum()) / (2 ** int(b[i]) - 1) ** 2 for i in range(8))
    assert math.isclose(bounds.theorem1(X, T, b), by_hand, rel_tol=1e-12)


def test_block_bound_holds_and_uses_block_size():
    X = torch.randn(4, 32, 128, dtype=torch.float64)
    T = transforms.build("dwt")
    b = quant.two_level_bits(32, 4, 8, 4)
    err = bounds.stamp_error(X, T, b, block_size=64)
    bnd = bounds.theorem1(X, T, b, block_size=64)
    assert err <= bnd
    assert math.isclose(bnd * 2, bounds.theorem1(X, T, b))  # B=64 vs d=128


def test_nonorthogonal_transform_is_refused_by_theorem1():
    T = transforms.Dense(torch.tensor([[1.0, 5.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="orthogonal"):
        bounds.theorem1(torch.randn(2, 4), T, 4)
    bounds.theorem1(torch.randn(2, 4), T, 4, require_orthogonal=False)


def test_clipping_and_symmetric():
    X = torch.randn(16, 64, dtype=torch.float64)
    Xc = quant.fake_quant(X, 4, clip_ratio=0.5)
    assert torch.all(Xc.amax(-1) <= 0.5 * X.amax(-1) + 1e-12)
    Xs = quant.fake_quant(X, 4, symmetric=True)
    # restricted symmetric 4-bit grid: at most 15 levels, symmetric around 0
    step = X.abs().amax(-1, keepdim=True) / 7
    k = Xs / step
    assert torch.allclose(k, k.round(), atol=1e-9) and torch.all(k.abs() <= 7 + 1e-9)


def test_block_quantization_equals_reshaped_rows():
    X = torch.randn(2, 8, 128)
    a = quant.fake_quant(X, 4, block_size=64)
    b = quant.fake_quant(X.reshape(2, 8, 2, 64), 4).reshape(2, 8, 128)
    assert torch.equal(a, b)  # exact: elementwise operations on the same values (see above)


def test_integer_zero_point_option():
    X = torch.randn(32, 64, dtype=torch.float64) + 0.3
    Xq = quant.fake_quant(X, 4, round_zero_point=True)
    step = _step(X, 4).unsqueeze(-1)
    assert torch.all((Xq - X).abs() <= step + 1e-12)  # up to one step at the range ends
    zp_grid = Xq / step
    assert torch.allclose(zp_grid, zp_grid.round(), atol=1e-9)  # zero is on the grid


def test_constant_rows_exact():
    X = torch.ones(3, 5)
    assert torch.equal(quant.fake_quant(X, 2), X)
    assert torch.equal(quant.fake_quant(X, 2, symmetric=True), X)
    assert torch.equal(quant.fake_quant(torch.zeros(3, 5), 4, symmetric=True), torch.zeros(3, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_subnormal_ranges_are_kept_not_nan(monkeypatch, dtype, symmetric, fused):
    """A range so small that its step underflows to zero (hypothesis found [0, ..., 0, 5e-324] giving
    0/0 = NaN) is kept as it is, like a zero range, on both paths; small subnormal ranges stay
    finite and within half a step."""
    monkeypatch.setattr(quant, "_FUSED", fused)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    X = torch.tensor([[0.0] * 18 + [1.0], [1.0, 3.0, 7.0, 0.0] + [0.0] * 15], dtype=dtype) * tiny
    X = torch.cat([X, torch.randn(2, 19, dtype=dtype)])  # ordinary rows beside them
    for b in (2, 4, 8):
        Y = quant.fake_quant(X, b, symmetric=symmetric)
        assert torch.isfinite(Y).all()
        assert torch.equal(Y[0], X[0])  # step underflows: kept exactly
        assert (Y[1] - X[1]).abs().max() <= 4 * tiny


# --- bit allocation -------------------------------------------------------------------------
def test_two_level_bits():
    b = quant.two_level_bits(4096)
    assert b[:64].eq(8).all() and b[64:].eq(4).all()
    assert quant.average_bits(b) == 4.0625
    assert quant.bits_label(b) == "64x8+4"
    assert torch.equal(quant.bits_from_spec("64x8+4", 4096), b)


@settings(max_examples=40, deadline=None)
@given(
    e=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=9),
    avg=st.floats(2, 6),
)
def test_optimal_bits_is_the_exact_integer_optimum(e, avg):
    s = len(e)
    budget = round(avg * s)
    b = quant.optimal_bits(e, avg, min_bits=2, max_bits=8)
    assert int(b.sum()) == budget
    cost = lambda bb: sum(ei / (2.0**bi - 1) ** 2 for ei, bi in zip(e, bb))  # noqa: E731
    if s <= 5:  # brute force over every vector with the same total
        best = min(cost(c) for c in itertools.product(range(2, 9), repeat=s) if sum(c) == budget)
        assert cost(b.tolist()) <= best * (1 + 1e-12) + 1e-300


def test_optimal_bits_grow_with_log_energy():
    e = torch.tensor([4.0**k for k in range(8)])
    b = quant.optimal_bits(e, 5)
    assert torch.all(b[1:] >= b[:-1])
    c = quant.continuous_optimal_bits(e, 5.0)
    assert torch.allclose(c[1:] - c[:-1], torch.ones(7, dtype=torch.float64))  # log2 sqrt(4) = 1
    assert math.isclose(float(c.mean()), 5.0)


def test_optimal_beats_two_level_on_the_bound():
    g = torch.Generator().manual_seed(0)
    X = torch.cumsum(torch.randn(4, 256, 32, generator=g, dtype=torch.float64), dim=1)
    T = transforms.build("dct")
    two = quant.two_level_bits(256, 64, 8, 4)
    e = metrics.row_energy(T.forward(X))
    opt = quant.optimal_bits(e, quant.average_bits(two))
    assert int(opt.sum()) == int(two.sum())
    assert bounds.theorem1(X, T, opt) <= bounds.theorem1(X, T, two)


# --- metrics --------------------------------------------------------------------------------
def test_sqnr_and_energy_profile():
    r = torch.ones(10, 10, dtype=torch.float64)
    assert metrics.sqnr_db(r, r) == math.inf
    assert math.isclose(metrics.sqnr_db(r, 0.9 * r), 20.0)
    p = metrics.energy_profile(torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert torch.allclose(p, torch.tensor([0.9, 1.0, 1.0], dtype=torch.float64))
    assert metrics.energy_fraction(torch.tensor([[3.0], [1.0]]), 1) == 0.9
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.sqnr_db(torch.ones(2, 2), torch.ones(2, 3))


# --- bad input ------------------------------------------------------------------------------
def test_quant_errors_name_the_problem():
    X = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]"):
        quant.fake_quant(X, 1)
    with pytest.raises(ValueError, match=r"bits must be in \[2, 16\]"):
        quant.fake_quant(X, 17)
    with pytest.raises(ValueError, match="length 7 but X has s=8"):
        quant.fake_quant(X, torch.full((7,), 4))
    with pytest.raises(ValueError, match="1-D"):
        quant.fake_quant(X, torch.full((8, 1), 4))
    with pytest.raises(ValueError, match="NaN"):
        quant.fake_quant(torch.tensor([[float("nan"), 1.0]]), 4)
    with pytest.raises(ValueError, match="rank"):
        quant.fake_quant(torch.randn(5), 4)
    with pytest.raises(ValueError, match="clip_ratio"):
        quant.fake_quant(X, 4, clip_ratio=0)
    with pytest.raises(ValueError, match="multiple of block_size"):
        quant.fake_quant(X, 4, block_size=5)
    with pytest.raises(ValueError, match="integer"):
        quant.fake_quant(X, 4.5)
    with pytest.raises(ValueError, match="hp_tokens"):
        quant.two_level_bits(32, hp_tokens=64)
    with pytest.raises(ValueError, match="outside"):
        quant.optimal_bits(torch.ones(4), 20)
    with pytest.raises(ValueError, match="non-negative"):
        quant.optimal_bits(torch.tensor([1.0, -1.0]), 4)


# --- the fused per-call path ----------------------------------------------------------------
def _awkward_rows(dtype, s=24, d=32, seed=0):
    """Rows a quantizer can get wrong: constant, all zero, one spike, tiny, huge, negative."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3, s, d, generator=g, dtype=dtype) * torch.rand(3, s, 1, generator=g, dtype=dtype) * 10
    X[0, 0] = 1.5
    X[0, 1] = 0.0
    X[1, 2, 5] = 1e4
    X[1, 3] *= 1e-6
    X[2, 4] *= 1e5
    X[2, 5] = -X[2, 5].abs()
    X[2, 6, :8] = -2.0  # a constant block at block_size 8
    return X


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [None, 8])
def test_fused_fake_quant_equals_the_unfused_path(monkeypatch, dtype, symmetric, block):
    """The fused path (two reductions, in-place passes, no clamp and no where) against the
    unfused one (the grid, then seven fresh tensors), every width from 2 to 16 bits."""
    X = _awkward_rows(dtype)
    b = torch.arange(24).remainder(15).add(2).to(dtype).view(24, 1, 1)
    fused = quant._fake_quant(X, b, symmetric=symmetric, block_size=block)
    monkeypatch.setattr(quant, "_FUSED", False)
    unfused = quant._fake_quant(X, b, symmetric=symmetric, block_size=block)
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(fused, unfused, rtol=tol, atol=tol)
    assert torch.equal(fused[0, 0], X[0, 0]) and torch.equal(fused[0, 1], X[0, 1])  # zero range: kept
    # NaN propagates the same way on both paths
    Xn = X.clone()
    Xn[1, 7, 3] = float("nan")
    monkeypatch.setattr(quant, "_FUSED", True)
    fn = quant._fake_quant(Xn, b, symmetric=symmetric, block_size=block)
    monkeypatch.setattr(quant, "_FUSED", False)
    un = quant._fake_quant(Xn, b, symmetric=symmetric, block_size=block)
    torch.testing.assert_close(fn, un, rtol=tol, atol=tol, equal_nan=True)


@pytest.mark.parametrize("kw", [{}, {"symmetric": True}, {"block_size": 8}, {"clip_ratio": 0.9},
                                {"round_zero_point": True}])
def test_power_of_two_row_scales_ride_on_the_quantizer(kw):
    """``out_scale`` (powers of two per row) returns ``scale * Q(X)`` on every path, and ``inplace``
    works in X's memory with the same result."""
    X = _awkward_rows(torch.float32)
    b = torch.full((24, 1, 1), 5.0)
    sc = (2.0 ** -torch.arange(24).remainder(4)).view(24, 1)
    want = sc * quant._fake_quant(X, b, **kw)
    torch.testing.assert_close(quant._fake_quant(X, b, out_scale=sc, **kw), want, rtol=1e-6, atol=1e-6)
    Xc = X.clone()
    got = quant._fake_quant(Xc, b, out_scale=sc, inplace=True, **kw)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("grid, levels", [((16, 16), 3), ((8, 4), 2), ((6, 6), 1), ((5, 6), 1), ((12, 12), 3)])
@pytest.mark.parametrize("kw", [{}, {"symmetric": True}, {"block_size": 4}, {"clip_ratio": 0.9}])
def test_per_call_stamp_equals_the_public_operator(grid, levels, kw):
    """The per-call STaMP (``validate=False``: unscaled Haar butterflies with the row scales folded
    into the quantizer, a workspace, and with ``overwrite`` the caller's buffer) equals the public
    L^-1 Q(L X) computed step by step; results never alias the workspace."""
    T = transforms.build("dwt", grid=grid, levels=levels)
    s = grid[0] * grid[1]
    X = torch.randn(2, s, 8, generator=torch.Generator().manual_seed(s)) * 3
    bits = quant.two_level_bits(s, min(4, s), 8, 4)
    b = bits.float().view(s, 1, 1)
    want = T.inverse(quant.fake_quant(T.forward(X), bits, **kw))
    public = quant.stamp_fake_quant(X, T, bits, **kw)
    fast = quant.stamp_fake_quant(X, T, b, validate=False, **kw)
    fast_copy = fast.clone()
    Xc = X.clone()
    over = quant.stamp_fake_quant(Xc, T, b, validate=False, overwrite=True, **kw)
    for got in (public, fast, over):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    quant.stamp_fake_quant(torch.randn_like(X), T, b, validate=False, **kw)  # reuses the workspace
    assert torch.equal(fast, fast_copy)
    big = torch.randn(4, s, 1024)  # > 1 MiB: the workspace path
    r1 = quant.stamp_fake_quant(big, T, b, validate=False, **kw)
    r1c = r1.clone()
    quant.stamp_fake_quant(torch.randn_like(big), T, b, validate=False, **kw)
    assert torch.equal(r1, r1c)
