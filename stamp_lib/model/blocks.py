"""Block-by-block calibration of a decoder: one mechanism for every method that calibrates layer
by layer (FlatQuant's training, :mod:`stamp_lib.model.flatquant`; GPTQ on the inputs of the
quantized layers before, :mod:`stamp_lib.model.recipe` with ``WeightQuant(sequential=True)``).

Contract
--------
* :func:`decoder` -> ``(prefix, decoder, layers)``: the one decoder stack of a causal LM (a module
  with ``embed_tokens``, ``layers`` and ``norm``; Llama, Qwen2, Mistral, Gemma-3) and its layers.
* :func:`layer_inputs` -> ``(x, kws)``: the hidden states entering decoder layer 0 for every
  calibration window, ``x`` of shape (n, s, d) in the model's dtype and on its device, and the
  keyword arguments of every layer's call for one window (RoPE embeddings, mask, positions:
  Gemma-3's sliding and full layers get different ones), shared by all windows (no padding).
  Each window runs the model only up to layer 0 (a :class:`Stop` raised in its pre-hook).
* :func:`call_layer` runs one decoder layer on a batch of hidden states with those arguments and
  returns its hidden states (the first element of a tuple output).
* :func:`layer_outputs` -> (n, s, d): a layer's outputs for every window, in batches, written into
  one preallocated tensor: the next layer's inputs. Propagating block by block holds two (n, s, d)
  tensors (inputs and outputs), never the model's activations of every layer.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from . import hooks

__all__ = ["Stop", "decoder", "call_layer", "layer_inputs", "layer_outputs"]


class Stop(Exception):
    """Raised by a hook to end a forward early (the rest of the model is not needed)."""


def decoder(model: nn.Module) -> tuple[str, nn.Module, list]:
    """``(prefix, decoder, layers)``: the qualified name of the decoder stack (``"model"`` for
    ``LlamaForCausalLM``), the stack, and its decoder layers. ``ValueError`` when the model has not
    exactly one stack with ``embed_tokens``, ``layers`` and ``norm``."""
    from .quarot import _find_decoder

    prefix, dec = _find_decoder(model)
    return prefix, dec, list(dec.layers)


def call_layer(layer: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    """The hidden states that ``layer`` outputs for the batch ``x`` (b, s, d) with keyword arguments ``kw``."""
    out = layer(x, **kw)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def layer_inputs(model: nn.Module, dec: nn.Module, calib: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The hidden states entering layer 0 for every calibration window (n, s, d), and the keyword
    arguments of each layer's call for one window (RoPE embeddings, mask and positions: Gemma-3's
    sliding and full layers get different ones), shared by all batches. One full forward of the
    first window records the arguments; then every window runs up to layer 0 only."""
    x, kws, row = None, {}, 0

    def grab(module, args, kwargs):
        nonlocal x
        h = args[0] if args else kwargs["hidden_states"]
        if x is None:  # one tensor for all windows, filled row by row (no list + concatenation)
            x = h.new_empty((calib.shape[0], *h.shape[1:]))
        x[row] = h[0]
        raise Stop

    def keep(i):
        def hook(module, args, kwargs):
            kws[i] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache", "past_key_values")}
        return hook

    with contextlib.ExitStack() as stack:
        for i, layer in enumerate(dec.layers):
            stack.enter_context(hooks.module_hook(layer, keep(i)))
        model(calib[:1], use_cache=False)  # a cache would keep every batch's keys
    with hooks.module_hook(dec.layers[0], grab):
        for row in range(calib.shape[0]):
            try:
                model(calib[row:row + 1], use_cache=False)
            except Stop:
                pass
    return x, kws


@torch.no_grad()
def layer_outputs(layer: nn.Module, x: torch.Tensor, kw: dict, batch_size: int = 1) -> torch.Tensor:
    """``layer``'s outputs for every window of ``x`` (n, s, d), ``batch_size`` windows per call."""
    out = torch.empty_like(x)
    for i in range(0, x.shape[0], batch_size):
        out[i:i + batch_size] = call_layer(layer, x[i:i + batch_size], kw)
    return out
