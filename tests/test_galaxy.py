"""The galaxygrad score network in torch: weights, an independent NumPy forward, the sampler, and
checks that the samples are galaxies (centred, positive, smooth) and that the network denoises."""

import importlib.util

import numpy as np
import pytest
import torch

from stamp_lib.zoo import galaxy as G

pytestmark = [
    pytest.mark.models,
    pytest.mark.skipif(importlib.util.find_spec("galaxygrad") is None, reason=f"needs `{G.INSTALL_HINT}`"),
]


# --- independent NumPy forward, written from the Equinox source (lax semantics, no torch) ---
def np_conv(x, w, stride, pad, lhs_dilation):
    """lax.conv_general_dilated for one image: x (Cin, H, W), w (Cout, Cin, kh, kw), no kernel flip."""
    cin, H, W = x.shape
    xd = np.zeros((cin, (H - 1) * lhs_dilation + 1, (W - 1) * lhs_dilation + 1))
    xd[:, ::lhs_dilation, ::lhs_dilation] = x
    xd = np.pad(xd, ((0, 0), (pad, pad), (pad, pad)))
    kh, kw = w.shape[2:]
    Ho, Wo = (xd.shape[1] - kh) // stride + 1, (xd.shape[2] - kw) // stride + 1
    out = np.zeros((w.shape[0], Ho, Wo))
    for a in range(kh):
        for b in range(kw):
            win = xd[:, a : a + stride * (Ho - 1) + 1 : stride, b : b + stride * (Wo - 1) + 1 : stride]
            out += np.einsum("oc,chw->ohw", w[:, :, a, b], win)
    return out


def np_layernorm(x, w, b):
    return (x - x.mean()) / np.sqrt(x.var() + 1e-5) * w + b  # Equinox: statistics over the whole array


def np_mlp(x, w1, b1, w2, b2):
    return w2 @ np.maximum(w1 @ x + b1, 0.0) + b2  # eqx.nn.MLP(depth=1), default activation relu


def np_scorenet(arrays, y, t):
    """galaxygrad ScoreNet.__call__(y, t) for one image y (C, H, W), arrays in file order."""
    a = [np.asarray(v, np.float64) for v in arrays]
    t1 = float(a[-1])
    y = np.concatenate([y, np.full((1, *y.shape[1:]), t / t1)])
    p = a[0].shape[-1]
    h = np_conv(y, a[0], p, 0, 1) + a[1]
    g = h.shape[1:]
    h = h.reshape(h.shape[0], -1)  # "c h w -> c (h w)"
    nblocks = (len(a) - 7) // 12
    for k in range(4, 4 + 12 * nblocks, 12):
        pw1, pb1, pw2, pb2, hw1, hb1, hw2, hb2, n1w, n1b, n2w, n2b = a[k : k + 12]
        h = h + np.stack([np_mlp(r, pw1, pb1, pw2, pb2) for r in np_layernorm(h, n1w, n1b)])
        h = h.T
        h = h + np.stack([np_mlp(r, hw1, hb1, hw2, hb2) for r in np_layernorm(h, n2w, n2b)])
        h = h.T
    h = np_layernorm(h, a[-3], a[-2]).reshape(-1, *g)
    k = a[2].shape[-1]
    return np_conv(h, a[2], 1, k - 1, p) + a[3]  # eqx ConvTranspose: dilate input, pad k-1


@pytest.fixture(scope="module", autouse=True)
def _single_thread(one_thread):
    """Every test here runs with one torch thread (fixture in conftest.py)."""


@pytest.fixture(scope="module")
def model():
    return G.load_galaxy_model("hsc_ScoreNet64")


@pytest.fixture(scope="module")
def samples(model):
    return G.sample(model, n=4, steps=12, seed=0, progress=False)


def test_every_model_loads_and_consumes_its_file():
    names = G.available_models()
    assert len(names) == 8 and "hsc_ScoreNet64" in names
    for name in names:
        arrays = G.read_eqx(G.model_path(name))
        m = G.load_galaxy_model(name)
        assert G.n_params(m) == sum(a.size for a in arrays[:-1]) and arrays[-1].shape == ()
        assert len(m.eqx_leaves()) == len(arrays) - 1
        assert m.num_tokens * m.patch_size**2 == m.img_size**2
        if name.endswith("64"):
            assert (m.img_size, m.num_tokens, len(m.blocks), G.n_params(m)) == (64, 256, 4, 1614145)
        params = dict(m.named_parameters())  # every leaf landed in its parameter
        for (pname, _, convert), a in zip(m.eqx_leaves(), arrays):
            np.testing.assert_array_equal(params[pname].numpy(), convert(a))


def test_clear_errors(tmp_path, monkeypatch, model):
    with pytest.raises(FileNotFoundError, match="available"):
        G.load_galaxy_model("no_such_model")
    arrays = G.read_eqx(G.model_path("hsc_ScoreNet64"))
    bad = tmp_path / "short.eqx"
    with open(bad, "wb") as f:
        for a in arrays[:-2] + arrays[-1:]:  # one LayerNorm array missing
            np.save(f, a)
    with pytest.raises(ValueError, match="arrays"):
        G.load_galaxy_model(path=bad)
    with pytest.raises(ValueError, match="shape"):
        G.load_arrays(G.GalaxyScoreNet(), arrays[:4] + [arrays[5]] + arrays[5:])
    (tmp_path / "junk.eqx").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="npy"):
        G.read_eqx(tmp_path / "junk.eqx")
    (tmp_path / "cut.eqx").write_bytes(G.model_path("hsc_ScoreNet64").read_bytes()[:5000])
    with pytest.raises(ValueError, match="npy"):
        G.read_eqx(tmp_path / "cut.eqx")
    with pytest.raises(ValueError, match=r"shape \(B, 1, 64, 64\)"):
        model(torch.zeros(2, 64, 64), 1.0)
    with pytest.raises(ValueError, match="t must be"):
        model(torch.zeros(2, 1, 64, 64), torch.ones(3))
    with pytest.raises(ValueError, match="schedule"):
        G.time_grid(10, schedule="cosine")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match="pip install --no-deps galaxygrad==0.1.9"):
        G.available_models()


def test_forward_equals_independent_numpy_reference(model):
    arrays = G.read_eqx(G.model_path("hsc_ScoreNet64"))
    y = np.random.default_rng(0).normal(size=(2, 1, 64, 64)) * 3.0
    t = np.array([0.3, 7.0])
    ref = np.stack([np_scorenet(arrays, y[i], t[i]) for i in range(2)])
    out32 = model(torch.tensor(y, dtype=torch.float32), torch.tensor(t, dtype=torch.float32)).numpy()
    out64 = G.load_galaxy_model().double()(torch.tensor(y), torch.tensor(t)).numpy()
    scale = np.abs(ref).max()
    assert np.abs(out64 - ref).max() < 1e-10 * scale
    assert np.abs(out32 - ref).max() < 1e-5 * scale


def test_linear_roles_and_activation_layouts(model):
    roles = G.linear_roles(model)
    assert len(roles) == 16 and sorted(set(roles.values())) == ["channel", "token"]
    shapes = {}
    hooks = [m.register_forward_pre_hook(lambda m, i, n=n: shapes.update({n: tuple(i[0].shape)}))
             for n, m in model.named_modules() if n in roles]
    model(torch.zeros(3, 1, 64, 64), 1.0)
    for h in hooks:
        h.remove()
    for name, role in roles.items():
        rows, feats = shapes[name][1:]
        assert (rows, feats) == ((256, 64 if name.endswith("fc1") else 512) if role == "channel"
                                 else (64, 256 if name.endswith("fc1") else 512)), name


def test_score_finite_and_deterministic(model, samples):
    """The score of one image depends on that image and its own t only: not on the other images of
    the batch, their times or their order (every LayerNorm normalises one sample), nor on earlier
    calls or on which loaded copy of the weights runs; the input is left untouched; finite at
    both ends of [0, t1]."""
    t_min = float(G.time_grid(12)[-2])  # the sampler's smallest time > 0
    y = samples.y.clone()
    t = torch.tensor([t_min, 0.5, 3.0, model.t1])  # one time per image, from one end to the other
    full = model.score(y, t)
    assert torch.equal(y, samples.y)  # not modified in place
    # the same call again, and on a separately loaded copy: the same computation, same bytes
    assert torch.equal(model.score(y, t), full)
    assert torch.equal(G.load_galaxy_model("hsc_ScoreNet64")(y, t), full)

    # other batch compositions are other computations (batched matmuls may round differently).
    # Tolerance per image from this forward's own float32 rounding error, measured against float64:
    # two float32 computations of one score each lie within about that of the exact score.
    exact = G.load_galaxy_model("hsc_ScoreNet64").double()(y.double(), t.double())
    f32_err = (full.double() - exact).abs().amax(dim=(1, 2, 3))
    tol = 4 * f32_err + torch.finfo(torch.float32).eps * exact.abs().amax(dim=(1, 2, 3))

    def check(got, idx, what):
        err = (got.double() - full[idx].double()).abs().amax(dim=(1, 2, 3))
        assert (err <= tol[idx]).all(), f"{what}: max error {err.tolist()} > tolerance {tol[idx].tolist()}"

    for i in range(len(y)):
        check(model(y[i : i + 1], t[i : i + 1]), [i], f"image {i} alone vs in the batch")
    perm = [2, 0, 3, 1]
    check(model(y[perm], t[perm]), perm, "permuted batch")
    # a float t and a (B,) tensor holding it mean the same
    a, b = model(y, 0.5), model(y, torch.full((len(y),), 0.5))
    eps = torch.finfo(torch.float32).eps
    torch.testing.assert_close(a, b, rtol=100 * eps, atol=100 * eps * float(b.abs().max()))

    # finite where the sampler goes and at the ends: the starting noise at t1, images at t -> 0 and t = 0
    for yy, tt in ((G.initial_noise(2, 3), model.t1), (y, t_min), (y, 0.0)):
        assert torch.isfinite(model(yy, tt)).all(), tt


def test_network_denoises_its_own_samples(model, samples):
    """Relative denoising loss ||sigma_t s(y_t) + eps||^2 / ||eps||^2 is small; a model with the
    Equinox ConvTranspose kernel left unflipped fails (about 2), so the flip is pinned."""
    sde, g = G.VPSDE(), torch.Generator().manual_seed(1)
    wrong = G.load_galaxy_model()
    wrong.conv_out.weight.copy_(wrong.conv_out.weight.flip(2, 3))
    for t in (0.1, 1.0):
        eps = torch.randn(samples.y.shape, generator=g)
        yt, std = sde.perturb(samples.y, t, eps), float(sde.marginal(t)[1])
        rel = lambda m: float(((std * m(yt, t) + eps) ** 2).sum() / (eps**2).sum())  # noqa: E731
        print(f"t={t}: relative denoising loss {rel(model):.4f}, unflipped conv_out {rel(wrong):.4f}")
        assert rel(model) < 0.1 and rel(wrong) > 1.0


def test_samples_look_like_galaxies(samples):
    x = samples.image[:, 0]
    assert torch.isfinite(samples.y).all() and torch.equal(samples.image, torch.expm1(0.1 * samples.y))
    centre = x[:, 24:40, 24:40].mean(dim=(1, 2))
    border = torch.cat([x[:, :8].flatten(1), x[:, -8:].flatten(1), x[:, :, :8].flatten(1), x[:, :, -8:].flatten(1)], 1)
    assert (centre > 20 * border.abs().mean(1)).all()  # a bright source in the middle of each cutout
    assert x.min() > -0.05 * x.amax(dim=(1, 2)).min()  # non-negative up to noise
    assert (x.amax(dim=(1, 2)) > 0.1).all()

    def lag1(z):  # mean correlation between horizontal neighbours
        z = z - z.mean(dim=(1, 2), keepdim=True)
        return float((z[..., 1:] * z[..., :-1]).sum() / (z**2).sum())

    noise = G.initial_noise(4, 0)[:, 0]
    assert lag1(samples.y[:, 0]) > 0.7 and abs(lag1(noise)) < 0.05
    # no 4x4 patch seams: differences across patch borders ~ differences inside patches
    d = (samples.y[..., 1:] - samples.y[..., :-1]).abs()
    j = torch.arange(63)
    assert 0.7 < float(d[..., j % 4 == 3].mean() / d[..., j % 4 != 3].mean()) < 1.4


def test_sampler_is_deterministic_and_takes_any_model(model, samples):
    again = G.sample(model, n=4, steps=12, seed=0, progress=False)
    assert torch.equal(again.y, samples.y)
    other = G.sample(model, n=4, steps=2, seed=1, progress=False)
    assert not torch.equal(other.times, samples.times) and not torch.allclose(other.y, samples.y, atol=0.1)
    # the same noise through a perturbed "quantized" score: close to, not equal to, full precision
    noise = G.initial_noise(4, 0)
    perturbed = G.sample(lambda y, t: model(y, t) * 1.01, noise=noise, steps=12, progress=False)
    sqnr = 10 * torch.log10((samples.y**2).sum() / ((perturbed.y - samples.y) ** 2).sum())
    assert 10 < float(sqnr) < 80


def test_heun_sampler_converges(model):
    """Error against a 48-step solution shrinks fast with the step count (2nd order) and the EDM
    grid beats a grid uniform in t at equal cost."""
    def run(steps, sched="edm"):
        return G.sample(model, n=1, steps=steps, seed=2, schedule=sched, progress=False).y

    ref = run(48)
    err = {s: float(((run(s) - ref) ** 2).sum()) for s in (6, 12)}
    assert err[12] < err[6] / 3
    assert float(((run(12, "linear") - ref) ** 2).sum()) > 3 * err[12]


def test_scaled_ode_is_galaxygrad_drift(model, samples):
    """The sampler's slope d y~/d sigma~ = -sigma_t s equals galaxygrad's dy/dt = -(y + s)/2
    after the change of variables y~ = y e^(t/2), sigma~ = sqrt(e^t - 1)."""
    sde, t, y = G.VPSDE(), 0.7, samples.y.double()
    m64 = G.load_galaxy_model().double()
    s = m64(y, t)
    dy_dt = sde.ode_drift(y, s)
    dyt_dt = np.exp(t / 2) * (dy_dt + 0.5 * y)
    dsig_dt = np.exp(t) / (2 * np.sqrt(np.expm1(t)))
    torch.testing.assert_close(-float(sde.marginal(t)[1]) * s, dyt_dt / dsig_dt, rtol=1e-10, atol=1e-10)


def test_sde_marginals():
    sde = G.VPSDE()
    m, s = sde.marginal(torch.tensor([0.0, 1.0, 10.0]))
    assert torch.allclose(m, torch.exp(torch.tensor([0.0, -0.5, -5.0], dtype=torch.float64)))
    assert torch.allclose(s**2, torch.tensor([1e-5, 1 - np.exp(-1), 1 - np.exp(-10)], dtype=torch.float64))
    grid = G.time_grid(10)
    assert len(grid) == 11 and grid[0] == 10 and grid[-2] == 1e-4 and grid[-1] == 0 and (grid.diff() < 0).all()
    for sched in ("linear", "quadratic"):
        assert (G.time_grid(5, schedule=sched).diff() < 0).all()
    x = torch.rand(5) * 3
    assert torch.allclose(G.to_image(G.to_model_space(x)), x, atol=1e-6)
