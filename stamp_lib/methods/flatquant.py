r"""FlatQuant's building blocks (Sun et al., "FlatQuant: Flatness Matters for LLM Quantization",
ICML 2025): learnable affine feature transforms in Kronecker form, learnable clipping, and the
block-wise calibration loop. Imports :mod:`stamp_lib.core` only; the decoder-level method (which
transform goes where, layer by layer) is :mod:`stamp_lib.model.flatquant`.

What the published code does and this module reproduces (``ruikangliu/FlatQuant``; the W4A4KV4
scripts: ``--cali_trans --add_diag --lwc --lac``, 15 epochs, learning rate 5e-3, batches of 4):

* **Transform** :math:`x \mapsto (x \odot s)\,P` with :math:`P = P_1 \otimes P_2`, each factor
  :math:`P_i = U_i \operatorname{diag}(\sigma_i) V_i^\top` (the "SVD" parametrisation, the default:
  :math:`U_i, V_i` orthogonal through the Cayley map, ``torch.nn.utils.parametrizations.orthogonal``
  without trivialisation, from a random orthogonal start; :math:`\sigma_i` start at 1), so the
  inverse is :math:`V_i \operatorname{diag}(1/\sigma_i) U_i^\top` without a matrix inversion. The
  factor sizes split the width into the two factors closest to a square (:func:`decompose_dim`).
  The per-channel scale ``s`` ("add_diag") starts SmoothQuant-style,
  :math:`s_j = \max|W_{:,j}|^{1-\alpha} / \max|x_j|^{\alpha}` with :math:`\alpha = 0.3`
  (:func:`smooth_init`). The weight absorbs the inverse: :math:`W \mapsto (W / s)\,P^{-\top}`.
* **Learnable clipping** (LWC, LAC): the range of every weight row (per output channel) and of
  every activation row (per token) is multiplied by :math:`\mathrm{sigmoid}(c)`, one ``c`` for the
  maximum and one for the minimum (per row of the weight; one pair per layer for activations),
  starting at :math:`c = 4` (a ratio of 0.982).
* **Quantizers** with straight-through rounding (:func:`ste_round`): symmetric per output channel
  for weights, symmetric per token for activations, asymmetric (integer zero point) per token and
  head for the K/V cache; every range includes zero (FlatQuant's ``min(x, 0)``, ``max(x, 0)``).
  With the clip ratios at 1 and a row holding both signs, the forward values are those of
  :func:`stamp_lib.core.quant.fake_quant` (tested).
* **Calibration** (:func:`fit`): AdamW (torch's default weight decay), learning rate ``lr`` for the
  transforms and ``10 lr`` for the clip factors, cosine decay to ``lr / 1000`` over all steps, the
  MSE between the quantized block's output and the full-precision block's output, each step's
  loss divided by its own (detached) value.

Departures are the caller's (fewer windows and epochs on a CPU) and are recorded in the knobs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..core.hadamard import kron_apply_reference
from .features import FeatureTransform, _cast_cache

__all__ = ["decompose_dim", "KronAffine", "KronMatrix", "ClipFactors", "ste_round", "clip_weight", "quant_weight",
           "quant_act", "smooth_init", "fit", "FitLog", "CLIP_INIT"]

CLIP_INIT = 4.0  # FlatQuant's initial clip logit: sigmoid(4) = 0.982


def decompose_dim(n: int) -> tuple[int, int]:
    """The Kronecker factor sizes ``(a, b)``, ``a <= b``, ``a * b = n``, of a width ``n``.

    FlatQuant searches the smallest :math:`m \\ge \\sqrt n` with :math:`m^2 - n` a square
    :math:`k^2` and takes :math:`(m - k, m + k)`: the factor pair of equal parity closest to a
    square (576 -> (24, 24), 1536 -> (32, 48), 2048 -> (32, 64)). That search never ends for
    :math:`n \\equiv 2 \\pmod 4` (no factor pair of equal parity); there the closest pair is taken."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"decompose_dim: the width must be an int >= 1, got {n!r}")
    pairs = [(a, n // a) for a in range(1, math.isqrt(n) + 1) if n % a == 0]
    same = [p for p in pairs if (p[0] + p[1]) % 2 == 0]
    return max(same or pairs)


def _random_orthogonal(n: int, generator: torch.Generator, dtype) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(dtype)


class _Factor(nn.Module):
    r"""One learnable factor :math:`U \operatorname{diag}(\sigma) V^\top` (``sigma=False``: the
    orthogonal :math:`U V^\top`)."""

    def __init__(self, n: int, generator: torch.Generator, dtype=torch.float32, sigma: bool = True):
        super().__init__()
        self.n = n
        self.u = self._orthogonal(n, generator, dtype)
        self.v = self._orthogonal(n, generator, dtype)
        self.sigma = nn.Parameter(torch.ones(n, dtype=dtype)) if sigma else None

    @staticmethod
    def _orthogonal(n, generator, dtype) -> nn.Module:
        lin = nn.Linear(n, n, bias=False, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(_random_orthogonal(n, generator, dtype))
        return nn.utils.parametrizations.orthogonal(lin, orthogonal_map="cayley", use_trivialization=False)

    def matrix(self, kind: str = "forward") -> torch.Tensor:
        """``"forward"``: P; ``"inverse"``: :math:`P^{-1}`; ``"inverse_t"``: :math:`P^{-\\top}`."""
        U, V = self.u.weight, self.v.weight
        if self.sigma is None:
            return {"forward": U @ V.T, "inverse": V @ U.T, "inverse_t": U @ V.T}[kind]
        if kind == "forward":
            return (U * self.sigma) @ V.T
        if kind == "inverse":
            return (V / self.sigma) @ U.T
        return (U / self.sigma) @ V.T

    def singular_values(self) -> torch.Tensor:
        return torch.ones(self.n) if self.sigma is None else self.sigma.detach().abs()


def _kron_right(x: torch.Tensor, mats: list[torch.Tensor]) -> torch.Tensor:
    """``x @ kron(M_1, ..., M_J)`` over the last dim of ``x`` (differentiable)."""
    return kron_apply_reference(x, [M.T for M in mats])


class KronAffine(nn.Module):
    r"""A learnable :math:`R = \operatorname{diag}(s)\,(P_1 \otimes \dots \otimes P_J)` acting on the
    right of a feature vector (the :class:`stamp_lib.methods.features.FeatureTransform` maps,
    differentiable), with ``sizes`` the factor sizes (one factor: a plain matrix) and ``diag`` the
    per-channel scale (``None``: no scale). ``sigma=False`` keeps every factor orthogonal.
    :meth:`frozen` returns the fixed float64 :class:`KronMatrix` for evaluation."""

    def __init__(self, sizes, *, diag: bool = False, sigma: bool = True, seed: int = 0, dtype=torch.float32,
                 name: str = "flatquant"):
        super().__init__()
        sizes = tuple(int(n) for n in sizes)
        if not sizes or any(n < 1 for n in sizes):
            raise ValueError(f"KronAffine: factor sizes must be ints >= 1, got {sizes!r}")
        g = torch.Generator().manual_seed(int(seed))
        self.factors = nn.ModuleList(_Factor(n, g, dtype, sigma) for n in sizes)
        self.d = math.prod(sizes)
        self.diag = nn.Parameter(torch.ones(self.d, dtype=dtype)) if diag else None
        self.name = name

    def mats(self, kind: str = "forward") -> list[torch.Tensor]:
        return [f.matrix(kind) for f in self.factors]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.diag is not None:
            x = x * self.diag.to(x.dtype)
        return _kron_right(x, [M.to(x.dtype) for M in self.mats("forward")])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        r""":math:`(y P^{-1}) / s`, differentiable."""
        x = _kron_right(y, [M.to(y.dtype) for M in self.mats("inverse")])
        return x if self.diag is None else x / self.diag.to(y.dtype)

    def fold_weight(self, W: torch.Tensor) -> torch.Tensor:
        r""":math:`(W / s)\,P^{-\top}` for a weight (out, d)."""
        if self.diag is not None:
            W = W / self.diag.to(W.dtype)
        return _kron_right(W, [M.to(W.dtype) for M in self.mats("inverse_t")])

    def condition(self) -> float:
        """The condition number of P (product over the factors of max sigma / min sigma)."""
        out = 1.0
        for f in self.factors:
            s = f.singular_values()
            out *= float(s.max() / s.min())
        return out

    @torch.no_grad()
    def frozen(self, with_diag: bool = True) -> KronMatrix:
        """The current transform as a fixed :class:`KronMatrix` (float64); ``with_diag=False`` leaves
        the per-channel scale out (it is fused into a norm or the previous layer instead)."""
        return KronMatrix([m.double() for m in self.mats("forward")],
                          [m.double() for m in self.mats("inverse")],
                          self.diag.detach().double() if (with_diag and self.diag is not None) else None,
                          name=self.name)


class KronMatrix(FeatureTransform):
    r"""A fixed :math:`R = \operatorname{diag}(s)\,(F_1 \otimes \dots \otimes F_J)` (the
    :class:`~stamp_lib.methods.features.FeatureTransform` contract), from a trained
    :class:`KronAffine`: ``forward`` :math:`x R`, ``inverse`` :math:`y R^{-1}`, ``fold_weight``
    :math:`W R^{-\top}`, ``fold_reader`` :math:`B R^\top`. ``inv`` are the factors' inverses
    (computed from the parametrisation, not by inversion)."""

    def __init__(self, fwd: list[torch.Tensor], inv: list[torch.Tensor], diag: torch.Tensor | None = None,
                 name: str = "flatquant"):
        if len(fwd) != len(inv) or not fwd:
            raise ValueError("KronMatrix: give one inverse per factor")
        self.fwd, self.inv = list(fwd), list(inv)
        for i, (F, G) in enumerate(zip(self.fwd, self.inv)):  # named, so that casts are cached per matrix
            setattr(self, f"fwd{i}", F)
            setattr(self, f"inv{i}", G)
            setattr(self, f"fwd_t{i}", F.T.contiguous())
            setattr(self, f"inv_t{i}", G.T.contiguous())
        self.diag = diag
        self.d = math.prod(M.shape[0] for M in self.fwd)
        self.name = name

    def _m(self, which: str, like: torch.Tensor) -> list[torch.Tensor]:
        return [_cast_cache(self, f"{which}{i}", like) for i in range(len(self.fwd))]

    def _s(self, like):
        return None if self.diag is None else _cast_cache(self, "diag", like)

    def forward(self, x):
        self._check(x)
        s = self._s(x)
        return _kron_right(x if s is None else x * s, self._m("fwd", x))

    def inverse(self, y):
        self._check(y, "y")
        s = self._s(y)
        x = _kron_right(y, self._m("inv", y))
        return x if s is None else x / s

    def fold_weight(self, W):
        self._check(W, "W")
        s = self._s(W)
        return _kron_right(W if s is None else W / s, self._m("inv_t", W))

    def fold_reader(self, B):
        self._check(B, "B")
        s = self._s(B)
        out = _kron_right(B, self._m("fwd_t", B))
        return out if s is None else out * s

    def matrix(self, dtype=torch.float64) -> torch.Tensor:
        """The dense d x d matrix R."""
        P = self.fwd[0].to(dtype)
        for M in self.fwd[1:]:
            P = torch.kron(P, M.to(dtype))
        return P if self.diag is None else self.diag.to(dtype)[:, None] * P


# ----------------------------------------------------------------------------- quantizers
def ste_round(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest (half to even) with the identity as its gradient (straight-through)."""
    return x + (torch.round(x) - x).detach()


class ClipFactors(nn.Module):
    """Learnable clip logits for the maximum and the minimum of a range, ``shape`` each (``(rows, 1)``
    per weight row, ``(1,)`` per activation tensor), starting at :data:`CLIP_INIT`."""

    def __init__(self, shape, dtype=torch.float32):
        super().__init__()
        self.hi = nn.Parameter(torch.full(tuple(shape), CLIP_INIT, dtype=dtype))
        self.lo = nn.Parameter(torch.full(tuple(shape), CLIP_INIT, dtype=dtype))

    def ratios(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.sigmoid(self.hi), torch.sigmoid(self.lo)


def _ranges(x: torch.Tensor, clip: ClipFactors | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (last dim) maximum and minimum, each widened to include zero, times the clip ratios."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    hi = torch.maximum(x.amax(-1, keepdim=True), zero)
    lo = torch.minimum(x.amin(-1, keepdim=True), zero)
    if clip is not None:
        rh, rl = clip.ratios()
        hi, lo = hi * rh.to(x.dtype), lo * rl.to(x.dtype)
    return hi, lo


def _quant(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, bits, symmetric: bool) -> torch.Tensor:
    """``bits``: an int, or a float tensor broadcastable against the ranges (per-row bits)."""
    def t(v):
        return torch.as_tensor(v, dtype=x.dtype, device=x.device)

    if symmetric:
        qmax = t(2 ** (bits - 1) - 1)
        amax = torch.maximum(hi, -lo)
        scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
        return torch.clamp(ste_round(x / scale), -qmax - 1, qmax) * scale
    levels = t(2 ** bits - 1)
    flat = (hi == 0) & (lo == 0)
    hi, lo = torch.where(flat, torch.ones_like(hi), hi), torch.where(flat, -torch.ones_like(lo), lo)
    scale = (hi - lo) / levels
    zero = torch.round(-lo / scale)
    return (torch.clamp(ste_round(x / scale) + zero, torch.zeros_like(levels), levels) - zero) * scale


def clip_weight(W: torch.Tensor, clip: ClipFactors) -> torch.Tensor:
    """Each row (output channel) of ``W`` clamped to its range times the learnable ratios (LWC)."""
    hi, lo = _ranges(W, clip)
    return torch.clamp(W, min=lo, max=hi)


def quant_weight(W: torch.Tensor, bits: int, clip: ClipFactors | None = None, symmetric: bool = True) -> torch.Tensor:
    """FlatQuant's weight quantizer: each row (output channel), clipped first when ``clip`` is given
    (:func:`clip_weight`), quantized on a grid over its range, straight-through."""
    if clip is not None:
        W = clip_weight(W, clip)
    hi, lo = _ranges(W, None)
    return _quant(W, hi, lo, bits, symmetric)


def quant_act(x: torch.Tensor, bits, clip: ClipFactors | None = None, symmetric: bool = True) -> torch.Tensor:
    """FlatQuant's activation quantizer: per token (row over the last dim), the range clipped by
    the learnable ratios (LAC), values outside it clamped by the grid, straight-through. ``bits``:
    an int, or per-row bits as a float tensor (s, 1) for x (..., s, d) (STaMP's two-level rows,
    through :func:`stamp_lib.core.quant.stamp_fake_quant`'s ``quantizer``)."""
    hi, lo = _ranges(x, clip)
    return _quant(x, hi, lo, bits, symmetric)


def smooth_init(w_absmax: torch.Tensor, x_absmax: torch.Tensor, alpha: float = 0.3) -> torch.Tensor:
    r"""FlatQuant's "sq_style" start of the per-channel scale: :math:`s = w^{1-\alpha} / x^{\alpha}`,
    at least 1e-5 (the activation is multiplied by s, the weight divided)."""
    return (w_absmax.pow(1 - alpha) / x_absmax.pow(alpha)).clamp(min=1e-5)


# ----------------------------------------------------------------------------- calibration
@dataclass
class FitLog:
    """The output MSE of one block over the calibration set: before any step (``initial``), the
    mean over each epoch's steps (``epochs``) and after the last step (``final``)."""

    initial: float
    epochs: list = field(default_factory=list)
    final: float = float("nan")
    seconds: float = 0.0


def fit(block: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor,
        transform_params, clip_params, *, epochs: int, batch_size: int, lr: float,
        progress: Callable[[int], None] | None = None) -> FitLog:
    """Train ``block`` (the quantized block, a function of a batch of inputs) to match ``targets``
    (the full-precision block's outputs), FlatQuant's schedule (module docstring). ``inputs`` and
    ``targets`` are (n, ...) with n a multiple of ``batch_size``; ``progress(1)`` after each step."""
    import time

    n = inputs.shape[0]
    if not (isinstance(batch_size, int) and 1 <= batch_size <= n and n % batch_size == 0):
        raise ValueError(f"fit: batch_size must divide the {n} calibration samples, got {batch_size!r}")
    if not (isinstance(epochs, int) and epochs >= 0):
        raise ValueError(f"fit: epochs must be an int >= 0, got {epochs!r}")
    transform_params, clip_params = list(transform_params), list(clip_params)
    groups = [g for g in ({"params": transform_params, "lr": lr}, {"params": clip_params, "lr": 10 * lr})
              if g["params"]]
    t0 = time.perf_counter()

    @torch.no_grad()
    def mse() -> float:
        return sum(float(torch.mean((block(inputs[i:i + batch_size]) - targets[i:i + batch_size]) ** 2))
                   for i in range(0, n, batch_size)) / (n // batch_size)

    log = FitLog(initial=mse())
    if not groups or epochs == 0:
        log.final, log.seconds = log.initial, time.perf_counter() - t0
        return log
    opt = torch.optim.AdamW(groups)
    steps = epochs * (n // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 1e-3)
    for _ in range(epochs):
        total = 0.0
        for i in range(0, n, batch_size):
            loss = torch.mean((block(inputs[i:i + batch_size]) - targets[i:i + batch_size]) ** 2)
            total += float(loss.detach())
            opt.zero_grad(set_to_none=True)
            (loss / loss.detach()).backward()
            opt.step()
            sched.step()
            if progress is not None:
                progress(1)
        log.epochs.append(total / (n // batch_size))
    log.final = mse()
    log.seconds = time.perf_counter() - t0
    return log
