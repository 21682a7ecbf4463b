r"""PixArt-Sigma (diffusers) with the book's recipes: STaMP over the latent patch grid.

The paper's image results (Figure 1, Table 1) are on PixArt-Sigma. Its weights are not available
here, so this module is the code path for a machine that has them, tested end to end on tiny
random-init configurations of the same diffusers classes.

Which linear layers see what (classified by *name*, :func:`roles`; never by shape)
---------------------------------------------------------------------------------
==========  ====================================================================  ==================
role        layers (``transformer_blocks.<i>.`` prefix where it applies)         activations
==========  ====================================================================  ==================
``image``   ``attn1.to_q/to_k/to_v/to_out.0``, ``attn2.to_q``, ``attn2.to_out.0``,  (B, h*w, d): STaMP,
            ``ff.net.0.proj``, ``ff.net.2``, ``proj_out``                         2-D Haar over the grid
``text``    ``attn2.to_k/to_v``, ``caption_projection.linear_1/linear_2``          (B, 300 T5 tokens, d)
``time``    ``adaln_single.*`` (timestep and size embeddings, the adaLN linear)    (B, d): one vector
==========  ====================================================================  ==================

* ``image`` inputs get STaMP: the multi-level 2-D Haar DWT over the latent patch grid
  (``grid="auto"``), ``hp_tokens`` transformed rows at ``hp_bits``; the bit-matched baseline keeps
  its first ``hp_tokens`` untransformed tokens at ``hp_bits``.
* ``text`` inputs are T5 token embeddings (padded to 300): no spatial grid, and the paper does not
  transform cross-attention text inputs. They get plain per-token quantization at ``a_bits``,
  identical with and without STaMP (``text_bits=None`` keeps them in full precision).
* ``time`` inputs are one vector per sample: there is no sequence to transform. They get plain
  per-vector quantization at ``a_bits`` (``time_bits=None``: full precision).

The grid (h, w) is read from the latent actually fed to the transformer (a forward pre-hook on it:
latent height and width divided by the patch size), never from the pipeline's height/width
(resolution binning changes them) nor from the token count (which cannot tell 8 x 32 from 16 x 16).
Odd sides (binning gives e.g. 8 x 29 at 256 px) stay exact: the 2-D Haar carries the last row or
column of an odd band unchanged, an orthogonal map.

Traps refused with a clear error (:func:`check_transformer`): fused QKV projections (their hooks
would never fire), a compiled module (hooks added after ``torch.compile`` are ignored), PEFT/LoRA
wrappers (merge them first), feed-forward chunking over tokens (the token count then is not
h * w), and anything that is not the pipeline's transformer (the VAE's own attention linears are
never hooked).

Full size, on a machine with the weights and a GPU::

    python -m stamp_lib pixart --model PixArt-alpha/PixArt-Sigma-XL-2-1024-MS \
        --prompts data/prompts/pixart_prompts.txt --device cuda --dtype float16

runs Figure 1 (A4: plain, +STaMP, +Hadamard, both) and Table 1 (W4A4, per-block-64: RTN,
Hadamard, SVDQuant-style; ViDiT-Q per token, its published setting; each without and with
STaMP), SQNR of the decoded images against full precision from the same latents and prompt,
paired per image, and writes a JSON file.
Quantization is simulated (fake quantization in floating point).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core import cells as cellstore
from ..core import metrics, stats, transforms
from ..core.io import results_dir, write_json
from ..methods import viditq
from ..methods.viditq import IMAGE_FEATURE_OF as FEATURE_OF
from ..methods.viditq import IMAGE_METHODS as METHODS
from ..model import hooks
from ..model import recipe as rcp
from ..model.recipe import ActQuant, Recipe, Rule, WeightQuant
from . import cli

__all__ = ["IMAGE", "TEXT", "TIME", "roles", "pixart_recipe", "protocol_configs", "check_transformer",
           "quantized", "tiny_pipeline", "Prompts", "encode_prompts", "generate", "run_protocol",
           "load_pipeline", "check_tokenizer", "TokenizerBroken", "read_prompts", "main"]

_B = r"transformer_blocks\.\d+\."
IMAGE = tuple(re.compile(p) for p in (
    _B + r"attn1\.to_(q|k|v|out\.0)", _B + r"attn2\.to_(q|out\.0)", _B + r"ff\.net\.(0\.proj|2)", r"proj_out"))
TEXT = tuple(re.compile(p) for p in (_B + r"attn2\.to_(k|v)", r"caption_projection\.linear_[12]"))
TIME = (re.compile(r"adaln_single\..+"),)
# copies made by Attention.fuse_projections: never called unless a fused processor is set
_FUSED_COPIES = re.compile(_B + r"attn[12]\.to_(qkv|kv)")


def _role(name: str) -> str | None:
    for role, pats in (("image", IMAGE), ("text", TEXT), ("time", TIME)):
        if any(p.fullmatch(name) for p in pats):
            return role
    return None


def roles(transformer: nn.Module) -> dict[str, str]:
    """``{name: "image" | "text" | "time"}`` for every ``nn.Linear`` of a PixArt transformer.

    Raises ``ValueError`` naming any linear layer that fits no role (another architecture, or a
    wrapper such as LoRA): the recipes would otherwise silently leave it out or misread its rows."""
    out, unknown = {}, []
    for name, m in transformer.named_modules():
        if not isinstance(m, nn.Linear) or _FUSED_COPIES.fullmatch(name):
            continue
        r = _role(name)
        if r is None:
            unknown.append(name)
        else:
            out[name] = r
    if unknown:
        raise ValueError(f"linear layers of no known PixArt role (image tokens, text tokens, timestep): "
                         f"{unknown[:6]}{' ...' if len(unknown) > 6 else ''}; this is not a plain "
                         "PixArtTransformer2DModel")
    return out


# ----------------------------------------------------------------------------- recipes
def pixart_recipe(method: str, *, stamp: bool = False, w_bits: int | None = 4, a_bits: int = 4,
                  hp_tokens: int = 64, hp_bits: int = 8, levels: int = 3, block_size: int | None = 64,
                  rank: int = 32, alpha: float | None = None, text_bits: int | None = 4, time_bits: int | None = 4,
                  hadamard_seed: int | None = 0) -> Recipe:
    """The recipe of one cell of Figure 1 / Table 1 for PixArt (see the module docstring).

    ``stamp``: 2-D Haar DWT (``levels``) over the latent grid on the image-token inputs (else the
    bit-matched baseline). ``w_bits=None``: full-precision weights (Figure 1's A4). ``block_size``:
    per-block activation ranges (64, the paper's Table 1) or per token (``None``). ``svdquant``:
    SmoothQuant smoothing (``alpha``, default 0.5) + a rank-``rank`` full-precision branch; needs
    calibration. ``viditq``: ViDiT-Q's published PixArt setting (:mod:`stamp_lib.methods.viditq`:
    channel balancing with ``alpha`` default 0.3, dynamic activation ranges); needs calibration.
    ``text_bits`` / ``time_bits``: plain quantization of the text-token and timestep inputs
    (``None``: full precision). ``hadamard_seed``: QuaRot's random signs for ``hadamard``
    (``None``: the plain Hadamard matrix, which chapter 4 finds harmful at A4 on the galaxy model)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method == "fp":
        return Recipe((Rule("*"),), name="fp")
    alpha = viditq.alpha_for(method, alpha)
    lowrank = rank if method == "svdquant" else 0
    if w_bits is None and lowrank:
        raise ValueError("the svdquant low-rank branch needs quantized weights (w_bits)")
    w = None if w_bits is None else WeightQuant(bits=w_bits, lowrank=lowrank)
    feat = FEATURE_OF[method]
    seed = hadamard_seed if feat == "hadamard" else None
    img = ActQuant(bits=f"{hp_tokens}x{hp_bits}+{a_bits}" if hp_tokens else a_bits,
                   transform="dwt" if stamp else "identity", levels=levels if stamp else None,
                   grid="auto" if stamp else None, block_size=block_size)
    rules = [Rule(list(IMAGE), act=img, weight=w, feature=feat, alpha=alpha, hadamard_seed=seed)]
    for pats, bits in ((TEXT, text_bits), (TIME, time_bits)):
        act = None if bits is None else ActQuant(bits=bits, block_size=block_size)
        rules.append(Rule(list(pats), act=act, weight=w, feature=feat, alpha=alpha, hadamard_seed=seed))
    wname = "A" if w_bits is None else f"W{w_bits}A"
    name = f"{method} {wname}{a_bits}{' +stamp' if stamp else ''} hp{hp_tokens}" + (
        f" blk{block_size}" if block_size else "")
    return Recipe(tuple(rules), name=name)


def protocol_configs(hp_tokens: int = 64, block_size: int | None = 64, rank: int = 32,
                     hadamard_seed: int | None = 0) -> dict[str, Recipe]:
    """Figure 1 (A4, full-precision weights: plain, +STaMP, +Hadamard, both) and Table 1 (W4A4:
    RTN, Hadamard, SVDQuant-style, ViDiT-Q, each without and with STaMP), per-block-``block_size``
    (ViDiT-Q per token, its published granularity); Hadamard with QuaRot's random signs from
    ``hadamard_seed``."""
    kw = dict(hp_tokens=hp_tokens, block_size=block_size, hadamard_seed=hadamard_seed)
    out = {"A4": pixart_recipe("rtn", w_bits=None, **kw),
           "A4 +stamp": pixart_recipe("rtn", w_bits=None, stamp=True, **kw),
           "A4 +hadamard": pixart_recipe("hadamard", w_bits=None, **kw),
           "A4 +both": pixart_recipe("hadamard", w_bits=None, stamp=True, **kw)}
    for m in ("rtn", "hadamard", "svdquant", viditq.NAME):
        mkw = {**kw, "block_size": None} if m == viditq.NAME else kw
        out[f"{m} W4A4"] = pixart_recipe(m, rank=rank, **mkw)
        out[f"{m} W4A4 +stamp"] = pixart_recipe(m, stamp=True, rank=rank, **mkw)
    return out


# ----------------------------------------------------------------------------- traps
def _is_compiled(module: nn.Module) -> bool:
    if type(module).__name__ == "OptimizedModule" or hasattr(module, "_orig_mod"):
        return True
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def check_transformer(transformer) -> None:
    """Refuse, with an error that says what to do, the models on which hooks would silently miss
    layers or misread the token grid (see the module docstring)."""
    from diffusers import PixArtTransformer2DModel
    from diffusers.models.attention_processor import Attention

    if isinstance(transformer, nn.Module) and _is_compiled(transformer):
        raise RuntimeError("the transformer is compiled (torch.compile / Module.compile): hooks added after "
                           "compiling are silently ignored. Quantize the uncompiled module (e.g. "
                           "transformer._orig_mod) and compile afterwards, inside the quantized() block")
    if not isinstance(transformer, PixArtTransformer2DModel):
        what = type(transformer).__name__
        hint = " (pass pipe.transformer, not the pipeline)" if hasattr(transformer, "transformer") else ""
        raise TypeError(f"expected the pipeline's PixArtTransformer2DModel, got a {what}{hint}; only the "
                        "transformer is quantized (the VAE's own attention layers are never hooked)")
    for name, m in transformer.named_modules():
        if hasattr(m, "base_layer") or type(m).__module__.startswith("peft") or ".lora_" in name:
            raise RuntimeError(f"{name or 'the transformer'} is wrapped by PEFT/LoRA ({type(m).__name__}): "
                               "merge the adapters first (pipe.fuse_lora(); pipe.unload_lora_weights()) so every "
                               "projection is a plain nn.Linear")
        if isinstance(m, Attention) and "Fused" in type(m.processor).__name__:
            raise RuntimeError(f"{name}: fused QKV projections ({type(m.processor).__name__}) call to_qkv/to_kv, "
                               "so hooks on to_q/to_k/to_v would never fire; call "
                               "transformer.unfuse_qkv_projections() first")
        if getattr(m, "_chunk_size", None) is not None and getattr(m, "_chunk_dim", 0) != 0:
            raise RuntimeError(f"{name}: feed-forward chunking over tokens (chunk size {m._chunk_size}) feeds ff "
                               "slices whose token count is not h*w; disable it with "
                               "block.set_chunk_feed_forward(None)")
    roles(transformer)


@contextlib.contextmanager
def quantized(transformer, recipe: Recipe, prepared: rcp.Prepared | None = None, calib=None, *,
              observe=None, check_finite: bool | None = False):
    """Apply ``recipe`` to a PixArt transformer for the duration of the block; yields the
    :class:`~stamp_lib.model.recipe.Applied` handle.

    Checks the traps first (:func:`check_transformer`) and adds a forward pre-hook on the
    transformer that sets the token grid of every forward from its latent input (B, C, H, W):
    ``(H / patch, W / patch)``. ``observe`` is passed to :func:`stamp_lib.model.recipe.apply`."""
    check_transformer(transformer)
    p = int(transformer.config.patch_size)

    with rcp.apply(transformer, recipe, prepared, calib, observe=observe, check_finite=check_finite,
                   progress=False) as st:
        def set_grid(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(x, torch.Tensor) or x.dim() != 4:
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"the transformer's latent input must be (B, C, H, W) to give the token grid; got {got}")
            H, W = x.shape[-2:]
            if H % p or W % p:
                raise ValueError(f"latent size {H}x{W} is not a multiple of the patch size {p}")
            st.set_grid((H // p, W // p))

        try:
            with hooks.module_hook(transformer, set_grid):
                yield st
        finally:
            st.set_grid(None)


# ----------------------------------------------------------------------------- pipelines
def tiny_pipeline(seed: int = 0, *, layers: int = 2, heads: int = 2, head_dim: int = 32, caption_channels: int = 64,
                  sample_size: int = 32, vae_blocks: int = 4, dtype=torch.float32):
    """A random-init ``PixArtSigmaPipeline`` (no tokenizer or text encoder: call it with prompt
    embeddings of ``caption_channels`` features) with a small transformer, a small AutoencoderKL
    (``vae_blocks`` levels: latent = image / 2^(vae_blocks-1)) and a DPM-Solver++ scheduler.
    For tests and demonstrations of the code path; its images are noise-like."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

    torch.manual_seed(seed)
    tr = PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                  out_channels=8, num_layers=layers, cross_attention_dim=heads * head_dim,
                                  sample_size=sample_size, patch_size=2, caption_channels=caption_channels,
                                  norm_type="ada_norm_single", use_additional_conditions=False)
    # random init leaves the adaLN tables small and the output projections at their defaults: give
    # the blocks visible effect so that quantization error is not hidden by near-zero gates
    with torch.no_grad():
        for blk in tr.transformer_blocks:
            blk.scale_shift_table.normal_(0, 0.5)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                        up_block_types=("UpDecoderBlock2D",) * vae_blocks, block_out_channels=(8,) * vae_blocks,
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=sample_size * 8)
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=tr,
                               scheduler=DPMSolverMultistepScheduler())
    if dtype != torch.float32:
        pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Prompts:
    """Encoded prompts: embeddings (n, L, c) and masks (n, L), and the negative ("") ones."""

    embeds: torch.Tensor
    mask: torch.Tensor
    neg_embeds: torch.Tensor
    neg_mask: torch.Tensor
    texts: tuple = ()

    def __len__(self):
        return self.embeds.shape[0]

    def take(self, i: int) -> "Prompts":
        return Prompts(self.embeds[i:i + 1], self.mask[i:i + 1], self.neg_embeds[i:i + 1], self.neg_mask[i:i + 1],
                       self.texts[i:i + 1])


@torch.no_grad()
def encode_prompts(pipe, texts: list[str], max_sequence_length: int = 300) -> Prompts:
    """T5 embeddings of ``texts`` and of the empty negative prompt, with the pipeline's own
    encoder (checked with :func:`check_tokenizer` first)."""
    if pipe.tokenizer is None or pipe.text_encoder is None:
        raise ValueError("this pipeline has no tokenizer/text encoder: pass prompt embeddings instead")
    check_tokenizer(pipe.tokenizer)
    out = [], [], [], []
    for t in texts:
        e, m, ne, nm = pipe.encode_prompt(t, do_classifier_free_guidance=True, negative_prompt="",
                                          max_sequence_length=max_sequence_length, clean_caption=False)
        for lst, v in zip(out, (e, m, ne, nm)):
            lst.append(v)
    return Prompts(*(torch.cat(v) for v in out), texts=tuple(texts))


@torch.no_grad()
def generate(pipe, prompts: Prompts, latents: torch.Tensor, *, steps: int = 20, guidance_scale: float = 4.5,
             decode: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(final latents, decoded images in [-1, 1] or None)`` for one prompt (``len(prompts) == 1``)
    from the given initial ``latents`` (1, C, h, w): deterministic, so two runs with the same
    latents compare directly. The grid the transformer sees is ``latents``' size / patch size."""
    if len(prompts) != 1 or latents.shape[0] != 1:
        raise ValueError("generate takes one prompt and one latent at a time")
    dev, dt = pipe._execution_device, pipe.transformer.dtype
    out = pipe(prompt=None, negative_prompt=None, prompt_embeds=prompts.embeds.to(dev),
               prompt_attention_mask=prompts.mask.to(dev), negative_prompt_embeds=prompts.neg_embeds.to(dev),
               negative_prompt_attention_mask=prompts.neg_mask.to(dev), latents=latents.to(dev, dt),
               num_inference_steps=steps, guidance_scale=guidance_scale, output_type="latent",
               use_resolution_binning=False, height=latents.shape[-2] * pipe.vae_scale_factor,
               width=latents.shape[-1] * pipe.vae_scale_factor, return_dict=False)[0]
    img = None
    if decode:
        vae = pipe.vae
        img = vae.decode(out.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0].clamp(-1, 1)
    return out, img


def initial_latents(pipe, seed: int, height: int, width: int) -> torch.Tensor:
    """Standard normal latents (1, C, height / f, width / f) from ``seed`` (CPU generator, float32)."""
    f = pipe.vae_scale_factor
    if height % f or width % f:
        raise ValueError(f"height {height} and width {width} must be multiples of the VAE factor {f}")
    c = pipe.transformer.config.in_channels
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn((1, c, height // f, width // f), generator=g) * pipe.scheduler.init_noise_sigma


@torch.no_grad()
def calibration_inputs(pipe, prompts: Prompts, seeds, height: int, width: int, *, steps: int = 20,
                       guidance_scale: float = 4.5, every: int = 4, progress=None) -> list[dict]:
    """Transformer inputs (keyword dicts, every ``every``-th call) recorded during full-precision
    generation of ``prompts``: calibration data for SmoothQuant scales. ``progress``: a tqdm bar
    advanced by one per generated image (a caller's single bar), or ``None``."""
    rec = []
    calls = [0]

    def hook(module, args, kwargs):
        if calls[0] % every == 0:
            d = {k: v for k, v in kwargs.items() if k != "cross_attention_kwargs"}
            d["hidden_states"] = args[0] if args else kwargs["hidden_states"]
            d["return_dict"] = False
            rec.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()})
        calls[0] += 1

    with hooks.module_hook(pipe.transformer, hook):
        for i in range(len(prompts)):
            for s in seeds:
                generate(pipe, prompts.take(i), initial_latents(pipe, s, height, width), steps=steps,
                         guidance_scale=guidance_scale, decode=False)
                if progress is not None:
                    progress.update()
    return rec


def _pipe_id(pipe) -> str:
    """Fingerprint of what a pipeline computes with: transformer and VAE weights, scheduler settings."""
    sched = json.dumps({"class": type(pipe.scheduler).__name__, **dict(pipe.scheduler.config)}, sort_keys=True,
                       default=str)
    return cellstore.fingerprint([pipe.transformer, pipe.vae, sched])


def run_protocol(pipe, prompts: Prompts, configs: dict[str, Recipe], *, seeds=(0,), height: int, width: int,
                 steps: int = 20, guidance_scale: float = 4.5, calib: list | None = None, progress=True,
                 store=None) -> dict:
    """Figure 1 / Table 1 on ``pipe``: per configuration, the SQNR (dB) of every decoded image (and
    of its final latent) against full precision from the same prompt and latents, the bits spent
    (``act_bits``: per image token, the paper's average; ``act_bits_by_role``: image, text and
    timestep inputs apart), and paired differences ``+stamp`` minus baseline. Returns a JSON-ready dict.

    ``progress``: one bar over every generated image (``True``: shown when stderr is a terminal,
    never in a log file; ``False``: none; a tqdm bar: advanced instead, the caller's single bar).

    ``store``: a :class:`~stamp_lib.core.cells.CellStore` (or folder) keeping the full-precision
    images and every configuration as one cell each, as they finish (keyed by the pipeline's
    weights and scheduler, the prompt embeddings, seeds, size, steps, guidance, the recipe and,
    when it calibrates, ``calib``): a rerun after an interruption reuses them and generates only
    the rest. ``None``: none unless ``STAMP_RESUME=1`` (then ``data/cache/cells/pixart``);
    ``False``: never one. The result's ``cells`` says how many were computed and reused."""
    from tqdm.auto import tqdm

    tr = pipe.transformer
    check_transformer(tr)
    role_of = roles(tr)  # bits spent are reported per role: image tokens (the paper's average), text, timestep
    by_role = {r: {n for n, v in role_of.items() if v == r} for r in ("image", "text", "time")}
    store = cellstore.resolve(store, "pixart")
    before = store.counts() if store is not None else None
    jobs = [(i, s) for i in range(len(prompts)) for s in seeds]
    outer = progress if hasattr(progress, "update") else None
    bar = outer if outer is not None else tqdm(total=len(jobs) * (1 + len(configs)), desc="images",
                                               disable=None if progress else True, leave=False)
    base_key = None
    if store is not None:
        base_key = {"pipe": _pipe_id(pipe), "prompts": cellstore.fingerprint(
                        [prompts.embeds, prompts.mask, prompts.neg_embeds, prompts.neg_mask]),
                    "seeds": list(seeds), "height": height, "width": width, "steps": steps,
                    "guidance_scale": guidance_scale, "numerics": rcp.numerics()}

    def full_precision():
        ref = {}
        t0 = time.perf_counter()
        bar.set_description("full precision")
        for i, s in jobs:
            ref[i, s] = generate(pipe, prompts.take(i), initial_latents(pipe, s, height, width), steps=steps,
                                 guidance_scale=guidance_scale)
            bar.update()
        return ref, time.perf_counter() - t0

    if store is None:
        ref, fp_seconds = full_precision()
    else:
        fkey = {"experiment": "pixart.fp", **base_key}
        v = store.get(fkey)
        if v is None:
            ref, fp_seconds = full_precision()
            store.put(fkey, {"images": [list(ref[j]) for j in jobs], "seconds": fp_seconds})
        else:
            dev = pipe._execution_device  # stored on the CPU; compared with images made on the pipeline's device
            ref = {j: tuple(None if t is None else t.to(dev) for t in x) for j, x in zip(jobs, v["images"])}
            fp_seconds = v["seconds"]
            bar.update(len(jobs))
    preps, res = {}, {}
    for name, r in configs.items():
        bar.set_description(name)
        ckey = None
        if store is not None:
            ckey = {"experiment": "pixart.config", **base_key, "recipe": r.knobs(),
                    "calib": cellstore.fingerprint(calib) if r.needs_calibration() and calib is not None else None}
            v = store.get(ckey)
            if v is not None:
                res[name] = v
                bar.update(len(jobs))
                continue
        key = r.prep_key()
        if key not in preps:
            if r.needs_calibration() and calib is None:
                raise ValueError(f"{name} needs calibration inputs (calibration_inputs(...))")
            preps[key] = rcp.prepare(tr, r, calib if r.needs_calibration() else None, progress=False)
        img_sq, lat_sq = [], []
        t0 = time.perf_counter()
        with quantized(tr, r, preps[key]) as st:
            for i, s in jobs:
                lat, img = generate(pipe, prompts.take(i), initial_latents(pipe, s, height, width), steps=steps,
                                    guidance_scale=guidance_scale)
                img_sq.append(metrics.sqnr_db_per_sample(ref[i, s][1], img))
                lat_sq.append(metrics.sqnr_db_per_sample(ref[i, s][0], lat))
                bar.update()
        v = torch.cat(img_sq)
        mean, se = stats.mean_se(v)
        res[name] = {"sqnr_image_db": mean, "se_db": se, "per_image_db": v.tolist(),
                     "sqnr_latent_db": float(torch.cat(lat_sq).mean()),
                     "act_bits": st.average_bits(layers=by_role["image"]),
                     "act_bits_by_role": {k: st.average_bits(layers=v) for k, v in by_role.items()},
                     "seconds": round(time.perf_counter() - t0, 2),
                     "recipe": r.knobs()}
        if ckey is not None:
            store.put(ckey, res[name])
    if outer is None:
        bar.close()
    pairs = {}
    for name in res:
        if name.endswith(" +stamp") and name[: -len(" +stamp")] in res:
            p = stats.paired_difference(res[name[: -len(" +stamp")]]["per_image_db"], res[name]["per_image_db"],
                                        better="higher")
            pairs[name] = {"delta_db": p["mean"], "se_db": p["se"], "ci95_lo": p["ci_lo"], "ci95_hi": p["ci_hi"],
                           "wins": p["wins"], "n": p["n"]}
    return {"configs": res, "paired": pairs, "fp_seconds": round(fp_seconds, 2), "n_images": len(jobs),
            "seeds": list(seeds), "height": height, "width": width, "steps": steps, "guidance_scale": guidance_scale,
            "scheduler": type(pipe.scheduler).__name__,
            "protocol": "SQNR of decoded images (VAE output clamped to [-1, 1]) against full precision from the "
                        "same prompt and initial latents; paired per image",
            "simulated": "fake quantization in floating point",
            "cells": store.since(before) if store is not None else {}}


# ----------------------------------------------------------------------------- real checkpoints
def _missing_hint(model: str) -> str:
    return (f"download it on a machine with network access (`huggingface-cli download {model}`) and copy the "
            "Hugging Face cache (HF_HOME), or pass --model a local folder in diffusers format "
            "(model_index.json with transformer/, vae/, text_encoder/, tokenizer/, scheduler/)")


def _local_folder(model: str) -> Path:
    """The folder holding ``model``: itself if local, else its snapshot in the local HF cache;
    a ``FileNotFoundError`` that says what is missing otherwise (never a download)."""
    p = Path(model).expanduser()
    if p.exists():
        folder = p
    else:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            folder = Path(snapshot_download(model, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as e:
            raise FileNotFoundError(
                f"PixArt checkpoint {model!r} is not in the local Hugging Face cache "
                f"({os.environ.get('HF_HOME', '~/.cache/huggingface')}) and HF_HUB_OFFLINE=1 forbids downloading "
                f"({type(e).__name__}); {_missing_hint(model)}") from e
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has no model_index.json: not a diffusers pipeline folder; {_missing_hint(model)}")
    comps = [k for k, v in json.loads(index.read_text()).items()
             if not k.startswith("_") and isinstance(v, list) and v[0] is not None]
    missing = [c for c in comps if not (folder / c).is_dir() or not any((folder / c).iterdir())]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the component folder(s) {missing} listed in model_index.json; "
                                f"{_missing_hint(model)}")
    return folder


class TokenizerBroken(RuntimeError):
    """A tokenizer that maps ordinary words to the unknown token (:func:`check_tokenizer`)."""


def check_tokenizer(tokenizer, probe: str = "a red apple on a wooden table") -> None:
    """Refuse a tokenizer that maps ordinary words to the unknown token (a T5 tokenizer loaded
    without its sentencepiece model does): every prompt would condition on ``<unk>``."""
    ids = tokenizer(probe).input_ids
    if ids and isinstance(ids[0], list):
        ids = ids[0]
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    words = [i for i in ids if i not in special or i == unk]
    if not words or (unk is not None and all(i == unk for i in words)):
        raise TokenizerBroken(f"the tokenizer ({type(tokenizer).__name__}) maps every word of {probe!r} to the unknown "
                           f"token (ids {ids}): its vocabulary did not load. Install sentencepiece and protobuf, "
                           "or check the tokenizer/ folder of the checkpoint (spiece.model)")


def load_pipeline(model: str, *, dtype: str = "float16", device: str | None = None):
    """``PixArtSigmaPipeline`` from a local folder or the local Hugging Face cache (never the
    network: ``HF_HUB_OFFLINE=1``), its tokenizer checked. Missing files give a
    ``FileNotFoundError`` that names them instead of diffusers' generic OSError."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import PixArtSigmaPipeline

    folder = _local_folder(model)
    try:
        pipe = PixArtSigmaPipeline.from_pretrained(folder, dtype=getattr(torch, dtype))
    except OSError as e:
        cause = e.__cause__ or e.__context__ or e
        raise FileNotFoundError(f"loading {model!r} from {folder} failed: {type(cause).__name__}: {cause}. "
                                f"A weight file is probably missing or incomplete; {_missing_hint(model)}") from e
    if pipe.tokenizer is not None:
        check_tokenizer(pipe.tokenizer)
    if device:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read_prompts(path) -> list[str]:
    """Non-empty lines of a text file, ``#`` comments skipped."""
    lines = [ln.strip() for ln in Path(path).read_text(encoding="utf-8").splitlines()]
    out = [ln for ln in lines if ln and not ln.startswith("#")]
    if not out:
        raise ValueError(f"{path} holds no prompts")
    return out


PROG = "python -m stamp_lib pixart"
LEVELS = 3  # pixart_recipe's 2-D Haar levels (capped at run time by the latent grid; the record says what ran)


def _parser():
    p = cli.Parser(prog=PROG, description=(
        "Figure 1 and Table 1 of STaMP on PixArt-Sigma: SQNR of quantized images against full precision "
        "(same prompts and latents), without and with STaMP, paired. Needs the checkpoint locally."))
    p.add_argument("--model", default="PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", help="HF id (local cache) or folder")
    p.add_argument("--prompts", default="data/prompts/pixart_prompts.txt", help="text file, one prompt a line")
    p.add_argument("--n-prompts", type=int, default=0, help="evaluation prompts (0: all but the calibration ones)")
    p.add_argument("--calib-prompts", type=int, default=4, help="the last N prompts calibrate SmoothQuant, >= 1")
    p.add_argument("--seeds", type=int, default=1, help="initial latents per prompt (seeds 0..N-1), >= 1")
    p.add_argument("--height", type=int, default=1024, help="pixels, a multiple of VAE factor x patch size (16)")
    p.add_argument("--width", type=int, default=1024, help="pixels, a multiple of VAE factor x patch size (16)")
    p.add_argument("--steps", type=int, default=20, help=">= 1")
    p.add_argument("--guidance", type=float, default=4.5, help="classifier-free guidance scale, >= 0")
    p.add_argument("--hp-tokens", type=int, default=64, help="high-precision rows, at most the latent grid's tokens")
    p.add_argument("--block-size", type=int, default=64, help="0: per-token activation ranges; else divides the width")
    p.add_argument("--rank", type=int, default=32, help="SVDQuant-style low-rank branch, below the narrowest layer")
    p.add_argument("--hadamard-seed", type=int, default=0, help="QuaRot's random signs; -1: plain Hadamard")
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N | mps (default: cpu)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default; the record says how many)")
    p.add_argument("--out", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar and no messages: only the result lines")
    return p


def validate(a) -> None:
    """Check the parsed arguments (nothing read or loaded); raises ``cli.BadInput``."""
    cli.whole(a.n_prompts, "--n-prompts", "evaluation prompts", lo=0, hint=" (0: all but the calibration ones)")
    cli.whole(a.calib_prompts, "--calib-prompts", "calibration prompts (SVDQuant-style smoothing needs them)")
    cli.whole(a.seeds, "--seeds", "initial latents per prompt")
    cli.whole(a.height, "--height", "the image height in pixels")
    cli.whole(a.width, "--width", "the image width in pixels")
    cli.whole(a.steps, "--steps", "sampler steps")
    cli.fraction(a.guidance, "--guidance", "the guidance scale", 0.0, 100.0, example=4.5)
    cli.whole(a.hp_tokens, "--hp-tokens", "high-precision rows", lo=0)
    cli.whole(a.block_size, "--block-size", "the activation block size", lo=0, hint=" (0: per token)")
    cli.whole(a.rank, "--rank", "the low-rank branch", lo=0)
    cli.whole(a.hadamard_seed, "--hadamard-seed", "the Hadamard sign seed", lo=-1, hint=" (-1: plain Hadamard)")
    cli.check_threads(a.threads)
    cli.check_device(a.device)


def check_inputs(a) -> tuple[list[str], list[str]]:
    """``(evaluation prompts, calibration prompts)`` from the prompt file, checked against the counts."""
    cli.check_file(a.prompts, "--prompts", "prompt file", "pass a text file with one prompt a line (the default "
                   "data/prompts/pixart_prompts.txt is found from the repository root)")
    try:
        texts = read_prompts(a.prompts)
    except (ValueError, UnicodeDecodeError) as e:
        raise cli.BadInput(f"--prompts {a.prompts}", f"{e}; write one prompt a line, # for comments") from None
    if a.calib_prompts >= len(texts):
        raise cli.BadInput(f"--calib-prompts {a.calib_prompts}", f"leaves no evaluation prompt of the {len(texts)} in "
                                                                 f"{a.prompts}; "
                                                                 f"pass --calib-prompts {len(texts) - 1} or less")
    ev_t, cal_t = texts[: len(texts) - a.calib_prompts], texts[len(texts) - a.calib_prompts:]
    if a.n_prompts > len(ev_t):
        raise cli.BadInput(f"--n-prompts {a.n_prompts}", f"{a.prompts} holds {len(ev_t)} evaluation prompts after the "
                                                         f"{a.calib_prompts} calibration ones; pass --n-prompts "
                                                         f"{len(ev_t)} or less (0: all)")
    return (ev_t[: a.n_prompts] if a.n_prompts else ev_t), cal_t


def check_pipeline(pipe, a) -> dict:
    """The arguments that depend on the checkpoint (image size, rows, block size, rank); returns
    ``{"grid": (h, w), "levels": applied Haar levels}``."""
    tr = pipe.transformer
    step = pipe.vae_scale_factor * int(tr.config.patch_size)
    for flag, v in (("--height", a.height), ("--width", a.width)):
        if v % step:
            lo = max(step, v // step * step)
            raise cli.BadInput(f"{flag} {v}", f"must be a multiple of {step} (VAE factor {pipe.vae_scale_factor} x "
                                              f"patch {tr.config.patch_size}) for this checkpoint; pass {flag} {lo} "
                                              f"or {lo + step}")
    grid = (a.height // step, a.width // step)
    cli.whole(a.hp_tokens, "--hp-tokens", "high-precision rows", lo=0, hi=grid[0] * grid[1],
              hint=f" (the {grid[0]}x{grid[1]} latent grid of {a.height}x{a.width} px has {grid[0] * grid[1]} tokens)")
    lin = [m for n, m in tr.named_modules() if isinstance(m, nn.Linear) and n in roles(tr)]
    widths = sorted({m.in_features for m in lin})
    if a.block_size and any(w % a.block_size for w in widths):
        raise cli.BadInput(f"--block-size {a.block_size}", f"must divide the input widths {widths} of the transformer's "
                                                           "linear layers; pass 0 (per token) or a common divisor such "
                                                           "as 64")
    top = min(min(m.in_features, m.out_features) for m in lin) - 1
    cli.whole(a.rank, "--rank", "the low-rank branch", lo=0, hi=top,
              hint=f" (below the narrowest linear layer of this checkpoint, {top + 1})")
    levels = min(LEVELS, *(transforms.max_levels_1d(g) for g in grid))
    return {"grid": list(grid), "levels": levels}


def main(argv=None) -> dict:
    p = _parser()
    a = cli.parse(p, argv, validate)
    with cli.guard(p, quiet=a.quiet), cli.torch_threads(a.threads):
        ev_t, cal_t = check_inputs(a)
        cli.hide_library_bars()
        try:
            pipe = load_pipeline(a.model, dtype=a.dtype, device=a.device)
        except (FileNotFoundError, TokenizerBroken) as e:
            raise cli.BadInput(f"--model {a.model}", str(e)) from None
        applied = check_pipeline(pipe, a)
        ev, cal = encode_prompts(pipe, ev_t), encode_prompts(pipe, cal_t)
        configs = protocol_configs(a.hp_tokens, a.block_size or None, a.rank,
                                   None if a.hadamard_seed < 0 else a.hadamard_seed)
        seeds = tuple(range(a.seeds))
        bar = cli.bar(len(cal_t) + len(ev_t) * len(seeds) * (1 + len(configs)), "calibration", quiet=a.quiet)
        calib = calibration_inputs(pipe, cal, (1000,), a.height, a.width, steps=a.steps, guidance_scale=a.guidance,
                                   progress=bar)
        out = run_protocol(pipe, ev, configs, seeds=seeds, height=a.height, width=a.width, steps=a.steps,
                           guidance_scale=a.guidance, calib=calib, progress=bar)
        bar.close()
        facts = cli.run_facts(pipe._execution_device, a.dtype)
    out.update(model=a.model, dtype=a.dtype, prompts_file=a.prompts, n_calib_prompts=len(cal_t),
               applied={**applied, "seeds": list(seeds), "calibration_seed": 1000, "n_eval_prompts": len(ev_t),
                        "act_bits": {k: r["act_bits"] for k, r in out["configs"].items()}, **facts},
               command=cli.command_line(p, a, applied={"threads": facts["torch_threads"], "device": facts["device"]}))
    for k, r in out["configs"].items():
        pr = out["paired"].get(k)
        extra = f"   paired {pr['delta_db']:+.2f} +- {pr['se_db']:.2f} ({pr['wins']}/{pr['n']})" if pr else ""
        print(f"{k:24s} SQNR {r['sqnr_image_db']:6.2f} dB +- {r['se_db']:.2f}  bits on image tokens "
              f"{r['act_bits']:.4f}{extra}")
    path = Path(a.out) if a.out else results_dir() / "pixart" / f"{Path(a.model).name}.json"
    write_json(path, out, quiet=a.quiet)
    return out


if __name__ == "__main__":  # pragma: no cover
    main()
