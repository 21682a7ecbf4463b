r"""What STaMP's sequence transforms cost next to the linear layers they feed (chapter 6).

The paper reports 0.21% extra FLOPs and 4.8% extra latency for a 3-level Haar DWT on an A100 with
a CUDA kernel, without the counting behind the first number. This module counts and times it.

Contract
--------
* :func:`block_linears` lists the linear layers of one transformer block that see the tokens
  STaMP transforms (``d_in``, ``d_out`` and the *input group*: q/k/v share one input, so do
  gate/up and PixArt's self-attention q/k/v; PixArt's cross-attention K/V read text tokens and are
  left out, as the paper leaves them). :data:`SHAPES` builds the blocks of SmolLM2-135M,
  Llama-3-8B and PixArt-Sigma (1024 px) from their published configurations on the ``meta``
  device: no weights, no memory.
* :func:`transform_flops` counts one application of a fast transform to an (s, d) matrix:
  Haar DWT, level l on n rows: n/2 pairs x d columns x (2 additions + 2 multiplications); the
  2-D Haar does a row and a column pass per level on a grid that shrinks 4x a level; the fast WHT
  s log2(s) additions and one scaling per column entry; the DCT is counted as a real FFT of
  length s, 2.5 s log2(s) per column, plus 6 s for its twiddles (an estimate, as every FFT count).
* :func:`flops_overhead`: per block, the transform's FLOPs over the linear layers' 2 s d_in
  d_out. Deployed with integer kernels, L is applied once per input group (before the
  quantizer) and L^{-1} to every linear's output (the integer product is of transformed tokens;
  L acts on tokens and W on features, so they commute); that is what is counted. Quantization
  itself is not counted (the baseline has it too).
* :func:`time_overhead`: the same operations timed side by side on this machine (float32,
  interleaved repeats, medians), as a ratio of the transforms to the matmuls. A CPU ratio, not
  the paper's GPU kernel: say which machine.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..core import transforms
from .bench import interleaved

__all__ = ["Linear", "block_linears", "SHAPES", "PAPER", "transform_flops", "flops_overhead", "time_overhead"]

# the paper's overhead study (Sec. 5): a 3-level Haar DWT, A100, CUDA kernel
PAPER = {"levels": 3, "flops_pct": 0.21, "latency_pct": 4.8}


@dataclass(frozen=True)
class Linear:
    """One linear layer of a block: its name, widths and the group of layers sharing its input."""

    name: str
    d_in: int
    d_out: int
    group: str


_SHARED = (  # layers that read the same tensor: one forward transform serves them all
    (re.compile(r"self_attn\.(q|k|v)_proj$"), "q/k/v"),
    (re.compile(r"mlp\.(gate|up)_proj$"), "gate/up"),
    (re.compile(r"attn1\.to_(q|k|v)$"), "attn1 q/k/v"),
)
_TEXT_INPUT = re.compile(r"attn2\.to_(k|v)$")  # PixArt cross-attention K/V: text tokens


def block_linears(block: nn.Module) -> list[Linear]:
    """The linear layers of ``block`` that see its tokens, with their input groups."""
    out = []
    for name, m in block.named_modules():
        if not isinstance(m, nn.Linear) or _TEXT_INPUT.search(name):
            continue
        group = next((g for pat, g in _SHARED if pat.search(name)), name)
        out.append(Linear(name, m.in_features, m.out_features, group))
    if not out:
        raise ValueError(f"{type(block).__name__} has no nn.Linear layers: pass one transformer block")
    return out


def _llama_block(**cfg) -> nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        return LlamaDecoderLayer(LlamaConfig(num_hidden_layers=1, **cfg), layer_idx=0)


def _pixart_block() -> nn.Module:
    from diffusers import PixArtTransformer2DModel

    with torch.device("meta"):
        return PixArtTransformer2DModel(num_layers=1, sample_size=128, caption_channels=4096,
                                        out_channels=8, use_additional_conditions=False).transformer_blocks[0]


# published configurations (one block each), the sequence length of the paper's evaluation, and
# the transform it uses there: 1-D Haar over 2048 text tokens, 2-D Haar over PixArt-Sigma's 64x64
# latent patch grid at 1024 px
SHAPES = {
    "SmolLM2-135M": dict(block=lambda: _llama_block(hidden_size=576, intermediate_size=1536,
                                                     num_attention_heads=9, num_key_value_heads=3),
                         seq_len=2048, grid=None),
    "Llama-3-8B": dict(block=lambda: _llama_block(hidden_size=4096, intermediate_size=14336,
                                                   num_attention_heads=32, num_key_value_heads=8),
                       seq_len=2048, grid=None),
    "PixArt-Sigma": dict(block=_pixart_block, seq_len=4096, grid=(64, 64)),
}


def transform_flops(name: str, s: int, d: int, *, levels: int | None = None,
                    grid: tuple[int, int] | None = None) -> float:
    """Floating-point operations of one fast ``name`` transform of an (s, d) matrix (see the module
    docstring for the counting). ``levels``/``grid``: Haar levels and 2-D token grid."""
    if s < 1 or d < 1:
        raise ValueError(f"s and d must be >= 1, got s={s}, d={d}")
    if name == "dwt":
        levels = transforms.max_levels_1d(s) if levels is None else levels
        if grid is None:
            return sum(2.0 * (s / 2 ** (lv - 1)) * d for lv in range(1, levels + 1))
        h, w = grid
        if h * w != s:
            raise ValueError(f"grid {grid} does not hold s={s} tokens")
        return sum(2 * 2.0 * (s / 4 ** (lv - 1)) * d for lv in range(1, levels + 1))
    if levels is not None or grid is not None:
        raise ValueError(f"levels/grid apply to 'dwt' only, not {name!r}")
    if name == "wht":
        return float(s * math.log2(s) * d + s * d)
    if name == "dct":
        return float((2.5 * s * math.log2(s) + 6 * s) * d)
    if name == "identity":
        return 0.0
    raise ValueError(f"unknown transform {name!r}; choose 'dwt', 'dct', 'wht' or 'identity'")


def _inputs(linears: list[Linear]) -> dict[str, int]:
    return {lin.group: lin.d_in for lin in linears}


def flops_overhead(linears: list[Linear], s: int, name: str = "dwt", **kw) -> dict:
    """FLOPs of one block's linear layers at ``s`` tokens and of its transforms (forward once per
    input group, inverse on every output); ``ratio`` = transforms / linears."""
    lin = sum(2.0 * s * x.d_in * x.d_out for x in linears)
    fwd = sum(transform_flops(name, s, d, **kw) for d in _inputs(linears).values())
    inv = sum(transform_flops(name, s, x.d_out, **kw) for x in linears)
    return {"linear_flops": lin, "transform_flops": fwd + inv, "ratio": (fwd + inv) / lin}


@torch.no_grad()
def time_overhead(linears: list[Linear], s: int, name: str = "dwt", *, repeats: int = 3, seed: int = 0,
                  threads: int | None = 1, **kw) -> dict:
    """Median seconds of the block's matmuls and of its transforms (float32, this machine),
    interleaved ``repeats`` times; ``ratio`` = transforms / matmuls. ``threads``: torch threads
    for the timing (1 by default, as the other benchmarks: a shared machine's second core makes
    memory-bound transforms far noisier than the compute-bound matmuls); ``None`` keeps torch's."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _time_overhead(linears, s, name, repeats, seed, **kw)
    finally:
        torch.set_num_threads(saved)


def _time_overhead(linears, s, name, repeats, seed, **kw) -> dict:
    g = torch.Generator().manual_seed(seed)
    X = {grp: torch.randn(s, d, generator=g) for grp, d in _inputs(linears).items()}
    W = {x.name: torch.randn(x.d_in, x.d_out, generator=g) / x.d_in ** 0.5 for x in linears}
    Y = {x.name: X[x.group] @ W[x.name] for x in linears}
    T = transforms.build(name, **kw)
    T.check_finite = False  # time the transform, not the input validation

    def matmuls():
        for x in linears:
            torch.mm(X[x.group], W[x.name])

    def transform():
        for v in X.values():
            T.forward(v)
        for v in Y.values():
            T.inverse(v)

    t = interleaved({"matmuls": matmuls, "transforms": transform}, repeats)
    return {"matmul_s": t["matmuls"], "transform_s": t["transforms"], "ratio": t["transforms"] / t["matmuls"],
            "threads": torch.get_num_threads(), "repeats": repeats}
