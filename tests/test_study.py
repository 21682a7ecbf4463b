"""The study plumbing and the plotting conventions every chapter relies on.

* claims registry: a bad key or a malformed verdict fails at ``run.verdict``, not only on the
  claims page; every ``run.verdict("<key>", ...)`` written in a notebook names a registered claim;
* results files carry provenance and a code hash; a full-size record whose code changed since is
  stale; the notebook hash ignores prose;
* glue and prose checks; the findings table;
* plotting: a figure whose displayed text would be under 8 pt is refused, colours are fixed per
  name, tables that cannot fit the column are refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from stamp_lib.book import claims, plotting, study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setenv("STAMP_RESULTS", str(tmp_path))
    monkeypatch.setenv("STUDY_SIZE", "small")
    return tmp_path


# ---- claims registry -------------------------------------------------------------------------

def test_unknown_claim_key_fails_at_verdict(results):
    run = study.start("01_theorem1")
    with pytest.raises(KeyError, match="theorem_1_holds.*stamp_lib.book.claims.CLAIMS"):
        run.verdict("theorem_1_holds", "confirmed", "ratio 0.1")
    assert run.verdicts == []


@pytest.mark.parametrize("verdict, status", [
    ("confirmed", "confirmed"),
    ("partly confirmed: on text only", "partly confirmed"),
    ("not confirmed", "not confirmed"),
    ("new: optimal never worse", "new"),
    ("confirmed on most inputs; worse on 3 of 20", "confirmed"),
    ("Refuted", "refuted"),
])
def test_verdict_status(verdict, status):
    assert claims.verdict_status(verdict) == status


@pytest.mark.parametrize("bad", ["holds", "confirmedly", "", "ok: confirmed"])
def test_malformed_verdict_is_refused(results, bad):
    run = study.start("01_theorem1")
    with pytest.raises(ValueError, match="must start with one of"):
        run.verdict("theorem1_holds", bad, "x")


def test_verdict_is_stored_with_numbers_and_conditions(results):
    run = study.start("01_theorem1")
    run.verdict("theorem1_holds", "confirmed", "worst ratio 0.09", numbers={"worst ratio": 0.0912},
                conditions={"s": 256, "bits": "64x8+4"})
    v = run.verdicts[0]
    assert v["status"] == "confirmed" and v["numbers"] == {"worst ratio": 0.0912} and v["size"] == "small"
    with pytest.raises(ValueError, match="already has a verdict"):
        run.verdict("theorem1_holds", "confirmed", "again")
    data = json.loads(run.save().read_text())
    assert data["verdicts"][0]["conditions"] == {"s": 256, "bits": "64x8+4"}


def test_save_returns_a_path_that_a_notebook_cell_does_not_display(results):
    from IPython.core.formatters import DisplayFormatter

    out = study.start("01_theorem1").save()
    assert out.is_file() and out.name == "01_theorem1.json"
    assert DisplayFormatter().format(out) == ({}, {})       # no PosixPath('/home/...') in the book
    assert DisplayFormatter().format(Path(out))[0]          # a plain Path would show


def test_registry_entries_are_complete():
    for key, c in claims.CLAIMS.items():
        assert re.fullmatch(r"[a-z0-9_]+", key), key
        assert c.title and len(c.title) <= 45, (key, c.title)   # fits a table cell
        assert c.claim and c.where and c.paper, key
        assert "[" not in c.paper and "'" not in c.paper, f"{key}: no Python lists in the paper text"
        for ch in c.chapters:
            assert re.fullmatch(r"\d\d_\w+", ch), ch


def test_every_verdict_key_in_the_notebooks_is_registered():
    """A typo in a chapter's claim key fails here, before any notebook runs."""
    found = 0
    for nb in sorted((ROOT / "notebooks").glob("*.md")):
        for key in re.findall(r"run\.verdict\(\s*[\"']([^\"']+)[\"']", nb.read_text()):
            found += 1
            assert key in claims.CLAIMS, f"{nb.name}: run.verdict({key!r}) names no registered claim"
    assert found >= 5


# ---- results files, provenance, full records -------------------------------------------------

def test_save_writes_provenance_and_code_hash(results):
    run = study.start("01_theorem1", knobs={"s": 8})
    run.record("x", 1.5, s=8)
    data = json.loads(run.save().read_text())
    for k in ("commit", "dirty", "date", "machine", "versions", "wall_time_s", "code"):
        assert k in data, k
    files = data["code"]["files"]
    assert "notebooks/01_theorem1.md#code" in files and "stamp_lib/core/metrics.py" in files
    assert not any(f.startswith("stamp_lib/book/") for f in files)  # no numbers
    assert data["versions"]["torch"] and re.match(r"\d{4}-\d\d-\d\dT", data["date"])


def test_notebook_hash_ignores_prose(tmp_path):
    head = "\n".join((ROOT / "notebooks" / "01_theorem1.md").read_text().split("\n")[:13]) + "\n"
    a, b, c = (tmp_path / f"{n}.md" for n in "abc")
    a.write_text(head + "# Title\n\nSome prose.\n\n```{code-cell} ipython3\nx = 1\n```\n")
    b.write_text(head + "# Title\n\nOther prose, longer.\n\n```{code-cell} ipython3\nx = 1\n```\n")
    c.write_text(head + "# Title\n\nSome prose.\n\n```{code-cell} ipython3\nx = 2\n```\n")
    ha, hb, hc = (study.notebook_code_hash(p) for p in (a, b, c))
    assert ha == hb != hc


def _record(folder: Path, files: dict) -> None:
    data = {"notebook": "01_theorem1", "size": "full", "date": "2026-11-30T12:00:00Z", "commit": "abc123",
            "wall_time_s": 600, "machine": {"cpus": 2}, "code": {"files": files},
            "verdicts": [{"key": "theorem1_holds", "verdict": "confirmed", "numbers": {"worst ratio": 0.05},
                          "conditions": {"s": 2048}}]}
    study.write_full_record(data, folder)


def test_full_record_is_stale_when_its_code_changed(tmp_path):
    quant = "stamp_lib/core/quant.py"
    good = {quant: study.current_hash(quant),
            "notebooks/01_theorem1.md#code": study.current_hash("notebooks/01_theorem1.md#code")}
    _record(tmp_path, good)
    rec = study.full_record("01_theorem1", tmp_path)
    assert not rec.stale and rec.changed == [] and rec.number("theorem1_holds", "worst ratio") == 0.05
    assert "STALE" not in rec.when()
    _record(tmp_path, good | {quant: "0" * 64})
    rec = study.full_record("01_theorem1", tmp_path)
    assert rec.stale and rec.changed == [quant] and "STALE" in rec.when()
    _record(tmp_path, good | {"stamp_lib/gone.py": "0" * 64})
    assert study.full_record("01_theorem1", tmp_path).changed == ["stamp_lib/gone.py"]
    _record(tmp_path, good | {"stamp_lib/book/claims.py": "0" * 64})   # the registry grew: still fresh
    assert not study.full_record("01_theorem1", tmp_path).stale
    assert study.full_record("99_nothing", tmp_path) is None


def test_full_records_are_stored_compressed_and_byte_stable(tmp_path):
    data = {"notebook": "01_theorem1", "records": [{"name": "x", "value": 0.5, "knobs": {"s": 2048}}] * 500}
    p = study.write_full_record(data, tmp_path)
    assert p == tmp_path / "01_theorem1.json.gz" and study.read_full_record(p) == data
    first = p.read_bytes()
    assert len(first) < len(json.dumps(data)) / 10                 # repeated knobs compress
    assert study.write_full_record(data, tmp_path).read_bytes() == first   # no time stamp inside
    assert list(study.full_records(tmp_path)) == ["01_theorem1"]


def test_bad_full_records_get_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="'notebook' name"):
        study.write_full_record({"records": []}, tmp_path)
    (tmp_path / "01_theorem1.json.gz").write_bytes(b'{"notebook": "01_theorem1"}')   # plain JSON
    with pytest.raises(ValueError, match=r"01_theorem1.json.gz: not a readable full-size record"):
        study.full_record("01_theorem1", tmp_path)
    p = study.write_full_record({"notebook": "01_theorem1"}, tmp_path)
    p.write_bytes(p.read_bytes()[:-6])                                             # truncated
    with pytest.raises(ValueError, match="re-record it with `make record-full`"):
        study.read_full_record(p)


def test_recorded_full_results_in_the_repository_are_small_and_readable():
    """Recorded files stay far below what git should carry (a chapter's raw JSON ran to 7 MiB)."""
    files = sorted(study.FULL_DIR.glob("*"))
    assert files, "no full-size records in data/results/full"
    for p in files:
        assert p.name.endswith(study.FULL_SUFFIX), f"{p.name}: not a stored full record"
        assert p.stat().st_size < 1 << 20, f"{p.name}: {p.stat().st_size} bytes"
        assert study.read_full_record(p)["notebook"] == p.name[: -len(study.FULL_SUFFIX)]


def test_recorded_full_results_are_tracked_by_git():
    """data/results/*.json is ignored; data/results/full/ must not be."""
    import subprocess

    out = subprocess.run(["git", "check-ignore", "-q", "data/results/full/01_theorem1.json.gz"], cwd=ROOT)
    assert out.returncode == 1, "data/results/full/*.json.gz is git-ignored"
    out = subprocess.run(["git", "check-ignore", "-q", "data/results/01_theorem1.json"], cwd=ROOT)
    assert out.returncode == 0


def test_findings_table_shows_both_sizes(results, tmp_path):
    run = study.start("01_theorem1")
    run.verdict("theorem1_holds", "confirmed", "x", numbers={"worst ratio": 0.0912}, conditions={"s": 256})
    md = study.findings_table("01_theorem1", run.verdicts, None).data
    assert "Theorem 1 bounds the error" in md and "0.0912" in md and "not recorded" in md
    assert "make record-full NB=01_theorem1" in md and "s = 256" in md
    _record(tmp_path, {"stamp_lib/core/quant.py": "0" * 64})
    md = study.findings_table("01_theorem1", run.verdicts, study.full_record("01_theorem1", tmp_path)).data
    assert "0.05" in md and "STALE" in md and "s = 2048" in md


# ---- glue and prose checks -------------------------------------------------------------------

def test_glue_formats_and_keeps_the_text(results):
    run = study.start("01_theorem1")
    run.glue("a", 0.09123, ".3f")
    run.glue("b", 12345.6)
    assert run.glue("c", "five") is None   # nothing to display when a cell ends with it
    with pytest.raises(ValueError, match="used twice"):
        run.glue("a", 1.0)
    assert json.loads(run.save().read_text())["glued"] == {"a": "0.091", "b": "12,346", "c": "five"}


def test_holds_raises_when_the_prose_is_contradicted(results):
    run = study.start("01_theorem1")
    run.holds(0.05 < 0.1, "more than an order of magnitude of slack")
    with pytest.raises(study.ProseContradicted, match="order of magnitude"):
        run.holds(0.5 < 0.1, "more than an order of magnitude of slack, again")
    assert [c["holds"] for c in run.checks] == [True, False]


# ---- plotting conventions --------------------------------------------------------------------

def test_a_column_figure_passes_and_records_its_font():
    fig, ax = plotting.figure()
    ax.plot([1, 2], [3, 4], label="dct", **plotting.style("dct"))
    ax.set(xlabel="k", ylabel="energy", title="title")
    ax.legend()
    png, width_px, shown = plotting.render(fig)
    plt.close(fig)
    assert width_px <= plotting.COLUMN_PX and shown >= plotting.MIN_PT
    assert b"stamp:min_font_pt" in png


@pytest.mark.parametrize("make", [
    lambda: plt.subplots(figsize=(14, 3.4))[0],               # shrunk into the column
    lambda: plotting.figure()[0],                            # column width but a 5-pt label
])
def test_too_small_text_is_refused(make):
    fig = make()
    ax = fig.axes[0]
    ax.plot([1, 2], [1, 2])
    ax.set_title("tiny", fontsize=5 if fig.get_size_inches()[0] < 10 else 9)
    with pytest.raises(plotting.FigureTooSmall, match="would be displayed at"):
        plotting.render(fig)
    plt.close(fig)


def test_start_and_save_print_nothing_on_the_page(results, capsys):
    run = study.start("02_real_activations", knobs={"layers": list(range(30)), "parts": [list(range(10))] * 3})
    run.record("x", 1.0, k=1)
    run.save()
    out = capsys.readouterr()
    assert out.out == ""                                  # stdout is what a page shows
    assert "STUDY_SIZE=small" in out.err and "layers=" in out.err   # stderr: JupyterLab only
    html = run.settings().data
    assert html.startswith("<details>") and "<code>layers</code>" in html and "STUDY_SIZE" in html


@pytest.mark.parametrize("ours, numbers, conditions", [
    ("the first HP_TOKENS rows", {}, {}),
    ("fine", {"gain at N_EVAL windows": 1.0}, {}),
    ("fine", {}, {"s": "tensor(2048)"}),
])
def test_verdict_refuses_bookkeeping(results, ours, numbers, conditions):
    run = study.start("01_theorem1")
    with pytest.raises(ValueError, match="bookkeeping"):
        run.verdict("theorem1_holds", "confirmed", ours, numbers=numbers, conditions=conditions)


def test_verdict_accepts_model_and_format_names(results):
    run = study.start("01_theorem1")
    run.verdict("theorem1_holds", "confirmed", "SmolLM2-135M (GGUF Q4_1) at W4A4KV4, 64x8+4",
                numbers={"RTN ppl ratio": 0.5}, conditions={"bits": "64x8+4"})


def test_labels():
    assert plotting.label("smoothquant") == "SmoothQuant" and plotting.label("RTN") == "RTN"
    assert plotting.label("dwt") == "STaMP (DWT)" and plotting.label("none") == "bit-matched"
    assert plotting.label("dwt", "transform") == "Haar DWT"
    assert plotting.label("klt (in-sample)", "transform", short=True) == "in-sample KLT"
    assert plotting.label("fp", short=True) == "FP"                       # no short form: the label
    assert plotting.label(("quarot", "gptq")) == "QuaRot, GPTQ"
    with pytest.raises(KeyError, match="plotting.LABELS"):
        plotting.label("my method")
    with pytest.raises(KeyError, match="kind"):
        plotting.label("rtn", "model")
    for kind, names in plotting.LABELS.items():             # every key has a colour book-wide
        if kind != "policy":
            for k in names:
                if k not in ("none", "uniform", "gptq"):
                    plotting.color(k)


@pytest.mark.parametrize("cond, text", [
    ({"s": 2048, "avg bits": 4.125}, "s = 2048, avg bits 4.125"),
    ({"avg bits": 4.0625}, "avg bits 4.0625"),
    ({"avg bits": 5.0, "ratio": 0.123456}, "avg bits 5, ratio 0.123"),
    ({"galaxy t": [0.01, 1.0, 10.0]}, "galaxy t 0.01, 1, 10"),
])
def test_format_conditions_reads_well(cond, text):
    assert claims.format_conditions(cond) == text


def test_numbers_text_three_digits():
    text = claims.numbers_text({"status": "confirmed", "numbers": {"gain (dB)": -15.987, "bits": 4.1250, "runs": 2315}})
    assert text == "**confirmed**; gain (dB): -16.0; bits: 4.12; runs: 2,315"


def test_displayed_size_follows_the_column():
    # 9 pt at 200 dpi in a 1300-px PNG shown 650 px wide: 9 * (100/72) * 0.75 = 9.375 pt
    assert plotting.displayed_pt(9, 1300) == pytest.approx(9.375)
    # a PNG whose natural width is twice the column is shown at half size
    assert plotting.displayed_pt(9, 2 * 1352) == pytest.approx(9 * 200 / 72 * 0.25 * 0.75)


def test_too_many_panels_are_refused():
    with pytest.raises(ValueError, match="split|more rows"):
        plotting.figure(1, 5)
    with pytest.raises(ValueError):
        plotting.figure(2, 3, maps=True)


def test_colours_are_fixed_per_name():
    assert plotting.color("DCT") == plotting.color("dct") != plotting.color("wht")
    assert plotting.style("klt (in-sample)")["ls"] == "--" and plotting.style("klt")["ls"] == "-"
    with pytest.raises(KeyError, match="plotting.COLORS"):
        plotting.color("my new transform")


def test_tables_fit_the_column_or_are_refused():
    md = plotting.table(["transform", "energy", "SQNR (dB)"], [["dct", 0.912, "12.3"], ["a|b", "n/a", "-1.5"]]).data
    lines = md.splitlines()
    assert lines[1] == "|:--|--:|--:|" and "a\\|b" in md and "0.912" in md
    with pytest.raises(ValueError, match="columns"):
        plotting.table([str(i) for i in range(9)], [])
    with pytest.raises(ValueError, match="px"):
        plotting.table(["a", "b"], [["x" * 60, "y" * 40]])
    with pytest.raises(ValueError, match="cells"):
        plotting.table(["a", "b"], [["x"]])


@pytest.mark.parametrize("v, text", [(0.09123, "0.0912"), (12.345, "12.3"), (-0.5, "-0.500"), (1795.2, "1,795"),
                                     (0, "0"), (None, "n/a"), (float("nan"), "n/a"), (5.0, "5"), (8, "8"),
                                     (4.5, "4.50")])
def test_num(v, text):
    assert plotting.num(v) == text


# ----------------------------------------------------------------------------- re-certification
_NB = """---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
---

# T

```{{code-cell}} ipython3
x = 1
{second}
```
"""


def test_same_statements_ignores_cell_boundaries_comments_and_wrapping_only():
    one = _NB.format(second="y = x + 2")
    split = _NB.format(second="```\n\n```{code-cell} ipython3\n:tags: [remove-cell]\n\n# a comment\ny = (x +\n     2)")
    assert study.same_statements(one, split)
    assert not study.same_statements(one, _NB.format(second="y = x + 3"))
    assert not study.same_statements(one, _NB.format(second="y = 2 + x"))


def test_recertify_carries_a_record_over_a_cell_split_and_nothing_else(tmp_path, monkeypatch):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    monkeypatch.setattr(study, "REPO_ROOT", tmp_path)
    old = _NB.format(second="y = x + 2")
    (nb_dir / "07_t.md").write_text(old)
    data = {"notebook": "07_t", "commit": "abc", "code": {"files": {
        "notebooks/07_t.md#code": study.notebook_code_hash(nb_dir / "07_t.md")}}}
    study.write_full_record(data, tmp_path)
    assert not study.full_record("07_t", tmp_path).stale
    (nb_dir / "07_t.md").write_text(_NB.format(second="```\n\n```{code-cell} ipython3\n\ny = x + 2"))
    assert study.full_record("07_t", tmp_path).stale
    rec = study.recertify("07_t", tmp_path, old_text=old)
    assert not rec.stale and rec.data["recertified"][0]["files"] == ["notebooks/07_t.md#code"]
    assert "re-certified" in rec.when()
    (nb_dir / "07_t.md").write_text(_NB.format(second="y = x + 5"))
    with pytest.raises(ValueError, match="other statements"):
        study.recertify("07_t", tmp_path, old_text=old)


def test_replay_recertifies_only_unchanged_results(tmp_path, monkeypatch):
    """A record goes stale when its code changes; a small-size replay carries it over only when
    every value of the old run is in the new one and equal (volatile globs aside), with the old
    run made with the record's code and the new one with the current code."""
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    monkeypatch.setattr(study, "REPO_ROOT", tmp_path)
    (nb_dir / "07_t.md").write_text(_NB.format(second="y = x + 2"))
    key = "notebooks/07_t.md#code"
    h_old = study.notebook_code_hash(nb_dir / "07_t.md")
    study.write_full_record({"notebook": "07_t", "commit": "abc", "code": {"files": {key: h_old}}}, tmp_path)
    (nb_dir / "07_t.md").write_text(_NB.format(second="y = x + 5"))
    h_new = study.notebook_code_hash(nb_dir / "07_t.md")
    assert study.full_record("07_t", tmp_path).stale

    def run(files, ppl, secs, extra=()):
        recs = [{"name": "ppl", "value": {"ppl": ppl, "seconds": secs}, "knobs": {"w": 4}}, *extra]
        return {"notebook": "07_t", "size": "small", "commit": "c", "dirty": False, "code": {"files": files},
                "records": recs, "verdicts": [{"key": "k", "status": "partly"}], "glued": {"g": "1.0"},
                "checks": []}

    old, new = run({key: h_old}, 10.0, 3.0), run({key: h_new}, 10.0 * (1 + 1e-9), 9.0)
    cmp = study.compare_results(old, new)
    assert [d[0] for d in cmp["differ"]] == ['/records/ppl|{"w": 4}|1/seconds'] and cmp["missing"] == []
    twice = run({key: h_new}, 10.0, 3.0, [{"name": "ppl", "value": {"ppl": 11.0, "seconds": 3.0}, "knobs": {"w": 4}}])
    assert len(study.compare_results(twice, old)["missing"]) == 2  # a repeated record is compared, not collapsed
    with pytest.raises(ValueError, match="1 values differ"):
        study.recertify_by_replay("07_t", old, new, folder=tmp_path)
    with pytest.raises(ValueError, match="not the record's"):  # the baseline must run the record's code
        study.recertify_by_replay("07_t", run({key: h_new}, 10.0, 3.0), new, volatile=("*/seconds",), folder=tmp_path)
    with pytest.raises(ValueError, match="1 values differ"):  # a real change of a number is never volatile
        study.recertify_by_replay("07_t", old, run({key: h_new}, 10.1, 3.0), volatile=("*/seconds",), folder=tmp_path)
    assert study.full_record("07_t", tmp_path).stale
    added = [{"name": "new", "value": 1, "knobs": {}}]
    rec = study.recertify_by_replay("07_t", old, run({key: h_new}, 10.0, 9.0, added), volatile=("*/seconds",),
                                    folder=tmp_path)
    r = rec.data["recertified"][-1]
    assert not rec.stale and r["how"] == "replay" and r["volatile_values"] == 1 and r["files"] == [key]
    assert r["added"] == ["/records/new|{}|1"]
    assert "small-size replay" in rec.when() and f"({r['compared']} values equal" in rec.when()


def test_replay_compares_a_list_of_names_in_any_order():
    """A knob listing names (often built from a set, in hash order) matches in any order; values
    still have to be equal."""
    def res(types, v):
        return {"records": [{"name": "g", "value": v, "knobs": {"types": types, "bits": [4, 8]}}]}

    assert study.compare_results(res(["o", "down"], 1.0), res(["down", "o"], 1.0))["missing"] == []
    assert study.compare_results(res(["o", "down"], 1.0), res(["down", "o"], 2.0))["differ"]
    assert study.compare_results(res(["o"], 1.0), {"records": [{"name": "g", "value": 1.0,
                                                                "knobs": {"types": ["o"], "bits": [8, 4]}}]})["missing"]
