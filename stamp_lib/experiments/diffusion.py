r"""The image-generator experiment (the paper's Figure 1 and Table 1) on the galaxy diffusion model.

The paper quantizes PixArt-Sigma and SANA at W4A4 and reports the SQNR of the generated images
against the full-precision pipeline run from the same noise. No such checkpoint can be loaded
here (see :mod:`stamp_lib.experiments.pixart` for the PixArt-Sigma path, ready for the real weights), so this
module runs the same protocol on the one pretrained image diffusion model that is available: the
galaxy score network of :mod:`stamp_lib.zoo.galaxy` (an MLP-Mixer over a 16 x 16 grid of patch
tokens, 1.6 M parameters, real weights from ``galaxygrad==0.1.9``).

What is quantized (rules by layer name; :func:`galaxy_config`)
---------------------------------------------------------------
* ``blocks.*.hidden_mixer.fc1/fc2`` (**channel mixing**): inputs (B, s = 256 tokens, d); rows
  are patch tokens on the 16 x 16 grid, so STaMP applies: the 2-D Haar DWT over the grid with
  ``levels`` (3: the 2 x 2 = 4-token LL band, the paper's 64-of-4096 ratio), the first
  ``hp_tokens`` transformed rows at ``hp_bits``, the others at ``a_bits``. The *bit-matched
  baseline* keeps its first ``hp_tokens`` untransformed (row-major) tokens at ``hp_bits``, as the
  paper's baselines did, so both spend the same average bits.
* ``blocks.*.patch_mixer.fc1/fc2`` (**token mixing**): inputs (B, 64 channels, 256 or 512); rows
  are *channels*, which have no order: neighbouring rows are no more alike than distant ones
  (:func:`row_structure` measures it). As the paper does for inputs without local structure,
  they get plain per-row quantization at ``a_bits`` with and without STaMP
  (``token_stamp=True`` is the ablation that transforms them anyway).
* Weights: W4 symmetric round-to-nearest, per output channel (``group_size=None``) or per group
  of ``group_size`` input features (``w_bits=None``: full precision, the "A4" setting of Figure 1).
  The paper's DiT setting (SVDQuant's W4A4 on PixArt-Sigma, width 1152) groups 64 input channels
  for weights and activations alike; at this model's width of 64 a group of 64 is a whole token
  row, so the chapter groups 16 (:data:`GROUP`: four groups per row of the narrowest layer).
* ``mean_token=True`` (the control of "how much of STaMP's gain is the mean token"): the
  sequence transform is the Householder reflection :class:`~stamp_lib.core.transforms.MeanToken`, whose first row is the
  normalised all-ones vector (the mean, or DC, token) and whose other rows are close to the
  identity (each a token minus roughly the mean token); its first ``hp_tokens`` rows at
  ``hp_bits``, as STaMP's. Nothing but the DC component is moved between tokens.

Methods (each without and with STaMP): ``rtn`` (plain), ``hadamard`` (an orthogonal Hadamard
rotation of every layer's input features folded into the weight before it is quantized, as in
QuaRot; ``hadamard_seed`` adds QuaRot's random sign flips, :class:`~stamp_lib.model.recipe.Rule`) and ``svdquant``
(SVDQuant-style: SmoothQuant smoothing with ``alpha`` from calibration inputs, then the top
``rank`` singular part of the smoothed weight kept in full precision on the unquantized input and
the residual quantized; :data:`RANK` = 2 of width 64, about 3%, as SVDQuant's 32 of 1152).
``viditq`` is ViDiT-Q's published PixArt setting (:mod:`stamp_lib.methods.viditq`): SmoothQuant-style
channel balancing with its strength 0.3 from calibration inputs, dynamic per-token activations,
round-to-nearest weights; its departures (calibration statistic, no timestep-wise scales, no
mixed-precision search) are in the module and in each configuration's ``info``. The paper's own
ViDiT-Q row is doubtful (its Table 1 reports COCO SQNR 7.82 -> 6.37 with STaMP, a loss, while
every other row gains).

Protocol (:func:`reference`, :func:`evaluate`)
----------------------------------------------
For each seed, ``n`` initial noises are drawn (:func:`stamp_lib.zoo.galaxy.initial_noise`) and the
deterministic probability-flow sampler (:func:`stamp_lib.zoo.galaxy.sample`, EDM Heun, ``steps``
steps) runs once in full precision and once per configuration from the *same* noise. Metrics:

* SQNR (dB) of each final sample against its full-precision twin, in image space
  (``x = exp(0.1 y) - 1``, what the model's users see; the paper's metric) and in model space y;
  PSNR with the full-precision image's range as peak (PSNR minus SQNR depends on the reference
  image only, so paired differences are the same: it is recorded, not plotted). SSIM is not
  computed: no trusted implementation is installed to test one against;
* SQNR of the network output (the score) at the first network call of every step, evaluated
  *teacher-forced* on the full-precision trajectory: the error of one quantized call, without
  the drift that accumulates along a quantized trajectory;
* paired differences (:func:`paired`): the same noise with and without STaMP, image by image,
  so a verdict is not a difference between two noisy draws.

Everything is fake quantization in floating point (accuracy simulated, not speed).
``python -m stamp_lib diffusion bench`` measures the sampling time of the quantized model against
full precision (target: at most 2x); ``python -m stamp_lib diffusion --method rtn`` prints one
table row (without and with STaMP, paired).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import autocorr, metrics, stats, transforms
from ..core import cells as cellstore
from ..core.io import results_dir, write_json
from ..methods import viditq
from ..methods.viditq import IMAGE_FEATURE_OF as FEATURE_OF
from ..methods.viditq import IMAGE_METHODS as METHODS
from ..model import capture, hooks
from ..model import recipe as rcp
from ..model.recipe import ActQuant, Recipe, Rule, WeightQuant
from ..zoo import galaxy

__all__ = ["CHANNEL_MIXING", "TOKEN_MIXING", "METHODS", "GROUP", "RANK", "Config", "galaxy_config", "prepare", "Reference",
           "reference", "calibration_batches", "Outcome", "evaluate", "run_configs", "paired",
           "crossed", "row_structure", "benchmark", "main"]

CHANNEL_MIXING = "blocks.*.hidden_mixer.*"  # rows = patch tokens on the grid: STaMP applies
TOKEN_MIXING = "blocks.*.patch_mixer.*"  # rows = channels, no order: plain quantization
GROUP = 16  # input features per weight group and per activation block (the paper's 64 is a whole row here)
RANK = 2  # SVDQuant-style low-rank branch: about 3% of the width 64 (SVDQuant: 32 of 1152)


# ----------------------------------------------------------------------------- the mean-token control


# ----------------------------------------------------------------------------- configurations
@dataclass(frozen=True)
class Config:
    """One configuration of the experiment: a :class:`~stamp_lib.model.recipe.Recipe` with its name and
    the knobs it was built from (``info``)."""

    name: str
    recipe: Recipe
    info: dict = field(default_factory=dict, compare=False)

    def knobs(self) -> dict:
        return {"name": self.name, **self.info, "recipe": self.recipe.knobs()}

    def prep_key(self) -> tuple:
        return self.recipe.prep_key()


def _check_int(v, what, lo=0):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{what} must be an int >= {lo}, got {v!r}")


def galaxy_config(method: str, *, stamp: bool = False, w_bits: int | None = 4, a_bits: int | None = 4,
                  hp_tokens: int = 4, hp_bits: int = 8, levels: int = 3, grid: tuple[int, int] = (16, 16),
                  block_size: int | None = None, rank: int = RANK, alpha: float | None = None, token_stamp: bool = False,
                  token_hp: int | None = None, hadamard_seed: int | None = None, group_size: int | None = None,
                  mean_token: bool = False) -> Config:
    """The configuration of one cell of the experiment (see the module docstring).

    ``method``: one of :data:`METHODS`. ``stamp``: 2-D Haar DWT (``levels``) over ``grid`` on the
    channel-mixing inputs, else the bit-matched untransformed baseline. ``hp_tokens`` rows at
    ``hp_bits``, the rest at ``a_bits`` (``hp_tokens=0``: uniform ``a_bits``). ``block_size``:
    per-token activation ranges (``None``) or per block of that many features (64 in the paper's
    Table 1, :data:`GROUP` here). ``group_size``: weights per output channel (``None``) or per group
    of that many input features. ``mean_token``: the :class:`~stamp_lib.core.transforms.MeanToken` control instead of the
    identity on the channel-mixing inputs (not with ``stamp``). ``w_bits=None`` keeps weights in
    full precision. ``rank``: the low-rank branch of
    ``svdquant``. ``alpha``: the smoothing strength of ``svdquant`` (default 0.5) and ``viditq``
    (default :data:`stamp_lib.methods.viditq.ALPHA`). ``token_stamp``: also transform the
    token-mixing inputs (1-D Haar over their 64 channel rows, ``token_hp`` high-precision rows; an
    ablation); ``token_hp`` defaults to ``hp_tokens`` with ``token_stamp`` and to 0 (plain
    ``a_bits``) without."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    alpha = viditq.alpha_for(method, alpha)
    for v, what in ((hp_tokens, "hp_tokens"), (rank, "rank"), (levels, "levels")):
        _check_int(v, what)
    s = grid[0] * grid[1]
    if hp_tokens > s:
        raise ValueError(f"hp_tokens={hp_tokens} exceeds the {s} tokens of the {grid[0]}x{grid[1]} grid")
    if method == "fp":
        return Config("fp", Recipe((Rule("*"),), name="fp"), info={"method": "fp"})
    if mean_token and stamp:
        raise ValueError("mean_token replaces STaMP's transform: pass stamp=False")
    if group_size is not None:
        _check_int(group_size, "group_size", 1)
    if hadamard_seed is not None and method != "hadamard":
        raise ValueError("hadamard_seed applies to the 'hadamard' method only")
    if token_hp is None:
        token_hp = hp_tokens if token_stamp else 0
    _check_int(token_hp, "token_hp")

    def bits(hp):
        return f"{hp}x{hp_bits}+{a_bits}" if hp else a_bits

    if a_bits is None:  # weight-only quantization
        if stamp or token_stamp or mean_token or w_bits is None:
            raise ValueError("a_bits=None (full-precision activations) needs quantized weights and no STaMP")
        ch = tk = None
    else:
        if mean_token:
            ch = ActQuant(bits=bits(hp_tokens), transform="mean", block_size=block_size)
        else:
            ch = ActQuant(bits=bits(hp_tokens), transform="dwt" if stamp else "identity",
                          levels=levels if stamp else None, grid=tuple(grid) if stamp else None, block_size=block_size)
        if token_stamp:
            if not token_hp:
                raise ValueError("token_stamp needs token_hp > 0 high-precision rows")
            tok_levels = transforms.haar_levels(64, token_hp)
            tk = ActQuant(bits=bits(token_hp), transform="dwt", levels=tok_levels, block_size=block_size)
        else:
            tk = ActQuant(bits=bits(token_hp), block_size=block_size)
    lowrank = rank if method == "svdquant" else 0
    w = None if w_bits is None else WeightQuant(bits=w_bits, lowrank=lowrank, group_size=group_size)
    if w is None and lowrank:
        raise ValueError("the svdquant low-rank branch needs quantized weights (w_bits)")
    feat = FEATURE_OF[method]
    rules = (Rule(CHANNEL_MIXING, act=ch, weight=w, feature=feat, alpha=alpha, hadamard_seed=hadamard_seed),
             Rule(TOKEN_MIXING, act=tk, weight=w, feature=feat, alpha=alpha, hadamard_seed=hadamard_seed))
    wname = "A" if w_bits is None else f"W{w_bits}A"
    name = (f"{method}{'-rs' if hadamard_seed is not None else ''} {wname}{a_bits or 16}"
            f"{' +stamp' if stamp else ''}{' +mean' if mean_token else ''} hp{hp_tokens}"
            f"{' blk' + str(block_size) if block_size else ''}{' wg' + str(group_size) if group_size and w_bits else ''}"
            f"{' +tokstamp' if token_stamp else ''}")
    info = dict(method=method, stamp=stamp, w_bits=w_bits, a_bits=a_bits, hp_tokens=hp_tokens, hp_bits=hp_bits,
                levels=levels if stamp else None, grid=list(grid), block_size=block_size,
                granularity="per-token" if block_size is None else f"per-block-{block_size}",
                rank=lowrank, alpha=alpha if feat == "smoothquant" else None, token_stamp=token_stamp,
                token_hp=token_hp, hadamard_seed=hadamard_seed, group_size=group_size if w_bits else None,
                mean_token=mean_token, sequence_transform="2-D Haar DWT" if stamp else
                "mean-token Householder" if mean_token else "identity",
                weights=("full precision" if not w_bits else "per-output-channel symmetric RTN" if group_size is None
                         else f"symmetric RTN per group of {group_size} input features"),
                activations="per-row asymmetric min-max, no clipping" if a_bits else "full precision",
                **({"departures": list(viditq.DEPARTURES)} if method == viditq.NAME else {}))
    return Config(name, Recipe(rules, name=name), info=info)


def prepare(model, config: Config, calib=None, *, progress: bool = False) -> rcp.Prepared:
    """:func:`stamp_lib.model.recipe.prepare` for ``config`` on the galaxy model (``calib``: a list of
    ``(y, t)`` batches, needed for ``svdquant``; see :func:`calibration_batches`)."""
    return rcp.prepare(model, config.recipe, calib, forward=lambda m, b: m(b[0], b[1]), progress=progress)


# ----------------------------------------------------------------------------- metrics
# ----------------------------------------------------------------------------- reference runs
@dataclass
class Reference:
    """The full-precision run of one seed: its noise, samples, and the network's inputs and
    outputs at the first call of every sampler step (for teacher-forced score SQNR)."""

    seed: int
    steps: int
    method: str
    noise: torch.Tensor
    y: torch.Tensor
    image: torch.Tensor
    times: torch.Tensor
    inputs: list  # [(y_in, t)] first call of every step
    scores: list  # FP network outputs at those inputs
    seconds: float = 0.0

    @property
    def n(self) -> int:
        return self.noise.shape[0]


def _recorded(model):
    calls = []

    def f(y, t):
        out = model(y, t)
        calls.append((y, t, out))
        return out

    f.t1 = model.t1
    return f, calls


def _first_calls(calls: list, steps: int, method: str) -> list:
    """The first network call of every step (Heun: 2 calls per step, 1 in the last)."""
    if method == "euler":
        if len(calls) != steps:
            raise RuntimeError(f"expected {steps} Euler calls, got {len(calls)}")
        return calls
    if len(calls) != 2 * steps - 1:
        raise RuntimeError(f"expected {2 * steps - 1} Heun calls, got {len(calls)}")
    return calls[0::2]


@torch.no_grad()
def reference(model, seed: int, n: int = 8, steps: int = 16, method: str = "heun", *, store=None) -> Reference:
    """Full-precision samples of ``n`` noises drawn from ``seed`` (see the module docstring).

    ``store``: a :class:`~stamp_lib.core.cells.CellStore` (or folder) keeping the reference as one
    cell keyed by the model's weights, ``seed``, ``n``, ``steps`` and ``method``; ``None``: none
    unless ``STAMP_RESUME=1`` (:func:`stamp_lib.core.cells.resolve`)."""
    _check_int(n, "n", 1)
    store = cellstore.resolve(store, "diffusion")
    if store is None:
        return _reference(model, seed, n, steps, method)
    key = {"experiment": "diffusion.reference", "model": cellstore.fingerprint(model), "seed": seed, "n": n,
           "steps": steps, "method": method, "numerics": rcp.numerics()}
    v = store.get(key)
    if v is not None:
        return Reference(seed, steps, method, v["noise"], v["y"], v["image"], v["times"],
                         [tuple(yt) for yt in v["inputs"]], list(v["scores"]), v["seconds"])
    ref = _reference(model, seed, n, steps, method)
    store.put(key, {"noise": ref.noise, "y": ref.y, "image": ref.image, "times": ref.times,
                    "inputs": [list(yt) for yt in ref.inputs], "scores": ref.scores, "seconds": ref.seconds})
    return ref


def _reference(model, seed, n, steps, method) -> Reference:
    noise = galaxy.initial_noise(n, seed, (model.channels, model.img_size, model.img_size))
    f, calls = _recorded(model)
    t0 = time.perf_counter()
    s = galaxy.sample(f, noise=noise, steps=steps, method=method, t1=model.t1, progress=False)
    sec = time.perf_counter() - t0
    first = _first_calls(calls, steps, method)
    return Reference(seed, steps, method, noise, s.y, s.image, s.times, [(y, t) for y, t, _ in first],
                     [o for _, _, o in first], sec)


@torch.no_grad()
def calibration_batches(model, seed: int = 1000, n: int = 8, steps: int = 16, stride: int = 2) -> list:
    """``(y, t)`` network inputs along a full-precision trajectory from the noise of ``seed`` (every
    ``stride``-th call): calibration data for SmoothQuant scales, disjoint from evaluation seeds."""
    _check_int(stride, "stride", 1)
    noise = galaxy.initial_noise(n, seed, (model.channels, model.img_size, model.img_size))
    f, calls = _recorded(model)
    galaxy.sample(f, noise=noise, steps=steps, t1=model.t1, progress=False)
    return [(y, t) for y, t, _ in calls[::stride]]


# ----------------------------------------------------------------------------- evaluation
@dataclass
class Outcome:
    """Per-image metrics of one configuration over every reference (images in reference order)."""

    config: Config
    sqnr_image: torch.Tensor  # (N,) dB, image space
    sqnr_y: torch.Tensor  # (N,) dB, model space
    psnr: torch.Tensor  # (N,) dB
    seed: torch.Tensor  # (N,) the seed of each image's batch
    score_sqnr: torch.Tensor  # (n_score_batches, steps) dB, teacher-forced, pooled over the batch
    score_t: torch.Tensor  # (steps,) the time of each step's first call
    act_bits: float  # average bits per quantized row, all layers
    channel_bits: float  # average bits per token of the channel-mixing inputs
    seconds: float  # sampling time (without the teacher-forced calls)
    images: torch.Tensor | None = None  # the first reference's samples (image space), for figures

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def n(self) -> int:
        return self.sqnr_image.numel()

    def mean(self, space: str = "image") -> float:
        return float(self._v(space).mean())

    def se(self, space: str = "image") -> float:
        """Standard error of the mean over images."""
        return stats.mean_se(self._v(space))[1]

    def seed_means(self, space: str = "image") -> torch.Tensor:
        """Mean SQNR of each seed's batch."""
        v = self._v(space)
        return torch.stack([v[self.seed == s].mean() for s in self.seed.unique()])

    def seed_spread(self, space: str = "image") -> float:
        """Standard deviation of the batch means over seeds (NaN for one seed)."""
        m = self.seed_means(space)
        return float(m.std()) if m.numel() > 1 else float("nan")

    def _v(self, space):
        if space not in ("image", "y", "psnr"):
            raise ValueError(f"space must be 'image', 'y' or 'psnr', got {space!r}")
        return {"image": self.sqnr_image, "y": self.sqnr_y, "psnr": self.psnr}[space]

    def summary(self) -> dict:
        return {"name": self.name, "n_images": self.n, "n_seeds": int(self.seed.unique().numel()),
                "sqnr_image_db": self.mean(), "se_image_db": self.se(), "seed_sd_image_db": self.seed_spread(),
                "seed_means_image_db": self.seed_means().tolist(), "sqnr_y_db": self.mean("y"),
                "se_y_db": self.se("y"), "psnr_db": self.mean("psnr"), "act_bits": self.act_bits,
                "channel_bits": self.channel_bits, "score_sqnr_db": self.score_sqnr.mean(0).tolist(),
                "score_t": self.score_t.tolist(), "seconds": round(self.seconds, 2)}


def _refs_id(refs: list[Reference]) -> list:
    """What identifies the references in a cell key: seed, steps, sampler, noise and FP samples."""
    return [{"seed": r.seed, "steps": r.steps, "method": r.method, "noise": cellstore.fingerprint(r.noise),
             "y": cellstore.fingerprint(r.y)} for r in refs]


def _outcome_key(model_fp: str, config: Config, refs_id: list, calib, score_batches: int, keep_images: bool) -> dict:
    return {"experiment": "diffusion.evaluate", "model": model_fp, "config": config.knobs(), "refs": refs_id,
            "calib": cellstore.fingerprint(calib) if config.recipe.needs_calibration() else None,
            "score_batches": score_batches, "keep_images": keep_images, "numerics": rcp.numerics()}


_OUTCOME_FIELDS = ("sqnr_image", "sqnr_y", "psnr", "seed", "score_sqnr", "score_t", "act_bits", "channel_bits",
                   "seconds", "images")


def _outcome_value(o: "Outcome") -> dict:
    return {k: getattr(o, k) for k in _OUTCOME_FIELDS}


def _outcome_from(v: dict, config: Config) -> "Outcome":
    return Outcome(config, **{k: v[k] for k in _OUTCOME_FIELDS})


class Outcomes(dict):
    """``{name: Outcome}`` from :func:`run_configs`, with ``counts``: the cells this run computed
    and reused from a store (``{}`` without one)."""

    counts: dict = {}


@torch.no_grad()
def evaluate(model, config: Config, refs: list[Reference], prepared: rcp.Prepared | None = None, *,
             calib=None, score_batches: int = 1, keep_images: bool = True, store=None) -> Outcome:
    """Sample with ``config`` from every reference's noise and measure against it (module docstring).

    ``score_batches``: the first that many references also get the teacher-forced score SQNR of
    every step (one extra quantized call per step).

    ``store``: a :class:`~stamp_lib.core.cells.CellStore` (or folder) keeping the outcome as one
    cell keyed by the model's weights, the configuration's knobs, the references (seeds, noise,
    FP samples), ``score_batches``, ``keep_images`` and, for a calibrated configuration, ``calib``
    (pass it with ``prepared`` too, or the cell is not stored). ``None``: none unless
    ``STAMP_RESUME=1`` (:func:`stamp_lib.core.cells.resolve`)."""
    if not refs:
        raise ValueError("evaluate needs at least one Reference")
    store = cellstore.resolve(store, "diffusion")
    key = None
    if store is not None and not (config.recipe.needs_calibration() and prepared is not None and calib is None):
        key = _outcome_key(cellstore.fingerprint(model), config, _refs_id(refs), calib, score_batches, keep_images)
        v = store.get(key)
        if v is not None:
            return _outcome_from(v, config)
    out = _evaluate(model, config, refs, prepared, calib=calib, score_batches=score_batches, keep_images=keep_images)
    if key is not None:
        store.put(key, _outcome_value(out))
    return out


def _evaluate(model, config: Config, refs: list[Reference], prepared, *, calib, score_batches: int,
              keep_images: bool) -> Outcome:
    if prepared is None:
        prepared = prepare(model, config, calib)
    sq_img, sq_y, ps, seeds, scores, secs = [], [], [], [], [], 0.0
    bits_tok = bits_sum = ch_tok = ch_sum = 0
    images = None
    for k, ref in enumerate(refs):
        with rcp.apply(model, config.recipe, prepared, check_finite=False, progress=False) as st:
            t0 = time.perf_counter()
            s = galaxy.sample(model, noise=ref.noise, steps=ref.steps, method=ref.method, progress=False)
            secs += time.perf_counter() - t0
            for name, v in st.stats.items():
                bits_tok += v.tokens
                bits_sum += v.bits
                if hooks.matches(name, CHANNEL_MIXING):
                    ch_tok += v.tokens
                    ch_sum += v.bits
            if k < score_batches:
                scores.append(torch.tensor([metrics.sqnr_db(o, model(y, t)) for (y, t), o in zip(ref.inputs, ref.scores)]))
        if not bool(torch.isfinite(s.y).all()):
            raise FloatingPointError(f"{config.name}: the quantized sampler produced NaN/Inf (seed {ref.seed})")
        # image space in float64: a diverged sample (exp of a large y) stays finite and scores low
        img_ref, img = galaxy.to_image(ref.y.double()), galaxy.to_image(s.y.double())
        sq_img.append(metrics.sqnr_db_per_sample(img_ref, img))
        sq_y.append(metrics.sqnr_db_per_sample(ref.y, s.y))
        ps.append(metrics.psnr_db_per_sample(img_ref, img))
        seeds.append(torch.full((ref.n,), ref.seed))
        if k == 0 and keep_images:
            images = s.image.clone()
    t_steps = torch.tensor([t for _, t in refs[0].inputs], dtype=torch.float64)
    return Outcome(config, torch.cat(sq_img), torch.cat(sq_y), torch.cat(ps), torch.cat(seeds),
                   torch.stack(scores) if scores else torch.empty(0, len(t_steps)), t_steps,
                   bits_sum / bits_tok if bits_tok else float("nan"), ch_sum / ch_tok if ch_tok else float("nan"),
                   secs, images)


def run_configs(model, configs: dict[str, Config], refs: list[Reference], calib=None, *, score_batches: int = 1,
                progress: bool = True, store=None) -> Outcomes:
    """:func:`evaluate` every configuration; preparations are shared between configurations with
    the same feature and weight settings (e.g. with and without STaMP).

    ``store``: a :class:`~stamp_lib.core.cells.CellStore` (or folder) keeping every configuration as
    one cell as it finishes: a rerun after an interruption reuses them (no preparation for a stored
    one) and computes the rest. ``None``: none unless ``STAMP_RESUME=1`` (then the default store,
    ``data/cache/cells/diffusion``); ``False``: never one. The result's ``counts`` says how many
    cells were computed and reused."""
    from tqdm.auto import tqdm

    store = cellstore.resolve(store, "diffusion")
    before = store.counts() if store is not None else None
    model_fp = cellstore.fingerprint(model) if store is not None else None
    refs_id = _refs_id(refs) if store is not None else None
    preps: dict = {}
    out = Outcomes()
    for key, cfg in tqdm(list(configs.items()), desc="configurations", disable=None if progress else True, leave=False):
        ck = _outcome_key(model_fp, cfg, refs_id, calib, score_batches, True) if store is not None else None
        v = store.get(ck) if ck is not None else None
        if v is not None:
            out[key] = _outcome_from(v, cfg)
            continue
        pk = cfg.prep_key()
        if pk not in preps:
            preps[pk] = prepare(model, cfg, calib if cfg.recipe.needs_calibration() else None)
        if not refs:
            raise ValueError("evaluate needs at least one Reference")
        out[key] = _evaluate(model, cfg, refs, preps[pk], calib=None, score_batches=score_batches, keep_images=True)
        if ck is not None:
            store.put(ck, _outcome_value(out[key]))
    out.counts = store.since(before) if store is not None else {}
    return out


def _named(p: dict) -> dict:
    return {**p, "delta_db": p["mean"], "se_db": p["se"], "ci95_lo": p["ci_lo"], "ci95_hi": p["ci_hi"],
            "beyond_ci95": p["beyond_ci"]}


def paired(base: Outcome, other: Outcome, space: str = "image") -> dict:
    """``other - base`` SQNR image by image (same noise; the image is the independent unit):
    :func:`stamp_lib.core.stats.paired_difference` (``mean``, ``se``, the 95% t interval
    ``ci_lo``/``ci_hi``, ``wins``, ``n``, ``beyond_2se``, ``beyond_ci``), with the same numbers also
    under ``delta_db``, ``se_db``, ``ci95_lo``, ``ci95_hi``, ``beyond_ci95``."""
    a, b = base._v(space), other._v(space)
    if a.shape != b.shape or not torch.equal(base.seed, other.seed):
        raise ValueError("a paired comparison needs the same images (same references)")
    return _named(stats.paired_difference(a, b, better="higher"))


def crossed(bases: list, others: list, space: str = "image") -> dict:
    """``others[k] - bases[k]`` over draws k of a method's randomness (e.g. Hadamard sign seeds)
    crossed with the same images: :func:`stamp_lib.core.stats.crossed_difference` (Satterthwaite t
    interval; ``var_draws`` / ``var_units`` say which spread dominates), keys as :func:`paired`.
    One draw: :func:`paired`. A side without randomness (one outcome) against a drawn one is
    repeated over the draws: each draw is paired with the same deterministic base."""
    if bases and others and len(bases) == 1:
        bases = list(bases) * len(others)
    if bases and others and len(others) == 1:
        others = list(others) * len(bases)
    if not bases or len(bases) != len(others):
        raise ValueError("crossed needs one base and one other outcome per draw (or one on a side)")
    for b, o in zip(bases, others):
        if b._v(space).shape != o._v(space).shape or not torch.equal(b.seed, o.seed) \
                or not torch.equal(b.seed, bases[0].seed):
            raise ValueError("a crossed comparison needs the same images (same references) in every draw")
    A = torch.stack([b._v(space) for b in bases])
    B = torch.stack([o._v(space) for o in others])
    return _named(stats.crossed_difference(A, B, better="higher"))


# ----------------------------------------------------------------------------- row structure
def _energy_first(X: torch.Tensor, T, k: int) -> float:
    """Fraction of the energy of X (..., s, d) in the first k rows of T X."""
    Y = X if T is None else T.forward(X)
    e = Y.double().pow(2).sum(dim=-1).reshape(-1, Y.shape[-2]).sum(0)
    return float(e[:k].sum() / e.sum())


@torch.no_grad()
def row_structure(model, refs: list[Reference], *, steps=(0, 4, 8, 12), hp_tokens: int = 4, n_perm: int = 8,
                  seed: int = 0) -> dict:
    """Is there a local order along the rows of each linear input? Per layer (inputs captured at
    the first calls of the given sampler ``steps`` of every reference):

    * ``toeplitz``: share of the centred row autocorrelation S explained by the nearest
      (2-D for the 16 x 16 token grid, 1-D for the 64 channel rows) Toeplitz matrix
      (:func:`stamp_lib.core.autocorr.toeplitz_fraction`);
    * ``energy``: fraction of the energy in the first ``hp_tokens`` rows after STaMP's Haar DWT
      (2-D, 3 levels, for tokens; 1-D to ``hp_tokens`` rows for channels); ``energy_identity``:
      the same without a transform. Most of it is the mean row (every LL row averages a block of
      rows, in any order), so the test of *local order* uses the centred input (the mean row of
      each image removed): ``energy_centred`` with the rows in their natural order,
      ``energy_centred_shuffled`` in random orders (mean of ``n_perm`` permutations). Where rows
      have a local order, shuffling them destroys the compaction; where they have none, it
      changes nothing (both near ``hp_tokens / s``);
    * ``S``: the mean row autocorrelation (for figures)."""
    batches = [ref.inputs[i] for ref in refs for i in steps if i < len(ref.inputs)]
    if not batches:
        raise ValueError(f"no sampler step among {steps} in the references")
    cap = capture.capture_inputs(model, batches, "*", keep=True, forward=lambda m, b: m(b[0], b[1]), progress=False)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, X in cap.acts.items():
        kind = "channel" if hooks.matches(name, CHANNEL_MIXING) else "token"
        s = X.shape[-2]
        if kind == "channel":
            T = transforms.build("dwt", levels=3, grid=(model.grid, model.grid))
            grid = (model.grid, model.grid)
        else:
            T = transforms.build("dwt", levels=transforms.haar_levels(s, hp_tokens))
            grid = None
        S_sum, n_cols = autocorr.sum_xxt(X.double())
        S = S_sum / n_cols
        Xc = X - X.mean(dim=-2, keepdim=True)
        shuffled = []
        for _ in range(n_perm):
            perm = torch.randperm(s, generator=g)
            shuffled.append(_energy_first(Xc[:, perm], T, hp_tokens))
        out[name] = {"kind": kind, "s": s, "toeplitz": autocorr.toeplitz_fraction(S, grid, center=True),
                     "energy": _energy_first(X, T, hp_tokens), "energy_identity": _energy_first(X, None, hp_tokens),
                     "energy_centred": _energy_first(Xc, T, hp_tokens),
                     "energy_centred_shuffled": sum(shuffled) / n_perm, "S": S.float()}
    return out


# ----------------------------------------------------------------------------- benchmark
def benchmark(n: int = 8, steps: int = 12, repeats: int = 3, threads: int | None = 1, *,
              previous: bool = False) -> dict:
    """Sampling time of the galaxy model (``n`` images, ``steps`` Heun steps) in full precision and
    with W4A4 configurations (RTN, RTN + STaMP, randomized Hadamard + STaMP with seed 0 as in the
    chapter, SVDQuant + STaMP, per-block-64), measured side by side in one run (interleaved, one
    warm-up sample per configuration, median of ``repeats``); prints the ratio quantized / FP per
    configuration. Target: quantized sampling at most 2x the full-precision time.
    ``threads``: torch threads during the run (one by default: on a shared two-core machine two
    threads run several times slower); ``None`` keeps the current setting. ``previous``: also time
    every configuration with the per-call path as it was before the hot-path fixes
    (:func:`stamp_lib.experiments.bench.previous_hot_path`), in the same interleaved run."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _benchmark(n, steps, repeats, previous)
    finally:
        torch.set_num_threads(saved)


TARGET_RATIO = 2.0  # quantized / FP sampling time


def _benchmark(n, steps, repeats, previous=False):
    from .bench import previous_hot_path

    model = galaxy.load_galaxy_model()
    cfgs = {"rtn W4A4": galaxy_config("rtn"),
            "rtn W4A4 + stamp": galaxy_config("rtn", stamp=True),
            "hadamard-rs W4A4 + stamp": galaxy_config("hadamard", stamp=True, hadamard_seed=0),
            "svdquant W4A4 + stamp": galaxy_config("svdquant", stamp=True),
            "rtn W4A4 + stamp, blk64": galaxy_config("rtn", stamp=True, block_size=64)}
    calib = calibration_batches(model, n=4, steps=4)
    preps = {k: prepare(model, c, calib) for k, c in cfgs.items()}
    noise = galaxy.initial_noise(n, 0, (model.channels, model.img_size, model.img_size))
    paths = (False, True) if previous else (False,)
    times = {"fp": [], **{(k, p): [] for k in cfgs for p in paths}}

    def run(k, p, nsteps):
        with previous_hot_path(p), rcp.apply(model, cfgs[k].recipe, preps[k], check_finite=False, progress=False):
            t = time.perf_counter()
            galaxy.sample(model, noise=noise, steps=nsteps, progress=False)
            return time.perf_counter() - t

    with torch.no_grad():
        galaxy.sample(model, noise=noise, steps=2, progress=False)  # warm-up
        for k in cfgs:
            for p in paths:
                run(k, p, 1)
        for _ in range(repeats):
            t = time.perf_counter()
            galaxy.sample(model, noise=noise, steps=steps, progress=False)
            times["fp"].append(time.perf_counter() - t)
            for k in cfgs:
                for p in paths:
                    times[(k, p)].append(run(k, p, steps))
    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    seconds = {"fp": med["fp"], **{k: med[(k, False)] for k in cfgs}}
    ratio = {k: v / med["fp"] for k, v in seconds.items()}
    out = {"n": n, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(), "seconds": seconds,
           "time_ratio": ratio, "target_ratio": TARGET_RATIO, "met": all(r <= TARGET_RATIO for r in ratio.values())}
    if previous:
        out["previous_seconds"] = {k: med[(k, True)] for k in cfgs}
        out["previous_time_ratio"] = {k: med[(k, True)] / med["fp"] for k in cfgs}
    print(f"galaxy sampling benchmark: {n} images, {steps} Heun steps ({2 * steps - 1} calls), "
          f"{out['threads']} threads, median of {repeats}")
    for k in seconds:
        line = f"  {k:26s} {seconds[k]:7.2f} s   x{ratio[k]:.2f} FP"
        if previous and k in cfgs:
            prev = out["previous_seconds"][k]
            line += f"   (previous per-call path: {prev:.2f} s, x{out['previous_time_ratio'][k]:.2f} FP)"
        print(line)
    print(f"  target: every quantized configuration <= {TARGET_RATIO:g}x FP: {'met' if out['met'] else 'MISSED'}")
    return out


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    from . import cli

    p = cli.Parser(prog="python -m stamp_lib diffusion", description=(
        "One row of the galaxy-model table: SQNR of quantized samples against full precision (same noise), "
        "without and with STaMP, paired. `python -m stamp_lib diffusion bench` times sampling instead."))
    p.add_argument("--method", default="rtn", choices=METHODS[1:])
    p.add_argument("--w-bits", type=int, default=4, help="weight bits, 2..16; 0 keeps weights in full precision")
    p.add_argument("--a-bits", type=int, default=4, help="activation bits, 2..16")
    p.add_argument("--hp-tokens", type=int, default=4, help=f"high-precision rows, 0..{_GRID[0] * _GRID[1]}")
    p.add_argument("--block-size", type=int, default=0,
                   help="0: per-token ranges; else per block of that many features, a divisor of 64 (1, 2, ..., 64)")
    p.add_argument("--rank", type=int, default=RANK, help=f"low-rank branch of svdquant, 0..{_MIN_WIDTH - 1}")
    p.add_argument("--group-size", type=int, default=0,
                   help="0: weights per output channel; else per group of that many input features, a divisor of 64")
    p.add_argument("--seeds", type=int, default=2, help="noise seeds 0..N-1, >= 1")
    p.add_argument("--images", type=int, default=8, help="images per seed, >= 1")
    p.add_argument("--steps", type=int, default=16, help="Heun steps, >= 1")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; the record says how many)")
    p.add_argument("--out", default=None, help="results file (JSON)")
    cli.add_resume_options(p, "diffusion", "references and configurations")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no messages: only the result lines")
    return p


_GRID = (16, 16)  # the galaxy model's token grid (64 px, patch 4)
_MIN_WIDTH = 64  # narrowest quantized linear layer (hidden_mixer.fc1: 64 -> 512); block sizes divide it
_LEVELS = 3  # galaxy_config's 2-D Haar levels


def validate(a: argparse.Namespace) -> None:
    """Check the parsed arguments of one galaxy row (nothing loaded); raises ``cli.BadInput``."""
    from . import cli

    cli.bits(a.w_bits, "--w-bits", "weight bits", off="full-precision weights")
    cli.bits(a.a_bits, "--a-bits", "activation bits")
    s = _GRID[0] * _GRID[1]
    cli.whole(a.hp_tokens, "--hp-tokens", "high-precision rows", lo=0, hi=s,
              hint=f" (the {_GRID[0]}x{_GRID[1]} token grid has {s})")
    cli.whole(a.block_size, "--block-size", "the activation block size", lo=0, hi=_MIN_WIDTH)
    if a.block_size and _MIN_WIDTH % a.block_size:
        raise cli.BadInput(f"--block-size {a.block_size}", f"must divide the {_MIN_WIDTH} features of the narrowest "
                                                           "layer: pass 0 (per token) or one of 1, 2, 4, 8, 16, 32, 64")
    cli.whole(a.group_size, "--group-size", "the weight group size", lo=0, hi=_MIN_WIDTH)
    if a.group_size and _MIN_WIDTH % a.group_size:
        raise cli.BadInput(f"--group-size {a.group_size}", f"must divide the {_MIN_WIDTH} features of the narrowest "
                                                           "layer: pass 0 (per output channel) or one of 1, 2, ..., 64")
    cli.whole(a.rank, "--rank", "the svdquant low-rank branch", lo=0, hi=_MIN_WIDTH - 1,
              hint=f" (below the {_MIN_WIDTH} features of the narrowest layer)")
    if a.method == "svdquant" and a.rank and not a.w_bits:
        raise cli.BadInput("--method svdquant --w-bits 0", "the low-rank branch needs quantized weights; pass "
                                                           "--w-bits 4, or --rank 0")
    cli.whole(a.seeds, "--seeds", "noise seeds")
    cli.whole(a.images, "--images", "images per seed")
    cli.whole(a.steps, "--steps", "Heun steps")
    cli.check_threads(a.threads)


def _bench_parser() -> argparse.ArgumentParser:
    from . import cli

    b = cli.Parser(prog="python -m stamp_lib diffusion bench",
                   description="Sampling time of the galaxy model, full precision against W4A4 configurations.")
    b.add_argument("--images", type=int, default=8, help=">= 1")
    b.add_argument("--steps", type=int, default=12, help="Heun steps, >= 1")
    b.add_argument("--repeats", type=int, default=3, help=">= 1 (median)")
    b.add_argument("--threads", type=int, default=1, help="torch threads (0: leave as is)")
    b.add_argument("--quiet", action="store_true", help="no messages but the result lines")
    return b


def validate_bench(a: argparse.Namespace) -> None:
    from . import cli

    cli.whole(a.images, "--images", "images")
    cli.whole(a.steps, "--steps", "Heun steps")
    cli.whole(a.repeats, "--repeats", "repeats")
    cli.check_threads(a.threads)


def _galaxy_model():
    from . import cli

    try:
        return galaxy.load_galaxy_model()
    except (ImportError, FileNotFoundError) as e:
        raise cli.BadInput("the galaxy model hsc_ScoreNet64", f"{e}; {cli.MODEL_PACKAGES_HINT}") from None


def main(argv=None) -> dict:
    from . import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        b = _bench_parser()
        a = cli.parse(b, argv[1:], validate_bench)
        with cli.guard(b, quiet=a.quiet):
            _galaxy_model()  # a missing package: one line, before the benchmark starts
            return benchmark(a.images, a.steps, a.repeats, a.threads or None)
    p = _parser()
    a = cli.parse(p, argv, validate)
    with cli.guard(p, quiet=a.quiet), cli.torch_threads(a.threads):
        t0 = time.perf_counter()
        model = _galaxy_model()
        kw = dict(w_bits=a.w_bits or None, a_bits=a.a_bits, hp_tokens=a.hp_tokens, block_size=a.block_size or None,
                  rank=a.rank, levels=_LEVELS, grid=_GRID, group_size=(a.group_size or None) if a.w_bits else None)
        cfgs = {"base": galaxy_config(a.method, **kw), "stamp": galaxy_config(a.method, stamp=True, **kw)}
        needs_calib = cfgs["base"].recipe.needs_calibration()
        store = (cellstore.CellStore(a.cells, reuse=a.resume, experiment="diffusion") if a.cells
                 else cellstore.default_store("diffusion", reuse=a.resume))
        bar = cli.bar(a.seeds + len(cfgs), "references", quiet=a.quiet)  # the run's one bar
        refs = []
        for seed in range(a.seeds):
            refs.append(reference(model, seed, a.images, a.steps, store=store))
            bar.update()
        calib = calibration_batches(model, steps=a.steps) if needs_calib else None
        bar.set_description("configurations")
        res = run_configs(model, cfgs, refs, calib, score_batches=1, progress=False, store=store)
        bar.update(len(cfgs))
        bar.close()
        facts = cli.run_facts("cpu", "float32")
    pr = paired(res["base"], res["stamp"])
    for r in res.values():
        print(f"{r.name:32s} SQNR {r.mean():6.2f} dB +- {r.se():.2f} s.e. over {r.n} images "
              f"(seed sd {r.seed_spread():.2f}); {r.act_bits:.4f} bits")
    print(f"paired (stamp - base): {pr['delta_db']:+.2f} dB +- {pr['se_db']:.2f} s.e., higher in {pr['wins']}/{pr['n']}")
    levels = min(_LEVELS, *(transforms.max_levels_1d(g) for g in _GRID))
    out = {"results": {k: {**r.summary(), "knobs": r.config.knobs()} for k, r in res.items()}, "paired": pr,
           "applied": {"levels": levels, "grid": list(_GRID), "act_bits": {k: r.act_bits for k, r in res.items()},
                       "seeds": list(range(a.seeds)), "images_per_seed": a.images, "steps": a.steps,
                       "calibration_seed": 1000 if needs_calib else None, **facts},
           "command": cli.command_line(p, a, applied={"threads": facts["torch_threads"]},
                                       skip=("quiet", "no_progress", "resume", "cells")),
           "cells": {**store.counts(), "store": str(store.folder)},
           "protocol": "galaxy hsc_ScoreNet64, EDM Heun sampler, SQNR per image against full precision from the "
                       "same noise, image space", "simulated": "fake quantization in floating point",
           "wall_s": round(time.perf_counter() - t0, 1)}
    path = Path(a.out) if a.out else results_dir() / "diffusion" / f"galaxy-{cfgs['base'].name.replace(' ', '_')}.json"
    write_json(path, out, quiet=a.quiet)
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
