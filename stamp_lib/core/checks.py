"""Input validation shared by the core modules: every public entry point fails early with a
message that names the problem, instead of a deep traceback or a silent wrong answer."""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 16


def as_sequence_tensor(X, what: str = "X", check_finite: bool = True) -> torch.Tensor:
    """Check that ``X`` is a floating tensor of shape (..., s, d) with finite values."""
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor of shape (..., s, d), got {type(X).__name__}")
    if X.dim() < 2:
        raise ValueError(
            f"{what} must have rank >= 2 with shape (..., s, d) (tokens along dim -2, features "
            f"along dim -1); got rank {X.dim()} with shape {tuple(X.shape)}"
        )
    if not X.is_floating_point():
        raise TypeError(f"{what} must be a floating tensor (float16/bfloat16/float32/float64), got {X.dtype}")
    if X.shape[-2] == 0 or X.shape[-1] == 0:
        raise ValueError(f"{what} is empty: shape {tuple(X.shape)}")
    # one fast reduction first; the exact count only when something is wrong
    if check_finite and not bool(torch.isfinite(X.sum())) and not bool(torch.isfinite(X).all()):
        n_nan = int(torch.isnan(X).sum())
        n_inf = int(torch.isinf(X).sum())
        raise ValueError(f"{what} contains non-finite values ({n_nan} NaN, {n_inf} Inf)")
    return X


def check_bits(bits, s: int | None = None, device=None) -> torch.Tensor:
    """Validate a bit width (int) or a per-row bit vector (1-D, length ``s``) in [2, 16].

    Returns a 1-D long tensor of length ``s`` (or a 0-d tensor when ``s`` is None)."""
    if isinstance(bits, bool):
        raise TypeError("bits must be an int or a 1-D tensor of ints, got bool")
    if isinstance(bits, int):
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        b = torch.tensor(bits, dtype=torch.long, device=device)
        return b if s is None else b.expand(s).clone()
    if isinstance(bits, float):
        if bits != int(bits):
            raise ValueError(f"bits must be an integer, got {bits}")
        return check_bits(int(bits), s, device)
    b = torch.as_tensor(bits, device=device)
    if b.dim() != 1:
        raise ValueError(f"a bit vector must be 1-D (one width per row), got shape {tuple(b.shape)}")
    if s is not None and b.numel() != s:
        raise ValueError(f"bit vector has length {b.numel()} but X has s={s} rows (dim -2)")
    if b.is_floating_point():
        if not bool(torch.isfinite(b).all()) or bool((b != b.round()).any()):
            raise ValueError("bit vector must hold integers")
        b = b.round()
    b = b.long()
    if b.numel() and (int(b.min()) < MIN_BITS or int(b.max()) > MAX_BITS):
        raise ValueError(
            f"bits must be in [{MIN_BITS}, {MAX_BITS}], got values in [{int(b.min())}, {int(b.max())}]"
        )
    return b
