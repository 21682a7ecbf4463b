"""The model layer: STaMP on linear inputs via hooks, weight RTN; equivalence with plain models."""

import pytest
import torch
from torch import nn

from stamp_lib import quant, transforms, wrap


class Toy(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.up = nn.Linear(d, 32)
        self.act = nn.GELU()
        self.down = nn.Linear(32, d)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return Toy().double()


def test_bits_none_is_exactly_the_plain_model(toy):
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    ref = toy(x)
    for t in ["identity", "dct", "wht", "dwt"]:
        with wrap.stamp_inputs(toy, "*", wrap.ActQuant(transform=t, bits=None)):
            out = toy(x)
        assert torch.allclose(out, ref, atol=1e-12), t


def test_sixteen_bits_identity_close_to_plain(toy):
    x = torch.randn(2, 64, 16, dtype=torch.float64)
    with wrap.stamp_inputs(toy, "*", wrap.ActQuant(bits=16)):
        out = toy(x)
    assert torch.allclose(out, toy(x), atol=1e-3)


def test_hook_equals_manual_stamp_and_is_removed(toy):
    x = torch.randn(3, 64, 16, dtype=torch.float64)
    T = transforms.build("dwt", levels=3)
    b = quant.two_level_bits(64, 8, 8, 4)
    cfg = wrap.ActQuant(transform=T, bits=lambda s: b)
    with wrap.stamp_inputs(toy, "up", cfg) as mods:
        assert list(mods) == ["up"]
        out = toy(x)
    manual = toy.down(toy.act(toy.up(quant.stamp_fake_quant(x, T, b))))
    assert torch.allclose(out, manual, atol=1e-12)
    assert not toy.up._forward_pre_hooks and not toy.down._forward_pre_hooks
    assert not torch.allclose(toy(x), out)  # quantization really changed something


def test_two_level_spec_and_block_tokens(toy):
    x = torch.randn(1, 64, 16, dtype=torch.float64)
    cfg = wrap.ActQuant(transform="dct", bits="8x8+4", block_tokens=16)
    seen = {}
    with wrap.stamp_inputs(toy, "up", cfg, on_apply=lambda n, a, b: seen.update({n: (a, b)})):
        toy(x)
    a, b = seen["up"]
    # each block of 16 tokens is handled on its own: changing a later block leaves earlier ones
    x2 = x.clone()
    x2[:, 40:] += 5.0
    with wrap.stamp_inputs(toy, "up", cfg, on_apply=lambda n, a, b: seen.update({n: (a, b)})):
        toy(x2)
    assert torch.equal(seen["up"][1][:, :32], b[:, :32])
    with pytest.raises(ValueError, match="multiple of block_tokens"):
        with wrap.stamp_inputs(toy, "up", wrap.ActQuant(bits=4, block_tokens=10)):
            toy(x)


def test_feature_transform_roundtrip(toy):
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    R = wrap.random_hadamard(16, dtype=torch.float64)
    assert torch.allclose(R @ R.T, torch.eye(16, dtype=torch.float64), atol=1e-12)
    with wrap.stamp_inputs(toy, "up", wrap.ActQuant(bits=None, feature_transform=R)):
        out = toy(x)
    assert torch.allclose(out, toy(x), atol=1e-12)


def test_quantized_weights_restored_bitwise(toy):
    W = toy.up.weight.detach().clone()
    with wrap.quantized_weights(toy, "*", bits=4):
        assert not torch.equal(toy.up.weight, W)
        assert torch.unique(toy.up.weight[0]).numel() <= 15
    assert torch.equal(toy.up.weight, W)


def test_pattern_matching_nothing_is_an_error(toy):
    with pytest.raises(ValueError, match="matches no"):
        with wrap.stamp_inputs(toy, "*.q_proj", wrap.ActQuant()):
            pass


@pytest.mark.models
def test_smollm2_unchanged_when_quantization_off():
    from stamp_lib import models

    model, tok = models.load_smollm2()
    ids = tok("The quick brown fox jumps over the lazy dog. " * 4, return_tensors="pt").input_ids[:, :32]
    with torch.no_grad():
        ref = model(ids).logits
        with wrap.stamp_inputs(model, "model.layers.*", wrap.ActQuant(transform="dwt", bits=None)):
            off = model(ids).logits
        with wrap.stamp_inputs(model, "model.layers.*", wrap.ActQuant(transform="dwt", levels=3, bits=4)):
            on = model(ids).logits
    assert torch.allclose(off, ref, atol=1e-3)
    assert not torch.allclose(on, ref, atol=1e-2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref)  # hooks gone
