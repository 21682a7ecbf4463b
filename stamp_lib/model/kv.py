r"""KV-cache fake quantization through transformers' attention interface.

The paper's LLM setting is W4A4KV4: keys (after RoPE) and values are quantized too. No
``nn.Linear`` input hook reaches the keys after RoPE, but every transformers model that follows
the attention-interface pattern computes

.. code-block:: python

    attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, eager_attention_forward)
    attn_output, attn_weights = attention_interface(self, query, key, value, attention_mask, **kw)

with ``key`` already rotated (and, for Gemma 3, normalised) and, when a cache is used, already
concatenated with the cached keys. :func:`kv_quantization` registers a uniquely named attention
function (``AttentionInterface.register``) that replaces ``key`` and ``value`` by
``quantize(layer_idx, kind, x, offset)`` and then calls the implementation the model was using
(``"sdpa"`` or ``"eager"``) with every other argument untouched. No modeling code is forked.

Optionally (``qk_rotation=``) the query and the key are first rotated head-wise along the head
dimension by one orthogonal map, ``q -> q H``, ``k -> k H`` (QuaRot's online Hadamard after RoPE,
:mod:`stamp_lib.model.quarot`): the scores :math:`q H (k H)^\top = q k^\top` are unchanged in exact
arithmetic, and the key quantizer sees the rotated keys. Without it the query is never touched.

What the quantizer sees (pitfalls worth knowing):

* ``x`` has shape ``(B, H_kv, S, D)``: key/value heads, *before* ``repeat_kv`` (grouped-query
  attention is expanded later, inside the delegated implementation).
* Without a cache, ``S`` is the whole input, also in sliding-window layers (Gemma 3 local layers
  get all S keys; the window lives in the attention mask). ``offset`` is 0.
* With a cache, ``S`` covers the cached tokens *and* the new ones. The cache stores the raw
  (unquantized) states, and every forward quantizes everything it is about to attend to again.
  That equals quantize-on-write only for a quantizer that treats each token on its own
  (deterministic per-token quantization); a quantizer that mixes tokens (a sequence transform)
  sees a different set of tokens at every decoding step. Decoding re-quantizes O(S) tokens per step.
* ``offset`` is the absolute index in the token stream (pad tokens included) of ``x[..., 0, :]``,
  taken from the cache's own ``Cache.get_mask_sizes(query_length, layer_idx)`` (the ``kv_offset``
  transformers uses to build the mask), read by a forward pre-hook on the attention module just
  before the cache is updated. It is 0 for a full-attention ``DynamicCache``; a sliding-window
  layer (``DynamicSlidingWindowLayer``) keeps only ``sliding_window - 1`` past tokens, so in
  decoding ``S = sliding_window`` and ``offset = seen - sliding_window + 1``. Static caches pass
  their whole preallocated buffer (zeros after the last written token, masked out later) with
  offset 0: the quantizer then sees those zero rows too.
* If the attention module receives no cache but the key length differs from the query length
  (cross-attention, shared KV), or the cache's advertised length disagrees with the keys that
  arrive, the offset cannot be stated honestly and a ``RuntimeError`` says so.

Which configs are switched: every config object held as ``.config`` by a module that has an
integer ``layer_idx`` (the decoder's self-attention layers, e.g. Gemma 3's text config inside a
multimodal model). Vision towers, whose attention modules carry no ``layer_idx`` and hold no KV
cache, are left alone. Each switched config's raw ``_attn_implementation_internal`` is saved and
written back on exit (also when the body raises), and the registered attention and mask names are
removed again. All of it is fake quantization in floating point.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from typing import Callable

import torch
from torch import nn
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .hooks import module_hook

__all__ = ["kv_quantization", "SUPPORTED_IMPLEMENTATIONS"]

#: Attention implementations the wrapper knows how to delegate to (plus the names registered by an
#: enclosing :func:`kv_quantization`, so contexts nest).
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")

_NAME_PREFIX = "stamp_kv_quant_"
_counter = itertools.count()
_LIVE: dict[str, str] = {}  # registered name -> implementation it delegates to


def cache_kwarg(model: nn.Module) -> str:
    """The name of ``model.forward``'s KV-cache argument: ``"cache"`` in transformers 5,
    ``"past_key_values"`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _resolve(module: nn.Module, implementation: str) -> Callable:
    """The attention function the model itself would call for ``implementation``.

    Looked up in the modeling file of ``type(module)``: its ``ALL_ATTENTION_FUNCTIONS`` (a model may
    hold a local override) and its ``eager_attention_forward`` (the eager default differs per
    model, e.g. Gemma 3's handles ``softcap``)."""
    modeling = sys.modules.get(type(module).__module__)
    functions = getattr(modeling, "ALL_ATTENTION_FUNCTIONS", ALL_ATTENTION_FUNCTIONS)
    if implementation == "eager":
        eager = getattr(modeling, "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(
                f"kv_quantization: the model uses attn_implementation='eager', but the modeling module "
                f"{type(module).__module__!r} of {type(module).__name__} defines no eager_attention_forward "
                "to delegate to; use attn_implementation='sdpa'."
            )
        return eager
    return functions[implementation]


class _Context:
    """State of one :func:`kv_quantization` context: its quantizer and the cache sizes read by
    the pre-hooks (keyed by module id, written just before each attention forward)."""

    def __init__(self, quantize: Callable | None, qk_rotation: Callable | None = None):
        self.quantize = quantize
        self.qk_rotation = qk_rotation
        self.sizes: dict[int, tuple[int, int, int] | None] = {}

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if cache is None or not isinstance(hidden, torch.Tensor) or not hasattr(cache, "get_mask_sizes"):
            self.sizes[id(module)] = None
            return
        q_len = hidden.shape[-2]
        kv_length, kv_offset = cache.get_mask_sizes(q_len, module.layer_idx)
        self.sizes[id(module)] = (q_len, int(kv_length), int(kv_offset))

    def offset(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor) -> int:
        q_len, kv_len = query.shape[-2], key.shape[-2]
        sizes = self.sizes.get(id(module))
        if sizes is None or sizes[0] != q_len:
            if kv_len != q_len:
                raise RuntimeError(
                    f"kv_quantization: {type(module).__name__} (layer {module.layer_idx}) attends {q_len} queries to "
                    f"{kv_len} keys without a cache this wrapper could read, so the absolute position of the keys "
                    "is unknown (cross-attention or shared KV are not supported)."
                )
            return 0
        _, expected_len, kv_offset = sizes
        if expected_len != kv_len:
            raise RuntimeError(
                f"kv_quantization: the cache announced {expected_len} keys for layer {module.layer_idx} "
                f"(Cache.get_mask_sizes) but attention received {kv_len}; cannot state their positions."
            )
        return kv_offset

    @staticmethod
    def _like(y, x: torch.Tensor, what: str) -> torch.Tensor:
        """``y`` if it is a tensor of ``x``'s shape and dtype; a ValueError naming ``what`` otherwise."""
        if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
            got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
            raise ValueError(f"kv_quantization: {what} must return a tensor of shape {tuple(x.shape)} and dtype "
                             f"{x.dtype}, got {got}.")
        return y

    def apply(self, layer_idx: int, kind: str, x: torch.Tensor, offset: int) -> torch.Tensor:
        return self._like(self.quantize(layer_idx, kind, x, offset), x,
                          f"quantize(layer_idx={layer_idx}, kind={kind!r}, ...)")

    def rotate(self, layer_idx: int, kind: str, x: torch.Tensor) -> torch.Tensor:
        return self._like(self.qk_rotation(x), x, f"qk_rotation of the {kind} (layer {layer_idx})")

    def wrapper(self, implementation: str) -> Callable:
        def kv_quantized_attention(module, query, key, value, attention_mask, *args, **kwargs):
            layer_idx = getattr(module, "layer_idx", None)
            if not isinstance(layer_idx, int):
                raise ValueError(
                    f"kv_quantization: attention module {type(module).__name__} has no integer layer_idx "
                    f"(got {layer_idx!r}); cannot tell the quantizer which layer it is."
                )
            if self.qk_rotation is not None:
                query = self.rotate(layer_idx, "query", query)
                key = self.rotate(layer_idx, "key", key)
            if self.quantize is not None:
                offset = self.offset(module, query, key)
                key = self.apply(layer_idx, "key", key, offset)
                value = self.apply(layer_idx, "value", value, offset)
            return _resolve(module, implementation)(module, query, key, value, attention_mask, *args, **kwargs)

        return kv_quantized_attention


@contextlib.contextmanager
def kv_quantization(model: nn.Module, quantize: Callable[[int, str, torch.Tensor, int], torch.Tensor] | None = None,
                    *, qk_rotation: Callable[[torch.Tensor], torch.Tensor] | None = None):
    """Fake-quantize keys (after RoPE) and values of every self-attention layer of ``model``
    (and/or rotate its queries and keys head-wise).

    Args:
        model: a transformers ``PreTrainedModel`` whose attention layers dispatch through
            ``ALL_ATTENTION_FUNCTIONS`` and carry an integer ``layer_idx``; its attention
            implementation must be ``"sdpa"`` or ``"eager"`` (or one set by an enclosing
            ``kv_quantization``, so contexts nest: the inner quantizer runs first).
        quantize: ``quantize(layer_idx, kind, x, offset) -> Tensor`` with ``kind`` in
            ``("key", "value")``, ``x`` of shape ``(B, H_kv, S, D)``; must return the same shape and
            dtype. ``offset`` is the absolute index (in the token stream, pad tokens included) of
            ``x[..., 0, :]``: 0 without a cache and for full-attention layers of a dynamic cache;
            ``seen - sliding_window + 1`` in sliding-window layers once their cache is full (see the
            module docstring, also for static caches). The query is never quantized. ``None``: no
            quantization (only ``qk_rotation``).
        qk_rotation: ``None`` or a map ``x -> x H`` over the last (head) dim of a ``(B, H, S, D)``
            query or key, with H orthogonal, applied to both (after RoPE, before ``quantize``) so
            that the attention scores are unchanged; must keep shape and dtype.

    Yields ``None``. On exit (normal or by exception) every switched config gets its original
    ``_attn_implementation`` back, the pre-hooks are removed and the registered names are deleted
    from ``AttentionInterface`` and ``AttentionMaskInterface``.

    Raises:
        TypeError: ``model`` is not a transformers ``PreTrainedModel``.
        ValueError: neither ``quantize`` nor ``qk_rotation`` given; no submodule has an integer
            ``layer_idx``; or (during forward) an attention module without one; or ``quantize`` /
            ``qk_rotation`` returned a wrong shape/dtype.
        NotImplementedError: an attention implementation the wrapper cannot delegate to
            (flash attention, flex attention, paged, None, custom names).
    """
    if quantize is None and qk_rotation is None:
        raise ValueError("kv_quantization: pass quantize= (the K/V quantizer), qk_rotation= (a head-wise "
                         "query/key rotation) or both; with neither there is nothing to do.")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"kv_quantization needs a transformers PreTrainedModel (attention dispatched through "
            f"AttentionInterface), got {type(model).__name__}."
        )
    layered = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    if not layered:
        raise ValueError(
            f"kv_quantization: no submodule of {type(model).__name__} has an integer layer_idx, so no attention "
            "layer can be identified."
        )
    configs = {}
    for m in layered:
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            configs[id(cfg)] = cfg
    if not configs:
        raise ValueError(
            f"kv_quantization: the modules of {type(model).__name__} with a layer_idx hold no transformers config."
        )
    originals = {key: cfg._attn_implementation_internal for key, cfg in configs.items()}
    for key, impl in originals.items():
        if impl not in SUPPORTED_IMPLEMENTATIONS and impl not in _LIVE:
            raise NotImplementedError(
                f"kv_quantization cannot delegate to attn_implementation={impl!r} (config "
                f"{type(configs[key]).__name__}); supported: {', '.join(map(repr, SUPPORTED_IMPLEMENTATIONS))}. "
                "Load the model with attn_implementation='sdpa' (or 'eager'), or call "
                "model.set_attn_implementation('sdpa') first."
            )

    ctx = _Context(quantize, qk_rotation)
    context_id = next(_counter)
    names = {impl: f"{_NAME_PREFIX}{context_id}_{i}" for i, impl in enumerate(sorted(set(originals.values())))}
    stack = contextlib.ExitStack()
    try:
        for impl, name in names.items():
            # Register the mask first: the model builds masks by looking its implementation up there.
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
            AttentionInterface.register(name, ctx.wrapper(impl))
            _LIVE[name] = impl
        for m in layered:
            stack.enter_context(module_hook(m, ctx.pre_hook))
        for key, cfg in configs.items():
            cfg._attn_implementation_internal = names[originals[key]]
        yield
    finally:
        for key, cfg in configs.items():
            cfg._attn_implementation_internal = originals[key]
        stack.close()
        for name in names.values():
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)
            _LIVE.pop(name, None)
