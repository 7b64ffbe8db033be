"""The compressor's input scale (the semantic grid), its closed-form PCA head, and the prompt sets of
``sample.evaluate``."""
import pytest
import torch

from sample.evaluate import EVERYDAY, PEOPLE, people_captions, prompt_set, without_skin_tone
from semantic_compressor import PAPER_INPUT_SCALE, SemanticCompressor, latent_grid
from weights.loaders import load_compressor
from weights.checkpoint import save_safetensors
from imagedata.embedded import split_of
from pipeline.text_to_image import Prior
from stages.stage_c import StageC, StageCConfig
from stages.stable_cascade import StageC3
from pipeline.cascade import load_cascade_prior
from pipeline.text_encoder import build_text_encoder
from train.compressor_pca import fit_pca_head, main as pca_main

TINY_SC3 = {"widths": [32, 32], "heads": [2, 2], "blocks_down": [1, 1], "blocks_up": [1, 1], "c_cond": 32,
            "c_text": 384, "c_pooled": 384, "c_image": None, "dropout": [0.0, 0.0]}


def test_input_scale_sets_the_grid():
    assert latent_grid(1024, 1024) == (24, 24)  # the paper's 3/4
    assert latent_grid(128, 128) == (3, 3)
    assert latent_grid(128, 128, 2.0) == (8, 8)
    assert latent_grid(128, 96, 1.5) == (6, 5)
    compressor = SemanticCompressor(pretrained=False, input_scale=2.0)
    assert compressor(torch.rand(2, 3, 128, 96)).shape == (2, 16, 8, 6)
    assert compressor.latent_grid(128, 96) == (8, 6)


def test_input_scale_is_saved_and_checked(tmp_path):
    compressor = SemanticCompressor(pretrained=False, input_scale=2.0)
    path = save_safetensors(compressor, tmp_path / "compressor.safetensors", "semantic_compressor",
                            compressor.config.to_dict())
    assert load_compressor(path).config.input_scale == 2.0
    for bad in (0.0, -1.0, float("nan"), 100.0):
        with pytest.raises(ValueError, match="input_scale"):
            SemanticCompressor(pretrained=False, input_scale=bad)
    with pytest.raises(ValueError, match="at least 16x16 px"):
        latent_grid(12, 64, 2.0)


def test_pca_head_whitens_the_training_features():
    torch.manual_seed(0)
    compressor = SemanticCompressor(trainable="none", input_scale=1.0, latent_channels=4)  # packaged ImageNet Lite0
    images = torch.rand(12, 3, 64, 64)
    stats = fit_pca_head(compressor, images, batch_size=5, progress=False)
    assert 0 < stats["variance_kept"] <= 1 and stats["cells"] == 12 * 2 * 2
    latents = compressor.eval()(images).permute(0, 2, 3, 1).reshape(-1, 4).double()
    assert torch.allclose(latents.mean(0), torch.zeros(4, dtype=torch.double), atol=1e-3)
    assert torch.allclose(latents.var(0, unbiased=False), torch.ones(4, dtype=torch.double), atol=1e-2)
    assert torch.allclose(latents.T @ latents / len(latents), torch.eye(4, dtype=torch.double), atol=1e-2)
    weight = compressor.mapper[0].weight.flatten(1)  # orthonormal principal directions
    assert torch.allclose(weight @ weight.T, torch.eye(4), atol=1e-4)


def test_pca_command_refuses_to_overwrite(tmp_path, openmoji_dir):
    out = tmp_path / "compressor.safetensors"
    out.write_bytes(b"earlier")
    with pytest.raises(FileExistsError, match="--overwrite"):
        pca_main(["--out", str(out), "--data-dir", str(openmoji_dir), "--limit", "4"])
    assert out.read_bytes() == b"earlier"


def test_prior_samples_its_compressors_grid():
    prior = Prior(StageC(StageCConfig(width=32, depth=1, heads=2, c_text=384, dropout=0.0)), build_text_encoder("minilm"),
                  0.0, 1.0, compressor_input_scale=2.0)
    assert prior.grid(128, 128) == (8, 8)
    latents = prior.sample(["red apple"], [""], prior.grid(64, 64), 2, 1.0, torch.Generator().manual_seed(0),
                           progress=False)
    assert latents.shape == (1, 16, 4, 4)
    assert Prior(prior.model, prior.text_encoder).grid(128, 128) == latent_grid(128, 128, PAPER_INPUT_SCALE)


def test_everyday_prompts_are_training_captions(openmoji_dir):
    assert len(EVERYDAY) >= 40 and len(set(EVERYDAY)) == len(EVERYDAY)
    assert all(split_of(caption) == "train" for caption in EVERYDAY)
    samples = prompt_set(openmoji_dir, "everyday", 64)
    assert [s["caption"] for s in samples] == list(EVERYDAY)
    assert samples[0]["image"].shape == (3, 64, 64)
    assert len(prompt_set(openmoji_dir, "everyday", 64, limit=3)) == 3
    with pytest.raises(ValueError, match="unknown prompt set"):
        prompt_set(openmoji_dir, "holiday", 64)


def test_people_prompts_are_a_fixed_choice_of_training_captions_with_a_skin_tone(openmoji_dir):
    samples = prompt_set(openmoji_dir, "people", 64)
    captions = [s["caption"] for s in samples]
    assert len(set(captions)) == PEOPLE and captions == people_captions()
    assert all(split_of(c) == "train" and without_skin_tone(c) != c for c in captions)
    assert len({without_skin_tone(c) for c in captions}) > PEOPLE // 2  # many emoji, not one in five tones


def test_v3_prior_samples_its_compressors_grid(tmp_path):
    model = StageC3(TINY_SC3)
    path = save_safetensors(model, tmp_path / "stage_c3.safetensors", "stage_c3", model.config.to_dict(),
                            extra={"compressor_input_scale": 2.0})
    prior = load_cascade_prior(path)
    assert prior.grid(128, 128) == (8, 8)  # recorded by StageC3Training's export
    latents = prior.sample(["red apple"], [""], prior.grid(64, 64), 2, 1.0, torch.Generator().manual_seed(0),
                           progress=False)
    assert latents.shape == (1, 16, 4, 4)
    plain = save_safetensors(model, tmp_path / "plain.safetensors", "stage_c3", model.config.to_dict())
    assert load_cascade_prior(plain).grid(128, 128) == latent_grid(128, 128, PAPER_INPUT_SCALE)  # released exports
