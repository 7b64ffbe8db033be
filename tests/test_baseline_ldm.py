"""The single-stage baseline LDM: network, training (CLI, resume, export), sampling and its refusals."""
import json

import pytest
import torch

from pipeline.baseline_ldm import load_baseline_text_to_image
from sample.__main__ import main as sample_main
from sample.evaluate import main as evaluate_main
from stages.baseline_ldm import BaselineLDM, baseline_ldm_config
from stages.stage_a import StageA
from tests.bad_input.conftest import assert_error, run_main
from train.cli import main as cli_main
from weights.checkpoint import read_metadata, save_safetensors

TINY = dict(preset="tiny", widths=[16, 32], blocks=[1, 1], heads=[0, 2], c_cond=16)


def test_network_shapes_presets_and_text():
    model = BaselineLDM(TINY)
    x = torch.randn(2, 4, 16, 16)
    assert model(x, torch.rand(2), torch.randn(2, 5, 384)).shape == x.shape  # v head: one map
    assert model.config.downsampling == 4
    with torch.device("meta"):
        paper = BaselineLDM("paper")
    assert round(sum(p.numel() for p in paper.parameters()) / 1e6, 1) == 1014.9  # the paper's "1B U-Net"
    assert baseline_ldm_config("tiny").c_text == 384  # MiniLM, as the tiny Stage C
    with pytest.raises(ValueError, match="text states"):
        model(x, torch.rand(2), None)
    with pytest.raises(ValueError, match="c_text"):
        baseline_ldm_config(dict(preset="tiny", c_text=None))


def _fit(root, stage_a, openmoji_dir, steps, extra=()):
    cli_main(["fit", "--config", "configs/baseline_ldm/tiny.yaml", "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", str(steps), "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.log_every_n_steps", "1",
              "--model.init_args.size", json.dumps(TINY), "--model.init_args.stage_a", str(stage_a),
              "--model.init_args.sample_steps", "2", "--model.init_args.grid_images", "2",
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "64",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--data.init_args.val_batch_size", "4", *extra])


def test_trains_resumes_exports_and_samples(openmoji_dir, tiny_bundle, tmp_path, capsys):
    stage_a = tiny_bundle / "stage_a.safetensors"
    _fit(tmp_path / "runs", stage_a, openmoji_dir, 2)
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert "val/loss" in (run / "metrics.csv").read_text()
    assert (run / "samples" / "text_to_image_step0000002.png").is_file()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["stage"] == "baseline_ldm" and ckpt["global_step"] == 2
    assert not any(k.startswith(("stage_a.", "text_encoder.")) for k in ckpt["state_dict"])  # frozen: not saved

    _fit(tmp_path / "runs", stage_a, openmoji_dir, 4, ["--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    resumed = tmp_path / "runs" / "tiny" / "version_1"
    meta = read_metadata(resumed / "model.safetensors")
    assert meta["stage"] == "baseline_ldm" and meta["global_step"] == 4 and meta["text_encoder"] == "minilm"
    assert meta["diffusion"]["parameterisation"] == "v" and meta["diffusion"]["loss_weight"] == "v_mse"

    out = tmp_path / "apple.png"
    args = ["red apple", "--baseline-ldm", str(resumed), "--prior-steps", "2", "--height", "64", "--width", "64",
            "--quiet"]
    sample_main(args + ["--out", str(out)])
    pipe = load_baseline_text_to_image(resumed)  # the Stage A it recorded
    again = pipe("red apple", "", 64, 64, 1, 2, 4.0, 0, progress=False)
    assert again.shape == (1, 3, 64, 64) and 0 <= again.min() and again.max() <= 1
    assert torch.equal(again, pipe("red apple", "", 64, 64, 1, 2, 4.0, 0, progress=False))  # seeded
    assert meta["latent_scale"] == pipe.latent_scale == 2.46  # the config's: the U-Net sees unit-variance latents
    pipe.latent_scale = 1.0
    assert not torch.equal(again, pipe("red apple", "", 64, 64, 1, 2, 4.0, 0, progress=False))  # decoded rescaled

    other = StageA(dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64))
    save_safetensors(other, tmp_path / "other_a.safetensors", "stage_a", other.config.to_dict())
    with pytest.raises(ValueError, match="different Stage A"):
        load_baseline_text_to_image(resumed, tmp_path / "other_a.safetensors")
    with pytest.raises(SystemExit):  # --baseline-ldm takes prompts alone
        sample_main(args + ["--out", str(tmp_path / "b.png"), "--preview"])
    code, err = run_main(sample_main, args + ["--out", str(tmp_path / "c.png"), "--control", "canny",
                                              "--control-image", str(out)], capsys)
    assert_error(code, err, "--baseline-ldm has no Stage C to steer")
    with pytest.raises(FileExistsError, match="--overwrite"):
        sample_main(args + ["--out", str(out)])


def test_evaluate_refuses_bad_baseline_requests_before_any_work(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        evaluate_main(["--baseline-ldm", str(tmp_path / "nowhere.safetensors")])
    with pytest.raises(SystemExit):
        evaluate_main(["--baseline-ldm", str(tmp_path / "nowhere.safetensors"), "--previewer", "p.safetensors"])
    assert "--previewer renders Stage C's latents" in capsys.readouterr().err


@pytest.mark.parametrize("scale", ["0", "-2.46"])
def test_refuses_a_non_positive_latent_scale_before_training(scale, tiny_bundle, tmp_path, capsys):
    code, err = run_main(cli_main, ["fit", "--config", "configs/baseline_ldm/tiny.yaml",
                                    "--trainer.default_root_dir", str(tmp_path / "runs"),
                                    "--model.init_args.size", json.dumps(TINY),
                                    "--model.init_args.stage_a", str(tiny_bundle / "stage_a.safetensors"),
                                    "--model.init_args.latent_scale", scale], capsys)
    assert_error(code, err, "latent_scale must be a positive number", scale)
    assert not (tmp_path / "runs").exists()
