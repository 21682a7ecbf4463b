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
    torch.testing.assert_close(sw.sqnr("dwt", "4", ("q/k/v", "down")), both)
    torch.testing.assert_close(sw.sqnr("dwt", "4", ("q/k/v", "o")), q)


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


# ----------------------------------------------------------------------------- mean offsets
def _shared_mean(seed=0, n=N):
    """Windows whose tokens share one fixed mean vector (the same for every window)."""
    g = torch.Generator().manual_seed(seed)
    mu = 5.0 * torch.linspace(-1, 1, D)
    return {"model.layers.0.self_attn.q_proj": mu + 0.3 * torch.randn(n, S, D, generator=g)}


def test_static_offset_is_mean_at_8_bits_plus_quantized_residual():
    cal, ev = _shared_mean(1, 4), _shared_mean(2)
    off = A.StaticOffset.fit(cal)
    name = "model.layers.0.self_attn.q_proj"
    m = cal[name].reshape(-1, D).double().mean(0).float()
    m8 = quant.fake_quant(m[None], 8)[0]
    assert float((off.means[name] - m).abs().max()) <= float(m.max() - m.min()) / 255 / 2 + 1e-6
    bits = quant.two_level_bits(S, 2)
    x = ev[name][0]
    torch.testing.assert_close(off.quantize(name, x, bits), quant.fake_quant(x - m8, bits) + m8)
    # causal: changing a later token leaves every earlier row as it was
    x2 = x.clone()
    x2[9] += 3.0
    torch.testing.assert_close(off.quantize(name, x2, bits)[:9], off.quantize(name, x, bits)[:9], rtol=0, atol=0)
    # on windows that share the calibration mean it beats plain per-token quantization
    sw = A.sweep(ev, {"identity": transforms.build("identity"), "static": off}, {"4": bits})
    assert float(sw.gain("static", "4", ("identity", "4"))["mean"]) > 3.0
    with pytest.raises(KeyError, match="no calibration offset"):
        off.quantize("other", x, bits)
    with pytest.raises(ValueError, match="channels"):
        off.quantize(name, x[:, :3], bits)
    with pytest.raises(ValueError, match="no calibration means"):
        A.StaticOffset({})


def test_running_mean_is_causal_closed_loop_prediction():
    name = "model.layers.0.self_attn.q_proj"
    x = _shared_mean(3)[name][0].double()
    bits = quant.two_level_bits(S, 1)
    rm = A.RunningMean()
    xh = rm.quantize(name, x, bits)
    # the prediction is the mean of the reconstructed prefix, and the residual is on its own grid
    m = torch.cat([torch.zeros(1, D, dtype=x.dtype), xh.cumsum(0)[:-1] / torch.arange(1, S)[:, None]])
    torch.testing.assert_close(xh - m, quant.fake_quant(x - m, bits), rtol=1e-12, atol=1e-12)
    assert float((xh[0] - quant.fake_quant(x[:1], 8)[0]).abs().max()) < 1e-12  # m_0 = 0
    # causal: a change at token j moves no row before j
    x2 = x.clone()
    x2[11] -= 4.0
    xh2 = rm.quantize(name, x2, bits)
    assert torch.equal(xh2[:11], xh[:11]) and not torch.equal(xh2[11], xh[11])
    # batched windows equal window by window
    X = _shared_mean(4)[name]
    torch.testing.assert_close(rm.quantize(name, X, bits), torch.stack([rm.quantize(name, w, bits) for w in X]))
    with pytest.raises(ValueError, match="row bits"):
        rm.quantize(name, x, bits[:-1])


def test_sweep_scores_offsets_like_transforms():
    acts = _acts()
    off = A.StaticOffset.fit(_acts(1))
    bits = A.hp_bits(S, (0, 4))
    sw = A.sweep(acts, {"identity": transforms.build("identity"), "static": off, "running": A.RunningMean()}, bits)
    for name, X in acts.items():
        for k, q in (("static", off), ("running", A.RunningMean())):
            for b, v in bits.items():
                ref = [float((q.quantize(name, x, v) - x).pow(2).sum(dtype=torch.float64)) for x in X]
                torch.testing.assert_close(sw.err[name, k, b], torch.tensor(ref, dtype=torch.float64))
        torch.testing.assert_close(sw.signal[name], X.double().pow(2).sum((1, 2)))
    # offsets alone (no transform) still give signals
    only = A.sweep(acts, {"running": A.RunningMean()}, bits)
    assert set(only.signal) == set(acts)


def test_offset_hooks_in_a_model_match_the_recipe_and_restore_it():
    from stamp_lib.experiments import llm
    from stamp_lib.model import recipe

    m = tiny("llama").double()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    pat = llm.LINEARS
    means = A.input_means(m, ids, pat)
    # every linear of the decoder layers gets a mean; q/k/v (one shared input) get the same one
    lin = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and n.startswith("model.layers.")}
    assert set(means) == lin
    cap = A.capture_llm(m, ids, [0, 1])
    for n, x in cap.items():
        torch.testing.assert_close(means[n].double(), x.reshape(-1, x.shape[-1]).double().mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(means["model.layers.0.self_attn.k_proj"], means["model.layers.0.self_attn.q_proj"])
    # a zero offset through the hooks = the recipe's own per-token activation quantizer
    r = llm.llm_recipe("rtn", seq_len=16, hp_tokens=2, kv_bits=None)
    prep = recipe.prepare(m, r, progress=False)
    no_act = A.act_variant(r, None)
    assert no_act.rules[0].act is None and no_act.kv == r.kv and no_act.prep_key() == r.prep_key()
    mean = A.act_variant(r, "mean")
    assert mean.rules[0].act.transform == "mean" and mean.rules[0].act.bits == r.rules[0].act.bits
    with pytest.raises(ValueError, match="every rule"):
        A.act_variant(no_act, "mean")
    with pytest.raises(ValueError, match="network"):
        A.act_variant(llm.llm_recipe("quarot", seq_len=16, hp_tokens=2), None)
    zero = A.StaticOffset({n: torch.zeros_like(v) for n, v in means.items()})
    ref = llm.evaluate(m, ids, r, prep, progress=False, store=False)
    with A.offset_hooks(m, zero, "2x8+4", pat):
        got = llm.evaluate(m, ids, no_act, prep, progress=False, store=False)
    torch.testing.assert_close(got.nll, ref.nll, rtol=1e-9, atol=1e-9)
    with torch.no_grad():
        before = m(ids).logits
        with A.offset_hooks(m, A.RunningMean(), "2x8+4", pat):
            moved = m(ids).logits
        after = m(ids).logits
    assert not torch.allclose(moved, before) and torch.equal(after, before)

    # the running mean quantizes a shared input (q/k/v, gate/up) once, with the same logits
    class Counting(A.RunningMean):
        calls = 0

        def quantize(self, name, X, bits):
            Counting.calls += 1
            return super().quantize(name, X, bits)

    class Uncached(A._Offset):
        quantize = A.RunningMean.quantize

    with torch.no_grad():
        with A.offset_hooks(m, Counting(), "2x8+4", pat):
            cached = m(ids).logits
        with A.offset_hooks(m, Uncached(), "2x8+4", pat):
            plain = m(ids).logits
    assert Counting.calls == 2 * 4  # two layers: q/k/v, o, gate/up, down
    torch.testing.assert_close(cached, plain, rtol=0, atol=0)
    torch.testing.assert_close(cached, moved, rtol=0, atol=0)
    with pytest.raises(TypeError, match="StaticOffset or RunningMean"):
        with A.offset_hooks(m, transforms.build("dct"), "4", pat):
            pass


def test_capture_galaxy_keeps_tokens_as_rows_of_channel_mixing():
    from stamp_lib.experiments.seqstats import galaxy_layer_type
    from stamp_lib.zoo import galaxy

    g = galaxy.load_galaxy_model("hsc_ScoreNet64")
    y0 = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    acts = A.capture_galaxy(g, y0, 0.5, noise_seed=3)
    kinds = {galaxy_layer_type(n) for n in acts}
    assert kinds == {"channel-mixing fc1", "channel-mixing fc2", "token-mixing fc1", "token-mixing fc2"}
    for n, x in acts.items():
        assert x.shape[0] == 2
        if galaxy_layer_type(n).startswith("channel"):
            assert x.shape[1] == g.grid ** 2
    assert torch.equal(A.capture_galaxy(g, y0, 0.5, 3)[n], x)
    with pytest.raises(ValueError, match="clean samples"):
        A.capture_galaxy(g, y0[0], 0.5, 3)


def test_made_of_builds_bits_for_each_length_and_layer_type():
    acts = _acts() | {"blocks.0.hidden_mixer.fc1": torch.randn(N, 8, D)}
    types = {"model.layers.0.self_attn.q_proj": "q/k/v", "model.layers.0.mlp.down_proj": "down",
             "blocks.0.hidden_mixer.fc1": "other"}
    sw = A.made_of(acts, acts, "2x8+4", transforms.build("dwt", levels=2), layer_type=types.get)
    assert {k for _, k, _ in sw.err} == {"identity", "mean", "static", "running", "dct", "dwt"}
    x = acts["blocks.0.hidden_mixer.fc1"]
    ref = [bounds.stamp_error(w, transforms.build("dct"), quant.bits_from_spec("2x8+4", 8)) for w in x]
    torch.testing.assert_close(sw.err["blocks.0.hidden_mixer.fc1", "dct", "2x8+4"],
                               torch.tensor(ref, dtype=torch.float64), rtol=1e-5, atol=1e-9)
    assert sw.sqnr("dwt", "2x8+4", "other").shape == (N,)
