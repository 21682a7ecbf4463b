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
* :func:`memory_plan`: the peak memory of one cell, term by term, from the shapes. With
  ``P`` parameters of ``b`` bytes, ``P_lin`` of them in the decoder's linear layers, ``L`` layers
  whose linears read input groups of widths ``d_g`` (q/k/v share one, gate/up another):

  - the model: ``P b``;
  - the prepared (folded, quantized) weights, one copy of every decoder linear kept beside the
    model while the recipe is applied: ``P_lin b``;
  - while preparing, the folded weights of every linear, all held at once in float64 before any
    is quantized (``recipe.prepare`` as it is): ``8 P_lin``;
  - GPTQ only: the Hessians of every input group of every layer, accumulated in one calibration
    pass and held together until quantization (float64): ``8 L sum_g d_g^2``; plus the working
    set of quantizing the widest group, ``GPTQ_WORK`` float64 matrices of ``d_max^2``;
  - one evaluation window: the float32 logits ``4 s V`` (V the vocabulary) dominate.

  :func:`measure_prepare_peak` measures the peak resident memory of :func:`recipe.prepare` in a
  fresh process on a small configuration, to check the formula against the code as it is. The
  terms are a lower bound: calibration activations and temporaries are not modelled, and the
  measured ratio says how much they add.

Nothing here runs a paper-sized model.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import shlex
from dataclasses import dataclass

import torch

from . import overhead

__all__ = ["PAPER_LLMS", "TABLE2", "GPTQ_WORK", "meta_model", "memory_plan", "table2_commands",
           "zeroshot_commands", "wrap", "measure_prepare_peak", "MemoryPlan"]

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
# Table 2's rows: (method, weight quantizer); QuaRot as published quantizes its weights with GPTQ
TABLE2 = (("fp", "rtn"), ("rtn", "rtn"), ("smoothquant", "rtn"), ("quarot", "gptq"), ("flatquant", "rtn"))
STAMP_COLUMNS = ("none", "dwt")
GPTQ_WORK = 3  # float64 d x d matrices alive while one group is quantized (H, its inverse, its factor)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


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
    """Bytes of each term of :func:`memory_plan` and their sum, with the formula of each."""

    model: int
    prepared: int
    folded: int
    hessians: int
    gptq_work: int
    logits: int
    formulas: dict

    @property
    def total(self) -> int:
        return self.model + self.prepared + self.folded + self.hessians + self.gptq_work + self.logits

    @property
    def preparing(self) -> int:
        """The terms that :func:`recipe.prepare` adds to the model (what :func:`measure_prepare_peak` measures)."""
        return self.prepared + self.folded + self.hessians + self.gptq_work

    def gib(self) -> dict:
        return {k: getattr(self, k) / 2 ** 30 for k in ("model", "prepared", "folded", "hessians", "gptq_work",
                                                         "logits", "total")}


def _shapes(model: torch.nn.Module) -> tuple[int, int, int, list[int]]:
    """(P, P_lin, L, input-group widths of one decoder layer)."""
    layers = model.model.layers
    lins = overhead.block_linears(layers[0])
    groups: dict[str, int] = {}
    for lin in lins:
        groups.setdefault(lin.group, lin.d_in)
    p = sum(t.numel() for t in model.parameters())
    p_lin = len(layers) * sum(lin.d_in * lin.d_out for lin in lins)
    return p, p_lin, len(layers), list(groups.values())


def memory_plan(model_or_shape, *, dtype: str = "bfloat16", weights: str = "rtn", seq_len: int = 2048) -> MemoryPlan:
    """Peak memory of one Table 2 cell (see the module docstring), for a model (any device, meta
    included) or a :data:`PAPER_LLMS` entry."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    if weights not in ("rtn", "gptq"):
        raise ValueError(f"weights must be 'rtn' or 'gptq', got {weights!r}")
    model = meta_model(model_or_shape) if isinstance(model_or_shape, dict) else model_or_shape
    b = DTYPE_BYTES[dtype]
    p, p_lin, n_layers, widths = _shapes(model)
    vocab = model.config.vocab_size
    gptq = weights == "gptq"
    return MemoryPlan(
        model=p * b, prepared=p_lin * b, folded=8 * p_lin,
        hessians=8 * n_layers * sum(d * d for d in widths) if gptq else 0,
        gptq_work=8 * GPTQ_WORK * max(widths) ** 2 if gptq else 0,
        logits=4 * seq_len * vocab,
        formulas={"model": "P b", "prepared": "P_lin b", "folded": "8 P_lin", "hessians": "8 L sum_g d_g^2 (GPTQ)",
                  "gptq_work": f"8 x {GPTQ_WORK} d_max^2 (GPTQ)", "logits": "4 s V",
                  "P": p, "P_lin": p_lin, "L": n_layers, "d_g": widths, "V": vocab, "b": b, "s": seq_len})


def table2_commands(*, device: str = "cuda", dtype: str = "bfloat16", windows: int = 80, calib_windows: int = 128,
                    seq_len: int = 2048) -> list[dict]:
    """Every cell of Table 2 as one ``python -m stamp_lib llm`` command, validated by the command's
    own parser: ``[{model, method, weights, stamp, argv, command}]`` (FP once per model)."""
    from . import llm

    out = []
    for name, shape in PAPER_LLMS.items():
        for method, weights in TABLE2:
            for stamp in STAMP_COLUMNS if method != "fp" else ("none",):
                argv = ["--model", shape["id"], "--method", method, "--weights", weights, "--stamp", stamp,
                        "--seq-len", str(seq_len), "--windows", str(windows), "--calib-windows", str(calib_windows),
                        "--device", device, "--dtype", dtype]
                a = llm._parser().parse_args(argv)
                a.device = None  # the device is the user's machine's; every other argument is checked here
                llm.validate(a)
                out.append(dict(model=name, method=method, weights=weights, stamp=stamp, argv=argv,
                                command="python -m stamp_lib llm " + shlex.join(argv)))
    return out


def zeroshot_commands(*, device: str = "cuda", dtype: str = "bfloat16") -> list[dict]:
    """Zero-shot accuracy on lm-eval's usual tasks for every model and quantized Table 2 row, the
    bit-matched baseline and STaMP (DWT) paired in one command (FP with the first), validated by
    the ``zeroshot`` command's own parser: ``[{model, method, weights, argv, command}]``."""
    from . import zeroshot

    out = []
    for name, shape in PAPER_LLMS.items():
        for k, (method, weights) in enumerate(TABLE2[1:]):
            argv = ["--model", shape["id"], "--method", method, "--weights", weights, "--stamp", ",".join(STAMP_COLUMNS),
                    "--tasks", ",".join(zeroshot.USUAL_TASKS), "--device", device, "--dtype", dtype]
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


def _child(shape: dict, weights: str, n_calib: int, seq_len: int, conn) -> None:
    from ..model import recipe
    from . import llm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = __import__("transformers").AutoModelForCausalLM.from_config(_config(shape)).eval()
    ids = torch.randint(0, shape["vocab_size"], (n_calib, seq_len), generator=torch.Generator().manual_seed(0))
    r = llm.llm_recipe("rtn", weights=weights, seq_len=seq_len, hp_tokens=min(64, seq_len))
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    prep = recipe.prepare(model, r, ids, progress=False)
    after = _status_kib("VmHWM")
    conn.send(dict(before=before * 1024, after=after * 1024, n_weights=len(prep.weights)))
    conn.close()


def measure_prepare_peak(shape: dict, weights: str, *, n_calib: int = 2, seq_len: int = 64) -> dict:
    """Peak resident memory added by :func:`stamp_lib.model.recipe.prepare` (``weights`` RTN or GPTQ,
    float32) over the freshly built model, measured in a new process (its peak resident set,
    ``VmHWM``, reset before the call through ``/proc/self/clear_refs``; Linux). Returns
    ``{"measured": bytes, "formula": MemoryPlan.preparing at float32 weights, "ratio", "plan"}``."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(shape, weights, n_calib, seq_len, child))
    proc.start()
    child.close()
    try:
        got = parent.recv()
    except EOFError:
        proc.join()
        raise RuntimeError(f"the measuring process died (exit code {proc.exitcode})") from None
    proc.join()
    plan = memory_plan(meta_model(shape), dtype="float32", weights=weights, seq_len=seq_len)
    formula = plan.preparing
    return dict(measured=got["after"] - got["before"], formula=formula, weights=weights, plan=plan,
                ratio=(got["after"] - got["before"]) / formula if formula else math.nan)
