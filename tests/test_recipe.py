"""The model layer: recipes applied by name-pattern rules, restored exactly, equal to manual STaMP."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from stamp_lib.core import quant, transforms
from stamp_lib.methods import features
from stamp_lib.model import hooks, recipe
from stamp_lib.model.recipe import ActQuant, Recipe, Rule, WeightQuant


def tiny_llama(seed=0, layers=2, hidden=64, tie=False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96, max_position_embeddings=512,
                      tie_word_embeddings=tie, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


class Toy(nn.Module):
    def __init__(self, d=16, tie=True):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d, bias=False)
        self.c = nn.Linear(d, d)
        if tie:
            self.b.weight = self.a.weight

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + self.b(x))


IDS = torch.randint(0, 96, (2, 80), generator=torch.Generator().manual_seed(1))
LAYERS = "model.layers.*"


def snapshot(model):
    return {k: (v, v.detach().clone()) for k, v in model.state_dict(keep_vars=True).items()}


def assert_restored(model, snap):
    now = model.state_dict(keep_vars=True)
    assert list(now) == list(snap)
    for k, (obj, val) in snap.items():
        assert now[k] is obj, k  # the very same Parameter object is back
        assert torch.equal(now[k].detach(), val), k


# ----------------------------------------------------------------------------- settings
@pytest.mark.parametrize("bad, match", [
    (dict(bits=17), r"\[2, 16\]"), (dict(bits=1), r"\[2, 16\]"), (dict(bits="abc"), "spec like '64x8\\+4'"),
    (dict(bits="64x9+1"), "low-precision bits"), (dict(transform="fft"), "unknown sequence transform"),
    (dict(levels=3), "'dwt' transform only"), (dict(transform="dwt", levels=0), "levels"),
    (dict(clip_ratio=0), "clip_ratio"), (dict(block_size=-1), "block_size"), (dict(grid=(4,)), "grid"),
    (dict(transform="dct", grid=(2, 2)), "2-D 'dwt'"), (dict(bits=True), "int"),
])
def test_act_settings_are_validated_when_built(bad, match):
    with pytest.raises(ValueError, match=match):
        ActQuant(**bad)


def test_other_settings_are_validated_when_built():
    with pytest.raises(ValueError, match="unknown weight method"):
        WeightQuant(method="awq")
    with pytest.raises(ValueError, match="weight bits"):
        WeightQuant(bits=20)
    with pytest.raises(ValueError, match="unknown feature method"):
        Rule("*", feature="rotate")
    with pytest.raises(ValueError, match="needs feature='hadamard'"):
        Rule(feature="smoothquant", hadamard_seed=1)
    with pytest.raises(ValueError, match="hadamard_seed must be"):
        Rule(feature="hadamard", hadamard_seed=-1)
    with pytest.raises(ValueError, match="alpha"):
        Rule("*", feature="smoothquant", alpha=1.5)
    with pytest.raises(TypeError, match="ActQuant"):
        Rule("*", act=4)
    with pytest.raises(TypeError, match="patterns"):
        Rule(3)
    with pytest.raises(ValueError, match="matches no Linear"):
        Recipe(Rule("model.layerz.*", act=ActQuant())).resolve(tiny_llama())


def test_settings_are_frozen_and_bits_follow_absolute_positions():
    a = ActQuant(bits="64x8+4", transform="dwt")
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.bits = 4  # frozen: no stale caches can follow a change
    assert a.bits_vector(100).tolist() == [8] * 64 + [4] * 36
    assert a.bits_vector(10).tolist() == [8] * 10  # a short prompt: every position is < 64
    assert a.bits_vector(1, offset=63).tolist() == [8] and a.bits_vector(1, offset=64).tolist() == [4]
    assert a.average_bits(2048) == pytest.approx(4 + 4 * 64 / 2048)
    assert quant.parse_bits(4) == (0, 4, 4) and quant.parse_bits("6") == (0, 6, 6)


# ----------------------------------------------------------------------------- equivalences
def test_switched_off_is_identical_and_restores():
    model = tiny_llama()
    ref = model(IDS).logits
    snap = snapshot(model)
    with recipe.apply(model, Recipe(Rule(LAYERS))) as st:
        out = model(IDS).logits
    assert torch.equal(out, ref) and st.stats == {}
    assert_restored(model, snap)


def test_sixteen_bits_identity_is_close_to_plain():
    model = tiny_llama()
    ref = model(IDS).logits
    r = Recipe(Rule(LAYERS, act=ActQuant(bits=16), weight=WeightQuant(bits=16)), kv=None)
    with recipe.apply(model, r):
        out = model(IDS).logits
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)


def test_hook_equals_manual_stamp_and_weights_are_rtn():
    model = tiny_llama(layers=1)
    lin = model.model.layers[0].mlp.down_proj
    spec = ActQuant(bits="16x8+4", transform="dwt", levels=3)
    seen = {}

    def grab(mod, args):
        seen["x"] = args[0].detach().clone()

    h = lin.register_forward_pre_hook(grab)
    with torch.no_grad():
        model(IDS)
    h.remove()
    x = seen["x"]
    W = lin.weight.detach().clone()
    got = {}
    r = Recipe(Rule("*.mlp.down_proj", act=spec, weight=WeightQuant(bits=4)))
    with recipe.apply(model, r) as st:
        h = lin.register_forward_hook(lambda m, a, o: got.update(x=a[0].detach().clone(), y=o.detach().clone()))
        with torch.no_grad():
            model(IDS)
        h.remove()
    T = transforms.build("dwt", levels=3)
    want_x = quant.stamp_fake_quant(x, T, spec.bits_vector(x.shape[-2]))
    torch.testing.assert_close(got["x"], want_x, atol=1e-6, rtol=1e-6)
    Wq = quant.fake_quant(W, 4, symmetric=True)
    torch.testing.assert_close(got["y"], want_x @ Wq.T, atol=1e-5, rtol=1e-5)
    assert st.stats["model.layers.0.mlp.down_proj"].average_bits == pytest.approx(4 + 4 * 16 / 80)
    assert torch.equal(lin.weight, W)


def test_quantization_happens_in_the_rotated_basis():
    """A feature transform R: the layer sees Q(X R) and the folded weight; the output equals the
    manual Q(X R) (W R)^T and differs from quantizing in the original basis."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32, bias=False))
    x = torch.randn(1, 40, 32) * torch.linspace(0.1, 10, 32)  # outlier channels: rotation matters
    R = features.Rotation(torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))[0].float())
    spec = ActQuant(bits=4)
    r = Recipe(Rule("0", act=spec))
    prep = recipe.Prepared(key=r.prep_key(), features={"0": R}, weights={"0": R.fold_weight(model[0].weight.detach())})
    with recipe.apply(model, r, prepared=prep), torch.no_grad():
        y = model(x)
    W = model[0].weight.detach()
    manual = quant.fake_quant(x @ R.R, 4) @ (W @ R.R).T
    torch.testing.assert_close(y, manual, atol=1e-5, rtol=1e-5)
    plain = quant.fake_quant(x, 4) @ W.T
    assert (y - plain).abs().max() > 1e-2
    # the exact (unquantized) fold is the identity map up to rounding
    r0 = Recipe(Rule("0"))
    prep0 = recipe.Prepared(key=r0.prep_key(), features={"0": R}, weights={"0": R.fold_weight(W)})
    with recipe.apply(model, r0, prepared=prep0), torch.no_grad():
        torch.testing.assert_close(model(x), x @ W.T, atol=1e-4, rtol=1e-5)


def test_shared_inputs_are_quantized_once_and_counted_per_layer():
    model = tiny_llama()
    calls = []
    orig = recipe.Applied._quantize  # what the hooks call (quantize() plus the rotated input)

    def spy(self, spec, x, offset, feature=None):
        calls.append(x.shape)
        return orig(self, spec, x, offset, feature)

    r = Recipe(Rule(LAYERS, act=ActQuant(bits="8x8+4", transform="dct")))
    recipe.Applied._quantize = spy
    try:
        with recipe.apply(model, r) as st, torch.no_grad():
            model(IDS)
    finally:
        recipe.Applied._quantize = orig
    # per layer: q/k/v once, o once, gate/up once, down once
    assert len(calls) == 4 * 2
    assert len(st.stats) == 7 * 2
    assert st.average_bits() == pytest.approx(4 + 4 * 8 / 80)


# ----------------------------------------------------------------------------- restoration
def test_tied_weights_are_restored_and_stay_tied():
    model = Toy(tie=True)
    snap = snapshot(model)
    x = torch.randn(3, 10, 16)
    with recipe.apply(model, Recipe(Rule(["a", "b"], weight=WeightQuant(bits=2)))), torch.no_grad():
        model(x)
        assert not torch.equal(model.a.weight, snap["a.weight"][1])
    assert model.a.weight is model.b.weight
    assert torch.equal(model.a.weight, snap["a.weight"][1])


def test_restored_after_an_exception_inside():
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(KeyError):
        with recipe.apply(model, Recipe(Rule(LAYERS, act=ActQuant(bits=4), weight=WeightQuant(bits=3)))):
            raise KeyError("boom")
    assert_restored(model, snap)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_errors_inside_hooks_name_the_layer():
    model = tiny_llama(layers=1)
    lin = model.model.layers[0].self_attn.o_proj
    h = lin.register_forward_pre_hook(lambda m, a: (a[0] * float("nan"),))
    try:
        with recipe.apply(model, Recipe(Rule("*.o_proj", act=ActQuant(bits=4))), check_finite=True), pytest.raises(
                ValueError, match=r"model\.layers\.0\.self_attn\.o_proj: .*NaN"):
            model(IDS)
        # the check is opt-in: by default the NaN goes through, as in the unquantized model
        with recipe.apply(model, Recipe(Rule("*.o_proj", act=ActQuant(bits=4)))), torch.no_grad():
            assert torch.isnan(model(IDS).logits).all()
    finally:
        h.remove()
    # WHT on a non-power-of-two length: an error naming the layer and the problem
    with recipe.apply(model, Recipe(Rule("*.o_proj", act=ActQuant(bits=4, transform="wht")))), pytest.raises(
            ValueError, match=r"o_proj: .*power-of-two"):
        model(IDS[:, :40])


def test_generate_under_a_recipe_with_short_prompts():
    model = tiny_llama()
    r = Recipe(Rule(LAYERS, act=ActQuant(bits="64x8+4", transform="dwt", levels=3), weight=WeightQuant(bits=4)))
    for n in (5, 70):
        with recipe.apply(model, r) as st, torch.no_grad():
            out = model.generate(IDS[:1, :n], max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert out.shape == (1, n + 4)
        # positions < 64 got 8 bits, later ones 4: check the spent average on one layer
        ls = st.stats["model.layers.0.mlp.down_proj"]
        toks = n + 3  # prefill n, then 3 single-token steps (the 4th token needs no forward)
        want = sum(8 if p < 64 else 4 for p in range(toks))
        assert (ls.tokens, ls.bits) == (toks, want)


def test_grid_auto_needs_a_grid():
    model = nn.Sequential(nn.Linear(8, 8))
    r = Recipe(Rule("0", act=ActQuant(bits="4x8+4", transform="dwt", grid="auto")))
    with recipe.apply(model, r) as st:
        with pytest.raises(ValueError, match="grid='auto'"):
            model(torch.randn(1, 16, 8))
        st.set_grid((4, 4))
        y = model(torch.randn(1, 16, 8))
        st.set_grid((2, 4))
        with pytest.raises(ValueError, match="2x4 has 8 tokens"):
            model(torch.randn(1, 16, 8))
    assert y.shape == (1, 16, 8)


def test_hooks_find_keyword_inputs():
    lin = nn.Linear(4, 4)
    seen = []
    with hooks.input_hooks({"lin": lin}, lambda n, m, x: seen.append(n) or x * 0):
        out = lin(input=torch.ones(2, 4))
    assert seen == ["lin"] and torch.equal(out, lin.bias.expand(2, 4))


# ----------------------------------------------------------------------------- methods in recipes
CALIB = torch.randint(0, 96, (3, 48), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("feature, wmethod", [("hadamard", "rtn"), ("smoothquant", "rtn"), (None, "gptq"),
                                              ("hadamard", "gptq"), ("smoothquant", "gptq")])
def test_methods_without_quantization_leave_logits_unchanged(feature, wmethod):
    """Rotation, smoothing and GPTQ at 16 bits are exact up to float rounding."""
    model = tiny_llama()
    ref = model(IDS).logits
    snap = snapshot(model)
    r = Recipe(Rule(LAYERS, weight=WeightQuant(bits=16, method=wmethod), feature=feature))
    with recipe.apply(model, r, calib=CALIB, progress=False), torch.no_grad():
        out = model(IDS).logits
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-3)
    assert_restored(model, snap)


def test_rotated_weights_are_quantized_in_the_rotated_basis():
    pass

    model = tiny_llama(layers=1)
    lin = model.model.layers[0].mlp.down_proj
    W = lin.weight.detach().clone()
    r = Recipe(Rule("*.down_proj", weight=WeightQuant(bits=4), feature="hadamard"))
    prep = recipe.prepare(model, r, progress=False)
    R = features.hadamard_rotation(W.shape[1])
    want = quant.fake_quant(R.fold_weight(W.double()), 4, symmetric=True).float()
    torch.testing.assert_close(prep.weights["model.layers.0.mlp.down_proj"], want, atol=1e-6, rtol=1e-6)
    # ... which is not the rotation of the original-basis RTN weight
    assert (R.fold_weight(quant.fake_quant(W, 4, symmetric=True)) - want).abs().max() > 1e-3
    # hadamard_seed: QuaRot's random signs D, R = D H / sqrt(n), the same seed -> the same rotation
    seeded = Recipe(Rule("*.down_proj", weight=WeightQuant(bits=4), feature="hadamard", hadamard_seed=5))
    assert seeded.prep_key() != r.prep_key() and seeded.knobs()["rules"][0]["hadamard_seed"] == 5
    F = recipe.prepare(model, seeded, progress=False).features["model.layers.0.mlp.down_proj"]
    Rs = features.hadamard_rotation(W.shape[1], seed=5)
    torch.testing.assert_close(F.matrix(), Rs.matrix(), rtol=0, atol=0)
    assert not torch.equal(F.matrix(), R.matrix())


def test_smoothquant_groups_share_one_scale_and_gptq_beats_rtn_on_the_model():
    model = tiny_llama()
    sq = recipe.prepare(model, Recipe(Rule(LAYERS, feature="smoothquant")), CALIB, progress=False)
    f = sq.features
    L0 = "model.layers.0."
    assert f[L0 + "self_attn.q_proj"] is f[L0 + "self_attn.k_proj"] is f[L0 + "self_attn.v_proj"]
    assert f[L0 + "mlp.gate_proj"] is f[L0 + "mlp.up_proj"] and f[L0 + "mlp.down_proj"] is not f[L0 + "mlp.up_proj"]
    ref = model(IDS).logits
    errs = {}
    for wm in ("rtn", "gptq"):
        with recipe.apply(model, Recipe(Rule(LAYERS, weight=WeightQuant(bits=3, method=wm))), calib=CALIB,
                          progress=False), torch.no_grad():
            errs[wm] = float((model(IDS).logits - ref).pow(2).mean())
    assert errs["gptq"] < errs["rtn"]


def test_calibration_is_required_and_prepared_must_match():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calibration data"):
        recipe.prepare(model, Recipe(Rule(LAYERS, feature="smoothquant")))
    prep = recipe.prepare(model, Recipe(Rule(LAYERS, weight=WeightQuant(bits=4))), progress=False)
    with pytest.raises(ValueError, match="other feature/weight settings"):
        with recipe.apply(model, Recipe(Rule(LAYERS, weight=WeightQuant(bits=3))), prep):
            pass
    # the same preparation serves the recipe with and without STaMP
    with recipe.apply(model, Recipe(Rule(LAYERS, act=ActQuant(transform="dwt"), weight=WeightQuant(bits=4))), prep):
        pass


def test_non_hadamard_size_is_a_clear_error():
    model = nn.Sequential(nn.Linear(52, 8))
    with pytest.raises(ValueError, match="52"):
        recipe.prepare(model, Recipe(Rule("0", feature="hadamard")))


def test_kv_quantization_touches_only_keys_and_values():
    """Through the recipe: per-token K/V quantization equals the kv module's own path with the
    same quantizer, and leaves the linear inputs alone."""
    from stamp_lib.model import kv

    model = tiny_llama()
    spec = ActQuant(bits="8x8+4")
    with recipe.apply(model, Recipe(Rule(LAYERS), kv=spec)) as st, torch.no_grad():
        got = model(IDS).logits
    assert set(st.stats) == {f"kv.{i}.{k}" for i in range(2) for k in ("key", "value")}
    assert st.average_bits("kv") == pytest.approx(4 + 4 * 8 / 80)

    def manual(layer, kind, x, offset):
        return quant.fake_quant(x, spec.bits_vector(x.shape[-2], offset))

    with kv.kv_quantization(model, manual), torch.no_grad():
        want = model(IDS).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - model(IDS).logits).abs().max() > 1e-4


def test_lowrank_branch_reconstructs_and_sees_the_unquantized_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24))
    x = torch.randn(2, 16, 32)
    W, b = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    r = Recipe(Rule("0", act=ActQuant(bits=4), weight=WeightQuant(bits=4, lowrank=4)))
    prep = recipe.prepare(model, r, progress=False)
    A, B = prep.lowrank["0"]
    Lr = A @ B
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    torch.testing.assert_close(Lr, ((U[:, :4] * S[:4]) @ Vh[:4]).float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(prep.weights["0"], quant.fake_quant((W.double() - Lr.double()), 4, symmetric=True).float(),
                               atol=1e-5, rtol=1e-5)
    with recipe.apply(model, r, prep), torch.no_grad():
        y = model(x)
    want = quant.fake_quant(x, 4) @ prep.weights["0"].T + b + x @ Lr.T
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # 16 bits everywhere: the split weight reconstructs the layer
    r16 = Recipe(Rule("0", weight=WeightQuant(bits=16, lowrank=4)))
    with recipe.apply(model, r16), torch.no_grad():
        torch.testing.assert_close(model(x), x @ W.T + b, atol=1e-3, rtol=1e-4)
    assert not model[0]._forward_hooks


def test_per_call_path_makes_no_host_syncs(monkeypatch):
    """Settings are validated when built; the per-call quantization reads nothing back from the
    device (no .item(), bool(), int(), float(), .tolist(), .cpu() on tensors; .numpy(), zero-copy
    and CPU-only, is how the CPU DCT reaches scipy)."""
    st = recipe.Applied(Recipe(()), check_finite=False)
    x = torch.randn(2, 32, 16)
    specs = [ActQuant(bits="8x8+4", transform="dwt", levels=2), ActQuant(bits=4, transform="dct", block_size=8),
             ActQuant(bits="4x8+4", transform="dwt", grid=(4, 8))]
    for spec in specs:
        st.quantize(spec, x, 0)  # first call builds the cached bit vectors and transforms
    seen = []
    for meth in ("item", "__bool__", "__int__", "__float__", "tolist", "cpu"):
        orig = getattr(torch.Tensor, meth)
        monkeypatch.setattr(torch.Tensor, meth,
                            lambda self, *a, _o=orig, _m=meth, **k: (seen.append(_m), _o(self, *a, **k))[1])
    for spec in specs:
        st.quantize(spec, x, 0)
    monkeypatch.undo()
    assert seen == []
    # ... and the check is real: the finiteness check (check_finite=True) does sync
    st2 = recipe.Applied(Recipe(()), check_finite=True)
    orig = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: (seen.append("bool"), orig(self))[1])
    st2.quantize(specs[0], x, 0)
    monkeypatch.undo()
    assert "bool" in seen


# ----------------------------------------------------------------------------- the per-call path
def test_bit_vectors_follow_positions_and_decoding_steps_hit_the_cache():
    spec = ActQuant(bits="4x8+4")
    x = torch.zeros(1, 1)
    st = recipe.Applied(Recipe(()))
    for s, off in [(10, 0), (3, 2), (1, 3), (1, 4), (1, 100), (6, 1), (200, 0), (5, 300), (1, 0)]:
        b, n = st._bits_for(spec, s, off, x)
        want = spec.bits_vector(s, off)
        assert b.shape == (s, 1, 1) and b.view(-1).tolist() == want.tolist() and n == int(want.sum())
    # one new token per step beyond the high-precision rows: one entry, the template is not rebuilt
    st = recipe.Applied(Recipe(()))
    st._bits_for(spec, 1, 4, x)
    entries, templates = dict(st._bits), dict(st._templates)
    for off in range(5, 300):
        st._bits_for(spec, 1, off, x)
    assert st._bits.keys() == entries.keys() and all(st._templates[k] is t for k, t in templates.items())
    # through generate: a prefill and every decoding step past the 8 high-precision rows share two entries
    model = tiny_llama()
    r = Recipe(Rule(LAYERS, act=ActQuant(bits="8x8+4"), weight=WeightQuant(bits=4)))
    with recipe.apply(model, r) as st, torch.no_grad():
        model.generate(IDS[:1, :12], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert len(st._bits) == 2 and len(st._templates) == 1
    # K/V: every step sees one more cached token (a new length), sliced from the same template
    rkv = Recipe(Rule(LAYERS, act=ActQuant(bits="8x8+4"), weight=WeightQuant(bits=4)), kv=ActQuant(bits="8x8+4"))
    with recipe.apply(model, rkv) as st, torch.no_grad():
        model.generate(IDS[:1, :12], max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert len(st._templates) == 1 and st.average_bits("kv") > 4


def test_positions_are_read_without_host_syncs_where_possible():
    """The position of a forward: a CPU cache_position (free), else the cache's host-side length;
    a device tensor is read back only when nothing else tells, and not at all without
    high-precision rows. A meta tensor stands for a GPU one: reading it back raises."""

    class HostLength:  # DynamicCache keeps its length as a Python int
        def get_seq_length(self):
            return 7

    class DeviceLength:  # a static cache's length is a tensor
        def get_seq_length(self):
            return torch.tensor(5)

    on_device = torch.arange(3, device="meta") + 7
    assert recipe.offset_of((), {"cache_position": on_device, "cache": HostLength()}) == 7
    assert recipe.offset_of((), {"cache_position": on_device, "past_key_values": HostLength()}) == 7
    assert recipe.offset_of((), {"cache_position": on_device}, need=False) == 0
    assert recipe.offset_of((), {"cache_position": torch.arange(5, 9), "cache": HostLength()}) == 5
    assert recipe.offset_of((), {"cache": DeviceLength()}) == 5
    assert recipe.offset_of((), {}) == 0
    with pytest.raises(RuntimeError, match="meta"):  # the one case that must read the device back
        recipe.offset_of((), {"cache_position": on_device})
    assert recipe.Applied(Recipe(Rule("*", act=ActQuant(bits=4)))).hp_max == 0
    assert recipe.Applied(Recipe(Rule("*", act=ActQuant(bits="16x8+4")))).hp_max == 16


def test_no_finiteness_check_inside_the_model_unless_asked(monkeypatch):
    model = Toy()
    x = torch.randn(2, 8, 16)
    r = Recipe(Rule("*", act=ActQuant(bits="2x8+4", transform="dwt")), kv=None)
    calls = []
    orig = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: (calls.append(t.shape), orig(t))[1])
    for cf in (False, None):
        with recipe.apply(model, r, check_finite=cf), torch.no_grad():
            model(x)
    assert calls == []
    with recipe.apply(model, r, check_finite=True), torch.no_grad():
        model(x)
    assert calls  # the check is opt-in, and real


def test_feature_transform_runs_once_per_layer_call_and_lowrank_reads_x(monkeypatch):
    """One x R per layer call: the quantizer computes it; the low-rank branch reads x through
    B R^T (folded once per apply), equal to the previous path that computed x R again for it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 24))
    x = torch.randn(2, 16, 32)
    b = model[0].bias.detach()
    for feature, seed in (("hadamard", 1), ("smoothquant", None)):
        r = Recipe(Rule("0", act=ActQuant(bits=4), weight=WeightQuant(bits=4, lowrank=4), feature=feature,
                        hadamard_seed=seed))
        prep = recipe.prepare(model, r, calib=x if feature == "smoothquant" else None, progress=False)
        F = prep.features["0"]
        calls = []
        plain = F.forward

        def counted(t, plain=plain):
            calls.append(1)
            return plain(t)

        monkeypatch.setattr(F, "forward", counted)
        with recipe.apply(model, r, prep), torch.no_grad():
            got = [model(x), model(x)]
        assert len(calls) == 2  # once per layer call (the previous path: twice)
        monkeypatch.setattr(recipe, "_LEGACY", True)
        with recipe.apply(model, r, prep), torch.no_grad():
            previous = model(x)
        monkeypatch.setattr(recipe, "_LEGACY", False)
        monkeypatch.delattr(F, "forward")
        A, B = prep.lowrank["0"]
        xr = F.forward(x)
        want = quant.fake_quant(xr, 4) @ prep.weights["0"].T + b + xr @ (A @ B).T
        for y in (*got, previous):
            torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_callers_input_is_never_overwritten(dtype):
    """The quantizer works in the memory of tensors of its own (x R, a float32 copy), never in the
    layer's input: every tensor the model passed to a layer is unchanged afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32)).to(dtype)
    x = torch.randn(2, 16, 32).to(dtype)
    passed = {}

    def keep(module, args):  # registered before apply(): sees what the model passes
        passed[module] = (args[0], args[0].clone())

    handles = [m.register_forward_pre_hook(keep) for m in model]
    try:
        for feature in (None, "hadamard"):
            r = Recipe(Rule("*", act=ActQuant(bits="4x8+4", transform="dwt", grid=(4, 4)), feature=feature))
            prep = recipe.prepare(model, r, progress=False)
            with recipe.apply(model, r, prep), torch.no_grad():
                y = model(x)
            assert len(passed) == 2
            for m, (t, before) in passed.items():
                assert torch.equal(t, before), (feature, m)
            with recipe.apply(model, r, prep, observe=lambda *a: None), torch.no_grad():
                y_keep = model(x)  # an observer keeps x R: the quantizer works in a buffer of its own
            torch.testing.assert_close(y, y_keep, rtol=1e-6, atol=1e-6)
    finally:
        for h in handles:
            h.remove()


def test_feature_matrices_are_converted_once_per_dtype(monkeypatch):
    """CUDA-free: count the conversions of R (and of SmoothQuant's r) over many calls."""
    d = 16
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    rot = features.Rotation(Q)
    sc = features.Scale(torch.rand(d, dtype=torch.float64) + 0.5)
    had = features.hadamard_rotation(d, seed=2)
    had.R  # noqa: B018 - build the dense twin before counting
    sources = lambda: (rot.R, sc.r, had.R)  # noqa: E731
    seen = []
    orig = torch.Tensor.to

    def spy(self, *a, **k):
        if any(self is t for t in sources()):
            seen.append(self.dtype)
        return orig(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", spy)
    x32 = torch.randn(3, 5, d)
    x64 = x32.double()

    def calls(x):
        for _ in range(4):
            rot.forward(x), rot.inverse(x), rot.fold_weight(x[0]), rot.fold_reader(x[0])
            sc.forward(x), sc.inverse(x), sc.fold_weight(x[0]), sc.fold_reader(x[0])
            had.forward_dense(x), had.inverse_dense(x)

    calls(x32)
    assert len(seen) == 3  # R, r and the Hadamard matrix: once each into float32
    calls(x64)
    assert len(seen) == 6  # once more each for float64
    rot.R = Q.flip(0)  # a new matrix starts a new cache
    calls(x32)
    assert len(seen) == 7
    monkeypatch.setattr(features, "_CACHE", False)  # the previous path converts on every call
    calls(x32)
    assert len(seen) > 7 + 8
    monkeypatch.undo()
    torch.testing.assert_close(rot.forward(x32), x32 @ Q.flip(0).float())
    torch.testing.assert_close(sc.fold_reader(x32[0]), x32[0] * sc.r.float())


@pytest.mark.parametrize("d", [64, 256, 512, 576])
def test_hadamard_fused_product_equals_the_previous_product(monkeypatch, d):
    """Radix-32-last factors, the 1/sqrt(n) folded into the first one and two buffers (the fused
    path) against kron_apply with a scaling pass (the previous one), forward, inverse and fold."""
    H = features.hadamard_rotation(d, seed=3)
    H.matmul_max = 0  # the Kronecker path at every size
    x = torch.randn(4, 9, d, generator=torch.Generator().manual_seed(d))
    fused = (H.forward(x), H.inverse(x), H.fold_weight(x[0]), H.fold_reader(x[0]))
    monkeypatch.setattr(features, "_CACHE", False)
    previous = (H.forward(x), H.inverse(x), H.fold_weight(x[0]), H.fold_reader(x[0]))
    for a, b in zip(fused, previous):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    R = H.matrix(torch.float64)
    torch.testing.assert_close(fused[0].double(), x.double() @ R, rtol=0, atol=2e-6)
    torch.testing.assert_close(fused[3].double(), x[0].double() @ R.T, rtol=0, atol=2e-6)
