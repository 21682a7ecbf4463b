"""Causality of STaMP in prefill (stamp_lib.experiments.causality) on tiny random decoders (float64):
per-token quantization leaks nothing, a Haar DWT with L levels leaks only inside the 2^L-token
block of the changed token, the DCT leaks to the start of the window; prefix-only scoring equals
one-pass scoring wherever the computation is causal."""

from __future__ import annotations

import pytest
import torch
from test_quarot import tiny

from stamp_lib.experiments import causality as C
from stamp_lib.experiments import llm
from stamp_lib.model import recipe as rcp

pytestmark = pytest.mark.usefixtures("one_thread")

S = 32
WINDOW = torch.randint(0, 128, (1, S), generator=torch.Generator().manual_seed(3))
KW = dict(seq_len=S, hp_tokens=4, levels=2)  # Haar blocks of 2^2 = 4 tokens


def _recipe(stamp):
    return llm.llm_recipe("rtn", stamp=stamp, **KW)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_per_token_quantization_leaks_nothing_and_the_dwt_only_inside_its_block(arch):
    m = tiny(arch)
    j = 13  # block 12..15: positions 12 may move, 0..11 may not
    base = C.leak(m, WINDOW, j, _recipe("none"))
    assert float(base.max()) <= 1e-12  # per-token ranges, causal attention: bit for bit
    sig = C.leak_signature(C.leak(m, WINDOW, j, _recipe("dwt")), j, block=4, tol=1e-9)
    assert sig["block_start"] == 12 and sig["moved_before_block"] == 0 and sig["moved_in_block"] == 1
    dct = C.leak_signature(C.leak(m, WINDOW, j, _recipe("dct")), j, block=None, tol=1e-9)
    assert dct["first_moved"] is not None and dct["first_moved"] < 4  # the whole window mixes
    fp = C.leak(m, WINDOW, j)
    assert float(fp.max()) <= 1e-12


def test_prefix_scoring_equals_one_pass_where_the_computation_is_causal():
    m = tiny("llama")
    pos = C.positions_to_score(S, 6, seed=1)
    assert len(set(pos)) == 6 and all(1 <= p <= S - 2 for p in pos)
    for r in (None, _recipe("none")):
        prep = None if r is None else rcp.prepare(m, r, progress=False)
        one = C.onepass_nll(m, WINDOW, pos, r, prep)
        pre, secs = C.causal_nll(m, WINDOW, pos, r, prep)
        torch.testing.assert_close(pre, one, rtol=1e-9, atol=1e-9)
        assert secs > 0
    # with the DWT the prefix changes the transform: the two scorings differ somewhere
    r = _recipe("dwt")
    prep = rcp.prepare(m, r, progress=False)
    assert float((C.causal_nll(m, WINDOW, pos, r, prep)[0] - C.onepass_nll(m, WINDOW, pos, r, prep)).abs().max()) > 1e-6
    # the plain Hugging Face forward gives the same one-pass NLL as the scorer
    with torch.no_grad():
        logits = m(WINDOW).logits[0]
    ref = torch.tensor([float(torch.nn.functional.cross_entropy(logits[p], WINDOW[0, p + 1])) for p in pos],
                       dtype=torch.float64)
    torch.testing.assert_close(C.onepass_nll(m, WINDOW, pos), ref)


def test_errors_name_the_problem():
    m = tiny("llama")
    with pytest.raises(ValueError, match="j must be a position"):
        C.leak(m, WINDOW, 0)
    with pytest.raises(ValueError, match="replacement token equals"):
        C.leak(m, WINDOW, 3, replacement=int(WINDOW[0, 3]))
    with pytest.raises(ValueError, match="LongTensor"):
        C.onepass_nll(m, WINDOW.double(), [1])
    with pytest.raises(ValueError, match="no next token"):
        C.causal_nll(m, WINDOW, [S - 1])
    with pytest.raises(ValueError, match="cannot draw"):
        C.positions_to_score(S, S)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_cached_decoding_equals_one_pass_where_causal_and_stamp_reaches_it_only_through_the_cache(arch):
    m = tiny(arch)
    prompt = 20
    pos = list(range(prompt - 1, S - 1))
    for r in (None, _recipe("none")):
        prep = None if r is None else rcp.prepare(m, r, progress=False)
        torch.testing.assert_close(C.decode_nll(m, WINDOW, prompt, r, prep), C.onepass_nll(m, WINDOW, pos, r, prep),
                                   rtol=1e-9, atol=1e-9)
    # one-token steps: the DWT cannot act on them; they differ from the bit-matched recipe only
    # through the keys and values the prefill left in the cache
    r_none, r_dwt = _recipe("none"), _recipe("dwt")
    prep = rcp.prepare(m, r_none, progress=False)
    d_none = C.decode_nll(m, WINDOW, prompt, r_none, prep)
    d_dwt = C.decode_nll(m, WINDOW, prompt, r_dwt, prep)
    assert float((d_dwt - d_none).abs().max()) > 1e-9  # the cache differs
    # a one-token prompt: nothing to mix at prefill, every step is one token: identical
    torch.testing.assert_close(C.decode_nll(m, WINDOW, 1, r_dwt, prep), C.decode_nll(m, WINDOW, 1, r_none, prep),
                               rtol=0, atol=1e-12)


def test_decode_refuses_a_prompt_outside_the_window():
    m = tiny("llama")
    for bad in (0, S):
        with pytest.raises(ValueError, match="prompt must be in"):
            C.decode_nll(m, WINDOW, bad)
