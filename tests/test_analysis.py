"""stamp_lib.analysis: autocorrelation summaries, TokenApart, measure() against the core library,
and the capture pipelines on a tiny random LLaMA and a small random galaxy Mixer."""

import math

import pytest
import torch

from stamp_lib.core import autocorr, bounds, metrics, quant, transforms
from stamp_lib.experiments import seqstats


def ar1(n, s, d, rho, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = torch.randn(n, s, d, generator=g, dtype=torch.float64)
    X = torch.empty_like(E)
    X[:, 0] = E[:, 0]
    for t in range(1, s):
        X[:, t] = rho * X[:, t - 1] + math.sqrt(1 - rho**2) * E[:, t]
    return X


# ----------------------------------------------------------------------------- statistics of S
def test_toeplitz_fraction_is_one_for_toeplitz_and_projection_is_orthogonal():
    s = 12
    t = torch.arange(s, dtype=torch.float64)
    T = 0.8 ** (t[:, None] - t[None, :]).abs()
    assert autocorr.toeplitz_fraction(T) == pytest.approx(1.0, abs=1e-12)
    A = torch.randn(s, s, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    S = A @ A.T
    P = autocorr.toeplitz_projection(S)
    # brute force: the mean of every diagonal
    for off in range(-s + 1, s):
        assert torch.allclose(torch.diagonal(P, off), torch.diagonal(S, off).mean().expand(s - abs(off)))
    assert torch.allclose(autocorr.toeplitz_projection(P), P)  # idempotent
    assert float(((S - P) * P).sum()) == pytest.approx(0.0, abs=1e-9)  # orthogonal residual
    assert 0.0 < autocorr.toeplitz_fraction(S) < 1.0


def test_block_toeplitz_fraction_on_a_stationary_grid():
    h, w = 4, 5
    r, c = torch.arange(h * w) // w, torch.arange(h * w) % w
    di, dj = (r[:, None] - r[None, :]).double(), (c[:, None] - c[None, :]).double()
    S = torch.exp(-(di**2) / 3 - dj.abs() / 2)  # a stationary 2-D kernel (BTTB)
    assert autocorr.toeplitz_fraction(S, grid=(h, w)) == pytest.approx(1.0, abs=1e-12)
    assert autocorr.toeplitz_fraction(S) < 0.99  # not Toeplitz along the row-major flattening
    with pytest.raises(ValueError, match="grid 3x5"):
        autocorr.toeplitz_fraction(S, grid=(3, 5))


def test_token0_fraction_and_bad_input():
    S = torch.diag(torch.tensor([6.0, 1.0, 1.0, 2.0]))
    assert autocorr.token0_fraction(S) == pytest.approx(0.6)
    assert autocorr.toeplitz_fraction(S, skip=1) < 1
    with pytest.raises(ValueError, match="square"):
        autocorr.token0_fraction(torch.ones(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        autocorr.token0_fraction(torch.full((2, 2), float("nan")))
    C = autocorr.correlation(torch.tensor([[4.0, 2.0], [2.0, 1.0]]))
    assert torch.allclose(C, torch.ones(2, 2, dtype=torch.float64))


# ----------------------------------------------------------------------------- TokenApart
@pytest.mark.parametrize("inner", [transforms.build("dct"), transforms.build("dwt", levels=2)])
def test_token_apart_is_orthogonal_and_matches_its_matrix(inner):
    T = transforms.TokenApart(inner)
    s = 13
    X = torch.randn(2, s, 5, dtype=torch.float64)
    M = T.matrix(s, dtype=torch.float64)
    assert torch.allclose(M @ M.T, torch.eye(s, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(T.forward(X), M @ X, atol=1e-12)
    assert torch.allclose(T.inverse(T.forward(X)), X, atol=1e-12)
    assert torch.equal(T.forward(X)[:, 0], X[:, 0])  # token 0 untouched
    assert torch.allclose(T.forward(X)[:, 1:], inner.forward(X[:, 1:]), atol=1e-12)


def test_token_apart_rejects_lengths_the_inner_transform_cannot_take():
    with pytest.raises(ValueError, match="power-of-two"):
        transforms.TokenApart(transforms.build("wht")).forward(torch.randn(16, 3))


# ----------------------------------------------------------------------------- measure
@pytest.fixture(scope="module")
def corr_data():
    return ar1(6, 32, 16, 0.9, seed=3).float()


# Tolerances for float32 data whose transforms are computed in other batches (measure: chunks of
# `batch` samples; bounds/metrics: all n at once), where a matmul or FFT may round each value
# differently by about one unit in the last place. Rounding every transformed value of corr_data
# up or down by one ulp moves the sums by at most: bound 4e-8, error 7.5e-7 (relative), SQNR
# 3.2e-6 dB. The tolerances below leave a 15-30x margin; a real bug (a missing chunk, wrong bits,
# a wrong Theorem 1 coefficient) moves them by percents.
F32 = torch.finfo(torch.float32).eps
BOUND_REL = 10 * F32  # energies: sums of squares, float64 accumulation
ERR_REL = 100 * F32  # errors: a one-ulp change of a value is a larger change of its small error
SQNR_DB = 10 * math.log10(1 + ERR_REL)


def test_measure_agrees_with_bounds_and_metrics(corr_data):
    X = corr_data
    ts = {"identity": transforms.build("identity"), "dct": transforms.build("dct"),
          "dwt": transforms.build("dwt", levels=2), "klt": transforms.KLT.fit(ar1(8, 32, 16, 0.9, seed=4)),
          "dct0": transforms.TokenApart(transforms.build("dct"))}
    specs = ["4", "8x8+4"]
    res = seqstats.measure(X, ts, specs, batch=4)
    for name, T in ts.items():
        m = res[name]
        assert torch.allclose(torch.as_tensor(m.profile()), metrics.energy_profile(T.forward(X)), rtol=BOUND_REL, atol=0)
        for spec in specs:
            b = quant.bits_from_spec(spec, 32)
            assert m.bound[spec] == pytest.approx(bounds.theorem1(X, T, b), rel=BOUND_REL)
            assert m.err[spec] == pytest.approx(bounds.stamp_error(X, T, b), rel=ERR_REL)
            assert m.sqnr(spec) == pytest.approx(metrics.sqnr_db(X, quant.stamp_fake_quant(X, T, b)), abs=SQNR_DB)
            assert m.err[spec] <= m.bound[spec]
    sym = seqstats.measure(X, ts, specs, symmetric=True)
    for name, T in ts.items():
        for spec in specs:
            b = quant.bits_from_spec(spec, 32)
            assert sym[name].bound[spec] == pytest.approx(bounds.theorem1(X, T, b, symmetric=True), rel=BOUND_REL)
            assert sym[name].err[spec] == pytest.approx(bounds.stamp_error(X, T, b, symmetric=True), rel=ERR_REL)
            assert sym[name].err[spec] <= sym[name].bound[spec]
    # batching does not change the sums: float32 data within the float32 tolerances; float64 data
    # within float64 rounding (the same one-ulp argument, scaled by eps64 / eps32)
    X64, F64_REL = X.double(), ERR_REL * torch.finfo(torch.float64).eps / F32
    for data, rel in ((X, ERR_REL), (X64, F64_REL)):
        one, four = (seqstats.measure(data, {"dct": ts["dct"]}, specs, batch=k)["dct"] for k in (1, 4))
        for spec in specs:
            assert one.err[spec] == pytest.approx(four.err[spec], rel=rel), (data.dtype, spec)
            assert one.bound[spec] == pytest.approx(four.bound[spec], rel=rel), (data.dtype, spec)
        torch.testing.assert_close(one.energy, four.energy, rtol=rel, atol=0)


def test_measure_rejects_bad_input(corr_data):
    diff = transforms.Dense(torch.eye(32) - torch.diag(torch.ones(31), -1))
    with pytest.raises(ValueError, match="not orthogonal"):
        seqstats.measure(corr_data, {"diff": diff}, "4")
    with pytest.raises(ValueError, match="batch"):
        seqstats.measure(corr_data, {"dct": transforms.build("dct")}, "4", batch=0)
    with pytest.raises(ValueError, match="length"):
        seqstats.measure(corr_data, {"dct": transforms.build("dct")}, torch.full((7,), 4))


def test_in_sample_klt_is_the_ky_fan_maximum(corr_data):
    """The in-sample KLT captures at least as much energy in its first k rows as any transform,
    and its energies equal the eigenvalues of sum X X^T (the shortcut used when its quantization
    is skipped)."""
    X = corr_data.double()
    base = {"identity": transforms.build("identity"), "dct": transforms.build("dct"),
            "wht": transforms.build("wht"), "dwt": transforms.build("dwt", levels=3)}
    S_cal, _ = seqstats._autocorr(ar1(8, 32, 16, 0.9, seed=4))
    full = seqstats._module_result("m", 0, "x", X, S_cal, 8, base, "4", levels={"dwt": 3})
    short = seqstats._module_result("m", 0, "x", X, S_cal, 8, base, "4", levels={"dwt": 3}, insample_quant=False)
    assert "klt (in-sample)" not in short.results
    assert torch.allclose(full.klt_insample_energy, short.klt_insample_energy, rtol=1e-9)  # float64 data
    best = full.profile("klt (in-sample)")
    for name in [*base, "klt"]:
        assert (full.profile(name) <= best + 1e-12).all(), name
    for k in (1, 4, 32):
        assert short.energy_at("klt (in-sample)", k) == pytest.approx(full.energy_at("klt (in-sample)", k))


# ----------------------------------------------------------------------------- names
def test_layer_names():
    assert seqstats.llama_layer_type("model.layers.3.self_attn.k_proj") == "q/k/v"
    assert seqstats.llama_layer_type("model.layers.3.mlp.down_proj") == "down"
    assert seqstats.layer_index("model.layers.17.mlp.up_proj") == 17
    assert seqstats.galaxy_layer_type("blocks.2.patch_mixer.fc1") == "token-mixing fc1"
    assert seqstats.galaxy_layer_type("blocks.0.hidden_mixer.fc2") == "channel-mixing fc2"
    with pytest.raises(ValueError, match="LLaMA"):
        seqstats.llama_layer_type("lm_head")
    with pytest.raises(ValueError, match="galaxy"):
        seqstats.galaxy_layer_type("conv_in")
    with pytest.raises(ValueError, match="layer index"):
        seqstats.layer_index("lm_head")


# ----------------------------------------------------------------------------- pipelines
@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_llm_pipeline_matches_a_direct_capture(tiny_llama):
    from stamp_lib.model import capture

    model = tiny_llama
    g = torch.Generator().manual_seed(0)
    cal, ev = torch.randint(0, 50, (3, 16), generator=g), torch.randint(0, 50, (2, 16), generator=g)
    calls = []
    h = model.lm_head.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        res, aliases = seqstats.llm_sequence_stats(model, cal, ev, [0, 1], hp_tokens=4, chunk_layers=1,
                                                   keep_S=["model.layers.1.self_attn.q_proj"], progress=False)
    finally:
        h.remove()
    assert not calls, "the forward passes must stop after the last captured layer"
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()), "hooks left behind"
    assert aliases["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert aliases["model.layers.1.mlp.up_proj"] == "model.layers.1.mlp.gate_proj"
    assert sorted({r.layer_type for r in res.values()}) == ["down", "gate/up", "o", "q/k/v"]
    assert len(res) == 8 and all(r.levels["dwt"] == 2 for r in res.values())
    # the same numbers from a plain capture of the full forward and measure()
    name = "model.layers.1.self_attn.q_proj"
    Xe = capture.capture_inputs(model, ev, name, progress=False)[name]
    Xc = capture.capture_inputs(model, cal, name, progress=False)[name]
    klt = transforms.KLT.fit(Xc)
    direct = seqstats.measure(Xe, {"dct": transforms.build("dct"), "klt": klt}, ["4", "4x8+4"])
    r = res[name]
    assert r.n_calib == 3 and r.n_eval == 2 and r.s == 16 and r.d == 16
    for t in ("dct", "klt"):
        assert r.results[t].err["4x8+4"] == pytest.approx(direct[t].err["4x8+4"], rel=1e-5)
        assert r.results[t].energy_at(4) == pytest.approx(direct[t].energy_at(4), rel=1e-6)
    assert torch.allclose(r.S.double(), seqstats._autocorr(Xe)[0] / (2 * 16), rtol=1e-5)


def test_llm_pipeline_rejects_bad_windows(tiny_llama):
    ok = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="LongTensor"):
        seqstats.llm_sequence_stats(tiny_llama, ok.float(), ok, [0])
    with pytest.raises(ValueError, match="tokens"):
        seqstats.llm_sequence_stats(tiny_llama, torch.zeros(2, 4, dtype=torch.long), ok, [0])


def test_galaxy_pipeline_on_a_small_random_mixer():
    from stamp_lib.zoo import galaxy

    torch.manual_seed(0)
    model = galaxy.GalaxyScoreNet(img_size=32, hidden_size=8, mix_patch_size=16, mix_hidden_size=16,
                                  num_blocks=1).eval()
    y_cal, y_ev = torch.randn(3, 1, 32, 32), torch.randn(2, 1, 32, 32)
    res = seqstats.galaxy_sequence_stats(model, y_cal, y_ev, 1.0, hp_tokens=(4, 16), bits=("4", "4x8+4"),
                                         progress=False)
    assert set(res) == {"blocks.0.patch_mixer.fc1", "blocks.0.patch_mixer.fc2",
                        "blocks.0.hidden_mixer.fc1", "blocks.0.hidden_mixer.fc2"}
    ch = res["blocks.0.hidden_mixer.fc1"]
    assert ch.s == 64 and ch.levels == {"dwt": 4, "dwt2d": 2} and "dwt2d" in ch.results
    assert ch.toeplitz_no_token0 is None
    tok = res["blocks.0.patch_mixer.fc1"]
    assert tok.s == 8 and "dwt2d" not in tok.results  # rows are channels
    # the noised inputs are the VP-SDE marginal
    y = seqstats.galaxy_noised(y_ev, 1.0, 5)
    eps = galaxy.initial_noise(2, 5, (1, 32, 32))
    assert torch.allclose(y, math.exp(-0.5) * y_ev + math.sqrt(1 - math.exp(-1)) * eps, atol=1e-6)


@pytest.mark.parametrize("s, levels", [(64, 2), (64, 4), (32, 5)])
def test_wht_and_haar_share_their_coarse_rows(s, levels):
    """Remark of chapter 2: the first s/2^j rows of the sequency WHT and of an L-level Haar DWT
    (j <= L) span the same space, so they hold the same energy there (and different energy in
    between)."""
    X = torch.randn(3, s, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(s + levels))
    res = seqstats.measure(X, {"wht": transforms.build("wht"), "dwt": transforms.build("dwt", levels=levels)}, "4")
    for j in range(1, levels + 1):
        k = s // 2**j
        assert res["wht"].energy_at(k) == pytest.approx(res["dwt"].energy_at(k), rel=1e-10)
    k = 2 * s // 2**levels + 1  # inside a finer detail band the rows differ (Walsh rows are global)
    assert res["wht"].energy_at(k) != pytest.approx(res["dwt"].energy_at(k), rel=1e-6)


def test_center_tokens_removes_the_mean_token_direction():
    s = 10
    X = torch.randn(4, s, 6, dtype=torch.float64) + 3.0  # a large common offset
    S, cols = seqstats._autocorr(X)
    C = autocorr.center_tokens(S / cols)
    Xc = X - X.mean(dim=1, keepdim=True)  # per window and feature, minus the mean over tokens
    assert torch.allclose(C, seqstats._autocorr(Xc)[0] / cols, atol=1e-10)
    assert torch.allclose(C.sum(0), torch.zeros(s, dtype=torch.float64), atol=1e-10)
    # a constant matrix is Toeplitz; after centring nothing of it is left to explain
    assert autocorr.toeplitz_fraction(torch.ones(s, s)) == pytest.approx(1.0)
    assert autocorr.center_tokens(torch.ones(s, s)).abs().max() < 1e-12


def test_capture_autocorrelation_reducer_matches_einsum():

    x = torch.randn(3, 9, 5, dtype=torch.float64)
    ref = autocorr.AutoCorrelation()
    ref("m", x)
    ref("m", 2 * x)
    assert ref.counts["m"] == 30
    want = 5 * torch.einsum("nsd,ntd->st", x, x)
    assert torch.allclose(ref.sums["m"], want, rtol=1e-12)
    assert torch.allclose(seqstats._autocorr(x)[0], torch.einsum("nsd,ntd->st", x, x), rtol=1e-12)
