r"""Quantization recipes: weights, activations (with or without STaMP), KV cache and a feature
method, attached to any torch / transformers / diffusers model by name-pattern rules.

A :class:`Recipe` is a tuple of :class:`Rule` (name pattern -> settings; the first rule that
matches a module wins) plus an optional KV-cache setting. Every setting is a frozen dataclass,
validated when it is built, so a bad value fails at once with a message that names it.

Applying a recipe is two steps:

1. :func:`prepare` (a *method* is a preparation step on calibration data): per matched linear
   layer, the feature transform R to fold (a QuaRot-style Hadamard rotation, or SmoothQuant's
   diagonal scale from calibration statistics) and the weight :math:`W' = Q_w(W R^{-\top})`
   quantized in that basis (round-to-nearest, or GPTQ with the Hessian of the calibration inputs,
   rotated with R). The result depends only on the rules' feature and weight settings (and the network
   preparation), so one preparation serves a recipe with and without STaMP. Weights are folded (in
   float64) and quantized one linear, or one GPTQ group, at a time. GPTQ's Hessians come from one
   calibration pass of the full-precision model (all held at once), or with
   ``WeightQuant(sequential=True)`` decoder layer by decoder layer, one at a time, from the inputs
   of the layers quantized before (GPTQ's and QuaRot's order; :mod:`stamp_lib.model.blocks`).

   ``Recipe(..., network="quarot", network_seed=s)`` adds QuaRot as a model-level step first
   (:mod:`stamp_lib.model.quarot`): the plan's parameters (norms fused, residual stream rotated,
   values rotated per head) are swapped in while calibrating and quantizing, the plan's online
   transforms (down_proj's input, o_proj's input; every linear input on Gemma-3) become the
   layers' feature transforms R, and queries and keys are rotated per head after RoPE.
2. :func:`apply`, a context manager: swaps in the prepared weights (the original ``Parameter``
   objects are put back on exit, so tied weights stay tied and the model is restored bit for bit),
   and hooks every matched layer's input (:mod:`stamp_lib.model.hooks`) to replace it by
   :math:`L^{-1} Q_b(L X R)` (:func:`stamp_lib.core.quant.stamp_fake_quant` with ``undo_feature=False``:
   the layer's weight absorbed :math:`R^{-\top}`); with ``recipe.kv`` set, keys (after RoPE) and
   values are fake-quantized through transformers' attention interface (:mod:`stamp_lib.model.kv`).
   With ``network="quarot"`` the plan's parameters are swapped in first (and put back last) and the
   Q/K rotation runs in that attention wrapper too, also without ``recipe.kv``.

Bits follow absolute positions: row i of a chunk of s tokens that starts at absolute position p
gets ``hp_bits`` if ``p + i < hp_tokens``, else ``lp_bits``. In a full-sequence forward (p = 0)
the first ``hp_tokens`` transformed rows get the high precision (the paper's rule); in cached
decoding (one new token at position p) the token is quantized alone (a sequence transform of one
token is the identity) with the bits of its position. Haar levels are capped at what a short
sequence allows. STaMP cannot help one-token decode steps: there is no sequence to transform.

Everything is fake quantization in floating point: accuracy is simulated exactly, speed and memory
of integer kernels are not. The per-call path does no host-device synchronisation and no
host-to-device copy once warm: settings are validated when built; bit vectors are sliced from one
device-resident template per bit spec and cached per length and *effective* position
(``min(position, hp_tokens)``: every decoding step past the high-precision rows reuses one entry);
feature matrices are converted once per dtype and device; the position of a forward is read from
the cache's own length where that is a Python int, and a device tensor is read back only when the
recipe has high-precision rows at all. Non-finite inputs are checked at the API boundary
(:func:`stamp_lib.core.quant.fake_quant`, the transforms), inside a model only with
``apply(..., check_finite=True)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from ..core import quant, transforms
from ..methods import features, gptq, smoothquant
from . import capture, hooks

__all__ = ["ActQuant", "WeightQuant", "Rule", "Recipe", "Prepared", "prepare", "apply",
           "FEATURE_METHODS", "WEIGHT_METHODS", "SEQUENCE_TRANSFORMS", "NETWORK_METHODS"]

SEQUENCE_TRANSFORMS = ("identity", "dct", "wht", "dwt", "mean")
FEATURE_METHODS = (None, "hadamard", "smoothquant")
WEIGHT_METHODS = ("rtn", "gptq")
NETWORK_METHODS = (None, "quarot", "flatquant")

# private: True restores the previous per-call path (bit vectors keyed on the raw position and copied
# per miss, position read back from cache_position first, NaN check of every CPU input by default,
# the feature transform computed again for the low-rank branch); only the benchmarks set it, to time
# both paths in one run (stamp_lib.experiments.bench.hotpath_benchmark)
_LEGACY = False


def _check_pos_int(v, what, allow_none=True):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{what} must be a positive int{' or None' if allow_none else ''}, got {v!r}")


# ----------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ActQuant:
    """Activation (or K/V) quantization of one group of layers.

    Attributes:
        bits: int, or ``"HxB+L"`` (the first H rows at B bits, the others at L; e.g. ``"64x8+4"``).
        transform: the sequence transform L: ``"identity"`` (plain per-token quantization),
            ``"dct"``, ``"wht"`` (power-of-two lengths), ``"dwt"`` (Haar) or ``"mean"`` (the control
            that separates only the mean token, :class:`~stamp_lib.core.transforms.MeanToken`).
        levels: Haar levels (``None``: as many as the length allows); capped for short sequences.
        grid: ``None`` (1-D along the tokens), ``(h, w)`` (2-D Haar over a token grid), or
            ``"auto"`` (the grid set at run time by :meth:`Applied.set_grid`, e.g. from a DiT's latent).
        symmetric, clip_ratio, block_size: see :func:`stamp_lib.core.quant.fake_quant` (per token, or
            per block of ``block_size`` features).
        block_tokens: transform and quantize consecutive blocks of this many tokens separately;
            each block gets the bit rule on its own rows. Not causal: a token's quantization still
            depends on the later tokens of its block.
    """

    bits: int | str = 4
    transform: str = "identity"
    levels: int | None = None
    grid: tuple | str | None = None
    symmetric: bool = False
    clip_ratio: float = 1.0
    block_size: int | None = None
    block_tokens: int | None = None

    def __post_init__(self):
        quant.parse_bits(self.bits)
        if self.transform not in SEQUENCE_TRANSFORMS:
            raise ValueError(f"unknown sequence transform {self.transform!r}; choose one of {SEQUENCE_TRANSFORMS}")
        if self.levels is not None:
            if self.transform != "dwt":
                raise ValueError(f"levels apply to the 'dwt' transform only, not {self.transform!r}")
            _check_pos_int(self.levels, "levels")
        if self.grid is not None:
            if self.transform not in ("dwt", "identity"):
                raise ValueError(f"a token grid applies to the 2-D 'dwt' only, not {self.transform!r}")
            if self.grid != "auto":
                g = tuple(self.grid) if isinstance(self.grid, (tuple, list)) else None
                if g is None or len(g) != 2:
                    raise ValueError(f"grid must be (h, w), 'auto' or None, got {self.grid!r}")
                _check_pos_int(g[0], "grid height", False)
                _check_pos_int(g[1], "grid width", False)
                object.__setattr__(self, "grid", g)
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) \
                or not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        _check_pos_int(self.block_size, "block_size")
        _check_pos_int(self.block_tokens, "block_tokens")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be a bool, got {self.symmetric!r}")

    @property
    def hp_tokens(self) -> int:
        return quant.parse_bits(self.bits)[0]

    def bits_vector(self, s: int, offset: int = 0) -> torch.Tensor:
        """LongTensor (s,): the bits of rows 0..s-1 of a chunk starting at absolute position ``offset``."""
        hp, hb, lb = quant.parse_bits(self.bits)
        b = torch.full((s,), lb, dtype=torch.long)
        n = min(max(hp - offset, 0), s)
        b[:n] = hb
        return b

    def average_bits(self, s: int) -> float:
        """Average bits per token of a full sequence of length s (from position 0)."""
        return quant.average_bits(self.bits_vector(s))

    def knobs(self) -> dict:
        hp, hb, lb = quant.parse_bits(self.bits)
        d = asdict(self)
        d.update(hp_tokens=hp, hp_bits=hb, lp_bits=lb,
                 granularity="per-token" if self.block_size is None else f"per-block-{self.block_size}",
                 grid=list(self.grid) if isinstance(self.grid, tuple) else self.grid)
        return d


@dataclass(frozen=True)
class WeightQuant:
    """Weight fake quantization: ``method`` ``"rtn"`` (round to nearest) or ``"gptq"``; per output
    channel, or per group of ``group_size`` input features; symmetric by default (the usual W4).

    ``lowrank`` = r > 0 adds an SVDQuant-style branch (Li et al., 2025): the top-r singular part
    :math:`L_r` of the (folded) weight stays in full precision and sees the *unquantized* input,
    only the residual :math:`W - L_r` is quantized: :math:`y = Q(x) Q_w(W - L_r)^\top + x L_r^\top + \beta`.

    GPTQ's knobs: ``damp`` (``damp * mean(diag H)`` added to the Hessian's diagonal), ``act_order``
    (columns by decreasing ``diag H``) and ``sequential``: ``False`` (default) takes every layer's
    Hessian from one calibration pass of the full-precision model (all Hessians held at once);
    ``True`` is GPTQ's and QuaRot's own order, decoder layer by decoder layer: within a layer the
    linears that share an input (q/k/v, gate/up) are quantized one group after the other, each
    group's Hessian taken from the inputs that the layers and groups quantized before it produce
    (weights quantized, activations in full precision, as in QuaRot's ``gptq_fwrd``), then the
    calibration windows are run through the quantized layer to give the next layer its inputs.
    One group's Hessian is held at a time. Needs a decoder LM (:mod:`stamp_lib.model.blocks`) and
    token windows as calibration data."""

    bits: int = 4
    method: str = "rtn"
    group_size: int | None = None
    symmetric: bool = True
    clip_ratio: float = 1.0
    damp: float = 0.01
    act_order: bool = False
    lowrank: int = 0
    sequential: bool = False

    def __post_init__(self):
        quant.check_bits_value(self.bits, "weight bits")
        if isinstance(self.lowrank, bool) or not isinstance(self.lowrank, int) or self.lowrank < 0:
            raise ValueError(f"lowrank must be a non-negative int, got {self.lowrank!r}")
        if self.method not in WEIGHT_METHODS:
            raise ValueError(f"unknown weight method {self.method!r}; choose one of {WEIGHT_METHODS}")
        _check_pos_int(self.group_size, "group_size")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"weight clip_ratio must be in (0, 1], got {self.clip_ratio!r}")
        if not 0.0 <= self.damp < 1.0:
            raise ValueError(f"damp must be in [0, 1), got {self.damp!r}")
        for k in ("act_order", "sequential"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be a bool, got {getattr(self, k)!r}")
        if self.sequential and self.method != "gptq":
            raise ValueError(f"sequential=True is GPTQ's layer-by-layer order; method={self.method!r} needs no "
                             "calibration inputs (pass method='gptq' or drop sequential)")

    def knobs(self) -> dict:
        d = asdict(self)
        if not self.sequential:  # only then: the knobs (and stored cells' keys) of other recipes are unchanged
            del d["sequential"]
        return d


@dataclass(frozen=True)
class Rule:
    r"""Settings for the linear layers whose qualified names match ``patterns`` (glob, ``re:``).

    ``feature``: ``None``, ``"hadamard"`` (an orthogonal Hadamard rotation of the input features,
    folded into the weight before it is quantized: a per-linear online variant of QuaRot, not
    QuaRot itself, which is ``Recipe(network="quarot")``) or ``"smoothquant"`` (per-channel scales
    from calibration, ``alpha`` the migration strength). ``hadamard_seed``: with
    ``feature="hadamard"``, the randomized rotation :math:`D H/\sqrt n` (random signs D drawn from
    the seed); ``None`` (default) is the plain :math:`H/\sqrt n`. ``act`` / ``weight``: ``None`` leaves them
    in full precision."""

    patterns: str | tuple = "*"
    act: ActQuant | None = None
    weight: WeightQuant | None = None
    feature: str | None = None
    alpha: float = 0.5
    hadamard_seed: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "patterns", tuple(hooks.as_patterns(self.patterns)))
        if self.act is not None and not isinstance(self.act, ActQuant):
            raise TypeError(f"act must be an ActQuant or None, got {type(self.act).__name__}")
        if self.weight is not None and not isinstance(self.weight, WeightQuant):
            raise TypeError(f"weight must be a WeightQuant or None, got {type(self.weight).__name__}")
        if self.feature not in FEATURE_METHODS:
            raise ValueError(f"unknown feature method {self.feature!r}; choose one of {FEATURE_METHODS}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"SmoothQuant alpha must be in [0, 1], got {self.alpha!r}")
        seed = self.hadamard_seed
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise ValueError(f"hadamard_seed must be None or an int >= 0, got {seed!r}")
            if self.feature != "hadamard":
                raise ValueError(f"hadamard_seed={seed} needs feature='hadamard', got feature={self.feature!r}")

    def prep_key(self) -> tuple:
        return (self.patterns, self.feature, self.alpha if self.feature == "smoothquant" else None,
                self.hadamard_seed, self.weight)

    def knobs(self) -> dict:
        return {"patterns": [p if isinstance(p, str) else p.pattern for p in self.patterns],
                "act": self.act.knobs() if self.act else None,
                "weight": self.weight.knobs() if self.weight else None,
                "feature": self.feature, "alpha": self.alpha if self.feature == "smoothquant" else None,
                "hadamard_seed": self.hadamard_seed}


@dataclass(frozen=True)
class Recipe:
    """Rules (first match wins; every rule must match a module), an optional KV setting
    (:class:`ActQuant` applied to keys after RoPE and to values, per token and head) and an
    optional model-level preparation ``network``: ``None`` or ``"quarot"`` (QuaRot, Ashkboos et
    al. 2024, :mod:`stamp_lib.model.quarot`; ``network_seed`` draws the random signs of its
    residual rotation). With ``network="quarot"`` every rule's ``feature`` must be ``None``: the
    plan supplies the feature transforms.

    ``network="flatquant"`` (FlatQuant, Sun et al. 2025, :mod:`stamp_lib.model.flatquant`) with
    ``network_config`` a :class:`~stamp_lib.model.flatquant.FlatQuantConfig`: :func:`prepare` calibrates
    it (block by block, on ``calib``), :func:`apply` applies it with FlatQuant's own quantizers. One
    rule, ``feature=None``: its ``act`` gives the bits per row and the sequence transform (STaMP on
    top of FlatQuant), its ``weight`` must be RTN (FlatQuant's weight quantizer, with its learned
    clipping) with the config's ``w_bits``; the rule's patterns are not used (FlatQuant quantizes
    the seven linears of every decoder layer). ``kv`` and the config's ``kv_bits`` agree."""

    rules: tuple = ()
    kv: ActQuant | None = None
    name: str = ""
    network: str | None = None
    network_seed: int = 0
    network_config: object = None

    def __post_init__(self):
        rules = (self.rules,) if isinstance(self.rules, Rule) else tuple(self.rules)
        if not all(isinstance(r, Rule) for r in rules):
            raise TypeError("rules must be Rule objects")
        object.__setattr__(self, "rules", rules)
        if self.kv is not None and not isinstance(self.kv, ActQuant):
            raise TypeError(f"kv must be an ActQuant or None, got {type(self.kv).__name__}")
        if self.network not in NETWORK_METHODS:
            raise ValueError(f"unknown network preparation {self.network!r}; choose one of {NETWORK_METHODS}")
        seed = self.network_seed
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"network_seed must be an int >= 0, got {seed!r}")
        if self.network is None and seed != 0:
            raise ValueError(f"network_seed={seed} needs network='quarot' (it seeds QuaRot's rotation); "
                             "for a per-linear rotation use Rule(feature='hadamard', hadamard_seed=...)")
        if self.network == "quarot":
            bad = [r.patterns for r in rules if r.feature is not None]
            if bad:
                raise ValueError(f"network='quarot' supplies the feature transforms itself, but the rules for {bad} "
                                 "set feature=...; set feature=None in every rule (or drop network='quarot')")
        if self.network == "flatquant":
            self._check_flatquant(rules)
        elif self.network_config is not None:
            raise ValueError("network_config is FlatQuant's configuration; it needs network='flatquant'")

    def _check_flatquant(self, rules) -> None:
        from .flatquant import FlatQuantConfig

        cfg = self.network_config
        if not isinstance(cfg, FlatQuantConfig):
            raise ValueError("network='flatquant' needs network_config=FlatQuantConfig(...) (its bits, epochs, "
                             f"seed...), got {type(cfg).__name__}")
        r = rules[0] if len(rules) == 1 else None
        if r is None or r.feature is not None or r.act is None or r.weight is None:
            raise ValueError("network='flatquant' takes one rule with act= and weight= set and feature=None "
                             "(FlatQuant supplies the transforms)")
        if r.weight.method != "rtn" or r.weight.bits != cfg.w_bits or r.weight.lowrank or r.weight.group_size:
            raise ValueError(f"network='flatquant': the weights are FlatQuant's own per-row RTN with learned "
                             f"clipping at w_bits={cfg.w_bits}; pass WeightQuant(bits={cfg.w_bits}) (FlatQuant's "
                             "optional GPTQ pass after calibration is not implemented here)")
        if quant.parse_bits(r.act.bits)[2] != cfg.a_bits:
            raise ValueError(f"network='flatquant': act bits {r.act.bits!r} have low bits other than the config's "
                             f"a_bits={cfg.a_bits} (the bits FlatQuant was calibrated with)")
        kv_low = None if self.kv is None else quant.parse_bits(self.kv.bits)[2]
        if kv_low != cfg.kv_bits:
            raise ValueError(f"network='flatquant': kv={self.kv and self.kv.bits!r} but the config's kv_bits="
                             f"{cfg.kv_bits}; make them agree (kv=None with kv_bits=None)")

    def prep_key(self) -> tuple:
        key = tuple(r.prep_key() for r in self.rules)
        if self.network == "flatquant":
            return key + (("network", self.network, self.network_config),)
        return key if self.network is None else key + (("network", self.network, self.network_seed),)

    def needs_calibration(self) -> bool:
        return self.network == "flatquant" or any(
            r.feature == "smoothquant" or (r.weight is not None and r.weight.method == "gptq") for r in self.rules)

    def knobs(self) -> dict:
        d = {"name": self.name, "rules": [r.knobs() for r in self.rules], "kv": self.kv.knobs() if self.kv else None}
        if self.network is not None:  # only then: the knobs (and stored cells' keys) of other recipes are unchanged
            d.update(network=self.network, network_seed=self.network_seed)
        if self.network_config is not None:
            d.update(network_config=self.network_config.knobs())
        return d

    def resolve(self, model: nn.Module) -> dict[str, tuple[nn.Linear, Rule]]:
        """``{name: (module, rule)}`` for every linear layer some rule matches (first rule wins)."""
        linears = {n: m for n, m in model.named_modules() if n and isinstance(m, nn.Linear)}
        out = {}
        for r in self.rules:
            hit = hooks.select_modules(model, r.patterns)  # raises if a pattern matches nothing
            for n, m in hit.items():
                out.setdefault(n, (m, r))
        return {n: out[n] for n in linears if n in out}


# ----------------------------------------------------------------------------- preparation
@dataclass
class Prepared:
    """What :func:`prepare` computed: per layer, the feature transform, the (folded,
    quantized) weight and, for ``lowrank`` rules, the factors (A, B) of the full-precision branch
    :math:`L_r = A B`, plus calibration facts; ``plan``: the :class:`stamp_lib.model.quarot.QuaRotPlan`
    of a ``network="quarot"`` recipe (its weights are then those of the rotated network).
    Reusable for every recipe with the same ``key``."""

    key: tuple
    features: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)
    lowrank: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    plan: object = None


class _Stats:
    """Calibration reducer: per-channel max |x| (SmoothQuant) and GPTQ Hessians of selected inputs.
    Layers that share one input tensor accumulate once (capture dedup) and read their group's."""

    def __init__(self, absmax_names, hessian_names):
        self.absmax_names, self.hessian_names = set(absmax_names), set(hessian_names)
        self.absmax: dict[str, torch.Tensor] = {}
        self.H = {n: gptq.HessianAccumulator() for n in self.hessian_names}

    def __call__(self, name, x):
        if name in self.absmax_names:
            a = x.detach().reshape(-1, x.shape[-1]).abs().amax(0).double().cpu()
            self.absmax[name] = torch.maximum(self.absmax[name], a) if name in self.absmax else a
        if name in self.hessian_names:
            self.H[name].add(x)


@torch.no_grad()
def prepare(model: nn.Module, recipe: Recipe, calib=None, *, forward: Callable | None = None,
            batch_size: int = 1, progress: bool = True) -> Prepared:
    """Run the recipe's methods on calibration data; see the module docstring.

    ``calib``: what :func:`stamp_lib.model.capture.capture_inputs` accepts (e.g. token windows (n, s));
    needed only for SmoothQuant or GPTQ (an error says so when it is missing); token windows (n, s)
    for GPTQ with ``sequential=True``, which runs the decoder layer by layer (``batch_size`` windows
    per layer call) and holds one group's Hessian and the windows' hidden states at one layer
    boundary instead of every layer's Hessians. Modules that share
    one input tensor (q/k/v, gate/up) share SmoothQuant scales, computed with the largest weight
    magnitude over the group (as when the scale is folded into the preceding norm).

    ``recipe.network="quarot"``: the QuaRot plan is built first and everything below runs on the
    rotated network (its parameters swapped in, :func:`stamp_lib.model.quarot.rotated` without the
    online parts): GPTQ Hessians are those of the inputs the rotated network feeds the layer, turned
    into those of the quantized inputs :math:`x R` by :math:`R^\top H R` for the plan's online
    transforms R, which become ``prepared.features`` of the matched layers (a layer no rule matches
    keeps its plain input and its rotated, unfolded weight: exact, and not quantized anyway).

    ``recipe.network="flatquant"``: FlatQuant calibrated on ``calib`` (token windows (n, s)) with
    the recipe's config (:func:`stamp_lib.model.flatquant.calibrate`); ``prepared.plan`` is its result."""
    if recipe.network is None:
        return _prepare(model, recipe, calib, forward, batch_size, progress, None)
    if recipe.network == "flatquant":
        from tqdm.auto import tqdm

        from . import flatquant

        if calib is None:
            raise ValueError("network='flatquant' is calibrated block by block: pass calib=, token windows (n, s) "
                             "from the calibration split")
        with torch.enable_grad(), tqdm(desc="FlatQuant calibration", disable=None if progress else True,
                                       leave=False) as bar:
            res = flatquant.calibrate(model, calib, recipe.network_config, progress=bar)
        return Prepared(key=recipe.prep_key(), plan=res,
                        info={"network": flatquant.LABEL, "calibration_seconds": res.seconds})
    from . import quarot

    plan = quarot.quarot_plan(model, seed=recipe.network_seed)
    with quarot.rotated(model, plan, online=False):
        return _prepare(model, recipe, calib, forward, batch_size, progress, plan)


def _prepare(model, recipe, calib, forward, batch_size, progress, plan) -> Prepared:
    resolved = recipe.resolve(model)
    prep = Prepared(key=recipe.prep_key(), plan=plan)
    if plan is not None:
        prep.features.update({n: plan.online[n] for n in resolved if n in plan.online})
        prep.info["network"] = plan.description
    sq = [n for n, (m, r) in resolved.items() if r.feature == "smoothquant"]
    gq = [n for n, (m, r) in resolved.items() if r.weight is not None and r.weight.method == "gptq"]
    seq = [n for n in gq if resolved[n][1].weight.sequential]  # Hessians layer by layer, below
    once = [n for n in gq if not resolved[n][1].weight.sequential]  # Hessians from one full-precision pass
    stats, aliases = None, {}
    if sq or gq:
        if calib is None:
            raise ValueError("this recipe needs calibration data (SmoothQuant scales or GPTQ Hessians): "
                             "pass calib=, e.g. token windows from the calibration split")
        prep.info["calibration_tokens"] = int(calib.numel()) if isinstance(calib, torch.Tensor) else None
    if sq or once:
        names = sorted(set(sq) | set(once))
        # dedup: layers fed the very same tensor (q/k/v, gate/up) are reduced once, read via aliases
        stats = _Stats(sq, once)
        cap = capture.capture_inputs(model, calib, names, keep=False, reduce=stats, dedup=True, forward=forward,
                                     batch_size=batch_size, progress=progress)
        aliases = cap.aliases
        for n in names:
            c = aliases.get(n, n)
            if n in stats.hessian_names and c != n:
                stats.H[n] = stats.H[c] if c in stats.H else stats.H[n]
    # SmoothQuant: layers sharing an input share one Scale, with the largest weight magnitude over
    # the group (what folding the scale into the preceding norm requires)
    groups: dict[str, list[str]] = {}
    for n in sq:
        groups.setdefault(aliases.get(n, n), []).append(n)
    for canon, members in groups.items():
        rule = resolved[members[0]][1]
        w_absmax = smoothquant.weight_input_absmax(*[resolved[n][0].weight for n in members]).cpu()
        T = smoothquant.smoothquant_transform(stats.absmax[canon], w_absmax, alpha=rule.alpha)
        for n in members:
            prep.features[n] = T
    rotations: dict[tuple, object] = {}
    for n, (m, r) in resolved.items():
        if r.feature == "hadamard":
            key = (m.in_features, r.hadamard_seed)
            if key not in rotations:
                rotations[key] = features.hadamard_rotation(*key)
            prep.features[n] = rotations[key]
    from tqdm.auto import tqdm

    # every weight that needs no Hessian is folded (float64) and quantized at once, one at a time:
    # no float64 copies of all the linears held together
    gq_set = set(gq)
    for n, (m, r) in resolved.items():
        if n in gq_set or (r.weight is None and n not in prep.features):
            continue
        Wf = _folded(prep, n, m, r)
        wq = r.weight
        out = Wf if wq is None else quant.fake_quant(Wf, wq.bits, symmetric=wq.symmetric, clip_ratio=wq.clip_ratio,
                                                     block_size=wq.group_size)
        prep.weights[n] = out.to(dtype=m.weight.dtype, device=m.weight.device)
        del Wf, out
    # GPTQ on one full-precision calibration pass: layers fed one tensor (q/k/v, gate/up) share one
    # Hessian: GPTQ treats output rows independently given H, so their stacked rows are quantized in
    # one call (one Cholesky factorisation instead of one per layer; the same result)
    gptq_groups: dict[tuple, list[str]] = {}
    for n in once:
        gptq_groups.setdefault((id(stats.H[n]), id(prep.features.get(n)), resolved[n][1].weight), []).append(n)
    for (_, _, wq), members in tqdm(list(gptq_groups.items()), desc="GPTQ", disable=not progress, leave=False):
        _gptq_group(prep, resolved, members, stats.H[members[0]].H, wq)
        for n in members:  # the accumulator is freed once no group reads it
            del stats.H[n]
    if seq:
        _sequential_gptq(model, recipe, resolved, prep, seq, calib, forward, batch_size, progress)
    return prep


def _folded(prep: Prepared, n: str, m: nn.Linear, r: Rule) -> torch.Tensor:
    r"""The weight of ``n`` in float64, folded with its feature transform (:math:`W R^{-\top}`); for a
    ``lowrank`` rule the top-r part goes to ``prep.lowrank[n]`` and the residual is returned."""
    F = prep.features.get(n)
    W = m.weight.detach()
    Wf = W.double() if F is None else F.fold_weight(W.double())
    wq = r.weight
    if wq is not None and wq.lowrank:
        if wq.lowrank >= min(Wf.shape):
            raise ValueError(f"{n}: lowrank={wq.lowrank} must be below min(out, in) = {min(Wf.shape)}")
        U, S, Vh = torch.linalg.svd(Wf, full_matrices=False)
        A, B = U[:, :wq.lowrank] * S[:wq.lowrank], Vh[:wq.lowrank]  # L_r = A B, (out, r) (r, in)
        prep.lowrank[n] = (A.to(dtype=W.dtype, device=W.device), B.to(dtype=W.dtype, device=W.device))
        Wf = Wf - A @ B
    return Wf


def _gptq_group(prep: Prepared, resolved: dict, members: list, H: torch.Tensor, wq: WeightQuant) -> None:
    """GPTQ of the linears ``members`` (one input, one feature transform, one setting): their folded
    weights stacked by rows and quantized with the Hessian ``H`` of their common input, turned into
    that of the transformed input :math:`x R` (:math:`R^\\top H R`)."""
    F = prep.features.get(members[0])
    parts = [_folded(prep, n, *resolved[n]) for n in members]
    sizes = [p.shape[0] for p in parts]
    Wf = torch.cat(parts)
    del parts
    if F is not None:  # the Hessian of the transformed inputs x R: R^T H R
        H = F.forward(F.forward(H.to(Wf.device)).T).T
    out = gptq.gptq_quantize(Wf, H.to(Wf.device), wq.bits, group_size=wq.group_size, symmetric=wq.symmetric,
                             clip_ratio=wq.clip_ratio, damp=wq.damp, act_order=wq.act_order)
    del Wf, H
    for n, part in zip(members, out.split(sizes)):
        W = resolved[n][0].weight
        prep.weights[n] = part.to(dtype=W.dtype, device=W.device)


def _weights_only(recipe: Recipe) -> Recipe:
    """``recipe`` without activation and K/V quantization and without its network step: what the
    calibration forwards of sequential GPTQ run (the prepared weights, their feature transforms and
    low-rank branches). Its ``prep_key`` names the same rules' weight settings."""
    return Recipe(tuple(replace(r, act=None) for r in recipe.rules), name=f"{recipe.name} (weights only)")


def _sequential_gptq(model, recipe, resolved, prep, names, calib, forward, batch_size, progress) -> None:
    """GPTQ of ``names`` decoder layer by decoder layer (see :class:`WeightQuant`'s ``sequential``),
    with the block-by-block mechanism of :mod:`stamp_lib.model.blocks`: layer 0's inputs captured
    for every calibration window; per layer, passes that each capture the next group of linears fed
    one input (the prepared weights of everything quantized so far swapped in, through
    :func:`apply` with the weights-only recipe; the pass stops once the group's input is seen),
    GPTQ of the group with that Hessian (freed after), and at the end the layer's outputs, the next
    layer's inputs. Everything else is already prepared (``prep.weights``)."""
    from tqdm.auto import tqdm

    from . import blocks

    if forward is not None or not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.is_floating_point():
        raise ValueError("sequential GPTQ runs the decoder layer by layer on token windows: pass calib= as token ids "
                         f"(n, s) and no forward= (got calib {getattr(calib, 'shape', type(calib).__name__)}"
                         f"{', forward=' if forward is not None else ''})")
    prefix, dec, layers = blocks.decoder(model)
    base = f"{prefix}.layers." if prefix else "layers."
    per_layer: dict[int, list[str]] = {}
    for n in names:
        idx = n[len(base):].split(".")[0] if n.startswith(base) else ""
        if not idx.isdigit() or int(idx) >= len(layers):
            raise ValueError(f"{n}: sequential GPTQ quantizes linears inside the decoder layers ({base}<i>.*) only; "
                             "match this layer with another rule, or use sequential=False")
        per_layer.setdefault(int(idx), []).append(n)
    wo = _weights_only(recipe)
    last = max(per_layer)
    x, kws = blocks.layer_inputs(model, dec, calib)
    bar = tqdm(total=len(names), desc="GPTQ (layer by layer)", disable=not progress, leave=False)
    for i in range(last + 1):
        layer, kw = layers[i], kws[i]
        pending = per_layer.get(i, [])
        while pending:
            acc, group = _next_group_hessian(model, wo, prep, layer, pending, x, kw, batch_size)
            H = acc.take()  # in the accumulator's memory: one d x d matrix
            del acc
            parts: dict[tuple, list[str]] = {}  # one input, but possibly other settings or transforms
            for n in group:
                parts.setdefault((id(prep.features.get(n)), resolved[n][1].weight), []).append(n)
            for (_, wq), members in parts.items():
                _gptq_group(prep, resolved, members, H, wq)
                bar.update(len(members))
            del H
            pending = [n for n in pending if n not in group]
        if i < last:  # the next layer's inputs: this layer, quantized, on every window
            with apply(model, wo, _partial(wo, prep), progress=False):
                x = blocks.layer_outputs(layer, x, kw, batch_size)
    bar.close()
    prep.info["gptq"] = "sequential"


def _partial(wo: Recipe, prep: Prepared) -> Prepared:
    """The part of ``prep`` prepared so far, for :func:`apply` with the weights-only recipe: a
    linear whose weight is not prepared yet keeps its original weight and its plain input."""
    return Prepared(key=wo.prep_key(), weights=prep.weights, lowrank=prep.lowrank,
                    features={n: F for n, F in prep.features.items() if n in prep.weights})


def _next_group_hessian(model, wo, prep, layer, pending, x, kw, batch_size):
    """``(HessianAccumulator, members)``: the Hessian of the first input that a linear of ``pending``
    reads when ``layer`` runs on the windows of ``x`` (everything prepared so far quantized), and the
    pending linears fed that same tensor (:func:`stamp_lib.model.capture.capturing`'s dedup), in
    ``pending``'s order. Each forward stops at the first pending linear with another input."""
    from . import blocks

    acc = gptq.HessianAccumulator()
    first: list[str] = []

    def on_input(name, t):
        if not first:
            first.append(name)
        elif name != first[0]:
            raise blocks.Stop  # the next group's input: the rest of the layer is not needed
        acc.add(t)

    with apply(model, wo, _partial(wo, prep), progress=False), \
            capture.capturing(model, pending, on_input, dedup=True) as h:
        for b in range(0, x.shape[0], batch_size):
            h.new_pass()
            try:
                blocks.call_layer(layer, x[b:b + batch_size], kw)
            except blocks.Stop:
                pass
    if not first:
        raise RuntimeError(f"sequential GPTQ: none of {pending} was called when its decoder layer ran")
    group = {first[0]} | {a for a, c in h.aliases.items() if c == first[0]}
    return acc, [n for n in pending if n in group]


# ----------------------------------------------------------------------------- application
@dataclass
class LayerStats:
    """Per layer, summed over calls: tokens quantized, bits spent (sum over rows of the row's bits)."""

    tokens: int = 0
    bits: int = 0
    calls: int = 0

    @property
    def average_bits(self) -> float:
        return self.bits / self.tokens if self.tokens else float("nan")


class Applied:
    """Handle yielded by :func:`apply`: ``stats`` (per layer :class:`LayerStats`, K/V as
    ``"kv.<layer>.<kind>"``), :meth:`average_bits`, :meth:`set_grid` for ``grid="auto"`` rules."""

    def __init__(self, recipe: Recipe, check_finite: bool | None = False):
        self.recipe = recipe
        self.check_finite = check_finite
        self.offset = 0
        self.grid: tuple[int, int] | None = None
        self.stats: dict[str, LayerStats] = {}
        self._bits: dict = {}  # (bits, s, min(offset, hp), device, dtype) -> (view (s, 1, 1), bits spent)
        self._templates: dict = {}  # (bits, device, dtype) -> [hp_bits] * hp + [lp_bits] * ..., on the device
        self._parsed: dict = {}
        self._transforms: dict = {}
        self._last = None
        self._lowrank_in: dict[str, torch.Tensor] = {}
        self._keep_rotated = True  # apply() clears it when neither an observer nor a low-rank branch reads x R
        # the largest hp_tokens of the linear-input rules: without any, a forward's position is not needed
        self.hp_max = max((r.act.hp_tokens for r in recipe.rules if r.act is not None), default=0)

    def set_grid(self, grid: tuple[int, int] | None) -> None:
        """The (h, w) token grid of the current forward, for rules with ``grid="auto"``."""
        self.grid = None if grid is None else (int(grid[0]), int(grid[1]))

    def average_bits(self, kind: str = "act", layers=None) -> float:
        """Bits per token actually spent, over all calls: ``"act"`` (linear inputs) or ``"kv"``;
        ``layers``: only these layer names (``nan`` if none of them ran)."""
        sel = [v for k, v in self.stats.items() if k.startswith("kv.") == (kind == "kv")
               and (layers is None or k in layers)]
        tok = sum(v.tokens for v in sel)
        return sum(v.bits for v in sel) / tok if tok else float("nan")

    # -- the per-call path -----------------------------------------------------------------------
    def _bits_for(self, spec: ActQuant, s: int, offset: int, like: torch.Tensor):
        """``(b, bits)``: the float bits (s, 1, 1) of a chunk of s rows at absolute ``offset`` on
        ``like``'s device and dtype, and their sum. Rows past ``hp_tokens`` all get the low bits,
        so the key holds ``min(offset, hp_tokens)``: one entry serves every decoding step beyond
        the high-precision rows. A miss slices the device-resident template of the spec (no
        host-to-device copy; the template grows by doubling)."""
        if _LEGACY:
            return self._bits_for_legacy(spec, s, offset, like)
        parsed = self._parsed.get(spec.bits)
        if parsed is None:
            parsed = self._parsed[spec.bits] = quant.parse_bits(spec.bits)
        hp, hb, lb = parsed
        o = offset if offset < hp else hp
        key = (spec.bits, s, o, like.device, like.dtype)
        hit = self._bits.get(key)
        if hit is None:
            tkey = (spec.bits, like.device, like.dtype)
            tpl = self._templates.get(tkey)
            if tpl is None or tpl.numel() < o + s:
                n = max(64, 1 << (hp + s - 1).bit_length())
                t = torch.full((n,), float(lb), dtype=torch.float64)
                t[:hp] = hb
                tpl = self._templates[tkey] = t.to(device=like.device, dtype=like.dtype)
            n_hp = min(hp - o, s)
            if len(self._bits) > 64:
                self._bits.clear()
            hit = self._bits[key] = (tpl[o : o + s].view(s, 1, 1), n_hp * hb + (s - n_hp) * lb)
        return hit

    def _bits_for_legacy(self, spec: ActQuant, s: int, offset: int, like: torch.Tensor):
        key = (spec.bits, s, offset, like.device, like.dtype)
        hit = self._bits.get(key)
        if hit is None:
            b = spec.bits_vector(s, offset)
            if len(self._bits) > 64:
                self._bits.clear()
            hit = self._bits[key] = (b.to(device=like.device, dtype=like.dtype).view(s, 1, 1), int(b.sum()))
        return hit

    def _transform_for(self, spec: ActQuant, s: int):
        grid = self.grid if spec.grid == "auto" else spec.grid
        key = (spec.transform, spec.levels, grid, s)
        T = self._transforms.get(key)
        if T is None:
            if spec.grid == "auto" and grid is None and spec.transform == "dwt" and s > 1:
                raise ValueError("this rule has grid='auto' but no grid was set for this forward "
                                 "(Applied.set_grid, e.g. by a pre-hook that reads the latent size)")
            if spec.transform == "identity" or s == 1:
                T = None
            elif spec.transform == "dwt" and grid is not None:
                if grid[0] * grid[1] != s:
                    raise ValueError(f"the token grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]} tokens, "
                                     f"the input has s={s}")
                cap = min(transforms.max_levels_1d(grid[0]), transforms.max_levels_1d(grid[1]))
                lv = cap if spec.levels is None else min(spec.levels, cap)
                T = transforms.build("dwt", levels=lv, grid=grid, check_finite=False) if lv > 0 else None
            elif spec.transform == "dwt":
                cap = transforms.max_levels_1d(s)
                lv = cap if spec.levels is None else min(spec.levels, cap)
                T = transforms.build("dwt", levels=lv, check_finite=False)
            else:
                T = transforms.build(spec.transform, check_finite=False)
            if len(self._transforms) > 64:
                self._transforms.clear()
            self._transforms[key] = T
        return T

    def count(self, name: str, tokens: int, bits: int) -> None:
        st = self.stats.setdefault(name, LayerStats())
        st.tokens += tokens
        st.bits += bits
        st.calls += 1

    def quantize(self, spec: ActQuant, x: torch.Tensor, offset: int, feature=None, quantizer=None):
        """``(out, tokens, bits)``: :math:`L^{-1} Q(L x R)` of one input (..., s, d) in the rotated
        basis, the number of tokens quantized and the bits they were given (summed over rows).
        ``quantizer``: a method's own per-row quantizer in place of ``spec``'s min-max one (see
        :func:`stamp_lib.core.quant.stamp_fake_quant`; FlatQuant's, :mod:`stamp_lib.model.flatquant`).
        Non-finite inputs raise only with ``check_finite=True`` (a host sync)."""
        return self._quantize(spec, x, offset, feature, quantizer)[:3]

    def _quantize(self, spec: ActQuant, x: torch.Tensor, offset: int, feature=None, quantizer=None):
        """:meth:`quantize` plus the rotated input :math:`x R` it computed (float32 for half inputs;
        ``x`` itself without a feature transform), for the low-rank branch and observers."""
        if x.dim() < 2:
            raise ValueError(f"expected an input (..., s, d), got shape {tuple(x.shape)}")
        check = self.check_finite
        if _LEGACY and check is None:
            check = x.device.type == "cpu"
        if check:
            if not bool(torch.isfinite(x).all()):
                raise ValueError(f"the input contains NaN/Inf ({int(torch.isnan(x).sum())} NaN, "
                                 f"{int(torch.isinf(x).sum())} Inf)")
        dtype = x.dtype
        xf = x if dtype in (torch.float32, torch.float64) else x.float()
        y = xf if feature is None else feature.forward(xf)
        rotated = y
        s = y.shape[-2]
        bt = spec.block_tokens
        if bt is not None:
            if s % bt:
                raise ValueError(f"sequence length {s} is not a multiple of block_tokens={bt}")
            y = y.unflatten(-2, (s // bt, bt))
            s = bt
        if spec.block_size is not None and y.shape[-1] % spec.block_size:
            raise ValueError(f"feature dim {y.shape[-1]} is not a multiple of block_size={spec.block_size}")
        b, bsum = self._bits_for(spec, s, 0 if bt is not None else offset, y)
        T = self._transform_for(spec, s)
        # x R (or the float32 copy of a half x) is a fresh tensor of ours: unless it is wanted back
        # (observer, low-rank branch), the quantizer works in its memory
        own = not self._keep_rotated and y.data_ptr() != x.data_ptr()
        kw = (dict(quantizer=quantizer) if quantizer is not None else
              dict(symmetric=spec.symmetric, clip_ratio=spec.clip_ratio, block_size=spec.block_size))
        out = quant.stamp_fake_quant(y, T, b, validate=False, overwrite=own, **kw)
        if bt is not None:
            out = out.flatten(-3, -2)
        n_seq = y.numel() // (y.shape[-1] * s)
        return out.to(dtype), n_seq * s, n_seq * bsum, (None if own else rotated)


def offset_of(args, kwargs, need: bool = True) -> int:
    """Absolute position of the first token of this forward (0 without a cache).

    ``need=False`` (no rule has high-precision rows, so the bits do not depend on the position):
    0 without reading anything. Otherwise, cheapest source first: a CPU ``cache_position``; the
    cache's length where it is a Python int (``DynamicCache`` and the sliding-window layers keep it
    on the host); only then a device tensor is read back (one host sync per forward: a
    ``cache_position`` on the GPU with no such cache, or a static cache's length tensor)."""
    if _LEGACY:
        return _offset_from_legacy(args, kwargs)
    if not need:
        return 0
    cp = kwargs.get("cache_position")
    cp = cp if isinstance(cp, torch.Tensor) and cp.numel() else None
    if cp is not None and cp.device.type == "cpu":
        return int(cp.reshape(-1)[0])
    pkv = kwargs.get("past_key_values", kwargs.get("cache"))  # transformers 5 passes "cache"
    n = None
    if pkv is not None and hasattr(pkv, "get_seq_length"):
        try:
            n = pkv.get_seq_length()
        except Exception:
            n = None
        if isinstance(n, int) and not isinstance(n, bool):
            return n
    if cp is not None:
        return int(cp.reshape(-1)[0])
    if isinstance(n, torch.Tensor) and n.numel() == 1:
        return int(n)
    return 0


def _offset_from_legacy(args, kwargs) -> int:
    cp = kwargs.get("cache_position")
    if isinstance(cp, torch.Tensor) and cp.numel():
        return int(cp.reshape(-1)[0])
    pkv = kwargs.get("past_key_values", kwargs.get("cache"))
    if pkv is not None and hasattr(pkv, "get_seq_length"):
        try:
            return int(pkv.get_seq_length())
        except Exception:
            return 0
    return 0


@contextlib.contextmanager
def apply(model: nn.Module, recipe: Recipe, prepared: Prepared | None = None, calib=None, *,
          observe: Callable | None = None, check_finite: bool | None = False, progress: bool = True):
    """Apply ``recipe`` to ``model`` for the duration of the block (see the module docstring).

    ``prepared``: from :func:`prepare` (computed here from ``calib`` when omitted; it must have been
    prepared for the same rules' feature and weight settings). ``observe(name, x_rotated, x_hat)``
    sees every quantized linear input in the basis it was quantized in (for per-layer SQNR).
    ``check_finite=True`` raises on a NaN/Inf linear or K/V input (a host sync per call; off by
    default, ``None`` is the same as ``False``). Yields an :class:`Applied`."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    if prepared is None:
        prepared = prepare(model, recipe, calib, progress=progress)
    elif prepared.key != recipe.prep_key():
        raise ValueError("prepared was made for other feature/weight settings than this recipe's; "
                         "call prepare(model, recipe, calib) again")
    if recipe.network == "flatquant":
        from . import flatquant

        if observe is not None:
            raise ValueError("observe= is not supported with network='flatquant' (its quantizers run in "
                             "stamp_lib.model.flatquant's own hooks)")
        with flatquant.flatquant(model, prepared.plan, act=recipe.rules[0].act, kv_act=recipe.kv) as st:
            yield st
        return
    resolved = recipe.resolve(model)
    state = Applied(recipe, check_finite)
    hooked = {n: m for n, (m, r) in resolved.items()
              if r.act is not None or n in prepared.features or n in prepared.lowrank}

    # the low-rank branch reads the layer's own input x through B R^T (computed once here), so x R is
    # needed after quantizing only by an observer; otherwise the quantizer may work in its memory
    lowrank = {n: (A, B if _LEGACY or n not in prepared.features else prepared.features[n].fold_reader(B))
               for n, (A, B) in prepared.lowrank.items()}
    keep_rotated = observe is not None or (_LEGACY and bool(lowrank))
    state._keep_rotated = keep_rotated or _LEGACY

    def on_input(name, module, x):
        m, rule = resolved[name]
        F = prepared.features.get(name)
        last = state._last
        if last is not None and last[1] is rule and last[2] is F and hooks.same_tensor(last[0], x, version=last[7]):
            out, tok, bits, xr = last[3:7]  # q/k/v (gate/up) take the same tensor: quantize it once
        elif rule.act is None:
            xr = x if F is None else F.forward(x)
            out, tok, bits = xr, 0, 0
        else:
            out, tok, bits, xr = state._quantize(rule.act, x, state.offset, F)
        if rule.act is not None:
            state.count(name, tok, bits)
        state._last = (x, rule, F, out, tok, bits, xr if keep_rotated else None, x._version)
        if observe is not None or name in lowrank:
            if _LEGACY:  # the previous path computed x R a second time here, for the low-rank branch too
                xr = x if F is None else F.forward(x)
            if observe is not None:
                observe(name, xr if xr.dtype == x.dtype else xr.to(x.dtype), out)
            if name in lowrank:
                state._lowrank_in[name] = xr if _LEGACY else x  # x, read through B R^T
        return out

    def add_lowrank(module, args, output):
        name = names_of[id(module)]
        xr = state._lowrank_in.pop(name)
        A, B = lowrank[name]
        t = xr.to(output.dtype) @ B.T  # two thin products, O(r (in + out))
        if _LEGACY or not output.is_contiguous() or (output.requires_grad and torch.is_grad_enabled()):
            return output + t @ A.T
        # the layer's fresh output takes the second product in place (one GEMM with beta = 1): no
        # second output-sized tensor (on CPU a fresh one costs more in page faults than the product)
        output.view(-1, output.shape[-1]).addmm_(t.view(-1, t.shape[-1]), A.T)
        return output

    def on_model(module, args, kwargs):
        state.offset = offset_of(args, kwargs, need=state.hp_max > 0)
        state._last = None
        return None

    plan = prepared.plan
    if (plan is None) != (recipe.network is None):
        raise ValueError(f"the recipe has network={recipe.network!r} but prepared carries "
                         f"{'no' if plan is None else 'a'} QuaRot plan; call prepare(model, recipe, calib) again")
    if plan is None:
        outer = contextlib.nullcontext()
    else:
        from . import quarot

        outer = quarot.rotated(model, plan, online=False)  # entered first, left last
    saved = {}
    stack = contextlib.ExitStack()
    with outer:
        try:
            with torch.no_grad():
                for n, Wq in prepared.weights.items():
                    m = resolved[n][0]
                    saved[n] = m._parameters["weight"]
                    m._parameters["weight"] = nn.Parameter(Wq, requires_grad=False)
            stack.enter_context(hooks.module_hook(model, on_model))
            stack.enter_context(hooks.input_hooks(hooked, on_input))
            names_of = {id(resolved[n][0]): n for n in prepared.lowrank}
            for n in prepared.lowrank:
                stack.enter_context(hooks.module_hook(resolved[n][0], add_lowrank, "post"))
            if recipe.kv is not None or plan is not None:
                from . import kv

                def quantize_kv(layer_idx, kind, x, offset):
                    out, tok, bits = state.quantize(recipe.kv, x, offset)
                    state.count(f"kv.{layer_idx}.{kind}", tok, bits)
                    return out

                stack.enter_context(kv.kv_quantization(model, quantize_kv if recipe.kv is not None else None,
                                                       qk_rotation=None if plan is None else plan.qk.forward))
            with stack:
                yield state
        finally:
            state._last = None
            for n, p in saved.items():
                resolved[n][0]._parameters["weight"] = p


def numerics() -> dict:
    """The process-wide switches that change a quantized run's floating-point result without
    changing its recipe (the rotation algorithm, the fused kernels, the FFT engine, torch's thread
    count): part of every stored cell's key (:mod:`stamp_lib.core.cells`), so that a run with
    another algorithm is computed, never read back from one with the first."""
    from ..methods import features

    return {"hadamard_matmul_max": features.HadamardRotation.matmul_max, "fused_quant": quant._FUSED,
            "fast_haar2d": transforms._FAST_HAAR2D, "feature_cache": features._CACHE, "legacy_hot_path": _LEGACY,
            "fft_backend": transforms._FFT_BACKEND, "torch_threads": torch.get_num_threads()}
