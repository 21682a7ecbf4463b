"""Study plumbing shared by every notebook: the size switch, seeds, the results file, caches.

Contract
--------
* ``STUDY_SIZE`` (environment variable, ``small`` by default, or ``full``) is read by
  :func:`size`. The book build, pytest and JupyterLab all reach a notebook through the same
  variable, so ``STUDY_SIZE=full make book`` and ``STUDY_SIZE=full jupyter lab`` agree.
* A notebook starts with ``run = study.start("01_theorem1", knobs={...})``: it fixes the seeds,
  prints the size, the knobs and starts a wall clock.
* ``run.record(name, value, **knobs)`` stores one reported number with every knob that produced
  it; ``run.verdict(claim, paper, ours, verdict)`` stores one line of the "paper vs this study"
  page; ``run.save()`` writes ``data/results/<notebook>.json`` and prints the wall time.
* :func:`cache_dir` is the ignored folder where dequantized weights and activations live
  (``STAMP_CACHE`` overrides it).
"""

from __future__ import annotations

import json
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SIZES = ("small", "full")
REPO_ROOT = Path(__file__).resolve().parents[1]


def size() -> str:
    """The study size from ``STUDY_SIZE`` (``small`` unless set); a bad value is an error."""
    s = os.environ.get("STUDY_SIZE", "small").strip().lower() or "small"
    if s not in SIZES:
        raise ValueError(f"STUDY_SIZE must be one of {SIZES}, got {s!r}")
    return s


def pick(small: Any, full: Any) -> Any:
    """Return ``small`` or ``full`` according to :func:`size`."""
    return small if size() == "small" else full


def seed_everything(seed: int = 0) -> None:
    """Fix Python, NumPy and torch seeds (and deterministic torch kernels where cheap)."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency in practice
        pass


def results_dir() -> Path:
    d = Path(os.environ.get("STAMP_RESULTS", REPO_ROOT / "data" / "results"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def cache_dir(*parts: str) -> Path:
    """The ignored cache folder (``STAMP_CACHE`` or ``<repo>/data/cache``), created on demand."""
    d = Path(os.environ.get("STAMP_CACHE", REPO_ROOT / "data" / "cache")).joinpath(*parts)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # numpy / torch scalars and arrays
        return v.tolist()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v


@dataclass
class Run:
    """One execution of one notebook: its knobs, its numbers and its verdicts."""

    notebook: str
    knobs: dict = field(default_factory=dict)
    seed: int = 0
    records: list = field(default_factory=list)
    verdicts: list = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def record(self, name: str, value: Any, **knobs: Any) -> Any:
        """Store one reported number with all the knobs that produced it; returns ``value``."""
        self.records.append({"name": name, "value": _jsonable(value), "knobs": _jsonable(knobs)})
        return value

    def verdict(self, claim: str, paper: str, ours: str, verdict: str, **extra: Any) -> None:
        """One line of the "paper vs this study" page."""
        self.verdicts.append(
            {"claim": claim, "paper": paper, "ours": ours, "verdict": verdict, **_jsonable(extra)}
        )

    def save(self) -> Path:
        wall = time.perf_counter() - self.t0
        out = results_dir() / f"{self.notebook}.json"
        payload = {
            "notebook": self.notebook,
            "size": size(),
            "seed": self.seed,
            "knobs": _jsonable(self.knobs),
            "wall_time_s": round(wall, 2),
            "python": platform.python_version(),
            "simulated": "fake quantization in floating point (no integer kernels)",
            "records": self.records,
            "verdicts": self.verdicts,
        }
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, sort_keys=False))
        tmp.replace(out)
        print(f"[{self.notebook}] wrote {out.relative_to(REPO_ROOT) if out.is_relative_to(REPO_ROOT) else out}"
              f" ({len(self.records)} numbers, {len(self.verdicts)} verdicts); wall time {wall:.1f} s")
        return out


def start(notebook: str, knobs: dict | None = None, seed: int = 0) -> Run:
    """Begin a notebook run: fix seeds, print size, knobs and start the wall clock."""
    seed_everything(seed)
    run = Run(notebook=notebook, knobs=dict(knobs or {}), seed=seed)
    print(f"[{notebook}] STUDY_SIZE={size()} seed={seed}")
    for k, v in run.knobs.items():
        print(f"  {k} = {v}")
    return run


def load_results() -> dict[str, dict]:
    """All results files, keyed by notebook name (for the claims page)."""
    out = {}
    for p in sorted(results_dir().glob("*.json")):
        try:
            out[p.stem] = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
    return out
