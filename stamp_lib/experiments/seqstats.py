r"""How far the practical sequence transforms are from the KLT on real activations (chapter 2).

The paper argues that the sequence autocorrelation :math:`S = E[X X^\top]/d` of real activations
is close to Toeplitz, so that the DCT (and its cheap cousins, WHT and Haar DWT) approximates the
KLT, the eigenbasis of S. This module measures that on captured activations.

Contract
--------
* Summaries of S (Toeplitz fraction, token-0 share) come from :mod:`stamp_lib.core.autocorr`;
  :class:`stamp_lib.core.transforms.TokenApart` keeps token 0 (the attention sink of LLMs) out of
  a transform of the other ``s - 1`` tokens.
* :func:`measure` (X, transforms, bits): for every transform, the row energies
  :math:`\sum \|l_i X\|^2`, and for every bit vector the measured STaMP error
  :math:`\|L^{-1}Q(LX) - X\|^2` and the Theorem 1 bound, all summed over the batch. One forward
  per transform, one fake-quant + inverse per bit vector, in chunks of ``batch`` samples. The
  bound is Theorem 1's formula evaluated on the row energies already computed (equal to
  ``bounds.theorem1``), the error is ``bounds.stamp_error`` without its second forward (the
  difference in the input dtype, the sum in float64); the tests check both equalities.
* :func:`llm_sequence_stats` and :func:`galaxy_sequence_stats` capture the inputs of the
  linear layers (``stamp_lib.model.capture``; q/k/v and gate/up share their input and are captured once),
  fit the KLT on calibration data (accumulated as :math:`\sum X X^\top`, never stored) and evaluate
  every transform on held-out data. They return one :class:`ModuleResult` per captured input.

Quantization is simulated (fake-quant in float: values rounded to the grid an integer kernel would
use and kept in float32), per token, asymmetric min-max, no clipping: the quantizer of Theorem 1.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from ..core import autocorr, bounds, metrics, quant, transforms
from ..core.autocorr import toeplitz_fraction, token0_fraction
from ..core.checks import as_sequence_tensor
from ..core.transforms import TokenApart
from ..model import capture, hooks

__all__ = [
    "Measured",
    "measure",
    "ModuleResult",
    "llama_layer_type",
    "layer_index",
    "llm_sequence_stats",
    "galaxy_capture",
    "galaxy_layer_type",
    "galaxy_sequence_stats",
    "galaxy_noised",
    "galaxy_samples",
]


# ----------------------------------------------------------------------------- measurement
@dataclass
class Measured:
    """Sums over a batch for one transform: ``energy`` (s,) row energies, ``signal`` = ||X||^2,
    ``err[label]`` measured squared error, ``bound[label]`` Theorem 1 right-hand side."""

    energy: torch.Tensor
    signal: float = 0.0
    err: dict = field(default_factory=dict)
    bound: dict = field(default_factory=dict)

    def profile(self) -> np.ndarray:
        """Cumulative fraction of the energy in the first k rows, k = 1..s."""
        return (torch.cumsum(self.energy, 0) / self.energy.sum()).numpy()

    def energy_at(self, k: int) -> float:
        s = self.energy.numel()
        if not 1 <= k <= s:
            raise ValueError(f"k must be in [1, s={s}], got {k}")
        return float(self.energy[:k].sum() / self.energy.sum())

    def sqnr(self, label: str) -> float:
        """Measured SQNR (dB) of the whole batch: 10 log10(||X||^2 / error)."""
        return metrics.db(self.signal, self.err[label])

    def bound_sqnr(self, label: str) -> float:
        """SQNR (dB) that Theorem 1 guarantees: 10 log10(||X||^2 / bound) (a lower bound)."""
        return metrics.db(self.signal, self.bound[label])


def _bits_dict(bits, s: int) -> dict[str, torch.Tensor]:
    """``{label: (s,) bit vector}`` from specs such as ``"4"`` / ``"64x8+4"`` or bit vectors."""
    if isinstance(bits, (str, int, torch.Tensor)):
        bits = [bits]
    out = {}
    for b in bits:
        vec = quant.bits_from_spec(b, s) if isinstance(b, str) else quant.check_bits(b, s)
        label = b if isinstance(b, str) else quant.bits_label(vec)
        out[label] = vec
    if not out:
        raise ValueError("no bit widths given")
    return out


@torch.no_grad()
def measure(X: torch.Tensor, transforms_: dict, bits, batch: int = 4, symmetric: bool = False,
            clip_ratio: float = 1.0) -> dict[str, Measured]:
    """Energy, measured error and Theorem 1 bound of every transform on ``X`` (n, s, d).

    ``transforms_``: ``{name: SequenceTransform}`` (orthogonal). ``bits``: a spec (``"4"``,
    ``"64x8+4"``), a bit vector, or a list of them; labels are the specs. Everything is summed over
    the n samples (processed ``batch`` at a time to bound memory). Per-token min-max fake
    quantization with ``symmetric`` / ``clip_ratio`` as in ``quant.fake_quant``."""
    X = as_sequence_tensor(X)
    X = X.reshape(-1, *X.shape[-2:])
    n, s, d = X.shape
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if not transforms_:
        raise ValueError("no transforms given")
    bitd = _bits_dict(bits, s)
    for name, T in transforms_.items():
        if not getattr(T, "orthogonal", True):
            raise ValueError(f"transform {name!r} is not orthogonal; Theorem 1 and this comparison need orthogonal L")
    coef = {k: bounds.theorem1_coefficients(b, d, symmetric) for k, b in bitd.items()}
    out = {name: Measured(energy=torch.zeros(s, dtype=torch.float64),
                          err={k: 0.0 for k in bitd}, bound={k: 0.0 for k in bitd}) for name in transforms_}
    for i in range(0, n, batch):
        xb = X[i:i + batch]
        sig = float(xb.double().pow(2).sum())
        for name, T in transforms_.items():
            m = out[name]
            Y = T.forward(xb)
            m.signal += sig
            e = metrics.row_energy(Y)  # ||l_i X||^2 summed over the batch, float64
            m.energy += e
            for label, b in bitd.items():
                m.bound[label] += float((coef[label] * e).sum())
                Xq = quant.stamp_fake_quant(xb, T, b, LX=Y, symmetric=symmetric, clip_ratio=clip_ratio)
                m.err[label] += float((Xq - xb).pow(2).sum(dtype=torch.float64))
    return out


# ----------------------------------------------------------------------------- per-module result
@dataclass
class ModuleResult:
    """Everything measured on the input of one linear layer (rows = the transform's rows).

    ``results`` maps a transform name to its :class:`Measured` on the evaluation data;
    ``levels`` the Haar levels used; ``S`` the evaluation autocorrelation E[X X^T]/d (kept only
    when asked). ``toeplitz*``: :func:`toeplitz_fraction` of S, of S without token 0 (LLMs only)
    and of the centred S (:func:`center_tokens`). ``zero_fraction``: share of exactly-zero entries
    of the evaluation activations (ReLU outputs are sparse). ``klt_insample_energy``: row energies of the in-sample KLT
    (its eigenvalues
    times the number of summed columns), available even when its quantization was skipped."""

    name: str
    layer: int
    layer_type: str
    s: int
    d: int
    n_calib: int
    n_eval: int
    token0_fraction: float
    toeplitz: float
    toeplitz_no_token0: float | None
    toeplitz_centered: float
    zero_fraction: float
    results: dict
    levels: dict
    S: torch.Tensor | None = None
    X: torch.Tensor | None = None
    klt_insample_energy: torch.Tensor | None = None

    def energy_at(self, transform: str, k: int) -> float:
        if transform == "klt (in-sample)" and transform not in self.results:
            e = self.klt_insample_energy
            return float(e[:k].sum() / e.sum())
        return self.results[transform].energy_at(k)

    def profile(self, transform: str) -> np.ndarray:
        if transform == "klt (in-sample)" and transform not in self.results:
            e = self.klt_insample_energy
            return (torch.cumsum(e, 0) / e.sum()).numpy()
        return self.results[transform].profile()


_autocorr = autocorr.sum_xxt  # sum of X X^T over samples and features, and the column count


def _klt_insample_energy(S_sum: torch.Tensor) -> torch.Tensor:
    """Row energies of the in-sample KLT: the eigenvalues of sum X X^T, decreasing (exact)."""
    return torch.linalg.eigvalsh(0.5 * (S_sum + S_sum.T)).flip(0).clamp_min(0)


def _module_result(name, layer, layer_type, X, S_cal_sum, n_cal, base: dict, bits, *, levels, grid=None,
                   insample_quant=True, keep_S=False, keep_X=False, batch=4, sink=True) -> ModuleResult:
    """Fit the KLT on the calibration sum, evaluate ``base`` transforms + KLTs on X."""
    n, s, d = X.shape
    S_ev_sum, cols = _autocorr(X)
    S_ev = S_ev_sum / cols
    ts = dict(base)
    ts["klt"] = transforms.KLT.from_autocorrelation(S_cal_sum)
    if insample_quant:
        ts["klt (in-sample)"] = transforms.KLT.from_autocorrelation(S_ev_sum)
    res = measure(X, ts, bits, batch=batch)
    if insample_quant:
        e_in = res["klt (in-sample)"].energy.clone()
    else:
        e_in = _klt_insample_energy(S_ev_sum)
    return ModuleResult(
        name=name, layer=layer, layer_type=layer_type, s=s, d=d, n_calib=n_cal, n_eval=n,
        token0_fraction=token0_fraction(S_ev),
        toeplitz=toeplitz_fraction(S_ev, grid),
        toeplitz_no_token0=toeplitz_fraction(S_ev, skip=1) if sink else None,
        toeplitz_centered=toeplitz_fraction(S_ev, grid, center=True),
        zero_fraction=float((X == 0).double().mean()),
        results=res, levels=dict(levels), S=S_ev.float() if keep_S else None,
        X=X.clone() if keep_X else None, klt_insample_energy=e_in,
    )


# ----------------------------------------------------------------------------- LLMs (LLaMA family)
_LLAMA_TYPES = {
    "self_attn.q_proj": "q/k/v", "self_attn.k_proj": "q/k/v", "self_attn.v_proj": "q/k/v",
    "self_attn.o_proj": "o", "mlp.gate_proj": "gate/up", "mlp.up_proj": "gate/up", "mlp.down_proj": "down",
}
_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\.")


def llama_layer_type(name: str) -> str:
    """``"q/k/v" | "o" | "gate/up" | "down"`` for a LLaMA-style linear name (q/k/v share their
    input, the normed hidden state; so do gate/up)."""
    for suffix, kind in _LLAMA_TYPES.items():
        if name.endswith(suffix):
            return kind
    raise ValueError(f"{name!r} is not a LLaMA attention/MLP projection (expected a suffix in {list(_LLAMA_TYPES)})")


def layer_index(name: str) -> int:
    """Block index in a module name such as ``model.layers.7.mlp.down_proj`` or ``blocks.2.x``."""
    m = _LAYER.search(name)
    if m is None:
        raise ValueError(f"no layer index in module name {name!r}")
    return int(m.group(1))


class _Stop(Exception):
    """Raised by a forward hook to end a forward pass early (after the last captured layer)."""


def _stop_after(module: torch.nn.Module):
    def hook(*_):
        raise _Stop

    return hooks.module_hook(module, hook, "post")


def _run_until_stop(model, batch):
    try:
        model(batch)
    except _Stop:
        pass


def llm_sequence_stats(model, calib_windows: torch.Tensor, eval_windows: torch.Tensor, layers, *,
                       hp_tokens: int = 64, bits=None, levels: int | None = None,
                       token_apart: bool = True, chunk_layers: int = 4, insample_quant: bool = True,
                       keep_S=(), keep_X=(), batch: int = 2, progress: bool = True) -> tuple[dict, dict]:
    """Per captured linear input of the given ``layers`` of a LLaMA-style causal LM.

    Calibration windows give :math:`\\sum X X^\\top` (streamed, never stored) and the held-out KLT;
    evaluation windows are kept (one chunk of ``chunk_layers`` layers at a time) and measured with
    identity, DCT, WHT (power-of-two s), Haar DWT with ``levels`` (default log2(s / hp_tokens), so
    that the approximation band is the high-precision rows), the KLT fitted on calibration data,
    the in-sample KLT (quantized only if ``insample_quant``; its energies always) and, if
    ``token_apart``, DCT/DWT with token 0 kept apart. Each forward pass stops after the last
    captured layer. ``bits`` defaults to uniform 4 bits and the two-level rule
    ``f"{hp_tokens}x8+4"``. Returns ``(results, aliases)``: ``{name: ModuleResult}`` for the canonical
    (first-called) module of every shared input, and ``{alias: canonical}`` (k/v -> q, up -> gate).
    ``keep_S`` / ``keep_X``: module names whose evaluation S / activations are kept in the result."""
    from tqdm.auto import tqdm


    for w, what in ((calib_windows, "calib_windows"), (eval_windows, "eval_windows")):
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != torch.long:
            raise ValueError(f"{what} must be a LongTensor (n, seq_len) of token ids (see stamp_lib.zoo.text.token_windows)")
    s = eval_windows.shape[1]
    if calib_windows.shape[1] != s:
        raise ValueError(f"calibration windows have {calib_windows.shape[1]} tokens, evaluation windows {s}")
    if not 1 <= hp_tokens <= s:
        raise ValueError(f"hp_tokens must be in [1, s={s}], got {hp_tokens}")
    layers = sorted(set(int(i) for i in layers))
    if bits is None:
        bits = ("4", f"{hp_tokens}x8+4")
    if levels is None:
        levels = transforms.haar_levels(s, hp_tokens)
    base = {"identity": transforms.build("identity"), "dct": transforms.build("dct")}
    if s & (s - 1) == 0:
        base["wht"] = transforms.build("wht")
    base["dwt"] = transforms.build("dwt", levels=levels)
    if token_apart:
        base["dct (token 0 apart)"] = TokenApart(transforms.build("dct"))
        base["dwt (token 0 apart)"] = TokenApart(transforms.build("dwt", levels=levels))
    out, aliases = {}, {}
    chunks = [layers[i:i + chunk_layers] for i in range(0, len(layers), chunk_layers)]
    for chunk in tqdm(chunks, desc="layer chunks", disable=None if progress and len(chunks) > 1 else True):
        pats = [f"*layers.{i}.*" for i in chunk]
        mods = hooks.select_modules(model, pats)
        last = mods[list(mods)[-1]]
        acal = autocorr.AutoCorrelation()
        with _stop_after(last):
            capture.capture_inputs(model, calib_windows, pats, keep=False, reduce=acal, forward=_run_until_stop,
                                   progress=progress)
            cap = capture.capture_inputs(model, eval_windows, pats, keep=True, forward=_run_until_stop,
                                         progress=progress)
        aliases.update(cap.aliases)
        for name in tqdm(list(cap.acts), desc="measure", leave=False, disable=None if progress else True):
            X = cap.acts.pop(name)
            out[name] = _module_result(
                name, layer_index(name), llama_layer_type(name), X, acal.sums.pop(name), len(calib_windows),
                base, bits, levels={"dwt": levels}, insample_quant=insample_quant,
                keep_S=name in keep_S, keep_X=name in keep_X, batch=batch)
            del X
    return out, aliases


# ----------------------------------------------------------------------------- galaxy score model
def galaxy_layer_type(name: str) -> str:
    """``"channel-mixing fc1"`` etc.: rows of channel-mixing inputs are tokens, rows of
    token-mixing inputs are channels."""
    m = re.fullmatch(r"blocks\.\d+\.(patch_mixer|hidden_mixer)\.(fc[12])", name)
    if m is None:
        raise ValueError(f"{name!r} is not a galaxy MLP-Mixer linear (blocks.<i>.patch_mixer|hidden_mixer.fc1|fc2)")
    return f"{'token' if m.group(1) == 'patch_mixer' else 'channel'}-mixing {m.group(2)}"


def galaxy_noised(y0: torch.Tensor, t: float, seed: int) -> torch.Tensor:
    """The network's input at time t for clean samples y0 (model space): the VP-SDE marginal
    :math:`y_t = e^{-t/2} y_0 + \\sigma_t \\epsilon`, with :math:`\\epsilon` from ``seed``."""
    from ..zoo import galaxy

    noise = galaxy.initial_noise(y0.shape[0], seed, tuple(y0.shape[1:]), y0.dtype)
    return galaxy.VPSDE().perturb(y0, t, noise)


def galaxy_capture(model, y0: torch.Tensor, t: float, noise_seed: int, **kw) -> capture.Captured:
    """:func:`stamp_lib.model.capture.capture_inputs` of every linear of the galaxy MLP-Mixer, run
    on the clean samples ``y0`` noised to diffusion time ``t`` (:func:`galaxy_noised` with
    ``noise_seed``); ``kw``: ``keep``, ``reduce``."""
    t = float(t)
    return capture.capture_inputs(model, [galaxy_noised(y0, t, noise_seed)], "*", forward=lambda m, y: m(y, t),
                                  progress=False, **kw)


def galaxy_sequence_stats(model, calib_y0: torch.Tensor, eval_y0: torch.Tensor, t: float, *,
                          hp_tokens=(4, 64), bits=("4", "4x8+4", "64x8+4"), token_hp: int = 4,
                          token_bits=("4", "4x8+4"), noise_seed: int = 0, insample_quant: bool = True,
                          keep_S=(), batch: int = 8, progress: bool = True) -> dict:
    """Per linear input of the galaxy MLP-Mixer at diffusion time ``t``.

    Inputs: clean samples ``calib_y0`` / ``eval_y0`` (n, C, H, W) in model space, noised to time t
    with :func:`galaxy_noised` (seeds ``noise_seed`` and ``noise_seed + 1``). Channel-mixing inputs
    (rows = the h x w patch tokens) get identity, 1-D DCT / WHT / Haar DWT on the row-major
    flattening (DWT levels log2(s / min(hp_tokens))), the 2-D Haar DWT over the grid
    (levels log2(sqrt(s / min(hp_tokens))): 3 on 16 x 16 leaves the 2 x 2 LL band), and the KLTs.
    Token-mixing inputs (rows = channels: no spatial order) get the 1-D transforms and the KLTs with
    ``token_hp`` high-precision rows and ``token_bits``. Returns ``{name: ModuleResult}``."""

    t = float(t)
    grid = (model.grid, model.grid)
    s_tok = model.grid ** 2
    k_min = min(hp_tokens)
    if s_tok % k_min or (s_tok // k_min) & (s_tok // k_min - 1):
        raise ValueError(f"min(hp_tokens)={k_min} must divide the {s_tok} tokens by a power of two")
    lv1 = transforms.haar_levels(s_tok, k_min)
    if lv1 % 2:
        raise ValueError(f"the 2-D Haar LL band cannot hold exactly {k_min} tokens of a {grid} grid")
    acal = autocorr.AutoCorrelation()
    galaxy_capture(model, calib_y0, t, noise_seed, keep=False, reduce=acal)
    cap = galaxy_capture(model, eval_y0, t, noise_seed + 1, keep=True)
    out = {}
    for name in list(cap.acts):
        X = cap.acts.pop(name)
        kind = galaxy_layer_type(name)
        s = X.shape[-2]
        if kind.startswith("channel"):
            base = {"identity": transforms.build("identity"), "dct": transforms.build("dct"),
                    "wht": transforms.build("wht"), "dwt": transforms.build("dwt", levels=lv1),
                    "dwt2d": transforms.build("dwt", levels=lv1 // 2, grid=grid)}
            lv, b, g = {"dwt": lv1, "dwt2d": lv1 // 2}, bits, grid
        else:
            lvt = transforms.haar_levels(s, token_hp)
            base = {"identity": transforms.build("identity"), "dct": transforms.build("dct"),
                    "wht": transforms.build("wht"), "dwt": transforms.build("dwt", levels=lvt)}
            lv, b, g = {"dwt": lvt}, token_bits, None
        out[name] = _module_result(name, layer_index(name), kind, X, acal.sums.pop(name), len(calib_y0), base, b,
                                   levels=lv, grid=g, insample_quant=insample_quant, keep_S=name in keep_S,
                                   batch=batch, sink=False)
    return out


def galaxy_samples(model, n: int, seed: int, steps: int = 16, name: str = "hsc_ScoreNet64",
                   progress: bool = True) -> torch.Tensor:
    """``n`` clean samples (model space, (n, C, H, W)) of the galaxy model from its own
    probability-flow sampler (``galaxy.sample``: Heun, sqrt-spaced grid, ``steps`` steps, initial
    noise from ``seed``). Deterministic; cached in ``cache_dir("galaxy-samples")`` under a
    key of (name, n, seed, steps), so a second run does not sample again."""
    from ..core.io import atomic_write, cache_dir
    from ..zoo import galaxy

    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    path = cache_dir("galaxy-samples") / f"{name}-n{n}-seed{seed}-heun{steps}.pt"
    if path.is_file():
        try:
            y = torch.load(path)
            if y.shape[0] == n:
                return y
        except Exception:  # a partial file: sample again
            pass
    y = galaxy.sample(model, n=n, steps=steps, seed=seed, progress=progress).y
    buf = io.BytesIO()
    torch.save(y, buf)
    atomic_write(path, buf.getvalue())
    return y
