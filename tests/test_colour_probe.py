"""benchmarks.colour_probe: the linear colour read-out of a compressor's latents."""
import json

import torch

from benchmarks.colour_probe import colour_r2, linear_r2, main
from tests.bad_input.conftest import assert_error, run_main


def test_linear_r2_is_one_for_a_linear_read_out_and_near_zero_for_noise():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 16, generator=gen)
    y = x[:, :3] * 0.5 + 0.2
    assert linear_r2(x[:300], y[:300], x[300:], y[300:]) > 0.999
    noise = torch.rand(400, 3, generator=gen)
    assert abs(linear_r2(x[:300], noise[:300], x[300:], noise[300:])) < 0.2


def test_a_compressor_that_passes_its_images_colours_scores_one():
    class MeanColour(torch.nn.Module):  # a "compressor" whose latents are the mean colour of each 8x8 cell
        def forward(self, images):
            return torch.nn.functional.avg_pool2d(images, 8)
    images = torch.rand(20, 3, 32, 32)
    report = colour_r2(MeanColour(), images, held_out=5, batch_size=8)
    assert report["grid"] == [4, 4] and report["colour_r2_held_out"] > 0.999


def test_command_reports_each_compressor_and_refuses_bad_requests(tiny_bundle, openmoji_dir, tmp_path, capsys):
    out = tmp_path / "probe.json"
    report = main([str(tiny_bundle / "compressor.safetensors"), "--images", "12", "--held-out", "4",
                   "--size", "64", "--data-dir", str(openmoji_dir), "--out", str(out)])
    (entry,) = report["compressors"].values()
    assert entry["colour_r2_held_out"] <= 1 and len(entry["grid"]) == 2
    assert json.loads(out.read_text()) == report
    code, err = run_main(main, [str(tiny_bundle / "compressor.safetensors"), "--images", "12", "--held-out", "12"],
                         capsys)
    assert_error(code, err, "--held-out 12 leaves no image to fit on")
    code, err = run_main(main, [str(tiny_bundle / "compressor.safetensors"), "--out", str(out)], capsys)
    assert_error(code, err, "exists")
