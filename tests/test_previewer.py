"""The previewer (stages.previewer): shapes, training from the CLI (PSNR, grid, export with the compressor's
fingerprint), the compressor check, Stage C's extra grid row and ``python -m sample --preview``."""
import json

import pytest
import torch
from PIL import Image

from common.errors import run_command
from sample.__main__ import main as sample_main
from stages.previewer import Previewer
from tests.tiny_stages import TINY_C
from train.cli import main as cli_main
from weights.checkpoint import read_metadata
from weights.loaders import load_previewer

TINY_P = dict(width=8, blocks=1, ups=3, up_widths=[8, 8, 8])


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """A compressor and a Stage C that records it (``tiny_bundle``; read only)."""
    return tiny_bundle


@pytest.fixture(scope="module")
def trained(bundle, openmoji_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("previewer_runs")
    cli_main(["fit", "--config", "configs/previewer/tiny.yaml", "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.log_every_n_steps", "1", "--model.init_args.size", json.dumps(TINY_P),
              "--model.init_args.compressor", str(bundle / "compressor.safetensors"),
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "64",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--data.init_args.val_batch_size", "4"])
    return root / "tiny" / "version_0"


def test_shapes_range_and_size():
    model = Previewer("tiny")
    out = model(torch.randn(2, 16, 3, 5))
    assert out.shape == (2, 3, 24, 40) and out.min() >= 0 and out.max() <= 1
    assert sum(p.numel() for p in model.parameters()) * 4 < 1024 ** 2  # under 1 MB in float32
    with pytest.raises(ValueError, match="16"):
        model(torch.randn(2, 8, 3, 3))
    with pytest.raises(ValueError, match="up_widths"):
        Previewer(dict(ups=2, up_widths=[8]))


def test_cli_fit_logs_psnr_writes_grid_and_export(trained, bundle):
    metrics = (trained / "metrics.csv").read_text()
    assert "val/psnr" in metrics and "train/loss" in metrics
    grid = sorted((trained / "samples").glob("preview_step*.png"))[-1]
    assert Image.open(grid).size[1] > 2 * 8  # two rows of 16 px previews (64 px images, 2x2 latents)
    meta = read_metadata(trained / "model.safetensors")
    compressor_fp = read_metadata(bundle / "stage_c.safetensors")["compressor_fingerprint"]
    assert meta["stage"] == "previewer" and meta["compressor_fingerprint"] == compressor_fp
    model = load_previewer(trained, compressor_fp)
    assert model.config.width == 8
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith("compressor.") for k in ckpt["state_dict"])


def test_previewer_of_another_compressor_is_refused(trained):
    with pytest.raises(ValueError, match="another semantic compressor"):
        load_previewer(trained, "0123456789abcdef")


def test_training_lowers_the_loss_on_fixed_latents():
    torch.manual_seed(0)
    model = Previewer(TINY_P)
    latents, target = torch.randn(8, 16, 2, 2), torch.rand(8, 3, 16, 16)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = torch.nn.functional.mse_loss(model(latents), target).item()
    for _ in range(60):
        loss = torch.nn.functional.mse_loss(model(latents), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first


def test_stage_c_grid_gets_a_preview_row(trained, bundle, openmoji_dir, tmp_path):
    cli_main(["fit", "--config", "configs/stage_c/tiny.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--model.init_args.size", json.dumps(TINY_C.to_dict()),
              "--model.init_args.compressor", str(bundle / "compressor.safetensors"),
              "--model.init_args.stage_b", "null", "--model.init_args.previewer", str(trained),
              "--model.init_args.sample_steps", "2", "--model.init_args.grid_images", "2",
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "64",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--data.init_args.val_batch_size", "4"])
    grid = sorted((tmp_path / "tiny" / "version_0" / "samples").glob("text_to_image_step*.png"))[-1]
    assert Image.open(grid).size == (2 + 2 * (64 + 2), 2 + 2 * (64 + 2))  # real images, then previews


def test_sample_preview_writes_the_png(trained, bundle, tmp_path, capsys):
    out = tmp_path / "preview.png"
    sample_main(["a red apple", "--stage-c", str(bundle / "stage_c.safetensors"), "--preview",
                 str(trained / "model.safetensors"), "--prior-steps", "2", "--quiet", "--out", str(out)])
    assert Image.open(out).size == (128, 128)
    with pytest.raises(SystemExit) as e:
        run_command(sample_main, ["a cat", "--stage-c", str(bundle / "stage_c.safetensors"), "--preview",
                                  str(tmp_path / "none.safetensors"), "--quiet", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "no previewer" in err and len(err.strip().splitlines()) == 1
