r"""Ablations of STaMP on the captured inputs of a model's linear layers (chapter 5).

Every knob is varied on the same activations and scored per evaluation window, so that each
comparison is paired over windows (the unit of randomness of the text) and gets a t interval.

Contract
--------
* :func:`capture_llm` runs a causal LM over token windows and keeps the inputs of the linear
  layers of the chosen decoder layers (q/k/v and gate/up share their input: kept once), with their
  layer types (:func:`stamp_lib.experiments.seqstats.llama_layer_type`).
* :func:`sweep` quantizes every kept input with every transform and every bit vector
  (:func:`stamp_lib.experiments.seqstats.measure`, per-token min-max, the quantizer of Theorem 1)
  one window at a time and keeps the squared errors and signals; a transform is a
  :class:`~stamp_lib.core.transforms.SequenceTransform` or a function of the layer name (a KLT
  fitted per layer). :meth:`Sweep.sqnr` aggregates over a set of layers (sum of errors over sum
  of signals) and returns one SQNR per window.
* :func:`hp_bits` builds the Figure 4b rule (the first k rows at ``hp`` bits, the rest at ``lp``);
  :func:`allocations` the three allocations of one average budget compared in the chapter: the
  paper's two levels on the first rows, the same two levels on the rows of largest calibration
  energy, and the integer optimum of Theorem 1's bound
  (:func:`stamp_lib.core.quant.optimal_bits`).
* The mean-token control (:class:`~stamp_lib.core.transforms.MeanToken`, ``transforms.build("mean")``)
  is one more transform of a sweep: :meth:`Sweep.gain` compares it with the others.
* Two causal, cheap alternatives to separating the mean token, entered in a sweep like a
  transform: :class:`StaticOffset` (a per-channel offset from calibration, itself at 8 bits,
  subtracted before per-token quantization and added back: one bias per linear) and
  :class:`RunningMean` (the mean of the already reconstructed prefix, subtracted and added back:
  nothing stored, but token i's quantization waits for tokens < i). :func:`offset_hooks`
  applies either inside a model, on every linear input, for end-to-end perplexity;
  :func:`input_means` calibrates the static offsets of every linear.
* :func:`capture_galaxy` keeps the linear inputs of the galaxy MLP-Mixer at one diffusion time.

Quantization is simulated (fake quantization in float32): errors, not speed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from ..core import metrics, quant, stats, transforms
from ..model import capture, hooks
from ..model import recipe as rcp
from .seqstats import galaxy_capture, llama_layer_type, measure

__all__ = ["capture_llm", "capture_galaxy", "Sweep", "sweep", "hp_bits", "energy_profile", "allocations",
           "klt_per_layer", "made_of", "StaticOffset", "RunningMean", "input_means", "offset_hooks", "act_variant"]


@torch.no_grad()
def capture_llm(model, windows: torch.Tensor, layers, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """``{name: X (n, s, d)}``: the inputs of the linear layers of decoder ``layers`` over the token
    ``windows`` (n, s), one per shared input (the first module that reads it names it)."""
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("windows must be a LongTensor (n, seq_len) of token ids (stamp_lib.zoo.text.token_windows)")
    layers = sorted({int(i) for i in layers})
    if not layers:
        raise ValueError("no decoder layers chosen")
    cap = capture.capture_inputs(model, windows, [f"*layers.{i}.*" for i in layers], keep=True, progress=progress)
    return {n: x.float() for n, x in cap.acts.items()}


@torch.no_grad()
def capture_galaxy(model, y0: torch.Tensor, t: float, noise_seed: int) -> dict[str, torch.Tensor]:
    """``{name: X (n, s, d)}``: the inputs of every linear of the galaxy MLP-Mixer for clean samples
    ``y0`` (n, C, H, W) noised to diffusion time ``t`` (:func:`~stamp_lib.experiments.seqstats.galaxy_noised`
    with ``noise_seed``). Rows of channel-mixing inputs are the patch tokens (row-major grid), rows
    of token-mixing inputs the channels (:func:`~stamp_lib.experiments.seqstats.galaxy_layer_type`)."""
    if not isinstance(y0, torch.Tensor) or y0.dim() != 4:
        raise ValueError("y0 must be clean samples (n, C, H, W) in model space (seqstats.galaxy_samples)")
    return {n: x.float() for n, x in galaxy_capture(model, y0, t, noise_seed, keep=True).acts.items()}


def klt_per_layer(calib: dict[str, torch.Tensor]) -> Callable[[str], transforms.KLT]:
    """The KLT of every layer fitted on its calibration inputs (held out from the evaluation)."""
    fitted = {n: transforms.KLT.fit(x) for n, x in calib.items()}

    def get(name: str) -> transforms.KLT:
        if name not in fitted:
            raise KeyError(f"no calibration inputs for {name!r}; calibrated: {list(fitted)[:4]}...")
        return fitted[name]

    return get


def _resolve(transform, name: str) -> transforms.SequenceTransform:
    """A transform, or the one a per-layer function (e.g. :func:`klt_per_layer`) gives ``name``."""
    return transform if isinstance(transform, transforms.SequenceTransform) else transform(name)


# ----------------------------------------------------------------------------- mean offsets
class _Offset:
    """A causal quantizer ``x_hat = m + Q_b(x - m)``: per-token min-max quantization (the rows'
    ``bits``) of what is left after an offset ``m`` that both sides of the linear can form."""

    label = "offset"

    def quantize(self, name: str, X: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class StaticOffset(_Offset):
    """A per-channel offset per linear input, the mean of its calibration inputs over every token,
    kept at ``offset_bits`` (one min-max grid over its d values): ``x_hat_i = m + Q(x_i - m)``.
    Causal (per token); in a deployment ``W m`` is one bias per linear, computed offline."""

    label = "static offset"

    def __init__(self, means: dict[str, torch.Tensor], offset_bits: int = 8):
        if not means:
            raise ValueError("no calibration means (StaticOffset.fit(calib) or input_means(model, windows))")
        self.offset_bits = quant.check_bits_value(offset_bits, "offset bits")
        self.means = {n: quant.fake_quant(m.float().reshape(1, -1), self.offset_bits)[0] for n, m in means.items()}

    @classmethod
    def fit(cls, calib: dict[str, torch.Tensor], offset_bits: int = 8) -> "StaticOffset":
        """Offsets from captured calibration inputs ``{name: X (n, s, d)}``."""
        return cls({n: x.reshape(-1, x.shape[-1]).double().mean(0) for n, x in calib.items()}, offset_bits)

    def quantize(self, name, X, bits):
        if name not in self.means:
            raise KeyError(f"no calibration offset for {name!r}; calibrated: {list(self.means)[:4]}...")
        m = self.means[name].to(X.dtype)
        if m.numel() != X.shape[-1]:
            raise ValueError(f"{name}: offset has {m.numel()} channels, the input {X.shape[-1]}")
        return quant.fake_quant(X - m, bits) + m


class RunningMean(_Offset):
    """Closed-loop prediction from the prefix: ``m_i`` is the mean of the *reconstructed* tokens
    0..i-1 (``m_0 = 0``), ``x_hat_i = m_i + Q(x_i - m_i)``. Causal; nothing is stored, since the
    other side of a linear forms ``W m_i`` as the running mean of its own earlier outputs; but
    token i is quantized only after tokens < i (a scan over the sequence)."""

    label = "running mean"

    def quantize(self, name, X, bits):
        bits = torch.as_tensor(bits)
        s = X.shape[-2]
        if bits.numel() != s:
            raise ValueError(f"{name}: {bits.numel()} row bits for {s} tokens")
        out = torch.empty_like(X)
        total = torch.zeros_like(X[..., 0, :], dtype=torch.float64)
        for i in range(s):
            m = (total / i).to(X.dtype) if i else torch.zeros_like(X[..., 0, :])
            xi = X[..., i:i + 1, :]
            out[..., i:i + 1, :] = quant.fake_quant(xi - m.unsqueeze(-2), bits[i:i + 1]) + m.unsqueeze(-2)
            total += out[..., i, :]
        return out


@torch.no_grad()
def input_means(model, windows: torch.Tensor, patterns) -> dict[str, torch.Tensor]:
    """``{linear name: mean input (d,)}`` over every token of ``windows`` (n, s), for every linear
    matched by ``patterns`` (shared inputs: each reader gets the same mean). Streams: nothing kept."""
    sums: dict[str, list] = {}

    def acc(name, x):
        x = x.reshape(-1, x.shape[-1]).double()
        prev = sums.setdefault(name, [0.0, 0])
        prev[0] = prev[0] + x.sum(0)
        prev[1] += x.shape[0]

    cap = capture.capture_inputs(model, windows, patterns, keep=False, reduce=acc, progress=False)
    return {n: (sums[cap.canonical(n)][0] / sums[cap.canonical(n)][1]).float() for n in cap.names}


def act_variant(recipe: rcp.Recipe, transform: str | None) -> rcp.Recipe:
    """``recipe`` with every rule's activation quantizer changed: ``None`` removes it (weights and
    K/V only, for :func:`offset_hooks`), a transform name (e.g. ``"mean"``) keeps its bits with that
    sequence transform. Same weights: the recipe's :func:`~stamp_lib.model.recipe.prepare` serves."""
    if not isinstance(recipe, rcp.Recipe) or recipe.network is not None:
        raise ValueError("act_variant takes a Recipe without a network preparation (no QuaRot/FlatQuant)")
    if any(r.act is None for r in recipe.rules):
        raise ValueError("every rule of the recipe must quantize activations")
    rules = tuple(replace(r, act=None if transform is None else replace(r.act, transform=transform, levels=None))
                  for r in recipe.rules)
    return replace(recipe, rules=rules, name=f"{recipe.name}/act-{transform or 'off'}")


@contextlib.contextmanager
def offset_hooks(model, offset: _Offset, bits: str, patterns):
    """For the block, every linear input matched by ``patterns`` goes through ``offset.quantize``
    with the rows' bits of the spec ``bits`` (e.g. ``"16x8+4"``). Combine with a recipe whose rules
    quantize weights but not activations (``act=None``)."""
    if not isinstance(offset, _Offset):
        raise TypeError(f"offset must be a StaticOffset or RunningMean, got {type(offset).__name__}")
    quant.parse_bits(bits)
    last: list = []  # (input, its version, output): readers of one shared input (q/k/v) reuse it

    def fn(name, module, x):
        if isinstance(offset, RunningMean) and last and hooks.same_tensor(last[0], x, last[1]):
            return last[2]
        out = offset.quantize(name, x, quant.bits_from_spec(bits, x.shape[-2]))
        last[:] = [x, x._version, out]
        return out

    with hooks.input_hooks(hooks.select_modules(model, patterns), fn):
        yield


@dataclass
class Sweep:
    """Squared errors ``err[(layer, transform, bits)]`` and signals ``signal[layer]``, one value per
    window (float64 tensors of length n); ``types[layer]``: its layer type."""

    err: dict = field(default_factory=dict)
    signal: dict = field(default_factory=dict)
    types: dict = field(default_factory=dict)

    def layers(self, layer_type: str | tuple | None = None) -> list[str]:
        """The layers of ``layer_type`` (one type, a tuple of types, or ``None``: all)."""
        want = (layer_type,) if isinstance(layer_type, str) else layer_type
        names = [n for n in self.signal if want is None or self.types[n] in want]
        if not names:
            raise KeyError(f"no layer of type {layer_type!r}; types: {sorted(set(self.types.values()))}")
        return names

    def sqnr(self, transform: str, bits: str, layer_type: str | tuple | None = None) -> torch.Tensor:
        """SQNR (dB) per window over the layers (of ``layer_type``, or all)."""
        names = self.layers(layer_type)
        sig = sum(self.signal[n] for n in names)
        err = sum(self.err[n, transform, bits] for n in names)
        return torch.tensor([metrics.db(float(a), float(b)) for a, b in zip(sig, err)], dtype=torch.float64)

    def gain(self, transform: str, bits: str, base: tuple[str, str], layer_type: str | tuple | None = None) -> dict:
        """Paired SQNR difference (dB) of (transform, bits) over ``base`` = (transform, bits),
        t interval over windows (:func:`stamp_lib.core.stats.paired_difference`)."""
        return stats.paired_difference(self.sqnr(*base, layer_type), self.sqnr(transform, bits, layer_type),
                                       better="higher")


def sweep(acts: dict[str, torch.Tensor], transforms_: dict, bits: dict[str, torch.Tensor], *,
          layer_type: Callable[[str], str] = llama_layer_type) -> Sweep:
    """Quantize every input of ``acts`` ({name: (n, s, d)}) with every transform of ``transforms_``
    ({label: SequenceTransform or name -> SequenceTransform, or a :class:`StaticOffset` /
    :class:`RunningMean`}) at every bit vector of ``bits`` ({label: (s,) bits, or a spec such as
    ``"16x8+4"`` built for each input's own length}), window by window."""
    if not acts or not transforms_ or not bits:
        raise ValueError("sweep needs activations, transforms and bit vectors")
    out = Sweep()
    offs = {k: t for k, t in transforms_.items() if isinstance(t, _Offset)}
    for name, X in acts.items():
        ts = {k: _resolve(t, name) for k, t in transforms_.items() if k not in offs}
        bv = {b: quant.bits_from_spec(v, X.shape[-2]) if isinstance(v, (str, int)) else v for b, v in bits.items()}
        groups = _label_groups(bv)
        out.types[name] = layer_type(name)
        sig, errs = [], {(k, b): [] for k in transforms_ for b in bits}
        for x in X:
            for g in groups if ts else ():
                m = measure(x[None], ts, [bv[b] for b in g.values()])
                for k, mk in m.items():
                    for lab, b in g.items():
                        errs[k, b].append(mk.err[lab])
            for k, off in offs.items():
                for b, v in bv.items():
                    errs[k, b].append(float((off.quantize(name, x, v) - x).pow(2).sum(dtype=torch.float64)))
            sig.append(float(x.double().pow(2).sum()))
        out.signal[name] = torch.tensor(sig, dtype=torch.float64)
        for (k, b), e in errs.items():
            out.err[name, k, b] = torch.tensor(e, dtype=torch.float64)
    return out


def _label_groups(bits: dict[str, torch.Tensor]) -> list[dict[str, str]]:
    """measure() names a bit vector by :func:`quant.bits_label`: vectors that share a label
    (two-level on the first rows and on other rows, say) go to separate calls.
    Returns ``[{bits_label: our label}]``."""
    groups: list[dict[str, str]] = []
    for b, v in bits.items():
        lab = quant.bits_label(v)
        g = next((g for g in groups if lab not in g), None)
        if g is None:
            groups.append(g := {})
        g[lab] = b
    return groups


def made_of(acts: dict[str, torch.Tensor], calib: dict[str, torch.Tensor], bits: str, dwt, *,
            layer_type: Callable[[str], str] = llama_layer_type) -> Sweep:
    """The sweep behind "what the gain is made of": at the spec ``bits`` (rows per input's own
    length), the identity, the mean-token control, the static offset (fitted on ``calib``), the
    running mean, the DCT and ``dwt`` (a transform or name -> transform)."""
    ts = {"identity": transforms.build("identity"), "mean": transforms.build("mean"),
          "static": StaticOffset.fit(calib), "running": RunningMean(), "dct": transforms.build("dct"), "dwt": dwt}
    return sweep(acts, ts, {bits: bits}, layer_type=layer_type)


def hp_bits(s: int, ks, hp: int = 8, lp: int = 4) -> dict[str, torch.Tensor]:
    """``{"k": bits}``: the first k rows at ``hp`` bits, the rest at ``lp``, for every k of ``ks``
    (k = 0: uniform ``lp``); every k must be in [0, s]."""
    out = {}
    for k in ks:
        if not 0 <= int(k) <= s:
            raise ValueError(f"high-precision rows must be in [0, s={s}], got {k}")
        out[str(int(k))] = quant.two_level_bits(s, int(k), hp, lp) if k else torch.full((s,), lp, dtype=torch.long)
    return out


@torch.no_grad()
def energy_profile(acts: dict[str, torch.Tensor], transform) -> torch.Tensor:
    """Row energies (s,) of ``transform`` (a SequenceTransform or name -> SequenceTransform) on
    every input of ``acts``, each input normalised to unit total energy, summed over inputs."""
    if not acts:
        raise ValueError("no activations")
    total = None
    for name, X in acts.items():
        e = metrics.row_energy(_resolve(transform, name).forward(X))
        e = e / e.sum()
        total = e if total is None else total + e
    return total


def allocations(energy: torch.Tensor, hp_tokens: int, *, hp: int = 8, lp: int = 4, min_bits: int = 2) -> dict:
    """Three bit vectors with the same total for rows of calibration ``energy`` (s,): ``two-level``
    (first ``hp_tokens`` rows at ``hp``), ``energy-ranked`` (the ``hp_tokens`` rows of largest
    energy at ``hp``) and ``optimal`` (:func:`quant.optimal_bits` between ``min_bits`` and ``hp``)."""
    e = torch.as_tensor(energy, dtype=torch.float64).flatten()
    s = e.numel()
    two = quant.two_level_bits(s, hp_tokens, hp, lp)
    ranked = torch.full((s,), lp, dtype=torch.long)
    ranked[torch.argsort(e, descending=True, stable=True)[:hp_tokens]] = hp
    opt = quant.optimal_bits(e, float(two.double().mean()), min_bits=min_bits, max_bits=hp)
    assert int(opt.sum()) == int(two.sum()) == int(ranked.sum())
    return {"two-level": two, "energy-ranked": ranked, "optimal": opt}
