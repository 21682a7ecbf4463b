r"""FlatQuant as a model-level method for decoders (Llama, Qwen2, Gemma-3): which learnable
transform goes where, the block-by-block calibration, and the quantized model.

Per decoder layer (as ``FlatQuantLlamaAttention`` / ``FlatQuantLlamaMLP`` in the published code;
building blocks in :mod:`stamp_lib.methods.flatquant`). Every transform sits on a linear layer's
input (the per-channel scales are applied online, not fused into the norms), so Gemma-3's sandwich
norms need nothing special (the published code covers Llama and Qwen; Gemma-3 is this study's):

==================  ==========================================================================
``ln``              :math:`(x \odot s) (P_1 \otimes P_2)` on the input of q/k/v (width d)
``up_gate``         the same on the input of gate/up
``down``            the same on the input of down_proj (width d_ff)
``v``               :math:`P_v` (head dim) on every value head, fused into v_proj's rows (the
                    V cache is quantized in that basis)
``o``               :math:`P_o` (number of heads) mixing the heads of o_proj's input; o_proj's
                    weight absorbs :math:`(P_o \otimes P_v)^{-\top}`
``k``               :math:`P_k` (head dim) on keys after RoPE, :math:`P_k^{-\top}` on queries
==================  ==========================================================================

plus learnable clip factors for every weight row (LWC) and every activation quantizer (LAC: the
inputs of the seven linears and the K and V caches). Keys are handled as
:math:`k \mapsto Q(k P_k) P_k^{-1}`, which gives the same scores as rotating queries and keys
(:math:`q (Q(kP_k) P_k^{-1})^\top = (q P_k^{-\top}) Q(k P_k)^\top`) through the one K/V hook of
:func:`stamp_lib.model.kv.kv_quantization`.

Calibration (:func:`calibrate`): the inputs of layer 0 are captured for the calibration windows
(block by block, :mod:`stamp_lib.model.blocks`, the mechanism sequential GPTQ uses too);
for each layer the full-precision outputs are computed (and the activation maxima that start the
per-channel scales, :func:`stamp_lib.methods.flatquant.smooth_init`), then the quantized layer
(every weight folded, clipped and quantized; every linear input transformed and quantized; keys
and values quantized) is trained to match them (:func:`stamp_lib.methods.flatquant.fit`); the next
layer's inputs are the full-precision outputs, as in the published code. Weights are quantized by
RTN inside the loop (FlatQuant's ``--gptq`` is a separate pass after calibration: not here).

:func:`flatquant` applies a calibrated result to the model for the duration of a block: the final
weights (folded, clipped and, with ``quantize=True``, quantized) swapped in and restored exactly on
exit, and the online transforms and activation/KV quantizers as hooks. With ``quantize=False`` the
model computes the original function up to rounding (tested in float64). Its ``act`` / ``kv_act``
settings put STaMP on top: the sequence transform and per-row bits around FlatQuant's own
quantizer (:func:`stamp_lib.core.quant.stamp_fake_quant` with ``quantizer=``), nothing re-trained.
``Recipe(..., network="flatquant", network_config=FlatQuantConfig(...))`` does both steps through
:func:`stamp_lib.model.recipe.prepare` / :func:`~stamp_lib.model.recipe.apply` (the LLM table's
``flatquant`` row and ``python -m stamp_lib llm --method flatquant``).

All of it is fake quantization in floating point (simulation, no integer kernels).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ..methods import flatquant as fq
from . import blocks, hooks, kv
from .quarot import QuaRotPlan, _find_decoder, rotated

__all__ = ["FlatQuantConfig", "LayerFlat", "FlatQuantResult", "calibrate", "flatquant", "LABEL", "PUBLISHED_WINDOWS"]

LABEL = "FlatQuant"
#: calibration windows of the published W4A4KV4 scripts (2048 tokens of WikiText-2 each)
PUBLISHED_WINDOWS = 128
SUPPORTED = ("decoders whose layers have self_attn.{q,k,v,o}_proj and mlp.{gate,up,down}_proj linears: Llama, "
             "Qwen2, Mistral, Gemma-3 (every transform sits on a linear's input, so the norms, pre or sandwich, "
             "are not touched)",)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FlatQuantConfig:
    """FlatQuant's knobs; the defaults are the published W4A4KV4 scripts' (``--lwc --lac --cali_trans
    --add_diag``, 15 epochs, lr 5e-3, batches of 4, alpha 0.3, symmetric W and A, asymmetric K/V).
    ``kv_bits=None`` leaves the K/V cache in full precision."""

    w_bits: int = 4
    a_bits: int = 4
    kv_bits: int | None = 4
    epochs: int = 15
    lr: float = 5e-3
    batch_size: int = 4
    alpha: float = 0.3
    lwc: bool = True
    lac: bool = True
    seed: int = 0

    def __post_init__(self):
        for k in ("w_bits", "a_bits") + (("kv_bits",) if self.kv_bits is not None else ()):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 16:
                raise ValueError(f"FlatQuantConfig: {k} must be an int in [2, 16], got {v!r}")
        for k in ("epochs", "batch_size", "seed"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "batch_size" else 0):
                raise ValueError(f"FlatQuantConfig: {k} must be an int >= {1 if k == 'batch_size' else 0}, got {v!r}")
        if not (self.lr > 0 and 0 <= self.alpha <= 1):
            raise ValueError(f"FlatQuantConfig: lr must be > 0 and alpha in [0, 1], got {self.lr!r}, {self.alpha!r}")

    def knobs(self) -> dict:
        return {"method": "flatquant", **asdict(self)}


class LayerFlat(nn.Module):
    """The learnable transforms and clip factors of one decoder layer (see the module table)."""

    def __init__(self, layer: nn.Module, dims: dict, cfg: FlatQuantConfig, seed: int, dtype):
        super().__init__()
        d, dff, hd, nq = dims["d"], dims["dff"], dims["head_dim"], dims["num_heads"]
        kw = dict(dtype=dtype)
        self.ln = fq.KronAffine(fq.decompose_dim(d), diag=True, seed=seed, name="ln", **kw)
        self.up_gate = fq.KronAffine(fq.decompose_dim(d), diag=True, seed=seed + 1, name="up_gate", **kw)
        self.down = fq.KronAffine(fq.decompose_dim(dff), diag=True, seed=seed + 2, name="down", **kw)
        self.o = fq.KronAffine((nq,), seed=seed + 3, name="o", **kw)
        self.v = fq.KronAffine((hd,), seed=seed + 4, name="v", **kw)
        self.k = fq.KronAffine((hd,), seed=seed + 5, name="k", **kw)
        self.wclip = nn.ModuleDict()
        self.aclip = nn.ModuleDict()
        for sub, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            for n in names:
                lin = getattr(getattr(layer, sub), n)
                if cfg.lwc:
                    self.wclip[n] = fq.ClipFactors((lin.out_features, 1), dtype)
                if cfg.lac:
                    self.aclip[n] = fq.ClipFactors((1,), dtype)
        if cfg.lac and cfg.kv_bits is not None:
            self.aclip["key"] = fq.ClipFactors((1,), dtype)
            self.aclip["value"] = fq.ClipFactors((1,), dtype)

    def transform_params(self):
        return [p for m in (self.ln, self.up_gate, self.down, self.o, self.v, self.k) for p in m.parameters()]

    def clip_params(self):
        return list(self.wclip.parameters()) + list(self.aclip.parameters())


@dataclass
class FlatQuantResult:
    """What :func:`calibrate` returns: the config, one :class:`LayerFlat` per decoder layer, one
    :class:`~stamp_lib.methods.flatquant.FitLog` per layer, the model's dims and the wall time."""

    config: FlatQuantConfig
    layers: list
    logs: list
    dims: dict
    n_calib: int
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    def knobs(self) -> dict:
        return {**self.config.knobs(), "calibration_windows": self.n_calib,
                "departures": ["weights by RTN inside and after calibration (no GPTQ pass)",
                               "float32 on CPU (the published code trains under fp16/bf16 autocast on a GPU)"]}


# ----------------------------------------------------------------------------- structure
def _structure(model: nn.Module):
    prefix, dec = _find_decoder(model)
    layers = list(dec.layers)
    for i, layer in enumerate(layers):
        for sub, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            if not all(isinstance(getattr(getattr(layer, sub, None), n, None), nn.Linear) for n in names):
                raise ValueError(f"flatquant: {type(model).__name__} is not supported: layer {i} lacks the linears "
                                 f"{sub}.{{{', '.join(names)}}}. Supported: " + "; ".join(SUPPORTED))
    if not layers:
        raise ValueError(f"flatquant: {type(model).__name__} has no decoder layers")
    a0 = layers[0].self_attn
    hd = getattr(a0, "head_dim", None) or a0.config.hidden_size // a0.config.num_attention_heads
    dims = {"d": dec.embed_tokens.weight.shape[1], "dff": layers[0].mlp.down_proj.in_features, "head_dim": hd,
            "num_heads": a0.q_proj.out_features // hd, "num_kv_heads": a0.k_proj.out_features // hd}
    return prefix, dec, layers, dims


def _layer_weights(layer: nn.Module, F: LayerFlat, dims: dict, cfg: FlatQuantConfig, quantize: bool,
                   dtype=None) -> dict:
    """Every linear's final weight (and v_proj's bias), names relative to the layer: folded with the
    input transforms; with ``quantize`` clipped (LWC); v_proj's rows transformed by P_v; with
    ``quantize`` quantized over each final row's range. The order is the published one (the clip
    comes before v_proj's output transform)."""
    hd, nq, nkv = dims["head_dim"], dims["num_heads"], dims["num_kv_heads"]
    a, mlp = layer.self_attn, layer.mlp

    def w(lin):
        W = lin.weight
        return W if dtype is None else W.to(dtype)

    out = {f"self_attn.{n}.weight": F.ln.fold_weight(w(getattr(a, n))) for n in ("q_proj", "k_proj", "v_proj")}
    Wo = w(a.o_proj)
    Oit, Pvit = F.o.mats("inverse_t")[0].to(Wo.dtype), F.v.mats("inverse_t")[0].to(Wo.dtype)
    out["self_attn.o_proj.weight"] = torch.einsum("ohj,hk,jc->okc", Wo.view(Wo.shape[0], nq, hd), Oit,
                                                  Pvit).reshape(Wo.shape[0], nq * hd)
    for n in ("gate_proj", "up_proj"):
        out[f"mlp.{n}.weight"] = F.up_gate.fold_weight(w(getattr(mlp, n)))
    out["mlp.down_proj.weight"] = F.down.fold_weight(w(mlp.down_proj))
    if quantize:
        out = {k: fq.clip_weight(W, F.wclip[k.split(".")[1]]) if k.split(".")[1] in F.wclip else W
               for k, W in out.items()}
    # every value head v_h -> v_h P_v: rows P_v^T W_h, bias b_h P_v
    W = out["self_attn.v_proj.weight"]
    Pv = F.v.mats("forward")[0].to(W.dtype)
    out["self_attn.v_proj.weight"] = torch.einsum("ji,hjc->hic", Pv, W.view(nkv, hd, -1)).reshape(nkv * hd, -1)
    if a.v_proj.bias is not None:
        out["self_attn.v_proj.bias"] = (a.v_proj.bias.to(W.dtype).view(nkv, hd) @ Pv).reshape(-1)
    if quantize:
        out = {k: fq.quant_weight(W, cfg.w_bits) if k.endswith(".weight") else W for k, W in out.items()}
    return out


def _act_quantizer(F: LayerFlat, cfg: FlatQuantConfig, state=None):
    """``q(name, y, symmetric) -> y_hat``: FlatQuant's quantizer of a transformed linear input or
    key/value (``name`` a linear's short name, ``"key"`` or ``"value"``; its learned clip, LAC).
    ``state`` (an :class:`~stamp_lib.model.recipe.Applied` of a recipe with an ``act`` rule and a
    ``kv`` setting): the same quantizer, but through the STaMP operator with the state's bit
    specification and sequence transform per row (:func:`stamp_lib.core.quant.stamp_fake_quant`
    with ``quantizer=``), the bits counted per layer; ``None``: uniform ``a_bits`` / ``kv_bits``."""

    def q(name, y, symmetric, tag, offset=None):
        clip = F.aclip[name] if name in F.aclip else None
        if state is None:
            return fq.quant_act(y, cfg.a_bits if symmetric else cfg.kv_bits, clip, symmetric=symmetric)
        spec = state.recipe.rules[0].act if symmetric else state.recipe.kv
        out, tok, bits = state.quantize(spec, y, state.offset if offset is None else offset,
                                        quantizer=lambda LX, b: fq.quant_act(LX, b, clip, symmetric=symmetric))
        state.count(tag, tok, bits)
        return out

    return q


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """FlatQuant's arithmetic dtype for a model of ``dtype``: float32 for bfloat16 / float16 (no
    half-precision linear solves; fake quantization in float32), the model's own otherwise."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _up(x: torch.Tensor) -> torch.Tensor:
    """``x`` in :func:`_work_dtype` (a half-precision activation in float32; others unchanged)."""
    return x.to(_work_dtype(x.dtype)) if x.is_floating_point() else x


def _online(F: LayerFlat, dims: dict, cfg: FlatQuantConfig, quantize: bool, layer_idx: int = 0, state=None):
    """The input map of each linear of a layer: its transform, then (``quantize``) its quantizer."""
    hd, nq = dims["head_dim"], dims["num_heads"]
    q = _act_quantizer(F, cfg, state)

    def heads(x):  # x (..., nq * hd): mix the heads by P_o
        y = F.o(x.unflatten(-1, (nq, hd)).transpose(-1, -2))
        return y.transpose(-1, -2).flatten(-2)

    maps = {"q_proj": F.ln, "k_proj": F.ln, "v_proj": F.ln, "o_proj": heads,
            "gate_proj": F.up_gate, "up_proj": F.up_gate, "down_proj": F.down}

    def fn(short, x):  # a bfloat16 / float16 model's inputs in float32 and back
        y = maps[short](_up(x))
        return (q(short, y, True, f"{layer_idx}.{short}") if quantize else y).to(x.dtype)

    return fn


def _kv_fn(flats: dict, cfg: FlatQuantConfig, quantize: bool, state=None):
    """The K/V hook: keys k -> Q(k P_k) P_k^{-1}, values Q(v) (already in the P_v basis)."""
    quantize = quantize and cfg.kv_bits is not None
    qs = {i: _act_quantizer(F, cfg, state) for i, F in flats.items()}

    def fn(layer_idx, kind, x, offset):  # in float32, as the linears' inputs
        if kind == "key":
            F = flats[layer_idx]
            y = F.k(_up(x))
            y = F.k.inverse(qs[layer_idx]("key", y, False, f"kv.{layer_idx}.key", offset) if quantize else y)
            return y.to(x.dtype)
        if not quantize:
            return x
        return qs[layer_idx]("value", _up(x), False, f"kv.{layer_idx}.value", offset).to(x.dtype)

    return fn


@contextlib.contextmanager
def _hooked(model: nn.Module, layers: dict, flats: dict, dims: dict, cfg: FlatQuantConfig, quantize: bool,
            state=None):
    """Input hooks on the linears of ``layers`` ({layer_idx: layer}) and the K/V hook on the model
    (with ``state``: its bit specifications and sequence transforms, see :func:`_act_quantizer`)."""
    mods, fns = {}, {}
    for i, layer in layers.items():
        fn = _online(flats[i], dims, cfg, quantize, i, state)
        for sub, names in (("self_attn", _ATTN), ("mlp", _MLP)):
            for n in names:
                mods[f"{i}.{n}"] = getattr(getattr(layer, sub), n)
                fns[f"{i}.{n}"] = (fn, n)
    with hooks.input_hooks(mods, lambda name, m, x: fns[name][0](fns[name][1], x)), \
            kv.kv_quantization(model, _kv_fn(flats, cfg, quantize, state)):
        yield


# ----------------------------------------------------------------------------- calibration
def _absmax_inputs(layer, x, kw, batch_size):
    """Per-channel max |input| of q_proj (= k/v), gate_proj (= up) and down_proj over the windows,
    and the layer's full-precision outputs."""
    seen = {}

    def keep(name, m, t):
        v = t.detach().abs().flatten(0, -2).amax(0)
        seen[name] = v if name not in seen else torch.maximum(seen[name], v)

    mods = {"ln": layer.self_attn.q_proj, "up_gate": layer.mlp.gate_proj, "down": layer.mlp.down_proj}
    with hooks.input_hooks(mods, keep):
        outs = torch.cat([blocks.call_layer(layer, x[i:i + batch_size], kw) for i in range(0, x.shape[0], batch_size)])
    return seen, outs


def _f32(v):
    """A half-precision tensor (RoPE tables, masks of a bfloat16 model) as float32, also inside a
    tuple; anything else as is."""
    if isinstance(v, torch.Tensor):
        return _up(v)
    if isinstance(v, tuple):
        return tuple(_f32(t) for t in v)
    return v


def calibrate(model: nn.Module, calib: torch.Tensor, config: FlatQuantConfig | None = None, *,
              progress=None) -> FlatQuantResult:
    """Calibrate FlatQuant on ``calib`` (token ids, (n, s), n a multiple of the batch size), layer
    by layer (module docstring). The model is not modified. ``progress``: a tqdm-like bar (its
    ``update`` is called after each step; ``total`` is set here)."""
    cfg = config or FlatQuantConfig()
    if not isinstance(calib, torch.Tensor) or calib.dim() != 2 or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"flatquant.calibrate: calib must be token ids of shape (n, s), got "
                         f"{getattr(calib, 'shape', type(calib))}")
    if calib.shape[0] % cfg.batch_size:
        raise ValueError(f"flatquant.calibrate: {calib.shape[0]} calibration windows are not a multiple of the batch "
                         f"size {cfg.batch_size}; pass a multiple, or FlatQuantConfig(batch_size=...)")
    prefix, dec, layers, dims = _structure(model)
    dtype = dec.embed_tokens.weight.dtype  # a half-precision layer is calibrated in float32, cast back (exact)
    work = _work_dtype(dtype)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    flats, logs = {}, []
    try:
        x, kws = blocks.layer_inputs(model, dec, calib)
        x = x.to(work)
        kws = {i: {k: _f32(v) for k, v in kw.items()} for i, kw in kws.items()}
        if progress is not None:
            progress.total = len(layers) * cfg.epochs * (x.shape[0] // cfg.batch_size)
        for i, layer in enumerate(layers):
            layer.to(work)
            with torch.no_grad():
                amax, target = _absmax_inputs(layer, x, kws[i], cfg.batch_size)
            F = LayerFlat(layer, dims, cfg, seed=cfg.seed * 1000 + 10 * i, dtype=work)
            with torch.no_grad():
                a = layer.self_attn
                for name, ws in (("ln", [a.q_proj, a.k_proj, a.v_proj]),
                                 ("up_gate", [layer.mlp.gate_proj, layer.mlp.up_proj]),
                                 ("down", [layer.mlp.down_proj])):
                    wmax = torch.cat([m.weight for m in ws]).abs().amax(0)
                    getattr(F, name).diag.copy_(fq.smooth_init(wmax, amax[name].clamp(min=1e-5), cfg.alpha))
            flats[i] = F

            def block(xb, layer=layer, F=F, kw=kws[i]):
                out = torch.func.functional_call(layer, _layer_weights(layer, F, dims, cfg, quantize=True), (xb,), kw)
                return out[0] if isinstance(out, tuple) else out

            with _hooked(model, {i: layer}, flats, dims, cfg, quantize=True):
                logs.append(fq.fit(block, x, target, F.transform_params(), F.clip_params(), epochs=cfg.epochs,
                                   batch_size=cfg.batch_size, lr=cfg.lr,
                                   progress=None if progress is None else progress.update))
            for p in F.parameters():
                p.requires_grad_(False)
            layer.to(dtype)
            x = target
    finally:
        for layer in layers:
            layer.to(dtype)
        for n, p in model.named_parameters():
            p.requires_grad_(grads[n])
        model.train(was_training)
    return FlatQuantResult(cfg, [flats[i] for i in range(len(layers))], logs, dims, int(calib.shape[0]),
                           seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- applying it
@contextlib.contextmanager
def flatquant(model: nn.Module, result: FlatQuantResult, quantize: bool = True, *, act=None, kv_act=None):
    r"""Apply a calibrated FlatQuant to ``model`` for the duration of the block: final weights
    swapped in (restored exactly on exit, also on an exception), online transforms and (with
    ``quantize``) FlatQuant's activation and K/V quantizers as hooks. Yields an
    :class:`~stamp_lib.model.recipe.Applied` (``average_bits("act")`` / ``("kv")``: bits spent).

    ``act`` / ``kv_act``: :class:`~stamp_lib.model.recipe.ActQuant` settings of the linear inputs /
    keys and values: their bit specification per row (e.g. ``"64x8+4"``) and sequence transform
    (STaMP: :math:`L^{-1} Q(L\,x R)` with FlatQuant's own quantizer Q, its learned clipping
    included; the settings' ``symmetric``, ``clip_ratio`` and ``block_size`` are not used: FlatQuant's
    quantizer is per token, symmetric for activations and asymmetric for K/V). ``None``: as
    published, every token at ``a_bits`` / ``kv_bits``. Rows get their bits by absolute position,
    as in :func:`stamp_lib.model.recipe.apply`."""
    from . import recipe as rcp

    if not isinstance(result, FlatQuantResult):
        raise TypeError(f"result must be a FlatQuantResult (from flatquant.calibrate), got {type(result).__name__}")
    prefix, dec, layers, dims = _structure(model)
    if len(layers) != len(result.layers) or dims != result.dims:
        raise ValueError(f"flatquant: the result was calibrated for {len(result.layers)} layers with dims "
                         f"{result.dims}, this model has {len(layers)} layers with {dims}; calibrate it again")
    cfg = result.config
    act = act if act is not None else rcp.ActQuant(bits=cfg.a_bits)
    kv_act = kv_act if kv_act is not None or cfg.kv_bits is None else rcp.ActQuant(bits=cfg.kv_bits)
    for what, a in (("act", act), ("kv_act", kv_act)):
        if a is not None and not isinstance(a, rcp.ActQuant):
            raise TypeError(f"flatquant: {what} must be an ActQuant or None, got {type(a).__name__}")
    state = rcp.Applied(rcp.Recipe((rcp.Rule("*", act=act),), kv=kv_act, name=LABEL))
    plan = QuaRotPlan(arch="llama", seed=cfg.seed, fused=True, label=LABEL, description="FlatQuant's final weights")
    base = f"{prefix}.layers" if prefix else "layers"
    with torch.no_grad():
        for i, layer in enumerate(layers):
            ref = layer.self_attn.q_proj.weight
            for k, t in _layer_weights(layer, result.layers[i], dims, cfg, quantize,
                                       dtype=torch.float64).items():
                plan.params[f"{base}.{i}.{k}"] = t.to(dtype=ref.dtype, device=ref.device)
    flats = dict(enumerate(result.layers))

    def on_model(module, args, kwargs):
        state.offset = rcp.offset_of(args, kwargs, need=state.hp_max > 0)

    with rotated(model, plan, online=False), hooks.module_hook(model, on_model), \
            _hooked(model, dict(enumerate(layers)), flats, dims, cfg, quantize, state):
        yield state
