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

__all__ = ["mean_se", "t_quantile", "paired_difference", "crossed_difference"]


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


def crossed_difference(a, b, *, better: str = "lower", level: float = 0.95) -> dict:
    r"""``b - a`` over a crossed design: ``a`` and ``b`` of shape ``(draws, units)``, every draw of
    the method's randomness (a Hadamard seed, a calibration draw) measured on the same units
    (text windows, images), so each cell pairs ``a`` and ``b`` on one (draw, unit).

    Under the two-way random-effects model :math:`d_{kj} = \mu + a_k + b_j + e_{kj}` (draw effect,
    unit effect, residual) the mean over all cells has variance
    :math:`\sigma_a^2/n_d + \sigma_b^2/n_u + \sigma_e^2/(n_d n_u)`, estimated from the ANOVA mean
    squares as :math:`(MS_A + MS_B - MS_E)/(n_d n_u)` (floored at :math:`MS_E/(n_d n_u)`), with
    Satterthwaite's degrees of freedom for the t interval. One draw reduces it to
    :func:`paired_difference` (the t interval over units). Besides the keys of
    :func:`paired_difference`: ``draws``, ``units``, ``df``, ``var_draws`` and ``var_units``
    (the two contributions to the variance of the mean: which one dominates the spread),
    ``draw_means`` (the mean difference of each draw)."""
    A = torch.as_tensor(a, dtype=torch.float64)
    B = torch.as_tensor(b, dtype=torch.float64)
    if A.dim() != 2 or A.shape != B.shape or A.numel() == 0:
        raise ValueError(f"a crossed comparison needs two (draws, units) arrays of one shape, got "
                         f"{tuple(A.shape)} and {tuple(B.shape)}")
    if better not in ("lower", "higher"):
        raise ValueError(f"better must be 'lower' or 'higher', got {better!r}")
    nd, nu = A.shape
    if nd == 1:
        out = paired_difference(A[0], B[0], better=better, level=level)
        return {**out, "draws": 1, "units": nu, "df": nu - 1, "var_draws": 0.0,
                "var_units": out["se"] ** 2 if nu > 1 else float("nan"), "draw_means": [out["mean"]]}
    D = B - A
    mu = float(D.mean())
    rows, cols = D.mean(1), D.mean(0)
    ms_a = nu * float(((rows - mu) ** 2).sum()) / (nd - 1)
    if nu > 1:
        ms_b = nd * float(((cols - mu) ** 2).sum()) / (nu - 1)
        resid = D - rows[:, None] - cols[None, :] + mu
        ms_e = float((resid ** 2).sum()) / ((nd - 1) * (nu - 1))
    else:
        ms_b, ms_e = 0.0, 0.0
    n = nd * nu
    parts = [(ms_a, nd - 1), (ms_b, nu - 1), (-ms_e, (nd - 1) * (nu - 1))] if nu > 1 else [(ms_a, nd - 1)]
    var = sum(m for m, _ in parts) / n
    floor = ms_e / n
    if var <= floor:  # negative variance-component estimates: keep the residual term alone
        var, parts = floor, [(ms_e, (nd - 1) * (nu - 1))]
    denom = sum((m / n) ** 2 / df for m, df in parts if df > 0)
    df = (var ** 2 / denom) if denom > 0 else float("nan")
    se = math.sqrt(var)
    if not math.isfinite(df) or df <= 0:
        half = float("nan")
    else:
        from scipy.stats import t

        half = float(t.ppf(0.5 + level / 2, df)) * se
    wins = int((D < 0).sum()) if better == "lower" else int((D > 0).sum())
    var_draws = max(ms_a - ms_e, 0.0) / (nu * nd)
    var_units = max(ms_b - ms_e, 0.0) / (nd * nu) if nu > 1 else 0.0
    return {"mean": mu, "se": se, "ci_lo": mu - half, "ci_hi": mu + half, "wins": wins, "n": n,
            "beyond_2se": abs(mu) > 2 * se, "beyond_ci": bool(half == half and abs(mu) > half),
            "draws": nd, "units": nu, "df": df, "var_draws": var_draws, "var_units": var_units,
            "draw_means": rows.tolist()}
