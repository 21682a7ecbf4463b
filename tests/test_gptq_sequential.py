"""GPTQ layer by layer (``WeightQuant(sequential=True)``, stamp_lib.model.recipe) against plain
references written here from the published algorithms, and the one-pass path (``sequential=False``,
the default) against the algorithm it had before the layer-by-layer path existed.

* one pass: every Hessian from one calibration pass of the full-precision model, the linears that
  read one tensor quantized together (the code before this path, written out with the public
  pieces: capture, HessianAccumulator, gptq_quantize, fake_quant);
* layer by layer: GPTQ's and QuaRot's order (``gptq_fwrd`` of QuaRot's fake_quant code): per decoder
  layer the groups [q, k, v], [o], [gate, up], [down] one after the other, each group's Hessian from
  full model forwards of a copy whose earlier groups already carry their quantized weights."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from test_recipe import assert_restored, snapshot, tiny_llama
from torch import nn

from stamp_lib.core import quant
from stamp_lib.methods import features, gptq
from stamp_lib.model import blocks, capture, recipe
from stamp_lib.model.recipe import ActQuant, Recipe, Rule, WeightQuant

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = "model.layers.*"
CALIB = torch.randint(0, 96, (3, 40), generator=torch.Generator().manual_seed(3))
IDS = torch.randint(0, 96, (2, 40), generator=torch.Generator().manual_seed(4))
GROUPS = (("self_attn", ("q_proj", "k_proj", "v_proj")), ("self_attn", ("o_proj",)),
          ("mlp", ("gate_proj", "up_proj")), ("mlp", ("down_proj",)))


def _gptq(W, H, wq):
    return gptq.gptq_quantize(W, H, wq.bits, group_size=wq.group_size, symmetric=wq.symmetric,
                              clip_ratio=wq.clip_ratio, damp=wq.damp, act_order=wq.act_order)


def _hessian(model, module, calib):
    """E[x x^T] of ``module``'s input over full forwards of ``model``, one window per forward."""
    acc = gptq.HessianAccumulator()
    with capture.capturing(model, [n for n, m in model.named_modules() if m is module],
                           lambda name, x: acc.add(x)), torch.no_grad():
        for w in calib:
            model(w[None])
    return acc.H


def reference_sequential(model, calib, wq, rotations=None):
    """GPTQ's own order, written plainly on a deep copy of ``model``: per layer and group, the
    Hessian from full forwards of the copy as quantized so far, the group's weights replaced by
    their GPTQ result. ``rotations`` ({input width: R}): an online rotation R of every linear input
    (the per-linear Hadamard of ``feature="hadamard"``): the copy's quantized linears compute
    (x R) (W R^{-T})^T, and GPTQ uses the Hessian R^T H R."""
    ref = copy.deepcopy(model)
    out, hooks = {}, []
    for i, layer in enumerate(ref.model.layers):
        for sub, names in GROUPS:
            mods = [getattr(getattr(layer, sub), n) for n in names]
            H = _hessian(ref, mods[0], calib)
            W = torch.cat([m.weight.detach().double() for m in mods])
            R = None if rotations is None else rotations[W.shape[1]]
            if R is not None:
                H, W = R.matrix().T @ H @ R.matrix(), R.fold_weight(W)
            Q = _gptq(W, H, wq)
            for n, m, part in zip(names, mods, Q.split([m.out_features for m in mods])):
                out[f"model.layers.{i}.{sub}.{n}"] = part.float()
                with torch.no_grad():
                    m.weight.copy_(part)
                if R is not None:  # the input rotated from now on: (x R) W'^T
                    hooks.append(m.register_forward_pre_hook(
                        lambda mod, a, R=R: (R.forward(a[0].double()).to(a[0].dtype),)))
    for h in hooks:
        h.remove()
    return out


def reference_one_pass(model, calib, rule_of):
    """The one-pass path as it was: every GPTQ linear's Hessian from one calibration pass of the
    full-precision model; RTN linears folded and rounded; ``rule_of(name) -> (WeightQuant, R or None)``."""
    lins = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")}
    accs = {n: gptq.HessianAccumulator() for n in lins}
    with capture.capturing(model, list(lins), lambda name, x: accs[name].add(x)), torch.no_grad():
        for w in calib:
            model(w[None])
    out = {}
    for n, m in lins.items():
        wq, R = rule_of(n)
        W = m.weight.detach().double()
        H = accs[n].H
        if R is not None:
            W, H = R.fold_weight(W), R.matrix().T @ H @ R.matrix()
        out[n] = (_gptq(W, H, wq) if wq.method == "gptq" else
                  quant.fake_quant(W, wq.bits, symmetric=wq.symmetric, block_size=wq.group_size)).float()
    return out


def _close(got, want, n, bits=3):
    """Equal, or up to the rounding of a Hessian computed in another association order (R^T H R):
    under 0.5% of the entries moved, none by more than one grid step of its row. (On this machine
    they are equal; a wrong Hessian moves several percent of the entries.)"""
    diff = (got - want).abs()
    step = 2 * want.abs().amax(1, keepdim=True) / (2 ** bits - 1)
    assert bool((diff <= 1.01 * step).all()), n
    assert float((diff > 0).float().mean()) < 0.005, (n, float((diff > 0).float().mean()))


# ----------------------------------------------------------------------------- the one-pass path
@pytest.mark.parametrize("feature", [None, "hadamard"])
def test_one_pass_gptq_and_rtn_are_the_algorithm_they_were(feature):
    """``sequential=False`` (the default): the same GPTQ and RTN weights as the one-pass algorithm,
    now folded and quantized one linear (one GPTQ group) at a time."""
    model = tiny_llama()
    g, rtn = WeightQuant(bits=3, method="gptq"), WeightQuant(bits=4, group_size=16)
    r = Recipe((Rule("*.mlp.*", weight=rtn, feature=feature), Rule(LAYERS, weight=g, feature=feature)))
    prep = recipe.prepare(model, r, CALIB, progress=False)
    R = {d: features.hadamard_rotation(d) for d in (64, 128)} if feature else None
    want = reference_one_pass(model, CALIB, lambda n: (rtn if ".mlp." in n else g,
                                                         None if R is None else R[dict(model.named_modules())[n]
                                                                                  .in_features]))
    assert set(prep.weights) == set(want)
    for n, W in want.items():
        if feature is None or ".mlp." in n:  # Hessians summed in the same order: the very same weights
            assert torch.equal(prep.weights[n], W), n
        else:  # R^T H R here in another association order than the reference's
            _close(prep.weights[n], W, n)
    assert "gptq" not in prep.info


# ----------------------------------------------------------------------------- layer by layer
@pytest.mark.parametrize("wq", [WeightQuant(bits=3, method="gptq", sequential=True),
                                WeightQuant(bits=4, method="gptq", sequential=True, act_order=True, damp=0.05,
                                            group_size=16, symmetric=False)], ids=["w3", "w4-actorder-g16"])
def test_sequential_is_gptqs_own_order(wq):
    """Every group's weights equal those of the plain reference (full forwards of a copy quantized
    group by group); the model is restored; layer 0's q/k/v (nothing quantized before them) equal
    the one-pass result, every later group differs from it."""
    model = tiny_llama()
    snap = snapshot(model)
    prep = recipe.prepare(model, Recipe(Rule(LAYERS, weight=wq)), CALIB, progress=False)
    assert_restored(model, snap)
    assert prep.info["gptq"] == "sequential"
    want = reference_sequential(model, CALIB, wq)
    assert set(prep.weights) == set(want)
    for n, W in want.items():
        assert torch.equal(prep.weights[n], W), n
    once = recipe.prepare(model, Recipe(Rule(LAYERS, weight=dataclasses.replace(wq, sequential=False))), CALIB,
                          progress=False)
    first = {f"model.layers.0.self_attn.{p}_proj" for p in "qkv"}
    for n in want:
        assert torch.equal(prep.weights[n], once.weights[n]) == (n in first), n


def test_sequential_with_a_feature_transform_and_batches():
    """Per-linear Hadamard rotations (folded weights, R^T H R, rotated inputs in the calibration
    forwards) and two windows per layer call: the reference's weights up to Hessian rounding."""
    model = tiny_llama()
    wq = WeightQuant(bits=3, method="gptq", sequential=True)
    prep = recipe.prepare(model, Recipe(Rule(LAYERS, weight=wq, feature="hadamard")), CALIB, batch_size=2,
                          progress=False)
    want = reference_sequential(model, CALIB, wq, rotations={d: features.hadamard_rotation(d) for d in (64, 128)})
    assert set(prep.weights) == set(want)
    for n, W in want.items():
        _close(prep.weights[n], W, n)


def test_linears_fed_one_input_with_other_settings_share_its_hessian():
    """q_proj at 8 bits, k/v at 3 bits (one input, two settings): k/v of layer 0 are those of the
    all-3-bit run (the same Hessian); RTN linears between GPTQ groups are quantized before the
    calibration forwards reach them (the reference: o_proj RTN in the copy)."""
    model = tiny_llama()
    w3, w8 = (WeightQuant(bits=b, method="gptq", sequential=True) for b in (3, 8))
    mixed = recipe.prepare(model, Recipe((Rule("*.q_proj", weight=w8), Rule(LAYERS, weight=w3))), CALIB,
                           progress=False)
    plain = recipe.prepare(model, Recipe(Rule(LAYERS, weight=w3)), CALIB, progress=False)
    for p in "kv":
        n = f"model.layers.0.self_attn.{p}_proj"
        assert torch.equal(mixed.weights[n], plain.weights[n])
    q = mixed.weights["model.layers.0.self_attn.q_proj"]
    assert max(len(torch.unique(row)) for row in q) > 8  # 8 bits, not 3
    # o_proj by RTN: its rounded weight is in place when gate/up's Hessian is taken
    rtn = WeightQuant(bits=3)
    r = Recipe((Rule("*.o_proj", weight=rtn), Rule(LAYERS, weight=w3)))
    prep = recipe.prepare(model, r, CALIB, progress=False)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, n).weight.copy_(prep.weights[f"model.layers.{i}.self_attn.{n}"])
            if i == 0:
                break
    layer = ref.model.layers[0]
    H = _hessian(ref, layer.mlp.gate_proj, CALIB)
    W = torch.cat([layer.mlp.gate_proj.weight.double(), layer.mlp.up_proj.weight.double()])
    want = _gptq(W, H, w3).float()
    got = torch.cat([prep.weights["model.layers.0.mlp.gate_proj"], prep.weights["model.layers.0.mlp.up_proj"]])
    assert torch.equal(got, want)


def test_a_quantized_model_and_the_same_preparation_with_stamp():
    """The layer-by-layer preparation serves the recipe with and without STaMP (activations are
    quantized only when applied) and quantizes at least as well here as the one pass."""
    model = tiny_llama()
    with torch.no_grad():
        ref = model(IDS).logits
    err = {}
    for seq in (False, True):
        wq = WeightQuant(bits=3, method="gptq", sequential=seq)
        r = Recipe(Rule(LAYERS, weight=wq))
        prep = recipe.prepare(model, r, CALIB, progress=False)
        with recipe.apply(model, r, prep), torch.no_grad():
            err[seq] = float((model(IDS).logits - ref).pow(2).mean())
        stamp = Recipe(Rule(LAYERS, act=ActQuant("8x8+4", transform="dwt"), weight=wq))
        assert stamp.prep_key() == r.prep_key()
        with recipe.apply(model, stamp, prep) as st, torch.no_grad():
            assert torch.isfinite(model(IDS).logits).all()
        assert st.average_bits("act") == pytest.approx((8 * 8 + 32 * 4) / 40)
    assert err[True] < 1.2 * err[False], err


def test_settings_and_errors_name_the_problem():
    with pytest.raises(ValueError, match="sequential=True is GPTQ's"):
        WeightQuant(bits=4, sequential=True)
    with pytest.raises(ValueError, match="sequential must be a bool"):
        WeightQuant(bits=4, method="gptq", sequential=1)
    g = WeightQuant(bits=4, method="gptq")
    assert "sequential" not in g.knobs()  # the knobs (stored cells' keys) of the one-pass path are unchanged
    s = dataclasses.replace(g, sequential=True)
    assert s.knobs()["sequential"] is True
    assert Recipe(Rule("*", weight=s)).prep_key() != Recipe(Rule("*", weight=g)).prep_key()
    model = tiny_llama()
    with pytest.raises(ValueError, match="decoder layers"):  # lm_head is outside them
        recipe.prepare(model, Recipe(Rule(("model.layers.*", "lm_head"), weight=s)), CALIB, progress=False)
    with pytest.raises(ValueError, match="token windows"):
        recipe.prepare(model, Recipe(Rule(LAYERS, weight=s)), CALIB, forward=lambda m, b: m(b), progress=False)
    with pytest.raises(ValueError, match="token windows"):
        recipe.prepare(model, Recipe(Rule(LAYERS, weight=s)), [CALIB], progress=False)
    with pytest.raises(ValueError, match="decoder stack"):
        recipe.prepare(nn.Sequential(nn.Linear(8, 8)), Recipe(Rule("*", weight=s)), torch.zeros(2, 3, dtype=torch.long),
                       progress=False)


def test_layer_inputs_are_the_hidden_states_entering_layer_0():
    model = tiny_llama()
    _, dec, layers = blocks.decoder(model)
    x, kws = blocks.layer_inputs(model, dec, CALIB)
    assert set(kws) == {0, 1} and x.shape == (3, 40, 64)
    with torch.no_grad():
        hs = model(CALIB, output_hidden_states=True).hidden_states
    assert torch.equal(x, hs[0])
    out = blocks.layer_outputs(layers[0], x, kws[0], batch_size=2)
    torch.testing.assert_close(out, hs[1], rtol=1e-5, atol=1e-5)


def test_hessian_taken_in_place_is_the_mean():
    """``take()`` gives H in the running sum's memory (the same values as ``H``); in-place sums are the sums."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 5, 8, generator=g) for _ in range(3)]
    acc, ref = gptq.HessianAccumulator(), torch.zeros(8, 8, dtype=torch.float64)
    for x in xs:
        acc.add(x)
        ref = ref + (x.reshape(-1, 8).T @ x.reshape(-1, 8)).double()
    H = acc.H
    assert torch.equal(H, ref / 30)
    ptr = acc.sum.data_ptr()
    taken = acc.take()
    assert torch.equal(taken, H) and taken.data_ptr() == ptr
    assert acc.sum is None and acc.count == 0
    with pytest.raises(ValueError, match="no samples"):
        acc.take()
