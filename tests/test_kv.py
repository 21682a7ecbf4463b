"""KV-cache fake quantization through transformers' attention interface (stamp_lib.kv).

Tiny random-init Llama and Gemma 3 models built from configs (nothing downloaded). Gemma 3 gets a
sliding window shorter than the prompt, so its local layers really slide."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AttentionInterface,
    AttentionMaskInterface,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
)
from transformers.models.gemma3 import modeling_gemma3
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from stamp_lib.model.kv import kv_quantization

pytestmark = pytest.mark.usefixtures("one_thread")

IMPLS = ["sdpa", "eager"]
PROMPT = 20  # longer than the Gemma 3 sliding window below
WINDOW = 8


def tiny_llama(impl, layers=2, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                      attn_implementation=impl)
    return _ready(LlamaForCausalLM(cfg), dtype)


def tiny_gemma(impl, dtype=torch.float32):
    torch.manual_seed(0)
    # query_pre_attn_scalar != head_dim: dropping the `scaling` kwarg would change the logits.
    cfg = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
                           sliding_window=WINDOW, query_pre_attn_scalar=32,
                           layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                           attn_implementation=impl)
    return _ready(Gemma3ForCausalLM(cfg), dtype)


def _ready(model, dtype):
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # always generate max_new_tokens tokens
    model.generation_config.pad_token_id = 0
    return model


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma}


def ids_for(model, batch=2, length=PROMPT, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=g)


def kv_shape(cfg, batch, s):
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (batch, cfg.num_key_value_heads, s, head_dim)


def coarse(x, levels=3):
    """Per-token symmetric rounding to 2 * levels + 1 values: a real, strongly lossy quantizer that
    treats each token on its own. ``levels`` broadcasts against (..., S, 1)."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny) / levels
    return torch.round(x / scale) * scale


def offset_aware(layer_idx, kind, x, offset):
    """Coarse rounding whose grid depends on the absolute position (1 to 4 levels, cycling), so
    any wrong offset changes the result."""
    positions = offset + torch.arange(x.shape[-2])
    return coarse(x, levels=(1 + positions % 4)[:, None].to(x.dtype))


class Recorder:
    def __init__(self, fn=None):
        self.calls = []
        self.fn = fn

    def __call__(self, layer_idx, kind, x, offset):
        self.calls.append((layer_idx, kind, tuple(x.shape), offset))
        return x if self.fn is None else self.fn(layer_idx, kind, x, offset)


def no_leftovers(model):
    stamp = [k for k in AttentionInterface._global_mapping if k.startswith("stamp_kv")]
    stamp += [k for k in AttentionMaskInterface._global_mapping if k.startswith("stamp_kv")]
    hooks = [name for name, m in model.named_modules() if m._forward_pre_hooks]
    return stamp == [] and hooks == []


# --- identity quantizer: same logits, every layer and kind seen once with the right shape -------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", MODELS)
def test_identity_quantizer_matches_plain_model_and_sees_every_layer(arch, impl):
    model = MODELS[arch](impl)
    ids = ids_for(model)
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        rec = Recorder()
        with kv_quantization(model, rec):
            wrapped = model(ids, use_cache=False).logits
    torch.testing.assert_close(wrapped, plain)
    cfg = model.config
    expected = [(layer, kind, kv_shape(cfg, *ids.shape), 0)
                for layer in range(cfg.num_hidden_layers) for kind in ("key", "value")]
    assert rec.calls == expected


@pytest.mark.parametrize("impl", IMPLS)
def test_every_argument_reaches_the_original_implementation_unchanged(impl, monkeypatch):
    """A spy in place of the delegated function (sdpa in the registry, or Gemma 3's own
    eager_attention_forward) sees the same query, keys, values and kwargs with and without the
    context (identity quantizer): sliding_window, scaling, dropout, position_ids all pass through."""
    model = tiny_gemma(impl)
    ids = ids_for(model)
    seen = []
    if impl == "sdpa":
        original = AttentionInterface._global_mapping["sdpa"]
    else:
        original = modeling_gemma3.eager_attention_forward

    def spy(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append((module.layer_idx, query, key, value, attention_mask, args, kwargs))
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    if impl == "sdpa":
        monkeypatch.setitem(AttentionInterface._global_mapping, "sdpa", spy)
    else:
        monkeypatch.setattr(modeling_gemma3, "eager_attention_forward", spy)
    with torch.no_grad():
        model(ids, use_cache=False)
        plain, seen[:] = list(seen), []
        with kv_quantization(model, lambda layer, kind, x, offset: x):
            model(ids, use_cache=False)
    assert len(seen) == len(plain) == model.config.num_hidden_layers
    assert {c[-1]["sliding_window"] for c in plain} == {WINDOW, None}
    for a, b in zip(plain, seen):
        assert a[0] == b[0]
        for x, y in zip(a[1:5], b[1:5]):
            assert (x is None and y is None) or torch.equal(x, y)
        assert a[5] == b[5] and a[6].keys() == b[6].keys()
        for k, v in a[6].items():
            assert torch.equal(v, b[6][k]) if isinstance(v, torch.Tensor) else v == b[6][k], k


# --- a real quantizer equals attention computed by hand (keys after RoPE, values, q untouched) -

def manual_logits(model, ids, quant_k, quant_v, quant_q=lambda q: q, quantize_before_rope=False):
    """One-layer Llama forward written out: the model's own projections, norms, MLP, rotary
    embedding and apply_rotary_pos_emb; attention computed here."""
    cfg = model.config
    layer = model.model.layers[0]
    attn = layer.self_attn
    b, s = ids.shape
    d = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_attention_heads // cfg.num_key_value_heads
    x = model.model.embed_tokens(ids)
    cos, sin = model.model.rotary_emb(x, torch.arange(s)[None])
    h = layer.input_layernorm(x)
    q = attn.q_proj(h).view(b, s, -1, d).transpose(1, 2)
    k = attn.k_proj(h).view(b, s, -1, d).transpose(1, 2)
    v = attn.v_proj(h).view(b, s, -1, d).transpose(1, 2)
    if quantize_before_rope:
        k = quant_k(k)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if not quantize_before_rope:
        k = quant_k(k)
    v, q = quant_v(v), quant_q(q)
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) / d**0.5
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    weights = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    out = attn.o_proj((weights @ v).transpose(1, 2).reshape(b, s, -1))
    h = x + out
    h = h + layer.mlp(layer.post_attention_layernorm(h))
    return model.lm_head(model.model.norm(h))


@pytest.mark.parametrize("impl", IMPLS)
def test_real_quantizer_equals_manual_attention(impl):
    model = tiny_llama(impl, layers=1, dtype=torch.float64)
    ids = ids_for(model)
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        with kv_quantization(model, lambda layer, kind, x, offset: coarse(x)):
            got = model(ids, use_cache=False).logits
        want = manual_logits(model, ids, coarse, coarse)
        torch.testing.assert_close(manual_logits(model, ids, lambda k: k, lambda v: v), plain)
        wrong = {
            "quantization off": plain,
            "q quantized too": manual_logits(model, ids, coarse, coarse, quant_q=coarse),
            "keys before RoPE": manual_logits(model, ids, coarse, coarse, quantize_before_rope=True),
            "values untouched": manual_logits(model, ids, coarse, lambda v: v),
        }
    torch.testing.assert_close(got, want)
    tol = 1e3 * (got - want).abs().max() + 1e-9  # each alternative must be far from the match above
    for name, alt in wrong.items():
        assert (alt - want).abs().max() > tol, name


# --- restoring the model ------------------------------------------------------------------------

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", MODELS)
def test_implementation_restored_on_exit_and_on_error(arch, impl):
    model = MODELS[arch](impl)
    ids = ids_for(model)
    with torch.no_grad():
        before = model(ids).logits
        with kv_quantization(model, lambda layer, kind, x, offset: coarse(x)):
            assert model.config._attn_implementation.startswith("stamp_kv")
            assert not torch.allclose(model(ids).logits, before)
        assert model.config._attn_implementation == impl and no_leftovers(model)
        assert torch.equal(model(ids).logits, before)

        with pytest.raises(KeyError, match="inside the block"):
            with kv_quantization(model, lambda layer, kind, x, offset: coarse(x)):
                model(ids)
                raise KeyError("inside the block")
        assert model.config._attn_implementation == impl and no_leftovers(model)
        assert torch.equal(model(ids).logits, before)

        def bad(layer, kind, x, offset):
            return x[..., :-1]

        with pytest.raises(ValueError, match="must return a tensor of shape"):
            with kv_quantization(model, bad):
                model(ids)
        assert model.config._attn_implementation == impl and no_leftovers(model)
        assert torch.equal(model(ids).logits, before)


def test_nested_contexts_and_two_models_do_not_clobber_each_other():
    gemma, llama = tiny_gemma("sdpa"), tiny_llama("eager")
    g_ids, l_ids = ids_for(gemma), ids_for(llama)
    outer, inner, other = Recorder(), Recorder(), Recorder()
    n_g = 2 * gemma.config.num_hidden_layers
    with torch.no_grad(), kv_quantization(gemma, outer), kv_quantization(llama, other):
        outer_name = gemma.config._attn_implementation
        with kv_quantization(gemma, inner):
            gemma(g_ids, use_cache=False)
        assert gemma.config._attn_implementation == outer_name
        assert inner.calls == outer.calls and len(inner.calls) == n_g  # inner runs first, outer sees its output
        assert other.calls == []
        llama(l_ids, use_cache=False)
        assert len(other.calls) == 2 * llama.config.num_hidden_layers and len(outer.calls) == n_g
        gemma(g_ids, use_cache=False)
        assert len(inner.calls) == n_g and len(outer.calls) == 2 * n_g
    assert (gemma.config._attn_implementation, llama.config._attn_implementation) == ("sdpa", "eager")
    assert no_leftovers(gemma) and no_leftovers(llama)


# --- generation with a cache ------------------------------------------------------------------

def expected_decode_calls(cfg, prompt, new_tokens):
    """(layer, S, offset) per forward of greedy generation with a DynamicCache: the prefill sees the
    prompt; decoding step t sees every token so far in full-attention layers, and in sliding layers
    only the last sliding_window of them (the cache keeps sliding_window - 1 past tokens), whose
    first one sits at absolute position (tokens so far) - S."""
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers
    calls = []
    for t in range(new_tokens):
        total = prompt + t
        for layer, kind in enumerate(types):
            s = min(total, cfg.sliding_window) if (kind == "sliding_attention" and t > 0) else total
            calls.append((layer, s, total - s))
    return calls


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", MODELS)
def test_generate_sees_the_cache_with_honest_offsets(arch, impl):
    model = MODELS[arch](impl)
    ids = ids_for(model, batch=1)
    new = 5
    with torch.no_grad():
        plain = model.generate(ids, max_new_tokens=new, do_sample=False)
        rec = Recorder()
        with kv_quantization(model, rec):
            out = model.generate(ids, max_new_tokens=new, do_sample=False)
    assert torch.equal(out, plain) and out.shape[-1] == PROMPT + new
    keys = [(layer, shape[2], offset) for layer, kind, shape, offset in rec.calls if kind == "key"]
    assert keys == expected_decode_calls(model.config, PROMPT, new)
    if arch == "gemma3":
        assert any(offset > 0 for _, _, offset in keys)  # the local layers really slid
    assert [c[2] for c in rec.calls[1::2]] == [c[2] for c in rec.calls[0::2]]  # values shaped as keys


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("impl", IMPLS)
def test_cached_decoding_equals_full_recomputation_with_offset_aware_quantizer(impl, cache):
    """Greedy decoding through the sliding cache (dynamic, or static with its preallocated buffers)
    gives the same logits as recomputing the whole
    sequence without a cache, for a quantizer whose output depends on the absolute position. The
    same quantizer told a wrong offset (0, or off by one) does not, so the test can see an offset bug."""
    model = tiny_gemma(impl, dtype=torch.float64)
    ids = ids_for(model, batch=1)
    new = 5

    def decode_and_recompute(quantize):
        with kv_quantization(model, quantize):
            out = model.generate(ids, max_new_tokens=new, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, cache_implementation=cache)
            cached = torch.stack(out.logits, 1)  # generate hands logits back in float32
            full = model(out.sequences[:, :-1], use_cache=False).logits[:, PROMPT - 1:].to(cached.dtype)
        return cached, full

    with torch.no_grad():
        cached, full = decode_and_recompute(offset_aware)
        torch.testing.assert_close(cached, full)
        for wrong in (lambda offset: 0, lambda offset: offset + 1 if offset else 0):
            blind, full_blind = decode_and_recompute(
                lambda layer, kind, x, offset: offset_aware(layer, kind, x, wrong(offset)))
            torch.testing.assert_close(blind[:, 0], full_blind[:, 0])  # prefill: offset is 0 anyway
            assert (blind - full_blind).abs().max() > 1e3 * (cached - full).abs().max() + 1e-9


# --- clear errors --------------------------------------------------------------------------------

def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        with kv_quantization(nn.Linear(4, 4), lambda *a: a[2]):
            pass

    model = tiny_llama("sdpa")
    ids = ids_for(model)
    for m in model.modules():
        if hasattr(m, "layer_idx"):
            del m.layer_idx
    with pytest.raises(ValueError, match="layer_idx"):
        with kv_quantization(model, lambda *a: a[2]):
            pass
    assert model.config._attn_implementation == "sdpa"

    model = tiny_llama("sdpa")
    del model.model.layers[1].self_attn.layer_idx
    with pytest.raises(ValueError, match="LlamaAttention has no integer layer_idx"):
        with torch.no_grad(), kv_quantization(model, lambda *a: a[2]):
            model(ids, use_cache=False)
    assert model.config._attn_implementation == "sdpa" and no_leftovers(model)

    model = tiny_llama("sdpa")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(NotImplementedError, match="'flash_attention_2'"):
        with kv_quantization(model, lambda *a: a[2]):
            pass
    assert model.config._attn_implementation == "flash_attention_2" and no_leftovers(model)


# --- head-wise query/key rotation (QuaRot's online Hadamard after RoPE) ---------------------------

def _orthogonal(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q.float()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", MODELS)
def test_qk_rotation_keeps_the_logits_and_the_quantizer_sees_rotated_keys(arch, impl):
    model = MODELS[arch](impl)
    ids = ids_for(model)
    H = _orthogonal(kv_shape(model.config, 1, 1)[-1])
    seen = {}

    def keep(tag):
        def quantize(layer_idx, kind, x, offset):
            seen[(tag, layer_idx, kind)] = x.clone()
            return x
        return quantize

    queries = []

    def rotate(x):
        queries.append(tuple(x.shape))
        return x @ H

    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        with kv_quantization(model, keep("plain")):
            model(ids, use_cache=False)
        with kv_quantization(model, keep("rot"), qk_rotation=rotate):
            rot = model(ids, use_cache=False).logits
        with kv_quantization(model, qk_rotation=lambda x: x @ H):  # no quantizer: the rotation alone
            alone = model(ids, use_cache=False).logits
    torch.testing.assert_close(rot, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, plain, atol=1e-5, rtol=1e-5)
    cfg = model.config
    for layer in range(cfg.num_hidden_layers):
        k0, k1 = seen[("plain", layer, "key")], seen[("rot", layer, "key")]
        torch.testing.assert_close(k1, k0 @ H, atol=1e-5, rtol=1e-5)
        assert (k1 - k0).abs().max() > 1e-2
        v0, v1 = seen[("plain", layer, "value")], seen[("rot", layer, "value")]  # values untouched
        assert torch.equal(v1, v0) if layer == 0 else torch.allclose(v1, v0, atol=1e-5, rtol=1e-5)
    q_shape = (*ids.shape[:1], cfg.num_attention_heads, ids.shape[1], H.shape[0])
    assert queries == [q_shape, kv_shape(cfg, *ids.shape)] * cfg.num_hidden_layers
    assert no_leftovers(model)


def test_qk_rotation_errors_name_the_problem():
    model = tiny_llama("sdpa")
    with pytest.raises(ValueError, match="nothing to do"):
        with kv_quantization(model):
            pass
    with pytest.raises(ValueError, match="qk_rotation of the query"):
        with torch.no_grad(), kv_quantization(model, qk_rotation=lambda x: x[..., :1]):
            model(ids_for(model), use_cache=False)
    assert model.config._attn_implementation == "sdpa" and no_leftovers(model)
