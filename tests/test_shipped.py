"""The shipped tiny checkpoints (``checkpoints/tiny/``): complete, under 60 MB, every add-on made for the shipped
compressor and prior, and each path a user takes (plain, previewer, pixel decoder, ControlNets, img2img, LoRA) runs
on them from ``python -m sample`` with its defaults. No figure is checked here: the scores are the evaluation's."""
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sample.__main__ import SHIPPED, main as sample_main
from weights.checkpoint import fingerprint, read_metadata
from weights.loaders import load_compressor, load_stage_c3
from tests.tiny_stages import random_v3_lora

STAGES = ("stage_a", "stage_b", "stage_c", "compressor")
ADD_ONS = ("previewer", "pixel_decoder", "controlnet_canny", "controlnet_inpaint")
FAST = ["--prior-steps", "3", "--decoder-steps", "2", "--quiet"]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255


def _drawn(path: Path) -> np.ndarray:
    image = _pixels(path)
    assert image.shape == (128, 128, 3) and np.isfinite(image).all() and image.std() > 0.02
    return image


def test_the_shipped_folder_holds_every_file_and_stays_under_60_mb():
    for name in STAGES + ADD_ONS:
        assert (SHIPPED / f"{name}.safetensors").is_file(), name
    size = sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file())
    assert size < 60e6


def test_every_shipped_part_was_trained_on_the_shipped_compressor_and_prior():
    compressor = fingerprint(load_compressor(SHIPPED / "compressor.safetensors"))
    for name in ("stage_b", "stage_c", "previewer", "pixel_decoder", "controlnet_canny", "controlnet_inpaint"):
        assert read_metadata(SHIPPED / f"{name}.safetensors")["compressor_fingerprint"] == compressor, name
    prior = fingerprint(load_stage_c3(str(SHIPPED / "stage_c.safetensors")))
    for name in ("controlnet_canny", "controlnet_inpaint"):
        meta = read_metadata(SHIPPED / f"{name}.safetensors")
        assert meta["stage_c_fingerprint"] == prior and meta["control"] == name.split("_")[1]


def test_the_readme_command_draws_with_every_default(tmp_path):
    out = tmp_path / "red_apple.png"
    sample_main(["red apple", "--out", str(out), "--quiet"])
    _drawn(out)


@pytest.mark.parametrize("extra", [["--preview"], ["--decoder", "pixel"]],
                         ids=["previewer", "pixel_decoder"])
def test_the_shipped_previewer_and_pixel_decoder_fit_the_shipped_prior(tmp_path, extra):
    out = tmp_path / "x.png"
    sample_main(["banana", *FAST, *extra, "--out", str(out)])
    assert np.isfinite(_pixels(out)).all()


def test_img2img_and_both_shipped_controlnets_run_on_the_defaults(tmp_path):
    source = tmp_path / "source.png"
    sample_main(["sun", *FAST, "--out", str(source)])
    variation = tmp_path / "variation.png"
    sample_main(["sun", *FAST, "--image", str(source), "--strength", "0.5", "--out", str(variation)])
    _drawn(variation)
    canny = tmp_path / "canny.png"
    sample_main(["sun", *FAST, "--control", "canny", "--control-image", str(source), "--out", str(canny)])
    _drawn(canny)
    mask = tmp_path / "mask.png"
    pixels = np.zeros((128, 128), dtype=np.uint8)
    pixels[:, 64:] = 255
    Image.fromarray(pixels).save(mask)
    inpainted = tmp_path / "inpainted.png"
    sample_main(["red heart", *FAST, "--control", "inpaint", "--control-image", str(source), "--mask", str(mask),
                 "--keep-unmasked", "--out", str(inpainted)])
    _drawn(inpainted)


def test_a_lora_on_the_shipped_prior_changes_its_samples(tmp_path):
    adapter = random_v3_lora(SHIPPED / "stage_c.safetensors", tmp_path / "adapter.safetensors")
    plain, adapted = tmp_path / "plain.png", tmp_path / "adapted.png"
    sample_main(["cat face", *FAST, "--out", str(plain)])
    sample_main(["cat face", *FAST, "--lora", f"{adapter}:1", "--out", str(adapted)])
    assert np.abs(_pixels(plain) - _pixels(adapted)).mean() > 1e-3
