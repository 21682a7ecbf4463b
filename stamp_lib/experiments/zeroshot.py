r"""Zero-shot accuracy (beyond the paper): the quantized model on lm-eval's multiple-choice tasks.

The paper reports perplexity only (:mod:`stamp_lib.experiments.llm`); its reviewers asked for
zero-shot tasks. This module scores a model under a :class:`~stamp_lib.model.recipe.Recipe` with
EleutherAI's lm-evaluation-harness (``lm_eval``, its Hugging Face wrapper ``HFLM`` around our
model object, the quantization hooks attached): each answer choice of a question is scored by
the summed log-likelihood of its tokens after the prompt, the most likely choice is the
prediction. Reported per task: ``acc`` (argmax of the summed log-likelihood) and, where the task
defines it, ``acc_norm`` (argmax of the log-likelihood divided by the choice's length in
characters), each with lm-eval's standard error (sample sd / sqrt(n) over questions) and ``n``,
the number of questions scored. Zero-shot: no examples in the prompt (``num_fewshot=0``).

The usual tasks of the quantization papers (QuaRot, SpinQuant, FlatQuant) are
:data:`USUAL_TASKS`: ``arc_easy``, ``arc_challenge``, ``boolq``, ``hellaswag``, ``lambada_openai``,
``openbookqa``, ``piqa``, ``winogrande``. Their datasets come from the Hugging Face Hub and must be
downloaded by the user on a machine with network access (lm-eval fetches them on first use; copy
the ``datasets`` cache here). This study runs offline, so it is tested on a small local task
(``tests/data/zeroshot``, task ``stamp_local_mc``: 36 everyday facts with 4 choices each, passed
with ``include_path``), which says the pipeline works, not how the methods compare on the usual
benchmarks.

How the recipe meets short requests
-----------------------------------
Each request is one forward of ``context + continuation`` (minus its last token), tens to a few
hundred tokens, far below the 2048-token windows of the perplexity table. The recipe's bits rule
puts the first ``hp_tokens`` rows of a forward at ``hp_bits``; on a forward of s <= ``hp_tokens``
tokens *every* row would be high precision (``ActQuant.bits_vector`` caps at s): a silent A8
model. Hence the rule here:

* ``hp_tokens`` defaults to 1 (:func:`zeroshot_recipe`): the bit-matched baseline keeps the first
  token at 8 bits, STaMP the first transformed row: 4 + 4/s bits per token on a request of s
  tokens, 4.04-4.13 for s = 30-100 (the paper's 64 of 2048 rows give 4.125), more on shorter ones. A request of
  s <= ``hp_tokens`` tokens is refused before any forward (:class:`ZeroShotInputError`), and the
  bits actually spent are reported (``act_bits_spent``, ``kv_bits_spent``).
* The Haar DWT runs at full depth on every request: ``levels`` defaults to
  ceil(log2 ``max_length``), and each forward caps it at ceil(log2 s) (what the recipe does
  with a short sequence), so the approximation band is one row, the scaled mean token, which is
  the high-precision row when ``hp_tokens=1``. A given ``levels`` is capped per request the same
  way; ``levels_applied`` in the result gives the range used.
* ``batch_size=1``: lm-eval right-pads a batch to its longest request. The sequence transform mixes
  every row of a forward, padding included, so a padded request would be quantized differently
  from the same request alone. Without a sequence transform (``fp``, the bit-matched baseline, a
  uniform recipe) padding is harmless: the model is causal, so the real rows never attend to the
  padding after them, and per-token quantization (linear inputs and K/V) and the bits rule
  (absolute positions from 0) treat every real row as they would alone; a larger batch is then
  allowed, and refused with a transform.

A sequence transform makes the logits at position i depend on the tokens after i through the
quantization noise (the perplexity table says the same of its windows): the continuation's
later tokens can move the score of its earlier ones. lm-eval's one-token-continuation cache
(requests with identical inputs share one forward) is exact here: the inputs are identical.

Fake quantization is simulation: accuracy is simulated in floating point, not measured on
integer kernels. ``lm_eval.simple_evaluate`` seeds Python's, NumPy's and torch's global generators
with ``seed`` (nothing is sampled in zero-shot scoring).

Command line::

    python -m stamp_lib zeroshot --model smollm2-135m --method rtn --stamp none,dwt --with-fp \
        --tasks stamp_local_mc --include-path tests/data/zeroshot --out zeroshot.json
    python -m stamp_lib zeroshot --model smollm2-135m --method rtn --stamp dwt --tasks arc_easy,piqa --limit 200

``--stamp`` takes a comma-separated list of columns (``none`` = bit-matched baseline), evaluated
with one weight preparation and compared paired on the same questions; ``--with-fp`` adds the
unquantized model. Bad input is one line and exit status 2 (:mod:`stamp_lib.experiments.cli`): an
unknown task (with how to list the available ones), a dataset that is not available offline
(with how to get it), a generative task, ``--limit 0``, too many high-precision tokens. The
results file holds every knob, the per-question scores and ``command``, the exact command line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import logging
import math
import os
import time
from pathlib import Path

import torch

from ..core import stats, transforms
from ..core.io import results_dir, write_json
from ..model import recipe as rcp
from ..model.recipe import Recipe
from ..zoo import models, text
from . import cli, llm

__all__ = ["USUAL_TASKS", "LOCAL_TASK", "ZeroShotInputError", "zeroshot_recipe", "load_tasks", "evaluate_zeroshot",
           "paired_accuracy", "main"]

#: the zero-shot tasks of the quantization papers (datasets from the Hugging Face Hub, downloaded by the user)
USUAL_TASKS = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "lambada_openai", "openbookqa", "piqa", "winogrande")
#: the small local task of this study (``tests/data/zeroshot/local_mc.yaml``; pass that folder as ``include_path``)
LOCAL_TASK = "stamp_local_mc"
SCORED = ("multiple_choice", "loglikelihood")
DEFAULT_MAX_LENGTH = 8192
LIST_HINT = "list the available ones with `python -m lm_eval ls tasks` (add `--include_path DIR` for local ones)"


class ZeroShotInputError(ValueError):
    """A task, an option or a request that cannot be evaluated as asked (the command line turns it
    into its one-line error)."""


# ----------------------------------------------------------------------------- recipe
def zeroshot_recipe(method: str, *, stamp: str | None = None, weights: str = "rtn", a_bits: int = 4, w_bits: int = 4,
                    kv_bits: int | None = 4, hp_tokens: int = 1, hp_bits: int = 8, levels: int | None = None,
                    kv_stamp: bool = False, alpha: float = 0.5, hadamard_seed: int | None = 0,
                    max_length: int = DEFAULT_MAX_LENGTH, flatquant: dict | None = None) -> Recipe:
    """:func:`stamp_lib.experiments.llm.llm_recipe` for short requests (see the module docstring):
    ``hp_tokens`` 1 by default, and the Haar DWT at full depth (``levels=None``: ceil(log2
    ``max_length``), capped at ceil(log2 s) on each request of s tokens)."""
    if isinstance(hp_tokens, bool) or not isinstance(hp_tokens, int) or hp_tokens < 0:
        raise ZeroShotInputError(f"hp_tokens must be an int >= 0, got {hp_tokens!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ZeroShotInputError(f"max_length must be an int >= 2, got {max_length!r}")
    dwt = stamp == "dwt"
    lv = (levels if levels is not None else transforms.max_levels_1d(max_length)) if dwt else None
    return llm.llm_recipe(method, weights=weights, stamp=stamp, levels=lv, seq_len=max_length, a_bits=a_bits,
                          w_bits=w_bits, kv_bits=kv_bits, hp_tokens=hp_tokens, hp_bits=hp_bits, kv_stamp=kv_stamp,
                          alpha=alpha, hadamard_seed=hadamard_seed, flatquant=flatquant)


def _hp_tokens(recipe: Recipe) -> int:
    return max([r.act.hp_tokens for r in recipe.rules if r.act] + [recipe.kv.hp_tokens if recipe.kv else 0])


def _transforms(recipe: Recipe) -> list[str]:
    specs = [r.act for r in recipe.rules if r.act] + ([recipe.kv] if recipe.kv else [])
    return sorted({s.transform for s in specs if s.transform != "identity"})


def _dwt_levels(recipe: Recipe) -> int | None:
    """The Haar levels of the recipe's DWT rules (``None`` without one; a rule's ``None`` = full depth)."""
    specs = [s for s in [r.act for r in recipe.rules if r.act] + [recipe.kv] if s and s.transform == "dwt"]
    if not specs:
        return None
    return max(64 if s.levels is None else s.levels for s in specs)


# ----------------------------------------------------------------------------- tasks
@functools.lru_cache(maxsize=8)
def _manager(include_path: str | None, defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def task_manager(names, include_path=None):
    """The smallest ``lm_eval.tasks.TaskManager`` that knows every name: ``include_path`` alone when
    it holds them all (no scan of lm-eval's ~15 000 task files, about 10 s), else lm-eval's own
    tasks plus ``include_path``. Cached per process."""
    inc = None if include_path is None else str(include_path)
    if inc is not None:
        if not Path(inc).is_dir():
            raise ZeroShotInputError(f"include_path {inc} is not a folder of lm-eval task YAML files")
        tm = _manager(inc, False)
        if all(n in tm.all_tasks for n in names):
            return tm
    return _manager(inc, True)


def _names(tasks) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if isinstance(n, str)] if all(isinstance(n, str) for n in names) else None
    if not names or any(not n for n in names):
        raise ZeroShotInputError(f"tasks must be one or more lm-eval task names, got {tasks!r}")
    if len(set(names)) != len(names):
        raise ZeroShotInputError(f"tasks {names} name a task twice")
    return names


def _hf_home() -> str:
    return os.environ.get("HF_HOME", "~/.cache/huggingface")


def load_tasks(tasks, include_path=None):
    """``(manager, objects, leaves)``: the lm-eval task (or group) objects for ``tasks``, built now,
    which loads their datasets, and the leaf tasks by name. A :class:`ZeroShotInputError` that says
    what to do for an unknown name, a dataset that cannot be loaded (offline: not downloaded), or a
    task that does not score log-likelihoods (generative tasks are not evaluated here)."""
    names = _names(tasks)
    tm = task_manager(names, include_path)
    unknown = [n for n in names if n not in tm.all_tasks and not Path(n).is_file()]
    if unknown:
        where = "lm-eval's tasks" + ("" if include_path is None else f" or {include_path}")
        raise ZeroShotInputError(f"unknown task(s) {', '.join(unknown)}: not a task, group or tag of {where}; "
                                 f"{LIST_HINT}")
    objs, leaves = [], {}
    for n in names:
        try:
            got = tm.load([n])
        except Exception as e:  # noqa: BLE001 - datasets/hub/yaml errors of every kind: one line that names the task
            cfg = getattr(tm.task_index.get(n), "cfg", None) or {}
            ds = cfg.get("dataset_path")
            ds = f" ({ds}{'/' + cfg['dataset_name'] if cfg.get('dataset_name') else ''})" if ds else ""
            raise ZeroShotInputError(
                f"task {n}: its dataset{ds} cannot be loaded: {type(e).__name__}: {cli.one_line(e)[:300]}; lm-eval "
                "downloads it from the Hugging Face Hub on first use: run once where there is network access "
                f"(without HF_DATASETS_OFFLINE=1), e.g. python -c \"from lm_eval.tasks import TaskManager; "
                f"TaskManager().load(['{n}'])\", then copy the datasets cache ({_hf_home()}/datasets) here") from None
        objs.extend(list(got["groups"].values())[:1] or list(got["tasks"].values()))
        leaves.update(got["tasks"])
    bad = {k: t.OUTPUT_TYPE for k, t in leaves.items() if t.OUTPUT_TYPE not in SCORED}
    if bad:
        raise ZeroShotInputError(f"task(s) {', '.join(f'{k} ({v})' for k, v in bad.items())} are not scored by "
                                 f"log-likelihood ({' or '.join(SCORED)}); only those are evaluated here "
                                 "(generation would decode token by token, where a sequence transform has no "
                                 "sequence to act on)")
    return tm, objs, leaves


# ----------------------------------------------------------------------------- the lm-eval model
@functools.cache
def _lm_class():
    from lm_eval.models.huggingface import HFLM

    class RecipeLM(HFLM):
        """``HFLM`` around a model object, which checks every request against the recipe's
        high-precision rows before the first forward and records the request lengths."""

        def __init__(self, *args, hp_tokens: int = 0, bars: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.hp_tokens, self.bars, self.lengths, self.truncated = hp_tokens, bars, [], 0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.bars)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            cap = self.max_length + 1
            n = [min(len(c) + len(x), cap) - 1 for _, c, x in requests]  # the forward's length (HFLM's rule)
            self.truncated += sum(len(c) + len(x) > cap for _, c, x in requests)
            if n and self.hp_tokens and min(n) <= self.hp_tokens:
                short = sum(k <= self.hp_tokens for k in n)
                raise ZeroShotInputError(
                    f"{short} of {len(n)} requests have at most hp_tokens={self.hp_tokens} tokens (shortest: "
                    f"{min(n)}); every row of such a forward would get the high-precision bits; use hp_tokens "
                    f"below {min(n)} (1 is the default of this experiment)")
            self.lengths.extend(n)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm or not self.bars,
                                                 override_bs=override_bs)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise ZeroShotInputError("rolling log-likelihood (perplexity) tasks are not evaluated here; "
                                     "perplexity is `python -m stamp_lib llm`")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise ZeroShotInputError("generative tasks are not evaluated here (see load_tasks)")

    return RecipeLM


@contextlib.contextmanager
def _no_retie(model):
    """``HFLM.__init__`` calls ``model.tie_weights()``; a model given to us must come back
    unchanged, so the call is a no-op while the wrapper is built."""
    saved = vars(model).get("tie_weights")
    model.tie_weights = lambda *a, **k: None
    try:
        yield
    finally:
        if saved is None:
            del model.tie_weights
        else:
            model.tie_weights = saved


@contextlib.contextmanager
def _request_bars(on: bool):
    """lm-eval's bar over the questions while it builds the requests has no switch: off, it is
    built disabled for the duration of the call."""
    import lm_eval.api.task as task_module

    saved = task_module.tqdm
    if not on:
        task_module.tqdm = functools.partial(saved, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = saved


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return None


def _float(v):
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _task_result(name: str, r: dict, ns: dict | None, output_type: str | None, samples: list | None) -> dict:
    metrics = {}
    for k, v in r.items():
        if "," not in k:
            continue
        m, filt = k.split(",", 1)
        if m.endswith("_stderr"):
            continue
        metrics[m if filt == "none" else k] = {"value": _float(v), "stderr": _float(r.get(f"{m}_stderr,{filt}"))}
    out = {"n": (ns or {}).get("effective"), "n_available": (ns or {}).get("original"), "output_type": output_type}
    for m in ("acc", "acc_norm"):
        if m in metrics:
            out[m], out[f"{m}_stderr"] = metrics[m]["value"], metrics[m]["stderr"]
    out["metrics"] = metrics
    if samples is not None:
        def ll(x):
            return float(x[0] if isinstance(x, (tuple, list)) else x)

        rows = sorted(samples, key=lambda s: s["doc_id"])
        out["samples"] = [{"doc_id": s["doc_id"], "target": s.get("target"),
                           "loglikelihoods": [ll(x) for x in s["filtered_resps"]],
                           **{m: _float(s[m]) for m in ("acc", "acc_norm") if m in s}} for s in rows]
    return out


def evaluate_zeroshot(model, tokenizer, recipe: Recipe, prepared: rcp.Prepared | None, tasks, *,
                      limit: int | None = None, include_path=None, batch_size: int = 1, seed: int = 0, calib=None,
                      progress: bool = False) -> dict:
    """Zero-shot accuracy of ``model`` under ``recipe`` on lm-eval ``tasks`` (names, groups or tags;
    see the module docstring). The quantization is active only inside this call (:func:`rcp.apply`;
    the model's parameters, hooks and train/eval mode are restored on return); ``prepared`` from
    :func:`stamp_lib.model.recipe.prepare` (``None``: computed here, from ``calib`` where the recipe
    calibrates).

    ``limit``: the first ``limit`` questions of each task (``None``: all). ``include_path``: a folder
    of task YAML files (the local task). ``batch_size``: 1 with a sequence transform (padding would
    be transformed with the request; see the module docstring). ``seed``: lm-eval's seeds.
    ``progress``: lm-eval's progress bars (off: none of them).

    Returns ``{"tasks": {name: {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n",
    "n_available", "metrics", "samples"}}, "recipe", "knobs", "requests", "act_bits_spent",
    "kv_bits_spent", "seconds"}``; ``samples`` holds per question the summed log-likelihood of each
    choice, the gold index and the question's ``acc`` / ``acc_norm``."""
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ZeroShotInputError(f"limit must be None or an int >= 1 (questions per task), got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ZeroShotInputError(f"batch_size must be an int >= 1, got {batch_size!r}")
    mixing = _transforms(recipe)
    if batch_size > 1 and mixing:
        raise ZeroShotInputError(f"batch_size={batch_size} with the sequence transform {'/'.join(mixing)}: lm-eval "
                                 "right-pads a batch and the transform would mix the padding into the request; "
                                 "use batch_size=1 (a larger batch is exact only without a sequence transform)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ZeroShotInputError(f"seed must be an int >= 0, got {seed!r}")
    import lm_eval

    tm, objs, leaves = load_tasks(tasks, include_path)
    hp = _hp_tokens(recipe)
    training = model.training
    t0 = time.perf_counter()
    with _no_retie(model):
        lm = _lm_class()(pretrained=model, tokenizer=copy.deepcopy(tokenizer), backend="causal",
                         batch_size=batch_size, hp_tokens=hp, bars=progress)
    try:
        with _request_bars(progress), rcp.apply(model, recipe, prepared, calib, progress=False) as st:
            res = lm_eval.simple_evaluate(model=lm, tasks=objs, task_manager=tm, num_fewshot=0, limit=limit,
                                          log_samples=True, random_seed=seed, numpy_random_seed=seed,
                                          torch_random_seed=seed, fewshot_random_seed=seed)
    finally:
        model.train(training)
    lens = lm.lengths
    lv = _dwt_levels(recipe)
    levels_applied = None
    if lv is not None and lens:
        levels_applied = [min(lv, transforms.max_levels_1d(min(lens))), min(lv, transforms.max_levels_1d(max(lens)))]
    out_tasks = {name: _task_result(name, r, res["n-samples"].get(name),
                                    leaves[name].OUTPUT_TYPE if name in leaves else None,
                                    res.get("samples", {}).get(name))
                 for name, r in res["results"].items()}
    return {
        "recipe": recipe.knobs(),
        "tasks": out_tasks,
        "act_bits_spent": st.average_bits("act"),
        "kv_bits_spent": st.average_bits("kv"),
        "requests": {"n": len(lens), "min_tokens": min(lens, default=None), "max_tokens": max(lens, default=None),
                     "mean_tokens": (sum(lens) / len(lens)) if lens else None, "truncated": lm.truncated},
        "knobs": {"tasks": _names(tasks), "limit": limit, "num_fewshot": 0, "batch_size": batch_size, "seed": seed,
                  "include_path": None if include_path is None else str(include_path), "max_length": lm.max_length,
                  "hp_tokens": hp, "levels_applied": levels_applied, "lm_eval": _version("lm_eval"),
                  "datasets": _version("datasets"),
                  "scoring": "summed log-likelihood of each choice's tokens after the prompt (lm-eval); acc: argmax, "
                             "acc_norm: argmax of log-likelihood / characters of the choice"},
        "seconds": round(time.perf_counter() - t0, 2),
    }


def paired_accuracy(base: dict, other: dict, metric: str = "acc") -> dict:
    """``other`` - ``base`` (two :func:`evaluate_zeroshot` results) per task, paired on the same
    questions: mean difference of the per-question ``metric`` with its standard error (sd of the
    differences / sqrt(n)), how many questions changed each way."""
    out = {}
    for name, bt in base["tasks"].items():
        ot = other["tasks"].get(name)
        if ot is None or "samples" not in bt or "samples" not in ot:
            continue
        b = {s["doc_id"]: s.get(metric) for s in bt["samples"]}
        o = {s["doc_id"]: s.get(metric) for s in ot["samples"]}
        ids = [i for i in b if i in o and b[i] is not None and o[i] is not None]
        if not ids:
            continue
        d = torch.tensor([o[i] - b[i] for i in ids], dtype=torch.float64)
        mean, se = stats.mean_se(d)
        out[name] = {"metric": metric, "delta": mean, "se": None if math.isnan(se) else se, "n": len(ids),
                     "gained": int((d > 0).sum()), "lost": int((d < 0).sum())}
    return out


# ----------------------------------------------------------------------------- command line
PROG = "python -m stamp_lib zeroshot"


def _parser() -> argparse.ArgumentParser:
    p = cli.Parser(prog=PROG, description=(
        "Zero-shot accuracy (lm-eval, log-likelihood tasks) of the model under a quantization recipe, with and "
        "without STaMP (fake quantization). Prints acc / acc_norm with their standard errors and writes a results "
        "file with every knob, the per-question scores and the command line."))
    llm.add_model_options(p)
    p.add_argument("--tasks", required=True,
                   help=f"comma-separated lm-eval tasks/groups/tags (usual: {','.join(USUAL_TASKS)}; their datasets "
                        f"must be downloaded first), or {LOCAL_TASK} with --include-path tests/data/zeroshot")
    p.add_argument("--include-path", default=None, help="folder of extra lm-eval task YAML files (the local task)")
    p.add_argument("--limit", type=int, default=None, help="first N questions of each task (default: all)")
    p.add_argument("--stamp", default="none",
                   help=f"comma-separated columns, each one of {', '.join(llm.STAMPS)} (none = bit-matched baseline); "
                        "evaluated with one weight preparation and compared paired with the first")
    p.add_argument("--with-fp", action="store_true", help="also evaluate the unquantized model (the fp recipe)")
    p.add_argument("--levels", type=int, default=None,
                   help="Haar levels for dwt (default: full depth on every request, ceil(log2 s))")
    llm.add_bits_options(p)
    p.add_argument("--hp-tokens", type=int, default=1,
                   help="high-precision rows of each request (default 1; 0: uniform bits); every request must be "
                        "longer")
    p.add_argument("--hp-bits", type=int, default=8, help="bits of the high-precision rows, 2..16")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength, 0..1")
    p.add_argument("--hadamard-seed", type=int, default=0,
                   help="random signs of QuaRot's / the per-linear rotation, FlatQuant's random start")
    p.add_argument("--calib-windows", type=int, default=8,
                   help="calibration windows (SmoothQuant, GPTQ, FlatQuant): of the Wikipedia stand-in's calibration "
                        "articles, or random windows of WikiText-2's train split drawn with --seed")
    llm.add_data_options(p)
    p.add_argument("--calib-seq-len", type=int, default=2048, help="tokens per calibration window, >= 2")
    p.add_argument("--batch-size", type=int, default=1, help="requests per forward; 1 with a sequence transform")
    p.add_argument("--seed", type=int, default=0, help="lm-eval's random seeds")
    llm.add_device_options(p)
    p.add_argument("--out", default=None, help="results file (JSON); default data/results/zeroshot/<model>-<recipe>.json")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no messages: only the result lines")
    return p


def _stamps(a) -> list[str]:
    return [s.strip() for s in str(a.stamp).split(",")]


def _tasks(a) -> list[str]:
    return [t.strip() for t in str(a.tasks).split(",")]


def validate(a: argparse.Namespace) -> None:
    """Check parsed arguments before anything is loaded (:class:`cli.BadInput`, one line)."""
    tasks = _tasks(a)
    if not all(tasks):
        raise cli.BadInput(f"--tasks {a.tasks!r}", f"needs one or more comma-separated task names; {LIST_HINT}")
    if len(set(tasks)) != len(tasks):
        raise cli.BadInput(f"--tasks {a.tasks}", "names a task twice; give each once")
    if a.limit is not None:
        cli.whole(a.limit, "--limit", "questions per task", hint=" (drop --limit for all)")
    if a.include_path is not None and not Path(a.include_path).is_dir():
        raise cli.BadInput(f"--include-path {a.include_path}", "is not a folder; pass the folder that holds the task "
                                                               "YAML files (e.g. tests/data/zeroshot)")
    stamps = _stamps(a)
    bad = [s for s in stamps if s not in llm.STAMPS]
    if bad or not stamps:
        raise cli.BadInput(f"--stamp {a.stamp}", f"each column must be one of {', '.join(llm.STAMPS)}, comma-separated "
                                                 "(e.g. --stamp none,dwt)")
    if len(set(stamps)) != len(stamps):
        raise cli.BadInput(f"--stamp {a.stamp}", "names a column twice; give each once")
    if a.method == "fp" and stamps != ["none"]:
        raise cli.BadInput(f"--method fp --stamp {a.stamp}", "fp quantizes nothing, so a sequence transform has no "
                                                             "effect; drop --stamp or pick a quantized --method")
    if a.method == "fp" and a.with_fp:
        raise cli.BadInput("--method fp --with-fp", "fp is already the unquantized model; drop --with-fp")
    cli.bits(a.a_bits, "--a-bits", "activation bits")
    cli.bits(a.w_bits, "--w-bits", "weight bits")
    cli.bits(a.kv_bits, "--kv-bits", "K/V bits", off="K/V in full precision")
    cli.bits(a.hp_bits, "--hp-bits", "high-precision bits")
    cli.whole(a.hp_tokens, "--hp-tokens", "high-precision tokens", lo=0,
              hint=" (every request must be longer; 1 is the default)")
    cli.fraction(a.alpha, "--alpha", "the SmoothQuant migration strength")
    cli.whole(a.hadamard_seed, "--hadamard-seed", "the Hadamard seed", lo=0)
    cli.whole(a.calib_windows, "--calib-windows", "calibration windows", lo=0)
    cli.whole(a.calib_seq_len, "--calib-seq-len", "tokens per calibration window", lo=2)
    llm.check_data_options(a)
    cli.whole(a.batch_size, "--batch-size", "requests per forward")
    cli.whole(a.seed, "--seed", "the seed", lo=0)
    cli.check_threads(a.threads)
    if a.levels is not None:
        if "dwt" not in stamps:
            raise cli.BadInput(f"--levels {a.levels}", f"Haar levels apply to the dwt column only (got --stamp "
                                                       f"{a.stamp}); drop --levels or add dwt to --stamp")
        cli.whole(a.levels, "--levels", "Haar levels", lo=1, hint=" (each request caps it at ceil(log2 s))")
    if a.kv_stamp and (a.method == "fp" or stamps == ["none"] or not a.kv_bits):
        raise cli.BadInput("--kv-stamp", "transforms quantized K/V, so it needs a quantized method, a sequence "
                                         "transform in --stamp and --kv-bits > 0; drop --kv-stamp or add them")
    mixing = [s for s in stamps if s != "none"]
    if a.batch_size > 1 and mixing and a.method != "fp":
        raise cli.BadInput(f"--batch-size {a.batch_size} --stamp {a.stamp}",
                           f"lm-eval right-pads a batch and the {'/'.join(mixing)} transform would mix the padding into "
                           "each request; pass --batch-size 1 (a larger batch is exact only without a transform)")
    if a.method == "flatquant" and a.weights != "rtn":
        raise cli.BadInput(f"--method flatquant --weights {a.weights}", "FlatQuant quantizes its weights itself; "
                                                                       "pass --weights rtn")
    if a.device is not None and a.device_map is not None:
        raise cli.BadInput(f"--device {a.device} --device-map {a.device_map}",
                           "give one of them: --device moves the whole model, --device-map spreads it over GPUs")
    cli.check_device(a.device)
    if a.device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise cli.BadInput(f"--device-map {a.device_map}", "needs the accelerate package; pip install accelerate, "
                                                          "or use --device instead")
    if a.dtype == "float16" and llm._is_gemma(a.model):
        raise cli.BadInput(f"--model {a.model} --dtype float16", "Gemma's activations overflow float16; pass "
                                                                 "--dtype bfloat16 or --dtype float32")
    r = _cli_recipe(a, stamps[0])
    if r.needs_calibration() and a.calib_windows < 1:
        raise cli.BadInput(f"--calib-windows {a.calib_windows}", f"--method {a.method} --weights {a.weights} needs "
                                                                 "calibration windows; pass --calib-windows 1 or more")
    if importlib.util.find_spec("lm_eval") is None:
        raise cli.BadInput("lm-eval", "is not installed; pip install -r requirements.txt (it pins lm_eval)")


def _cli_recipe(a, stamp: str, max_length: int = DEFAULT_MAX_LENGTH) -> Recipe:
    try:
        return zeroshot_recipe(a.method, weights=a.weights, stamp=stamp, levels=a.levels, a_bits=a.a_bits,
                               w_bits=a.w_bits, kv_bits=a.kv_bits or None, hp_tokens=a.hp_tokens, hp_bits=a.hp_bits,
                               kv_stamp=a.kv_stamp, alpha=a.alpha, hadamard_seed=a.hadamard_seed,
                               max_length=max_length)
    except ValueError as e:  # pragma: no cover - validate() checks every knob first
        raise cli.BadInput("arguments", str(e)) from None


@contextlib.contextmanager
def _lm_eval_logs(level: int):
    lg = logging.getLogger("lm_eval")
    saved = lg.level
    lg.setLevel(level)
    try:
        yield
    finally:
        lg.setLevel(saved)


def _line(model: str, r: Recipe, res: dict, bits: str) -> list[str]:
    out = []
    for name, t in res["tasks"].items():
        parts = [f"{m} {t[m]:.4f} +- {t[m + '_stderr']:.4f}" if t.get(m + "_stderr") is not None else f"{m} {t[m]:.4f}"
                 for m in ("acc", "acc_norm") if t.get(m) is not None]
        out.append(f"{model} {r.name} {bits} {name}: {', '.join(parts) or 'no accuracy'} (n={t['n']}); bits spent: "
                   f"activations {res['act_bits_spent']:.4f}, KV {res['kv_bits_spent']:.4f}")
    return out


def main(argv=None) -> dict:
    p = _parser()
    a = cli.parse(p, argv, validate)
    quiet = a.quiet
    bars = not (quiet or a.no_progress)
    with cli.guard(p, quiet=quiet), cli.torch_threads(a.threads), _lm_eval_logs(logging.ERROR):
        t0 = time.perf_counter()
        tasks, stamps = _tasks(a), _stamps(a)
        try:
            load_tasks(tasks, a.include_path)  # unknown names, missing datasets: before the model loads
        except ZeroShotInputError as e:
            raise cli.BadInput(f"--tasks {a.tasks}", str(e)) from None
        lines = llm.check_inputs(a)  # the model and the calibration text are installed; one line otherwise
        cli.hide_library_bars()
        try:
            model, tok = llm.load(a.model, a.device, a.device_map, a.dtype)
        except (models.ModelPackageMissing, models.ModelNotAvailable) as e:
            raise cli.BadInput(f"--model {a.model}", f"{e}; {cli.MODEL_PACKAGES_HINT}") from None
        from lm_eval.models.utils import DEFAULT_MAX_LENGTH as LM_EVAL_DEFAULT
        from lm_eval.models.utils import resolve_max_length

        max_length = int(resolve_max_length(model.config, tok, default=LM_EVAL_DEFAULT))  # HFLM's own rule
        recipes = [_cli_recipe(a, s, max_length) for s in stamps]
        dev = next(model.parameters()).device
        n_cal = a.calib_windows if recipes[0].needs_calibration() else 0
        cal = None
        if n_cal:
            try:
                if lines is None:
                    cal = text.token_windows(tok, text.wiki_split()[0], a.calib_seq_len, n_cal)
                else:
                    cal = text.random_windows(tok, lines["train"], a.calib_seq_len, n_cal, seed=a.seed)
                cal = cal.to(dev)
            except ValueError as e:
                raise cli.BadInput(f"--calib-windows {n_cal} --calib-seq-len {a.calib_seq_len}", str(e)) from None
        prep = rcp.prepare(model, recipes[0], cal, progress=False)
        kw = dict(tasks=tasks, limit=a.limit, include_path=a.include_path, batch_size=a.batch_size, seed=a.seed,
                  progress=bars)
        runs = []
        bits = f"W{a.w_bits}A{a.a_bits}KV{a.kv_bits or 16}"
        try:
            if a.with_fp:
                fp = llm.llm_recipe("fp")
                runs.append((fp, "FP", evaluate_zeroshot(model, tok, fp, None, **kw)))
            for r in recipes:
                runs.append((r, bits if a.method != "fp" else "FP", evaluate_zeroshot(model, tok, r, prep, **kw)))
        except ZeroShotInputError as e:
            raise cli.BadInput(f"--hp-tokens {a.hp_tokens}" if "hp_tokens" in str(e) else f"--tasks {a.tasks}",
                               str(e)) from None
        facts = cli.run_facts(dev if a.device_map is None else f"device_map={a.device_map}", a.dtype)
    for r, b, res in runs:
        for line in _line(a.model, r, res, b):
            print(line)
    quant = [res for r, _, res in runs if r.name != "fp" or a.method == "fp"]
    paired = []
    for res in quant[1:]:
        for metric in ("acc", "acc_norm"):
            for task, d in paired_accuracy(quant[0], res, metric).items():
                paired.append({"task": task, "base": quant[0]["recipe"]["name"], "other": res["recipe"]["name"], **d})
    for d in paired:
        se = "nan" if d["se"] is None else f"{d['se']:.4f}"
        print(f"paired on the same {d['n']} questions of {d['task']}: {d['other']} - {d['base']}: {d['metric']} "
              f"{d['delta']:+.4f} +- {se} (s.e.; {d['gained']} gained, {d['lost']} lost)")
    applied = {"threads": facts["torch_threads"], "device": str(dev) if a.device_map is None else None}
    out = {"model": a.model, "tasks": tasks, "include_path": a.include_path, "limit": a.limit, "dtype": a.dtype,
           "runs": [res for _, _, res in runs], "paired": paired,
           "applied": {"max_length": max_length, "calib_windows": n_cal,
                       "calib_data": (a.dataset if lines is None else "wikitext2 train") if n_cal else None, **facts},
           "command": cli.command_line(p, a, applied=applied, skip=("quiet", "no_progress")),
           "protocol": "lm-eval zero-shot: each choice scored by the summed log-likelihood of its tokens after the "
                       "prompt, one request per forward (batch 1 with a sequence transform); acc = argmax, acc_norm = "
                       "argmax of log-likelihood per character",
           "simulated": "fake quantization in floating point", "wall_s": round(time.perf_counter() - t0, 1)}
    stem = f"{a.model.replace('/', '_')}-{a.method}-{a.weights}-{'_'.join(stamps)}"
    path = Path(a.out) if a.out else results_dir() / "zeroshot" / f"{stem}.json"
    write_json(path, out, quiet=quiet)
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
