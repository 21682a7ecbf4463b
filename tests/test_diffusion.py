"""The galaxy image-generator experiment (stamp_lib.diffusion): switched-off sampling is the
full-precision sampling, the grid transform reaches exactly the channel-mixing inputs (equal to
an independent STaMP computation there, plain quantization elsewhere), folding without
quantization changes nothing, metrics and paired comparisons, clear errors."""

import importlib.util
import json
import math

import pytest
import torch

from stamp_lib.core import metrics, quant, transforms
from stamp_lib.experiments import diffusion as D
from stamp_lib.model import hooks
from stamp_lib.model import recipe as rcp
from stamp_lib.model.recipe import Recipe, Rule, WeightQuant
from stamp_lib.zoo import galaxy as G

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(importlib.util.find_spec("galaxygrad") is None, reason=f"needs `{G.INSTALL_HINT}`"),
]

STEPS = 3


@pytest.fixture(scope="module")
def model(one_thread):
    return G.load_galaxy_model()


@pytest.fixture(scope="module")
def refs(model):
    return [D.reference(model, seed, n=2, steps=STEPS) for seed in (0, 1)]


@pytest.fixture(scope="module")
def calib(model):
    return D.calibration_batches(model, seed=1000, n=2, steps=STEPS)


def test_reference_records_first_call_of_every_step(model, refs):
    r = refs[0]
    assert len(r.inputs) == len(r.scores) == STEPS
    assert [t for _, t in r.inputs] == pytest.approx(r.times[:STEPS].tolist())
    s = G.sample(model, noise=r.noise, steps=STEPS, progress=False)
    assert torch.equal(s.y, r.y)
    torch.testing.assert_close(model(*r.inputs[1]), r.scores[1])


def test_switched_off_sampling_is_full_precision(model, refs):
    """The fp configuration goes through apply() and the same sampler: the very same bytes."""
    out = D.evaluate(model, D.galaxy_config("fp"), refs, score_batches=2)
    assert torch.isinf(out.sqnr_image).all() and torch.isinf(out.sqnr_y).all()
    assert torch.isinf(out.score_sqnr).all()
    with rcp.apply(model, D.galaxy_config("fp").recipe, check_finite=False):
        y = G.sample(model, noise=refs[0].noise, steps=STEPS, progress=False).y
    assert torch.equal(y, refs[0].y)


def test_grid_transform_reaches_only_channel_mixing_inputs(model, refs):
    """Every quantized input equals an independent computation: STaMP with the 2-D Haar (3 levels,
    16 x 16 grid, 4 rows at 8 bits) on channel-mixing inputs, plain 4-bit per-row quantization on
    token-mixing inputs (rows = 64 channels)."""
    cfg = D.galaxy_config("rtn", stamp=True, w_bits=None)
    T = transforms.HaarDWT2D((16, 16), levels=3)
    bits = torch.full((256,), 4)
    bits[:4] = 8
    seen = {}

    def observe(name, x, x_hat):
        seen.setdefault(name, []).append(tuple(x.shape))
        if hooks.matches(name, D.CHANNEL_MIXING):
            want = quant.stamp_fake_quant(x, T, bits)
        else:
            want = quant.fake_quant(x, 4)
        torch.testing.assert_close(x_hat, want, rtol=1e-5, atol=1e-5)

    y, t = refs[0].inputs[1]
    with rcp.apply(model, cfg.recipe, observe=observe) as st:
        model(y, t)
    assert len(seen) == 16
    for name, shapes in seen.items():
        s, d = shapes[0][-2:]
        if "hidden_mixer" in name:
            assert (s, d) == (256, 64 if name.endswith("fc1") else 512)
        else:
            assert (s, d) == (64, 256 if name.endswith("fc1") else 512)
    assert st.average_bits() == pytest.approx((8 * (4 * 8 + 252 * 4) + 8 * 64 * 4) / (8 * 256 + 8 * 64))


def test_bit_matched_baseline_keeps_first_tokens(model, refs):
    """Without STaMP the first hp untransformed tokens get the 8 bits: same average bits."""
    base = D.galaxy_config("rtn", w_bits=None, hp_tokens=16)
    stamp = D.galaxy_config("rtn", w_bits=None, hp_tokens=16, stamp=True)

    def check(name, x, x_hat):
        if hooks.matches(name, D.CHANNEL_MIXING):
            b = torch.full((256,), 4)
            b[:16] = 8
            torch.testing.assert_close(x_hat, quant.fake_quant(x, b), rtol=1e-5, atol=1e-5)

    y, t = refs[0].inputs[0]
    with rcp.apply(model, base.recipe, observe=check) as st_b:
        model(y, t)
    with rcp.apply(model, stamp.recipe) as st_s:
        model(y, t)
    assert st_b.average_bits() == pytest.approx(st_s.average_bits())


@pytest.mark.parametrize("rule", [
    Rule("*", feature="hadamard"),
    Rule("*", feature="hadamard", hadamard_seed=3),
    Rule("*", feature="hadamard", hadamard_seed=3, weight=WeightQuant(bits=16, lowrank=8)),
    Rule("*", feature="smoothquant"),
    Rule("*", weight=WeightQuant(bits=16, lowrank=16)),
    Rule("*", weight=WeightQuant(bits=16, lowrank=8), feature="smoothquant"),
])
def test_folding_without_quantization_keeps_outputs(model, refs, calib, rule):
    """Feature transforms folded into the weights (plain and randomized Hadamard, SmoothQuant) and
    the low-rank branch (residual at 16 bits) leave the network output unchanged up to float error."""
    cfg = D.Config("fold", Recipe((rule,)))
    prep = D.prepare(model, cfg, calib)
    if rule.feature == "hadamard":
        assert prep.features and all(f.seed == rule.hadamard_seed for f in prep.features.values())
    y, t = refs[0].inputs[1]
    want = model(y, t)
    with rcp.apply(model, cfg.recipe, prep):
        got = model(y, t)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))
    assert torch.equal(model(y, t), want)  # restored


def test_quantized_run_metrics(model, refs, calib):
    cfgs = {"base": D.galaxy_config("svdquant", rank=4), "stamp": D.galaxy_config("svdquant", rank=4, stamp=True)}
    res = D.run_configs(model, cfgs, refs, calib, score_batches=1, progress=False)
    for r in res.values():
        assert r.n == 4 and torch.isfinite(r.sqnr_image).all() and r.score_sqnr.shape == (1, STEPS)
        assert r.seed_means().shape == (2,) and math.isfinite(r.seed_spread())
        assert r.channel_bits == pytest.approx(4 + 4 * 4 / 256)
        assert r.images.shape == refs[0].image.shape
        json.dumps(r.summary())
    p = D.paired(res["base"], res["stamp"])
    d = res["stamp"].sqnr_image - res["base"].sqnr_image
    assert p["delta_db"] == pytest.approx(float(d.mean())) and p["n"] == 4 and p["wins"] == int((d > 0).sum())


def test_viditq_is_its_published_channel_balancing_on_the_smoothquant_path(model, refs, calib):
    """galaxy_config('viditq'): SmoothQuant scales at ViDiT-Q's strength 0.3 from calibration, dynamic
    per-row activation ranges, no low-rank branch; its scales are those of the svdquant path at the
    same strength (one implementation); its departures travel with the configuration."""
    from stamp_lib.methods import viditq

    c = D.galaxy_config("viditq")
    rule = c.recipe.rules[0]
    assert rule.feature == "smoothquant" and rule.alpha == viditq.ALPHA == 0.3 and rule.weight.lowrank == 0
    assert c.info["alpha"] == 0.3 and c.info["departures"] == list(viditq.DEPARTURES)
    assert c.recipe.needs_calibration() and D.galaxy_config("viditq", alpha=0.5).recipe.rules[0].alpha == 0.5
    prep = D.prepare(model, c, calib)
    same = D.prepare(model, D.galaxy_config("svdquant", rank=0, alpha=0.3), calib)
    name = next(iter(prep.features))
    x = torch.randn(3, prep.features[name].d, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(prep.features[name].forward(x), same.features[name].forward(x))
    res = D.run_configs(model, {"b": c, "s": D.galaxy_config("viditq", stamp=True)}, refs[:1], calib, progress=False)
    assert all(torch.isfinite(r.sqnr_image).all() for r in res.values())


def test_sqnr_per_image_matches_metrics():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
    got = metrics.sqnr_db_per_sample(a, a + 0.1 * b)
    for i in range(3):
        assert float(got[i]) == pytest.approx(metrics.sqnr_db(a[i], a[i] + 0.1 * b[i]))
    peak = a[0].max() - a[0].min()
    assert float(metrics.psnr_db_per_sample(a, a + 0.1 * b)[0]) == pytest.approx(
        float(10 * torch.log10(peak**2 / (0.1 * b[0]).pow(2).mean())), rel=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        metrics.sqnr_db_per_sample(a, a[:2])


def test_paired_needs_the_same_images(model, refs):
    r1 = D.evaluate(model, D.galaxy_config("rtn", w_bits=None), refs[:1], score_batches=0)
    r2 = D.evaluate(model, D.galaxy_config("rtn", w_bits=None), refs, score_batches=0)
    with pytest.raises(ValueError, match="same images"):
        D.paired(r1, r2)


def test_row_structure_separates_tokens_from_channels(model, refs):
    """Shuffling the rows destroys the (centred) compaction of patch tokens, not that of channel rows."""
    rs = D.row_structure(model, refs[:1], steps=(1,), n_perm=4)
    ch = [v for v in rs.values() if v["kind"] == "channel"]
    tk = [v for v in rs.values() if v["kind"] == "token"]
    assert len(ch) == len(tk) == 8
    for v in rs.values():
        assert 0 <= v["toeplitz"] <= 1 and 0 < v["energy_centred_shuffled"] <= 1
        assert v["energy"] > v["energy_centred"] and v["S"].shape == (v["s"], v["s"])
    def mean(vs, f):
        return sum(f(v) for v in vs) / len(vs)

    ratio = lambda v: v["energy_centred"] / v["energy_centred_shuffled"]  # noqa: E731
    assert mean(ch, ratio) > 2 and mean(tk, ratio) < 1.3
    assert mean(ch, lambda v: v["toeplitz"]) > 1.5 * mean(tk, lambda v: v["toeplitz"])


@pytest.mark.parametrize("kw, match", [
    (dict(method="gptq"), "unknown method"),
    (dict(method="rtn", hp_tokens=300), "exceeds"),
    (dict(method="rtn", hadamard_seed=1), "hadamard_seed"),
    (dict(method="rtn", token_stamp=True, token_hp=0), "token_hp"),
    (dict(method="svdquant", w_bits=None), "low-rank"),
    (dict(method="rtn", hp_tokens=-1), "hp_tokens"),
    (dict(method="rtn", a_bits=None, stamp=True), "full-precision activations"),
    (dict(method="rtn", a_bits=None, w_bits=None), "full-precision activations"),
])
def test_bad_configs(kw, match):
    with pytest.raises(ValueError, match=match):
        D.galaxy_config(**kw)


def test_weight_only_config(model, refs):
    cfg = D.galaxy_config("rtn", a_bits=None)
    assert cfg.name == "rtn W4A16 hp4" and all(r.act is None for r in cfg.recipe.rules)
    out = D.evaluate(model, cfg, refs[:1], score_batches=0)
    assert math.isnan(out.act_bits) and torch.isfinite(out.sqnr_image).all()


def test_calibration_is_required_and_named(model, refs):
    with pytest.raises(ValueError, match="calibration"):
        D.evaluate(model, D.galaxy_config("svdquant"), refs[:1])


def test_wrong_grid_is_refused(model, refs):
    cfg = D.galaxy_config("rtn", stamp=True, grid=(8, 32))  # 256 tokens, wrong shape: fine
    D.evaluate(model, cfg, refs[:1], score_batches=0)
    with pytest.raises(ValueError, match="token grid 8x16"):
        cfg = D.galaxy_config("rtn", stamp=True, grid=(8, 16))
        D.evaluate(model, cfg, refs[:1], score_batches=0)


def test_cli_one_row(tmp_path, model):
    out = D.main(["--method", "rtn", "--w-bits", "0", "--seeds", "1", "--images", "2", "--steps", "2",
                  "--out", str(tmp_path / "r.json"), "--cells", str(tmp_path / "cells")])
    assert set(out["results"]) == {"base", "stamp"} and out["paired"]["n"] == 2
    assert json.loads((tmp_path / "r.json").read_text())["paired"]["n"] == 2


def test_benchmark_smoke(model, capsys):
    out = D.benchmark(n=1, steps=1, repeats=1)
    assert set(out["time_ratio"]) >= {"fp", "rtn W4A4 + stamp"} and out["time_ratio"]["fp"] == 1.0
    assert out["target_ratio"] == 2.0 and "previous_time_ratio" not in out
    # the previous per-call path, timed in the same run; the switches are restored afterwards
    from stamp_lib.core import quant as Q
    from stamp_lib.experiments import bench

    out = D.benchmark(n=1, steps=1, repeats=1, previous=True)
    assert set(out["previous_time_ratio"]) == set(out["time_ratio"]) - {"fp"}
    assert "previous per-call path" in capsys.readouterr().out
    assert Q._FUSED and not rcp._LEGACY
    with bench.previous_hot_path():
        assert not Q._FUSED and rcp._LEGACY
    assert Q._FUSED and not rcp._LEGACY


# ----------------------------------------------------------------------------- resuming (stamp_lib.core.cells)
def _same_outcome(a, b):
    for f in ("sqnr_image", "sqnr_y", "psnr", "seed", "score_sqnr", "score_t", "images"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.act_bits == b.act_bits and a.channel_bits == b.channel_bits and a.config is not None


def test_references_and_configurations_resume_from_a_store(tmp_path, model, refs, calib):
    """Each reference and each configuration is one cell: a rerun reuses them (bit for bit, no
    preparation), evaluate() and run_configs() share the cells, a changed knob is another cell."""
    from stamp_lib.core.cells import CellStore

    st = CellStore(tmp_path / "cells")
    r0 = D.reference(model, 0, n=2, steps=STEPS, store=st)
    r0b = D.reference(model, 0, n=2, steps=STEPS, store=st)
    assert st.counts() == {"computed": 1, "reused": 1}
    for f in ("noise", "y", "image", "times"):
        assert torch.equal(getattr(r0, f), getattr(refs[0], f)) and torch.equal(getattr(r0b, f), getattr(refs[0], f))
    assert all(torch.equal(a[0], b[0]) and torch.equal(torch.as_tensor(a[1]), torch.as_tensor(b[1]))
               for a, b in zip(r0b.inputs, refs[0].inputs))
    assert all(torch.equal(a, b) for a, b in zip(r0b.scores, refs[0].scores))
    D.reference(model, 0, n=2, steps=STEPS + 1, store=st)  # another knob
    assert st.counts()["computed"] == 2

    cfgs = {"base": D.galaxy_config("svdquant", rank=4), "stamp": D.galaxy_config("svdquant", rank=4, stamp=True)}
    plain = D.run_configs(model, cfgs, refs, calib, progress=False)
    assert plain.counts == {}
    first = D.run_configs(model, cfgs, refs, calib, progress=False, store=st)
    assert first.counts == {"computed": 2, "reused": 0}
    prepared = []
    real = D.prepare
    D.prepare = lambda *a, **k: prepared.append(1) or real(*a, **k)
    try:
        second = D.run_configs(model, cfgs, refs, calib, progress=False, store=st)
    finally:
        D.prepare = real
    assert second.counts == {"computed": 0, "reused": 2} and prepared == []
    for k in cfgs:
        _same_outcome(first[k], plain[k])
        _same_outcome(second[k], plain[k])
        assert second[k].config is cfgs[k]
    assert D.paired(second["base"], second["stamp"]) == D.paired(plain["base"], plain["stamp"])
    one = D.evaluate(model, cfgs["stamp"], refs, calib=calib, store=st)  # the same cell as run_configs'
    _same_outcome(one, plain["stamp"])
    assert st.counts()["reused"] == 1 + 2 + 1
    n = st.counts()["computed"]
    D.run_configs(model, cfgs, refs[:1], calib, progress=False, store=st)  # other references
    D.run_configs(model, {"base": D.galaxy_config("svdquant", rank=2)}, refs, calib, progress=False, store=st)
    D.run_configs(model, {"base": cfgs["base"]}, refs, calib[:1], progress=False, store=st)  # other calibration
    assert st.counts()["computed"] == n + 2 + 1 + 1


def test_stamp_resume_uses_the_default_store(tmp_path, model, refs, monkeypatch):
    from stamp_lib.core import cells

    monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(cells.ENV_RESUME, "1")
    cfgs = {"rtn": D.galaxy_config("rtn", w_bits=None)}
    a = D.run_configs(model, cfgs, refs[:1], progress=False)
    b = D.run_configs(model, cfgs, refs[:1], progress=False)
    assert a.counts == {"computed": 1, "reused": 0} and b.counts == {"computed": 0, "reused": 1}
    assert len(list((tmp_path / "cache" / "cells" / "diffusion").glob("*.cell"))) == 1
    _same_outcome(a["rtn"], b["rtn"])


def test_cli_resumes(tmp_path, model):
    argv = ["--method", "rtn", "--seeds", "1", "--images", "1", "--steps", "1", "--out", str(tmp_path / "r.json"),
            "--cells", str(tmp_path / "cells"), "--quiet"]
    first = D.main(argv)
    assert first["cells"]["computed"] == 3 and first["cells"]["reused"] == 0  # one reference, two configurations
    again = D.main(argv)
    assert again["cells"]["computed"] == 0 and again["cells"]["reused"] == 3
    same = [json.dumps(r[k], sort_keys=True) for r in (first, again) for k in ("results", "paired")]
    assert same[:2] == same[2:]  # every number, NaN spreads of one image included
    assert again["command"] == first["command"] and "--cells" not in first["command"]
    fresh = D.main([*argv, "--no-resume"])
    assert fresh["cells"]["computed"] == 3 and fresh["cells"]["reused"] == 0
    for k in ("base", "stamp"):
        assert fresh["results"][k]["sqnr_image_db"] == first["results"][k]["sqnr_image_db"]


# ----------------------------------------------------------------------------- the mean-token control, groups
@pytest.mark.parametrize("s", [2, 5, 16, 256])
def test_mean_token_transform_is_orthogonal_with_the_ones_row_first(s):
    """The Householder control: orthogonal, symmetric, first row the normalised all-ones vector,
    the fast path equal to its independently built matrix, its own inverse; rows past the first
    close to the identity (each a token minus about the mean token)."""
    T = transforms.MeanToken()
    M = T.matrix(s, torch.float64)
    torch.testing.assert_close(M @ M.T, torch.eye(s, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(M, M.T, rtol=0, atol=1e-15)
    torch.testing.assert_close(M[0], torch.full((s,), s ** -0.5, dtype=torch.float64), rtol=0, atol=1e-15)
    # rows 1.. are orthogonal to the ones vector: they carry no mean
    torch.testing.assert_close(M[1:].sum(1), torch.zeros(s - 1, dtype=torch.float64), rtol=0, atol=1e-12)
    if s >= 16:
        assert float((M[1:, 1:] - torch.eye(s - 1, dtype=torch.float64)).abs().max()) < 2.0 / s
    X = torch.randn(3, s, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(s))
    torch.testing.assert_close(T.forward(X), M @ X, rtol=0, atol=1e-12)
    torch.testing.assert_close(T.inverse(T.forward(X)), X, rtol=0, atol=1e-12)


def test_mean_token_config_reaches_the_channel_mixing_inputs(model, refs):
    """mean_token=True: the channel-mixing inputs get L^T Q(L X) with L the Householder control and
    the first 4 rows at 8 bits (the same average bits as STaMP); the token-mixing inputs stay plain."""
    cfg = D.galaxy_config("rtn", w_bits=None, mean_token=True)
    assert cfg.info["sequence_transform"] == "mean-token Householder" and "+mean" in cfg.name
    ch = cfg.recipe.rules[0].act
    assert ch.transform == "mean"
    assert cfg.recipe.rules[1].act.transform != "mean"
    L = transforms.MeanToken()
    bits = torch.full((256,), 4)
    bits[:4] = 8
    seen = set()

    def observe(name, x, x_hat):
        seen.add(name)
        want = quant.stamp_fake_quant(x, L, bits) if hooks.matches(name, D.CHANNEL_MIXING) else quant.fake_quant(x, 4)
        torch.testing.assert_close(x_hat, want, rtol=1e-5, atol=1e-5)

    y, t = refs[0].inputs[1]
    with rcp.apply(model, cfg.recipe, observe=observe) as st:
        model(y, t)
    assert len(seen) == 16
    with rcp.apply(model, D.galaxy_config("rtn", w_bits=None, stamp=True).recipe) as st_s:
        model(y, t)
    assert st.average_bits() == pytest.approx(st_s.average_bits())
    # an identity spec is untouched by the mean-token hook: the baseline is plain per-token
    base = D.galaxy_config("rtn", w_bits=None)
    with rcp.apply(model, base.recipe, observe=lambda n, x, xh: seen.add(("b", n))) as _:
        out_b = model(y, t)
    with rcp.apply(model, cfg.recipe) as _:
        out_m = model(y, t)
    assert not torch.equal(out_b, out_m)


def test_mean_token_keys_differ_from_the_baseline():
    """The cell key (knobs) tells the control from the per-token baseline at the same bits."""
    a = D.galaxy_config("rtn", mean_token=True, block_size=16, group_size=16)
    b = D.galaxy_config("rtn", block_size=16, group_size=16)
    assert a.knobs() != b.knobs() and a.prep_key() == b.prep_key()
    with pytest.raises(ValueError, match="stamp=False"):
        D.galaxy_config("rtn", mean_token=True, stamp=True)
    with pytest.raises(ValueError, match="2-D 'dwt' only"):
        rcp.ActQuant(bits="4x8+4", transform="mean", grid=(16, 16))


def test_group_size_is_applied_to_weights_and_activations(model, refs):
    """group_size=16: every quantized weight equals symmetric RTN per group of 16 input features
    (not per output channel); block_size=16: activations per block of 16 features."""
    cfg = D.galaxy_config("rtn", block_size=D.GROUP, group_size=D.GROUP)
    assert D.GROUP == 16 and cfg.info["group_size"] == 16 and cfg.info["granularity"] == "per-block-16"
    assert all(r.weight.group_size == 16 and r.act.block_size == 16 for r in cfg.recipe.rules)
    prep = D.prepare(model, cfg)
    per_channel = D.prepare(model, D.galaxy_config("rtn", block_size=16))
    assert len(prep.weights) == 16
    for name, Wq in prep.weights.items():
        W = dict(model.named_modules())[name].weight.detach()
        torch.testing.assert_close(Wq, quant.fake_quant(W.double(), 4, symmetric=True, block_size=16).to(W.dtype))
        assert not torch.equal(Wq, per_channel.weights[name])

    def observe(name, x, x_hat):
        torch.testing.assert_close(x_hat, quant.fake_quant(x, quant.two_level_bits(x.shape[-2], 4, 8, 4)
                                                           if hooks.matches(name, D.CHANNEL_MIXING) else 4,
                                                           block_size=16), rtol=1e-5, atol=1e-5)

    y, t = refs[0].inputs[1]
    with rcp.apply(model, cfg.recipe, prep, observe=observe):
        model(y, t)


def test_svdquant_rank_is_about_three_percent_of_the_width():
    cfg = D.galaxy_config("svdquant")
    assert D.RANK == 2 and cfg.info["rank"] == 2 and 0.02 <= D.RANK / 64 <= 0.04
    assert all(r.weight.lowrank == 2 for r in cfg.recipe.rules)


def test_crossed_over_sign_draws(model, refs):
    """crossed(): draws x images; one draw is the paired t interval; intervals contain the mean."""
    a = [D.evaluate(model, D.galaxy_config("hadamard", w_bits=None, hadamard_seed=s), refs, score_batches=0)
         for s in (0, 1)]
    b = [D.evaluate(model, D.galaxy_config("hadamard", w_bits=None, hadamard_seed=s, stamp=True), refs,
                    score_batches=0) for s in (0, 1)]
    one = D.crossed(a[:1], b[:1])
    p = D.paired(a[0], b[0])
    assert one["mean"] == pytest.approx(p["mean"]) and one["ci_lo"] == pytest.approx(p["ci_lo"])
    two = D.crossed(a, b)
    assert two["draws"] == 2 and two["n"] == 2 * a[0].n
    assert two["ci_lo"] <= two["mean"] <= two["ci_hi"] and two["delta_db"] == two["mean"]
    d = torch.stack([bb.sqnr_image - aa.sqnr_image for aa, bb in zip(a, b)])
    assert two["mean"] == pytest.approx(float(d.mean()))
    rep = D.crossed(a[:1], b)  # a deterministic base repeated over the draws
    assert rep["mean"] == pytest.approx(float(torch.stack([bb.sqnr_image - a[0].sqnr_image for bb in b]).mean()))
    with pytest.raises(ValueError, match="one base and one other"):
        D.crossed(a, b + b[:1])
