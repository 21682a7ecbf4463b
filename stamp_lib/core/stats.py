r"""Paired statistics: the one place where a spread, a standard error and an interval are computed.

Every comparison of the study is paired: two configurations measured on the same independent
units (text windows, images from the same noise), so the difference :math:`d_k = b_k - a_k` of
each unit removes what the units share. For n units,

.. math::  \bar d = \frac1n \sum_k d_k,\qquad \mathrm{se} = \frac{s_d}{\sqrt n},\qquad
           \bar d \pm t_{0.975,\,n-1}\,\mathrm{se}

(Student's t interval: with 4-16 units, two standard errors are anti-conservative). ``wins`` counts
the units on which the second configuration is better (``lower`` or ``higher`` is better, as the
metric says).
"""

from __future__ import annotations

import math

import torch

__all__ = ["mean_se", "t_quantile", "paired_difference"]


def _as_vector(v, what: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError(f"{what} is empty")
    return t


def mean_se(v) -> tuple[float, float]:
    """Mean of ``v`` and its standard error (sample sd / sqrt(n); NaN for one value)."""
    t = _as_vector(v, "values")
    n = t.numel()
    return float(t.mean()), (float(t.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan"))


def t_quantile(n: int, level: float = 0.95) -> float:
    """The two-sided Student-t quantile for ``n`` units (``n - 1`` degrees of freedom)."""
    if n < 2:
        return float("nan")
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, n - 1))


def paired_difference(a, b, *, better: str = "lower", level: float = 0.95) -> dict:
    """``b - a`` unit by unit: ``mean``, ``se``, ``ci_lo``/``ci_hi`` (t interval at ``level``),
    ``wins`` (units where ``b`` is better: ``better="lower"`` or ``"higher"``), ``n``,
    ``beyond_2se`` and ``beyond_ci`` (the interval excludes zero)."""
    a, b = _as_vector(a, "a"), _as_vector(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a paired comparison needs the same units: {a.numel()} vs {b.numel()} values")
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    d = b - a
    n = d.numel()
    mean, se = mean_se(d)
    half = t_quantile(n, level) * se
    wins = int((d < 0).sum()) if better == "lower" else int((d > 0).sum())
    return {"mean": mean, "se": se, "ci_lo": mean - half, "ci_hi": mean + half, "wins": wins, "n": n,
            "beyond_2se": bool(n > 1 and abs(mean) > 2 * se), "beyond_ci": bool(n > 1 and abs(mean) > half)}
