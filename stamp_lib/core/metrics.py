"""Metrics: SQNR, squared error and energy profiles."""

from __future__ import annotations

import math

import torch

__all__ = ["db", "sqnr_db", "sqnr_db_per_sample", "psnr_db_per_sample", "squared_error", "row_energy",
           "energy_profile", "energy_fraction"]


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: reference {tuple(a.shape)} vs test {tuple(b.shape)}")


def squared_error(reference: torch.Tensor, test: torch.Tensor) -> float:
    """||reference - test||^2 (float64 accumulation)."""
    _same_shape(reference, test)
    return float((reference.double() - test.double()).pow(2).sum())


def db(signal: float, noise: float) -> float:
    """``10 log10(signal / noise)``: ``inf`` for zero noise, ``-inf`` for zero signal."""
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    r"""Signal-to-quantization-noise ratio :math:`10\log_{10}(\|r\|^2 / \|r - t\|^2)` in dB.

    ``inf`` when ``test`` equals ``reference``. Sums over every element (batch included)."""
    reference, test = torch.as_tensor(reference), torch.as_tensor(test)
    _same_shape(reference, test)
    sig = float(reference.double().pow(2).sum())
    noise = squared_error(reference, test)
    if not (math.isfinite(sig) and math.isfinite(noise)):
        raise ValueError("sqnr_db got NaN/Inf in its inputs")
    if noise == 0.0:
        return math.inf
    if sig == 0.0:
        return -math.inf
    return 10.0 * math.log10(sig / noise)


def sqnr_db_per_sample(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """:func:`sqnr_db` of every sample (dim 0, e.g. one image each) of ``test`` against
    ``reference``: a float64 tensor (n,), ``inf`` where a sample is reproduced exactly."""
    if reference.shape != test.shape or reference.dim() < 2:
        raise ValueError(f"need two batches of the same shape, got {tuple(reference.shape)} and {tuple(test.shape)}")
    r, t = reference.double().flatten(1), test.double().flatten(1)
    if not (bool(torch.isfinite(r).all()) and bool(torch.isfinite(t).all())):
        raise ValueError("sqnr_db_per_sample got NaN/Inf")
    return 10 * torch.log10(r.pow(2).sum(1) / (r - t).pow(2).sum(1))


def psnr_db_per_sample(reference: torch.Tensor, test: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) per sample (dim 0) with the reference sample's range (max - min) as the peak."""
    if reference.shape != test.shape or reference.dim() < 2:
        raise ValueError(f"need two batches of the same shape, got {tuple(reference.shape)} and {tuple(test.shape)}")
    r, t = reference.double().flatten(1), test.double().flatten(1)
    peak = r.amax(1) - r.amin(1)
    return 10 * torch.log10(peak.pow(2) / (r - t).pow(2).mean(1))


def row_energy(Y: torch.Tensor) -> torch.Tensor:
    """Energy of each row (token) of Y (..., s, d), summed over leading dims and features: (s,)."""
    if Y.dim() < 2:
        raise ValueError(f"expected (..., s, d), got shape {tuple(Y.shape)}")
    return Y.double().pow(2).sum(dim=-1).reshape(-1, Y.shape[-2]).sum(0)


def energy_profile(Y: torch.Tensor) -> torch.Tensor:
    """Cumulative fraction of the energy held by the first k rows, k = 1..s: (s,), ends at 1."""
    e = row_energy(Y)
    tot = e.sum()
    if tot <= 0:
        raise ValueError("energy_profile of an all-zero tensor is undefined")
    return torch.cumsum(e, 0) / tot


def energy_fraction(Y: torch.Tensor, k: int) -> float:
    """Fraction of the energy held by the first ``k`` rows."""
    s = Y.shape[-2]
    if not 1 <= k <= s:
        raise ValueError(f"k must be in [1, s={s}], got {k}")
    return float(energy_profile(Y)[k - 1])
