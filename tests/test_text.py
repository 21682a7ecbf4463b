"""Wikipedia text: real English, deterministic disjoint split, exact non-overlapping token windows."""

import collections
import importlib.util
import re

import pytest
import torch

from stamp_lib.zoo import text


class WordTokenizer:
    """A stand-in tokenizer (one id per whitespace word) so the window logic is tested without a model."""

    eos_token_id = 0

    def __init__(self):
        self.vocab = {}

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        return {"input_ids": [[self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.split()] for t in texts]}


@pytest.fixture(scope="module")
def articles():
    return text.wiki_articles()


def test_articles_are_real_clean_english(articles):
    assert len(articles) >= 90
    titles = [t for t, _ in articles]
    assert len(set(titles)) == len(titles) and "Anarchism" in titles
    words = " ".join(x for _, x in articles).split()
    assert len(words) > 300_000
    top = [w for w, _ in collections.Counter(w.lower() for w in words).most_common(10)]
    assert {"the", "of", "and", "in"} <= set(top)
    body = "\n".join(x for _, x in articles)
    for junk in ("[[", "]]", "{{", "}}", "''", "<ref", "==", "|-", "thumb|"):
        assert body.count(junk) < 20, junk
    assert all(x.strip() == x and "\n\n" not in x and "  " not in x for _, x in articles)
    assert sum(c.isascii() for c in body) / len(body) > 0.99
    anarchism = dict(articles)["Anarchism"]
    assert anarchism.startswith("Anarchism is a political philosophy")
    assert "External links" not in anarchism.split("\n")


def test_clean_wiki_rules():
    raw = ("'''Foo''' is a ''bar'' , from the Greek ( ) word (; born 1900).\n\n"
           "==History==\nIt was built in 1900 by people.\n* a listed sentence with words\n*\n12\n"
           "==Empty==\n| x\n==References==\n* Some book, 1999, by someone\n===Sub===\nstill references text here\n"
           "==Later==\nBack to normal prose here.")
    assert text.clean_wiki(raw) == ("Foo is a bar, from the Greek word (born 1900).\nHistory\n"
                                    "It was built in 1900 by people.\n"
                                    "a listed sentence with words\nLater\nBack to normal prose here.")


def test_split_is_deterministic_disjoint_and_nested(articles):
    cal, ev = text.wiki_split(0.25)
    assert text.wiki_split(0.25) == (cal, ev)
    tc, te = {t for t, _ in cal}, {t for t, _ in ev}
    assert not tc & te and len(tc) + len(te) == len(articles) and abs(len(cal) - 0.25 * len(articles)) <= 1
    assert [t for t, _ in articles if t in tc] == [t for t, _ in cal]  # dump order kept
    cal2, _ = text.wiki_split(0.5)
    assert tc < {t for t, _ in cal2}
    for bad in (0, 1, -0.1, "0.5"):
        with pytest.raises(ValueError, match="calib_fraction"):
            text.wiki_split(bad)


def test_windows_are_consecutive_non_overlapping(articles):
    tok = WordTokenizer()
    arts = articles[:5]
    stream = text.token_stream(tok, arts, cache=False)
    lengths = [len(x.split()) for _, x in arts]
    assert len(stream) == sum(lengths) + len(arts) - 1
    assert int((stream == 0).sum()) == len(arts) - 1  # one EOS between articles, none at the ends
    assert int(stream[lengths[0]]) == 0 and int(stream[0]) != 0
    w = text.token_windows(tok, arts, 100, cache=False)
    assert w.dtype == torch.long and w.shape == (len(stream) // 100, 100)
    assert torch.equal(w.flatten(), stream[: w.numel()])  # consecutive, no overlap; the tail is dropped
    assert torch.equal(text.token_windows(tok, arts, 100, 3, cache=False), w[:3])
    with pytest.raises(ValueError, match="windows"):
        text.token_windows(tok, arts, 100, len(w) + 1, cache=False)
    with pytest.raises(ValueError, match="seq_len"):
        text.token_windows(tok, arts, 1, cache=False)
    with pytest.raises(TypeError):
        text.token_windows(tok, "one string", 10, cache=False)


class BosWordTokenizer(WordTokenizer):
    """Like Gemma: BOS (id -1 here) starts every text encoded with special tokens."""

    bos_token_id = -1

    def __call__(self, texts, add_special_tokens=False, verbose=False):
        one = isinstance(texts, str)
        out = super().__call__([texts] if one else texts)["input_ids"]
        out = [[-1] + x for x in out] if add_special_tokens else out
        return {"input_ids": out[0] if one else out}


def test_windows_start_with_bos_when_the_tokenizer_does(articles):
    arts = articles[:3]
    assert not text.adds_bos(WordTokenizer()) and text.adds_bos(BosWordTokenizer())
    tok = BosWordTokenizer()
    stream = text.token_stream(tok, arts, cache=False)
    w = text.token_windows(tok, arts, 50, cache=False)
    assert w.shape == (len(stream) // 49, 50) and bool((w[:, 0] == -1).all())
    assert torch.equal(w[:, 1:].flatten(), stream[: len(w) * 49])
    assert torch.equal(text.token_windows(tok, arts, 50, cache=False, bos=False),
                       text.token_windows(WordTokenizer(), arts, 50, cache=False))


def test_missing_gensim_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gensim" else real(name, *a))
    with pytest.raises(text.TextDataMissing, match=re.escape("pip install gensim==4.4.0")):
        text.wiki_path()


@pytest.mark.models
def test_real_tokenizer_windows_decode_to_the_articles():
    from transformers import AutoTokenizer

    from stamp_lib.zoo import models

    tok = AutoTokenizer.from_pretrained(models.gguf_checkpoint(models.smollm2_gguf_path(), "smollm2"))
    cal, ev = text.wiki_split()
    w = text.token_windows(tok, ev, 512)
    again = text.token_windows(tok, ev, 512)  # from the on-disk cache
    assert torch.equal(w, again) and len(w) > 100
    first = tok.decode(w[0])
    assert ev[0][1].startswith(first[:200])
    n_eos = int((text.token_stream(tok, ev) == tok.eos_token_id).sum())
    assert n_eos == len(ev) - 1
    cw = text.token_windows(tok, cal, 512)
    assert not (set(map(tuple, cw.tolist())) & set(map(tuple, w.tolist())))


# ----------------------------------------------------------------------------- WikiText-2
class LineTokenizer:
    """A stand-in for a tokenizer called on one long string, as the published evaluation calls it:
    one id per whitespace word, one id for a blank line, and BOS (id 1) first by default (as
    Llama-3's tokenizer does)."""

    def __init__(self):
        self.vocab = {}
        self.calls = 0

    def __call__(self, t, add_special_tokens=True, verbose=False):
        assert isinstance(t, str)
        self.calls += 1
        ids = [self.vocab.setdefault(w, len(self.vocab) + 2) for w in re.findall(r"\n\n|\S+", t)]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def _wikitext_like(articles, lo, hi):
    """Lines laid out as wikitext-2-raw-v1's: blank, " = Title = ", blank, then paragraphs."""
    out = []
    for title, body in articles[lo:hi]:
        out += ["", f" = {title} = \n", ""] + [f" {line} \n" for line in body.split("\n")]
    return out


@pytest.fixture(scope="module")
def wt2_lines(articles):
    return {"train": _wikitext_like(articles, 0, 4), "test": _wikitext_like(articles, 4, 6)}


def test_wikitext2_is_read_from_a_local_copy(wt2_lines, tmp_path):
    """A folder written by save_to_disk and one with the Hub repository's parquet files give the
    same lines, empty ones included."""
    import datasets

    dd = datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in wt2_lines.items()})
    dd.save_to_disk(tmp_path / "disk")
    assert text.wikitext2(tmp_path / "disk") == wt2_lines
    hub = tmp_path / "hub" / "wikitext-2-raw-v1"
    hub.mkdir(parents=True)
    for k, d in dd.items():
        d.to_parquet(hub / f"{k}-00000-of-00001.parquet")
    assert text.wikitext2(tmp_path / "hub", cache_dir=str(tmp_path / "cache")) == wt2_lines


def test_missing_wikitext2_says_how_to_get_it(tmp_path, monkeypatch):
    # offline (conftest) with an empty cache: nothing to read, one line with the command that fetches it
    with pytest.raises(text.TextDataMissing) as e:
        text.wikitext2(cache_dir=str(tmp_path / "empty"))
    msg = str(e.value)
    assert "\n" not in msg and "load_dataset('wikitext', 'wikitext-2-raw-v1')" in msg
    assert "HF_DATASETS_OFFLINE=1" in msg and "--dataset-path" in msg
    with pytest.raises(text.TextDataMissing, match="is not a folder"):
        text.wikitext2(tmp_path / "nothing-here")
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a b"]})}).save_to_disk(tmp_path / "half")
    with pytest.raises(text.TextDataMissing, match=r"lacks the split\(s\) \['test'\]"):
        text.wikitext2(tmp_path / "half")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # not installed
    with pytest.raises(text.TextDataMissing, match=re.escape("pip install datasets==5.2.0")):
        text.wikitext2(tmp_path / "half")


def test_wikitext2_windows_are_the_published_protocol(wt2_lines):
    """Evaluation: the lines joined by blank lines, tokenized once (one BOS), non-overlapping windows,
    tail dropped. Calibration: GPTQ's draw (random.seed(seed); randint(0, N - seqlen - 1) per
    window), written here as the reference code does it, on the global generator."""
    import random

    tok = LineTokenizer()
    ids = tok("\n\n".join(wt2_lines["test"]))["input_ids"]
    w = text.stream_windows(tok, wt2_lines["test"], 50, cache=False)
    n = len(ids) // 50
    assert w.shape == (n, 50) and n > 20 and torch.equal(w.flatten(), torch.tensor(ids[:n * 50]))
    assert int((w == 1).sum()) == 1 and w[0, 0] == 1  # BOS once, at the start of the stream
    assert torch.equal(text.stream_windows(tok, wt2_lines["test"], 50, 3, cache=False), w[:3])
    with pytest.raises(ValueError, match=f"{n} windows"):
        text.stream_windows(tok, wt2_lines["test"], 50, n + 1, cache=False)
    train = tok("\n\n".join(wt2_lines["train"]))["input_ids"]
    state = random.getstate()
    random.seed(3)
    ref = []
    for _ in range(5):
        i = random.randint(0, len(train) - 50 - 1)
        ref.append(train[i:i + 50])
    random.setstate(state)
    got = text.random_windows(tok, wt2_lines["train"], 50, 5, seed=3, cache=False)
    assert torch.equal(got, torch.tensor(ref))
    assert random.getstate() == state  # a private generator: the caller's random state is untouched
    assert not torch.equal(text.random_windows(tok, wt2_lines["train"], 50, 5, seed=4, cache=False), got)
    with pytest.raises(ValueError, match="fewer than one window"):
        text.random_windows(tok, ["a b c"], 50, 1, cache=False)


def test_eval_data_keeps_the_stand_in_as_default(wt2_lines, tmp_path):
    import datasets

    from stamp_lib.experiments import llm

    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in wt2_lines.items()}).save_to_disk(
        tmp_path / "w2")
    tok = LineTokenizer()
    ev, cal = llm.eval_data(tok, 40, None, 2, dataset="wikitext2", path=tmp_path / "w2", seed=1)
    assert torch.equal(ev, text.stream_windows(tok, wt2_lines["test"], 40, cache=False))
    assert torch.equal(cal, text.random_windows(tok, wt2_lines["train"], 40, 2, seed=1, cache=False))
    with pytest.raises(ValueError, match="unknown dataset"):
        llm.eval_data(tok, 40, 1, dataset="c4")
    with pytest.raises(ValueError, match="needs dataset='wikitext2'"):
        llm.eval_data(WordTokenizer(), 40, 1, path=tmp_path / "w2")
