"""The language-model experiment: recipes of the Table 2 rows, paired evaluation, the CLI on
checkpoint folders (tiny random-init LLaMA and Gemma-3 configurations with a real tokenizer)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stamp_lib.core import transforms
from stamp_lib.experiments import llm

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def tokenizer():
    from stamp_lib.zoo import models

    _, tok = models.load_smollm2()
    return tok


def _save_tiny(kind, path, tok):
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, head_dim=16)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(**common, sliding_window=32, query_pre_attn_scalar=16))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_paper_runs_show_the_paper_models_files_beside_the_paper(tmp_path, tokenizer):
    """Chapter 3's 'paper's models' table: the results files the CLI wrote for a checkpoint named
    as a paper model are paired without -> with STaMP and shown beside the paper's Table 2 cell;
    other models' files are ignored, an unreadable file is listed, never fatal."""
    from stamp_lib.experiments import runbook

    paper = _save_tiny("llama", tmp_path / "Meta-Llama-3-8B", tokenizer)
    other = _save_tiny("llama", tmp_path / "my-model", tokenizer)
    res = tmp_path / "res"
    for folder, stamp in ((paper, "none"), (paper, "dwt"), (other, "dwt")):
        llm.main(["--model", str(folder), "--stamp", stamp, "--seq-len", "64", "--windows", "1", "--hp-tokens", "4",
                  "--out", str(res / f"{folder.name}-{stamp}.json"), "--no-progress", "--quiet"])
    (res / "broken.json").write_text("{")
    runs = runbook.paper_runs("llm", res)
    assert [r["stamp"] for r in runs.rows] == ["dwt", "none"] and {r["model"] for r in runs.rows} == {"Llama-3-8B"}
    assert [f for f, _ in runs.skipped] == ["broken.json"]
    header, rows = runbook.paper_table(runs)
    ppl = {r["stamp"]: r["ppl"] for r in runs.rows}
    assert rows == [["Llama-3-8B", "rtn (rtn)", "W4A4KV4", "wiki, 1 x 64", f"{ppl['none']:.4g} → {ppl['dwt']:.4g}",
                     "668 → 95.3"]]
    assert runbook.paper_runs("llm", tmp_path / "none").rows == []


@pytest.mark.parametrize("kind, method, weights", [("llama", "quarot", "gptq"), ("gemma3", "smoothquant", "rtn")])
def test_cli_runs_a_checkpoint_folder_and_writes_every_knob(tmp_path, tokenizer, kind, method, weights, capsys):
    folder = _save_tiny(kind, tmp_path / kind, tokenizer)
    out = tmp_path / "res.json"
    res = llm.main(["--model", str(folder), "--method", method, "--weights", weights, "--stamp", "dwt",
                    "--seq-len", "128", "--windows", "2", "--calib-windows", "1", "--hp-tokens", "16",
                    "--out", str(out), "--no-progress", "--cells", str(tmp_path / "cells")])
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "over 2 windows of 128 tokens" in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    rule = saved["recipe"]["rules"][0]
    assert rule["act"]["transform"] == "dwt" and rule["act"]["levels"] == 3  # log2(128 / 16)
    assert rule["act"]["hp_tokens"] == 16 and rule["weight"]["method"] == weights
    assert rule["feature"] == {"quarot": None, "smoothquant": "smoothquant"}[method]
    assert saved["recipe"].get("network") == ("quarot" if method == "quarot" else None)
    assert saved["recipe"]["kv"]["lp_bits"] == 4 and saved["calib_windows"] == 1
    ev = saved["eval"]
    assert len(ev["nll_per_window"]) == 2 and math.isfinite(ev["ppl"])
    assert ev["act_bits_spent"] == pytest.approx(4 + 4 * 16 / 128)
    assert ev["kv_bits_spent"] == pytest.approx(4 + 4 * 16 / 128)
    # what ran, and the command that reruns it (every option spelled out, levels as applied)
    assert saved["applied"]["levels"] == 3 and saved["applied"]["device"] == "cpu"
    assert saved["applied"]["torch_threads"] >= 1 and saved["seeds_drawn"] == {
        "hadamard_seed": 0 if method == "quarot" else None, "draw": 0}
    cmd = saved["command"]
    assert cmd.startswith("python -m stamp_lib llm --model ") and "--levels 3 " in cmd and "--kv-bits 4 " in cmd
    assert f"--out {out}" in cmd and "--no-progress" not in cmd
    assert llm.validate(llm._parser().parse_args(cmd.split()[4:])) is None


def test_fp_recipe_equals_the_plain_model(tmp_path, tokenizer):
    from stamp_lib.zoo import models

    folder = _save_tiny("llama", tmp_path / "m", tokenizer)
    model, tok = llm.load(str(folder))
    ev, _ = llm.eval_data(tok, 64, 2)
    plain = models.window_nll(model, ev, progress=False)
    got = llm.evaluate(model, ev, llm.llm_recipe("fp"), progress=False)
    assert torch.equal(got.nll, plain)


def test_table_pairs_columns_on_the_same_windows(tmp_path, tokenizer):
    folder = _save_tiny("llama", tmp_path / "m", tokenizer)
    model, tok = llm.load(str(folder))
    ev, cal = llm.eval_data(tok, 64, 3, 1)
    t = llm.run_table(model, ev, cal, rows=(("rtn", "rtn"), ("smoothquant", "rtn")), columns=("none", "dwt", "dwt+kv"),
                      hp_tokens=8, progress=False)
    assert set(t.cells) == {("rtn", "rtn"), ("smoothquant", "rtn")}
    kv = t.cells[("rtn", "rtn")]["dwt+kv"][0].knobs["kv"]
    assert kv["transform"] == "dwt" and t.cells[("rtn", "rtn")]["dwt"][0].knobs["kv"]["transform"] == "identity"
    p = t.paired(("rtn", "rtn"), "dwt")
    d = t.cells[("rtn", "rtn")]["dwt"][0].nll - t.cells[("rtn", "rtn")]["none"][0].nll
    assert p["delta_nll"] == pytest.approx(float(d.mean())) and p["n"] == 3
    assert p["ppl_ratio"] == pytest.approx(math.exp(float(d.mean())))
    sq = llm.layer_sqnr(model, ev[0], llm.llm_recipe("rtn", stamp="dwt", hp_tokens=8, seq_len=64))
    assert len(sq) == 14 and all(math.isfinite(v) for v in sq.values())


def test_cli_runs_flatquant_with_stamp_and_records_its_calibration(tmp_path, tokenizer):
    """--method flatquant: calibrated on the calibration windows (epochs and batch as given), STaMP
    (DWT, 16 rows at 8 bits) around FlatQuant's quantizers, every FlatQuant knob in the record; a
    FlatQuant row in a table is drawn over seeds and calibration blocks."""
    folder = _save_tiny("gemma3", tmp_path / "g", tokenizer)
    out = tmp_path / "res.json"
    res = llm.main(["--model", str(folder), "--method", "flatquant", "--stamp", "dwt", "--seq-len", "64",
                    "--windows", "2", "--calib-windows", "2", "--fq-epochs", "1", "--fq-batch-size", "1",
                    "--hp-tokens", "8", "--out", str(out), "--no-progress", "--cells", str(tmp_path / "cells")])
    cfg = res["recipe"]["network_config"]
    assert res["recipe"]["network"] == "flatquant" and cfg["epochs"] == 1 and cfg["batch_size"] == 1
    assert cfg["a_bits"] == 4 and cfg["kv_bits"] == 4 and res["calib_windows"] == 2
    assert math.isfinite(res["eval"]["ppl"]) and res["eval"]["act_bits_spent"] == pytest.approx(4 + 4 * 8 / 64)
    assert "--fq-epochs 1 " in res["command"] and "--method flatquant " in res["command"]
    model, tok = llm.load(str(folder))
    ev, cal = llm.eval_data(tok, 32, 2, 4)
    t = llm.run_table(model, ev, cal, rows=(("flatquant", "rtn"),), columns=("uniform", "none", "dwt"), draws=2,
                      hp_tokens=4, progress=False, store=False, flatquant=dict(epochs=1, batch_size=1))
    fqr = t.cells[("flatquant", "rtn")]
    assert [len(fqr[c]) for c in ("uniform", "none", "dwt")] == [1, 2, 2]
    assert not torch.equal(fqr["none"][0].nll, fqr["none"][1].nll)  # another seed and calibration block
    assert llm.row_randomness("flatquant", "rtn") == ("seed", "calibration")


def test_table_draws_calibration_and_pairs_on_draw_and_window(tmp_path, tokenizer):
    """A row with randomness is evaluated once per draw (draw k: the k-th block of calibration
    windows); a row without any, and the single-draw columns, once; comparisons pair (draw, window)."""
    folder = _save_tiny("llama", tmp_path / "m", tokenizer)
    model, tok = llm.load(str(folder))
    ev, cal = llm.eval_data(tok, 64, 3, 2)
    t = llm.run_table(model, ev, cal, rows=(("rtn", "rtn"), ("smoothquant", "rtn")), columns=("uniform", "none", "dwt"),
                      draws=2, hp_tokens=8, progress=False)
    rtn, sq = t.cells[("rtn", "rtn")], t.cells[("smoothquant", "rtn")]
    assert [len(rtn[c]) for c in ("uniform", "none", "dwt")] == [1, 1, 1]
    assert [len(sq[c]) for c in ("uniform", "none", "dwt")] == [1, 2, 2]
    assert not torch.equal(sq["none"][0].nll, sq["none"][1].nll)  # another calibration draw, other scales
    assert sq["uniform"][0].act_bits == 4.0 and sq["none"][0].act_bits == pytest.approx(4 + 4 * 8 / 64)
    p = t.paired(("smoothquant", "rtn"), "dwt")
    d = torch.stack([e.nll for e in sq["dwt"]]) - torch.stack([e.nll for e in sq["none"]])
    assert p["draws"] == 2 and p["n"] == 6 and p["delta_nll"] == pytest.approx(float(d.mean()))
    assert p["ci95_lo"] <= p["delta_nll"] <= p["ci95_hi"]
    lv = t.level(("rtn", "rtn"), "none")
    assert lv["ppl"] == pytest.approx(math.exp(float(rtn["none"][0].nll.mean())))
    assert torch.equal(llm.calibration_draw(cal, 2, 1), cal[1:2])
    with pytest.raises(ValueError, match="cannot make 3 draws"):
        llm.calibration_draw(cal, 3, 0)


def test_recipes_and_errors():
    assert transforms.haar_levels(2048, 64) == 5 and transforms.haar_levels(512, 64) == 3
    r = llm.llm_recipe("quarot", weights="gptq", stamp="dct")
    assert r.network == "quarot" and r.network_seed == 0 and r.rules[0].feature is None
    assert r.rules[0].act.transform == "dct" and r.kv.transform == "identity"
    h = llm.llm_recipe("hadamard", hadamard_seed=3)
    assert h.rules[0].feature == "hadamard" and h.rules[0].hadamard_seed == 3 and h.network is None
    u = llm.llm_recipe("rtn", hp_tokens=0)
    assert u.rules[0].act.bits == 4 and u.kv.bits == 4 and u.rules[0].act.average_bits(2048) == 4.0
    assert llm.llm_recipe("fp").rules[0].act is None and llm.llm_recipe("fp").kv is None
    assert llm.llm_recipe("rtn", kv_bits=None).kv is None
    with pytest.raises(ValueError, match="unknown method"):
        llm.llm_recipe("awq")
    with pytest.raises(ValueError, match="unknown STaMP transform"):
        llm.llm_recipe("rtn", stamp="fft")
    with pytest.raises(ValueError, match="bad column"):
        llm._column("dwt+q")
    a = llm.Eval(nll=torch.tensor([1.0, 2.0]), knobs={})
    b = llm.Eval(nll=torch.tensor([1.0, 2.0, 3.0]), knobs={})
    with pytest.raises(ValueError, match="same windows"):
        llm.paired(a, b)
    with pytest.raises(ValueError, match="do not fit"):
        llm.evaluate(torch.nn.Linear(2, 2), torch.zeros(1, 32, dtype=torch.long), llm.llm_recipe("rtn"))


def test_cli_refuses_bad_input_with_one_line(capsys):
    """Checked before anything is loaded: exit 2, one line naming the argument, its range and the fix."""
    for argv, says in ((["--seq-len", "32", "--hp-tokens", "64"], "--hp-tokens 64: high-precision tokens must be a "
                                                                 "whole number in [0, 32]"),
                       (["--stamp", "dwt", "--levels", "20", "--seq-len", "256"],
                        "--levels 20: Haar levels must be a whole number in [1, 8]"),
                       (["--windows", "0"], "pass --windows 1 or more"),
                       (["--model", "gemma3-270m", "--dtype", "float16"], "pass --dtype bfloat16 or --dtype float32")):
        with pytest.raises(SystemExit) as e:
            llm.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and says in err, err


# ----------------------------------------------------------------------------- resuming (stamp_lib.core.cells)
def test_cli_reuses_a_stored_cell_and_no_resume_recomputes(tmp_path, tokenizer, capsys):
    """A rerun of the same cell reuses it (same numbers, nothing evaluated); --no-resume computes it
    again; another knob is another cell. The results file says which."""
    folder = _save_tiny("llama", tmp_path / "m", tokenizer)
    cells = tmp_path / "cells"
    argv = ["--model", str(folder), "--method", "smoothquant", "--stamp", "dwt", "--seq-len", "64", "--windows", "2",
            "--calib-windows", "1", "--hp-tokens", "8", "--out", str(tmp_path / "r.json"), "--cells", str(cells)]
    first = llm.main(argv)
    assert first["cells"]["computed"] == 1 and first["cells"]["reused"] == 0
    assert len(list(cells.glob("*.cell"))) == 1
    capsys.readouterr()
    again = llm.main(argv)
    assert "reused the stored cell" in capsys.readouterr().out
    assert again["cells"]["computed"] == 0 and again["cells"]["reused"] == 1
    assert again["eval"]["nll_per_window"] == first["eval"]["nll_per_window"]
    assert again["eval"]["act_bits_spent"] == first["eval"]["act_bits_spent"]
    assert again["command"] == first["command"] and "--cells" not in first["command"]
    assert "resume" not in first["command"]
    fresh = llm.main(argv + ["--no-resume"])
    assert fresh["cells"]["computed"] == 1 and fresh["cells"]["reused"] == 0
    assert fresh["eval"]["nll_per_window"] == first["eval"]["nll_per_window"]  # deterministic
    other = llm.main([*argv, "--hp-bits", "6"])
    assert other["cells"]["computed"] == 1 and len(list(cells.glob("*.cell"))) == 2
    with pytest.raises(SystemExit) as e:
        llm.main([*argv[:-1], str(tmp_path / "r.json")])  # --cells naming a file
    assert e.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err


def test_table_resumes_under_stamp_resume(tmp_path, tokenizer, monkeypatch):
    """``STAMP_RESUME=1`` (what .ci/record_full.py sets) makes run_table use the default store
    (``<STAMP_CACHE>/cells/llm``): a second run reuses every cell, with the same numbers, and
    prepares no row; without it nothing is stored."""
    from stamp_lib.core import cells
    from stamp_lib.model import recipe as rcp

    folder = _save_tiny("llama", tmp_path / "m", tokenizer)
    model, tok = llm.load(str(folder))
    ev, cal = llm.eval_data(tok, 64, 2, 1)
    rows, cols = (("rtn", "rtn"), ("smoothquant", "rtn")), ("none", "dwt")
    monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(cells.ENV_RESUME, raising=False)
    plain = llm.run_table(model, ev, cal, rows, cols, hp_tokens=8, progress=False)
    assert plain.counts == {} and not (tmp_path / "cache" / "cells").exists()
    monkeypatch.setenv(cells.ENV_RESUME, "1")
    first = llm.run_table(model, ev, cal, rows, cols, hp_tokens=8, progress=False)
    assert first.counts == {"computed": 5, "reused": 0}
    assert len(list((tmp_path / "cache" / "cells" / "llm").glob("*.cell"))) == 5
    prepared = []
    real = rcp.prepare
    monkeypatch.setattr(rcp, "prepare", lambda *a, **k: prepared.append(1) or real(*a, **k))
    second = llm.run_table(model, ev, cal, rows, cols, hp_tokens=8, progress=False)
    assert second.counts == {"computed": 0, "reused": 5} and prepared == []
    for t in (first, second):
        assert torch.equal(t.fp.nll, plain.fp.nll)
        for row in rows:
            for col in cols:
                assert torch.equal(t.cells[row][col][0].nll, plain.cells[row][col][0].nll)
            assert t.paired(row, "dwt") == plain.paired(row, "dwt")
    # a cell evaluated on its own is the same cell as the table's (same key)
    r = llm.llm_recipe("smoothquant", stamp="dwt", hp_tokens=8, seq_len=64)
    st = cells.default_store("llm")
    one = llm.evaluate(model, ev, r, calib=cal, progress=False, store=st)
    assert st.counts() == {"computed": 0, "reused": 1}
    assert torch.equal(one.nll, plain.cells[("smoothquant", "rtn")]["dwt"][0].nll)
    # another window set, another calibration set or other weights: other cells
    llm.run_table(model, ev[:1], cal, rows[:1], cols[:1], hp_tokens=8, progress=False, store=st)
    assert st.counts()["computed"] == 2  # FP and rtn/none on one window
    llm.run_table(model, ev, ev[:1], rows[1:], cols[:1], hp_tokens=8, progress=False, store=st)
    assert st.counts()["computed"] == 3  # smoothquant calibrated on other windows (FP reused)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01)
    after = llm.run_table(model, ev, cal, rows[:1], cols[:1], hp_tokens=8, progress=False, store=st)
    assert st.counts()["computed"] == 5 and not torch.equal(after.fp.nll, plain.fp.nll)
