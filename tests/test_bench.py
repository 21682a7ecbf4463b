"""The transform benchmark runs end to end at a toy size (no timings are asserted: ratios on a
shared machine are for `python -m stamp_lib bench`, never for tests). What is asserted is what a
regression would break: which engine and how many workers each row really ran with, that the
engine is restored, which rows exist, that the table prints the numbers of the result dict, and
the target thresholds (on a made-up result, so that no timing decides them)."""

import math

import pytest
import scipy.fft
import torch

from stamp_lib.core import transforms
from stamp_lib.experiments import bench

ROWS = {"dwt3", "dwt_max", "dct", "dct_torchfft", "wht"}


@pytest.mark.parametrize("engine", ["scipy", "torch"])
def test_transform_benchmark_rows_engines_and_workers(monkeypatch, capsys, engine):
    # the engine in effect before the benchmark (monkeypatch puts the module's value back afterwards)
    monkeypatch.setattr(transforms, "_FFT_BACKEND", engine)
    scipy_calls, rfft_engines = [], []
    for name in ("dct", "idct"):
        real = getattr(scipy.fft, name)

        def spy(*args, _real=real, **kw):
            scipy_calls.append(kw.get("workers"))
            return _real(*args, **kw)

        monkeypatch.setattr(scipy.fft, name, spy)
    real_rfft = torch.fft.rfft

    def rfft_spy(*args, **kw):
        rfft_engines.append(transforms._FFT_BACKEND)
        return real_rfft(*args, **kw)

    monkeypatch.setattr(torch.fft, "rfft", rfft_spy)
    threads = torch.get_num_threads()
    res = bench.transform_benchmark(s=64, d=32, repeat=1)  # s != d: X @ W is (s, d) @ (d, d)

    # the reference (and our DCT on the scipy engine) get as many workers as torch has threads
    assert scipy_calls and set(scipy_calls) == {threads}, scipy_calls
    assert res["scipy_workers"] == res["threads"] == threads
    # the torch.fft row really ran our Makhoul DCT, with the engine switched to torch
    assert rfft_engines and set(rfft_engines) == {"torch"}, rfft_engines
    # ... and the engine in effect before is back (not a hard-coded default)
    assert transforms._FFT_BACKEND == engine

    rows = res["rows"]
    assert set(rows) == ROWS
    assert res["shape"] == [64, 32]
    for name, r in rows.items():
        for key in ("fwd_inv_s", "x_clone", "pct_of_matmul"):
            assert math.isfinite(r[key]) and r[key] > 0, (name, key, r)
        assert ("dense_s" in r) == (name != "dct_torchfft"), name
        assert ("x_ref" in r) == (name in {"dct", "dct_torchfft", "dwt3", "dwt_max"}), name
    # both DCT rows are measured against the one scipy reference timing
    assert rows["dct_torchfft"]["ref_s"] == rows["dct"]["ref_s"]

    bench.print_transform_table(res)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert f"X=(64, 32) float32, {threads} threads" in lines[0]
    for name, r in rows.items():
        line = next(ln for ln in lines if ln.split()[:1] == [name])
        cols = line.split()
        assert cols[1] == f"{1e3 * r['fwd_inv_s']:.1f}", line
        assert cols[2] == f"{r['x_clone']:.2f}", line
        assert cols[3] == f"{r['pct_of_matmul']:.2f}", line
        assert cols[4] == (f"{r['speedup_vs_dense']:.1f}" if "speedup_vs_dense" in r else "-"), line
        assert cols[5] == (f"{r['x_ref']:.2f}" if "x_ref" in r else "-"), line
        if name.startswith("dct"):
            assert line.endswith(f"scipy dct+idct, workers={threads}"), line
    # one [met]/[MISSED] line per target, agreeing with res["targets"]
    for label, ok in res["targets"].items():
        assert f"  [{'met' if ok else 'MISSED'}] {label}" in lines, label


def test_transform_benchmark_without_dense_rows():
    res = bench.transform_benchmark(s=32, d=8, repeat=1, dense=False)
    assert set(res["rows"]) == ROWS
    for r in res["rows"].values():
        assert "dense_s" not in r and "speedup_vs_dense" not in r


def _result(**changes):
    """A made-up benchmark result on which every target is met, exactly at its threshold where there
    is one; ``changes`` maps ``"row.key"`` to a new value."""
    def row(x_clone, pct, speedup, x_ref=None):
        r = {"fwd_inv_s": 1e-3, "x_clone": x_clone, "pct_of_matmul": pct, "speedup_vs_dense": speedup}
        if x_ref is not None:
            r.update(ref_s=1e-3, x_ref=x_ref)
        return r

    rows = {"dwt3": row(4.0, 5.0, 10.0, 1.0), "dwt_max": row(5.0, 7.0, 10.0, 1.0), "dct": row(6.0, 9.0, 10.0, 2.0),
            "dct_torchfft": {**row(30.0, 50.0, 10.0, 9.0)}, "wht": row(3.0, 4.0, 10.0)}
    del rows["dct_torchfft"]["speedup_vs_dense"]  # no dense twin timed for the engine row
    for key, v in changes.items():
        name, field = key.split(".")
        rows[name][field] = v
    return {"shape": [128, 64], "threads": 2, "scipy_workers": 2, "clone_s": 1e-3, "matmul_s": 2e-3, "rows": rows}


TARGETS = {
    "dwt3.x_clone": "3-level DWT <= 4x clone",
    "dwt3.pct_of_matmul": "3-level DWT <= 5% of matmul",
    "wht.speedup_vs_dense": "every fast path >= 10x its dense path",
    "dct.x_clone": "DCT <= 6x clone",
    "dct.x_ref": "DCT <= 2x scipy dct+idct at equal workers (2)",
    "dwt_max.x_ref": "DWT <= pywt wavedec+waverec",
}
MISS = {"dwt3.x_clone": 4.01, "dwt3.pct_of_matmul": 5.01, "wht.speedup_vs_dense": 9.99, "dct.x_clone": 6.01,
        "dct.x_ref": 2.01, "dwt_max.x_ref": 1.01}


def test_targets_met_at_their_thresholds(capsys):
    res = _result()
    bench.print_transform_table(res)
    out = capsys.readouterr().out
    assert res["targets"] == {label: True for label in TARGETS.values()}
    assert "MISSED" not in out
    assert "  X.clone(): 1.0 ms   X @ W (64x64): 2.0 ms" in out.splitlines()


@pytest.mark.parametrize("key", sorted(MISS))
def test_each_target_missed_alone(capsys, key):
    res = _result(**{key: MISS[key]})
    bench.print_transform_table(res)
    out = capsys.readouterr().out
    missed = TARGETS[key]
    assert res["targets"] == {label: label != missed for label in TARGETS.values()}
    assert f"  [MISSED] {missed}" in out.splitlines()
    assert out.count("[MISSED]") == 1
