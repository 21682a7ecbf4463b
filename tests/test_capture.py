"""Activation capture: selection, exact captured values, hooks removed, outputs unchanged, disk store."""

import contextlib
import re

import pytest
import torch
from torch import nn

from stamp_lib.core import autocorr
from stamp_lib.experiments import bench
from stamp_lib.model import capture, hooks


class Tiny(nn.Module):
    """A LLaMA-shaped block: q/k/v share one input, gate/up share another."""

    def __init__(self, d=8, h=12):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.ModuleDict({n: nn.Linear(d, d) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(d, h), "up_proj": nn.Linear(d, h), "down_proj": nn.Linear(h, d)})

    def parts(self, x):
        """The input of every linear, computed by hand (the trusted reference)."""
        a = self.norm(x)
        q, k, v = self.attn.q_proj(a), self.attn.k_proj(a), self.attn.v_proj(a)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        h = x + self.attn.o_proj(att)
        m = torch.nn.functional.silu(self.mlp.gate_proj(h)) * self.mlp.up_proj(h)
        return {"attn.q_proj": a, "attn.k_proj": a, "attn.v_proj": a, "attn.o_proj": att,
                "mlp.gate_proj": h, "mlp.up_proj": h, "mlp.down_proj": m}, h + self.mlp.down_proj(m)

    def forward(self, x):
        return self.parts(x)[1]


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return Tiny().eval(), torch.randn(5, 6, 8)


def n_hooks(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@contextlib.contextmanager
def recording(model):
    """Plain forward pre-hooks (no stamp_lib code) that copy the input of every nn.Linear, call
    after call: ``{name: [x, ...]}``. Registered around a capture, they see the very same forward
    passes, so what they record must equal the captured tensors byte for byte."""
    seen = {}
    handles = [m.register_forward_pre_hook(lambda m, args, n=n: seen.setdefault(n, []).append(args[0].detach().clone()))
               for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def test_captured_inputs_equal_manual_forward(tiny):
    """Captured = exactly what each module received in the capture's own forward passes (same
    bytes), and = the manual forward of the whole batch up to float32 rounding (the capture runs
    batches of 2, the reference one batch of 5: a batched matmul may round differently)."""
    model, x = tiny
    ref, _ = model.parts(x)
    for dedup in (False, True):
        with recording(model) as seen:
            res = capture.capture_inputs(model, x, "*", batch_size=2, dedup=dedup, progress=False)
        assert set(res.names) == set(ref)
        for name, want in ref.items():
            assert len(seen[name]) == 3  # batches of 2, 2, 1
            assert torch.equal(res[name], torch.cat(seen[name])), (name, dedup)
            torch.testing.assert_close(res[name], want.detach(), msg=lambda m: f"{name}, dedup={dedup}: {m}")


def test_dedup_aliases_only_shared_inputs(tiny):
    model, x = tiny
    res = capture.capture_inputs(model, x, "*", batch_size=2, dedup=True, progress=False)
    assert res.aliases == {"attn.k_proj": "attn.q_proj", "attn.v_proj": "attn.q_proj", "mlp.up_proj": "mlp.gate_proj"}
    assert set(res.acts) == {"attn.q_proj", "attn.o_proj", "mlp.gate_proj", "mlp.down_proj"}
    assert capture.capture_inputs(model, x, "*", dedup=False, progress=False).aliases == {}


def test_outputs_unchanged_and_hooks_removed(tiny):
    model, x = tiny
    before = model(x)
    seen = []
    with capture.capturing(model, "*", lambda n, t: seen.append(n), dedup=True) as h:
        h.new_pass()
        during = model(x)
        assert n_hooks(model) == 7
    assert torch.equal(before, during)
    assert seen == ["attn.q_proj", "attn.o_proj", "mlp.gate_proj", "mlp.down_proj"]
    assert n_hooks(model) == 0
    assert torch.equal(model(x), before)


def test_hooks_removed_when_forward_raises(tiny):
    model, x = tiny

    def boom(m, b):
        m(b)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        capture.capture_inputs(model, x, "*", forward=boom, progress=False)
    assert n_hooks(model) == 0


def test_pattern_selection(tiny):
    model, _ = tiny
    def sel(p):
        return list(hooks.select_modules(model, p))

    assert sel("*.q_proj") == ["attn.q_proj"]
    assert sel(["attn.*", "*.down_proj"]) == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.down_proj"]
    assert sel("re:mlp\\.(gate|up)_proj") == ["mlp.gate_proj", "mlp.up_proj"]
    assert sel(re.compile(r".*_proj")) == sel("*")
    assert sel("*") == [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert list(hooks.select_modules(model, "*", types=(nn.LayerNorm,))) == ["norm"]
    with pytest.raises(ValueError, match="matches no Linear module"):
        hooks.select_modules(model, "*.nonexistent")
    with pytest.raises(TypeError):
        hooks.select_modules(model, 3)


def test_keep_patterns_and_reduce(tiny):
    model, x = tiny
    ref, _ = model.parts(x)
    ac = autocorr.AutoCorrelation()
    res = capture.capture_inputs(model, x, "*", keep="*.down_proj", reduce=ac, batch_size=2, progress=False)
    assert list(res.acts) == ["mlp.down_proj"]
    for name in ("attn.q_proj", "mlp.gate_proj", "mlp.down_proj"):
        want = torch.einsum("bsd,btd->st", ref[name].double(), ref[name].double())
        torch.testing.assert_close(ac.sums[name], want, rtol=1e-5, atol=1e-5)  # float32 products
        assert ac.counts[name] == x.shape[0] * ref[name].shape[-1]
    assert "attn.k_proj" not in ac.sums  # an alias; read it as ac.sums[res.canonical("attn.k_proj")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_disk_store_roundtrip(tiny, tmp_path, dtype):
    model, x = tiny
    ref, _ = model.parts(x)
    with recording(model) as seen:
        res = capture.capture_inputs(model, x, "*", out_dir=tmp_path, store_dtype=dtype, keep=True, batch_size=2,
                                     progress=False)
    store = capture.ActivationStore.open(tmp_path)
    assert set(store.names) == set(ref) and store.dtype == dtype
    for name, want in ref.items():
        got = store.load(name)
        # same bytes: the store holds the cast of what the module received, and reads back what was kept
        assert got.dtype == dtype and torch.equal(got, torch.cat(seen[name]).to(dtype)), name
        assert torch.equal(got, res[name]), name
        # another computation (one batch of 5): equal up to float32 rounding, then the cast to `dtype`
        torch.testing.assert_close(got, want.detach().to(dtype), msg=lambda m: f"{name}: {m}")
    rows = store.load("mlp.down_proj", rows=slice(1, 3))
    assert torch.equal(rows, res["mlp.down_proj"][1:3])


def test_interrupted_capture_leaves_no_index(tiny, tmp_path):
    model, x = tiny
    calls = []

    def fail_second(m, b):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return m(b)

    with pytest.raises(KeyboardInterrupt):
        capture.capture_inputs(model, x, "*", out_dir=tmp_path, forward=fail_second, progress=False)
    with pytest.raises(FileNotFoundError, match="interrupted"):
        capture.ActivationStore.open(tmp_path)


def test_float16_overflow_is_an_error(tiny):
    model, x = tiny
    with pytest.raises(OverflowError, match="float16"):
        capture.capture_inputs(model, x * 1e6, "*.gate_proj", store_dtype=torch.float16, progress=False)


# ----------------------------------------------------------------------------- real SmolLM2
@pytest.fixture(scope="module")
def smollm2(one_thread):
    """SmolLM2, run with one torch thread (fixture in conftest.py)."""
    from stamp_lib.zoo import models

    return models.load_smollm2()


@pytest.mark.models
def test_smollm2_capture_matches_manual_layer_forward(smollm2):
    model, tok = smollm2
    ids = tok("The quick brown fox jumps over the lazy dog. Sequence transforms move energy.", return_tensors="pt").input_ids
    L = 3
    layer = model.model.layers[L]
    pats = [f"model.layers.{L}.*"]
    with torch.no_grad():
        plain = model(ids, output_hidden_states=True)
        hooks_before = n_hooks(model)  # transformers installs hooks of its own on first use
        during = []
        res = capture.capture_inputs(model, ids, pats, dedup=True, forward=lambda m, b: during.append(m(b).logits),
                                     progress=False)
        after = model(ids).logits
    assert n_hooks(model) == hooks_before
    # the same forward on the same input, with hooks that only read / after they are gone: same bytes
    assert len(during) == 1 and torch.equal(during[0], plain.logits) and torch.equal(after, plain.logits)
    assert res.aliases == {f"model.layers.{L}.self_attn.{p}_proj": f"model.layers.{L}.self_attn.q_proj" for p in "kv"} | {
        f"model.layers.{L}.mlp.up_proj": f"model.layers.{L}.mlp.gate_proj"}
    p = f"model.layers.{L}."
    h, h_next = plain.hidden_states[L], plain.hidden_states[L + 1]
    # the layer re-run by hand from the captured inputs: other calls (other buffers, possibly other
    # kernels), so equal up to float32 rounding; exactness of the capture itself is pinned by the Tiny tests
    with torch.no_grad():
        torch.testing.assert_close(res[p + "self_attn.q_proj"], layer.input_layernorm(h))
        h_mid = h + layer.self_attn.o_proj(res[p + "self_attn.o_proj"])
        torch.testing.assert_close(res[p + "mlp.gate_proj"], layer.post_attention_layernorm(h_mid), rtol=1e-5, atol=1e-5)
        g = res[p + "mlp.gate_proj"]
        torch.testing.assert_close(res[p + "mlp.down_proj"], layer.mlp.act_fn(layer.mlp.gate_proj(g)) * layer.mlp.up_proj(g))
        torch.testing.assert_close(h_mid + layer.mlp.down_proj(res[p + "mlp.down_proj"]), h_next, rtol=1e-5, atol=1e-4)
    assert res[p + "mlp.down_proj"].shape == (1, ids.shape[1], 1536)


@pytest.mark.models
def test_smollm2_all_linears_and_autocorrelation(smollm2):
    model, tok = smollm2
    ids = tok("Anarchism is a political philosophy.", return_tensors="pt").input_ids
    ac = autocorr.AutoCorrelation()
    res = capture.capture_inputs(model, ids, "*", keep="*.layers.0.*", reduce=ac, progress=False)
    assert len(res.names) == 30 * 7 + 1  # 7 linears per layer + lm_head
    assert len(res.aliases) == 30 * 3 and len(ac.sums) == 30 * 4 + 1
    x = res["model.layers.0.mlp.down_proj"][0].double()
    torch.testing.assert_close(ac.sums["model.layers.0.mlp.down_proj"], x @ x.T, rtol=1e-5, atol=1e-3)  # float32 products
    assert capture.capture_bytes(model, "*", n_tokens=1, bytes_per_value=2) == 2 * (30 * (3 * 576 + 1536) + 576)


@pytest.mark.models
def test_capture_benchmark_smoke(tmp_path):
    out = bench.capture_benchmark(n_windows=1, seq_len=64, out_dir=tmp_path, threads=1)
    assert out["captured_modules"] == 121 and out["disk_mb"] == out["expected_disk_mb"]
    assert out["time_ratio"] > 0 and out["forward_peak_rss_mb"] > 100
