"""Stage C training: CLI run outputs (weights, grids, metrics), compressor pairing, latent cache."""
import json

import pytest
import torch

from semantic_compressor import SemanticCompressor
from weights.checkpoint import fingerprint, save_safetensors
from stages.stage_a import StageA
from stages.stage_b import StageB, StageBConfig
from train.cli import main as cli_main
from pipeline.text_to_image import load_prior, load_text_to_image
from train.stage_c import StageCTraining

TINY_C = dict(width=32, depth=1, heads=2, c_text=384, dropout=0.0)


@pytest.fixture(scope="module")
def stage_b_run(tmp_path_factory):
    """A Stage B export with its compressor and Stage A, laid out like a training run."""
    run = tmp_path_factory.mktemp("stage_b") / "version_0"
    a = StageA(dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64))
    compressor = SemanticCompressor(trainable="none")  # the packaged ImageNet Lite0
    b = StageB(StageBConfig(widths=(16, 32), blocks=(1, 1), heads=(0, 2), inject_semantic=(False, True), c_cond=16,
                            c_text=None, dropout=0.0))
    a_path = save_safetensors(a, run / "stage_a.safetensors", "stage_a", a.config.to_dict())
    save_safetensors(compressor, run / "compressor.safetensors", "semantic_compressor", compressor.config.to_dict())
    save_safetensors(b, run / "model.safetensors", "stage_b", b.config.to_dict(),
                     extra={"stage_a_fingerprint": fingerprint(a), "stage_a_path": str(a_path),
                            "compressor_fingerprint": fingerprint(compressor)})
    return run


def _fit(root, openmoji_dir, stage_b_run, steps=4, extra=()):
    cli_main(["fit", "--config", "configs/stage_c/tiny.yaml", "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2",
              "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
              "--model.init_args.size", json.dumps(TINY_C), "--model.init_args.compressor", str(stage_b_run),
              "--model.init_args.stage_b", str(stage_b_run), "--model.init_args.sample_steps", "2",
              "--model.init_args.decoder_steps", "2",
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "64",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--data.init_args.val_batch_size", "4", *extra])


def test_cli_fit_writes_weights_grids_and_metrics(openmoji_dir, stage_b_run, tmp_path):
    _fit(tmp_path / "runs", openmoji_dir, stage_b_run)
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert "val/loss" in (run / "metrics.csv").read_text()
    grids = sorted((run / "samples").glob("text_to_image_step*.png"))
    assert grids and grids[-1].with_suffix(".txt").read_text().strip()
    prior = load_prior(run)
    assert prior.model.config.width == 32 and (prior.latent_shift, prior.latent_scale) == (0.0, 1.0)
    # the export records its denoiser; the loader builds exactly that one
    assert prior.diffusion == {"schedule": {"name": "cosine", "s": 0.008, "shift": 0.0}, "parameterisation": "abs_ab",
                               "loss_weight": "paper_p2", "sigmoid_bias": 0.0}
    assert prior.denoiser.describe() == prior.diffusion
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["stage"] == "stage_c"
    assert not any(k.startswith(("compressor.", "text_encoder.", "decoder.")) for k in ckpt["state_dict"])
    assert load_text_to_image(run, stage_b_run / "model.safetensors").prior.compressor_fingerprint


def test_latent_cache_gives_the_same_targets(stage_b_run):
    module = StageCTraining(size=TINY_C, compressor=str(stage_b_run), cache_latents=True)
    batch = {"image": torch.rand(3, 3, 64, 64), "key": ["a", "b", "c"]}
    first = module.target(module, batch, train=True)
    assert set(module.latent_cache) == {("semantic", k) for k in "abc"}
    assert torch.equal(first, module.target(module, batch, train=True))
    with torch.no_grad():  # normalised as the release's (x + 1) / 42 (the module's defaults)
        assert torch.allclose(first, (module.compressor.eval()(batch["image"]) + 1) / 42, atol=1e-6)
    with pytest.raises(ValueError, match="text_encoder"):
        StageCTraining(size=dict(TINY_C, c_text=1024), compressor=str(stage_b_run))
