"""Our Stage A reproduces the released VQGAN (diffusers PaellaVQModel) from converted weights."""
import pytest
import torch

from weights.convert import load_stage_a_release, stage_a_config_from_release, stage_a_from_release
from stages.stage_a import PRESETS, StageA

diffusers_vq = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model")


def _randomised(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights everywhere (the zero-initialised gammas too), and non-trivial BatchNorm stats."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if "running_var" in name:
                b.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                b.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("small", [True, False], ids=["small", "paper"])
def test_stage_a_matches_paella(small, tmp_path):
    kw = dict(embed_dim=64, bottleneck_blocks=3, num_vq_embeddings=64) if small else {}
    ref = _randomised(diffusers_vq.PaellaVQModel(**kw))
    ref.save_pretrained(tmp_path / "vqgan")
    ours = load_stage_a_release(tmp_path / "vqgan")
    if not small:
        assert ours.config == PRESETS["paper"]
    size = 32 if small else 16

    def close(a, b):  # within 1e-5, relative to the output's scale (random paper-size weights give large values)
        return (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())

    x = torch.rand(2, 3, size, size + 8)
    with torch.no_grad():
        ref_latents = ref.encode(x).latents
        ours_latents = ours.encode(x)
        assert close(ours_latents, ref_latents / ref.config.scale_factor)
        z = torch.randn_like(ours_latents)
        assert close(ours.decode(z), ref.decode(z * ref.config.scale_factor).sample)
        # quantised decode uses the same codebook and nearest-neighbour rule
        zq_ref = ref.decode(ref_latents, force_not_quantize=False).sample
        assert close(ours.decode(ours_latents, quantize=True), zq_ref)


def test_original_checkpoint_layout_and_config_inference():
    ref = diffusers_vq.PaellaVQModel(embed_dim=64, bottleneck_blocks=5, num_vq_embeddings=32, latent_channels=4)
    state = {k.replace("vquantizer.embedding.", "vquantizer.codebook."): v for k, v in ref.state_dict().items()}
    cfg = stage_a_config_from_release(state)
    assert cfg.widths == (32, 64) and cfg.bottleneck_blocks == 5 and cfg.codebook_size == 32
    StageA(cfg).load_state_dict(stage_a_from_release(state))  # strict: every key maps one to one


def test_foreign_state_dict_is_rejected():
    with pytest.raises(ValueError, match="not a PaellaVQModel"):
        stage_a_from_release({"down_blocks.0.weight": torch.zeros(1), "foo.weight": torch.zeros(1)})
    ref = diffusers_vq.PaellaVQModel(embed_dim=64, bottleneck_blocks=1, num_vq_embeddings=8).state_dict()
    with pytest.raises(ValueError, match="unexpected key 'foo.weight'"):
        stage_a_from_release({**ref, "foo.weight": torch.zeros(1)})
