r"""The language-model experiment (the paper's Table 2): W4A4KV4 perplexity with and without STaMP.

Rows of the table are *methods*, each a :class:`~stamp_lib.model.recipe.Recipe` over every attention and
MLP projection (``model.layers.*``; the embeddings and ``lm_head`` stay in full precision):

==============  ==================================================================================
``fp``          no quantization (the dequantized checkpoint itself).
``rtn``         W4 per-output-channel symmetric round-to-nearest; A4 per-token asymmetric min-max.
``smoothquant`` as ``rtn`` after per-channel smoothing :math:`X\,\mathrm{diag}(s)^{-1}`,
                :math:`\mathrm{diag}(s) W` with :math:`s_j = \max|X_j|^\alpha / \max|W_j|^{1-\alpha}`
                from calibration windows (Xiao et al., 2023).
``quarot``      QuaRot as published (Ashkboos et al., 2024; :mod:`stamp_lib.model.quarot`): the norms'
                scales fused into the next linears, a randomized Hadamard rotation of the residual
                stream (seed ``hadamard_seed``) fused into embeddings, every linear and ``lm_head``,
                an online Hadamard before ``down_proj``, head-wise Hadamards on V / ``o_proj`` and
                on Q / K after RoPE; the rotated weights quantized (RTN or GPTQ). Where the
                architecture forbids fusing the residual rotation (Gemma-3's post-norms), every
                linear's input is rotated online instead, and the plan says so.
``flatquant``   FlatQuant (Sun et al., 2025; :mod:`stamp_lib.model.flatquant`): learnable Kronecker
                affine transforms, per-channel scales and clipping, calibrated block by block on
                the calibration windows (``flatquant=dict(epochs=..., batch_size=...)``; seed
                ``hadamard_seed`` for their random start); its own quantizers (symmetric per-token
                activations, asymmetric K/V, learned clipping), RTN weights with learned clipping.
                With STaMP the sequence transform and the per-row bits wrap FlatQuant's quantizer.
``hadamard``    the per-linear variant: an online Hadamard (random signs from ``hadamard_seed``)
                on every linear layer's input, folded into that layer's weight before it is
                quantized. It quantizes the same kind of rotated activations, but is not QuaRot's
                network transformation.
==============  ==================================================================================

Columns (:data:`COLUMNS`): ``uniform`` (every token at ``a_bits``, 4.0 bits), and three
*bit-matched* ones: the baseline keeps its first ``hp_tokens`` (untransformed) tokens at
``hp_bits`` (as the paper did), and STaMP keeps its first ``hp_tokens`` *transformed* rows at
``hp_bits`` (Haar DWT with ``levels``, or DCT/WHT). What is random in a row (QuaRot's seed,
SmoothQuant's and GPTQ's calibration windows) is drawn ``draws`` times (:func:`run_table`), and
every comparison is paired on (draw, window) with a t interval of the crossed design
(:func:`stamp_lib.core.stats.crossed_difference`). Keys (after RoPE) and values are
quantized per token and head with the same two-level rule (``kv_bits``), with or without the
sequence transform (``kv_stamp``; the paper does not say).

Perplexity follows the quantization papers' protocol: the evaluation text concatenated, cut into
non-overlapping windows of ``seq_len`` tokens (tail dropped), each window scored on its own, mean
next-token NLL over all tokens, exp. Because quantized small models are numerically fragile, every
number is reported with its spread over windows and STaMP is compared *paired* on the same windows.

The sequence transform mixes the tokens of a window before they are quantized, so the output at
position i can depend on tokens after i: these perplexities are not strictly causal.

Command line (one table cell)::

    python -m stamp_lib llm --model smollm2-135m --method quarot --weights gptq --stamp dwt --kv-bits 4 --windows 8 --draw 1
    python -m stamp_lib llm --model meta-llama/Meta-Llama-3-8B --device-map auto --method rtn --stamp dwt
    python -m stamp_lib llm --model meta-llama/Meta-Llama-3-8B --device cuda --dtype bfloat16 --dataset wikitext2 \
        --windows all --method quarot --weights gptq --gptq-sequential --calib-windows 128 --stamp dwt

Data: ``--dataset wiki`` (default) is the Wikipedia stand-in above; ``--dataset wikitext2`` is the
papers' WikiText-2 (``wikitext-2-raw-v1`` through the ``datasets`` package, or a local copy with
``--dataset-path``; :mod:`stamp_lib.zoo.text`): evaluation on the test split joined with blank
lines, tokenized once and cut into non-overlapping windows (``--windows all``: every one, as the
papers report), calibration on ``--calib-windows`` random windows of the train split drawn as
GPTQ's ``get_wikitext2`` draws them (seed ``--draw``). GPTQ's knobs: ``--gptq-damp`` (0.01),
``--gptq-act-order``, ``--gptq-sequential`` (layer by layer, GPTQ's and QuaRot's order, one
Hessian held at a time: see :class:`~stamp_lib.model.recipe.WeightQuant`). ``--calib-windows``
stays 8 by default for every model (the built-in small models on a CPU); the paper's 128 windows
of 2048 tokens are spelled out in the runbook's commands
(:func:`stamp_lib.experiments.runbook.table2_commands`) rather than hidden behind a default that
would depend on the model's name.

Bad arguments are refused before anything loads, with one line and exit status 2
(:mod:`stamp_lib.experiments.cli`); ``--quiet`` prints only the result line. The results file
records what ran (Haar levels, bits spent, device, dtype, torch threads) and ``command``, the
exact command line (every option spelled out) that reruns the cell.

Resuming: every finished cell is kept in a store (:mod:`stamp_lib.core.cells`; ``--cells``, default
``data/cache/cells/llm``), keyed by the model's weights, the windows, every knob and the library's
code. A rerun of the same cell (a table of cells run one command at a time, after an interruption)
reuses it without evaluating (``--resume``, the default); ``--no-resume`` computes it again. The
results file records ``cells``: how many were computed and reused. :func:`run_table` does the same
per ``(row, column)`` with ``store=`` (or ``STAMP_RESUME=1``).

The forward-speed benchmark is ``python -m stamp_lib bench llm``.

Quantization is simulated (fake quantization in floating point).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core import cells as cellstore
from ..core import metrics, stats, transforms
from ..core.io import results_dir, write_json
from ..methods import FEATURE_OF
from ..methods import LLM_BASELINES as METHODS
from ..model import recipe as rcp
from ..model.flatquant import FlatQuantConfig
from ..model.recipe import ActQuant, Recipe, Rule, WeightQuant
from ..zoo import models, text
from . import cli

__all__ = ["METHODS", "LINEARS", "llm_recipe", "Eval", "evaluate", "paired", "eval_data", "load", "main"]

STAMPS = ("none", "dwt", "dct", "wht")
LINEARS = "model.layers.*"
DATASETS = ("wiki", "wikitext2")


def llm_recipe(method: str, *, weights: str = "rtn", stamp: str | None = None, levels: int | None = None,
               seq_len: int = 2048, a_bits: int = 4, w_bits: int = 4, kv_bits: int | None = 4, hp_tokens: int = 64,
               hp_bits: int = 8, kv_stamp: bool = False, alpha: float = 0.5, hadamard_seed: int | None = 0,
               patterns=LINEARS, flatquant: dict | None = None, gptq_act_order: bool = False,
               gptq_damp: float = 0.01, gptq_sequential: bool = False) -> Recipe:
    """The recipe of one Table 2 cell (see the module docstring). ``stamp``: ``None``/``"none"``
    (bit-matched baseline) or a sequence transform; ``hp_tokens=0``: uniform ``a_bits`` (and
    ``kv_bits``) on every token, no high-precision rows; ``kv_bits=None`` leaves K/V in full
    precision. ``levels`` (Haar): default :func:`stamp_lib.core.transforms.haar_levels` of
    ``seq_len`` (the approximation band is the high-precision rows). ``hadamard_seed``: the random
    signs of QuaRot's residual rotation (``quarot``) or of the per-linear rotations (``hadamard``);
    ``None``: a plain Hadamard; for ``flatquant`` the seed of its transforms' random start.
    ``flatquant``: :class:`~stamp_lib.model.flatquant.FlatQuantConfig` options (``epochs``,
    ``batch_size``, ``lr``, ``alpha``, ``lwc``, ``lac``); the published ones by default.
    ``gptq_act_order``, ``gptq_damp``, ``gptq_sequential``: GPTQ's column order, damping and
    layer-by-layer calibration (:class:`~stamp_lib.model.recipe.WeightQuant`); used with
    ``weights="gptq"`` only (the RTN rows' recipes are the same whatever they are)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    stamp = None if stamp in (None, "none", "identity") else stamp
    if stamp is not None and stamp not in STAMPS:
        raise ValueError(f"unknown STaMP transform {stamp!r}; choose one of {STAMPS}")
    seeded = method in ("quarot", "hadamard", "flatquant")
    name = (f"{method}" + ("" if method == "fp" else f"/{weights}")
            + (f"-seed{hadamard_seed}" if seeded and hadamard_seed is not None else "")
            + ("/uniform" if method != "fp" and not hp_tokens else "") + (f"+stamp-{stamp}" if stamp else ""))
    if method == "fp":
        return Recipe((Rule(patterns),), name=name)
    tr = stamp or "identity"
    lv = (levels or transforms.haar_levels(seq_len, max(hp_tokens, 1))) if tr == "dwt" else None

    def bits(low):
        return f"{hp_tokens}x{hp_bits}+{low}" if hp_tokens else low

    act = ActQuant(bits=bits(a_bits), transform=tr, levels=lv)
    kv = None
    if kv_bits:
        ktr = tr if kv_stamp else "identity"
        kv = ActQuant(bits=bits(kv_bits), transform=ktr, levels=lv if ktr == "dwt" else None)
    gkw = dict(act_order=gptq_act_order, damp=gptq_damp, sequential=gptq_sequential) if weights == "gptq" else {}
    weight = WeightQuant(bits=w_bits, method=weights, **gkw)
    if method == "quarot":
        rule = Rule(patterns, act=act, weight=weight)
        return Recipe((rule,), kv=kv, name=name, network="quarot", network_seed=hadamard_seed)
    if method == "flatquant":
        cfg = FlatQuantConfig(w_bits=w_bits, a_bits=a_bits, kv_bits=kv_bits, seed=hadamard_seed or 0,
                              **(flatquant or {}))
        return Recipe((Rule(patterns, act=act, weight=weight),), kv=kv, name=name, network="flatquant",
                      network_config=cfg)
    rule = Rule(patterns, act=act, weight=weight, feature=FEATURE_OF[method], alpha=alpha,
                hadamard_seed=hadamard_seed if method == "hadamard" else None)
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


def _cell_key(model_fp: str, windows: torch.Tensor, calib, recipe: Recipe, batch_size: int) -> dict:
    """The key of one evaluation cell: the model's weights, the windows (and the calibration
    windows when the recipe uses them), the recipe's knobs and the batch size."""
    import transformers

    needs = recipe.needs_calibration()
    return {"experiment": "llm", "model": model_fp, "windows": cellstore.fingerprint(windows),
            "calib": cellstore.fingerprint(calib) if needs else None, "recipe": recipe.knobs(),
            "batch_size": batch_size, "transformers": transformers.__version__, "numerics": rcp.numerics()}


def _keyable(recipe: Recipe, prepared, calib) -> bool:
    """Whether a cell can be keyed: a calibrated recipe given only a preparation (no calibration
    windows to fingerprint) cannot be, and is computed without a store."""
    return not (recipe.needs_calibration() and prepared is not None and calib is None)


def _eval_value(e: "Eval") -> dict:
    return {"nll": e.nll, "act_bits": e.act_bits, "kv_bits": e.kv_bits, "seconds": e.seconds, "extra": e.extra}


def _eval_from(v: dict, recipe: Recipe) -> "Eval":
    return Eval(nll=v["nll"], knobs=recipe.knobs(), act_bits=v["act_bits"], kv_bits=v["kv_bits"], seconds=v["seconds"],
                extra=dict(v["extra"]))


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, recipe: Recipe, prepared: rcp.Prepared | None = None, *,
             calib=None, batch_size: int = 1, progress=True, store=None) -> Eval:
    """Per-window NLL of ``model`` under ``recipe`` (see :func:`stamp_lib.zoo.models.window_nll`).

    ``progress``: ``True`` shows a bar over the windows when stderr is a terminal, ``False`` none;
    a tqdm bar is advanced by one per window instead (a caller's single bar for its whole run).

    ``store``: a :class:`~stamp_lib.core.cells.CellStore` (or folder) that keeps the result as one
    cell keyed by the model's weights, the windows, the recipe and the batch size (and the
    calibration windows ``calib`` when the recipe calibrates; pass them with ``prepared`` too, or
    the cell is not stored); a stored cell is returned without computing. ``None``: none, unless
    ``STAMP_RESUME=1`` (:func:`stamp_lib.core.cells.resolve`)."""
    hp = max([r.act.hp_tokens for r in recipe.rules if r.act] + [recipe.kv.hp_tokens if recipe.kv else 0])
    if hp > windows.shape[1]:
        raise ValueError(f"{hp} high-precision tokens do not fit windows of s={windows.shape[1]} tokens")
    store = cellstore.resolve(store, "llm")
    key = None
    if store is not None and _keyable(recipe, prepared, calib):
        key = _cell_key(cellstore.fingerprint(model), windows, calib, recipe, batch_size)
        hit = store.get(key)
        if hit is not None:
            if hasattr(progress, "update"):
                progress.update(windows.shape[0])
            return _eval_from(hit, recipe)
    out = _evaluate(model, windows, recipe, prepared, calib=calib, batch_size=batch_size, progress=progress)
    if key is not None:
        store.put(key, _eval_value(out))
    return out


def _evaluate(model, windows, recipe, prepared, *, calib, batch_size, progress) -> Eval:
    t0 = time.perf_counter()
    with rcp.apply(model, recipe, prepared, calib, progress=progress is True) as st:
        nll = models.window_nll(model, windows, batch_size=batch_size, progress=progress)
    return Eval(nll=nll, knobs=recipe.knobs(), act_bits=st.average_bits("act"), kv_bits=st.average_bits("kv"),
                seconds=time.perf_counter() - t0)


def paired(base: Eval, other: Eval) -> dict:
    """Paired comparison on the same windows: mean NLL difference (other - base, nats; negative =
    ``other`` better) with its standard error, the perplexity ratio, and windows where ``other`` wins."""
    if base.nll.shape != other.nll.shape:
        raise ValueError("paired comparison needs the same windows")
    return paired_nll(base.nll[None], other.nll[None])


ROWS = (("rtn", "rtn"), ("smoothquant", "rtn"), ("quarot", "rtn"), ("quarot", "gptq"), ("flatquant", "rtn"))
#: uniform A4 (4.0 bits), the bit-matched baseline (64x8+4, no transform), STaMP with the Haar DWT / the DCT
COLUMNS = ("uniform", "none", "dwt", "dct")


def row_randomness(method: str, weights: str) -> tuple[str, ...]:
    """What is random in a row's preparation: ``"seed"`` (QuaRot's and the per-linear Hadamard's
    random signs, FlatQuant's random start) and ``"calibration"`` (SmoothQuant's scales, GPTQ's
    Hessians, FlatQuant's training windows); ``()``: nothing,
    one draw is the whole row."""
    r = ()
    if method in ("quarot", "hadamard", "flatquant"):
        r += ("seed",)
    if method in ("smoothquant", "flatquant") or weights == "gptq":
        r += ("calibration",)
    return r


# The paper's Table 2 (W4A4KV4, WikiText-2 perplexity, 2048-token windows; without -> with STaMP),
# (Federici et al., arXiv 2510.26771, Table 2).
PAPER_MODELS = ("Llama-3-8B", "Llama-3.2-1B-it", "Llama-3.2-3B-it", "Qwen-2.5-3B-it")
PAPER_TABLE2 = {
    "fp": (6.14, 13.16, 11.27, 8.56),
    "rtn": ((668, 95.3), (1795, 700), (483, 159), (99723, 18767)),
    "smoothquant": ((531, 93.8), (883, 407), (177, 88.5), (66929, 29063)),
    "quarot": ((9.05, 8.66), (25.78, 23.72), (18.43, 17.57), (94.86, 71.13)),
    "flatquant": ((6.89, 6.77), (15.72, 15.16), (12.71, 12.40), (9.29, 9.19)),
}


def _column(col: str) -> dict:
    """A table column name -> recipe keywords: ``"uniform"`` (every token at the low bits),
    ``"none"`` (bit-matched baseline), a transform, or ``"<transform>+kv"`` (the sequence transform
    on keys and values too)."""
    if col == "uniform":
        return {"stamp": "none", "hp_tokens": 0}
    stamp, _, kv = col.partition("+")
    if kv not in ("", "kv") or stamp not in STAMPS:
        raise ValueError(f"bad column {col!r}: use 'uniform', 'none', a transform {STAMPS[1:]}, or '<transform>+kv'")
    return {"stamp": stamp, "kv_stamp": kv == "kv"}


def calibration_draw(calib_windows: torch.Tensor | None, draws: int, k: int) -> torch.Tensor | None:
    """Draw ``k`` of ``draws``: the k-th of ``draws`` disjoint, equal blocks of the calibration
    windows (``None`` stays ``None``)."""
    if calib_windows is None:
        return None
    n = calib_windows.shape[0] // draws
    if n < 1:
        raise ValueError(f"{calib_windows.shape[0]} calibration windows cannot make {draws} draws")
    return calib_windows[k * n:(k + 1) * n]


@dataclass
class Table:
    """The Table 2 analog: ``fp`` and ``cells[(method, weights)][column]``, a list of :class:`Eval`
    (one per draw of the row's randomness, :func:`row_randomness`; one for a row without any and
    for the ``single_draw`` columns), all on the same windows; ``knobs`` holds the shared settings;
    ``counts`` how many cells this run computed and how many it reused from a store (``{}``
    without one); ``prep_seconds[(method, weights)]`` the wall time of each preparation this run
    computed (calibration, GPTQ, FlatQuant's training; none for a row read from a store)."""

    fp: Eval
    cells: dict
    knobs: dict
    counts: dict = field(default_factory=dict)
    prep_seconds: dict = field(default_factory=dict)

    def nll(self, row, column: str, draws: int | None = None) -> torch.Tensor:
        """(draws, windows) per-window NLL of one cell (the first ``draws`` draws)."""
        return torch.stack([e.nll for e in self.cells[row][column][:draws]])

    def paired(self, row, column: str, base: str = "none") -> dict:
        """``column`` - ``base`` over the draws both have, paired on (draw, window):
        :func:`stamp_lib.core.stats.crossed_difference` (t interval; one draw: over windows)."""
        n = min(len(self.cells[row][column]), len(self.cells[row][base]))
        return paired_nll(self.nll(row, base, n), self.nll(row, column, n))

    def level(self, row, column: str) -> dict:
        """Mean NLL of a cell over its draws and windows with its 95% interval (``mean``, ``ci_lo``,
        ``ci_hi``; the crossed design of :meth:`paired`) and the perplexity ``ppl`` = exp(mean)."""
        return _level(self.nll(row, column))

    def fp_level(self) -> dict:
        """:meth:`level` of the full-precision row."""
        return _level(self.fp.nll[None])

    def to_dict(self) -> dict:
        """JSON-able: per cell and draw the per-window NLL and the bits spent (for a results file;
        :meth:`from_dict` reads it back)."""
        def ev(e):
            return {"nll": e.nll.tolist(), "act_bits": e.act_bits, "kv_bits": e.kv_bits, "recipe": e.knobs.get("name")}

        return {"fp": ev(self.fp), "knobs": self.knobs,
                "prep_seconds": [{"row": list(row), "seconds": v} for row, v in self.prep_seconds.items()],
                "cells": [{"row": list(row), "column": col, "draws": [ev(e) for e in es]}
                          for row, cols in self.cells.items() for col, es in cols.items()]}

    @classmethod
    def from_dict(cls, d: dict) -> "Table":
        def ev(v):
            return Eval(nll=torch.tensor(v["nll"], dtype=torch.float64), knobs={"name": v.get("recipe")},
                        act_bits=v["act_bits"], kv_bits=v["kv_bits"])

        cells: dict = {}
        for c in d["cells"]:
            cells.setdefault(tuple(c["row"]), {})[c["column"]] = [ev(v) for v in c["draws"]]
        return cls(fp=ev(d["fp"]), cells=cells, knobs=d.get("knobs", {}),
                   prep_seconds={tuple(p["row"]): p["seconds"] for p in d.get("prep_seconds", [])})


def _level(x: torch.Tensor) -> dict:
    """Mean of (draws, windows) NLL with its 95% interval (crossed design) and exp of each."""
    c = stats.crossed_difference(torch.zeros_like(x), x)
    return {"mean": c["mean"], "ci_lo": c["ci_lo"], "ci_hi": c["ci_hi"], "se": c["se"], "ppl": math.exp(c["mean"]),
            "ppl_lo": math.exp(c["ci_lo"]) if c["ci_lo"] == c["ci_lo"] else float("nan"),
            "ppl_hi": math.exp(c["ci_hi"]) if c["ci_hi"] == c["ci_hi"] else float("nan"),
            "draws": c["draws"], "windows": c["units"]}


def paired_nll(base: torch.Tensor, other: torch.Tensor) -> dict:
    """:func:`paired` for (draws, windows) arrays: the crossed-design comparison with the keys of
    :func:`paired` plus ``draws``, ``df``, ``var_draws`` / ``var_units`` (which dominates the spread)."""
    p = stats.crossed_difference(base, other, better="lower")
    return {"delta_nll": p["mean"], "se_delta_nll": p["se"], "ci95_lo": p["ci_lo"], "ci95_hi": p["ci_hi"],
            "ppl_ratio": math.exp(p["mean"]), "wins": p["wins"], "n": p["n"], "beyond_2se": p["beyond_2se"],
            "beyond_ci95": p["beyond_ci"], "draws": p["draws"], "windows": p["units"], "df": p["df"],
            "var_draws": p["var_draws"], "var_windows": p["var_units"], "draw_means": p["draw_means"],
            # the keys of the verdict rule (stamp_lib.book.claims.judge)
            "mean": p["mean"], "ci_lo": p["ci_lo"], "ci_hi": p["ci_hi"]}


def run_table(model, eval_windows: torch.Tensor, calib_windows: torch.Tensor | None, rows=ROWS, columns=COLUMNS, *,
              draws: int = 1, single_draw=("uniform",), batch_size: int = 1, progress: bool = True, store=None,
              **recipe_kw) -> Table:
    """Evaluate every ``(method, weights)`` row in every column on the same windows, over
    ``draws`` draws of what is random in the row (:func:`row_randomness`): draw k uses Hadamard
    seed k and the k-th of ``draws`` disjoint blocks of ``calib_windows``
    (:func:`calibration_draw`). A row without randomness is computed once; the ``single_draw``
    columns (the uniform A4 reference) on draw 0 only. One preparation per (row, draw)
    (calibration, smoothing, rotation, GPTQ) serves all its columns.

    ``store``: a :class:`~stamp_lib.core.cells.CellStore` (or folder) keeping every finished cell
    (the FP row and each ``(row, column, draw)``) as it goes: a rerun, after an interruption,
    reuses them (a row whose cells are all stored is not even prepared) and computes the rest,
    with the very same numbers. ``None``: no store, unless ``STAMP_RESUME=1`` (then the default
    store, ``data/cache/cells/llm``); ``False``: never one. See :mod:`stamp_lib.core.cells`."""
    from tqdm.auto import tqdm

    if not isinstance(draws, int) or draws < 1:
        raise ValueError(f"draws must be a positive int, got {draws!r}")
    store = cellstore.resolve(store, "llm")
    before = store.counts() if store is not None else None
    model_fp = cellstore.fingerprint(model) if store is not None else None
    seq_len = eval_windows.shape[1]
    recipe_kw.setdefault("seq_len", seq_len)

    def cell(recipe, calib, prep_fn, bs):
        """One cell: stored, or computed (preparing on demand) and stored."""
        key = _cell_key(model_fp, eval_windows, calib, recipe, bs) if store is not None else None
        hit = store.get(key) if key is not None else None
        if hit is not None:
            return _eval_from(hit, recipe)
        out = _evaluate(model, eval_windows, recipe, prep_fn(), calib=None, batch_size=bs, progress=False)
        if key is not None:
            store.put(key, _eval_value(out))
        return out

    fp = cell(llm_recipe("fp"), None, lambda: None, 1)
    cells, prep_seconds = {}, {}
    plan = []
    for row in rows:
        nd = draws if row_randomness(*row) else 1
        for k in range(nd):
            plan.append((row, k, [c for c in columns if k == 0 or c not in single_draw]))
    bar = tqdm(total=sum(len(c) for _, _, c in plan), desc="table cells", disable=None if progress else True)
    for (method, weights), k, cols in plan:
        row = (method, weights)
        calib = calibration_draw(calib_windows, draws, k) if "calibration" in row_randomness(*row) else None
        kw = {**recipe_kw, "hadamard_seed": k}
        base = llm_recipe(method, weights=weights, **kw)
        prep = []

        def prepared(base=base, prep=prep, calib=calib, row=row):
            if not prep:  # the row's preparation, only when one of its cells is computed
                t0 = time.perf_counter()
                prep.append(rcp.prepare(model, base, calib if base.needs_calibration() else None, progress=False))
                prep_seconds.setdefault(row, []).append(round(time.perf_counter() - t0, 2))
            return prep[0]

        for col in cols:
            r = llm_recipe(method, weights=weights, **{**kw, **_column(col)})
            cells.setdefault(row, {}).setdefault(col, []).append(cell(r, calib, prepared, batch_size))
            bar.update(1)
    bar.close()
    n_cal = 0 if calib_windows is None else int(calib_windows.shape[0]) // draws
    knobs = {"seq_len": seq_len, "windows": int(eval_windows.shape[0]), "draws": draws,
             "calib_windows_per_draw": n_cal,
             "draw": "draw k: Hadamard seed k, calibration windows k*n..(k+1)*n-1 of the calibration split",
             "recipe_example": llm_recipe(rows[0][0], weights=rows[0][1], **{**recipe_kw, "stamp": "dwt"}).knobs(),
             **{k: v for k, v in recipe_kw.items()}}
    counts = store.since(before) if store is not None else {}
    return Table(fp=fp, cells=cells, knobs=knobs, counts=counts, prep_seconds=prep_seconds)


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


def eval_data(tokenizer, seq_len: int, n_eval: int | None, n_calib: int = 0, *, dataset: str = "wiki",
              path=None, seed: int = 0):
    """``(eval_windows, calib_windows)``. ``dataset="wiki"`` (default): the Wikipedia evaluation /
    calibration splits (disjoint by article; :mod:`stamp_lib.zoo.text`). ``"wikitext2"``: the first
    ``n_eval`` (``None``: all) windows of WikiText-2's test split and ``n_calib`` random windows of its
    train split drawn with ``seed`` (:func:`stamp_lib.zoo.text.stream_windows`,
    :func:`~stamp_lib.zoo.text.random_windows`; ``path``: a local copy, see :func:`~stamp_lib.zoo.text.wikitext2`)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {DATASETS}")
    if dataset == "wikitext2":
        lines = text.wikitext2(path)
        ev = text.stream_windows(tokenizer, lines["test"], seq_len, n_eval)
        return ev, text.random_windows(tokenizer, lines["train"], seq_len, n_calib, seed) if n_calib else None
    if path is not None:
        raise ValueError("path= is a local copy of WikiText-2: it needs dataset='wikitext2'")
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
PROG = "python -m stamp_lib llm"


def _count_or_all(v: str):
    """``--windows``: a whole number (checked by :func:`validate`) or ``"all"``."""
    if v.strip().lower() == "all":
        return "all"
    return int(v)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--method``, ``--weights``: shared by ``llm`` and ``zeroshot``."""
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m | gemma3-270m | local folder | HF id in the cache")
    p.add_argument("--method", default="rtn", choices=METHODS)
    p.add_argument("--weights", default="rtn", choices=rcp.WEIGHT_METHODS)


def add_bits_options(p: argparse.ArgumentParser) -> None:
    """``--a-bits``, ``--w-bits``, ``--kv-bits``, ``--kv-stamp``: shared by ``llm`` and ``zeroshot``."""
    p.add_argument("--a-bits", type=int, default=4, help="activation bits, 2..16")
    p.add_argument("--w-bits", type=int, default=4, help="weight bits, 2..16")
    p.add_argument("--kv-bits", type=int, default=4, help="K/V bits, 2..16; 0 leaves K/V in full precision")
    p.add_argument("--kv-stamp", action="store_true", help="apply the sequence transform to K/V too")


def add_device_options(p: argparse.ArgumentParser) -> None:
    """``--device``, ``--device-map``, ``--dtype``, ``--threads``: shared by ``llm`` and ``zeroshot``."""
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: cpu)")
    p.add_argument("--device-map", default=None, help='e.g. "auto" for a large checkpoint on GPUs (needs accelerate)')
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="float16 is refused for Gemma (it overflows); use bfloat16 or float32")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; the record says how many)")


def add_data_options(p: argparse.ArgumentParser) -> None:
    """``--dataset`` and ``--dataset-path``, shared by ``llm`` and ``zeroshot`` (checked by
    :func:`check_data_options`, read by :func:`check_inputs`)."""
    p.add_argument("--dataset", default="wiki", choices=DATASETS,
                   help="wiki: the Wikipedia stand-in shipped inside gensim (evaluation and calibration articles, "
                        "disjoint); wikitext2: the papers' WikiText-2 through the datasets package (the test split's "
                        "windows for evaluation, random windows of the train split for calibration, as GPTQ draws them)")
    p.add_argument("--dataset-path", default=None,
                   help="--dataset wikitext2: a local copy (a folder written by DatasetDict.save_to_disk, or the Hub "
                        "repository's parquet files) instead of the Hugging Face datasets cache")


def check_data_options(a: argparse.Namespace) -> None:
    """``--dataset-path`` goes with ``--dataset wikitext2`` and names a folder; :class:`cli.BadInput` otherwise."""
    if a.dataset_path is not None:
        if a.dataset != "wikitext2":
            raise cli.BadInput(f"--dataset-path {a.dataset_path}", f"is a local copy of WikiText-2, but --dataset is "
                                                                  f"{a.dataset}; add --dataset wikitext2 or drop it")
        if not Path(a.dataset_path).expanduser().is_dir():
            raise cli.BadInput(f"--dataset-path {a.dataset_path}", "no such folder; pass a folder written by "
                                                                  "DatasetDict.save_to_disk (or the Hub repository's "
                                                                  "parquet files), or drop it to use the datasets cache")


def _parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=(
        "W4A4KV4 perplexity of one Table 2 cell (fake quantization). Prints the perplexity with its "
        "spread over windows and writes a results file with every knob, what was applied and the "
        "command line that reruns the cell."))
    add_model_options(p)
    p.add_argument("--stamp", default="none", choices=STAMPS, help="sequence transform (none = bit-matched baseline)")
    p.add_argument("--levels", type=int, default=None,
                   help="Haar levels for --stamp dwt, at most ceil(log2 seq_len) (default log2(seq_len / hp_tokens): "
                        "5 at 2048 / 64)")
    add_bits_options(p)
    p.add_argument("--hp-tokens", type=int, default=64,
                   help="high-precision (transformed) rows, 0..seq_len (0: uniform --a-bits / --kv-bits on every token)")
    p.add_argument("--hp-bits", type=int, default=8, help="bits of the high-precision rows, 2..16")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength, 0..1")
    p.add_argument("--draw", type=int, default=0,
                   help="draw k of the method's randomness: calibration windows k*n..(k+1)*n-1 (n = --calib-windows) "
                        "and, unless --hadamard-seed is given, Hadamard seed k")
    p.add_argument("--hadamard-seed", type=int, default=None,
                   help="random signs of QuaRot's residual rotation (--method quarot) or of the per-linear rotations "
                        "(--method hadamard), random start of FlatQuant's transforms (--method flatquant); "
                        "default: the --draw")
    p.add_argument("--fq-epochs", type=int, default=15,
                   help="--method flatquant: calibration epochs per decoder layer (published: 15)")
    p.add_argument("--fq-batch-size", type=int, default=4,
                   help="--method flatquant: calibration windows per step; --calib-windows must be a multiple "
                        "(published: 4, with 128 windows)")
    add_data_options(p)
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window, >= 2")
    p.add_argument("--windows", type=_count_or_all, default=8,
                   help="evaluation windows, >= 1, or 'all' (every window of the evaluation split, as the papers do)")
    p.add_argument("--calib-windows", type=int, default=8,
                   help="calibration windows (SmoothQuant, GPTQ, FlatQuant need >= 1; unused by the other methods); "
                        "the paper's GPTQ and FlatQuant use 128 of 2048 tokens (runbook commands spell it out)")
    p.add_argument("--gptq-act-order", action="store_true",
                   help="--weights gptq: quantize the columns by decreasing Hessian diagonal (GPTQ's --act-order)")
    p.add_argument("--gptq-damp", type=float, default=0.01,
                   help="--weights gptq: damping, the fraction of mean(diag H) added to H's diagonal, in [0, 1) "
                        "(GPTQ's and QuaRot's --percdamp, 0.01)")
    p.add_argument("--gptq-sequential", action="store_true",
                   help="--weights gptq: layer by layer (GPTQ's and QuaRot's order: each group's Hessian from the "
                        "inputs of the layers quantized before it; one Hessian held at a time: what fits an 8B model "
                        "on one GPU); default: every Hessian from one pass of the full-precision model")
    p.add_argument("--batch-size", type=int, default=1)
    add_device_options(p)
    p.add_argument("--out", default=None, help="results file (JSON); default data/results/llm/<model>-<recipe>.json")
    cli.add_resume_options(p, "llm", "cell")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no messages: only the result line")
    return p


def _is_gemma(name: str) -> bool:
    """Whether ``name`` (alias, folder or cached Hub id) is a Gemma model, from its config if local."""
    if name.strip().lower().startswith("gemma"):
        return True
    cfg = _local_config(name)
    return bool(cfg) and "gemma" in str(cfg.get("model_type", "")).lower()


def _local_config(name: str) -> dict | None:
    p = Path(name).expanduser()
    path = p / "config.json" if p.is_dir() else None
    if path is None and not p.exists():
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "config.json")
            path = Path(hit) if isinstance(hit, str) else None
        except Exception:  # noqa: BLE001 - not a valid Hub id: not in the cache either
            path = None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def validate(a: argparse.Namespace) -> None:
    """Check parsed arguments before anything is loaded; raises :class:`~stamp_lib.experiments.cli.BadInput`
    naming the argument, the allowed range and the fix."""
    cli.whole(a.seq_len, "--seq-len", "tokens per window", lo=2)
    if a.windows != "all":
        cli.whole(a.windows, "--windows", "evaluation windows", hint=" (or 'all')")
    check_data_options(a)
    gptq_flags = [f for f, on in (("--gptq-act-order", a.gptq_act_order), ("--gptq-sequential", a.gptq_sequential))
                  if on]
    if gptq_flags and (a.weights != "gptq" or a.method in ("fp", "flatquant")):
        raise cli.BadInput(" ".join(gptq_flags), f"applies to GPTQ weights, but --method {a.method} --weights "
                                                 f"{a.weights} has none; pass --weights gptq with --method rtn, "
                                                 "smoothquant, quarot or hadamard, or drop it")
    d = a.gptq_damp
    if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and 0 <= d < 1):
        raise cli.BadInput(f"--gptq-damp {d}", "GPTQ's damping must be a number in [0, 1) (a fraction of mean "
                                               "diag H); pass e.g. --gptq-damp 0.01")
    cli.whole(a.calib_windows, "--calib-windows", "calibration windows", lo=0)
    cli.whole(a.batch_size, "--batch-size", "windows per forward")
    cli.check_threads(a.threads)
    cli.bits(a.a_bits, "--a-bits", "activation bits")
    cli.bits(a.w_bits, "--w-bits", "weight bits")
    cli.bits(a.kv_bits, "--kv-bits", "K/V bits", off="K/V in full precision")
    cli.bits(a.hp_bits, "--hp-bits", "high-precision bits")
    cli.whole(a.draw, "--draw", "the draw index", lo=0)
    if a.hadamard_seed is not None:
        cli.whole(a.hadamard_seed, "--hadamard-seed", "the Hadamard seed", lo=0)
        if a.method not in ("quarot", "hadamard", "flatquant"):
            raise cli.BadInput(f"--hadamard-seed {a.hadamard_seed}", f"--method {a.method} has no random rotation; "
                                                                     "drop it or pass --method quarot|hadamard|flatquant")
    cli.whole(a.fq_epochs, "--fq-epochs", "FlatQuant's epochs", lo=0)
    cli.whole(a.fq_batch_size, "--fq-batch-size", "FlatQuant's calibration windows per step")
    if a.method == "flatquant":
        if a.weights != "rtn":
            raise cli.BadInput(f"--method flatquant --weights {a.weights}", "FlatQuant quantizes its weights itself "
                                                                           "(RTN with learned clipping; its GPTQ pass "
                                                                           "is not implemented here): pass --weights rtn")
        if a.calib_windows % a.fq_batch_size:
            raise cli.BadInput(f"--calib-windows {a.calib_windows} --fq-batch-size {a.fq_batch_size}",
                               "FlatQuant trains on whole batches: make --calib-windows a multiple of --fq-batch-size")
    cli.whole(a.hp_tokens, "--hp-tokens", "high-precision tokens", lo=0, hi=a.seq_len,
              hint=f" (at most the --seq-len {a.seq_len} tokens of a window)")
    cli.fraction(a.alpha, "--alpha", "the SmoothQuant migration strength")
    if a.method == "fp" and a.stamp != "none":
        raise cli.BadInput(f"--method fp --stamp {a.stamp}", "fp quantizes nothing, so a sequence transform has no "
                                                             "effect; drop --stamp or pick a quantized --method")
    if a.levels is not None:
        if a.stamp != "dwt":
            raise cli.BadInput(f"--levels {a.levels}", f"Haar levels apply to --stamp dwt only (got --stamp {a.stamp}); "
                                                       "drop --levels or pass --stamp dwt")
        top = transforms.max_levels_1d(a.seq_len)
        cli.whole(a.levels, "--levels", "Haar levels", lo=1, hi=top,
                  hint=f" (a window of --seq-len {a.seq_len} tokens allows at most ceil(log2 {a.seq_len}) = {top}; "
                       "a longer --seq-len allows more)")
    if a.kv_stamp and (a.method == "fp" or a.stamp == "none" or not a.kv_bits):
        raise cli.BadInput("--kv-stamp", "transforms quantized K/V, so it needs a quantized method, --stamp dwt|dct|wht "
                                         "and --kv-bits > 0; drop --kv-stamp or add them")
    if a.device is not None and a.device_map is not None:
        raise cli.BadInput(f"--device {a.device} --device-map {a.device_map}",
                           "give one of them: --device moves the whole model, --device-map spreads it over GPUs")
    cli.check_device(a.device)
    if a.device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise cli.BadInput(f"--device-map {a.device_map}", "needs the accelerate package; pip install accelerate, "
                                                          "or use --device instead")
    if a.dtype == "float16" and _is_gemma(a.model):
        raise cli.BadInput(f"--model {a.model} --dtype float16", "Gemma's activations overflow float16 (the perplexity "
                                                                 "turns NaN); pass --dtype bfloat16 or --dtype float32")
    if a.cells is not None and Path(a.cells).exists() and not Path(a.cells).is_dir():
        raise cli.BadInput(f"--cells {a.cells}", "is a file, not a folder of stored cells; pass a folder (created if "
                                                 "missing) or drop --cells for data/cache/cells/llm")
    r = _cli_recipe(a)
    if r.needs_calibration() and a.calib_windows < 1:
        need = {"smoothquant": "SmoothQuant scales", "flatquant": "FlatQuant's training"}.get(a.method, "GPTQ")
        raise cli.BadInput(f"--calib-windows {a.calib_windows}", f"--method {a.method} --weights {a.weights} needs "
                                                                 f"calibration windows ({need}); "
                                                                 "pass --calib-windows 1 or more")


def _seed(a) -> int:
    return a.draw if a.hadamard_seed is None else a.hadamard_seed


def _cli_recipe(a) -> Recipe:
    try:
        return llm_recipe(a.method, weights=a.weights, stamp=a.stamp, levels=a.levels, seq_len=a.seq_len,
                          a_bits=a.a_bits, w_bits=a.w_bits, kv_bits=a.kv_bits or None, hp_tokens=a.hp_tokens,
                          hp_bits=a.hp_bits, kv_stamp=a.kv_stamp, alpha=a.alpha, hadamard_seed=_seed(a),
                          flatquant=dict(epochs=a.fq_epochs, batch_size=a.fq_batch_size),
                          gptq_act_order=a.gptq_act_order, gptq_damp=a.gptq_damp, gptq_sequential=a.gptq_sequential)
    except ValueError as e:  # pragma: no cover - validate() checks every knob first
        raise cli.BadInput("arguments", str(e)) from None


def check_inputs(a: argparse.Namespace) -> dict | None:
    """The model and the evaluation text are installed (no model loaded yet); a :class:`cli.BadInput`
    that says how to get them otherwise. Returns WikiText-2's lines (``{"train", "test"}``, from
    :func:`stamp_lib.zoo.text.wikitext2`) for ``--dataset wikitext2``, ``None`` for the stand-in."""
    key = a.model.strip().lower()
    if key in models.ALIASES:
        try:
            models.gemma_part_paths() if key.startswith("gemma") else models.smollm2_gguf_path()
        except models.ModelPackageMissing as e:
            raise cli.BadInput(f"--model {a.model}", f"{e}; {cli.MODEL_PACKAGES_HINT}") from None
    elif Path(a.model).expanduser().exists():
        if not (Path(a.model).expanduser() / "config.json").is_file():
            raise cli.BadInput(f"--model {a.model}", "is not a Hugging Face checkpoint folder (no config.json); pass a "
                                                     "folder written by save_pretrained, or one of "
                                                     + ", ".join(sorted(models.ALIASES)))
    elif _local_config(a.model) is None:
        raise cli.BadInput(f"--model {a.model}", f"is not a built-in name ({', '.join(sorted(models.ALIASES))}), not a "
                                                 "local folder, and not in the local Hugging Face cache "
                                                 f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}); pass a "
                                                 f"checkpoint folder, or `huggingface-cli download {a.model}` on a "
                                                 "machine with network access and copy the cache here")
    if a.dataset == "wikitext2":
        try:
            return text.wikitext2(a.dataset_path)
        except text.TextDataMissing as e:
            where = f" --dataset-path {a.dataset_path}" if a.dataset_path else ""
            raise cli.BadInput(f"--dataset wikitext2{where}", str(e)) from None
    try:
        text.wiki_path()
    except text.TextDataMissing as e:
        raise cli.BadInput("the evaluation text (Wikipedia dump inside gensim)", str(e)) from None
    return None


def _windows(tok, articles, a, n: int | None, flag: str):
    try:
        return text.token_windows(tok, articles, a.seq_len, n)
    except ValueError as e:
        raise cli.BadInput(f"{flag} {'all' if n is None else n} --seq-len {a.seq_len}", f"{e}") from None


def _wikitext2_windows(tok, lines: dict, a, n_eval: int | None, n_cal: int):
    """``(eval, calib)`` of ``--dataset wikitext2``: the test split's stream windows (the first
    ``n_eval``, or all), and ``n_cal`` random windows of the train split drawn with seed ``--draw``."""
    try:
        ev = text.stream_windows(tok, lines["test"], a.seq_len, n_eval)
    except ValueError as e:
        raise cli.BadInput(f"--windows {a.windows} --seq-len {a.seq_len}", f"WikiText-2's test split: {e}") from None
    try:
        cal = text.random_windows(tok, lines["train"], a.seq_len, n_cal, seed=a.draw) if n_cal else None
    except ValueError as e:
        raise cli.BadInput(f"--seq-len {a.seq_len}", f"WikiText-2's train split: {e}") from None
    return ev, cal


def main(argv=None) -> dict:
    p = _parser()
    a = cli.parse(p, argv, validate)
    quiet = a.quiet
    with cli.guard(p, quiet=quiet), cli.torch_threads(a.threads):
        lines = check_inputs(a)
        r = _cli_recipe(a)
        t0 = time.perf_counter()
        cli.hide_library_bars()
        try:
            model, tok = load(a.model, a.device, a.device_map, a.dtype)
        except (models.ModelPackageMissing, models.ModelNotAvailable) as e:
            raise cli.BadInput(f"--model {a.model}", f"{e}; {cli.MODEL_PACKAGES_HINT}") from None
        n_cal = a.calib_windows if r.needs_calibration() else 0
        n_eval = None if a.windows == "all" else a.windows
        if lines is not None:
            ev, cal = _wikitext2_windows(tok, lines, a, n_eval, n_cal)
        else:
            calib_articles, eval_articles = text.wiki_split()
            ev = _windows(tok, eval_articles, a, n_eval, "--windows")
            cal = _windows(tok, calib_articles, a, n_cal * (a.draw + 1), "--calib-windows") if n_cal else None
            cal = None if cal is None else cal[a.draw * n_cal:]
        n_ev = int(ev.shape[0])
        dev = next(model.parameters()).device
        store = (cellstore.CellStore(a.cells, reuse=a.resume, experiment="llm") if a.cells
                 else cellstore.default_store("llm", reuse=a.resume))
        key = _cell_key(cellstore.fingerprint(model), ev, cal, r, a.batch_size)
        hit = store.get(key)
        if hit is not None:
            res = _eval_from(hit, r)
            if not quiet:
                print(f"reused the stored cell {store.path(key)} (same settings, model and code; --no-resume "
                      "computes it again)")
        else:
            bar = cli.bar(n_ev, "prepare weights", quiet=quiet or a.no_progress)
            prep = rcp.prepare(model, r, None if cal is None else cal.to(dev), progress=False)
            bar.set_description("perplexity windows")
            res = _evaluate(model, ev.to(dev), r, prep, calib=None, batch_size=a.batch_size, progress=bar)
            bar.close()
            store.put(key, _eval_value(res))
        facts = cli.run_facts(dev if a.device_map is None else f"device_map={a.device_map}", a.dtype)
    lo, hi = res.ppl_range()
    print(f"{a.model} {r.name} W{a.w_bits}A{a.a_bits}KV{a.kv_bits or 16}: perplexity {res.ppl:.4g} "
          f"(mean NLL {res.mean_nll:.4f} +- {res.se_nll:.4f} s.e. over {n_ev} windows of {a.seq_len} tokens; "
          f"exp(mean +- s.e.) = [{lo:.4g}, {hi:.4g}]); bits spent: activations {res.act_bits:.4f}, KV {res.kv_bits:.4f}")
    act = next((rule.act for rule in r.rules if rule.act), None)
    levels = act.levels if act is not None and act.transform == "dwt" else None
    threads = facts["torch_threads"]
    applied = {"levels": levels, "calib_windows": n_cal, "threads": threads,
               "device": str(dev) if a.device_map is None else None}
    if lines is None:
        drawn = (f"the first {n_ev} windows of the evaluation split; calibration: windows "
                 f"{a.draw * n_cal}..{(a.draw + 1) * n_cal - 1} of the calibration split")
        protocol = "non-overlapping windows of the evaluation split, tail dropped, mean token NLL, exp"
        dataset = {"name": "wiki", "text": "Wikipedia stand-in (gensim's dump), split by article"}
    else:
        drawn = (f"{f'all {n_ev}' if n_eval is None else f'the first {n_ev}'} windows of WikiText-2's test split; "
                 f"calibration: {n_cal} random windows of the train split, seed {a.draw} (GPTQ's get_wikitext2)")
        protocol = ("WikiText-2 (wikitext-2-raw-v1) as GPTQ/QuaRot/FlatQuant evaluate it: the test split's lines joined "
                    "with blank lines, tokenized once (a BOS once at the start, where the tokenizer adds one), "
                    "non-overlapping windows, "
                    "tail dropped, mean token NLL, exp")
        dataset = {"name": "wikitext2", "config": text.WIKITEXT2[1], "path": a.dataset_path,
                   "test_windows_available": len(text.joined_ids(tok, lines["test"])) // a.seq_len,
                   "calibration_seed": a.draw if n_cal else None}
    out = {"model": a.model, "recipe": r.knobs(), "eval": res.summary(), "seq_len": a.seq_len, "windows": n_ev,
           "calib_windows": n_cal, "dtype": a.dtype, "dataset": dataset,
           "applied": {"levels": levels, "max_levels": transforms.max_levels_1d(a.seq_len),
                       "act_bits_spent": res.act_bits, "kv_bits_spent": res.kv_bits, **facts},
           "seeds_drawn": {"hadamard_seed": _seed(a) if a.method in ("quarot", "hadamard", "flatquant") else None,
                           "draw": a.draw},
           "windows_drawn": drawn,
           "command": cli.command_line(p, a, applied=applied, skip=("quiet", "no_progress", "resume", "cells")),
           "cells": {**store.counts(), "store": str(store.folder)},
           "protocol": protocol,
           "simulated": "fake quantization in floating point", "wall_s": round(time.perf_counter() - t0, 1)}
    stem = f"{a.model.replace('/', '_')}-{r.name.replace('/', '_').replace('+', '_')}"
    path = Path(a.out) if a.out else results_dir() / "llm" / f"{stem}.json"
    write_json(path, out, quiet=quiet)
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
