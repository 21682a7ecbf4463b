"""Resumable runs (stamp_lib.core.cells): a cell round-trips bit for bit; a corrupt, partial or
foreign file is ignored and the cell recomputed; a changed knob or changed code recomputes; two
processes writing one folder at once do not corrupt each other; and a run killed with SIGKILL
partway resumes with the finished cells reused and numbers identical to an uninterrupted run."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from stamp_lib.core import cells
from stamp_lib.core.cells import CellStore

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _value():
    return {"nll": torch.tensor([1.25, 2.5, float("nan")], dtype=torch.float64),
            "bf": torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16),
            "ids": torch.arange(6).reshape(2, 3)[:, 1:],  # a view: stored as itself, not its whole storage
            "act_bits": 4.5, "inf": float("inf"), "name": "rtn", "none": None, "pairs": [(1, 2), [3.0, "x"]],
            "nested": {"a": [torch.ones(2)], "b": {"c": 1}}}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and \
            torch.equal(torch.nan_to_num(a.float(), nan=7.0), torch.nan_to_num(b.float(), nan=7.0))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


# ----------------------------------------------------------------------------- the store
def test_round_trip_and_cached(tmp_path):
    st = CellStore(tmp_path, code="c0")
    key = {"experiment": "demo", "row": ["rtn", "rtn"], "column": "dwt", "alpha": 0.5}
    assert st.get(key) is None and key not in st
    v = _value()
    path = st.put(key, v)
    assert path.parent == tmp_path and path.suffix == ".cell" and key in st
    got = st.get(key)
    assert _same(got, v)
    assert got["ids"].untyped_storage().nbytes() == 4 * 8  # the view's 4 elements, not the 6 of its base
    # the same key spelled differently (key order, tuples) is the same cell
    assert st.get({"alpha": 0.5, "column": "dwt", "row": ("rtn", "rtn"), "experiment": "demo"}) is not None
    calls = []
    out = st.cached({"k": 1}, lambda: calls.append(1) or {"x": torch.tensor([3.0])})
    again = st.cached({"k": 1}, lambda: calls.append(1) or {"x": torch.tensor([4.0])})
    assert calls == [1] and torch.equal(out["x"], again["x"])
    assert st.counts() == {"computed": 2, "reused": 3}
    assert list(tmp_path.glob("*.tmp")) == [] and len(list(tmp_path.glob("*.cell"))) == 2
    with pytest.raises(TypeError, match="JSON data"):
        st.put({"model": object()}, {})


def test_corrupt_partial_and_foreign_files_are_ignored_and_recomputed(tmp_path):
    st = CellStore(tmp_path, code="c0")
    good = {"t": torch.arange(1000, dtype=torch.float32)}
    key, other = {"i": 1}, {"i": 2}
    path = st.put(key, good)
    data = path.read_bytes()
    bad = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 300,
           "flipped": data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:], "header only": data[:80]}
    for what, content in bad.items():
        path.write_bytes(content)
        fresh = CellStore(tmp_path, code="c0")
        assert fresh.get(key) is None, what
        assert fresh.counts()["ignored_bad_files"] == 1, what
        calls = []
        got = fresh.cached(key, lambda: calls.append(1) or good)
        assert calls == [1] and torch.equal(got["t"], good["t"]), what
        assert torch.equal(CellStore(tmp_path, code="c0").get(key)["t"], good["t"]), what  # rewritten whole
    # a whole file of another key under this key's name (a hash collision, a copied file) is not trusted
    st.path(other).write_bytes(path.read_bytes())
    assert st.get(other) is None
    # a stray temporary file of a killed writer is never read
    (tmp_path / f".{st.path(other).name}.abc123.tmp").write_bytes(data[:100])
    assert st.get(other) is None and torch.equal(st.get(key)["t"], good["t"])


def test_changed_knob_or_code_recomputes(tmp_path):
    a = CellStore(tmp_path, code="code-A")
    a.put({"experiment": "x", "bits": 4}, {"v": 1})
    assert a.get({"experiment": "x", "bits": 4}) == {"v": 1}
    assert a.get({"experiment": "x", "bits": 3}) is None  # another knob
    assert a.get({"experiment": "y", "bits": 4}) is None  # another experiment
    assert CellStore(tmp_path, code="code-B").get({"experiment": "x", "bits": 4}) is None  # other code
    calls = []
    CellStore(tmp_path, code="code-B").cached({"experiment": "x", "bits": 4}, lambda: calls.append(1) or {"v": 2})
    assert calls == [1]
    assert CellStore(tmp_path, code="code-A").get({"experiment": "x", "bits": 4}) == {"v": 1}  # kept apart


def test_code_hash_covers_the_library_but_not_the_book(tmp_path):
    def tree(files):
        root = tmp_path / str(len(list(tmp_path.iterdir())))
        for rel, text in files.items():
            (root / "stamp_lib" / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / "stamp_lib" / rel).write_text(text)
        return cells._code_hash(str(root))

    base = {"core/quant.py": "x = 1\n", "book/study.py": "y = 1\n", "experiments/llm.py": "z = 1\n"}
    h = tree(base)
    assert tree({**base, "book/study.py": "y = 2\n"}) == h  # presentation only
    assert tree({**base, "book/new.py": "w = 0\n"}) == h
    assert tree({**base, "core/quant.py": "x = 2\n"}) != h  # computing code
    assert tree({**base, "model/recipe.py": "r = 0\n"}) != h
    assert cells.code_hash() == cells._code_hash(str(ROOT)) and len(cells.code_hash()) == 16
    assert CellStore(tmp_path).code == cells.code_hash()


def test_fingerprints():
    t = torch.arange(12, dtype=torch.float32)
    assert cells.fingerprint(t) == cells.fingerprint(t.clone())
    assert cells.fingerprint(t) != cells.fingerprint(t.double())  # dtype
    assert cells.fingerprint(t) != cells.fingerprint(t.reshape(3, 4))  # shape
    u = t.clone()
    u[5] += 1e-6
    assert cells.fingerprint(t) != cells.fingerprint(u)
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    fp = cells.fingerprint(m)
    with torch.no_grad():
        m.weight[0, 0] += 1
    assert cells.fingerprint(m) != fp
    assert cells.fingerprint([t, {"a": None}]) == cells.fingerprint((t, {"a": None}))
    big = torch.zeros((1 << 24) + 3, dtype=torch.int8)  # sampled (beyond float32's exact integers)
    fb = cells.fingerprint(big)
    big[-1] = 1  # the last element is always in the sample
    assert cells.fingerprint(big) != fb


def test_resolve_and_the_resume_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(cells.ENV_RESUME, raising=False)
    monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "cache"))
    assert cells.resolve(None, "llm") is None  # the default: today's behaviour, nothing stored
    assert cells.resolve(False, "llm") is None
    st = CellStore(tmp_path / "s")
    assert cells.resolve(st, "llm") is st
    assert cells.resolve(tmp_path / "f", "llm").folder == tmp_path / "f"
    monkeypatch.setenv(cells.ENV_RESUME, "1")
    d = cells.resolve(None, "llm")
    assert d.folder == tmp_path / "cache" / "cells" / "llm" and d.folder.is_dir()
    assert cells.resolve(False, "llm") is None
    monkeypatch.setenv(cells.ENV_RESUME, "0")
    assert cells.resolve(None, "llm") is None
    with pytest.raises(TypeError):
        cells.resolve(3, "llm")


def test_tally_file_counts_across_stores(tmp_path, monkeypatch):
    tally = tmp_path / "tally"
    monkeypatch.setenv(cells.ENV_TALLY, str(tally))
    a, b = CellStore(tmp_path / "a", experiment="llm"), CellStore(tmp_path / "b", experiment="diffusion")
    a.cached({"k": 1}, dict)
    a.cached({"k": 1}, dict)
    a.cached({"k": 2}, dict)
    b.cached({"k": 1}, dict)
    assert cells.read_tally(tally) == {"llm": {"computed": 2, "reused": 1}, "diffusion": {"computed": 1, "reused": 0}}
    assert cells.read_tally(tmp_path / "none") == {}


def test_no_reuse_recomputes_but_still_stores(tmp_path):
    CellStore(tmp_path, code="c").put({"k": 1}, {"v": 1})
    fresh = CellStore(tmp_path, code="c", reuse=False)
    assert fresh.get({"k": 1}) is None
    assert fresh.cached({"k": 1}, lambda: {"v": 2}) == {"v": 2}
    assert CellStore(tmp_path, code="c").get({"k": 1}) == {"v": 2}


# ----------------------------------------------------------------------------- concurrent writers
N_BIG = 1 << 19


def _big(k: int) -> dict:
    return {"t": torch.arange(N_BIG, dtype=torch.float32) * (k + 1), "k": k}


def _writer(folder: str, wid: int, rounds: int, q, go) -> None:
    """Write keys 0..3 (every writer the same ones) again and again, reading the others' as it goes:
    every value read must be whole and right."""
    try:
        torch.set_num_threads(1)
        st = CellStore(folder, code="c")
        bad = 0
        go.wait(timeout=60)  # every writer starts at once
        for i in range(rounds):
            k = (i + wid) % 4
            st.put({"k": k}, _big(k))
            v = st.get({"k": (k + 1) % 4})
            if v is not None and not (v["k"] == (k + 1) % 4 and torch.equal(v["t"], _big((k + 1) % 4)["t"])):
                bad += 1
        q.put((wid, bad, st.ignored))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put((wid, repr(e), -1))


def test_two_processes_writing_one_folder_do_not_corrupt_each_other(tmp_path):
    ctx = mp.get_context("spawn")
    q, go = ctx.Queue(), ctx.Barrier(3)
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 60, q, go)) for w in range(3)]
    for p in procs:
        p.start()
    got = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(got) == [(0, 0, 0), (1, 0, 0), (2, 0, 0)], got  # nothing wrong or corrupt read
    st = CellStore(tmp_path, code="c")
    for k in range(4):
        v = st.get({"k": k})
        assert v["k"] == k and torch.equal(v["t"], _big(k)["t"])
    assert st.ignored == 0 and list(tmp_path.glob("*.tmp")) == [] and len(list(tmp_path.glob("*.cell"))) == 4


# ----------------------------------------------------------------------------- kill and resume
ROWS = (("rtn", "rtn"), ("smoothquant", "rtn"))
COLUMNS = ("none", "dwt")
N_CELLS = 1 + len(ROWS) * len(COLUMNS)  # the FP row and every (row, column)


def _tiny_table(store, slow: float = 0.0):
    """Table 2 on a tiny random-init LlamaForCausalLM (the same weights and windows in every process);
    ``slow``: seconds of sleep before each cell is computed (to kill a run partway)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stamp_lib.experiments import llm
    from stamp_lib.zoo import models

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, head_dim=16)
    model = models._ready(LlamaForCausalLM(cfg))
    g = torch.Generator().manual_seed(1)
    ev = torch.randint(0, 256, (3, 64), generator=g)
    cal = torch.randint(0, 256, (1, 64), generator=g)
    if slow:
        inner = llm._evaluate

        def slow_evaluate(*a, **k):
            time.sleep(slow)
            return inner(*a, **k)

        llm._evaluate = slow_evaluate
    return llm.run_table(model, ev, cal, ROWS, COLUMNS, hp_tokens=8, progress=False, store=store)


def _child(folder: str) -> None:  # run in a subprocess by the kill test
    torch.set_num_threads(1)
    _tiny_table(CellStore(folder), slow=0.6)


@pytest.mark.models
def test_killed_run_resumes_with_finished_cells_and_identical_numbers(tmp_path, one_thread):
    folder = tmp_path / "cells"
    code = f"import sys; sys.path.insert(0, {str(HERE)!r}); import test_cells; test_cells._child({str(folder)!r})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 60
    try:
        while len(list(folder.glob("*.cell"))) < 2:  # the FP row and at least one table cell are done
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child wrote no cells in 60 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    kept = len(list(folder.glob("*.cell")))
    assert 2 <= kept < N_CELLS  # killed partway
    print(f"killed with {kept} of {N_CELLS} cells finished")

    store = CellStore(folder)
    resumed = _tiny_table(store)
    assert resumed.counts == {"computed": N_CELLS - kept, "reused": kept}  # every finished cell reused
    assert store.ignored == 0  # no half-written file was found
    whole = _tiny_table(False)  # uninterrupted, nothing stored
    assert whole.counts == {}
    # cells reused from the killed child were computed in another process (its thread count may
    # differ): equal to round-off, not bit for bit
    torch.testing.assert_close(resumed.fp.nll, whole.fp.nll, rtol=1e-10, atol=0)
    for row in ROWS:
        for col in COLUMNS:
            a, b = resumed.cells[row][col][0], whole.cells[row][col][0]
            assert a.nll.dtype == b.nll.dtype == torch.float64, (row, col)
            torch.testing.assert_close(a.nll, b.nll, rtol=1e-10, atol=0, msg=str((row, col)))
            assert a.act_bits == b.act_bits and a.kv_bits == b.kv_bits and a.knobs == b.knobs
        assert resumed.paired(row, "dwt") == whole.paired(row, "dwt")  # paired statistics identical
    again = _tiny_table(store)  # a third run computes nothing
    assert again.counts == {"computed": 0, "reused": N_CELLS}
    assert json.dumps([again.cells[r][c][0].summary()["nll_per_window"] for r in ROWS for c in COLUMNS]) == \
        json.dumps([whole.cells[r][c][0].summary()["nll_per_window"] for r in ROWS for c in COLUMNS])


# ----------------------------------------------------------------------------- the image sampling (PixArt path)
def test_pixart_protocol_resumes_per_configuration(tmp_path, one_thread):
    """One cell for the full-precision images and one per configuration: a rerun generates nothing
    and returns the same numbers; a new configuration is computed alone."""
    pytest.importorskip("diffusers")
    from stamp_lib.experiments import pixart as P

    pipe = P.tiny_pipeline(seed=0)
    g = torch.Generator().manual_seed(1)
    prompts = P.Prompts(torch.randn(1, 12, 64, generator=g), torch.ones(1, 12, dtype=torch.long),
                        torch.randn(1, 12, 64, generator=g), torch.ones(1, 12, dtype=torch.long), ("a",))
    calib = P.calibration_inputs(pipe, prompts, (7,), 64, 64, steps=2, every=1)
    configs = {"rtn W4A4": P.pixart_recipe("rtn", hp_tokens=4),
               "rtn W4A4 +stamp": P.pixart_recipe("rtn", hp_tokens=4, stamp=True),
               "svdquant W4A4 +stamp": P.pixart_recipe("svdquant", hp_tokens=4, stamp=True, rank=4)}
    kw = dict(seeds=(0,), height=64, width=64, steps=2, calib=calib, progress=False)
    plain = P.run_protocol(pipe, prompts, configs, **kw)
    assert plain["cells"] == {}
    st = CellStore(tmp_path / "cells")
    first = P.run_protocol(pipe, prompts, configs, store=st, **kw)
    assert first["cells"] == {"computed": 4, "reused": 0}  # FP images + 3 configurations
    generated = []
    real = P.generate
    P.generate = lambda *a, **k: generated.append(1) or real(*a, **k)
    try:
        again = P.run_protocol(pipe, prompts, configs, store=st, **kw)
    finally:
        P.generate = real
    assert again["cells"] == {"computed": 0, "reused": 4} and generated == []
    for r in (first, again):
        for k in configs:
            assert r["configs"][k]["per_image_db"] == plain["configs"][k]["per_image_db"]
            assert r["configs"][k]["act_bits"] == plain["configs"][k]["act_bits"]
        assert json.dumps(r["paired"], sort_keys=True) == json.dumps(plain["paired"], sort_keys=True)  # NaN s.e.
    more = P.run_protocol(pipe, prompts, {**configs, "A4": P.pixart_recipe("rtn", w_bits=None, hp_tokens=4)},
                          store=st, **kw)
    assert more["cells"] == {"computed": 1, "reused": 4}


# ----------------------------------------------------------------------------- .ci/record_full.py
NOTEBOOK = '''---
jupytext:
  text_representation:
    extension: .md
    format_name: myst
    format_version: 0.13
kernelspec:
  display_name: Python 3 (ipykernel)
  language: python
  name: python3
---

```{code-cell} ipython3
from stamp_lib.book import study
from stamp_lib.core import cells

run = study.start("zz_resume_demo")
st = cells.resolve(None, "demo")  # STAMP_RESUME=1: the default store
for k in range(3):
    if st is not None:  # none with --no-resume
        st.cached({"experiment": "demo", "k": k}, lambda: {"v": k})
run.save();
```
'''


def test_record_full_resumes_and_records_the_cells(tmp_path, monkeypatch):
    """record_full runs a chapter with STAMP_RESUME=1: the kernel's experiment stores are the default
    ones (data/cache/cells, here STAMP_CACHE), a second recording reuses every cell, and the record
    says how many were computed and reused."""
    pytest.importorskip("nbclient")
    import importlib.util

    from stamp_lib.book import study

    spec = importlib.util.spec_from_file_location("record_full", ROOT / ".ci" / "record_full.py")
    rf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rf)
    for k in ("STUDY_SIZE", "STAMP_RESULTS", cells.ENV_RESUME, cells.ENV_TALLY):  # record() sets them: restored
        monkeypatch.setenv(k, os.environ.get(k, ""))
    monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "cache"))
    nb = tmp_path / "zz_resume_demo.md"
    nb.write_text(NOTEBOOK)
    full = tmp_path / "full"
    got = []
    for _ in range(2):
        rf.record(nb, full)
        got.append(study.read_full_record(full / f"zz_resume_demo{study.FULL_SUFFIX}")["cells"])
    assert got[0] == {"resume": True, "computed": 3, "reused": 0, "by_experiment": {"demo": {"computed": 3, "reused": 0}}}
    assert got[1] == {"resume": True, "computed": 0, "reused": 3, "by_experiment": {"demo": {"computed": 0, "reused": 3}}}
    assert len(list((tmp_path / "cache" / "cells" / "demo").glob("*.cell"))) == 3
    rf.record(nb, full, resume=False)
    assert study.read_full_record(full / f"zz_resume_demo{study.FULL_SUFFIX}")["cells"] == {
        "resume": False, "computed": 0, "reused": 0, "by_experiment": {}}


def test_the_rotation_algorithm_is_part_of_every_cell_key(monkeypatch):
    """A run whose rotations take another algorithm (equal in exact arithmetic, not in float32) is
    computed, never read back from the first: chapter 4's round-off measurement depends on it."""
    from stamp_lib.experiments import llm as L
    from stamp_lib.methods import features as Fe
    from stamp_lib.model import recipe as R

    r = L.llm_recipe("quarot", stamp="dwt", seq_len=64, hp_tokens=8)
    w = torch.zeros(1, 64, dtype=torch.long)
    a = L._cell_key("m", w, None, r, 1)
    monkeypatch.setattr(Fe.HadamardRotation, "matmul_max", 1 << 30)
    b = L._cell_key("m", w, None, r, 1)
    assert a != b and a["numerics"]["hadamard_matmul_max"] != b["numerics"]["hadamard_matmul_max"]
    assert R.numerics()["hadamard_matmul_max"] == 1 << 30
