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

Quantization is simulated (fake quantization in float32): errors, not speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core import metrics, quant, stats, transforms
from ..model import capture
from .seqstats import llama_layer_type, measure

__all__ = ["capture_llm", "Sweep", "sweep", "hp_bits", "energy_profile", "allocations", "klt_per_layer"]


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


@dataclass
class Sweep:
    """Squared errors ``err[(layer, transform, bits)]`` and signals ``signal[layer]``, one value per
    window (float64 tensors of length n); ``types[layer]``: its layer type."""

    err: dict = field(default_factory=dict)
    signal: dict = field(default_factory=dict)
    types: dict = field(default_factory=dict)

    def layers(self, layer_type: str | None = None) -> list[str]:
        names = [n for n in self.signal if layer_type is None or self.types[n] == layer_type]
        if not names:
            raise KeyError(f"no layer of type {layer_type!r}; types: {sorted(set(self.types.values()))}")
        return names

    def sqnr(self, transform: str, bits: str, layer_type: str | None = None) -> torch.Tensor:
        """SQNR (dB) per window over the layers (of ``layer_type``, or all)."""
        names = self.layers(layer_type)
        sig = sum(self.signal[n] for n in names)
        err = sum(self.err[n, transform, bits] for n in names)
        return torch.tensor([metrics.db(float(a), float(b)) for a, b in zip(sig, err)], dtype=torch.float64)

    def gain(self, transform: str, bits: str, base: tuple[str, str], layer_type: str | None = None) -> dict:
        """Paired SQNR difference (dB) of (transform, bits) over ``base`` = (transform, bits),
        t interval over windows (:func:`stamp_lib.core.stats.paired_difference`)."""
        return stats.paired_difference(self.sqnr(*base, layer_type), self.sqnr(transform, bits, layer_type),
                                       better="higher")


def sweep(acts: dict[str, torch.Tensor], transforms_: dict, bits: dict[str, torch.Tensor], *,
          layer_type: Callable[[str], str] = llama_layer_type) -> Sweep:
    """Quantize every input of ``acts`` ({name: (n, s, d)}) with every transform of ``transforms_``
    ({label: SequenceTransform or name -> SequenceTransform}) at every bit vector of ``bits``
    ({label: (s,) bits}), window by window."""
    if not acts or not transforms_ or not bits:
        raise ValueError("sweep needs activations, transforms and bit vectors")
    # measure() names a bit vector by quant.bits_label: vectors that share a label (two-level on
    # the first rows and on other rows, say) go to separate calls
    groups: list[dict[str, str]] = []  # [{bits_label: our label}]
    for b, v in bits.items():
        lab = quant.bits_label(v)
        g = next((g for g in groups if lab not in g), None)
        if g is None:
            groups.append(g := {})
        g[lab] = b
    out = Sweep()
    for name, X in acts.items():
        ts = {k: _resolve(t, name) for k, t in transforms_.items()}
        out.types[name] = layer_type(name)
        sig, errs = [], {(k, b): [] for k in ts for b in bits}
        for x in X:
            for g in groups:
                m = measure(x[None], ts, [bits[b] for b in g.values()])
                for k, mk in m.items():
                    for lab, b in g.items():
                        errs[k, b].append(mk.err[lab])
            sig.append(mk.signal)
        out.signal[name] = torch.tensor(sig, dtype=torch.float64)
        for (k, b), e in errs.items():
            out.err[name, k, b] = torch.tensor(e, dtype=torch.float64)
    return out


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
