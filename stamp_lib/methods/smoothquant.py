r"""SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models"). Per input channel j,

.. math::  s_j = \frac{\max |X_j|^{\alpha}}{\max |W_j|^{1-\alpha}},\qquad
           Y = (X \operatorname{diag}(s)^{-1}) (W \operatorname{diag}(s))^\top,

which moves quantization difficulty from activations to weights; at :math:`\alpha = 1/2`
both smoothed ranges equal :math:`\sqrt{\max|X_j| \max|W_j|}`. The result is a
:class:`stamp_lib.methods.features.Scale` (r = 1/s) that the recipe layer folds into the weight.
"""

from __future__ import annotations

import math

import torch

from .features import Scale

__all__ = ["smoothquant_scales", "smoothquant_transform", "weight_input_absmax"]


def _absmax_vector(v, what: str) -> torch.Tensor:
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (d,), got {type(v).__name__}")
    if v.dim() != 1 or v.numel() == 0:
        raise ValueError(f"{what} must be a non-empty 1-D tensor (one value per input channel), "
                         f"got shape {tuple(v.shape)}")
    v = v.detach().to(torch.float64)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{what} contains non-finite values ({int(torch.isnan(v).sum())} NaN, "
                         f"{int(torch.isinf(v).sum())} Inf)")
    if bool((v < 0).any()):
        raise ValueError(f"{what} must be non-negative (absolute maxima), "
                         f"{int((v < 0).sum())} entries are negative")
    return v


def smoothquant_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5,
                       *, eps: float = 1e-5) -> torch.Tensor:
    r"""SmoothQuant smoothing factors :math:`s_j = \max|X_j|^\alpha / \max|W_j|^{1-\alpha}`.

    Args:
        act_absmax: (d,) per-input-channel max |X_j| over the calibration tokens.
        weight_absmax: (d,) per-input-channel max |W_ij| over the output rows of every weight that
            reads this input (see :func:`weight_input_absmax`).
        alpha: migration strength in [0, 1] (0.5 in the paper for most models).
        eps: values below ``eps`` are clamped to it before the powers.
    Returns:
        float64 (d,) factors, finite and > 0, on ``act_absmax``'s device. Channels with zero
        activation or zero weight range get s = 1 (nothing to balance). Smoothing divides the
        activation by s and multiplies the weight's input columns by s (:func:`smoothquant_transform`).
    Raises:
        ValueError for shapes that differ or are not 1-D, non-finite or negative values, alpha
        outside [0, 1]."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not (isinstance(eps, (int, float)) and eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    a = _absmax_vector(act_absmax, "act_absmax")
    w = _absmax_vector(weight_absmax, "weight_absmax").to(a.device)
    if a.shape != w.shape:
        raise ValueError(f"act_absmax has {a.numel()} channels but weight_absmax has {w.numel()}")
    s = a.clamp_min(eps) ** alpha / w.clamp_min(eps) ** (1.0 - alpha)
    s = torch.where((a == 0) | (w == 0), torch.ones_like(s), s)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):  # pragma: no cover - float64 range
        raise ValueError("smoothing factors overflowed; rescale the inputs")
    return s


def smoothquant_transform(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float = 0.5,
                          *, eps: float = 1e-5, name: str = "smoothquant") -> Scale:
    """The SmoothQuant feature transform ``features.Scale(1 / s)``: ``forward(x) = x / s``,
    ``fold_weight(W) = W * s`` (columns), with s from :func:`smoothquant_scales`."""
    s = smoothquant_scales(act_absmax, weight_absmax, alpha, eps=eps)
    return Scale(1.0 / s, name=name)


def weight_input_absmax(*weights: torch.Tensor) -> torch.Tensor:
    """Per-input-channel max |W_ij| over the rows of all given weights (each (out_k, d)), e.g. the
    q, k and v projections that read the same normalized activation. float64 (d,)."""
    if not weights:
        raise ValueError("weight_input_absmax needs at least one weight")
    d = None
    out = None
    for k, W in enumerate(weights):
        if not isinstance(W, torch.Tensor) or W.dim() != 2:
            raise ValueError(f"weight {k} must be a 2-D (out, in) tensor, got {getattr(W, 'shape', type(W))}")
        if d is None:
            d = W.shape[1]
        elif W.shape[1] != d:
            raise ValueError(f"weight {k} has {W.shape[1]} input features, weight 0 has {d}")
        m = W.detach().abs().amax(dim=0).to(torch.float64)
        out = m if out is None else torch.maximum(out, m.to(out.device))
    return out
