r"""QuaRot (Ashkboos et al., 2024) as a model-level preparation step: rotate a decoder so that its
activations lose their outlier channels, with the full-precision function unchanged.

:func:`quarot_plan` computes, from the model's own modules (never from its name), every replacement
parameter (in float64, stored in the model's dtype), the *online* feature transforms (applied to a
linear layer's input at run time, their inverse folded into that layer's weight) and the head-wise
rotation of queries and keys; :func:`rotated` swaps the parameters in for the duration of a block
and puts the original ``Parameter`` objects back on exit (also on an exception), so the model is
restored bit for bit and tied weights are tied again. :mod:`stamp_lib.model.recipe` uses a plan as
``Recipe(..., network="quarot", network_seed=seed)``: calibration and weight quantization run on the
rotated network, the online transforms become the layers' feature transforms.

Llama-style decoders (LlamaForCausalLM and the models built like it: Qwen2 with its q/k/v biases,
Mistral; pre-norm RMSNorm :math:`y = w \odot n(x)`), the fused variant, as published:

1. RMSNorm scales fused into the linears that read them (``input_layernorm`` -> q/k/v,
   ``post_attention_layernorm`` -> gate/up, the final ``norm`` -> ``lm_head``), the norm weights
   set to ones. Exact: :math:`(w \odot n)\,W^\top = n\,(W \operatorname{diag} w)^\top`.
2. The residual stream rotated by :math:`Q = D H_d / \sqrt d` (random signs D from ``seed``):
   embeddings :math:`E \to E Q`; readers (q/k/v, gate/up, lm_head) :math:`W \to W Q`; writers
   (o_proj, down_proj) :math:`W \to Q^\top W`, :math:`b \to b Q`. Exact: an RMSNorm with unit
   weight commutes with an orthogonal Q (:math:`\|x Q\| = \|x\|`). Tied embeddings are untied for
   the duration (the embedding gets :math:`E Q`, ``lm_head`` gets :math:`W Q`).
3. Online Hadamard :math:`H_{d_{ff}}/\sqrt{d_{ff}}` (no signs) on down_proj's input.
4. Head-wise Hadamard on values: v_proj's output rotated per KV head by
   :math:`H_{h}/\sqrt h` (h the head dim; rows and bias of v_proj), undone in o_proj's columns
   (one block per query head; with grouped-query attention every query head reads its KV head's
   values, and every head has the same H, so the fold is :math:`I \otimes H`). QuaRot's online
   Hadamard across heads on o_proj's input (:math:`H_{n_h} \otimes I_h`) is used where a Hadamard
   of order :math:`n_h` exists; otherwise (SmolLM2: 9 heads) an online Hadamard of the full width
   :math:`H_{n_h h}` replaces it (the departure is stated in the plan's description). Together
   with step 4 either one rotates o_proj's input over all its features.
5. Head-wise Hadamard on queries and keys after RoPE (and after Gemma's q/k norms), before the
   K/V quantizer: :math:`q \to q H`, :math:`k \to k H`, :math:`q k^\top` unchanged
   (:func:`stamp_lib.model.kv.kv_quantization` with ``qk_rotation``).

Gemma-3 (sandwich norms: ``post_attention_layernorm`` and ``post_feedforward_layernorm`` sit between
o_proj / down_proj and the residual, :math:`y = (1 + w) \odot n(x)`): the residual rotation cannot be
fused (a post-norm with a non-unit weight does not commute with Q, and its output is added to the
residual). The variant here keeps every norm as it is (nothing needs fusing without a residual
rotation), rotates every linear layer's input online by :math:`D H/\sqrt n` (per-linear, signs from
``seed``, lm_head included) and keeps steps 4 and 5. Its label says so. (Fusing the pre-norms
anyway, as a first version did, is exact in full precision but ruins 4-bit weights: Gemma-3's
:math:`1 + w` scales reach about 100 with others near 0, and a weight row scaled that unevenly
loses its small columns to the rounding step of its large ones.)

What is exact and what is not: every step is an identity of the full-precision network in exact
arithmetic; in floating point the rotated network differs by rounding (the norms of transformers
compute in float32 even for a float64 model, so a float64 comparison agrees to about 1e-6, not
1e-15). Departures from the published code: the Hadamard constructions are this project's
(:mod:`stamp_lib.core.hadamard`: Sylvester times a Paley factor) rather than QuaRot's tables; a
non-power-of-two head count gets the full-width online Hadamard on o_proj's input (above); the
online rotations are simulated in floating point (no fused kernels).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..core.hadamard import hadamard_plan
from ..methods import features
from . import hooks

__all__ = ["QuaRotPlan", "HeadsRotation", "quarot_plan", "rotated", "SUPPORTED", "GEMMA3_LABEL"]

SUPPORTED = ("Llama-style pre-norm decoders (LlamaForCausalLM, Qwen2ForCausalLM, Mistral, ...: layers with "
             "input_layernorm / post_attention_layernorm RMSNorms y = w * n(x), self_attn.{q,k,v,o}_proj, "
             "mlp.{gate,up,down}_proj)",
             "Gemma-3 (Gemma3ForCausalLM / Gemma3TextModel: the same projections with input_layernorm, "
             "post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm, y = (1 + w) * n(x))")
GEMMA3_LABEL = "QuaRot (online rotations: Gemma-3's post-norms forbid fusing the residual rotation)"
LLAMA_LABEL = "QuaRot"

_LLAMA_CHILDREN = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}
_GEMMA_CHILDREN = _LLAMA_CHILDREN | {"pre_feedforward_layernorm", "post_feedforward_layernorm"}
_ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
_TAG = "_stamp_quarot"  # set on every Parameter this module swaps in


class HeadsRotation(features.FeatureTransform):
    r"""The rotation :math:`R \otimes I_b` of a feature vector made of ``a`` blocks of ``b``
    features: block i of the output is :math:`\sum_j R_{ji}\, x_j` (QuaRot's online Hadamard across
    attention heads, with R a Hadamard rotation of order a = number of heads, b = head dim).
    Orthogonal: ``inverse`` applies :math:`R^\top`, ``fold_weight(W) = W (R \otimes I)``."""

    def __init__(self, rot: features.HadamardRotation, block: int, name: str | None = None):
        self.rot, self.block = rot, int(block)
        self.d = rot.d * self.block
        self.name = name or f"heads{rot.d}x{self.block}-{rot.name}"

    def _mix(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        y = x.unflatten(-1, (self.rot.d, self.block)).transpose(-1, -2)  # (..., b, a)
        y = self.rot.inverse(y) if transpose else self.rot.forward(y)
        return y.transpose(-1, -2).flatten(-2)

    def forward(self, x):
        self._check(x)
        return self._mix(x, False)

    def inverse(self, y):
        self._check(y, "y")
        return self._mix(y, True)

    def fold_weight(self, W):
        self._check(W, "W")
        return self._mix(W, False)

    def fold_reader(self, B):
        self._check(B, "B")
        return self._mix(B, True)

    def matrix(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """The dense d x d matrix :math:`R \\otimes I_b`."""
        return torch.kron(self.rot.matrix(dtype, device), torch.eye(self.block, dtype=dtype, device=device))

    def __repr__(self) -> str:
        return f"HeadsRotation({self.rot!r} x I_{self.block})"


@dataclass
class QuaRotPlan:
    """What :func:`quarot_plan` computed for one model (see the module docstring).

    Attributes:
        arch: ``"llama"`` (fused) or ``"gemma3"`` (online).
        seed: the seed of the random signs (residual rotation, or Gemma's per-linear rotations).
        fused: whether the residual rotation is fused into the weights (Llama-style) or online.
        label: ``"QuaRot"`` or :data:`GEMMA3_LABEL`; ``description`` starts with it and says which
            rotation goes where (also the choice for o_proj's input).
        params: qualified parameter name (e.g. ``"model.layers.0.self_attn.q_proj.weight"``; both names
            of a tied weight appear) -> replacement tensor, in the model's dtype and device.
        online: linear layer name -> online feature transform of its input (``forward``: x R;
            ``fold_weight``: the weight's inverse fold, applied on top of ``params``).
        qk: the head-wise rotation of queries and keys after RoPE (``forward`` over the head dim).
        residual: the residual rotation Q (fused variant), else ``None``.
        head_dim, num_heads, num_kv_heads: of the attention layers.
    """

    arch: str
    seed: int
    fused: bool
    label: str
    description: str
    params: dict = field(default_factory=dict)
    online: dict = field(default_factory=dict)
    qk: features.HadamardRotation | None = None
    residual: features.HadamardRotation | None = None
    head_dim: int = 0
    num_heads: int = 0
    num_kv_heads: int = 0

    def key(self) -> tuple:
        """What identifies the plan's rotations (for caches): architecture and seed."""
        return ("quarot", self.arch, self.seed)


# ----------------------------------------------------------------------------- detection
def _norm_kind(norm: nn.Module, d: int) -> str | None:
    """``"scale"`` (y = w * n(x)), ``"offset"`` (y = (1 + w) * n(x)) or ``None``, by probing the
    module on a constant input (n(x) = 1 up to eps: the output is the effective scale)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or tuple(w.shape) != (d,) or getattr(norm, "bias", None) is not None:
        return None
    with torch.no_grad():
        try:
            y = norm(torch.full((1, d), 4.0, dtype=w.dtype, device=w.device))
        except Exception:
            return None
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (1, d):
        return None
    y, w64 = y[0].double(), w.detach().double()
    tol = 1e-2 * (1 + w64.abs())
    if bool(((y - w64).abs() <= tol).all()):
        return "scale"
    if bool(((y - 1 - w64).abs() <= tol).all()):
        return "offset"
    return None


def _unsupported(model: nn.Module, why: str) -> ValueError:
    return ValueError(f"quarot_plan: {type(model).__name__} is not supported: {why}. Supported: "
                      + "; ".join(SUPPORTED) + ". Use a per-linear rotation instead (Rule(feature='hadamard')).")


def _find_decoder(model: nn.Module) -> tuple[str, nn.Module]:
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(getattr(m, "layers", None), nn.ModuleList)
             and isinstance(getattr(m, "embed_tokens", None), nn.Embedding)
             and isinstance(getattr(m, "norm", None), nn.Module)]
    if len(found) != 1:
        raise _unsupported(model, f"expected one decoder stack (a module with embed_tokens, layers and norm), "
                                  f"found {len(found)}")
    return found[0]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# ----------------------------------------------------------------------------- the plan
@torch.no_grad()
def quarot_plan(model: nn.Module, seed: int = 0) -> QuaRotPlan:
    """The QuaRot rotations of ``model`` (see the module docstring); the model is not modified.

    Raises ``ValueError`` for an architecture other than the supported ones (the message lists them),
    for a head dim, hidden size or MLP width without a Hadamard construction, and for a bad seed."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    prefix, dec = _find_decoder(model)
    layers = list(dec.layers)
    if not layers:
        raise _unsupported(model, "the decoder has no layers")
    d = dec.embed_tokens.weight.shape[1]
    sandwich = [hasattr(layer, "post_feedforward_layernorm") for layer in layers]
    if any(sandwich) != all(sandwich):
        raise _unsupported(model, "some layers have post-feedforward norms and some do not")
    gemma = sandwich[0]
    allowed = _GEMMA_CHILDREN if gemma else _LLAMA_CHILDREN
    pre_norms = ("input_layernorm", "pre_feedforward_layernorm" if gemma else "post_attention_layernorm")
    kind = "offset" if gemma else "scale"
    for i, layer in enumerate(layers):
        extra = sorted(set(dict(layer.named_children())) - allowed)
        missing = sorted(allowed - set(dict(layer.named_children())))
        if extra or missing:
            raise _unsupported(model, f"layer {i} has the submodules {sorted(dict(layer.named_children()))} "
                                      f"(unexpected: {extra}, missing: {missing})")
        for sub, names in (("self_attn", _ATTN_LINEARS), ("mlp", _MLP_LINEARS)):
            for n in names:
                if not isinstance(getattr(getattr(layer, sub), n, None), nn.Linear):
                    raise _unsupported(model, f"layer {i}: {sub}.{n} is not an nn.Linear")
        for n in pre_norms:
            got = _norm_kind(getattr(layer, n), d)
            if got != kind:
                raise _unsupported(model, f"layer {i}: {n} does not compute "
                                          f"{'(1 + w)' if gemma else 'w'} * rmsnorm(x) (probe: {got})")
    if not gemma and _norm_kind(dec.norm, d) != "scale":
        raise _unsupported(model, "the final norm does not compute w * rmsnorm(x)")
    lm_head = getattr(model, "lm_head", None)
    lm_name = "lm_head" if isinstance(lm_head, nn.Linear) and lm_head.in_features == d else None

    attn0 = layers[0].self_attn
    hd = getattr(attn0, "head_dim", None)
    if not isinstance(hd, int):
        cfg = getattr(attn0, "config", None)
        hd = getattr(cfg, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads if cfg else None)
    if not isinstance(hd, int) or attn0.q_proj.out_features % hd or attn0.k_proj.out_features % hd:
        raise _unsupported(model, f"cannot tell the head dim of the attention (got {hd!r})")
    nq, nkv = attn0.q_proj.out_features // hd, attn0.k_proj.out_features // hd
    for i, layer in enumerate(layers):
        a = layer.self_attn
        if (a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features, a.o_proj.in_features) != \
                (nq * hd, nkv * hd, nkv * hd, nq * hd):
            raise _unsupported(model, f"layer {i}: the attention projections do not match {nq} query heads and "
                                      f"{nkv} KV heads of dim {hd}")

    def rotation(n, s, what):
        try:
            return features.hadamard_rotation(n, s)
        except ValueError as e:
            raise ValueError(f"quarot_plan: {what} (order {n}) has no Hadamard construction: {e}") from None

    Hh = rotation(hd, None, "the head dim")  # plain, as QuaRot's online ones
    Rh = Hh.matrix()
    plan = QuaRotPlan(arch="gemma3" if gemma else "llama", seed=seed, fused=not gemma,
                      label=GEMMA3_LABEL if gemma else LLAMA_LABEL, description="", qk=Hh,
                      head_dim=hd, num_heads=nq, num_kv_heads=nkv)
    Q = None if gemma else rotation(d, seed, "the hidden size")
    plan.residual = Q

    def put(module_name, attr, t, like):  # module_name relative to the decoder stack
        plan.params[f"{_join(prefix, module_name)}.{attr}"] = t.to(dtype=like.dtype, device=like.device)

    def read(W, g):  # a reader of the residual: norm scale fused into the columns, then W Q
        W = W.detach().double()
        if g is not None:
            W = W * g
        return W if Q is None else Q.forward(W)

    def write(W):  # a writer of the residual: Q^T W
        W = W.detach().double()
        return W if Q is None else Q.forward(W.T).T

    def pre_scale(norm):  # the scale fused into the readers (Llama-style only: see the module docstring)
        return None if gemma else norm.weight.detach().double()

    if Q is not None:
        put("embed_tokens", "weight", Q.forward(dec.embed_tokens.weight.detach().double()), dec.embed_tokens.weight)
    for i, layer in enumerate(layers):
        base = f"layers.{i}"
        a, mlp = layer.self_attn, layer.mlp
        g_attn = pre_scale(layer.input_layernorm)
        g_mlp = pre_scale(getattr(layer, pre_norms[1]))
        for n in () if gemma else ("q_proj", "k_proj"):
            put(f"{base}.self_attn.{n}", "weight", read(getattr(a, n).weight, g_attn), getattr(a, n).weight)
        # values: rows of each KV head rotated, v_h -> v_h H (rows R^T W_h, bias b_h R)
        Wv = read(a.v_proj.weight, g_attn)
        Wv = torch.einsum("ji,hjc->hic", Rh, Wv.view(nkv, hd, -1)).reshape(nkv * hd, -1)
        put(f"{base}.self_attn.v_proj", "weight", Wv, a.v_proj.weight)
        if a.v_proj.bias is not None:
            put(f"{base}.self_attn.v_proj", "bias", (a.v_proj.bias.detach().double().view(nkv, hd) @ Rh).reshape(-1),
                a.v_proj.bias)
        # o_proj: its input blocks arrive rotated by H (one per query head): columns W_o (I (x) H)
        Wo = write(a.o_proj.weight)
        Wo = (Wo.view(Wo.shape[0], nq, hd) @ Rh).reshape(Wo.shape[0], nq * hd)
        put(f"{base}.self_attn.o_proj", "weight", Wo, a.o_proj.weight)
        for n in () if gemma else ("gate_proj", "up_proj"):
            put(f"{base}.mlp.{n}", "weight", read(getattr(mlp, n).weight, g_mlp), getattr(mlp, n).weight)
        if Q is not None:
            put(f"{base}.mlp.down_proj", "weight", write(mlp.down_proj.weight), mlp.down_proj.weight)
            for lin, n in ((a.o_proj, "self_attn.o_proj"), (mlp.down_proj, "mlp.down_proj")):
                if lin.bias is not None:
                    put(f"{base}.{n}", "bias", Q.forward(lin.bias.detach().double()), lin.bias)
        if not gemma:
            for n in pre_norms:
                w = getattr(layer, n).weight
                put(f"{base}.{n}", "weight", torch.ones_like(w), w)
    if Q is not None:
        put("norm", "weight", torch.ones_like(dec.norm.weight), dec.norm.weight)
        if lm_name is not None:
            plan.params["lm_head.weight"] = read(lm_head.weight, dec.norm.weight.detach().double()).to(
                dtype=lm_head.weight.dtype, device=lm_head.weight.device)

    # online transforms
    cache: dict = {}

    def shared(n, s, what):
        if (n, s) not in cache:
            cache[(n, s)] = rotation(n, s, what)
        return cache[(n, s)]

    names = {id(m): n for n, m in model.named_modules()}
    if gemma:
        for layer in layers:
            for lin in [getattr(layer.self_attn, n) for n in _ATTN_LINEARS] + [getattr(layer.mlp, n) for n in _MLP_LINEARS]:
                plan.online[names[id(lin)]] = shared(lin.in_features, seed, f"the input of {names[id(lin)]}")
        if lm_name is not None:
            plan.online[lm_name] = shared(d, seed, "the input of lm_head")
        o_choice = (f"o_proj's input gets the per-linear rotation D H_{nq * hd} (which also mixes the heads), "
                    f"on top of the head-wise H_{hd} of step 4")
        plan.description = (
            f"{GEMMA3_LABEL}: every norm kept as it is (no residual rotation, so nothing to fuse; the pre-norm "
            f"scales 1 + w are not fused into the weights, which would spread them unevenly over 4-bit rows); every "
            f"linear input (q/k/v/o, gate/up/down, lm_head) rotated online "
            f"by D H_n/sqrt(n) with random signs from seed {seed}; values rotated per KV head by H_{hd} (v_proj rows), "
            f"undone in o_proj's columns; {o_choice}; queries and keys rotated by H_{hd} after RoPE, before the K/V "
            f"quantizer.")
        return plan
    dff = layers[0].mlp.down_proj.in_features
    if nq > 1 and _has_hadamard(nq):
        o_rot = HeadsRotation(shared(nq, None, "the number of heads"), hd)
        o_choice = (f"QuaRot's online Hadamard across heads H_{nq} (x) I_{hd} on o_proj's input")
    elif nq == 1:
        o_rot, o_choice = None, "one attention head: no online rotation across heads on o_proj's input"
    elif _has_hadamard(nq * hd):
        o_rot = shared(nq * hd, None, "o_proj's input")
        o_choice = (f"no Hadamard of order {nq} (heads) exists, so o_proj's input gets an online Hadamard of its full "
                    f"width H_{nq * hd} instead of QuaRot's H_{nq} (x) I_{hd} across heads")
    else:
        o_rot = None
        o_choice = (f"no Hadamard of order {nq} (heads) nor {nq * hd} exists: no online rotation on o_proj's input "
                    f"besides the head-wise H_{hd}")
    for layer in layers:
        plan.online[names[id(layer.mlp.down_proj)]] = shared(layer.mlp.down_proj.in_features, None,
                                                             "down_proj's input")
        if o_rot is not None:
            plan.online[names[id(layer.self_attn.o_proj)]] = o_rot
    untie = "; tied embeddings untied for the duration" if _tied(model, dec) else ""
    plan.description = (
        f"{LLAMA_LABEL} (fused): RMSNorm scales fused into q/k/v, gate/up{' and lm_head' if lm_name else ''} (norm "
        f"weights set to 1); residual stream rotated by Q = D H_{d}/sqrt({d}) with random signs from seed {seed} "
        f"(embeddings E Q, readers W Q, writers Q^T W){untie}; "
        f"online Hadamard H_{dff} on down_proj's input; values rotated per KV head by H_{hd} (v_proj rows and bias), "
        f"undone in o_proj's columns; {o_choice}; queries and keys rotated by H_{hd} after RoPE, before the K/V "
        f"quantizer.")
    return plan


def _has_hadamard(n: int) -> bool:
    try:
        hadamard_plan(n)
        return True
    except ValueError:
        return False


def _tied(model: nn.Module, dec: nn.Module) -> bool:
    lm = getattr(model, "lm_head", None)
    return isinstance(lm, nn.Linear) and lm.weight is dec.embed_tokens.weight


# ----------------------------------------------------------------------------- applying it
def _owner(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    mod_name, _, attr = qualified.rpartition(".")
    try:
        mod = model.get_submodule(mod_name) if mod_name else model
    except AttributeError:
        mod = None
    if mod is None or attr not in mod._parameters:
        raise ValueError(f"quarot.rotated: the plan names the parameter {qualified!r}, which this model does not "
                         "have; the plan was built for another model: call quarot_plan(model) again")
    return mod, attr


@contextlib.contextmanager
def rotated(model: nn.Module, plan: QuaRotPlan, *, online: bool = True):
    """Swap the plan's parameters into ``model`` for the duration of the block (tied weights untied),
    and put the original ``Parameter`` objects back on exit, also when the body raises: the model is
    restored bit for bit and ties come back.

    ``online=True`` (standalone use): also apply the online transforms, each linear's input
    rotated by a pre-hook and its weight folded (in float64), and the Q/K rotation through
    :func:`stamp_lib.model.kv.kv_quantization` (``qk_rotation``, no quantizer): the full-precision
    model computes the same function as the original, up to rounding. ``online=False`` swaps the
    fused parameters only (an exact transformation on its own); :mod:`stamp_lib.model.recipe` does
    this and applies the online transforms as the layers' feature transforms itself.

    Raises ``ValueError`` when the plan does not fit the model (a parameter missing, another shape,
    dtype or device, e.g. after ``model.double()``: build the plan again) and ``RuntimeError``
    inside another :func:`rotated` of the same parameters."""
    if not isinstance(plan, QuaRotPlan):
        raise TypeError(f"plan must be a QuaRotPlan (from quarot_plan), got {type(plan).__name__}")
    targets = []
    for qn, t in plan.params.items():
        mod, attr = _owner(model, qn)
        p = mod._parameters[attr]
        if getattr(p, _TAG, False):
            raise RuntimeError(f"quarot.rotated: {qn} is already rotated (nested quarot.rotated on one model)")
        if p.shape != t.shape or p.dtype != t.dtype or p.device != t.device:
            raise ValueError(f"quarot.rotated: {qn} is {tuple(p.shape)} {p.dtype} on {p.device} in the model but "
                             f"{tuple(t.shape)} {t.dtype} on {t.device} in the plan; build the plan again for the "
                             "model as it is now (quarot_plan(model))")
        targets.append((mod, attr, t))
    saved = []
    stack = contextlib.ExitStack()
    try:
        with torch.no_grad():
            for mod, attr, t in targets:
                saved.append((mod, attr, mod._parameters[attr]))
                new = nn.Parameter(t, requires_grad=False)
                setattr(new, _TAG, True)
                mod._parameters[attr] = new
            if online and plan.online:
                mods = {n: model.get_submodule(n) for n in plan.online}
                for n, m in mods.items():
                    W = m._parameters["weight"]
                    saved.append((m, "weight", W))
                    new = nn.Parameter(plan.online[n].fold_weight(W.detach().double()).to(W.dtype), requires_grad=False)
                    setattr(new, _TAG, True)
                    m._parameters["weight"] = new
                stack.enter_context(hooks.input_hooks(mods, lambda name, m, x: plan.online[name].forward(x)))
        if online:
            from . import kv

            stack.enter_context(kv.kv_quantization(model, qk_rotation=plan.qk.forward))
        with stack:
            yield plan
    finally:
        for mod, attr, p in reversed(saved):
            mod._parameters[attr] = p
