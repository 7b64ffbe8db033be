"""Stable Cascade (v3) training through the CLI on the embedded set (tiny configs, 2 steps), the adaptive loss
weight's state across a resume, and the v3 chain sampled from the runs by ``python -m sample``."""
import json

import pytest
import torch
from PIL import Image

from sample.__main__ import main as sample_main
from sample.evaluate import main as evaluate_main
from pipeline.cascade import load_cascade_text_to_image
from weights.checkpoint import read_metadata, read_weights
from tests.tiny_stages import random_v3_lora
from pipeline.text_to_image import load_text_to_image
from tests.bad_input.conftest import assert_error, run_main
from train.cli import main as cli_main
from train.stable_cascade import StageC3Training

TINY_B3 = dict(widths=[16, 32], heads=[0, 2], blocks_down=[1, 1], blocks_up=[1, 1], repeats_down=[1, 1],
               repeats_up=[2, 1], resample="strided", c_latent=4, patch_size=2, c_cond=16, t_conds=["sca"],
               c_text=None, c_pooled=384, c_image=None, c_semantic=16, c_pixels=3, dropout=[0.0, 0.0])
TINY_C3 = dict(widths=[32, 32], heads=[2, 2], blocks_down=[1, 1], blocks_up=[1, 1], c_cond=32, c_text=384,
               c_pooled=384, c_image=768, dropout=[0.0, 0.0])
COMMON = ["--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
          "--trainer.log_every_n_steps", "1", "--data.init_args.image_size", "64", "--data.init_args.num_workers", "0",
          "--data.init_args.batch_size", "4", "--data.init_args.val_batch_size", "4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, openmoji_dir):
    root = tmp_path_factory.mktemp("runs")
    cli_main(["fit", "--config", "configs/stage_b/sc_tiny.yaml", "--trainer.default_root_dir", str(root / "b3"),
              "--model.init_args.size", json.dumps(TINY_B3), "--model.init_args.sample_steps", "2",
              "--model.init_args.val_fid", "false", "--data.init_args.embedded_dir", str(openmoji_dir), *COMMON])
    b3 = root / "b3" / "sc_tiny" / "version_0"
    cli_main(["fit", "--config", "configs/stage_c/sc_tiny.yaml", "--trainer.default_root_dir", str(root / "c3"),
              "--model.init_args.size", json.dumps(TINY_C3), "--model.init_args.stage_b", str(b3),
              "--model.init_args.sample_steps", "2", "--model.init_args.decoder_steps", "2",
              "--data.init_args.embedded_dir", str(openmoji_dir), *COMMON])
    return b3, root / "c3" / "sc_tiny" / "version_0"


def test_tiny_v3_stages_train_through_the_cli(runs):
    b3, c3 = runs
    for run, stage, grid in ((b3, "stage_b3", "semantic_recon"), (c3, "stage_c3", "text_to_image")):
        meta = read_metadata(run / "model.safetensors")
        assert meta["stage"] == stage and meta["text_encoder"] == "minilm"
        assert meta["diffusion"]["parameterisation"] == "eps" and meta["diffusion"]["time_input"] == "cosine_t"
        assert meta["diffusion"]["loss_weight"] == "adaptive"
        assert "val/loss" in (run / "metrics.csv").read_text()
        assert sorted((run / "samples").glob(f"{grid}_step*.png"))
        ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["stage"] == stage
        losses = ckpt["adaptive_loss_weight"]["losses"]
        assert losses.shape == (300,) and (losses != 1).sum() > 0  # the buckets saw the training losses


def test_adaptive_state_is_restored_on_resume(runs):
    _, c3 = runs
    ckpt = torch.load(c3 / "checkpoints" / "last.ckpt", weights_only=True)
    module = StageC3Training(size=TINY_C3, compressor="checkpoints/tiny/compressor.safetensors")
    assert torch.equal(module.adaptive_weight.losses, torch.ones(300, dtype=torch.float64))
    module.on_load_checkpoint(ckpt)
    assert torch.equal(module.adaptive_weight.losses, ckpt["adaptive_loss_weight"]["losses"])
    with pytest.raises(ValueError, match="adaptive or p2"):
        StageC3Training(size=TINY_C3, compressor="checkpoints/tiny/compressor.safetensors", loss_weight="paper_p2")


def test_init_from_may_change_the_head_but_not_the_size(runs):
    _, c3 = runs  # trained with the release's eps head
    module = StageC3Training(size=dict(TINY_C3, prediction="v"), compressor="checkpoints/tiny/compressor.safetensors",
                             init_from=str(c3))
    stored, _ = read_weights(c3 / "model.safetensors", "stage_c3")
    assert module.model.config.prediction == "v"
    assert all(torch.equal(p, stored[n]) for n, p in module.model.state_dict().items())
    with pytest.raises(ValueError, match="another size"):
        StageC3Training(size=dict(TINY_C3, prediction="v", c_cond=16),
                        compressor="checkpoints/tiny/compressor.safetensors", init_from=str(c3))


def test_sample_runs_the_v3_chain_with_img2img(runs, tmp_path, capsys):
    b3, c3 = runs
    pipe = load_cascade_text_to_image(c3, b3)
    assert pipe.decoder.default_steps == 10 and pipe.prior.shift == 2.0
    out = tmp_path / "cat.png"
    sample_main(["a cat", "--stage-c", str(c3), "--stage-b", str(b3), "--out", str(out), "--height", "64",
                 "--width", "64", "--prior-steps", "2", "--decoder-steps", "2", "--quiet"])
    assert out.stat().st_size > 0
    sample_main(["a dog", "--stage-c", str(c3), "--stage-b", str(b3), "--image", str(out), "--strength", "0.5",
                 "--compressor", "checkpoints/tiny/compressor.safetensors", "--out", str(tmp_path / "dog.png"),
                 "--prior-steps", "2", "--decoder-steps", "2", "--quiet"])
    assert (tmp_path / "dog.png").stat().st_size > 0
    # a v2 Stage B trained on the same compressor decodes the v3 prior's latents, at v2's decoder guidance
    mixed = load_cascade_text_to_image(c3, "checkpoints/tiny/stage_b.safetensors")
    assert mixed.decoder.default_steps == 12
    sample_main(["a cat", "--stage-c", str(c3), "--stage-b", "checkpoints/tiny/stage_b.safetensors", "--out",
                 str(tmp_path / "mixed.png"), "--height", "64", "--width", "64", "--prior-steps", "2",
                 "--decoder-steps", "2", "--quiet"])
    settings = json.loads(Image.open(tmp_path / "mixed.png").text["settings"])
    assert settings["decoder_guidance"] == 2.0 and settings["prior_guidance"] == 4.0
    code, err = run_main(sample_main, ["a cat", "--stage-c", "checkpoints/tiny_grid3/stage_c.safetensors", "--stage-b",
                                       str(b3), "--out", str(tmp_path / "mixed_v2.png"), "--quiet"], capsys)
    assert_error(code, err, "holds a stage_b3 model, not a stage_b model")  # a v2 prior takes v2 decoders


def test_the_time_estimate_of_a_v3_chain_times_both_stages(runs):
    """The time limit of a large request times one v3 Stage C call (text states and pooled text) and one
    Stage B step at 256 px, as for v2."""
    b3, c3 = runs
    prior_s, decoder_s = load_cascade_text_to_image(c3, b3).call_seconds()
    assert prior_s > 0 and decoder_s > 0


def test_a_v3_lora_changes_what_the_chain_samples(runs, tmp_path):
    """A LoRA adapter on the v3 Stage C (random up-projections) is found by its stage and moves the samples."""
    b3, c3 = runs
    adapter = random_v3_lora(c3 / "model.safetensors", tmp_path / "adapter.safetensors")
    kw = dict(height=64, width=64, prior_steps=2, decoder_steps=2, progress=False, seed=1)
    plain = load_cascade_text_to_image(c3, b3)(["a cat"], **kw)
    with_lora = load_cascade_text_to_image(c3, b3, loras=[(adapter, 1.0)])(["a cat"], **kw)
    assert plain.shape == with_lora.shape and not torch.allclose(plain, with_lora)
    with pytest.raises(ValueError, match="stage_c3"):
        load_text_to_image("checkpoints/tiny_grid3/stage_c.safetensors", "checkpoints/tiny_grid3/stage_b.safetensors",
                           loras=[(adapter, 1.0)])


@pytest.mark.slow
def test_the_sampling_evaluation_takes_v3_stages_with_the_released_defaults(runs, openmoji_dir):
    b3, c3 = runs
    report = evaluate_main(["--stage-c", str(c3), "--stage-b", str(b3), "--compressor",
                            "checkpoints/tiny/compressor.safetensors", "--data-dir", str(openmoji_dir), "--limit", "4",
                            "--gallery-limit", "8", "--batch-size", "4", "--prior-steps", "2", "--decoder-steps", "2"])
    assert (report["prior_guidance"], report["decoder_guidance"]) == (4.0, 1.1)
    assert report["fid_vs_val"] > 0 and 0 <= report["top5_retrieval_own_caption"] <= 1
