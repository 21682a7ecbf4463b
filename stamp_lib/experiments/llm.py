r"""The language-model experiment (the paper's Table 2): W4A4KV4 perplexity with and without STaMP.

Rows of the table are *methods*, each a :class:`~stamp_lib.model.recipe.Recipe` over every attention and
MLP projection (``model.layers.*``; the embeddings and ``lm_head`` stay in full precision):

==============  ==================================================================================
``fp``          no quantization (the dequantized checkpoint itself).
``rtn``         W4 per-output-channel symmetric round-to-nearest; A4 per-token asymmetric min-max.
``smoothquant`` as ``rtn`` after per-channel smoothing :math:`X\,\mathrm{diag}(s)^{-1}`,
                :math:`\mathrm{diag}(s) W` with :math:`s_j = \max|X_j|^\alpha / \max|W_j|^{1-\alpha}`
                from calibration windows (Xiao et al., 2023).
``quarot``      a real orthogonal Hadamard rotation of every linear layer's input features, the
                weight rotated and *then* quantized (RTN or GPTQ). QuaRot (Ashkboos et al., 2024)
                instead fuses one rotation of the residual stream into the norms and embeddings
                and adds online Hadamards only before ``down_proj`` and inside attention; here each
                layer is rotated on its own (an online rotation per layer), which quantizes the
                same kind of rotated activations but is not the same network transformation.
==============  ==================================================================================

Every quantized row is *bit-matched*: the baseline keeps its first ``hp_tokens`` (untransformed)
tokens at ``hp_bits`` (as the paper did), and STaMP keeps its first ``hp_tokens`` *transformed*
rows at ``hp_bits`` (Haar DWT with ``levels``, or DCT/WHT). Keys (after RoPE) and values are
quantized per token and head with the same two-level rule (``kv_bits``), with or without the
sequence transform (``kv_stamp``; the paper does not say).

Perplexity follows the quantization papers' protocol: the evaluation text concatenated, cut into
non-overlapping windows of ``seq_len`` tokens (tail dropped), each window scored on its own, mean
next-token NLL over all tokens, exp. Because quantized small models are numerically fragile, every
number is reported with its spread over windows and STaMP is compared *paired* on the same windows.

The sequence transform mixes the tokens of a window before they are quantized, so the output at
position i can depend on tokens after i: these perplexities are not strictly causal.

Command line (one table cell)::

    python -m stamp_lib llm --model smollm2-135m --method quarot --weights gptq --stamp dwt --kv-bits 4 --windows 8
    python -m stamp_lib llm --model meta-llama/Meta-Llama-3-8B --device-map auto --method rtn --stamp dwt

The forward-speed benchmark is ``python -m stamp_lib bench llm``.

Quantization is simulated (fake quantization in floating point).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import metrics, stats, transforms
from ..core.io import results_dir, write_json
from ..methods import FEATURE_OF
from ..methods import LLM_BASELINES as METHODS
from ..model import recipe as rcp
from ..model.recipe import ActQuant, Recipe, Rule, WeightQuant
from ..zoo import models, text

__all__ = ["METHODS", "LINEARS", "llm_recipe", "Eval", "evaluate", "paired", "eval_data", "load", "main"]

STAMPS = ("none", "dwt", "dct", "wht")
LINEARS = "model.layers.*"


def llm_recipe(method: str, *, weights: str = "rtn", stamp: str | None = None, levels: int | None = None,
               seq_len: int = 2048, a_bits: int = 4, w_bits: int = 4, kv_bits: int | None = 4, hp_tokens: int = 64,
               hp_bits: int = 8, kv_stamp: bool = False, alpha: float = 0.5, patterns=LINEARS) -> Recipe:
    """The recipe of one Table 2 cell (see the module docstring). ``stamp``: ``None``/``"none"``
    (bit-matched baseline) or a sequence transform; ``kv_bits=None`` leaves K/V in full precision.
    ``levels`` (Haar): default :func:`stamp_lib.core.transforms.haar_levels` of ``seq_len`` (the
    approximation band is the high-precision rows)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    stamp = None if stamp in (None, "none", "identity") else stamp
    if stamp is not None and stamp not in STAMPS:
        raise ValueError(f"unknown STaMP transform {stamp!r}; choose one of {STAMPS}")
    name = f"{method}" + ("" if method == "fp" else f"/{weights}") + (f"+stamp-{stamp}" if stamp else "")
    if method == "fp":
        return Recipe((Rule(patterns),), name=name)
    tr = stamp or "identity"
    lv = (levels or transforms.haar_levels(seq_len, hp_tokens)) if tr == "dwt" else None
    act = ActQuant(bits=f"{hp_tokens}x{hp_bits}+{a_bits}", transform=tr, levels=lv)
    kv = None
    if kv_bits:
        ktr = tr if kv_stamp else "identity"
        kv = ActQuant(bits=f"{hp_tokens}x{hp_bits}+{kv_bits}", transform=ktr, levels=lv if ktr == "dwt" else None)
    rule = Rule(patterns, act=act, weight=WeightQuant(bits=w_bits, method=weights), feature=FEATURE_OF[method],
                alpha=alpha)
    return Recipe((rule,), kv=kv, name=name)


@dataclass
class Eval:
    """Per-window mean NLL (nats) of one recipe, with its knobs and the bits actually spent."""

    nll: torch.Tensor
    knobs: dict
    act_bits: float = float("nan")
    kv_bits: float = float("nan")
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mean_nll(self) -> float:
        return float(self.nll.mean())

    @property
    def se_nll(self) -> float:
        """Standard error of the mean NLL over windows (0 for one window)."""
        se = stats.mean_se(self.nll)[1]
        return 0.0 if math.isnan(se) else se

    @property
    def ppl(self) -> float:
        return math.exp(self.mean_nll)

    def ppl_range(self) -> tuple[float, float]:
        """exp(mean NLL -/+ one standard error)."""
        return math.exp(self.mean_nll - self.se_nll), math.exp(self.mean_nll + self.se_nll)

    def summary(self) -> dict:
        lo, hi = self.ppl_range()
        return {"ppl": self.ppl, "ppl_lo": lo, "ppl_hi": hi, "mean_nll": self.mean_nll, "se_nll": self.se_nll,
                "nll_per_window": self.nll.tolist(), "act_bits_spent": self.act_bits,
                "kv_bits_spent": self.kv_bits, "seconds": round(self.seconds, 2), **self.extra}


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, recipe: Recipe, prepared: rcp.Prepared | None = None, *,
             calib=None, batch_size: int = 1, progress: bool = True) -> Eval:
    """Per-window NLL of ``model`` under ``recipe`` (see :func:`stamp_lib.zoo.models.window_nll`)."""
    hp = max([r.act.hp_tokens for r in recipe.rules if r.act] + [recipe.kv.hp_tokens if recipe.kv else 0])
    if hp > windows.shape[1]:
        raise ValueError(f"{hp} high-precision tokens do not fit windows of s={windows.shape[1]} tokens")
    t0 = time.perf_counter()
    with rcp.apply(model, recipe, prepared, calib, progress=progress) as st:
        nll = models.window_nll(model, windows, batch_size=batch_size, progress=progress)
    return Eval(nll=nll, knobs=recipe.knobs(), act_bits=st.average_bits("act"), kv_bits=st.average_bits("kv"),
                seconds=time.perf_counter() - t0)


def paired(base: Eval, other: Eval) -> dict:
    """Paired comparison on the same windows: mean NLL difference (other - base, nats; negative =
    ``other`` better) with its standard error, the perplexity ratio, and windows where ``other`` wins."""
    if base.nll.shape != other.nll.shape:
        raise ValueError("paired comparison needs the same windows")
    p = stats.paired_difference(base.nll, other.nll, better="lower")
    return {"delta_nll": p["mean"], "se_delta_nll": p["se"], "ci95_lo": p["ci_lo"], "ci95_hi": p["ci_hi"],
            "ppl_ratio": math.exp(p["mean"]), "wins": p["wins"], "n": p["n"], "beyond_2se": p["beyond_2se"],
            "beyond_ci95": p["beyond_ci"]}


ROWS = (("rtn", "rtn"), ("smoothquant", "rtn"), ("quarot", "rtn"), ("quarot", "gptq"))
COLUMNS = ("none", "dwt", "dct")


# The paper's Table 2 (W4A4KV4, WikiText-2 perplexity, 2048-token windows; without -> with STaMP),
# as collected in shared/paper-notes.md. FlatQuant (learned transforms) is out of scope here.
PAPER_MODELS = ("Llama-3-8B", "Llama-3.2-1B-it", "Llama-3.2-3B-it", "Qwen-2.5-3B-it")
PAPER_TABLE2 = {
    "fp": (6.14, 13.16, 11.27, 8.56),
    "rtn": ((668, 95.3), (1795, 700), (483, 159), (99723, 18767)),
    "smoothquant": ((531, 93.8), (883, 407), (177, 88.5), (66929, 29063)),
    "quarot": ((9.05, 8.66), (25.78, 23.72), (18.43, 17.57), (94.86, 71.13)),
    "flatquant": ((6.89, 6.77), (15.72, 15.16), (12.71, 12.40), (9.29, 9.19)),
}


def _column(col: str) -> dict:
    """A table column name -> recipe keywords: ``"none"`` (bit-matched baseline), a transform, or
    ``"<transform>+kv"`` (the sequence transform on keys and values too)."""
    stamp, _, kv = col.partition("+")
    if kv not in ("", "kv"):
        raise ValueError(f"bad column {col!r}: use 'none', a transform, or '<transform>+kv'")
    return {"stamp": stamp, "kv_stamp": kv == "kv"}


@dataclass
class Table:
    """The Table 2 analog: ``fp`` and ``cells[(method, weights)][column]`` (:class:`Eval`), all on
    the same windows; ``knobs`` holds the shared settings."""

    fp: Eval
    cells: dict
    knobs: dict

    def paired(self, row, column: str, base: str = "none") -> dict:
        return paired(self.cells[row][base], self.cells[row][column])


def run_table(model, eval_windows: torch.Tensor, calib_windows: torch.Tensor | None, rows=ROWS, columns=COLUMNS, *,
              batch_size: int = 1, progress: bool = True, **recipe_kw) -> Table:
    """Evaluate every ``(method, weights)`` row in every column on the same windows. One preparation
    per row (calibration, smoothing, rotation, GPTQ) serves all its columns."""
    from tqdm.auto import tqdm

    seq_len = eval_windows.shape[1]
    recipe_kw.setdefault("seq_len", seq_len)
    fp = evaluate(model, eval_windows, llm_recipe("fp"), progress=False)
    cells = {}
    jobs = [(row, col) for row in rows for col in columns]
    bar = tqdm(total=len(jobs), desc="table cells", disable=not progress)
    for row in rows:
        method, weights = row
        base = llm_recipe(method, weights=weights, **recipe_kw)
        prep = rcp.prepare(model, base, calib_windows if base.needs_calibration() else None, progress=False)
        cells[row] = {}
        for col in columns:
            r = llm_recipe(method, weights=weights, **{**recipe_kw, **_column(col)})
            cells[row][col] = evaluate(model, eval_windows, r, prep, batch_size=batch_size, progress=False)
            bar.update(1)
    bar.close()
    knobs = {"seq_len": seq_len, "windows": int(eval_windows.shape[0]),
             "calib_windows": 0 if calib_windows is None else int(calib_windows.shape[0]),
             "recipe_example": llm_recipe(rows[0][0], weights=rows[0][1], **{**recipe_kw, "stamp": "dwt"}).knobs(),
             **{k: v for k, v in recipe_kw.items()}}
    return Table(fp=fp, cells=cells, knobs=knobs)


@torch.no_grad()
def layer_sqnr(model, window: torch.Tensor, recipe: Recipe, prepared: rcp.Prepared | None = None) -> dict:
    """SQNR (dB) of every quantized linear input on one forward: ``10 log10(||x R||^2 / ||x R - x_hat||^2)``
    in the basis it is quantized in (each layer's own input, as perturbed by the layers before)."""
    out = {}

    def obs(name, xr, xh):
        out[name] = metrics.sqnr_db(xr.double(), xh.double())

    with rcp.apply(model, recipe, prepared, observe=obs, progress=False):
        model(window.reshape(1, -1))
    return out


def eval_data(tokenizer, seq_len: int, n_eval: int, n_calib: int = 0):
    """``(eval_windows, calib_windows)`` from the Wikipedia evaluation / calibration splits (disjoint
    by article; :mod:`stamp_lib.zoo.text`)."""
    calib_articles, eval_articles = text.wiki_split()
    ev = text.token_windows(tokenizer, eval_articles, seq_len, n_eval)
    cal = text.token_windows(tokenizer, calib_articles, seq_len, n_calib) if n_calib else None
    return ev, cal


def load(name: str, device: str | None = None, device_map: str | None = None, dtype: str = "float32"):
    """``(model, tokenizer)``: ``smollm2-135m``, ``gemma3-270m`` (packaged here), a local folder or a
    Hugging Face id present in the local cache (e.g. ``meta-llama/Meta-Llama-3-8B``)."""
    dt = getattr(torch, dtype)
    model, tok = models.load_causal_lm(name, dt, device_map=device_map)
    if device and not device_map:
        model.to(device)
    return model, tok


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stamp_lib llm", description=(
        "W4A4KV4 perplexity of one Table 2 cell (fake quantization). Prints the perplexity with its "
        "spread over windows and writes a results file with every knob."))
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | gemma3-270m | local folder | HF id in the cache")
    p.add_argument("--method", default="rtn", choices=METHODS)
    p.add_argument("--weights", default="rtn", choices=rcp.WEIGHT_METHODS)
    p.add_argument("--stamp", default="none", choices=STAMPS, help="sequence transform (none = bit-matched baseline)")
    p.add_argument("--levels", type=int, default=None,
                   help="Haar levels for --stamp dwt (default log2(seq_len / hp_tokens): 5 at 2048 / 64)")
    p.add_argument("--a-bits", type=int, default=4)
    p.add_argument("--w-bits", type=int, default=4)
    p.add_argument("--kv-bits", type=int, default=4, help="0 leaves K/V in full precision")
    p.add_argument("--kv-stamp", action="store_true", help="apply the sequence transform to K/V too")
    p.add_argument("--hp-tokens", type=int, default=64)
    p.add_argument("--hp-bits", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--windows", type=int, default=8, help="evaluation windows")
    p.add_argument("--calib-windows", type=int, default=8, help="calibration windows (SmoothQuant, GPTQ)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None, help="e.g. cuda")
    p.add_argument("--device-map", default=None, help='e.g. "auto" for a large checkpoint on GPUs')
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--out", default=None, help="results file (JSON); default data/results/llm/<model>-<recipe>.json")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = _parser().parse_args(argv)
    r = llm_recipe(a.method, weights=a.weights, stamp=a.stamp, levels=a.levels, seq_len=a.seq_len, a_bits=a.a_bits,
                   w_bits=a.w_bits,
                   kv_bits=a.kv_bits or None, hp_tokens=a.hp_tokens, hp_bits=a.hp_bits, kv_stamp=a.kv_stamp,
                   alpha=a.alpha)
    if a.hp_tokens > a.seq_len:
        raise SystemExit(f"--hp-tokens {a.hp_tokens} > --seq-len {a.seq_len}")
    t0 = time.perf_counter()
    model, tok = load(a.model, a.device, a.device_map, a.dtype)
    ev, cal = eval_data(tok, a.seq_len, a.windows, a.calib_windows if r.needs_calibration() else 0)
    dev = next(model.parameters()).device
    prep = rcp.prepare(model, r, None if cal is None else cal.to(dev), progress=not a.no_progress)
    res = evaluate(model, ev.to(dev), r, prep, batch_size=a.batch_size, progress=not a.no_progress)
    lo, hi = res.ppl_range()
    print(f"{a.model} {r.name} W{a.w_bits}A{a.a_bits}KV{a.kv_bits or 16}: perplexity {res.ppl:.4g} "
          f"(mean NLL {res.mean_nll:.4f} +- {res.se_nll:.4f} s.e. over {a.windows} windows of {a.seq_len} tokens; "
          f"exp(mean +- s.e.) = [{lo:.4g}, {hi:.4g}]); bits spent: activations {res.act_bits:.4f}, KV {res.kv_bits:.4f}")
    out = {"model": a.model, "recipe": r.knobs(), "eval": res.summary(), "seq_len": a.seq_len, "windows": a.windows,
           "calib_windows": a.calib_windows if r.needs_calibration() else 0, "seed": 0, "dtype": a.dtype,
           "protocol": "non-overlapping windows of the evaluation split, tail dropped, mean token NLL, exp",
           "simulated": "fake quantization in floating point", "wall_s": round(time.perf_counter() - t0, 1)}
    path = Path(a.out) if a.out else results_dir() / "llm" / f"{a.model.replace('/', '_')}-{r.name.replace('/', '_').replace('+', '_')}.json"
    write_json(path, out)
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
