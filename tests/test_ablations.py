"""Chapter 5's ablation machinery (stamp_lib.experiments.ablations) against the core it builds on:
errors equal :func:`stamp_lib.core.bounds.stamp_error` window by window, the SQNR aggregates what
it says, the allocations spend the same bits and order as Theorem 1's bound says they must."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quarot import tiny

from stamp_lib.core import bounds, metrics, quant, transforms
from stamp_lib.experiments import ablations as A

pytestmark = pytest.mark.usefixtures("one_thread")

S, D, N = 16, 6, 3


def _acts(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, 1, D, generator=g)  # a mean token shared by the window's tokens
    return {"model.layers.0.self_attn.q_proj": base + 0.2 * torch.randn(N, S, D, generator=g),
            "model.layers.0.mlp.down_proj": torch.randn(N, S, D, generator=g).cumsum(1)}


def test_sweep_errors_are_the_stamp_error_of_every_window():
    acts = _acts()
    ts = {"identity": transforms.build("identity"), "dwt": transforms.build("dwt"),
          "klt": A.klt_per_layer(_acts(1))}
    bits = A.hp_bits(S, (0, 1, 4)) | {"ranked": torch.tensor([4] * 12 + [8] * 4)}
    sw = A.sweep(acts, ts, bits)
    klt = A.klt_per_layer(_acts(1))
    for name, X in acts.items():
        for k in ts:
            T = klt(name) if k == "klt" else ts[k]
            for b, v in bits.items():
                ref = [bounds.stamp_error(x, T, v) for x in X]
                torch.testing.assert_close(sw.err[name, k, b], torch.tensor(ref, dtype=torch.float64),
                                           rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(sw.signal[name], X.double().pow(2).sum((1, 2)))
    # "4x8+4" (first rows) and "ranked" (last rows) share a count of 8-bit rows but not the rows
    assert not torch.allclose(sw.err[name, "identity", "4"], sw.err[name, "identity", "ranked"])
    # the aggregate: sum of signals over sum of errors, per window
    q = sw.sqnr("dwt", "4", "q/k/v")
    n = "model.layers.0.self_attn.q_proj"
    ref = torch.tensor([metrics.db(float(a), float(b)) for a, b in zip(sw.signal[n], sw.err[n, "dwt", "4"])])
    torch.testing.assert_close(q, ref.double())
    both = sw.sqnr("dwt", "4")
    assert both.shape == (N,)
    g = sw.gain("dwt", "4", ("identity", "4"))
    assert g["n"] == N and g["mean"] == pytest.approx(float((both - sw.sqnr("identity", "4")).mean()))
    with pytest.raises(KeyError, match="no layer of type"):
        sw.sqnr("dwt", "4", "o")


def test_mean_share_is_large_where_the_mean_token_is_all_the_structure():
    acts = {k: v for k, v in _acts().items() if "q_proj" in k}
    ts = {"identity": transforms.build("identity"), "mean": transforms.build("mean"),
          "dwt": transforms.build("dwt")}
    sw = A.sweep(acts, ts, A.hp_bits(S, (1,)))
    mean, dwt = (sw.gain(t, "1", ("identity", "1")) for t in ("mean", "dwt"))
    assert mean["mean"] / dwt["mean"] > 0.7 and mean["n"] == N


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1e-6, 1e6), min_size=8, max_size=40), st.integers(1, 7))
def test_allocations_spend_the_same_bits_and_order_by_the_bound(energy, k):
    e = torch.tensor(energy, dtype=torch.float64)
    k = min(k, e.numel())
    al = A.allocations(e, k)
    totals = {name: int(v.sum()) for name, v in al.items()}
    assert len(set(totals.values())) == 1
    bound = {name: float((e / (2.0 ** v.double() - 1) ** 2).sum()) for name, v in al.items()}
    assert bound["optimal"] <= bound["energy-ranked"] * (1 + 1e-12)
    assert bound["energy-ranked"] <= bound["two-level"] * (1 + 1e-12)
    assert int(al["optimal"].min()) >= 2 and int(al["optimal"].max()) <= 8


def test_hp_bits_and_bad_input():
    b = A.hp_bits(8, (0, 2, 8))
    assert b["0"].tolist() == [4] * 8 and b["2"].tolist() == [8, 8] + [4] * 6 and b["8"].tolist() == [8] * 8
    assert quant.bits_label(b["2"]) == "2x8+4"
    with pytest.raises(ValueError, match="high-precision rows must be in"):
        A.hp_bits(8, (9,))
    with pytest.raises(ValueError, match="needs activations"):
        A.sweep({}, {"identity": transforms.build("identity")}, b)
    with pytest.raises(ValueError, match="LongTensor"):
        A.capture_llm(None, torch.zeros(2, 4), [0])


def test_capture_llm_keeps_one_input_per_shared_group():
    m = tiny("llama")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    acts = A.capture_llm(m, ids, [1])
    assert set(acts) == {f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.o_proj",
                                                          "mlp.gate_proj", "mlp.down_proj")}
    assert acts["model.layers.1.mlp.down_proj"].shape == (2, 12, m.config.intermediate_size)


def test_energy_profile_weights_every_input_equally():
    acts = _acts()
    dwt = transforms.build("dwt")
    e = A.energy_profile(acts, dwt)
    ref = sum(metrics.row_energy(dwt.forward(X)) / X.double().pow(2).sum() for X in acts.values())
    torch.testing.assert_close(e, ref, rtol=1e-6, atol=0)
    assert float(e.sum()) == pytest.approx(len(acts))
    klt = A.klt_per_layer(acts)  # a per-layer transform: the in-sample KLT orders energies
    ek = A.energy_profile(acts, klt)
    assert bool((ek[:-1] >= ek[1:] - 1e-9).all())
