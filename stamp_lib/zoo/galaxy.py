r"""Pretrained galaxy score-based diffusion models (galaxygrad 0.1.9) in pure PyTorch.

The PyPI package ``galaxygrad==0.1.9`` (M. Sampson, Princeton) ships eight score networks trained
on galaxy images from the HSC, ZTF and LSST surveys (and one on lensed quasars). The package runs
them with JAX/Equinox; this module reads the same weight files with NumPy alone and runs them in
PyTorch, so that STaMP can quantize a real, pretrained image diffusion model on a CPU. The
package is only *read* (its ``.eqx`` files); it is never imported (importing it imports JAX), and
its weights are never copied into this repository. Install it with
``pip install --no-deps galaxygrad==0.1.9`` (0.3.0 ships no weights).

Architecture (read from ``galaxygrad/models_eqx.py``; it is the MLP-Mixer score network of
Equinox's ``examples/score_based_diffusion.ipynb``). For the 64 x 64 models:

* input ``y`` (1, 64, 64) in *model space* (see below) and a time ``t``; the time enters as one
  extra constant input channel holding ``t / t1`` (``t1 = 10``), concatenated **after** the
  image channel;
* ``conv_in``: 4 x 4 patchify convolution, stride 4, 2 -> 64 channels: 16 x 16 = 256 patch tokens
  (row-major), hidden size d = 64. The residual stream is kept as (d, s) = (64, 256), as in Equinox;
* 4 ``MixerBlock`` s, each
  ``h = h + patch_mixer(norm1(h))`` (token mixing: an MLP 256 -> 512 -> 256 applied to each of the
  64 channel rows, input layout (..., d, s)), then
  ``h^T = h^T + hidden_mixer(norm2(h^T))`` (channel mixing: an MLP 64 -> 512 -> 64 applied to each of
  the 256 token rows, input layout (..., s, d));
* the MLPs are ``equinox.nn.MLP(depth=1)`` with their default activation, **ReLU** (not GELU);
* every LayerNorm normalises over the *whole* (64, 256) array at once (Equinox's LayerNorm takes
  the mean and variance over all of its input, eps = 1e-5) and has an elementwise affine of that
  full shape: ``norm1``/``norm`` have shape (64, 256), ``norm2`` (256, 64). ``torch.nn.LayerNorm``
  with the same ``normalized_shape`` is the same map;
* a final LayerNorm ``norm`` and ``conv_out``: a 4 x 4 stride-4 transposed convolution 64 -> 1.
  Equinox's ConvTranspose stores its kernel as (out, in, kh, kw) and calls
  ``lax.conv_general_dilated`` *without* flipping it, so the PyTorch kernel (in, out, kh, kw) is the
  Equinox kernel with in/out swapped **and both spatial axes flipped**.

The eight files differ only in image size (32, 60, 64 or 72 pixels: 64, 225, 256 or 324
tokens); ``hsc_LogNet32/64`` are not used by the package's own code and their training data are
not documented. About 1.61 M parameters for 64 x 64 (0.61 M for 32 x 32). The network output is the
score :math:`\nabla_y \log p_t(y)` itself (trained with the loss
:math:`(1 - e^{-t})\,\| s_\theta(y_t, t) + \epsilon/\sigma_t \|^2`), no rescaling.

Which linears mix what (for STaMP, whose sequence transform acts on rows = tokens):

* ``blocks.{i}.hidden_mixer.fc1`` / ``fc2``: **channel mixing**; inputs (..., s=256 tokens, d)
  with d = 64 (fc1) or 512 (fc2). Rows are tokens: the natural target of a sequence transform
  (a 16 x 16 token grid, row-major).
* ``blocks.{i}.patch_mixer.fc1`` / ``fc2``: **token mixing**; inputs (..., d=64 channels, 256 or
  512): rows are channels and the *features* are tokens (fc1) or hidden units (fc2).

SDE (``galaxygrad/generate.py``): variance-preserving, ``int_beta(t) = t`` (beta = 1), t in
[0, t1 = 10]; marginal :math:`y_t = e^{-t/2} y_0 + \sigma_t \epsilon`,
:math:`\sigma_t^2 = \max(1 - e^{-t}, 10^{-5})`. Their sampler solves the probability-flow ODE
:math:`dy/dt = -\tfrac12 \beta (y + s_\theta(y, t))` from t1 to 0 with diffrax Tsit5 and a fixed
step of 0.025 (400 steps, 2400 network calls). Here the same ODE is solved with few calls in
the scaled variables of EDM (Karras et al. 2022): DDIM-like Euler or EDM's Heun sampler on a
rho-spaced grid (:func:`sample`, :func:`time_grid`).

Model space: ``y = log(1 + x) / 0.1`` (their ``sigma = 0.1``), so an image is
``x = exp(0.1 y) - 1`` (:func:`to_image`).

Everything runs in float32 unless the caller converts the model (``model.double()``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

PIN = "galaxygrad==0.1.9"
INSTALL_HINT = f"pip install --no-deps {PIN}"
LOG_SIGMA = 0.1  # galaxygrad's `sigma`: y = log(1 + x) / LOG_SIGMA
VAR_FLOOR = 1e-5  # equinox example: var = max(1 - exp(-int_beta(t)), 1e-5)

TOKEN_MIXING = re.compile(r"^blocks\.\d+\.patch_mixer\.fc[12]$")
CHANNEL_MIXING = re.compile(r"^blocks\.\d+\.hidden_mixer\.fc[12]$")


# ----------------------------------------------------------------------------- weight files


def package_dir() -> Path:
    """Folder of the installed galaxygrad package (found without importing it)."""
    spec = importlib.util.find_spec("galaxygrad")
    if spec is None or spec.origin is None:
        raise ImportError(f"the galaxy models need the package galaxygrad; install it with `{INSTALL_HINT}`")
    return Path(spec.origin).parent


def available_models() -> list[str]:
    """Names of the weight files shipped by galaxygrad, e.g. ``hsc_ScoreNet64``."""
    return sorted(p.name[len("eqx_") : -len(".eqx")] for p in package_dir().glob("eqx_*.eqx"))


def model_path(name: str) -> Path:
    """Path of ``eqx_<name>.eqx``; a clear error lists the available names."""
    path = package_dir() / f"eqx_{name}.eqx"
    if not path.is_file():
        try:
            version = importlib.metadata.version("galaxygrad")
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover
            version = "unknown"
        raise FileNotFoundError(
            f"no galaxy model {name!r} in galaxygrad {version} ({path.parent}); available: "
            f"{available_models()}. The weights ship only with {PIN} (`{INSTALL_HINT}`)."
        )
    return path


def read_eqx(path) -> list[np.ndarray]:
    """Every array of an ``eqx.tree_serialise_leaves`` file, in order.

    Such a file is the model's leaves (fields in definition order, depth first), each written with
    ``np.save`` one after the other; non-array leaves (activation functions) are skipped and static
    fields are not leaves. Python floats (``t1``) are saved as 0-d float64 arrays."""
    arrays = []
    with open(path, "rb") as f:
        end = os.fstat(f.fileno()).st_size
        while f.tell() < end:
            try:
                arrays.append(np.load(f, allow_pickle=False))
            except (ValueError, EOFError, OSError) as e:
                raise ValueError(f"{path}: not a sequence of .npy arrays (array {len(arrays)}): {e}") from e
    if not arrays:
        raise ValueError(f"{path} holds no arrays")
    return arrays


# ----------------------------------------------------------------------------- the network


class MixerMLP(nn.Module):
    """``equinox.nn.MLP(n, n, width, depth=1)``: fc2(relu(fc1(x))) on the last dim."""

    def __init__(self, size: int, width: int):
        super().__init__()
        self.fc1 = nn.Linear(size, width)
        self.fc2 = nn.Linear(width, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class MixerBlock(nn.Module):
    """One MLP-Mixer block on a residual stream ``h`` of shape (B, d, s) (channels, tokens)."""

    def __init__(self, num_patches: int, hidden_size: int, mix_patch_size: int, mix_hidden_size: int):
        super().__init__()
        self.patch_mixer = MixerMLP(num_patches, mix_patch_size)  # token mixing, input (B, d, s)
        self.hidden_mixer = MixerMLP(hidden_size, mix_hidden_size)  # channel mixing, input (B, s, d)
        self.norm1 = nn.LayerNorm((hidden_size, num_patches), eps=1e-5)
        self.norm2 = nn.LayerNorm((num_patches, hidden_size), eps=1e-5)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.patch_mixer(self.norm1(h))
        g = h.transpose(-1, -2)  # (B, s, d): rows are tokens
        g = g + self.hidden_mixer(self.norm2(g))
        return g.transpose(-1, -2)


class GalaxyScoreNet(nn.Module):
    """The galaxygrad ``ScoreNet`` (Equinox MLP-Mixer score model) as a torch module.

    ``forward(y, t)``: ``y`` (B, C, H, W) in model space, ``t`` a float or a (B,) tensor in
    [0, t1]; returns the score, same shape as ``y``. Tokens are the (H/p) x (W/p) patches in
    row-major order."""

    def __init__(
        self,
        img_size: int = 64,
        channels: int = 1,
        patch_size: int = 4,
        hidden_size: int = 64,
        mix_patch_size: int = 512,
        mix_hidden_size: int = 512,
        num_blocks: int = 4,
        t1: float = 10.0,
    ):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.img_size, self.channels, self.patch_size, self.t1 = img_size, channels, patch_size, float(t1)
        self.grid = img_size // patch_size
        num_patches = self.grid**2
        self.conv_in = nn.Conv2d(channels + 1, hidden_size, patch_size, stride=patch_size)
        self.conv_out = nn.ConvTranspose2d(hidden_size, channels, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(
            MixerBlock(num_patches, hidden_size, mix_patch_size, mix_hidden_size) for _ in range(num_blocks)
        )
        self.norm = nn.LayerNorm((hidden_size, num_patches), eps=1e-5)

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    def score(self, y: torch.Tensor, t) -> torch.Tensor:
        """Alias of ``self(y, t)`` (hooks run): the score of p_t at ``y`` in model space."""
        return self(y, t)

    def forward(self, y: torch.Tensor, t) -> torch.Tensor:
        shape = (self.channels, self.img_size, self.img_size)
        if not isinstance(y, torch.Tensor) or y.dim() != 4 or tuple(y.shape[1:]) != shape:
            got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"y must be a tensor of shape (B, {', '.join(map(str, shape))}), got {got}")
        B = y.shape[0]
        t = torch.as_tensor(t, dtype=y.dtype, device=y.device)
        if t.dim() == 0:
            t = t.expand(B)
        if t.shape != (B,):
            raise ValueError(f"t must be a scalar or a tensor of shape ({B},), got shape {tuple(t.shape)}")
        tc = (t / self.t1).view(B, 1, 1, 1).expand(B, 1, self.img_size, self.img_size)
        h = self.conv_in(torch.cat([y, tc], dim=1))  # (B, d, g, g)
        h = h.flatten(2)  # (B, d, s), tokens row-major
        for block in self.blocks:
            h = block(h)
        h = self.norm(h)
        return self.conv_out(h.reshape(B, -1, self.grid, self.grid))

    # -- Equinox leaf order: (torch parameter, Equinox shape, Equinox -> torch conversion) --
    def eqx_leaves(self) -> list[tuple[str, tuple, Callable[[np.ndarray], np.ndarray]]]:
        """The parameters in the order ``eqx.tree_serialise_leaves`` wrote them.

        ScoreNet fields: conv_in, conv_out, blocks, norm, t1; MixerBlock: patch_mixer,
        hidden_mixer, norm1, norm2; MLP: layers[0], layers[1] (weight then bias, (out, in) as in
        torch); LayerNorm: weight, bias."""
        same = lambda a: a  # noqa: E731
        squeeze = lambda a: a.reshape(-1)  # noqa: E731 - conv biases are (out, 1, 1) in Equinox
        # Equinox ConvTranspose = lax.conv_general_dilated(lhs_dilation=stride, pad k-1) with its
        # (out, in, kh, kw) kernel unflipped; torch's (in, out, kh, kw) kernel is its flip.
        convt = lambda a: np.ascontiguousarray(np.flip(a, axis=(2, 3)).transpose(1, 0, 2, 3))  # noqa: E731
        p = dict(self.named_parameters())
        shape = lambda n: tuple(p[n].shape)  # noqa: E731
        hi, ci, k, _ = shape("conv_out.weight")  # torch ConvTranspose2d: (in, out, kh, kw)
        out = [
            ("conv_in.weight", shape("conv_in.weight"), same),
            ("conv_in.bias", shape("conv_in.bias") + (1, 1), squeeze),
            ("conv_out.weight", (ci, hi, k, k), convt),
            ("conv_out.bias", shape("conv_out.bias") + (1, 1), squeeze),
        ]
        for i in range(len(self.blocks)):
            for mlp in ("patch_mixer", "hidden_mixer"):
                for fc in ("fc1", "fc2"):
                    for w in ("weight", "bias"):
                        n = f"blocks.{i}.{mlp}.{fc}.{w}"
                        out.append((n, shape(n), same))
            for norm in ("norm1", "norm2"):
                for w in ("weight", "bias"):
                    n = f"blocks.{i}.{norm}.{w}"
                    out.append((n, shape(n), same))
        out += [("norm.weight", shape("norm.weight"), same), ("norm.bias", shape("norm.bias"), same)]
        assert len(out) == len(p), "eqx_leaves must list every parameter"
        return out


def config_from_arrays(arrays: list[np.ndarray]) -> dict:
    """GalaxyScoreNet keyword arguments read off the array shapes of a weight file."""
    n = len(arrays)
    if n < 7 or (n - 7) % 12 or arrays[0].ndim != 4 or arrays[-2].ndim != 2 or arrays[-1].ndim != 0:
        raise ValueError(
            f"{n} arrays do not look like a galaxygrad ScoreNet (4 conv arrays, 12 per block, "
            f"2 final LayerNorm arrays, scalar t1)"
        )
    hidden, cin, p, p2 = arrays[0].shape
    d, s = arrays[-2].shape
    g = math.isqrt(s)
    if p != p2 or g * g != s or d != hidden:
        raise ValueError(f"unexpected shapes: conv_in {arrays[0].shape}, final norm {arrays[-2].shape}")
    return dict(
        img_size=g * p,
        channels=cin - 1,
        patch_size=p,
        hidden_size=hidden,
        mix_patch_size=arrays[4].shape[0],
        mix_hidden_size=arrays[8].shape[0],
        num_blocks=(n - 7) // 12,
        t1=float(arrays[-1]),
    )


def load_arrays(model: GalaxyScoreNet, arrays: list[np.ndarray], source: str = "weights") -> GalaxyScoreNet:
    """Copy Equinox leaves into ``model``: every array consumed, every shape checked."""
    leaves = model.eqx_leaves()
    if len(arrays) != len(leaves) + 1:
        raise ValueError(f"{source}: {len(arrays)} arrays, the model needs {len(leaves)} parameters + t1")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, ((name, eqx_shape, convert), a) in enumerate(zip(leaves, arrays)):
            if tuple(a.shape) != eqx_shape:
                raise ValueError(f"{source}: array {k} has shape {a.shape}, expected {eqx_shape} for {name}")
            params[name].copy_(torch.from_numpy(np.asarray(convert(a), dtype=np.float32)))
    t1 = arrays[-1]
    if t1.shape != () or float(t1) != model.t1:
        raise ValueError(f"{source}: last array should be the scalar t1={model.t1}, got {t1!r}")
    return model


def load_galaxy_model(name: str = "hsc_ScoreNet64", path=None) -> GalaxyScoreNet:
    """The pretrained network ``name`` (see :func:`available_models`) in eval mode, float32.

    ``path`` overrides the file location (an ``.eqx`` file from galaxygrad 0.1.9)."""
    path = Path(path) if path is not None else model_path(name)
    arrays = read_eqx(path)
    model = GalaxyScoreNet(**config_from_arrays(arrays))
    load_arrays(model, arrays, source=str(path))
    return model.eval().requires_grad_(False)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def linear_roles(model: GalaxyScoreNet) -> dict[str, str]:
    """``{name: "channel" | "token"}`` for every nn.Linear: channel-mixing inputs are (..., s, d)
    with tokens as rows; token-mixing inputs are (..., d, s) with channels as rows."""
    roles = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            roles[name] = "channel" if CHANNEL_MIXING.match(name) else "token" if TOKEN_MIXING.match(name) else "?"
    return roles


# ----------------------------------------------------------------------------- SDE and sampler


def to_image(y: torch.Tensor) -> torch.Tensor:
    """Model space -> image: ``x = exp(0.1 y) - 1`` (inverse of galaxygrad's ``log(x + 1) / 0.1``)."""
    return torch.expm1(LOG_SIGMA * y)


def to_model_space(x: torch.Tensor) -> torch.Tensor:
    """Image -> model space: ``y = log(1 + x) / 0.1``."""
    return torch.log1p(x) / LOG_SIGMA


class VPSDE:
    r"""Variance-preserving SDE ``dy = -beta/2 y dt + sqrt(beta) dW`` with constant ``beta``
    (galaxygrad: ``int_beta(t) = t``, beta = 1, t in [0, t1 = 10]).

    Marginal: :math:`y_t = \alpha_t y_0 + \sigma_t \epsilon`, :math:`\alpha_t = e^{-\beta t/2}`,
    :math:`\sigma_t^2 = \max(1 - e^{-\beta t}, 10^{-5})` (the floor of the training loss).
    The sampler uses the scaled variables :math:`\tilde y = y/\alpha_t` and
    :math:`\tilde\sigma = \sigma_t/\alpha_t = \sqrt{e^{\beta t} - 1}`, in which the
    probability-flow ODE :math:`dy/dt = -\tfrac{\beta}{2}(y + s(y, t))` reads
    :math:`d\tilde y / d\tilde\sigma = -\sigma_t\, s(y, t) = (\tilde y - D)/\tilde\sigma` with
    :math:`D = (y + \sigma_t^2 s)/\alpha_t` the denoised estimate (Karras et al. 2022, EDM)."""

    def __init__(self, beta: float = 1.0, t1: float = 10.0):
        self.beta, self.t1 = float(beta), float(t1)

    def marginal(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) of y_t | y_0 as float64 tensors."""
        ib = self.beta * torch.as_tensor(t, dtype=torch.float64)
        return torch.exp(-0.5 * ib), torch.sqrt(torch.clamp(-torch.expm1(-ib), min=VAR_FLOOR))

    def perturb(self, y0: torch.Tensor, t: float, noise: torch.Tensor) -> torch.Tensor:
        """y_t = alpha_t y0 + sigma_t noise."""
        a, s = self.marginal(t)
        return float(a) * y0 + float(s) * noise

    def ode_drift(self, y: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """Probability-flow ODE in t: dy/dt = -beta/2 (y + score) (galaxygrad's drift)."""
        return -0.5 * self.beta * (y + score)

    def sigma_tilde(self, t) -> torch.Tensor:
        return torch.sqrt(torch.expm1(self.beta * torch.as_tensor(t, dtype=torch.float64)))

    def t_of_sigma_tilde(self, s) -> torch.Tensor:
        return torch.log1p(torch.as_tensor(s, dtype=torch.float64) ** 2) / self.beta


def time_grid(
    steps: int, t1: float = 10.0, schedule: str = "edm", t_min: float = 1e-4, rho: float = 7.0, beta: float = 1.0
) -> torch.Tensor:
    """``steps`` decreasing times from ``t1`` to ``t_min``, then 0 (``steps + 1`` values).

    ``"edm"``: Karras et al.'s rho-spaced noise levels in sigma~ = sqrt(e^(beta t) - 1) (dense near
    t = 0); ``"quadratic"``: uniform in sqrt(t); ``"linear"``: uniform in t (galaxygrad's fixed
    dt). ``t_min = 1e-4`` keeps the last noise level (sigma~ ~ 0.01) above the 1e-5 variance floor
    the network was trained with."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0.0 < t_min < t1:
        raise ValueError(f"need 0 < t_min < t1, got t_min={t_min}, t1={t1}")
    u = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    if schedule == "edm":
        sde = VPSDE(beta, t1)
        lo, hi = float(sde.sigma_tilde(t_min)) ** (1 / rho), float(sde.sigma_tilde(t1)) ** (1 / rho)
        t = sde.t_of_sigma_tilde((hi + u * (lo - hi)) ** rho)
    elif schedule == "quadratic":
        t = (math.sqrt(t1) + u * (math.sqrt(t_min) - math.sqrt(t1))) ** 2
    elif schedule == "linear":
        t = t1 + u * (t_min - t1)
    else:
        raise ValueError(f"schedule must be 'edm', 'quadratic' or 'linear', got {schedule!r}")
    t[0] = t1  # exact end points
    if steps > 1:
        t[-1] = t_min
    return torch.cat([t, t.new_zeros(1)])


def initial_noise(n: int, seed: int, shape=(1, 64, 64), dtype=torch.float32) -> torch.Tensor:
    """Standard normal y(t1) of shape (n, *shape) from ``torch.Generator().manual_seed(seed)``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((n, *shape), generator=g, dtype=dtype)


class Samples(NamedTuple):
    y: torch.Tensor  # (n, C, H, W) model space
    image: torch.Tensor  # exp(0.1 y) - 1
    times: torch.Tensor  # the time grid used (float64, t1 ... 0)


@torch.no_grad()
def sample(
    model: Callable,
    n: int = 8,
    steps: int = 32,
    seed: int = 0,
    t1: float | None = None,
    method: str = "heun",
    schedule: str = "edm",
    noise: torch.Tensor | None = None,
    progress: bool = True,
) -> Samples:
    """Deterministic samples: the probability-flow ODE solved from ``t1`` down to t = 0.

    ``model`` is any callable ``(y, t) -> score`` (the plain network, a quantized copy, a model
    with hooks); it is called with ``y`` (n, C, H, W) and a float ``t``. With the same ``seed``
    (or the same ``noise``, shape (n, C, H, W)) and settings, two models start from the same
    noise and see the same time grid, so their outputs compare directly (SQNR against full
    precision, same seed).

    The ODE is integrated in the scaled variables of :class:`VPSDE` (y/alpha_t against
    sigma~), where it is close to linear: ``method="euler"`` is then DDIM (``steps`` network
    calls), ``method="heun"`` is EDM's deterministic 2nd-order sampler (Karras et al. 2022,
    Algorithm 1: Heun steps, a last Euler step to t = 0 so the network is never called at
    t = 0; ``2 steps - 1`` calls). galaxygrad itself runs diffrax Tsit5 with dt = 0.025 on
    the same ODE (2400 calls); ``tests/test_galaxy.py`` measures the convergence of this one."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    t1 = float(t1 if t1 is not None else getattr(model, "t1", 10.0))
    if noise is None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        size = getattr(model, "img_size", 64)
        dtype = next(model.parameters()).dtype if isinstance(model, nn.Module) else torch.float32
        noise = initial_noise(n, seed, (getattr(model, "channels", 1), size, size), dtype)
    elif not isinstance(noise, torch.Tensor) or noise.dim() != 4:
        raise ValueError("noise must be a tensor of shape (n, C, H, W)")
    sde = VPSDE(1.0, t1)
    times = time_grid(steps, t1, schedule)
    sig = sde.sigma_tilde(times).tolist()
    alpha = sde.marginal(times)[0].tolist()
    std = sde.marginal(times)[1].tolist()

    def slope(x, i):  # d y~ / d sigma~ at times[i] = -sigma_t * score(y, t)
        return -std[i] * model(x * alpha[i], float(times[i]))

    x = noise / alpha[0]  # y~ at t1
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"{method} sampler, {steps} steps", leave=False,
                  disable=None)  # no bar when stderr is not a terminal
    for i in it:
        h = sig[i + 1] - sig[i]
        k1 = slope(x, i)
        x_next = x + h * k1
        if method == "heun" and times[i + 1] > 0:
            x_next = x + 0.5 * h * (k1 + slope(x_next, i + 1))
        x = x_next
    y = x * alpha[-1]  # alpha(0) = 1
    return Samples(y, to_image(y), times)

