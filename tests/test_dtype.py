"""Sampling in bfloat16 and float16 (``dtype=`` in the loaders, ``--dtype`` on the command line), and the
guard that turns a float16 overflow into a one-line error naming bfloat16 instead of a black image."""
from pathlib import Path

import pytest
import torch

from sample.__main__ import main
from weights.checkpoint import read_metadata, save_safetensors
from pipeline.text_to_image import load_pixel_text_to_image, load_text_to_image
from weights.loaders import load_stage_c
from tests.bad_input.conftest import assert_error, run_main

GRID3 = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny_grid3"
STEPS = dict(prior_steps=4, decoder_steps=3, seed=0, progress=False)


def _pipe(dtype=None, stage_c=GRID3 / "stage_c.safetensors", pixel=False):
    if pixel:
        return load_pixel_text_to_image(stage_c, GRID3 / "pixel_decoder.safetensors", dtype=dtype,
                                        compressor=GRID3 / "compressor.safetensors")
    return load_text_to_image(stage_c, GRID3 / "stage_b.safetensors", GRID3 / "stage_a.safetensors", dtype=dtype,
                              compressor=GRID3 / "compressor.safetensors")


@pytest.fixture(scope="module")
def reference():
    return _pipe()("red apple", **STEPS)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16, "float16"])
def test_half_precision_weights_give_nearly_the_float32_images(reference, dtype):
    pipe = _pipe(dtype)
    assert pipe.dtype == (torch.bfloat16 if "bfloat16" in str(dtype) else torch.float16)
    assert all(p.dtype == pipe.dtype for p in [*pipe.prior.model.parameters(), *pipe.decoder.parameters()])
    assert all(p.dtype == torch.float32 for p in pipe.compressor.parameters())  # its resize has no half kernel
    images = pipe("red apple", **STEPS)
    assert images.dtype == torch.float32 and images.shape == reference.shape
    assert (images - reference).abs().mean() < 0.05  # same seed: the same image up to rounding


def test_pixel_decoder_variations_and_img2img_in_bfloat16():
    pipe = _pipe("bfloat16", pixel=True)
    image = torch.rand(1, 3, 128, 128)
    assert pipe.variations(image, decoder_steps=2, progress=False).shape == (1, 3, 128, 128)
    out = pipe("red apple", image=image, strength=0.5, prior_steps=4, decoder_steps=2, progress=False)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.fixture(scope="module")
def overflowing_stage_c(tmp_path_factory):
    """The shipped Stage C with its input projection scaled by 10^5: the activations stay finite in
    float32 and bfloat16 (range 3e38) but pass float16's largest value, 65504."""
    model = load_stage_c(str(GRID3 / "stage_c.safetensors"))
    with torch.no_grad():
        model.projection.weight.mul_(1e5)
        model.projection.bias.mul_(1e5)
    meta = read_metadata(GRID3 / "stage_c.safetensors")
    path = tmp_path_factory.mktemp("overflow") / "stage_c.safetensors"
    save_safetensors(model, path, "stage_c", model.config.to_dict(),
                     extra={k: meta[k] for k in ("text_encoder", "latent_shift", "latent_scale",
                                                 "compressor_fingerprint")})
    return path


@pytest.mark.slow
def test_float16_overflow_is_a_clear_error_naming_bfloat16(overflowing_stage_c):
    for dtype in (None, "bfloat16"):
        assert torch.isfinite(_pipe(dtype, overflowing_stage_c)("red apple", **STEPS)).all()
    with pytest.raises(FloatingPointError) as e:
        _pipe("float16", overflowing_stage_c)("red apple", **STEPS)
    message = str(e.value)
    assert "Stage C's latents contain" in message and "--dtype bfloat16" in message and "\n" not in message


def test_a_non_finite_decoder_output_in_half_precision_is_caught_before_clamping(monkeypatch):
    """inf clamps to a white pixel: the decoder checks its output before clamping it to [0, 1]."""
    pipe = _pipe("bfloat16")
    decode = pipe.decoder.stage_a.decode
    monkeypatch.setattr(pipe.decoder.stage_a, "decode", lambda z, **k: decode(z, **k) * float("inf"))
    with pytest.raises(FloatingPointError, match="Stage A's decoded images contain .* in bfloat16"):
        pipe("red apple", **STEPS)


def test_cli_dtype(overflowing_stage_c, tmp_path, capsys):
    out = tmp_path / "apple.png"
    code, err = run_main(main, ["red apple", "--dtype", "bfloat16", "--prior-steps", "2", "--decoder-steps", "2",
                                "--quiet", "--out", str(out)], capsys)
    assert code == 0 and out.exists(), err
    code, err = run_main(main, ["red apple", "--dtype", "float16", "--stage-c", str(overflowing_stage_c),
                                "--stage-b", str(GRID3 / "stage_b.safetensors"), "--prior-steps", "2", "--decoder-steps", "2", "--quiet",
                                "--out", str(tmp_path / "black.png")], capsys)
    assert_error(code, err, "float16", "--dtype bfloat16")
    assert not (tmp_path / "black.png").exists()


def test_bad_dtype_is_named():
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'float64'"):
        _pipe("float64")
