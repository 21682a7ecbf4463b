"""The overhead count (stamp_lib.experiments.overhead) against independent references: the linear
FLOPs of a block against torch's own FLOP counter on a real forward, the input groups against the
shared inputs that the capture layer finds by running the model, the Haar count against the
number of pair operations its levels do."""

from __future__ import annotations

import math

import pytest
import torch
from test_quarot import tiny
from torch.utils.flop_counter import FlopCounterMode

from stamp_lib.experiments import overhead as O
from stamp_lib.experiments import pixart
from stamp_lib.model import capture

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear_flops_counted(fn) -> float:
    """FLOPs of the mm/addmm calls (the linear layers) of ``fn()`` as torch counts them."""
    with FlopCounterMode(display=False) as fc:
        fn()
    per_op = fc.get_flop_counts()["Global"]
    return float(sum(v for k, v in per_op.items() if str(k).split(".")[-1] in ("mm", "addmm")))


def test_llama_block_flops_and_groups_match_a_real_forward():
    m = tiny("llama")
    s = 16
    ids = torch.randint(0, 128, (1, s), generator=torch.Generator().manual_seed(0))
    block = m.model.layers[0]
    lin = O.block_linears(block)
    names = {x.name for x in lin}
    assert names == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    # torch's flop counter over the whole model, minus lm_head, over the layers
    with torch.no_grad():
        total = _linear_flops_counted(lambda: m(ids))
    head = 2.0 * s * m.lm_head.in_features * m.lm_head.out_features
    per_block = (total - head) / len(m.model.layers)
    assert O.flops_overhead(lin, s)["linear_flops"] == pytest.approx(per_block, rel=1e-12)
    # the groups are the inputs the capture layer finds shared when the model runs
    cap = capture.capture_inputs(m, ids, "model.layers.0.*", keep=False, progress=False)
    groups: dict[str, set] = {}
    for x in lin:
        groups.setdefault(x.group, set()).add(x.name)
    found: dict[str, set] = {}
    for n in cap.names:
        found.setdefault(cap.canonical(n), set()).add(n.removeprefix("model.layers.0."))
    assert sorted(map(sorted, groups.values())) == sorted(map(sorted, found.values()))


def test_pixart_block_leaves_out_the_text_inputs_and_groups_self_attention():
    tr = pixart.tiny_pipeline().transformer
    lin = O.block_linears(tr.transformer_blocks[0])
    names = {x.name for x in lin}
    assert not {"attn2.to_k", "attn2.to_v"} & names  # text tokens: not transformed
    roles = pixart.roles(tr)
    assert all(roles[f"transformer_blocks.0.{n}"] == "image" for n in names)
    assert {x.name for x in lin if x.group == "attn1 q/k/v"} == {"attn1.to_q", "attn1.to_k", "attn1.to_v"}


@pytest.mark.parametrize("s, levels", [(8, 1), (64, 3), (2048, 3), (256, 8)])
def test_haar_flops_count_the_pairs_of_every_level(s, levels):
    d = 5
    rows, pairs = s, 0
    for _ in range(levels):  # each level: rows/2 pairs, 4 operations per pair and column
        pairs += rows // 2
        rows //= 2
    assert O.transform_flops("dwt", s, d, levels=levels) == 4 * pairs * d
    assert O.transform_flops("dwt", s, d, levels=levels) == pytest.approx(4 * s * d * (1 - 2.0 ** -levels))
    # 2-D: a row pass and a column pass per level on a grid shrinking 4x a level
    h = int(math.isqrt(s))
    if h * h == s:
        grid_pairs, n = 0, s
        for _ in range(min(levels, int(math.log2(h)))):
            grid_pairs += 2 * (n // 2)
            n //= 4
        lv = min(levels, int(math.log2(h)))
        assert O.transform_flops("dwt", s, d, levels=lv, grid=(h, h)) == 4 * grid_pairs * d


def test_paper_shapes_and_bad_input():
    llama = O.block_linears(O.SHAPES["Llama-3-8B"]["block"]())
    assert {(x.name, x.d_in, x.d_out) for x in llama} >= {("mlp.down_proj", 14336, 4096),
                                                         ("self_attn.k_proj", 4096, 1024)}
    r = O.flops_overhead(llama, 2048, "dwt", levels=3)
    assert 0 < r["ratio"] < 0.01 and r["transform_flops"] > 0
    with pytest.raises(ValueError, match="unknown transform"):
        O.transform_flops("fft", 8, 4)
    with pytest.raises(ValueError, match="does not hold"):
        O.transform_flops("dwt", 8, 4, grid=(2, 2))
    with pytest.raises(ValueError, match="no nn.Linear"):
        O.block_linears(torch.nn.ReLU())


def test_time_overhead_times_both_sides():
    lin = O.block_linears(tiny("llama").model.layers[0])
    t = O.time_overhead(lin, 32, "dwt", levels=2, repeats=2)
    assert t["matmul_s"] > 0 and t["transform_s"] > 0 and t["ratio"] == t["transform_s"] / t["matmul_s"]
