r"""Running the paper's models: the commands of Table 2 and the memory they need (the runbook page).

The paper's checkpoints cannot be downloaded here; users have them. This module gives what they
need to plan a run, computed rather than typed:

Contract
--------
* :data:`PAPER_LLMS`: the four LLMs of Table 2 with their Hub ids and the published shapes of
  their ``config.json`` (the architecture constants :func:`meta_model` builds on the ``meta``
  device: no weights, no memory). :data:`TABLE2` the rows (method, weight quantizer) and columns.
* :func:`table2_commands`: the exact ``python -m stamp_lib llm`` command of every cell, each parsed
  and validated by the command's own parser (a flag the CLI does not know fails here, not on a
  user's GPU).
* :func:`zeroshot_commands`: the ``python -m stamp_lib zeroshot`` command of every model and
  Table 2 row on lm-eval's usual tasks (:data:`stamp_lib.experiments.zeroshot.USUAL_TASKS`),
  bit-matched and + STaMP in one run, validated the same way.
* :func:`memory_plan`: the peak memory of one cell, term by term, from the shapes, for the code as
  it is. With ``P`` parameters of ``b`` bytes, ``P_lin`` of them in the decoder's linear layers,
  ``L`` layers whose linears read input groups of widths ``d_g`` (q/k/v share one, gate/up
  another), ``u_max`` the largest unit that is folded and quantized at once (one linear for RTN;
  for GPTQ the linears fed one input, stacked by rows: gate/up, ``2 d_ff d``):

  - the model: ``P b``;
  - the prepared (folded, quantized) weights, one copy of every decoder linear kept beside the
    model while the recipe is applied: ``P_lin b``;
  - while preparing, the float64 folded weights of one unit at a time, with the quantizer's
    working copy and its result: ``8 FOLD_COPIES u_max`` (before layer-by-layer preparation
    every linear's folded copy was held at once: ``8 P_lin``, :func:`memory_plan_all_at_once`);
  - GPTQ in one pass (``sequential=False``): the Hessians of every input group of every layer,
    accumulated in one calibration pass and held together (float64): ``8 L sum_g d_g^2``;
    GPTQ layer by layer (``sequential=True``): one group's Hessian at a time, ``8 d_max^2``,
    and the calibration windows' hidden states at one layer boundary, the layer's inputs and
    outputs (``n`` windows of ``s_c`` tokens, width ``d``): ``2 n s_c d b``;
  - GPTQ: the working set of quantizing the widest group, ``GPTQ_WORK`` float64 matrices of
    ``d_max^2``;
  - one evaluation window: the float32 logits ``4 s V`` (V the vocabulary) dominate.

  :func:`measure_prepare_peak` measures the peak resident memory of :func:`recipe.prepare` in a
  fresh process on a small configuration, to check the formula against the code as it is. The
  terms are a lower bound: the full-precision pass's activations and temporaries are not
  modelled, and the measured ratio says how much they add.

Nothing here runs a paper-sized model.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..core.io import REPO_ROOT
from . import overhead

__all__ = ["PAPER_LLMS", "PAPER_DITS", "TABLE2", "GPTQ_WORK", "FOLD_COPIES", "meta_model", "memory_plan",
           "memory_plan_all_at_once", "table2_commands", "zeroshot_commands", "wrap", "measure_prepare_peak",
           "MemoryPlan", "paper_runs", "paper_table", "PaperRuns", "time_plan", "pixart_commands", "PEAK_BF16",
           "PAPER_RESULTS"]

# Hub ids and the shapes of their config.json (architecture constants, as published)
PAPER_LLMS = {
    "Llama-3-8B": dict(id="meta-llama/Meta-Llama-3-8B", arch="llama", hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                       tie_word_embeddings=False),
    "Llama-3.2-1B-it": dict(id="meta-llama/Llama-3.2-1B-Instruct", arch="llama", hidden_size=2048,
                            intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3.2-3B-it": dict(id="meta-llama/Llama-3.2-3B-Instruct", arch="llama", hidden_size=3072,
                            intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                            num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "Qwen-2.5-3B-it": dict(id="Qwen/Qwen2.5-3B-Instruct", arch="qwen2", hidden_size=2048, intermediate_size=11008,
                           num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2, vocab_size=151936,
                           tie_word_embeddings=True),
}
# Where the results files of the paper's models go (the runbook's commands with
# STAMP_RESULTS=data/results/paper) and where chapters 3 and 4 read them
PAPER_RESULTS = REPO_ROOT / "data" / "results" / "paper"
# The paper's image models (Hub ids); only PixArt-Sigma has a command (``python -m stamp_lib pixart``)
PAPER_DITS = {"PixArt-Sigma": "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS",
              "SANA": "Efficient-Large-Model/Sana_1600M_1024px_diffusers"}
# Table 2's rows: (method, weight quantizer); QuaRot as published quantizes its weights with GPTQ
TABLE2 = (("fp", "rtn"), ("rtn", "rtn"), ("smoothquant", "rtn"), ("quarot", "gptq"), ("flatquant", "rtn"))
STAMP_COLUMNS = ("none", "dwt")
GPTQ_WORK = 4  # float64 d x d matrices gptq_quantize holds at once: H's working copy, its factor, the inverse, its factor
FOLD_COPIES = 3  # float64 copies of the unit being quantized: folded, the quantizer's working copy, its result
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Dense bfloat16 tensor-core peak of the cards the runbook sizes for (NVIDIA's data sheets, FLOP/s, no sparsity)
PEAK_BF16 = {"A100": 312e12, "H100 SXM": 989e12, "H200": 989e12}


def _config(shape: dict):
    from transformers import LlamaConfig, Qwen2Config

    kw = {k: v for k, v in shape.items() if k not in ("id", "arch")}
    if shape["arch"] == "llama":
        return LlamaConfig(**kw)
    if shape["arch"] == "qwen2":
        return Qwen2Config(**kw)
    raise ValueError(f"unknown architecture {shape['arch']!r}; known: llama, qwen2")


def meta_model(shape: dict) -> torch.nn.Module:
    """The causal LM of ``shape`` (an entry of :data:`PAPER_LLMS`, or the same keys) on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_config(shape))


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each term of :func:`memory_plan` and their sum, with the formula of each.
    ``activations``: the calibration hidden states that layer-by-layer GPTQ holds (0 otherwise)."""

    model: int
    prepared: int
    folded: int
    hessians: int
    gptq_work: int
    logits: int
    formulas: dict
    activations: int = 0

    @property
    def total(self) -> int:
        return self.model + self.prepared + self.folded + self.hessians + self.gptq_work + self.activations + self.logits

    @property
    def preparing(self) -> int:
        """The terms that :func:`recipe.prepare` adds to the model (what :func:`measure_prepare_peak` measures)."""
        return self.prepared + self.folded + self.hessians + self.gptq_work + self.activations

    def gib(self) -> dict:
        return {k: getattr(self, k) / 2 ** 30 for k in ("model", "prepared", "folded", "hessians", "gptq_work",
                                                         "activations", "logits", "total")}


def _shapes(model: torch.nn.Module) -> dict:
    """P, P_lin, L, the input-group widths of one decoder layer, the largest linear (out x in) and
    the largest group of linears fed one input (sum of outs x in), the hidden width."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"memory_plan sizes decoder-only language models (a transformers *ForCausalLM whose "
                         f".model.layers are the decoder layers: Llama, Qwen2, Gemma-3); {type(model).__name__} has "
                         f"none. Image models (PixArt, SANA) are not sized here")
    lins = overhead.block_linears(layers[0])
    groups: dict[str, int] = {}
    outs: dict[str, int] = {}
    for lin in lins:
        groups.setdefault(lin.group, lin.d_in)
        outs[lin.group] = outs.get(lin.group, 0) + lin.d_out
    return dict(p=sum(t.numel() for t in model.parameters()),
                p_lin=len(layers) * sum(lin.d_in * lin.d_out for lin in lins), n_layers=len(layers),
                widths=list(groups.values()), lin_max=max(lin.d_in * lin.d_out for lin in lins),
                group_max=max(outs[g] * groups[g] for g in groups), d=model.config.hidden_size)


def _check(dtype, weights):
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if weights not in ("rtn", "gptq"):
        raise ValueError(f"weights must be 'rtn' or 'gptq', got {weights!r}")


def memory_plan(model_or_shape, *, dtype: str = "bfloat16", weights: str = "rtn", seq_len: int = 2048,
                sequential: bool = False, calib_windows: int = 128, calib_len: int | None = None) -> MemoryPlan:
    """Peak memory of one Table 2 cell (see the module docstring), for a model (any device, meta
    included) or a :data:`PAPER_LLMS` entry. ``sequential``: GPTQ layer by layer
    (``--gptq-sequential``); ``calib_windows`` x ``calib_len`` (default ``seq_len``) calibration
    tokens, whose hidden states it holds."""
    _check(dtype, weights)
    if sequential and weights != "gptq":
        raise ValueError("sequential=True is GPTQ's layer-by-layer preparation: pass weights='gptq'")
    model = meta_model(model_or_shape) if isinstance(model_or_shape, dict) else model_or_shape
    b = DTYPE_BYTES[dtype]
    sh = _shapes(model)
    vocab = model.config.vocab_size
    gptq = weights == "gptq"
    widths, n_layers = sh["widths"], sh["n_layers"]
    s_c = seq_len if calib_len is None else calib_len
    unit = sh["group_max"] if gptq else sh["lin_max"]
    return MemoryPlan(
        model=sh["p"] * b, prepared=sh["p_lin"] * b, folded=8 * FOLD_COPIES * unit,
        hessians=(8 * max(widths) ** 2 if sequential else 8 * n_layers * sum(d * d for d in widths)) if gptq else 0,
        gptq_work=8 * GPTQ_WORK * max(widths) ** 2 if gptq else 0,
        activations=2 * calib_windows * s_c * sh["d"] * b if sequential else 0,
        logits=4 * seq_len * vocab,
        formulas={"model": "P b", "prepared": "P_lin b",
                  "folded": f"8 x {FOLD_COPIES} u_max (u_max: the largest {'group' if gptq else 'linear'})",
                  "hessians": ("8 d_max^2 (one group at a time)" if sequential else "8 L sum_g d_g^2") + " (GPTQ)",
                  "gptq_work": f"8 x {GPTQ_WORK} d_max^2 (GPTQ)",
                  "activations": "2 n s_c d b (GPTQ layer by layer)" if sequential else "0",
                  "logits": "4 s V", "P": sh["p"], "P_lin": sh["p_lin"], "L": n_layers, "d_g": widths,
                  "u_max": unit, "d": sh["d"], "V": vocab, "b": b, "s": seq_len,
                  **({"n": calib_windows, "s_c": s_c} if sequential else {})})


def memory_plan_all_at_once(model_or_shape, *, dtype: str = "bfloat16", weights: str = "rtn",
                            seq_len: int = 2048) -> MemoryPlan:
    """:func:`memory_plan` of the preparation before it went unit by unit and layer by layer: every
    linear's float64 folded copy held at once (``8 P_lin``) and, for GPTQ, every layer's Hessians
    from one pass. For comparison only: no code path prepares this way any more."""
    one = memory_plan(model_or_shape, dtype=dtype, weights=weights, seq_len=seq_len)
    return replace(one, folded=8 * one.formulas["P_lin"],
                   formulas={**one.formulas, "folded": "8 P_lin (every linear at once)"})


def table2_commands(*, device: str = "cuda", dtype: str = "bfloat16", windows: int | str = "all",
                    calib_windows: int = 128, seq_len: int = 2048, dataset: str = "wikitext2") -> list[dict]:
    """Every cell of Table 2 as one ``python -m stamp_lib llm`` command, validated by the command's
    own parser: ``[{model, method, weights, stamp, argv, command}]`` (FP once per model). By default
    the papers' protocol: WikiText-2 (``--dataset wikitext2``), every test window, 128 calibration
    windows of ``seq_len`` tokens; GPTQ layer by layer (``--gptq-sequential``: the published order,
    and what fits an 8B model on one GPU, :func:`memory_plan`)."""
    from . import llm

    out = []
    for name, shape in PAPER_LLMS.items():
        for method, weights in TABLE2:
            for stamp in STAMP_COLUMNS if method != "fp" else ("none",):
                argv = ["--model", shape["id"], "--method", method, "--weights", weights, "--stamp", stamp,
                        "--dataset", dataset, "--seq-len", str(seq_len), "--windows", str(windows),
                        "--calib-windows", str(calib_windows), "--device", device, "--dtype", dtype]
                if weights == "gptq":
                    argv.append("--gptq-sequential")
                a = llm._parser().parse_args(argv)
                a.device = None  # the device is the user's machine's; every other argument is checked here
                llm.validate(a)
                out.append(dict(model=name, method=method, weights=weights, stamp=stamp, argv=argv,
                                command="python -m stamp_lib llm " + shlex.join(argv)))
    return out


def zeroshot_commands(*, device: str = "cuda", dtype: str = "bfloat16", calib_windows: int = 128,
                      dataset: str = "wikitext2") -> list[dict]:
    """Zero-shot accuracy on lm-eval's usual tasks for every model and quantized Table 2 row, the
    bit-matched baseline and STaMP (DWT) paired in one command (FP with the first), calibrated as
    the perplexity table is (``calib_windows`` 2048-token windows of WikiText-2's train split),
    validated by the ``zeroshot`` command's own parser: ``[{model, method, weights, argv, command}]``."""
    from . import zeroshot

    out = []
    for name, shape in PAPER_LLMS.items():
        for k, (method, weights) in enumerate(TABLE2[1:]):
            argv = ["--model", shape["id"], "--method", method, "--weights", weights, "--stamp", ",".join(STAMP_COLUMNS),
                    "--tasks", ",".join(zeroshot.USUAL_TASKS), "--dataset", dataset,
                    "--calib-windows", str(calib_windows), "--device", device, "--dtype", dtype]
            if k == 0:
                argv.append("--with-fp")
            a = zeroshot._parser().parse_args(argv)
            a.device = None  # the user's machine's
            zeroshot.validate(a)
            out.append(dict(model=name, method=method, weights=weights, argv=argv,
                            command="python -m stamp_lib zeroshot " + shlex.join(argv)))
    return out


def wrap(command: str, width: int = 76) -> str:
    """``command`` (a line of space-separated words, as :func:`table2_commands` writes them) as shell
    lines of at most ``width`` characters, continued with a backslash and indented; a flag stays
    with its value (a word longer than a line gets a line of its own)."""
    words = command.split()
    units, i = [], 0
    while i < len(words):
        take = 2 if words[i].startswith("--") and i + 1 < len(words) and not words[i + 1].startswith("--") else 1
        units.append(" ".join(words[i:i + take]))
        i += take
    lines, cur = [], ""
    for u in units:
        room = width - 2 - (4 if lines else 0)  # " \" and the indent of continuation lines
        if cur and len(cur) + 1 + len(u) > room:
            lines.append(cur)
            cur = u
        else:
            cur = f"{cur} {u}" if cur else u
    lines.append(cur)
    return " \\\n".join(lines[:1] + ["    " + ln for ln in lines[1:]])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def _child(shape: dict, weights: str, n_calib: int, seq_len: int, sequential: bool, conn) -> None:
    from ..model import recipe
    from . import llm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = __import__("transformers").AutoModelForCausalLM.from_config(_config(shape)).eval()
    ids = torch.randint(0, shape["vocab_size"], (n_calib, seq_len), generator=torch.Generator().manual_seed(0))
    r = llm.llm_recipe("rtn", weights=weights, seq_len=seq_len, hp_tokens=min(64, seq_len), gptq_sequential=sequential)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    prep = recipe.prepare(model, r, ids, progress=False)
    after = _status_kib("VmHWM")
    conn.send(dict(before=before * 1024, after=after * 1024, n_weights=len(prep.weights)))
    conn.close()


def measure_prepare_peak(shape: dict, weights: str, *, n_calib: int = 2, seq_len: int = 64,
                         sequential: bool = False) -> dict:
    """Peak resident memory added by :func:`stamp_lib.model.recipe.prepare` (``weights`` RTN or GPTQ,
    ``sequential``: GPTQ layer by layer; float32) over the freshly built model, measured in a new
    process (its peak resident set, ``VmHWM``, reset before the call through
    ``/proc/self/clear_refs``; Linux). Returns ``{"measured": bytes, "formula": MemoryPlan.preparing
    at float32 weights, "ratio", "plan"}``."""
    plan = memory_plan(meta_model(shape), dtype="float32", weights=weights, seq_len=seq_len, sequential=sequential,
                       calib_windows=n_calib)  # checks the arguments before a process starts
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(shape, weights, n_calib, seq_len, sequential, child))
    proc.start()
    child.close()
    try:
        got = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the measuring process died (exit code {proc.exitcode})") from None
    proc.join()
    formula = plan.preparing
    return dict(measured=got["after"] - got["before"], formula=formula, weights=weights, sequential=sequential,
                plan=plan, ratio=(got["after"] - got["before"]) / formula if formula else math.nan)


# ---- results of the paper's models, for chapters 3 and 4 ------------------------------------------

@dataclass
class PaperRuns:
    """What :func:`paper_runs` found: ``rows`` (one per results file of a paper model, the fields
    the chapters show), ``skipped`` (``(file, why)`` for files that could not be read), ``folder``."""

    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    folder: Path | None = None


def paper_name(model: str, ids: dict) -> str | None:
    """The paper's name of ``model`` (a Hub id, a checkpoint folder named after the id, or a Hugging
    Face cache snapshot path) among ``ids`` (``{name: hub id}``), or ``None``."""
    parts = Path(model).parts
    for name, hub in ids.items():
        org, _, base = hub.partition("/")
        if model == hub or (parts and parts[-1] == base) or f"models--{org}--{base}" in parts:
            return name
    return None


def _llm_row(d: dict, name: str) -> dict:
    from . import llm

    a = llm._parser().parse_args(shlex.split(d["command"])[4:])  # the knobs, as the command spelled them
    ev = d["eval"]
    return dict(model=name, method=a.method, weights=a.weights, stamp=a.stamp,
                bits=f"W{a.w_bits}A{a.a_bits}KV{a.kv_bits or 16}", dataset=d["dataset"]["name"],
                windows=d["windows"], seq_len=d["seq_len"], ppl=ev["ppl"], ppl_lo=ev["ppl_lo"], ppl_hi=ev["ppl_hi"],
                dtype=d.get("dtype"), device=d.get("applied", {}).get("device"))


def _dit_row(d: dict, name: str) -> list[dict]:
    n = d.get("n_images")
    return [dict(model=name, config=k, sqnr_db=r["sqnr_image_db"], se_db=r["se_db"], act_bits=r["act_bits"],
                 images=n, dtype=d.get("dtype"), paired=d.get("paired", {}).get(k))
            for k, r in d["configs"].items()]


def paper_runs(kind: str = "llm", folder: str | Path | None = None) -> PaperRuns:
    """Results files that the ``llm`` (``kind="llm"``) or ``pixart`` (``"pixart"``) command wrote
    for one of the paper's models (:data:`PAPER_LLMS`, :data:`PAPER_DITS`), read from ``folder``
    (default :data:`PAPER_RESULTS` ``/<kind>/``: where the commands write with
    ``STAMP_RESULTS=data/results/paper``; the book's execution cache is keyed by these files).
    Files of other models are ignored; a file that is not such a results file is listed in
    ``skipped`` with the reason, never fatal."""
    if kind not in ("llm", "pixart"):
        raise ValueError(f"kind must be 'llm' or 'pixart', not {kind!r}")
    ids = ({k: v["id"] for k, v in PAPER_LLMS.items()} if kind == "llm" else PAPER_DITS)
    folder = Path(folder) if folder is not None else PAPER_RESULTS / kind
    out = PaperRuns(folder=folder)
    for p in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            d = json.loads(p.read_text())
            name = paper_name(str(d["model"]), ids)
            if name is not None:
                out.rows += [_llm_row(d, name)] if kind == "llm" else _dit_row(d, name)
        except (OSError, ValueError, KeyError, TypeError, SystemExit) as e:
            out.skipped.append((p.name, f"not a results file of the {kind} command ({type(e).__name__}: {e})"))
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def paper_table(runs: PaperRuns) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of what :func:`paper_runs` found, beside the paper's numbers. LLM: one row
    per model, method, weights, bits and data, perplexity without -> with STaMP-DWT (a missing
    side is "-") and the paper's Table 2 cell for W4A4KV4; image models: one row per configuration,
    the image SQNR (dB) +- its standard error and the bits per image token."""
    from . import llm

    if runs.rows and "ppl" in runs.rows[0]:
        cells: dict = {}
        for r in runs.rows:
            key = (r["model"], r["method"], r["weights"], r["bits"], f"{r['dataset']}, {r['windows']} x {r['seq_len']}")
            cells.setdefault(key, {})[r["stamp"]] = r["ppl"]
        rows = []
        for (model, method, weights, bits, data), ppl in sorted(cells.items()):
            ours = _fmt(ppl["none"]) if method == "fp" and "none" in ppl else (
                f"{_fmt(ppl['none']) if 'none' in ppl else '-'} → {_fmt(ppl['dwt']) if 'dwt' in ppl else '-'}")
            paper = "-"
            if model in llm.PAPER_MODELS and (bits == "W4A4KV4" or method == "fp") and method in llm.PAPER_TABLE2:
                v = llm.PAPER_TABLE2[method][llm.PAPER_MODELS.index(model)]
                paper = _fmt(v) if method == "fp" else f"{_fmt(v[0])} → {_fmt(v[1])}"
            rows.append([model, f"{method} ({weights})", bits, data, ours, paper])
        return ["model", "method (weights)", "bits", "data", "ours", "paper"], rows
    rows = [[r["model"], r["config"], f"{r['sqnr_db']:.2f} ± {r['se_db']:.2f}", f"{r['act_bits']:.3f}", str(r["images"])]
            for r in runs.rows]
    return ["model", "configuration", "image SQNR (dB)", "bits / image token", "images"], rows


def time_plan(model_or_shape, *, seq_len: int = 2048, calib_windows: int = 128, peak: float = PEAK_BF16["H100 SXM"],
              weights: str = "rtn") -> dict:
    """Matmul FLOPs of one Table 2 cell's parts and their time at ``peak`` FLOP/s, a lower bound:
    a forward of one ``seq_len`` window costs ``2 s P_lin + 4 L s^2 h d_h + 2 s d V`` (the decoder's
    linears, attention scores and values over the full square as SDPA computes them, ``lm_head``);
    calibration runs ``calib_windows`` such forwards (RTN without calibration: none); GPTQ adds the
    Hessians, ``2 n s sum_g d_g^2`` per layer. Fake quantization's elementwise work (memory-bound),
    the transforms and GPTQ's column loop are not counted. ``{"window", "calib", "hessians",
    "window_s", "calib_s", "formulas"}``."""
    _check("bfloat16", weights)
    model = meta_model(model_or_shape) if isinstance(model_or_shape, dict) else model_or_shape
    sh = _shapes(model)
    cfg = model.config
    heads, hd = cfg.num_attention_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    s, n = seq_len, calib_windows
    window = 2 * s * sh["p_lin"] + 4 * sh["n_layers"] * s * s * heads * hd + 2 * s * sh["d"] * cfg.vocab_size
    calib = n * window if weights == "gptq" else 0
    hess = 2 * n * s * sh["n_layers"] * sum(d * d for d in sh["widths"]) if weights == "gptq" else 0
    return {"window": window, "calib": calib, "hessians": hess, "window_s": window / peak,
            "calib_s": (calib + hess) / peak, "peak": peak,
            "formulas": {"window": "2 s P_lin + 4 L s^2 h d_h + 2 s d V", "calib": "n x window (GPTQ)",
                         "hessians": "2 n s L sum_g d_g^2 (GPTQ)", "s": s, "n": n, "h": heads, "d_h": hd}}


def pixart_commands(*, device: str = "cuda", dtype: str = "float16",
                    prompts: str = "data/prompts/pixart_prompts.txt") -> list[dict]:
    """Chapter 4's Figure 1 / Table 1 protocol on the paper's PixArt-Sigma at 1024 x 1024 (one
    command: every configuration, paired), validated by the ``pixart`` command's own parser:
    ``[{model, argv, command}]``. SANA has no command (:data:`PAPER_DITS`)."""
    from . import pixart

    argv = ["--model", PAPER_DITS["PixArt-Sigma"], "--prompts", prompts, "--height", "1024", "--width", "1024",
            "--hp-tokens", "64", "--device", device, "--dtype", dtype]
    a = pixart._parser().parse_args(argv)
    a.device = None  # the user's machine's
    pixart.validate(a)
    return [dict(model="PixArt-Sigma", argv=argv, command="python -m stamp_lib pixart " + shlex.join(argv))]
