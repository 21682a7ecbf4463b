"""The PixArt-Sigma code path (stamp_lib.pixart) on tiny random-init diffusers models: switched off
it returns the very same images; the grid comes from the latent actually fed (square, non-square,
odd sides, resolution binning); STaMP reaches exactly the image-token layers (equal to an
independent computation), text and timestep inputs get plain quantization; the protocol computes
paired SQNRs; every trap and every missing file gives a clear error."""

import copy
import json

import pytest
import torch
from torch import nn

pytest.importorskip("diffusers")

from stamp_lib.core import quant, transforms
from stamp_lib.experiments import pixart as P

STEPS = 2


@pytest.fixture(scope="module")
def pipe(one_thread):
    return P.tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def prompts():
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 9:] = 0  # a padded prompt
    return P.Prompts(torch.randn(2, 12, 64, generator=g), mask, torch.randn(2, 12, 64, generator=g),
                     torch.ones(2, 12, dtype=torch.long), ("a", "b"))


def test_roles_by_name(pipe):
    r = P.roles(pipe.transformer)
    n_blocks = len(pipe.transformer.transformer_blocks)
    assert sum(v == "image" for v in r.values()) == 8 * n_blocks + 1
    assert sum(v == "text" for v in r.values()) == 2 * n_blocks + 2
    assert sum(v == "time" for v in r.values()) == 3
    assert r["transformer_blocks.0.attn2.to_q"] == "image" and r["transformer_blocks.0.attn2.to_k"] == "text"
    tr = copy.deepcopy(pipe.transformer)
    tr.extra_head = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="extra_head"):
        P.roles(tr)


def test_switched_off_is_bit_identical(pipe, prompts):
    lat = P.initial_latents(pipe, 0, 64, 64)
    want = P.generate(pipe, prompts.take(1), lat, steps=STEPS)
    with P.quantized(pipe.transformer, P.pixart_recipe("fp")):
        got = P.generate(pipe, prompts.take(1), lat, steps=STEPS)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    again = P.generate(pipe, prompts.take(1), lat, steps=STEPS)  # hooks gone
    assert torch.equal(again[1], want[1])


def _expected(name, x, grid, role, hp=4, block=64):
    if role == "image":
        h, w = grid
        lv = min(3, transforms.max_levels_1d(h), transforms.max_levels_1d(w))
        b = torch.full((x.shape[-2],), 4)
        b[:hp] = 8
        return quant.stamp_fake_quant(x, transforms.HaarDWT2D(grid, levels=lv), b, block_size=block)
    return quant.fake_quant(x, 4, block_size=block)


@pytest.mark.parametrize("latent_hw, grid", [((8, 8), (4, 4)), ((8, 12), (4, 6)), ((16, 58), (8, 29))])
def test_grid_from_latent_and_transform_only_on_image_tokens(pipe, prompts, latent_hw, grid):
    """Every quantized input equals an independent computation: the 2-D Haar STaMP over the grid
    of the latent (odd sides included) for image tokens, plain per-row quantization for text
    tokens and timestep vectors."""
    r = P.pixart_recipe("rtn", stamp=True, w_bits=None, hp_tokens=4)
    roles = P.roles(pipe.transformer)
    seen = {}

    def observe(name, x, x_hat):
        role = roles[name]
        seen.setdefault(role, set()).add((tuple(st.grid), x.shape[-2]))
        torch.testing.assert_close(x_hat, _expected(name, x, tuple(st.grid), role), rtol=1e-5, atol=1e-5)

    lat = torch.randn(1, 4, *latent_hw, generator=torch.Generator().manual_seed(0))
    with P.quantized(pipe.transformer, r, observe=observe) as st:
        P.generate(pipe, prompts.take(0), lat, steps=STEPS, decode=False)
    assert seen["image"] == {(grid, grid[0] * grid[1])}
    assert {s for _, s in seen["text"]} == {12}
    assert {s for _, s in seen["time"]} == {2}  # one vector per sample (guidance doubles the batch)


def test_grid_follows_resolution_binning(pipe, prompts):
    """Asked for 128 x 460 px, the pipeline bins to 128 x 464: the grid is read from the latent
    (8 x 29), not from the requested size (which is not even a whole number of patches)."""
    grids = set()

    def observe(name, x, x_hat):
        grids.add(st.grid)

    with P.quantized(pipe.transformer, P.pixart_recipe("rtn", stamp=True, w_bits=None), observe=observe) as st:
        pipe(prompt=None, negative_prompt=None, prompt_embeds=prompts.embeds[:1], prompt_attention_mask=prompts.mask[:1],
             negative_prompt_embeds=prompts.neg_embeds[:1], negative_prompt_attention_mask=prompts.neg_mask[:1],
             height=128, width=460, num_inference_steps=1, output_type="latent", use_resolution_binning=True)
    assert grids == {(8, 29)}


def test_odd_grid_stays_exact(pipe, prompts):
    T = transforms.HaarDWT2D((8, 29), levels=3)
    M = T.matrix(232, dtype=torch.float64)
    torch.testing.assert_close(M @ M.T, torch.eye(232, dtype=M.dtype), rtol=0, atol=1e-12)
    X = torch.randn(2, 232, 16, dtype=torch.float64)
    torch.testing.assert_close(T.inverse(T.forward(X)), X, rtol=0, atol=1e-12)
    r = P.pixart_recipe("rtn", stamp=True, w_bits=None, a_bits=16, hp_tokens=0, block_size=None, text_bits=None,
                        time_bits=None)
    lat = torch.randn(2, 4, 16, 58, generator=torch.Generator().manual_seed(3))
    kw = dict(encoder_hidden_states=prompts.embeds, encoder_attention_mask=prompts.mask,
              timestep=torch.tensor([500, 500]), return_dict=False)
    with torch.no_grad():
        want = pipe.transformer(lat, **kw)[0]
        with P.quantized(pipe.transformer, r):
            got = pipe.transformer(lat, **kw)[0]
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_protocol_computes_paired_sqnr(pipe, prompts):
    configs = {"rtn W4A4": P.pixart_recipe("rtn", hp_tokens=4),
               "rtn W4A4 +stamp": P.pixart_recipe("rtn", hp_tokens=4, stamp=True),
               "svdquant W4A4 +stamp": P.pixart_recipe("svdquant", hp_tokens=4, stamp=True, rank=4)}
    calib = P.calibration_inputs(pipe, prompts.take(0), (7,), 64, 64, steps=STEPS, every=1)
    assert len(calib) == STEPS and calib[0]["hidden_states"].shape == (2, 4, 8, 8)
    out = P.run_protocol(pipe, prompts, configs, seeds=(0,), height=64, width=64, steps=STEPS, calib=calib,
                         progress=False)
    json.dumps(out)
    for r in out["configs"].values():
        assert len(r["per_image_db"]) == 2 and all(abs(v) < 200 for v in r["per_image_db"])
        assert r["act_bits"] > 4
        # the paper's average is over image tokens: 4 of the 16 tokens of the 4 x 4 grid at 8 bits
        by = r["act_bits_by_role"]
        assert set(by) == {"image", "text", "time"} and r["act_bits"] == by["image"] == pytest.approx(5.0)
        assert all(4 <= v <= 8 for v in by.values()), by
    p = out["paired"]["rtn W4A4 +stamp"]
    a, b = (torch.tensor(out["configs"][k]["per_image_db"]) for k in ("rtn W4A4", "rtn W4A4 +stamp"))
    assert p["n"] == 2 and p["delta_db"] == pytest.approx(float((b - a).mean()))
    with pytest.raises(ValueError, match="calibration"):
        P.run_protocol(pipe, prompts, {"s": configs["svdquant W4A4 +stamp"]}, height=64, width=64, steps=STEPS,
                       progress=False)


def test_protocol_configs_cover_figure1_and_table1():
    c = P.protocol_configs()
    assert set(c) == {"A4", "A4 +stamp", "A4 +hadamard", "A4 +both", "rtn W4A4", "rtn W4A4 +stamp",
                      "hadamard W4A4", "hadamard W4A4 +stamp", "svdquant W4A4", "svdquant W4A4 +stamp",
                      "viditq W4A4", "viditq W4A4 +stamp"}
    vq = c["viditq W4A4 +stamp"].rules[0]  # ViDiT-Q's published PixArt setting: alpha 0.3, per-token ranges
    assert vq.feature == "smoothquant" and vq.alpha == 0.3 and vq.act.block_size is None
    assert vq.act.transform == "dwt" and vq.weight.lowrank == 0 and c["viditq W4A4"].needs_calibration()
    img = c["A4 +both"].rules[0]
    assert img.feature == "hadamard" and img.act.transform == "dwt" and img.act.grid == "auto"
    assert img.act.bits == "64x8+4" and img.act.block_size == 64 and img.weight is None
    assert c["svdquant W4A4"].rules[0].weight.lowrank == 32


# ----------------------------------------------------------------------------- traps
def test_vae_and_pipeline_are_refused_and_never_hooked(pipe, prompts):
    with pytest.raises(TypeError, match="pipe.transformer"):
        with P.quantized(pipe, P.pixart_recipe("rtn")):
            pass
    with pytest.raises(TypeError, match="VAE"):
        with P.quantized(pipe.vae, P.pixart_recipe("rtn")):
            pass
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    want = pipe.vae.decode(z, return_dict=False)[0]
    with P.quantized(pipe.transformer, P.pixart_recipe("rtn", stamp=True)):
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in pipe.vae.modules())
        got = pipe.vae.decode(z, return_dict=False)[0]
    assert torch.equal(got, want)


def test_fused_qkv_is_refused(pipe):
    tr = copy.deepcopy(pipe.transformer)
    tr.fuse_qkv_projections()
    with pytest.raises(RuntimeError, match="unfuse_qkv_projections"):
        with P.quantized(tr, P.pixart_recipe("rtn")):
            pass
    tr.unfuse_qkv_projections()  # the fused copies stay, but are not called any more
    with P.quantized(tr, P.pixart_recipe("rtn")):
        pass


def test_compiled_is_refused(pipe):
    with pytest.raises(RuntimeError, match="compiled"):
        P.check_transformer(torch.compile(pipe.transformer))
    tr = copy.deepcopy(pipe.transformer)
    tr.transformer_blocks[0].compile()
    with pytest.raises(RuntimeError, match="compiled"):
        P.check_transformer(tr)


def test_lora_wrapper_is_refused(pipe):
    class LoraLinear(nn.Module):  # the shape of peft.tuners.lora.layer.Linear
        def __init__(self, base):
            super().__init__()
            self.base_layer = base
            self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, 2, bias=False)})
            self.lora_B = nn.ModuleDict({"default": nn.Linear(2, base.out_features, bias=False)})

        def forward(self, x):
            return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x))

    tr = copy.deepcopy(pipe.transformer)
    attn = tr.transformer_blocks[0].attn1
    attn.to_q = LoraLinear(attn.to_q)
    with pytest.raises(RuntimeError, match="LoRA"):
        P.check_transformer(tr)


def test_token_chunking_is_refused(pipe):
    tr = copy.deepcopy(pipe.transformer)
    tr.transformer_blocks[1].set_chunk_feed_forward(4, dim=1)
    with pytest.raises(RuntimeError, match="chunking"):
        P.check_transformer(tr)
    tr.transformer_blocks[1].set_chunk_feed_forward(1, dim=0)  # over the batch: the grid is intact
    P.check_transformer(tr)


def test_bad_latents_are_refused(pipe, prompts):
    kw = dict(encoder_hidden_states=prompts.embeds[:1], timestep=torch.tensor([10]), return_dict=False)
    with P.quantized(pipe.transformer, P.pixart_recipe("rtn", stamp=True)):
        with pytest.raises(ValueError, match="patch size 2"):
            pipe.transformer(torch.randn(1, 4, 9, 8), **kw)
    q = pipe.transformer.transformer_blocks[0].attn1.to_q
    with P.quantized(pipe.transformer, P.pixart_recipe("rtn", stamp=True)) as st:
        with pytest.raises(ValueError, match="no grid was set"):  # a layer called outside a transformer forward
            q(torch.randn(1, 16, 64))
        st.set_grid((3, 3))
        with pytest.raises(ValueError, match="token grid 3x3 has 9 tokens"):
            q(torch.randn(1, 16, 64))


def test_bad_recipes():
    with pytest.raises(ValueError, match="unknown method"):
        P.pixart_recipe("vidit-q")
    with pytest.raises(ValueError, match="low-rank"):
        P.pixart_recipe("svdquant", w_bits=None)


# ----------------------------------------------------------------------------- loading
def test_missing_checkpoint_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        P.load_pipeline("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS")
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        P.load_pipeline(str(tmp_path))


def test_saved_pipeline_loads_and_missing_weights_are_named(pipe, tmp_path):
    folder = tmp_path / "tiny"
    pipe.save_pretrained(folder)
    loaded = P.load_pipeline(str(folder), dtype="float32")
    assert isinstance(loaded.transformer, type(pipe.transformer))
    for f in (folder / "transformer").glob("diffusion_pytorch_model*"):
        f.unlink()
    with pytest.raises(FileNotFoundError, match="transformer"):
        P.load_pipeline(str(folder), dtype="float32")


class _Tok:
    def __init__(self, unk_everything):
        self.unk_everything = unk_everything
        self.unk_token_id, self.all_special_ids = 2, [0, 1, 2]

    def __call__(self, text):
        ids = [2 if self.unk_everything else 10 + i for i, _ in enumerate(text.split())] + [1]
        return type("Enc", (), {"input_ids": ids})()


def test_unk_tokenizer_is_refused():
    with pytest.raises(RuntimeError, match="unknown token"):
        P.check_tokenizer(_Tok(True))
    P.check_tokenizer(_Tok(False))


def test_prompt_file():
    texts = P.read_prompts(P.Path(__file__).resolve().parents[1] / "data" / "prompts" / "pixart_prompts.txt")
    assert len(texts) >= 64 and len(set(texts)) == len(texts)  # 60 evaluated, the last 4 calibrate


def test_half_precision_pipeline(prompts):
    """The GPU path runs in float16/bfloat16: latents are cast to the transformer's dtype and the
    fake quantization computes in float32 inside (bfloat16 here, on CPU)."""
    pipe = P.tiny_pipeline(seed=0, dtype=torch.bfloat16)
    lat = P.initial_latents(pipe, 0, 64, 64)
    with P.quantized(pipe.transformer, P.pixart_recipe("hadamard", hp_tokens=4, stamp=True)) as st:
        out, img = P.generate(pipe, prompts.take(0), lat, steps=STEPS)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(img.float()).all()) and st.average_bits() > 4


def _text_stack(words):
    """A real (tiny) T5 encoder and a word-level fast tokenizer over ``words``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: 3 + i for i, w in enumerate(words)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    enc = T5EncoderModel(T5Config(vocab_size=len(vocab), d_model=64, d_kv=16, d_ff=64, num_layers=1, num_heads=2))
    return tok, enc


def _save_with_text(tmp_path, words, name="with-text"):
    from diffusers import PixArtSigmaPipeline

    base = P.tiny_pipeline(seed=0)
    tok, enc = _text_stack(words)
    pipe = PixArtSigmaPipeline(tokenizer=tok, text_encoder=enc, vae=base.vae, transformer=base.transformer,
                               scheduler=base.scheduler)
    folder = tmp_path / name
    pipe.save_pretrained(folder)
    return folder


def test_cli_end_to_end(tmp_path):
    """`python -m stamp_lib pixart` on a saved tiny pipeline with a real tokenizer and T5 encoder:
    prompts read, encoded, calibration, the ten Figure 1 / Table 1 cells, a JSON file."""
    texts = [ln.split() for ln in ("a red apple on a table", "two dogs in a field", "a boat on a lake")]
    # a folder named as the paper's checkpoint: chapter 4 shows its results file (runbook.paper_runs)
    folder = _save_with_text(tmp_path, sorted({w for t in texts for w in t}), name="PixArt-Sigma-XL-2-1024-MS")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# test prompts\n" + "\n".join(" ".join(t) for t in texts) + "\n")
    out = P.main(["--model", str(folder), "--prompts", str(prompts), "--calib-prompts", "1", "--height", "64",
                  "--width", "64", "--steps", str(STEPS), "--hp-tokens", "4", "--rank", "4", "--dtype", "float32",
                  "--out", str(tmp_path / "res" / "r.json")])
    assert len(out["configs"]) == 12 and out["n_images"] == 2 and len(out["paired"]) == 5
    saved = json.loads((tmp_path / "res" / "r.json").read_text())
    assert saved["configs"]["A4 +both"]["act_bits"] > 4
    # the record says what ran: a 64 px image is a 4x4 latent grid, so 3 Haar levels are capped at 2
    assert saved["applied"]["grid"] == [4, 4] and saved["applied"]["levels"] == 2
    assert saved["applied"]["seeds"] == [0] and saved["applied"]["device"] == "cpu"
    assert saved["command"].startswith(f"python -m stamp_lib pixart --model {folder} ")
    assert "--seeds 1 " in saved["command"] and "--hadamard-seed 0 " in saved["command"]
    from stamp_lib.experiments import runbook

    runs = runbook.paper_runs("pixart", tmp_path / "res")
    assert runs.skipped == [] and [r["config"] for r in runs.rows] == list(saved["configs"])
    assert {r["model"] for r in runs.rows} == {"PixArt-Sigma"} and runs.rows[0]["images"] == 2
    header, rows = runbook.paper_table(runs)
    want = saved["configs"]["A4 +both"]
    assert ["PixArt-Sigma", "A4 +both", f"{want['sqnr_image_db']:.2f} ± {want['se_db']:.2f}",
            f"{want['act_bits']:.3f}", "2"] in rows


@pytest.mark.parametrize("argv, says", [
    (["--height", "72"], "--height 72: must be a multiple of 16 (VAE factor 8 x patch 2)"),
    (["--hp-tokens", "17"], "--hp-tokens 17: high-precision rows must be a whole number in [0, 16]"),
    (["--block-size", "48"], "--block-size 48: must divide the input widths"),
    (["--rank", "40"], "--rank 40: the low-rank branch must be a whole number in [0, 31]"),
    (["--calib-prompts", "3"], "--calib-prompts 3: leaves no evaluation prompt of the 3"),
])
def test_cli_refuses_bad_input_with_one_line(tmp_path, capsys, argv, says):
    """Arguments that depend on the checkpoint or the prompt file: exit 2, one line, nothing run."""
    texts = ["a red apple", "two dogs", "a boat"]
    folder = _save_with_text(tmp_path, sorted({w for t in texts for w in t.split()}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(texts) + "\n")
    base = ["--model", str(folder), "--prompts", str(prompts), "--calib-prompts", "1", "--height", "64", "--width",
            "64", "--steps", "1", "--hp-tokens", "4", "--rank", "4", "--dtype", "float32", "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        P.main(base + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "r.json").exists()


def test_unk_tokenizer_checkpoint_is_refused(tmp_path):
    folder = _save_with_text(tmp_path, [])  # a vocabulary without words: every word is <unk>
    with pytest.raises(RuntimeError, match="unknown token"):
        P.load_pipeline(str(folder), dtype="float32")
