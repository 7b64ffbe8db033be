"""Stable Cascade (v3) Stage C and Stage B: presets, and forward parity with diffusers' ``StableCascadeUNet``
on random weights (non-square grids, batch 2), both layouts' conversions bit-exact both ways."""
import pytest
import torch

from weights.convert_cascade import config_from_release, diffusers_config, from_release, to_release
from stages.stable_cascade import CascadeConfig, StageB3, StageC3

diffusers = pytest.importorskip("diffusers", minversion="0.27")  # StableCascadeUNet arrived in 0.27
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet  # noqa: E402

# small versions of the release's layouts: Stage C's one-resolution levels, Stage B's four strided ones
C_CONFIG = CascadeConfig(widths=(32, 32), heads=(2, 2), blocks_down=(1, 2), blocks_up=(2, 1), c_cond=24, c_text=20,
                         c_pooled=12, c_image=10, dropout=(0.0, 0.0))
B_CONFIG = CascadeConfig(widths=(8, 16, 24, 32), heads=(0, 0, 2, 4), blocks_down=(1, 1, 2, 1), blocks_up=(1, 2, 1, 1),
                         repeats_down=(1, 1, 1, 1), repeats_up=(2, 1, 3, 2), resample="strided", c_latent=4,
                         patch_size=2, c_cond=16, t_conds=("sca",), c_text=None, c_pooled=12, c_image=None,
                         c_semantic=16, c_pixels=3, dropout=(0.0, 0.0, 0.0, 0.0))


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random (the zero-initialised head and timestep mappers too), so every path counts."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model.eval()


def diffusers_twin(model) -> StableCascadeUNet:
    config = {k: v for k, v in diffusers_config(model.config).items() if not k.startswith("_")}
    twin = StableCascadeUNet(**config).eval()
    twin.load_state_dict(to_release(model, "diffusers"))
    return twin


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rel * b.abs().max())


def test_stage_c_forward_equals_diffusers():
    model = randomised(StageC3(C_CONFIG))
    twin = diffusers_twin(model)
    x, r = torch.randn(2, 16, 6, 10), torch.rand(2)
    text, pooled, image = torch.randn(2, 7, 20), torch.randn(2, 1, 12), torch.randn(2, 1, 10)
    with torch.no_grad():
        ours = model(x, r, text, pooled, image)
        theirs = twin(x, r, clip_text_pooled=pooled, clip_text=text, clip_img=image).sample
        zeros_image = twin(x, r, clip_text_pooled=pooled, clip_text=text, clip_img=torch.zeros_like(image)).sample
        assert close(ours, theirs)
        assert close(model(x, r, text, pooled), zeros_image)  # no image embedding = the release's zeros
    assert ours.shape == x.shape and not close(ours, zeros_image)


def test_stage_b_forward_equals_diffusers():
    model = randomised(StageB3(B_CONFIG))
    twin = diffusers_twin(model)
    x, r = torch.randn(2, 4, 16, 32), torch.rand(2)
    semantic, pooled = torch.randn(2, 16, 3, 5), torch.randn(2, 1, 12)
    with torch.no_grad():
        ours = model(x, r, semantic, pooled)
        theirs = twin(x, r, clip_text_pooled=pooled, effnet=semantic).sample
        pixels = torch.randn(2, 3, 8, 8)
        assert close(model(x, r, semantic, pooled, pixels), twin(x, r, clip_text_pooled=pooled, effnet=semantic,
                                                                   pixels=pixels).sample)
    assert ours.shape == x.shape and close(ours, theirs)


@pytest.mark.parametrize("layout", ["stablecascade", "diffusers"])
@pytest.mark.parametrize("network,config", [(StageC3, C_CONFIG), (StageB3, B_CONFIG)])
def test_conversion_round_trips_bit_exact(network, config, layout):
    model = randomised(network(config))
    exported = to_release(model, layout)
    assert config_from_release(exported, {"num_attention_heads": list(config.heads),
                                          "dropout": list(config.dropout)}) == config
    back = from_release(exported)
    own = model.state_dict()
    assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own)
    again = to_release(network(config_from_release(exported, {"num_attention_heads": list(config.heads)}))
                       .requires_grad_(False), layout)
    assert set(again) == set(exported)


def test_release_layout_attention_is_one_multihead_attention():
    """The repository's checkpoints hold nn.MultiheadAttention's joint in_proj: q, k, v stacked in that order."""
    model = randomised(StageC3(C_CONFIG))
    release = to_release(model, "stablecascade")
    key = "down_blocks.0.2.attention.attn.in_proj_weight"
    assert release[key].shape == (96, 32) and "clip_txt_pooled_mapper.weight" in release
    attention = torch.nn.MultiheadAttention(32, 2, batch_first=True)
    attention.load_state_dict({"in_proj_weight": release[key], "in_proj_bias": release[key.replace("weight", "bias")],
                               "out_proj.weight": release["down_blocks.0.2.attention.attn.out_proj.weight"],
                               "out_proj.bias": release["down_blocks.0.2.attention.attn.out_proj.bias"]})
    q, kv = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    block = model.down_blocks[0][2]
    with torch.no_grad():
        ours = block.attend(torch.zeros(2, 32, 1, 5), q, kv).flatten(2).transpose(1, 2)
        assert torch.allclose(ours, attention(q, kv, kv, need_weights=False)[0], atol=1e-5)
    b_release = to_release(randomised(StageB3(B_CONFIG)), "stablecascade")
    assert "clip_mapper.weight" in b_release and "clip_txt_pooled_mapper.weight" not in b_release


def test_tiny_presets_are_identity_at_init_and_take_their_conditions():
    c = StageC3("tiny").eval()
    x = torch.randn(2, 16, 3, 5)
    out = c(x, torch.rand(2), torch.randn(2, 77, 384), torch.randn(2, 384))
    assert out.shape == x.shape and out.abs().max() == 0  # zero-initialised head: predicts eps = 0
    b = StageB3("tiny").eval()
    y = torch.randn(2, 4, 16, 24)
    assert b(y, torch.rand(2), torch.randn(2, 16, 3, 3), torch.randn(2, 1, 384)).shape == y.shape


def test_bad_input_is_named():
    c, b = StageC3("tiny"), StageB3("tiny")
    with pytest.raises(ValueError, match="compressor latents"):
        c(torch.randn(1, 4, 3, 3), torch.rand(1), torch.randn(1, 77, 384), torch.randn(1, 384))
    with pytest.raises(ValueError, match="text states"):
        c(torch.randn(1, 16, 3, 3), torch.rand(1), torch.randn(1, 77, 1280), torch.randn(1, 384))
    with pytest.raises(ValueError, match="pooled text"):
        c(torch.randn(1, 16, 3, 3), torch.rand(1), torch.randn(1, 77, 384), None)
    with pytest.raises(ValueError, match="multiple of the patch size 2"):
        b(torch.randn(1, 4, 13, 16), torch.rand(1), torch.randn(1, 16, 3, 3), torch.randn(1, 384))
    with pytest.raises(ValueError, match="unknown time conditions"):
        b(torch.randn(1, 4, 16, 16), torch.rand(1), torch.randn(1, 16, 3, 3), torch.randn(1, 384), crp=torch.rand(1))
    with pytest.raises(ValueError, match="resample"):
        CascadeConfig(resample="bilinear")
