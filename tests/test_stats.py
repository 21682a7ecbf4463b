"""The paired statistics against scipy, and the crossed (draws x units) interval's properties."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from stamp_lib.book.claims import judge
from stamp_lib.core import stats


def test_paired_difference_matches_scipy_ttest_rel():
    g = np.random.default_rng(0)
    a = g.normal(size=9)
    b = a + g.normal(0.3, 0.5, size=9)
    p = stats.paired_difference(a, b, better="higher")
    ref = sps.ttest_rel(b, a).confidence_interval(0.95)
    assert p["ci_lo"] == pytest.approx(ref.low, rel=1e-9)
    assert p["ci_hi"] == pytest.approx(ref.high, rel=1e-9)
    assert p["wins"] == int((b > a).sum())


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(0, 10_000))
def test_one_draw_is_the_paired_t_interval(n, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(1, n, generator=g), torch.randn(1, n, generator=g)
    c = stats.crossed_difference(a, b)
    p = stats.paired_difference(a[0], b[0])
    assert c["ci_lo"] == pytest.approx(p["ci_lo"]) and c["ci_hi"] == pytest.approx(p["ci_hi"])
    assert c["draws"] == 1 and c["units"] == n


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 5), st.integers(2, 10), st.integers(0, 10_000), st.floats(-3, 3))
def test_crossed_interval_shifts_with_the_data(nd, nu, seed, shift):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randn(nd, nu, generator=g, dtype=torch.float64) for _ in range(2))
    c0, c1 = stats.crossed_difference(a, b), stats.crossed_difference(a, b + shift)
    assert c1["mean"] == pytest.approx(c0["mean"] + shift, abs=1e-9)
    assert c1["ci_hi"] - c1["ci_lo"] == pytest.approx(c0["ci_hi"] - c0["ci_lo"], rel=1e-6, abs=1e-9)
    assert c0["ci_lo"] <= c0["mean"] <= c0["ci_hi"] and c0["df"] > 0


def test_crossed_interval_covers_near_its_level():
    """Monte Carlo: draw effects, unit effects and noise; the 95% interval of the mean difference
    must cover the true mean in about 95% of experiments (Satterthwaite is approximate: 0.90-0.99)."""
    g = torch.Generator().manual_seed(1)
    hits, n_exp = 0, 600
    for _ in range(n_exp):
        nd, nu = 3, 8
        d = 0.7 * torch.randn(nd, 1, generator=g) + 0.5 * torch.randn(1, nu, generator=g) \
            + 0.3 * torch.randn(nd, nu, generator=g)
        c = stats.crossed_difference(torch.zeros(nd, nu), d)
        hits += c["ci_lo"] <= 0.0 <= c["ci_hi"]
    assert 0.90 <= hits / n_exp <= 0.99


def test_the_draw_term_dominates_when_draws_differ():
    g = torch.Generator().manual_seed(2)
    d = torch.tensor([[-1.0], [0.0], [1.0]]) + 0.01 * torch.randn(3, 6, generator=g)
    c = stats.crossed_difference(torch.zeros(3, 6), d)
    assert c["var_draws"] > 100 * c["var_units"]
    p = stats.paired_difference(torch.zeros(18), d.flatten())  # pooling the cells as independent hides it
    assert c["ci_hi"] - c["ci_lo"] > 3 * (p["ci_hi"] - p["ci_lo"])


def test_crossed_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape|one shape"):
        stats.crossed_difference(torch.zeros(2, 3), torch.zeros(3, 2))


def test_judge_is_confirmed_only_when_every_interval_agrees():
    good = {"mean": -1.0, "ci_lo": -1.5, "ci_hi": -0.5}
    zero = {"mean": 0.01, "ci_lo": -0.1, "ci_hi": 0.12}
    bad = {"mean": 0.5, "ci_lo": 0.2, "ci_hi": 0.8}
    assert judge({"a": good, "b": good}, better="lower").status == "confirmed"
    j = judge({"a": good, "b": zero}, better="lower", unit=" nats")
    assert j.status == "partly confirmed" and "b +0.01 [-0.10, +0.12] nats" in j.reason
    assert judge({"a": bad, "b": zero}, better="lower").status == "not confirmed"
    assert judge({"a": bad}, better="higher").status == "confirmed"
    assert judge({"a": {"mean": 1.0, "ci_lo": math.nan, "ci_hi": math.nan}}, better="higher").status == "not confirmed"
    with pytest.raises(ValueError):
        judge({}, better="lower")
