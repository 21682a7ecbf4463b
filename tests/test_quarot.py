"""QuaRot as a model-level preparation (stamp_lib.model.quarot; Recipe(network="quarot")).

Tiny random Llama (GQA, llama3 RoPE scaling, tied embeddings), Llama with 6 heads (no Hadamard of
order 6: full-width online rotation on o_proj's input), Qwen2 (q/k/v biases, head dim 12: a
non-symmetric Paley Hadamard) and Gemma-3 (online variant), all in float64 with random norm weights
and biases, so that every fused scale and rotated bias matters; plus SmolLM2-135M in float64."""

from __future__ import annotations

import pytest
import torch
from test_recipe import assert_restored as params_restored
from test_recipe import snapshot
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from stamp_lib.methods import features
from stamp_lib.model import quarot, recipe
from stamp_lib.model.recipe import ActQuant, Recipe, Rule, WeightQuant

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 128
IDS = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))


def _randomize(model, gemma):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:  # non-trivial norm scales: the fusion is tested
                p.copy_((0.0 if gemma else 1.0) + 0.3 * torch.randn(p.shape, generator=g))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.double().eval()


def tiny(arch):
    torch.manual_seed(0)
    common = dict(num_hidden_layers=2, vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="sdpa")
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                          tie_word_embeddings=True,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **common)
        return _randomize(LlamaForCausalLM(cfg), False)
    if arch == "llama6":
        cfg = LlamaConfig(hidden_size=96, intermediate_size=128, num_attention_heads=6, num_key_value_heads=2,
                          **common)
        return _randomize(LlamaForCausalLM(cfg), False)
    if arch == "qwen2":
        cfg = Qwen2Config(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, **common)
        return _randomize(Qwen2ForCausalLM(cfg), False)
    if arch == "gemma3":
        cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                               head_dim=16, sliding_window=8, query_pre_attn_scalar=32,
                               layer_types=["sliding_attention", "full_attention"], **common)
        return _randomize(Gemma3ForCausalLM(cfg), True)
    raise KeyError(arch)


ARCHS = ["llama", "llama6", "qwen2", "gemma3"]


def assert_restored(model, snap):
    """Every parameter object and value is back (test_recipe's check) and no hook is left."""
    params_restored(model, snap)
    assert not [n for n, m in model.named_modules() if m._forward_pre_hooks or m._forward_hooks]
    assert model.config._attn_implementation == "sdpa"


def logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(ids, **kw).logits


def max_err(a, b):
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- full-precision equivalence
@pytest.mark.parametrize("arch", ARCHS)
def test_unquantized_quarot_recipe_computes_the_same_logits_and_restores_the_model(arch):
    model = tiny(arch)
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == (arch in ("llama", "gemma3"))
    ref = logits(model)
    snap = snapshot(model)
    r = Recipe(Rule("*"), network="quarot", network_seed=1)  # every linear, lm_head included; no quantization
    prep = recipe.prepare(model, r, progress=False)
    assert_restored(model, snap)
    with recipe.apply(model, r, prep):
        assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied for the duration
        out = logits(model)
    # float64 model; transformers' RMSNorms compute in float32, so agreement is ~1e-7, not 1e-15
    assert max_err(out, ref) < 1e-5, max_err(out, ref)
    assert_restored(model, snap)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    # rules that match only part of the model: the online transforms of the other layers are left out
    # (their input stays plain, their weight rotated but unfolded): still exact
    part = Recipe(Rule("*.mlp.*"), network="quarot", network_seed=1)
    with recipe.apply(model, part, recipe.prepare(model, part, progress=False)):
        assert max_err(logits(model), ref) < 1e-5
    # the standalone context (online transforms by its own hooks) agrees too
    with quarot.rotated(model, prep.plan):
        assert max_err(logits(model), ref) < 1e-5
    assert_restored(model, snap)


def test_the_rotation_is_applied_inside():
    model = tiny("llama")
    plan = quarot.quarot_plan(model, seed=3)
    Q = plan.residual.matrix()
    with torch.no_grad():
        ref = model(IDS, output_hidden_states=True)
        seen = []

        def spy(module, args):
            seen.append(args[0])

        h = model.model.layers[1].self_attn.q_proj.register_forward_pre_hook(spy)
        model(IDS)
        calls = []
        qk = plan.qk.forward
        plan.qk.forward = lambda x: (calls.append(tuple(x.shape)), qk(x))[1]
        with quarot.rotated(model, plan):
            out = model(IDS, output_hidden_states=True)
        h.remove()
        seen_q, rot_q = seen
    # the residual stream inside is the original one times Q (embeddings and every layer's output)
    for a, b in zip(ref.hidden_states[:-1], out.hidden_states[:-1]):
        assert max_err(b, a @ Q) < 1e-6
        assert max_err(b, a) > 1e-2
    assert max_err(out.logits, ref.logits) < 1e-5
    # q_proj reads the rotated, unit-scale norm output: not what it read before
    assert max_err(rot_q, seen_q) > 1e-2
    # queries and keys rotated in every attention layer: (B, H, S, D) and (B, H_kv, S, D)
    assert calls == [(2, 4, 20, 16), (2, 2, 20, 16)] * 2
    torch.testing.assert_close(plan.qk.matrix(), features.hadamard_rotation(16).matrix(), rtol=0, atol=0)


def test_the_seed_changes_the_signs_not_the_function():
    model = tiny("llama")
    ref = logits(model)
    a, b, a2 = quarot.quarot_plan(model, seed=0), quarot.quarot_plan(model, seed=1), quarot.quarot_plan(model, seed=0)
    assert not torch.equal(a.residual.signs, b.residual.signs)
    assert torch.equal(a.residual.signs, a2.residual.signs)
    assert set(a.params) == set(b.params)
    emb = "model.embed_tokens.weight"
    assert torch.equal(a.params[emb], a2.params[emb]) and not torch.equal(a.params[emb], b.params[emb])
    for p in (a, b):
        with quarot.rotated(model, p):
            assert max_err(logits(model), ref) < 1e-5
    g = tiny("gemma3")
    ga, gb = quarot.quarot_plan(g, seed=0), quarot.quarot_plan(g, seed=1)
    n = "model.layers.0.mlp.down_proj"
    assert ga.residual is None and not torch.equal(ga.online[n].signs, gb.online[n].signs)


@pytest.mark.parametrize("arch, label, fused, choice", [
    ("llama", quarot.LLAMA_LABEL, True, "across heads H_4 (x) I_16"),
    ("llama6", quarot.LLAMA_LABEL, True, "no Hadamard of order 6 (heads) exists, so o_proj's input gets an online "
                                         "Hadamard of its full width H_96"),
    ("qwen2", quarot.LLAMA_LABEL, True, "H_12 after RoPE"),
    ("gemma3", quarot.GEMMA3_LABEL, False, "rotated online by D H_n/sqrt(n)"),
])
def test_the_plan_names_its_variant(arch, label, fused, choice):
    plan = quarot.quarot_plan(tiny(arch), seed=2)
    assert plan.label == label and plan.fused is fused and plan.seed == 2
    assert plan.description.startswith(label) and choice in plan.description
    assert "seed 2" in plan.description
    assert label != quarot.GEMMA3_LABEL or label == ("QuaRot (online rotations: Gemma-3's post-norms forbid fusing "
                                                     "the residual rotation)")
    if arch == "llama":
        assert isinstance(plan.online["model.layers.0.self_attn.o_proj"], quarot.HeadsRotation)
        assert plan.online["model.layers.0.mlp.down_proj"].signs is None  # plain, as QuaRot's online ones
        assert "model.layers.0.self_attn.q_proj" not in plan.online
    if arch == "gemma3":
        assert len(plan.online) == 2 * 7 + 1  # every linear, lm_head included
        # no norm is fused (Gemma's 1 + w reach ~100: fused into 4-bit weight rows they ruined them);
        # only the head-wise value rotation changes parameters
        assert {k.rsplit(".", 2)[-2] for k in plan.params} == {"v_proj", "o_proj"}


def test_heads_rotation_is_r_kron_identity():
    T = quarot.HeadsRotation(features.hadamard_rotation(4), 3)
    x = torch.randn(5, 12, dtype=torch.float64)
    M = T.matrix()
    torch.testing.assert_close(T.forward(x), x @ M, rtol=0, atol=1e-14)
    torch.testing.assert_close(T.inverse(T.forward(x)), x, rtol=0, atol=1e-14)
    torch.testing.assert_close(T.fold_weight(x), x @ M, rtol=0, atol=1e-14)
    torch.testing.assert_close(T.fold_reader(x), x @ M.T, rtol=0, atol=1e-14)
    torch.testing.assert_close(M @ M.T, torch.eye(12, dtype=torch.float64), rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- SmolLM2-135M
def test_smollm2_in_float64_is_unchanged_by_quarot():
    from stamp_lib.zoo import models

    model, _ = models.load_smollm2()
    model = model.double()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    ref = logits(model, ids)
    snap = snapshot(model)
    r = Recipe(Rule("model.layers.*"), network="quarot", network_seed=0)
    prep = recipe.prepare(model, r, progress=False)
    assert "full width H_576" in prep.plan.description
    with recipe.apply(model, r, prep):
        out = logits(model, ids)
    err = max_err(out, ref)
    print(f"SmolLM2-135M float64, 64 tokens: max |logit error| = {err:.3g} (max |logit| {float(ref.abs().max()):.3g})")
    assert err < 1e-4
    assert_restored(model, snap)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ----------------------------------------------------------------------------- quantized
def test_w4a4_rtn_with_quarot_runs_spends_the_bits_and_shares_its_preparation():
    model = tiny("llama").float()
    ref = logits(model)
    snap = snapshot(model)
    w4a4 = Recipe(Rule("model.layers.*", act=ActQuant(4), weight=WeightQuant(4)), network="quarot", network_seed=0)
    stamp = Recipe(Rule("model.layers.*", act=ActQuant("8x8+4", transform="dwt"), weight=WeightQuant(4)),
                   network="quarot", network_seed=0)
    assert w4a4.prep_key() == stamp.prep_key()
    assert w4a4.prep_key() != Recipe(w4a4.rules, network="quarot", network_seed=1).prep_key()
    assert w4a4.prep_key() != Recipe(w4a4.rules).prep_key()
    assert w4a4.knobs()["network"] == "quarot" and "network" not in Recipe(w4a4.rules).knobs()
    prep = recipe.prepare(model, w4a4, progress=False)
    assert set(prep.features) == {f"model.layers.{i}.{n}" for i in range(2)
                                  for n in ("self_attn.o_proj", "mlp.down_proj")}
    # RTN W4 symmetric per output channel: at most 16 levels per row, in the rotated basis
    Wq = prep.weights["model.layers.0.self_attn.q_proj"]
    assert max(len(torch.unique(row)) for row in Wq) <= 16
    outs = {}
    for name, r in (("w4a4", w4a4), ("stamp", stamp)):
        with recipe.apply(model, r, prep) as st:
            outs[name] = logits(model)
        assert_restored(model, snap)
        n_lin = 2 * 7
        assert st.stats.keys() >= {f"model.layers.{i}.mlp.down_proj" for i in range(2)} and len(st.stats) == n_lin
        want = 4.0 if name == "w4a4" else (8 * 8 + 12 * 4) / 20
        assert st.average_bits("act") == pytest.approx(want)
    for o in outs.values():
        assert torch.isfinite(o).all() and 1e-3 < max_err(o, ref.float()) < 10


def test_gptq_sees_the_rotated_inputs():
    """GPTQ's Hessians are those of the inputs the quantized layer sees in the rotated network (the
    rotated residual, then R^T H R for an online transform R): on those inputs, its layer output
    error is well below RTN's. (Hessians of the original inputs would not fit the rotated weights.)"""
    model = tiny("llama").float()
    preps = {}
    for m in (None, "rtn", "gptq"):
        wq = None if m is None else WeightQuant(3, method=m)
        r = Recipe(Rule("model.layers.*", weight=wq), network="quarot", network_seed=0)
        preps[m] = (r, recipe.prepare(model, r, CALIB, progress=False))
    X = {}
    r, fp = preps[None]
    with recipe.apply(model, r, fp, observe=lambda n, xr, out: X.setdefault(n, []).append(xr.reshape(-1, xr.shape[-1]))):
        logits(model, CALIB)
    assert set(X) == set(fp.features)  # o_proj and down_proj: the layers with an online transform
    for n, xs in X.items():
        x = torch.cat(xs).double()
        W = fp.weights[n].double()  # the rotated, folded full-precision weight
        err = {m: float((x @ (preps[m][1].weights[n].double() - W).T).pow(2).sum()) for m in ("rtn", "gptq")}
        assert err["gptq"] < 0.7 * err["rtn"], (n, err)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sequential_gptq_on_the_rotated_network_differs_only_where_expected(arch):
    """GPTQ layer by layer (``sequential=True``, the published order of QuaRot's ``gptq_fwrd``) inside
    QuaRot: layer 0's q/k/v read the same rotated inputs as in the one-pass preparation (nothing is
    quantized before them), so their weights are identical; every later group's Hessian comes from
    the inputs of the weight-quantized layers before it, so its weights differ. On the inputs that
    the sequentially quantized network feeds its online-rotated layers, its weights' output error is
    well below RTN's, and the model is restored."""
    model = tiny(arch).float()
    snap = snapshot(model)
    preps = {}
    for name, wq in (("rtn", WeightQuant(3)), ("once", WeightQuant(3, method="gptq")),
                     ("seq", WeightQuant(3, method="gptq", sequential=True))):
        r = Recipe(Rule("model.layers.*", weight=wq), network="quarot", network_seed=0)
        preps[name] = (r, recipe.prepare(model, r, CALIB, progress=False))
    assert_restored(model, snap)
    seq, once = preps["seq"][1], preps["once"][1]
    assert seq.info["gptq"] == "sequential" and seq.features.keys() == once.features.keys()
    first = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    for n in once.weights:
        assert torch.equal(seq.weights[n], once.weights[n]) == (n in first), n
    # the inputs of the rotated, weight-quantized network (activations in full precision)
    X = {}
    r = Recipe(Rule("model.layers.*", weight=WeightQuant(3, method="gptq", sequential=True)), network="quarot",
               network_seed=0)
    with recipe.apply(model, r, seq, observe=lambda n, xr, out: X.setdefault(n, []).append(xr.reshape(-1, xr.shape[-1]))):
        logits(model, CALIB)
    fp = recipe.prepare(model, Recipe(Rule("model.layers.*"), network="quarot", network_seed=0), progress=False)
    assert X and set(X) <= set(fp.weights)
    for n, xs in X.items():
        x = torch.cat(xs).double()
        W = fp.weights[n].double()
        err = {m: float((x @ (preps[m][1].weights[n].double() - W).T).pow(2).sum()) for m in ("rtn", "seq")}
        assert err["seq"] < 0.7 * err["rtn"], (n, err)
    with recipe.apply(model, r, seq):
        assert torch.isfinite(logits(model)).all()
    assert_restored(model, snap)


def test_kv_quantization_with_quarot_quantizes_the_rotated_keys():
    model = tiny("llama").float()
    ref = logits(model)
    r = Recipe(Rule("model.layers.*"), kv=ActQuant(8), network="quarot", network_seed=0)
    with recipe.apply(model, r) as st:
        out = logits(model)
    assert st.average_bits("kv") == 8.0 and max_err(out, ref) < 0.05


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="feature=None in every rule"):
        Recipe(Rule("*", feature="hadamard"), network="quarot")
    with pytest.raises(ValueError, match="unknown network preparation"):
        Recipe(Rule("*"), network="quarot2")
    with pytest.raises(ValueError, match="needs network='quarot'"):
        Recipe(Rule("*"), network_seed=3)
    with pytest.raises(ValueError, match="network_seed must be an int"):
        Recipe(Rule("*"), network="quarot", network_seed=-1)
    toy = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Supported: Llama-style"):
        quarot.quarot_plan(toy)
    model = tiny("llama")
    r = Recipe(Rule("*"), network="quarot")
    plain = recipe.prepare(model, Recipe(Rule("*")), progress=False)
    with pytest.raises(ValueError, match="other feature/weight settings"):
        with recipe.apply(model, r, plain):
            pass
    plan = quarot.quarot_plan(model)
    model.float()
    with pytest.raises(ValueError, match="build the plan again"):
        with quarot.rotated(model, plan):
            pass
    model.double()
    with quarot.rotated(model, plan, online=False):
        with pytest.raises(RuntimeError, match="already rotated"):
            with quarot.rotated(model, plan):
                pass


def test_restored_after_an_exception_inside():
    model = tiny("gemma3")
    snap = snapshot(model)
    r = Recipe(Rule("*", act=ActQuant(4)), network="quarot", network_seed=0)
    with pytest.raises(RuntimeError, match="boom"):
        with recipe.apply(model, r):
            logits(model)
            raise RuntimeError("boom")
    assert_restored(model, snap)
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_gemma3_variant_keeps_4bit_weights_usable():
    """Exact in full precision is not enough: an earlier Gemma-3 variant fused the pre-norm scales
    1 + w (up to ~100 on Gemma-3-270M, some near 0) into q/k/v and gate/up, exact but ruinous for
    4-bit weight rows (W4A16: 32 nats per token against RTN's 4.3 on a 256-token window). Weights-only
    W4 under the variant must stay near RTN's on real text. (Tiny random configs with uneven norm
    scales do not show the effect: it needs the real model's weights.)"""
    from stamp_lib.zoo import models, text

    model, tok = models.load_gemma3_270m()
    ev = text.token_windows(tok, text.wiki_split()[1], 128, 1)
    w4 = Rule("model.layers.*", weight=WeightQuant(4))
    nll = {}
    for name, r in (("rtn", Recipe((w4,))), ("quarot", Recipe((w4,), network="quarot", network_seed=0))):
        with recipe.apply(model, r, recipe.prepare(model, r, progress=False)):
            nll[name] = float(models.window_nll(model, ev, progress=False).mean())
    print(f"Gemma-3-270M, 128 tokens, W4 RTN weights: NLL {nll}")
    assert nll["quarot"] < nll["rtn"] + 0.5
