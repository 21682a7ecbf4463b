"""FlatQuant (stamp_lib.methods.flatquant: transforms, quantizers, calibration loop;
stamp_lib.model.flatquant: the decoder-level method) against dense references, the core quantizer,
and the unquantized model (float64 tiny random Llama with GQA and tied embeddings, Llama with 6
heads, Qwen2 with q/k/v biases, Gemma-3 with sliding and full layers)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_quarot import CALIB, IDS, assert_restored, logits, max_err, tiny
from test_recipe import snapshot

from stamp_lib.core import quant
from stamp_lib.methods import flatquant as fq
from stamp_lib.model import flatquant as fm

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- building blocks
def _published_search(n):
    """FlatQuant's get_decompose_dim, for the widths where it ends (n not 2 mod 4)."""
    a = math.isqrt(n)
    a += a * a < n
    while True:
        k = math.isqrt(a * a - n)
        if k * k == a * a - n:
            return a - k, a + k
        a += 1


def test_decompose_dim_is_the_published_search_and_ends_everywhere():
    for n in range(1, 700):
        a, b = fq.decompose_dim(n)
        assert a * b == n and a <= b
        if n % 4 != 2:
            assert (a, b) == _published_search(n), n
    assert [fq.decompose_dim(n) for n in (576, 1536, 2048, 640, 6)] == [(24, 24), (32, 48), (32, 64), (20, 32), (2, 3)]
    with pytest.raises(ValueError, match="int >= 1"):
        fq.decompose_dim(0)


def _trained_looking(sizes, diag, seed=0):
    T = fq.KronAffine(sizes, diag=diag, seed=seed, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in T.factors:
            f.sigma.copy_(0.5 + torch.rand(f.n, generator=g, dtype=torch.float64))
        if diag:
            T.diag.copy_(0.2 + 2 * torch.rand(T.d, generator=g, dtype=torch.float64))
    return T


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=2), diag=st.booleans(), seed=st.integers(0, 99))
def test_kron_affine_is_the_dense_kronecker_product_and_inverts(sizes, diag, seed):
    T = _trained_looking(sizes, diag, seed)
    K = T.frozen()
    R = K.matrix()
    P = torch.kron(T.factors[0].matrix(), T.factors[1].matrix()) if len(sizes) == 2 else T.factors[0].matrix()
    dense = (T.diag[:, None] * P if diag else P).detach()
    torch.testing.assert_close(R, dense, rtol=1e-12, atol=1e-12)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, T.d, generator=g, dtype=torch.float64)
    W = torch.randn(5, T.d, generator=g, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(T(x), x @ R, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(T.fold_weight(W), W @ torch.linalg.inv(R).T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(K.forward(x), x @ R, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(K.inverse(K.forward(x)), x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(K.forward(x) @ K.fold_weight(W).T, x @ W.T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(K.fold_reader(W), W @ R.T, rtol=1e-10, atol=1e-10)
    assert math.isclose(T.condition(), float(torch.linalg.cond(P.detach())), rel_tol=1e-6)


def test_orthogonal_factors_and_the_cayley_start():
    T = fq.KronAffine((8,), sigma=False, seed=3, dtype=torch.float64)
    P = T.frozen().matrix()
    torch.testing.assert_close(P @ P.T, torch.eye(8, dtype=torch.float64), rtol=0, atol=1e-12)
    assert T.condition() == 1.0
    assert not torch.allclose(P, torch.eye(8, dtype=torch.float64))  # a random start, not the identity
    assert fq.KronAffine((8,), seed=3).frozen().matrix().allclose(fq.KronAffine((8,), seed=3).frozen().matrix())


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantizers_equal_the_core_quantizer_without_clipping(bits):
    X = torch.randn(6, 32, generator=torch.Generator().manual_seed(bits), dtype=torch.float64)
    torch.testing.assert_close(fq.quant_act(X, bits), quant.fake_quant(X, bits, symmetric=True), rtol=0, atol=1e-12)
    # rows with both signs: FlatQuant's range [min(x, 0), max(x, 0)] is the row's, zero point rounded
    torch.testing.assert_close(fq.quant_act(X, bits, symmetric=False),
                               quant.fake_quant(X, bits, round_zero_point=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(fq.quant_weight(X, bits), quant.fake_quant(X, bits, symmetric=True), rtol=0, atol=1e-12)
    clip = fq.ClipFactors((6, 1), torch.float64)
    with torch.no_grad():
        clip.hi.fill_(60.0)
        clip.lo.fill_(60.0)  # sigmoid(60) = 1 in float64
    torch.testing.assert_close(fq.quant_weight(X, bits, clip), quant.fake_quant(X, bits, symmetric=True))


def test_clipping_narrows_the_range_and_gradients_reach_every_parameter():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 16, generator=g)
    clip = fq.ClipFactors((4, 1))
    Wq = fq.quant_weight(X, 4, clip)
    ratio = torch.sigmoid(torch.tensor(fq.CLIP_INIT))
    assert float(Wq.detach().amax()) <= float(X.amax() * ratio) + 1e-6
    T = fq.KronAffine((4, 4), diag=True, seed=1)
    aclip = fq.ClipFactors((1,))
    loss = (fq.quant_act(T(X), 4, aclip) @ fq.quant_weight(T.fold_weight(X), 4, clip).T - X @ X.T).pow(2).mean()
    loss.backward()
    for name, p in [*T.named_parameters(), *clip.named_parameters(), *aclip.named_parameters()]:
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name


def test_fit_lowers_the_loss_of_a_block_and_checks_its_arguments():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 16, generator=g)
    X = torch.randn(8, 32, 16, generator=g)
    X[..., 3] *= 20  # an outlier channel: what the transform is for
    T = fq.KronAffine((4, 4), diag=True, seed=0)
    clip = fq.ClipFactors((1,))
    log = fq.fit(lambda x: fq.quant_act(T(x), 4, clip) @ T.fold_weight(W).T, X, X @ W.T, T.parameters(),
                 clip.parameters(), epochs=10, batch_size=4, lr=5e-3)
    assert len(log.epochs) == 10 and log.final < 0.8 * log.initial
    with pytest.raises(ValueError, match="batch_size must divide"):
        fq.fit(lambda x: x, X, X, [], [], epochs=1, batch_size=3, lr=1e-3)


# ----------------------------------------------------------------------------- the model-level method
ARCHS = ["llama", "llama6", "qwen2", "gemma3"]


def _hidden(model, ids=IDS):
    """The residual stream entering the final norm (whose float32 cast would hide small errors);
    read by a hook of ours (output_hidden_states makes transformers install hooks of its own)."""
    seen = []
    h = model.model.norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return seen[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_unquantized_flatquant_computes_the_same_function_and_restores_the_model(arch):
    m = tiny(arch)
    snap = snapshot(m)
    ref_h, ref = _hidden(m), logits(m)
    res = fm.calibrate(m, CALIB, fm.FlatQuantConfig(epochs=1, batch_size=2))
    assert_restored(m, snap)
    with fm.flatquant(m, res, quantize=False):
        h, out = _hidden(m), logits(m)
        assert max_err(m.model.layers[0].self_attn.q_proj.weight, snap["model.layers.0.self_attn.q_proj.weight"][1]) > 0.1
    assert max_err(h, ref_h) < 1e-11 * float(ref_h.abs().max())
    assert max_err(out, ref) < 1e-10
    assert_restored(m, snap)
    with fm.flatquant(m, res):  # W4A4KV4: a different, finite function
        q = logits(m)
    assert bool(torch.isfinite(q).all()) and max_err(q, ref) > 1e-3
    assert_restored(m, snap)
    for F in res.layers:  # the learned transforms stay invertible and well conditioned
        for T in (F.ln, F.up_gate, F.down, F.o, F.v, F.k):
            assert T.condition() < 10


def test_each_linear_reads_its_transformed_input():
    """Inside the context down_proj reads (x * s_down) P_down and o_proj reads x (P_o kron P_v)
    (values transformed in v_proj, heads mixed online), x being what the plain model feeds them;
    a changed scale is read by both sides of the fold (still the same function)."""
    m = tiny("llama")
    res = fm.calibrate(m, CALIB, fm.FlatQuantConfig(epochs=0, batch_size=2))
    F = res.layers[1]
    with torch.no_grad():
        F.down.diag.mul_(2.0)
    seen = {}
    lins = {"down": m.model.layers[1].mlp.down_proj, "o": m.model.layers[1].self_attn.o_proj}

    def run(tag):
        hs = [lin.register_forward_pre_hook(lambda mod, a, k=k: seen.__setitem__((tag, k), a[0].detach().clone()))
              for k, lin in lins.items()]
        out = _hidden(m)
        for h in hs:
            h.remove()
        return out

    ref = run("plain")
    with fm.flatquant(m, res, quantize=False):
        assert max_err(run("flat"), ref) < 1e-11 * float(ref.abs().max())
    torch.testing.assert_close(seen["flat", "down"], F.down.frozen().forward(seen["plain", "down"]))
    Pov = torch.kron(F.o.frozen().matrix(), F.v.frozen().matrix())
    torch.testing.assert_close(seen["flat", "o"], seen["plain", "o"] @ Pov)


def test_calibration_lowers_every_layers_output_error():
    m = tiny("llama")
    res = fm.calibrate(m, CALIB, fm.FlatQuantConfig(epochs=8, batch_size=1))
    assert len(res.logs) == 2 and res.n_calib == 4
    for log in res.logs:
        assert len(log.epochs) == 8 and log.final < 0.9 * log.initial
    assert res.knobs()["epochs"] == 8 and res.knobs()["calibration_windows"] == 4


def test_errors_name_the_problem():
    m = tiny("llama")
    with pytest.raises(ValueError, match="multiple of the batch size"):
        fm.calibrate(m, CALIB[:3], fm.FlatQuantConfig(batch_size=2))
    with pytest.raises(ValueError, match="token ids"):
        fm.calibrate(m, CALIB.double())
    with pytest.raises(ValueError, match="w_bits must be an int in"):
        fm.FlatQuantConfig(w_bits=1)
    with pytest.raises(ValueError, match="decoder stack"):
        fm.calibrate(torch.nn.Linear(3, 3), CALIB)
    res = fm.calibrate(m, CALIB, fm.FlatQuantConfig(epochs=0, batch_size=4))
    with pytest.raises(ValueError, match="calibrate it again"):
        with fm.flatquant(tiny("llama6"), res):
            pass


def test_keys_are_quantized_in_the_learned_basis_and_values_as_they_come():
    m = tiny("llama")
    res = fm.calibrate(m, CALIB, fm.FlatQuantConfig(epochs=0, batch_size=2))
    F = res.layers[1]
    fn = fm._kv_fn(dict(enumerate(res.layers)), res.config, quantize=True)
    x = torch.randn(1, 2, 5, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    P = F.k.frozen().matrix()
    with torch.no_grad():
        expected = fq.quant_act(x @ P, 4, F.aclip["key"], symmetric=False) @ torch.linalg.inv(P)
        torch.testing.assert_close(fn(1, "key", x, 0), expected)
        torch.testing.assert_close(fn(1, "value", x, 0), fq.quant_act(x, 4, F.aclip["value"], symmetric=False))
        assert max_err(fn(1, "key", x, 0), fq.quant_act(x, 4, F.aclip["key"], symmetric=False)) > 1e-3


# ----------------------------------------------------------------------------- as a recipe (STaMP on top)
def _flat_recipe(cfg, bits="4", kv_bits="4", transform="identity"):
    from stamp_lib.model import recipe as rcp

    act = rcp.ActQuant(bits=bits, transform=transform)
    kv = rcp.ActQuant(bits=kv_bits) if kv_bits else None
    return rcp.Recipe((rcp.Rule("model.layers.*", act=act, weight=rcp.WeightQuant(bits=cfg.w_bits)),), kv=kv,
                      network="flatquant", network_config=cfg)


def test_the_recipe_calibrates_and_applies_flatquant_as_published():
    """Recipe(network='flatquant'): prepare() is calibrate() (the same numbers), apply() with uniform
    bits is flatquant() as published, the bits spent are counted, and the model is restored."""
    from stamp_lib.model import recipe as rcp

    m = tiny("llama")
    snap = snapshot(m)
    cfg = fm.FlatQuantConfig(epochs=1, batch_size=2)
    r = _flat_recipe(cfg)
    assert r.needs_calibration() and r.knobs()["network_config"]["epochs"] == 1
    prep = rcp.prepare(m, r, CALIB, progress=False)
    res = fm.calibrate(m, CALIB, cfg)
    for a, b in zip(prep.plan.layers, res.layers):
        torch.testing.assert_close(a.ln.frozen().matrix(), b.ln.frozen().matrix())
    with fm.flatquant(m, res) as st:
        ref = logits(m)
    assert st.average_bits("act") == 4.0 and st.average_bits("kv") == 4.0
    with rcp.apply(m, r, prep) as st:
        out = logits(m)
    torch.testing.assert_close(out, ref)
    assert_restored(m, snap)
    s = IDS.shape[1]  # two rows at 8 bits of s: 4 + 4 * 2 / s bits per token, linear inputs and K/V
    with rcp.apply(m, _flat_recipe(cfg, "2x8+4", "2x8+4", "dwt"), prep) as st:
        q = logits(m)
    assert st.average_bits("act") == pytest.approx(4 + 8 / s) and st.average_bits("kv") == pytest.approx(4 + 8 / s)
    assert bool(torch.isfinite(q).all()) and max_err(q, ref) > 1e-4
    assert_restored(m, snap)


def test_stamp_wraps_flatquants_own_quantizer():
    """With every row at 16 bits and no clipping the sequence transform is undone exactly around
    FlatQuant's quantizer (DWT, DCT and identity agree to 16-bit rounding); the quantizer of one
    input is L^-1 Q_flat(L x) with each row at its own bits and FlatQuant's learned clip."""
    from stamp_lib.core import transforms
    from stamp_lib.model import recipe as rcp

    m = tiny("llama")
    cfg16 = fm.FlatQuantConfig(w_bits=16, a_bits=16, kv_bits=16, epochs=0, batch_size=2, lwc=False, lac=False)
    prep = rcp.prepare(m, _flat_recipe(cfg16, "16", "16"), CALIB, progress=False)
    outs = {}
    for tr in ("identity", "dwt", "dct"):
        with rcp.apply(m, _flat_recipe(cfg16, "16", "16", tr), prep):
            outs[tr] = logits(m)
    assert max_err(outs["dwt"], outs["identity"]) < 1e-3 and max_err(outs["dct"], outs["identity"]) < 1e-3
    # the quantizer of one input: L^-1 Q_flat(L x) with per-row bits
    F = rcp.prepare(m, _flat_recipe(fm.FlatQuantConfig(epochs=0, batch_size=2)), CALIB, progress=False).plan.layers[0]
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    T = transforms.build("dwt", levels=2)
    b = torch.tensor([8.0, 8, 4, 4, 4, 4, 4, 4], dtype=torch.float64)
    got = quant.stamp_fake_quant(x, T, b, quantizer=lambda LX, bb: fq.quant_act(LX, bb, F.aclip["q_proj"]))
    Lx = T.forward(x)
    rows = torch.stack([fq.quant_act(Lx[:, i:i + 1], int(b[i]), F.aclip["q_proj"])[:, 0] for i in range(8)], 1)
    with torch.no_grad():
        torch.testing.assert_close(got, T.inverse(rows))
    with pytest.raises(ValueError, match="replaces the min-max quantizer"):
        quant.stamp_fake_quant(x, T, b, quantizer=lambda LX, bb: LX, symmetric=True)


def test_flatquant_recipe_errors_name_the_fix():
    from stamp_lib.model import recipe as rcp

    cfg = fm.FlatQuantConfig(epochs=0, batch_size=2)
    act = rcp.ActQuant(bits="4")
    with pytest.raises(ValueError, match="GPTQ pass after calibration is not implemented"):
        rcp.Recipe((rcp.Rule("*", act=act, weight=rcp.WeightQuant(bits=4, method="gptq")),), kv=act,
                   network="flatquant", network_config=cfg)
    with pytest.raises(ValueError, match="needs network_config=FlatQuantConfig"):
        rcp.Recipe((rcp.Rule("*", act=act, weight=rcp.WeightQuant(bits=4)),), kv=act, network="flatquant")
    with pytest.raises(ValueError, match="kv_bits=4; make them agree"):
        rcp.Recipe((rcp.Rule("*", act=act, weight=rcp.WeightQuant(bits=4)),), network="flatquant", network_config=cfg)
    with pytest.raises(ValueError, match="low bits other than the config's a_bits=4"):
        rcp.Recipe((rcp.Rule("*", act=rcp.ActQuant(bits="8"), weight=rcp.WeightQuant(bits=4)),), kv=act,
                   network="flatquant", network_config=cfg)
    m = tiny("llama")
    with pytest.raises(ValueError, match="pass calib="):
        rcp.prepare(m, _flat_recipe(cfg), None, progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_calibrated_in_float32_and_restored(dtype):
    """A bfloat16 / float16 checkpoint (the paper's models on a GPU): each layer is calibrated in
    float32 (linear solves have no half-precision kernels) and cast back, the online transforms
    and quantizers run in float32 on the half-precision inputs, and the model is restored exactly."""
    m = tiny("llama").to(dtype)
    snap = snapshot(m)
    with torch.no_grad():
        plain = logits(m)
    cfg = fm.FlatQuantConfig(epochs=1, batch_size=2)
    res = fm.calibrate(m, CALIB, cfg)
    assert_restored(m, snap)
    assert all(p.dtype == torch.float32 for F in res.layers for p in F.parameters())
    with fm.flatquant(m, res, quantize=False):  # the transforms alone: the same function, to half precision
        same = logits(m)
    assert same.dtype == dtype and max_err(same.float(), plain.float()) < 0.05 * float(plain.float().abs().max())
    with fm.flatquant(m, res) as st:
        q = logits(m)
    assert q.dtype == dtype and bool(torch.isfinite(q).all()) and st.average_bits("act") == 4.0
    assert_restored(m, snap)
