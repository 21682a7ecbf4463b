"""The transform benchmark runs end to end at a toy size (no timings are asserted: ratios on a
shared machine are for `python -m stamp_lib bench`, never for tests)."""

import scipy.fft
import torch

from stamp_lib.core import transforms
from stamp_lib.experiments import bench


def test_transform_benchmark_compares_scipy_at_equal_workers(monkeypatch, capsys):
    seen = []
    for name in ("dct", "idct"):
        real = getattr(scipy.fft, name)

        def spy(*args, _real=real, **kw):
            seen.append(kw.get("workers"))
            return _real(*args, **kw)

        monkeypatch.setattr(scipy.fft, name, spy)
    threads = torch.get_num_threads()
    res = bench.transform_benchmark(s=64, d=32, repeat=1)  # s != d: X @ W is (s, d) @ (d, d)
    assert seen and set(seen) == {threads}, seen  # the reference and our CPU DCT alike
    assert res["scipy_workers"] == res["threads"] == threads
    assert {"dwt3", "dwt_max", "dct", "dct_torchfft", "wht"} <= set(res["rows"])
    for name in ("dct", "dct_torchfft"):
        r = res["rows"][name]
        assert r["x_ref"] == r["fwd_inv_s"] / r["ref_s"]
    assert transforms._FFT_BACKEND == "scipy"  # the torch.fft row restored the engine

    bench.print_transform_table(res)
    out = capsys.readouterr().out
    assert f"scipy dct+idct, workers={threads}" in out
    assert "DCT <= 6x clone" in res["targets"]
    assert any(line.strip().endswith("DCT <= 6x clone") for line in out.splitlines())
