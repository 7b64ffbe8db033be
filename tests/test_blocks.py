"""Shared building blocks behave as SPEC describes."""
import math

import pytest
import torch
import torch.nn.functional as F

from stages.blocks import (AttentionBlock, ConvNeXtBlock, GlobalResponseNorm, LayerNorm2d, MixingBlock,
                           TimestepBlock, channels_last, replicate_pad1,
                           timestep_embedding)
from stages.pixel_decoder import GrownUViT, pixel_decoder_config
from stages.stage_a import StageA


def test_layernorm2d_normalises_channels():
    x = torch.randn(2, 8, 5, 7) * 3 + 1
    y = LayerNorm2d(8, elementwise_affine=False)(x)
    assert torch.allclose(y.mean(1), torch.zeros(2, 5, 7), atol=1e-5)
    assert torch.allclose(y.var(1, unbiased=False), torch.ones(2, 5, 7), atol=1e-3)


def test_mixing_block_is_identity_at_init_and_learns():
    block = MixingBlock(16)
    x = torch.randn(2, 16, 9, 9)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.gammas.fill_(0.5)
    assert not torch.allclose(block(x), x)
    assert block(x).shape == x.shape


@pytest.mark.slow
def test_mixing_block_compiles_with_the_same_values_and_gradients():
    """Stage A under torch.compile (benchmarks --compile): replicate padding through inductor, forward and backward."""
    x = torch.randn(2, 4, 5, 6)
    assert torch.equal(replicate_pad1(x), F.pad(x, (1, 1, 1, 1), mode="replicate"))
    torch.manual_seed(0)
    block = MixingBlock(16)
    with torch.no_grad():
        block.gammas.normal_()
    x = torch.randn(2, 16, 12, 12, requires_grad=True)
    results = []
    for fn in (block, torch.compile(block, dynamic=False)):
        y = fn(x)
        y.square().mean().backward()
        results.append((y.detach(), x.grad, block.depthwise.weight.grad))
        x.grad, block.depthwise.weight.grad = None, None
    for eager, compiled in zip(*results):
        assert torch.allclose(eager, compiled, atol=1e-5, rtol=1e-4)


def test_channels_last_layout_is_internal():
    """Stage A and the pixel decoder compute in NHWC memory but hand back ordinary tensors."""
    from dataclasses import replace

    x = torch.randn(1, 3, 4, 5)
    y = channels_last(x)
    assert torch.equal(x, y) and y.permute(0, 2, 3, 1).is_contiguous()
    torch.manual_seed(0)
    stage_a = StageA("tiny")
    pixel = GrownUViT(replace(pixel_decoder_config("tiny"), target_resolution=128))
    images = torch.rand(2, 3, 32, 32)
    latents = stage_a.encode(images)
    outputs = [latents, stage_a.decode(latents), stage_a(images)[0],
               pixel(torch.randn(2, 3, 32, 32), torch.rand(2), torch.randn(2, 16, 2, 2))]
    assert all(t.is_contiguous() for t in outputs)


def test_convnext_block_with_skip():
    block = ConvNeXtBlock(16, c_skip=4)
    x, skip = torch.randn(2, 16, 6, 6), torch.randn(2, 4, 6, 6)
    assert block(x, skip).shape == x.shape
    # GRN starts at zero gamma/beta: identity on its input
    grn = GlobalResponseNorm(8)
    h = torch.randn(2, 3, 3, 8)
    assert torch.equal(grn(h), h)


def test_timestep_embedding_formula_and_block_identity():
    r = torch.tensor([0.0, 0.25, 1.0])
    emb = timestep_embedding(r, 64)
    half = 32
    exact = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / (half - 1))
    args = r.double()[:, None] * 10000 * exact
    assert torch.allclose(emb.double(), torch.cat([args.sin(), args.cos()], 1), atol=1e-3)  # float32 args up to 1e4
    released = torch.arange(half).float().mul(-math.log(10000) / (half - 1)).exp()  # the released gen_r_embedding
    args = (r * 10000)[:, None] * released[None]
    assert torch.equal(emb, torch.cat([args.sin(), args.cos()], 1))
    block = TimestepBlock(16)
    x = torch.randn(3, 16, 4, 4)
    assert torch.equal(block(x, emb), x)  # zero-initialised


def test_attention_block_self_and_cross():
    x, cond = torch.randn(2, 32, 4, 5), torch.randn(2, 7, 24)
    for self_attn in (True, False):
        blk = AttentionBlock(32, 24, nhead=4, self_attn=self_attn).eval()
        y = blk(x, cond)
        assert y.shape == x.shape and torch.isfinite(y).all()
    # the condition tokens matter
    blk = AttentionBlock(32, 24, nhead=4).eval()
    assert not torch.allclose(blk(x, cond), blk(x, torch.randn_like(cond)))
