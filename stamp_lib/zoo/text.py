"""Real English text for the LLM experiments: Wikipedia articles shipped inside gensim 4.4.0.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
(English Wikipedia dump of May 2016, the era of WikiText). Text from Wikipedia is licensed
CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/); authors: the Wikipedia
contributors of each article (page histories at https://en.wikipedia.org/wiki/<title>). We use it
only to compute perplexities and activation statistics; we redistribute none of it.

Contract
--------
* :func:`wiki_articles` -> list of ``(title, text)``: pages of namespace 0, redirects and
  disambiguation pages skipped, markup removed with ``gensim.corpora.wikicorpus.filter_wiki`` and
  then :func:`clean_wiki`. Deterministic (dump order), cached as JSON in ``cache_dir("text")``.
* :func:`wiki_split` -> ``(calib, eval)``: a split by article that never overlaps and does not
  depend on the machine: articles are ranked by sha256 of their title and the first
  ``round(calib_fraction * n)`` go to calibration. Each part keeps dump order.
* :func:`token_windows` -> LongTensor (n, seq_len): the articles are tokenized separately
  (no special tokens), joined into one stream with the tokenizer's EOS token between articles
  (``"\\n\\n"`` when it has none), and cut into consecutive non-overlapping windows; the tail
  shorter than a window is dropped. For tokenizers whose convention starts a text with BOS
  (Gemma) every window is BOS + ``seq_len - 1`` stream tokens. Perplexity over these windows
  scores every window on its own, with no context carried over from the previous window.

WikiText-2, the quantization papers' protocol (``python -m stamp_lib llm --dataset wikitext2``):

* :func:`wikitext2` -> ``{"train": [...], "test": [...]}``: the lines of ``wikitext-2-raw-v1``
  through the ``datasets`` package (``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``,
  read from the local cache when ``HF_DATASETS_OFFLINE=1``), or from a local copy: a folder written
  by ``DatasetDict.save_to_disk`` or one holding the Hub repository's parquet files (train/test,
  optionally under ``wikitext-2-raw-v1/``). Missing data raises :class:`TextDataMissing` whose one
  line says how to get it (:data:`WIKITEXT2_HINT`).
* :func:`stream_windows` -> LongTensor (n, seq_len): the texts joined with ``"\n\n"``, tokenized
  once as the tokenizer does by default (its BOS once at the start of the stream, for tokenizers
  that add one), cut into non-overlapping windows, the tail dropped: the evaluation of GPTQ's,
  QuaRot's and FlatQuant's ``get_wikitext2(..., eval_mode=True)`` / ``llama_eval``.
* :func:`random_windows` -> LongTensor (n, seq_len): calibration windows drawn as GPTQ's
  ``get_wikitext2`` draws them (QuaRot's and FlatQuant's copy it): the train split joined with
  ``"\n\n"`` and tokenized once, then ``random.seed(seed)`` and ``n`` times
  ``i = random.randint(0, N - seq_len - 1)``, the window ``ids[i:i + seq_len]`` (Python's
  ``random``, here a private ``random.Random(seed)``: the same draws, the global state untouched).
  GPTQ's own repository joins the train split with ``" "``; QuaRot and FlatQuant, whose numbers
  the paper compares with, join it with ``"\n\n"``: that is used here.
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import importlib.util
import io
import json
import os
import random
import re
from pathlib import Path

import torch

from ..core.io import atomic_write, cache_dir

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
GENSIM_PIN = "gensim==4.4.0"
DATASETS_PIN = "datasets==5.2.0"
WIKITEXT2 = ("wikitext", "wikitext-2-raw-v1")
WIKITEXT2_HINT = ("on a machine with network access run `python -c \"import datasets; "
                  "datasets.load_dataset('wikitext', 'wikitext-2-raw-v1')\"`, then copy its Hugging Face datasets "
                  "cache here (the folder HF_DATASETS_CACHE names, default ~/.cache/huggingface/datasets) and set "
                  "HF_DATASETS_OFFLINE=1; or save it with `.save_to_disk(DIR)` and pass --dataset-path DIR")
CLEAN_VERSION = 1  # bump when clean_wiki changes (invalidates the cached JSON)
MIN_LINE_WORDS = 4  # shorter non-heading lines are table cells, empty bullets, template junk
MIN_ARTICLE_WORDS = 100
DROP_SECTIONS = {"see also", "notes", "references", "external links", "further reading", "bibliography",
                 "sources", "footnotes", "citations", "works cited", "notes and references", "references and notes",
                 "primary sources", "secondary sources", "gallery", "discography", "filmography"}


class TextDataMissing(ImportError):
    """The package that ships the text is not installed; the message says how to install it."""


def wiki_path() -> Path:
    """Path of the bz2 Wikipedia dump inside the installed gensim (found without importing it)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or spec.origin is None:
        raise TextDataMissing(f"gensim is not installed; install it with: pip install {GENSIM_PIN}")
    p = Path(spec.origin).parent / "test" / "test_data" / WIKI_FILE
    if not p.is_file():
        raise TextDataMissing(f"{WIKI_FILE} not found in {p.parent}; install the pinned version: pip install {GENSIM_PIN}")
    return p


_HEADING = re.compile(r"^(={2,6})\s*(.*?)\s*\1$")


def clean_wiki(text: str) -> str:
    """Turn the output of ``filter_wiki`` into plain paragraphs, one per line.

    Removes bold/italic quote marks, bullet/indent markers, empty brackets left by removed
    templates, spaces before punctuation, reference-like sections (See also, Notes, References,
    External links, ...), lines of fewer than ``MIN_LINE_WORDS`` words (table cells, empty
    bullets) and headings whose section ends up empty. Headings become a line with their text.
    """
    lines, skip_level = [], None
    for raw in text.split("\n"):
        line = re.sub(r"'{2,}", "", raw).strip()
        m = _HEADING.match(line)
        if m:
            level, title = len(m.group(1)), m.group(2).strip()
            if skip_level is not None and level > skip_level:
                continue  # a sub-section of a dropped section
            skip_level = level if title.lower() in DROP_SECTIONS else None
            if skip_level is None and title:
                lines.append(("h", title))
            continue
        if skip_level is not None:
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)                  # list / indent markers
        line = re.sub(r"\(\s*[,;:]?\s*\)", "", line)             # "( )", "(, )" left by templates
        line = re.sub(r"\(\s*[,;:]\s*", "(", line)               # "(; born ..." -> "(born ..."
        line = re.sub(r"[ \t\u00a0]+", " ", line)
        line = re.sub(r" +([,.;:!?)])", r"\1", line).strip()     # "Greek , i.e." -> "Greek, i.e."
        if len(line.split()) >= MIN_LINE_WORDS:
            lines.append(("p", line))
    # keep a heading only if some paragraph follows it before the next heading
    out = [t for i, (k, t) in enumerate(lines) if k == "p" or (i + 1 < len(lines) and lines[i + 1][0] == "p")]
    return "\n".join(out)


@functools.lru_cache(maxsize=1)
def _articles() -> tuple[tuple[str, str], ...]:
    src = wiki_path()
    with open(src, "rb") as f:
        src_sha = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = cache_dir("text") / f"wiki-{src_sha}-clean{CLEAN_VERSION}.json"
    try:
        return tuple((t, x) for t, x in json.loads(cache.read_text()))
    except (OSError, ValueError):
        pass
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    out = []
    with bz2.open(src, "rb") as f:
        for title, raw, _ in extract_pages(f, filter_namespaces=("0",)):
            if raw.lstrip().lower().startswith("#redirect") or "(disambiguation)" in title:
                continue
            text = clean_wiki(filter_wiki(raw))
            if len(text.split()) >= MIN_ARTICLE_WORDS:
                out.append((title, text))
    atomic_write(cache, json.dumps(out))
    return tuple(out)


def wiki_articles() -> list[tuple[str, str]]:
    """All cleaned articles as ``(title, text)`` in dump order (Wikipedia, CC BY-SA 3.0)."""
    return list(_articles())


def _title_rank(title: str) -> str:
    return hashlib.sha256(title.encode("utf-8")).hexdigest()


def wiki_split(calib_fraction: float = 0.25) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """``(calibration, evaluation)`` articles: disjoint, deterministic, by sha256 rank of the title.

    A larger ``calib_fraction`` only moves articles from evaluation to calibration (nested splits)."""
    if not isinstance(calib_fraction, (int, float)) or not 0.0 < calib_fraction < 1.0:
        raise ValueError(f"calib_fraction must be in (0, 1), got {calib_fraction!r}")
    arts = wiki_articles()
    n_cal = min(max(round(calib_fraction * len(arts)), 1), len(arts) - 1)
    calib_titles = set(sorted((a[0] for a in arts), key=_title_rank)[:n_cal])
    return [a for a in arts if a[0] in calib_titles], [a for a in arts if a[0] not in calib_titles]


def _texts(articles) -> list[str]:
    if isinstance(articles, str):
        raise TypeError("articles must be a list of (title, text) pairs or of strings, not one string")
    texts = [a[1] if isinstance(a, (tuple, list)) else a for a in articles]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError("articles must be a non-empty list of (title, text) pairs or of strings")
    return texts


def _tokenizer_fingerprint(tokenizer) -> str | None:
    """Hash of a fast tokenizer's full definition (vocab, merges, normalizer); None for others."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()[:16]


def token_stream(tokenizer, articles, cache: bool = True) -> torch.Tensor:
    """1-D LongTensor: every article tokenized without special tokens, EOS between articles.

    Cached in ``cache_dir("text")`` keyed by a hash of the tokenizer definition and of the
    texts (fast Hugging Face tokenizers only; others are never cached)."""
    texts = _texts(articles)
    eos = getattr(tokenizer, "eos_token_id", None)
    sep = [eos] if eos is not None else tokenizer("\n\n", add_special_tokens=False)["input_ids"]

    def tokenize():
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        stream = []
        for i, x in enumerate(ids):
            stream.extend(x if i == 0 else sep + x)
        return torch.tensor(stream, dtype=torch.long)

    return _cached_ids(tokenizer, texts, "tokens", tokenize, cache)


def _cached_ids(tokenizer, texts: list[str], kind: str, compute, cache: bool = True) -> torch.Tensor:
    """``compute()`` (a 1-D LongTensor of token ids), kept in ``cache_dir("text")`` as
    ``<kind>-<tokenizer hash>-<texts hash>.pt`` (int32) for fast tokenizers, read back next time."""
    fp = _tokenizer_fingerprint(tokenizer) if cache else None
    if fp is None:
        return compute()
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8") + b"\0")
    path = cache_dir("text") / f"{kind}-{fp}-{h.hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            return torch.load(path).long()
        except Exception:  # a partial file: rebuild below
            pass
    out = compute()
    buf = io.BytesIO()
    torch.save(out.to(torch.int32), buf)
    atomic_write(path, buf.getvalue())
    return out


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer's own convention starts every text with its BOS token (Gemma,
    LLaMA-3); SmolLM2 does not. Such models need BOS at position 0 (Gemma-3-270M: perplexity
    about 4x higher without it), so :func:`token_windows` then starts every window with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _cut(stream: torch.Tensor, body: int, n_windows: int | None, seq_len: int, more: str = "") -> torch.Tensor:
    """The first ``n_windows`` (``None``: all) consecutive pieces of ``body`` tokens of ``stream``,
    (n, body), a view; the tail dropped. ``ValueError`` naming the count and the fix otherwise."""
    n_avail = len(stream) // body
    if n_windows is None:
        n_windows = n_avail
    if not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int or None, got {n_windows!r}")
    if n_windows > n_avail:
        raise ValueError(f"asked for {n_windows} windows of {seq_len} tokens but the text has {len(stream)} tokens "
                         f"({n_avail} windows); use fewer/shorter windows{more}")
    return stream[: n_windows * body].view(n_windows, body)


def token_windows(tokenizer, articles, seq_len: int, n_windows: int | None = None, cache: bool = True,
                  bos: bool | None = None) -> torch.Tensor:
    """LongTensor (n, seq_len) of consecutive non-overlapping windows over :func:`token_stream`.

    With ``bos`` (default: :func:`adds_bos`) each window is the BOS token followed by the next
    ``seq_len - 1`` stream tokens. The tail shorter than a window is dropped; ``n_windows`` keeps
    the first ``n_windows`` windows (an error if fewer exist)."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    bos = adds_bos(tokenizer) if bos is None else bool(bos)
    body = seq_len - 1 if bos else seq_len
    w = _cut(token_stream(tokenizer, articles, cache=cache), body, n_windows, seq_len, " or more articles")
    n_windows = w.shape[0]
    if bos:
        w = torch.cat([torch.full((n_windows, 1), tokenizer.bos_token_id, dtype=torch.long), w], 1)
    return w.clone()


# ----------------------------------------------------------------------------- WikiText-2
def wikitext2(path: str | os.PathLike | None = None, *, cache_dir: str | None = None) -> dict[str, list[str]]:
    """The lines of WikiText-2 (``wikitext-2-raw-v1``): ``{"train": [...], "test": [...]}`` (and
    ``"validation"`` where present), as the ``datasets`` package gives them (empty lines included).

    ``path=None``: ``datasets.load_dataset("wikitext", "wikitext-2-raw-v1")``: from the local
    Hugging Face datasets cache (``HF_DATASETS_OFFLINE=1``), else downloaded. ``path``: a local
    copy, a folder written by ``DatasetDict.save_to_disk`` or one holding the Hub repository's
    files (``train-*.parquet``, ``test-*.parquet``, possibly under ``wikitext-2-raw-v1/``; read with
    ``datasets.load_dataset(folder)``, which converts them once into ``cache_dir``). Raises
    :class:`TextDataMissing` (one line: what is missing and how to get it)."""
    try:
        import datasets
    except ImportError:
        raise TextDataMissing(f"the datasets package is not installed; install it with: pip install {DATASETS_PIN}") \
            from None
    if path is None:
        try:
            dd = datasets.load_dataset(*WIKITEXT2, cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - offline, not cached, no network: all one answer
            why = " ".join(str(e).split())[:160]
            raise TextDataMissing(f"WikiText-2 ({WIKITEXT2[1]}) could not be loaded through the datasets package "
                                  f"({type(e).__name__}: {why}); {WIKITEXT2_HINT}") from None
    else:
        p = Path(path).expanduser()
        if not p.is_dir():
            raise TextDataMissing(f"{p} is not a folder; {WIKITEXT2_HINT}")
        try:
            if (p / "dataset_dict.json").is_file():
                dd = datasets.load_from_disk(str(p))
            else:
                sub = p / WIKITEXT2[1]
                dd = datasets.load_dataset(str(sub if sub.is_dir() else p), cache_dir=cache_dir)
        except Exception as e:  # noqa: BLE001 - an unreadable folder: one answer
            why = " ".join(str(e).split())[:160]
            raise TextDataMissing(f"{p} holds no readable copy of WikiText-2 ({type(e).__name__}: {why}); "
                                  f"{WIKITEXT2_HINT}") from None
    out = {}
    for split in ("train", "validation", "test"):
        if split in dd:
            if "text" not in dd[split].column_names:
                raise TextDataMissing(f"the {split} split has no 'text' column (columns: {dd[split].column_names}); "
                                      f"{WIKITEXT2_HINT}")
            out[split] = list(dd[split]["text"])
    missing = [s for s in ("train", "test") if s not in out]
    if missing:
        raise TextDataMissing(f"the copy of WikiText-2 lacks the split(s) {missing} (it has {sorted(out)}); "
                              f"{WIKITEXT2_HINT}")
    return out


def joined_ids(tokenizer, texts: list[str], cache: bool = True) -> torch.Tensor:
    """1-D LongTensor: ``"\n\n".join(texts)`` tokenized once, with the tokenizer's default special
    tokens (BOS once at the start for tokenizers that add one), as the published evaluation does.
    Cached like :func:`token_stream` (fast tokenizers only)."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise TypeError("texts must be a list of strings (the lines of a split)")
    texts = list(texts)

    def tokenize():
        return torch.tensor(tokenizer("\n\n".join(texts), verbose=False)["input_ids"], dtype=torch.long)

    return _cached_ids(tokenizer, texts, "joined", tokenize, cache)


def stream_windows(tokenizer, texts: list[str], seq_len: int, n_windows: int | None = None,
                   cache: bool = True) -> torch.Tensor:
    """LongTensor (n, seq_len): consecutive non-overlapping windows of :func:`joined_ids`, the tail
    shorter than a window dropped (the evaluation protocol of GPTQ, QuaRot and FlatQuant).
    ``n_windows``: the first ``n_windows`` (an error if fewer exist); ``None``: all of them."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    return _cut(joined_ids(tokenizer, texts, cache), seq_len, n_windows, seq_len).clone()


def random_windows(tokenizer, texts: list[str], seq_len: int, n_windows: int, seed: int = 0,
                   cache: bool = True) -> torch.Tensor:
    """LongTensor (n, seq_len): ``n_windows`` calibration windows drawn as GPTQ's ``get_wikitext2``
    draws them (module docstring): start ``i = randint(0, N - seq_len - 1)`` of ``random.Random(seed)``,
    once per window, over :func:`joined_ids` (N tokens). Windows may overlap, as there."""
    if not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len must be an int >= 2, got {seq_len!r}")
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"n_windows must be a positive int, got {n_windows!r}")
    ids = joined_ids(tokenizer, texts, cache)
    if len(ids) < seq_len + 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len} plus one; use shorter windows")
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seq_len - 1) for _ in range(n_windows)]
    return torch.stack([ids[i:i + seq_len] for i in starts])
