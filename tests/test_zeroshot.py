"""Zero-shot accuracy through lm-eval (stamp_lib.experiments.zeroshot) on the local task of
tests/data/zeroshot, with the tiny random Llama of test_quarot and a 128-token BPE tokenizer
trained here on the task's own text (no download, no model package).

(a) with the fp recipe, lm-eval's acc / acc_norm / stderr equal an independent reference: every
choice scored by the summed log-likelihood of a plain Hugging Face forward; (b) a quantized recipe
changes the scores and the model is restored exactly; the bits rule on short requests; (c) the
command line: bad input is one line and exit 2, and a run writes every knob and the command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_quarot import assert_restored, tiny
from test_recipe import snapshot

from stamp_lib.experiments import llm
from stamp_lib.experiments import zeroshot as zs

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = Path(__file__).parent / "data" / "zeroshot"
TASK = zs.LOCAL_TASK
ROWS = [json.loads(line) for line in (DATA / "local_mc.jsonl").read_text().splitlines() if line.strip()]


def _tokenizer():
    """A BPE tokenizer of 128 tokens (the tiny model's vocabulary) trained on the task's text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    texts = [f"Question: {r['question']}\nAnswer: " + " ".join(r["choices"]) for r in ROWS]
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "</s>"],
                                                      show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", pad_token="</s>")


@pytest.fixture(scope="module")
def tok():
    t = _tokenizer()
    assert len(t) <= 128
    return t


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture(scope="module")
def fp_result(model, tok):
    return zs.evaluate_zeroshot(model, tok, llm.llm_recipe("fp"), None, [TASK], include_path=DATA)


@torch.no_grad()
def _reference(model, tok, max_length: int):
    """Per question: the summed log-likelihood of each choice after the prompt, from the plain
    forward. The context/continuation split is lm-eval's protocol (the metric's definition): the
    prompt "Question: q\\nAnswer:", the continuation " choice", tokens of the whole minus those of
    the prompt, the input = all tokens but the last (cut from the left at max_length + 1)."""
    out = []
    for r in ROWS:
        ctx = f"Question: {r['question']}\nAnswer:"
        c_ids = tok.encode(ctx)
        lls = []
        for ch in r["choices"]:
            whole = tok.encode(ctx + " " + ch)
            cont = whole[len(c_ids):]
            ids = whole[-(max_length + 1):]
            x = torch.tensor(ids[:-1])[None]
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
            pos = torch.arange(len(ids) - 1 - len(cont), len(ids) - 1)
            lls.append(float(logp[pos, torch.tensor(cont)].sum()))
        out.append(lls)
    return out


def _argmax(v):
    return max(range(len(v)), key=lambda i: (v[i], -i))  # first of ties, as numpy's argmax


def _mean_se(x):
    n = len(x)
    m = sum(x) / n
    return m, math.sqrt(sum((v - m) ** 2 for v in x) / (n - 1)) / math.sqrt(n)


# ----------------------------------------------------------------------------- (a) fp = the reference
def test_fp_accuracy_equals_an_independent_reference(model, tok, fp_result):
    t = fp_result["tasks"][TASK]
    ref = _reference(model, tok, fp_result["knobs"]["max_length"])
    assert t["n"] == t["n_available"] == len(ROWS) == 36
    got = [s["loglikelihoods"] for s in t["samples"]]
    assert [s["doc_id"] for s in t["samples"]] == list(range(len(ROWS)))
    for g, r in zip(got, ref):
        assert g == pytest.approx(r, abs=1e-9)
    acc = [float(_argmax(r) == row["answer"]) for r, row in zip(ref, ROWS)]
    acc_norm = [float(_argmax([v / len(c) for v, c in zip(r, row["choices"])]) == row["answer"])
                for r, row in zip(ref, ROWS)]
    for name, per in (("acc", acc), ("acc_norm", acc_norm)):
        m, se = _mean_se(per)
        assert t[name] == pytest.approx(m, abs=1e-12), name
        assert t[f"{name}_stderr"] == pytest.approx(se, abs=1e-12), name
        assert [s[name] for s in t["samples"]] == per
    assert fp_result["requests"]["n"] == 4 * len(ROWS) and fp_result["requests"]["truncated"] == 0
    assert math.isnan(fp_result["act_bits_spent"])  # fp quantizes nothing


# ----------------------------------------------------------------------------- (b) quantized, restored
def test_quantized_recipes_change_the_scores_and_restore_the_model(model, tok, fp_result):
    snap = snapshot(model)
    base = zs.zeroshot_recipe("rtn", stamp=None, max_length=64)
    prep = zs.rcp.prepare(model, base, progress=False)
    fp = [s["loglikelihoods"] for s in fp_result["tasks"][TASK]["samples"]]
    res = {}
    for stamp in ("none", "dwt"):
        r = zs.zeroshot_recipe("rtn", stamp=stamp, max_length=64)
        res[stamp] = zs.evaluate_zeroshot(model, tok, r, prep, TASK, include_path=DATA)
        assert_restored(model, snap)
        got = [s["loglikelihoods"] for s in res[stamp]["tasks"][TASK]["samples"]]
        assert max(abs(a - b) for g, f in zip(got, fp) for a, b in zip(g, f)) > 1e-3, stamp
        assert 0.0 <= res[stamp]["tasks"][TASK]["acc"] <= 1.0
    lo, hi = res["none"]["requests"]["min_tokens"], res["none"]["requests"]["max_tokens"]
    # one row of 8 bits per request, the rest at 4: both columns spend the same bits, 4 + 4/s on average
    for k in ("act_bits_spent", "kv_bits_spent"):
        assert res["none"][k] == pytest.approx(res["dwt"][k])
        assert 4 + 4 / hi <= res["dwt"][k] <= 4 + 4 / lo
    assert res["dwt"]["knobs"]["levels_applied"] == [zs.transforms.max_levels_1d(lo), zs.transforms.max_levels_1d(hi)]
    assert not model.training
    # a paired comparison on the same questions
    d = zs.paired_accuracy(res["none"], res["dwt"])[TASK]
    assert d["n"] == 36 and d["gained"] - d["lost"] == round(36 * d["delta"])


def test_padding_is_harmless_without_a_sequence_transform(model, tok):
    """batch 4 (lm-eval right-pads) scores the bit-matched baseline as batch 1 does."""
    r = zs.zeroshot_recipe("rtn", stamp=None, max_length=64)
    prep = zs.rcp.prepare(model, r, progress=False)
    one, four = (zs.evaluate_zeroshot(model, tok, r, prep, TASK, include_path=DATA, limit=12, batch_size=b)
                 for b in (1, 4))
    for a, b in zip(one["tasks"][TASK]["samples"], four["tasks"][TASK]["samples"]):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-9)


def test_bad_arguments_are_refused_before_any_forward(model, tok):
    snap = snapshot(model)
    dwt = zs.zeroshot_recipe("rtn", stamp="dwt", max_length=64)
    with pytest.raises(zs.ZeroShotInputError, match="hp_tokens=200"):
        zs.evaluate_zeroshot(model, tok, zs.zeroshot_recipe("rtn", stamp="dwt", hp_tokens=200, max_length=64), None,
                             TASK, include_path=DATA, limit=2)
    with pytest.raises(zs.ZeroShotInputError, match="batch_size=2 .* padding"):
        zs.evaluate_zeroshot(model, tok, dwt, None, TASK, include_path=DATA, batch_size=2)
    with pytest.raises(zs.ZeroShotInputError, match="limit"):
        zs.evaluate_zeroshot(model, tok, dwt, None, TASK, include_path=DATA, limit=0)
    assert_restored(model, snap)


# ----------------------------------------------------------------------------- (c) command line
def _one_line_exit_2(capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        zs.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith(f"{zs.PROG}: error:"), err
    for s in says:
        assert s in err, err


@pytest.mark.parametrize("extra, says", [
    (["--limit", "0"], ["--limit 0", ">= 1"]),
    (["--tasks", ","], ["--tasks", "task names"]),
    (["--method", "fp", "--stamp", "dwt"], ["fp quantizes nothing"]),
    (["--stamp", "none,fft"], ["--stamp none,fft", "dwt"]),
    (["--stamp", "dwt", "--batch-size", "2"], ["--batch-size 1"]),
    (["--include-path", "no/such/dir"], ["is not a folder"]),
    (["--hp-tokens", "-1"], ["--hp-tokens -1"]),
    (["--dataset-path", "x"], ["--dataset-path x", "add --dataset wikitext2"]),
    (["--dataset", "wikitext2", "--dataset-path", "no/such/dir"], ["no such folder"]),
    (["--dataset", "wikitext2"], ["--dataset wikitext2"]),  # offline, not in the datasets cache
])
def test_cli_bad_arguments_exit_2_with_one_line(capsys, extra, says):
    base = ["--tasks", TASK, "--include-path", str(DATA)]
    _one_line_exit_2(capsys, base + extra, says)


def test_cli_unknown_task_and_missing_dataset_say_what_to_do(capsys, tmp_path):
    _one_line_exit_2(capsys, ["--tasks", "no_such_task_xyz", "--include-path", str(DATA)],
                     ["unknown task(s) no_such_task_xyz", "lm_eval ls tasks"])
    # a task whose dataset lives on the Hub, offline (HF_DATASETS_OFFLINE=1, tests/conftest.py)
    (tmp_path / "hub.yaml").write_text((DATA / "local_mc.yaml").read_text().replace(
        "task: stamp_local_mc", "task: stamp_hub_mc").replace(
        "custom_dataset: !function local_mc.load", "dataset_path: stamp-tests/no-such-dataset"))
    _one_line_exit_2(capsys, ["--tasks", "stamp_hub_mc", "--include-path", str(tmp_path)],
                     ["stamp_hub_mc", "stamp-tests/no-such-dataset", "cannot be loaded", "network access"])


def test_cli_writes_every_knob_and_the_command(tmp_path, tok, capsys):
    folder = tmp_path / "m"
    tiny("llama").save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "r.json"
    zs.main(["--model", str(folder), "--method", "rtn", "--stamp", "none,dwt", "--with-fp", "--tasks", TASK,
             "--include-path", str(DATA), "--limit", "8", "--out", str(out), "--quiet"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 + 2 and all(TASK in x for x in lines)  # fp, none, dwt; paired acc and acc_norm
    d = json.loads(out.read_text())
    assert [r["recipe"]["name"] for r in d["runs"]] == ["fp", "rtn/rtn", "rtn/rtn+stamp-dwt"]
    assert all(r["tasks"][TASK]["n"] == 8 for r in d["runs"])
    assert d["runs"][2]["recipe"]["rules"][0]["act"]["bits"] == "1x8+4"
    assert d["applied"]["max_length"] == 64 and d["runs"][2]["knobs"]["levels_applied"]
    for flag in ("--tasks stamp_local_mc", "--stamp none,dwt", "--with-fp", "--limit 8", "--hp-tokens 1",
                 "--kv-bits 4", "--batch-size 1", "--seed 0", "--threads 1"):
        assert flag in d["command"], flag
    assert {p["metric"] for p in d["paired"]} == {"acc", "acc_norm"}
