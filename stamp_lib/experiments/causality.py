r"""Causality of STaMP in prefill: what a sequence transform lets later tokens change, and whether
that flatters perplexity.

A sequence transform L mixes the tokens of one forward before they are quantized
(:math:`L^{-1} Q(L X)`), so the quantized activation at position i can depend on tokens after i:
within its :math:`2^{L}`-token block for a Haar DWT with L levels, over the whole window for the DCT.
Per-token quantization cannot leak (each row has its own range; attention is causal).

* :func:`leak`: change token j of a window and measure, for every earlier position i < j, the
  largest change of its logits (under a recipe). The signature of a Haar DWT with L levels is a
  change inside ``[j - j mod 2^L, j)`` and none before; the DCT moves every position.
* :func:`causal_nll`: score sampled positions *strictly causally*: the NLL of token p + 1 from a
  forward of the prefix ``window[:p + 1]`` alone (the sequence transform then spans the prefix
  only), one forward per position. :func:`onepass_nll` scores the same positions from one forward of
  the whole window, the protocol of perplexity tables (chapter 3). The difference between STaMP's
  gain in the two is what the leak is worth to a perplexity number.

A prompt is known in full at prefill, so the one-pass transform is legitimate when serving it; a
perplexity benchmark scores every position as if it had been generated, and there only the
prefix-only transform is fair. The prefix-only scoring is also the causal-safe variant of STaMP:
its cost is one transform (and one forward) per scored position, measured by :func:`causal_nll`.

* :func:`decode_nll`: teacher-forced decoding. A prompt is prefilled in one forward (STaMP mixes its
  tokens, K/V enter the cache quantized), then every further token is one cached step of one token,
  which a sequence transform cannot touch (one row: the identity). What STaMP can still do for
  those steps comes through the prompt's cached keys and values alone.

Everything is fake quantization in floating point (simulation).
"""

from __future__ import annotations

import contextlib
import time

import torch

from ..model import kv
from ..model import recipe as rcp

__all__ = ["logits", "leak", "leak_signature", "causal_nll", "onepass_nll", "decode_nll", "positions_to_score"]


def _check_window(window: torch.Tensor) -> torch.Tensor:
    if not isinstance(window, torch.Tensor) or window.dtype != torch.long or window.dim() not in (1, 2):
        raise ValueError("window must be a LongTensor of token ids, shape (s,) or (1, s)")
    w = window.reshape(1, -1)
    if w.shape[1] < 2:
        raise ValueError(f"a window needs at least 2 tokens, got {w.shape[1]}")
    return w


def logits(model, ids: torch.Tensor, recipe=None, prepared=None) -> torch.Tensor:
    """The logits (s, vocab), float64 on the CPU, of one forward of ``ids`` (1, s) under ``recipe``
    (``None``: full precision), without a cache."""
    dev = next(model.parameters()).device
    ctx = contextlib.nullcontext() if recipe is None else rcp.apply(model, recipe, prepared, progress=False)
    with torch.no_grad(), ctx:
        return model(input_ids=ids.to(dev), use_cache=False).logits[0].double().cpu()


def leak(model, window: torch.Tensor, j: int, recipe=None, prepared=None, *, replacement: int | None = None,
         base_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Largest absolute change of the logits at every position i < j (float64, shape (j,)) when
    token j of ``window`` is replaced by ``replacement`` (default: the next token id), under
    ``recipe`` (``None``: full precision). ``base_logits``: the unchanged window's logits under the
    same recipe, if already computed."""
    w = _check_window(window)
    s = w.shape[1]
    if isinstance(j, bool) or not isinstance(j, int) or not 1 <= j < s:
        raise ValueError(f"j must be a position in 1..{s - 1} (a token with earlier positions), got {j!r}")
    vocab = model.get_input_embeddings().weight.shape[0]
    new = (int(w[0, j]) + 1) % vocab if replacement is None else int(replacement)
    if new == int(w[0, j]):
        raise ValueError("the replacement token equals the original one: nothing would change")
    w2 = w.clone()
    w2[0, j] = new
    a = logits(model, w, recipe, prepared) if base_logits is None else base_logits
    b = logits(model, w2, recipe, prepared)
    return (a[:j] - b[:j]).abs().amax(-1)


def leak_signature(delta: torch.Tensor, j: int, block: int | None, tol: float) -> dict:
    """Summary of :func:`leak`'s ``delta`` (positions 0..j-1): how many moved beyond ``tol``, the
    earliest that moved, and (``block``, the Haar block length 2^L) how many moved before the block
    of j (none for a Haar DWT) and inside it."""
    moved = delta > tol
    first = int(moved.nonzero()[0]) if bool(moved.any()) else None
    out = {"j": j, "moved": int(moved.sum()), "positions": int(delta.numel()), "first_moved": first,
           "max_change": float(delta.max()) if delta.numel() else 0.0, "tol": tol}
    if block:
        start = j - j % block
        out.update(block=block, block_start=start, moved_before_block=int(moved[:start].sum()),
                   moved_in_block=int(moved[start:].sum()), in_block=j - start)
    return out


def positions_to_score(s: int, n: int, *, first: int = 1, seed: int = 0) -> list[int]:
    """``n`` distinct positions p in [first, s - 2] (each predicting token p + 1), drawn at random
    with ``seed``, sorted."""
    if n < 1 or first < 0 or s - 1 - first < n:
        raise ValueError(f"cannot draw {n} positions from {first}..{s - 2}")
    g = torch.Generator().manual_seed(seed)
    return sorted((torch.randperm(s - 1 - first, generator=g)[:n] + first).tolist())


def _nll_at(logits: torch.Tensor, target: int) -> float:
    return float(-torch.log_softmax(logits, -1)[target])


def onepass_nll(model, window: torch.Tensor, positions, recipe=None, prepared=None) -> torch.Tensor:
    """NLL of token p + 1 at every p of ``positions`` from one forward of the whole window."""
    w = _check_window(window)
    lg = logits(model, w, recipe, prepared)
    return torch.tensor([_nll_at(lg[p], int(w[0, p + 1])) for p in positions], dtype=torch.float64)


def causal_nll(model, window: torch.Tensor, positions, recipe=None, prepared=None, *, progress=None):
    """``(nll, seconds)``: NLL of token p + 1 from a forward of the prefix ``window[:p + 1]`` alone,
    for every p of ``positions`` (float64), and the wall time of those forwards. ``progress``: a
    tqdm-like bar advanced once per position."""
    w = _check_window(window)
    out = []
    t0 = time.perf_counter()
    for p in positions:
        if not 0 <= p < w.shape[1] - 1:
            raise ValueError(f"position {p} has no next token in a window of {w.shape[1]}")
        lg = logits(model, w[:, :p + 1], recipe, prepared)
        out.append(_nll_at(lg[p], int(w[0, p + 1])))
        if progress is not None:
            progress.update(1)
    return torch.tensor(out, dtype=torch.float64), time.perf_counter() - t0


def decode_nll(model, window: torch.Tensor, prompt: int, recipe=None, prepared=None) -> torch.Tensor:
    """Teacher-forced cached decoding: prefill ``window[:prompt]`` in one forward (with a KV cache),
    then feed tokens ``prompt .. s - 2`` one at a time; returns the NLL (float64) of tokens
    ``prompt .. s - 1``, each predicted by a one-token step (the first by the prefill's last
    position). Equals :func:`onepass_nll` at positions ``prompt - 1 .. s - 2`` wherever the
    computation is causal (full precision, per-token quantization)."""
    w = _check_window(window)
    s = w.shape[1]
    if not 1 <= prompt < s:
        raise ValueError(f"prompt must be in [1, {s - 1}] for a window of {s} tokens, got {prompt}")
    from transformers import DynamicCache

    w = w.to(next(model.parameters()).device)
    kw = kv.cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    ctx = contextlib.nullcontext() if recipe is None else rcp.apply(model, recipe, prepared, progress=False)
    out = []
    with torch.no_grad(), ctx:
        lg = model(input_ids=w[:, :prompt], use_cache=True, **{kw: cache}).logits[0, -1]
        for p in range(prompt, s):
            out.append(_nll_at(lg.double().cpu(), int(w[0, p])))
            if p < s - 1:
                lg = model(input_ids=w[:, p:p + 1], use_cache=True, **{kw: cache}).logits[0, -1]
    return torch.tensor(out, dtype=torch.float64)
