"""Bad input to the sampler (``python -m sample``, ``TextToImage``) and to the image-taking models:
each case asserts the exit status or exception, the one-line message, and that nothing was written."""
import time

import pytest
import torch

import sample.__main__ as cli
from common import files
from pipeline import inputs
from pipeline.decoders import SemanticDecoder
from pipeline.text_to_image import Prior, TextToImage, load_text_to_image
from sample.__main__ import main
from semantic_compressor import SemanticCompressor
from stages.stage_a import StageA
from stages.stage_c import StageC
from tests.bad_input.conftest import (
    assert_error,
    bomb_png,
    full_disk,
    run_cli,
    run_main,
    snapshot,
)
from tests.tiny_stages import TINY_A, TINY_C
from weights.checkpoint import read_metadata, save_safetensors

FAST = dict(height=48, width=48, prior_steps=1, decoder_steps=1, progress=False)


@pytest.fixture(scope="module")
def bundle(tiny_bundle_copy):
    """The tiny random stages (``tiny_bundle``), and a Stage C whose weights are NaN."""
    out = tiny_bundle_copy("sampling_bundle")
    c = StageC(TINY_C)
    with torch.no_grad():
        for p in c.parameters():
            p.fill_(float("nan"))
    recorded = read_metadata(out / "stage_c.safetensors")
    save_safetensors(c, out / "nan_c.safetensors", "stage_c", c.config.to_dict(),
                     extra={k: recorded[k] for k in ("compressor_fingerprint", "text_encoder", "latent_shift",
                                                     "latent_scale")})
    return out


@pytest.fixture(scope="module")
def pipe(bundle):
    return load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                              bundle / "stage_a.safetensors")


def _argv(bundle, out, *extra):
    return ["sun", "--out", str(out), "--stage-c", str(bundle / "stage_c.safetensors"),
            "--stage-b", str(bundle / "stage_b.safetensors"), "--prior-steps", "1", "--decoder-steps", "1",
            "--height", "48", "--width", "48", "--quiet", *extra]


# -- the CLI: refused when parsed or before any model is loaded -----------------------------------------
@pytest.mark.parametrize("extra,fragments", [
    (["--prior-guidance", "nan"], ["--prior-guidance", "finite"]),
    (["--decoder-guidance", "inf"], ["--decoder-guidance", "finite"]),
    (["--decoder-guidance", "-1"], ["--decoder-guidance", ">= 0"]),
    (["--prior-guidance", "strong"], ["--prior-guidance", "not a number"]),
    (["--prior-steps", "0"], ["--prior-steps", "at least 1"]),
    (["--prior-steps", "-3"], ["--prior-steps", "at least 1"]),
    (["--prior-steps", "1,nan,0"], ["--prior-steps", "decrease"]),
    (["--decoder-steps", "1,0.5"], ["--decoder-steps", "exactly 0"]),
    (["--decoder-steps", "0,0.5,1"], ["--decoder-steps", "decrease"]),
    (["--decoder-steps", "2.5"], ["--decoder-steps", "not a step count"]),
    (["--n", "0"], ["--n", "at least 1"]),
    (["--height", "0"], ["--height", "at least 1"]),
    (["--width", "-64"], ["--width", "at least 1"]),
    (["--seed", "-1"], ["--seed", "at least 0"]),
    (["--seed", str(2 ** 63)], ["--seed", "below 2**63"]),
    (["--max-minutes", "nan"], ["--max-minutes", "minutes > 0"]),
    (["--max-minutes", "0"], ["--max-minutes", "minutes > 0"]),
])
def test_bad_numbers_are_refused_when_parsed(bundle, tmp_path, capsys, unchanged, extra, fragments):
    with unchanged(tmp_path):
        code, err = run_main(main, _argv(bundle, tmp_path / "x.png", *extra), capsys)
    assert code == 2
    assert_error(code, err, *fragments)


@pytest.mark.parametrize("out,fragments", [
    (".", ["is a folder", "sample.png"]),
    ("x.jpgx", ["image extension", ".png"]),
    ("x", ["image extension", ".png"]),
    ("file.png/x.png", ["which is a file"]),
    ("file.png", ["exists", "--overwrite"]),
])
def test_bad_out_is_refused_before_any_model_is_loaded(tmp_path, capsys, unchanged, out, fragments):
    (tmp_path / "file.png").write_bytes(b"precious")
    missing = str(tmp_path / "no_stage_c.safetensors")  # loading it would fail: the --out check comes first
    with unchanged(tmp_path):
        code, err = run_main(main, ["sun", "--out", str(tmp_path / out), "--stage-c", missing], capsys)
    assert code == 2
    assert_error(code, err, *fragments)


def test_existing_single_images_are_not_overwritten(bundle, tmp_path, capsys, unchanged):
    (tmp_path / "g_1.png").write_bytes(b"precious")  # one of the single images of a grid of two
    with unchanged(tmp_path):
        code, err = run_main(main, _argv(bundle, tmp_path / "g.png", "--n", "2"), capsys)
    assert_error(code, err, "g_1.png exists", "--overwrite")


# -- limits: absurd work is refused at once, --no-limits runs it anyway -------------------------------
@pytest.mark.parametrize("extra,fragments", [
    (["--height", "100000", "--width", "100000"], ["100000x100000", "GiB of memory", "--no-limits"]),
    (["--n", "100000000"], ["100000000 image(s)", "GiB of memory", "--no-limits"]),
    (["--n", "2", "--height", "2048", "--width", "2048", "--max-minutes", "0.0001"],
     ["2 image(s) of 2048x2048 with 2 Stage C and 2 decoder network calls each would take about", "timed at 256 px",
      "limit of 0 s", "--max-minutes"]),
])
def test_work_beyond_the_device_is_refused_at_once(bundle, tmp_path, capsys, unchanged, monkeypatch, extra,
                                                    fragments):
    monkeypatch.setattr(Prior, "sample", lambda *a, **k: pytest.fail("sampling started"))
    with unchanged(tmp_path):
        code, err = run_main(main, _argv(bundle, tmp_path / "x.png", *extra), capsys)
    assert code == 2
    assert_error(code, err, *fragments)


def test_no_limits_skips_the_check(bundle, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inputs, "device_memory", lambda device: 1000)  # a device with 1000 bytes
    code, err = run_main(main, _argv(bundle, tmp_path / "x.png"), capsys)
    assert_error(code, err, "1 image(s) of 48x48", "more than the 9.31e-07 GiB")
    assert not (tmp_path / "x.png").exists()
    code, err = run_main(main, _argv(bundle, tmp_path / "x.png", "--no-limits"), capsys)
    assert code == 0 and (tmp_path / "x.png").exists(), err


def test_api_refuses_huge_requests_within_a_second(pipe, monkeypatch):
    monkeypatch.setattr(Prior, "sample", lambda *a, **k: pytest.fail("sampling started"))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="GiB of memory"):
        pipe("sun", **{**FAST, "height": 100000, "width": 100000})
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match="would take about"):  # after timing two network calls at 256 px only
        pipe("sun", images_per_prompt=2, **{**FAST, "height": 2048, "width": 2048}, limits=inputs.Limits(seconds=0.01))


def test_the_time_estimate_scales_the_timed_calls(pipe, monkeypatch):
    monkeypatch.setattr(type(pipe), "call_seconds", lambda self: (1.0, 2.0))  # s per call at 256 px: Stage C, decoder
    assert inputs.estimate_seconds(pipe, 4, (512, 512), 20, 10) == 4 * 4 * (20 * 1.0 + 10 * 2.0)
    assert inputs.estimate_seconds(pipe, 1, (64, 64), 120, 24) is None  # far too little to be worth timing
    with pytest.warns(UserWarning, match="about 11 min on this cpu device"):
        inputs.check_limits(pipe, 4, (512, 512), 20, 10, inputs.Limits())
    with pytest.raises(ValueError, match="about 11 min on this cpu device .* more than the limit of 10 min"):
        inputs.check_limits(pipe, 4, (512, 512), 20, 10, inputs.Limits(seconds=600))


def test_a_tall_image_shows_its_shape_note_and_is_refused_with_the_estimate(bundle, tmp_path, capsys, monkeypatch):
    """``--height 100000``: fits in memory at 48 px wide, but on a device whose calls take 30 s at 256 px it
    would take hours; refused at once, after a note on the aspect ratio."""
    monkeypatch.setattr(TextToImage, "call_seconds", lambda self: (30.0, 30.0))
    monkeypatch.setattr(Prior, "sample", lambda *a, **k: pytest.fail("sampling started"))
    code, err = run_main(main, _argv(bundle, tmp_path / "x.png", "--height", "100000"), capsys)
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert_error(code, err, "1 image(s) of 100000x48", "would take about 2.44 h", "--max-minutes", "--no-limits")
    assert "note: 100000x48 (height/width 2.08e+03) lies outside the aspect ratios of the trained buckets" in err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_stage_a_encodes_float_images_of_any_precision(dtype):
    a = StageA(TINY_A).eval()
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(a.encode(images.to(dtype)), a.encode(images.to(dtype).float()))


def test_no_negative_prompt_is_none(pipe):
    """As in diffusers: negative_prompt=None means none, the same images as the empty one."""
    assert torch.equal(pipe("sun", None, **FAST), pipe("sun", "", **FAST))
    with pytest.raises(TypeError, match="negative_prompt must be a str \\(or None for none\\), got int"):
        pipe("sun", 3, **FAST)


@pytest.mark.slow
def test_parse_errors_are_one_line_with_a_pointer_to_help(tmp_path):
    proc = run_cli("sample", "sun", "--height", "tall", "--out", str(tmp_path / "x.png"), cwd=tmp_path)
    assert proc.returncode == 2 and "usage:" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert_error(proc.returncode, proc.stderr, "--height", "not a whole number", "(see python -m sample --help)")


def test_a_bomb_image_is_named(bundle, tmp_path, capsys):
    (tmp_path / "bomb.png").write_bytes(bomb_png())
    code, err = run_main(main, ["--image", str(tmp_path / "bomb.png"), *_argv(bundle, tmp_path / "x.png")[1:]], capsys)
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert_error(code, err, "--image", "bomb.png declares more than 178956970 pixels", "decompression bombs",
                 "give a smaller image")


def test_a_full_disk_while_saving_leaves_the_earlier_images(bundle, tmp_path, capsys, monkeypatch):
    """A grid of two and its single images: none is written when the disk is full, the old ones stay."""
    out = tmp_path / "g.png"
    code, err = run_main(main, _argv(bundle, out, "--n", "2"), capsys)
    assert code == 0, err
    before = snapshot(tmp_path)
    monkeypatch.setattr(files, "free_space", lambda folder: 1000)  # less than the three PNGs need
    code, err = run_main(main, _argv(bundle, out, "--n", "2", "--seed", "1", "--overwrite"), capsys)
    assert_error(code, err, f"no space left in {tmp_path} to write g.png", "needed, 1 KB free")
    assert code == 2 and snapshot(tmp_path) == before
    monkeypatch.undo()
    full_disk(monkeypatch, when=lambda partial: partial.name == "g_1.png.partial")  # fills up at the last image
    code, err = run_main(main, _argv(bundle, out, "--n", "2", "--seed", "1", "--overwrite"), capsys)
    assert_error(code, err, f"no space left in {tmp_path} to write g_1.png", "needed")
    assert snapshot(tmp_path) == before


def test_memory_estimate_follows_the_models_configs(pipe):
    """From the loaded configs: twice the images double the estimate; Stage A's first level (the widest)
    at 8 times the width multiplies it by 8."""
    def needs(decoder, images):
        fake = type("Pipe", (), {"decoder": decoder})()
        try:
            inputs.check_limits(fake, images, (64, 64), 1, 1, inputs.Limits(memory=budget))
            return False
        except ValueError:
            return True

    per_image = 64 * 64 * inputs.floats_per_pixel(pipe.decoder) * 4 * inputs.PEAK_FACTOR
    budget = int(per_image * 1.5)
    assert not needs(pipe.decoder, 1) and needs(pipe.decoder, 2)
    wide = SemanticDecoder(pipe.decoder.stage_b, StageA({**TINY_A, "widths": [64, 128]}))
    assert inputs.floats_per_pixel(wide) == 8 * inputs.floats_per_pixel(pipe.decoder) and needs(wide, 1)


# -- the Python API: the same checks, named by argument ---------------------------------------------
@pytest.mark.parametrize("kwargs,fragment", [
    (dict(prior_guidance=float("nan")), "prior_guidance must be a finite number"),
    (dict(decoder_guidance=-2.0), "decoder_guidance must be a finite number >= 0"),
    (dict(prior_steps=0), "prior_steps must be at least 1"),
    (dict(decoder_steps=[1.0, float("nan"), 0.0]), "decoder_steps is not a valid list of times"),
    (dict(images_per_prompt=0), "images_per_prompt must be at least 1"),
    (dict(height=-32), "height must be at least 1"),
    (dict(width=32.5), "width must be a whole number"),
    (dict(seed=2 ** 63), "seed must be below 2**63"),
])
def test_api_names_the_bad_argument(pipe, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment.replace("*", r"\*")):
        pipe("sun", **{**FAST, **kwargs})


def test_nan_images_are_refused_before_anything_is_written(bundle, pipe, tmp_path, capsys, unchanged):
    nan_pipe = load_text_to_image(bundle / "nan_c.safetensors", bundle / "stage_b.safetensors",
                                  bundle / "stage_a.safetensors")
    with pytest.raises(FloatingPointError, match="sampled images contain .* NaN/inf"):
        nan_pipe("sun", **FAST)
    argv = _argv(bundle, tmp_path / "x.png", "--stage-c", str(bundle / "nan_c.safetensors"))
    with unchanged(tmp_path):
        code, err = run_main(main, argv, capsys)
    assert_error(code, err, "NaN")
    assert code == 2


# -- images handed to Stage A and the semantic compressor ------------------------------------------
@pytest.fixture(scope="module")
def image_models():
    a = StageA(TINY_A).eval()
    c = SemanticCompressor(pretrained=False, trainable="none")
    return {"Stage A": a.encode, "Stage A training": lambda x: a(x), "the semantic compressor": c}


BAD_IMAGES = [
    (lambda: (torch.rand(1, 3, 64, 64) * 255).to(torch.uint8), ["float images", "/ 255"]),
    (lambda: torch.rand(1, 3, 64, 64) * 2 - 1, ["in [0, 1]", "(x + 1) / 2"]),
    (lambda: torch.rand(1, 3, 64, 64).index_fill_(2, torch.tensor([5]), float("nan")), ["NaN"]),
    (lambda: torch.rand(1, 3, 64, 64).index_fill_(3, torch.tensor([0]), float("inf")), ["inf", "[0, 1]"]),
    (lambda: torch.rand(0, 3, 64, 64), ["empty batch"]),
    (lambda: torch.rand(3, 64, 64), ["(B, 3, H, W)"]),
    (lambda: torch.rand(1, 4, 64, 64), ["RGB"]),
    (lambda: torch.rand(1, 3, 64, 64).tolist(), ["a tensor", "list"]),
]


@pytest.mark.parametrize("who", ["Stage A", "Stage A training", "the semantic compressor"])
@pytest.mark.parametrize("make,fragments", BAD_IMAGES)
def test_bad_images_get_one_clear_error(image_models, who, make, fragments):
    with pytest.raises(ValueError) as e:
        image_models[who](make())
    message = str(e.value)
    assert "\n" not in message and who.replace(" training", "") in message
    for fragment in fragments:
        assert fragment in message


def test_images_at_the_ends_of_the_range_pass(image_models):
    images = torch.rand(2, 3, 64, 64)
    images[0, 0, 0, 0], images[1, 2, 5, 5] = 0.0, 1.0
    for model in image_models.values():
        out = model(images)
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out).all()


def test_stage_a_refuses_empty_latents():
    with pytest.raises(ValueError, match=r"B, h, w >= 1"):
        StageA(TINY_A).decode(torch.zeros(0, 4, 8, 8))


def test_shape_only_runs_skip_the_value_check():
    """Meta tensors (the benchmarks' FLOP counts) carry no values: shapes are still checked."""
    with torch.device("meta"):
        model = StageA(TINY_A)
        assert model.encode(torch.empty(1, 3, 64, 64)).shape == (1, 4, 16, 16)
        with pytest.raises(ValueError, match="RGB"):
            model.encode(torch.empty(1, 4, 64, 64))


# -- variations and img2img: the image, the strength and the compressor ------------------------------
@pytest.fixture(scope="module")
def image_pipe(bundle):
    return load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                              bundle / "stage_a.safetensors", compressor=bundle / "compressor.safetensors")


@pytest.fixture
def image_file(tmp_path):
    from PIL import Image

    path = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("extra,fragments", [
    (["--strength", "0.5"], ["--strength applies to img2img", "--image"]),  # no --image
    (["--image", "IMAGE", "--strength", "0.5", "--no-prompt"], ["--strength applies to img2img", "a prompt"]),
    (["--image", "IMAGE", "--strength", "0"], ["--strength", "(0, 1]"]),
    (["--image", "IMAGE", "--strength", "1.5"], ["--strength", "(0, 1]"]),
    (["--image", "IMAGE", "--strength", "nan"], ["--strength", "(0, 1]"]),
    (["--image", "IMAGE", "--strength", "half"], ["--strength", "not a number"]),
    (["--image", "MISSING"], ["--image", "not found"]),
    (["--image", "FOLDER"], ["--image", "is a folder"]),
    (["--image", "TEXT"], ["--image", "not a readable image"]),
    (["--image", "TINY"], ["at least 42x42", "semantic compressor"]),
    (["--dtype", "float64"], ["--dtype", "invalid choice"]),
])
def test_bad_image_requests_are_refused_before_any_model_is_loaded(bundle, image_file, tmp_path, capsys,
                                                                   monkeypatch, extra, fragments):
    from PIL import Image

    (tmp_path / "folder").mkdir()
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (30, 30)).save(tmp_path / "tiny.png")
    paths = {"IMAGE": image_file, "MISSING": tmp_path / "none.png", "FOLDER": tmp_path / "folder",
             "TEXT": tmp_path / "notes.png", "TINY": tmp_path / "tiny.png"}
    extra = [str(paths.get(e, e)) for e in extra]
    monkeypatch.setattr(cli, "load_any_text_to_image", lambda *a, **k: pytest.fail("a model was loaded"))
    prompt = [] if "--no-prompt" in extra else ["sun"]
    extra = [e for e in extra if e != "--no-prompt"]
    argv = _argv(bundle, tmp_path / "x.png", *extra)[1:]  # _argv starts with the prompt
    code, err = run_main(main, [*prompt, *argv], capsys)
    assert code == 2 and not (tmp_path / "x.png").exists()
    assert_error(code, err, *fragments)


def test_neither_prompt_nor_image_is_named(bundle, tmp_path, capsys):
    code, err = run_main(main, _argv(bundle, tmp_path / "x.png")[1:], capsys)
    assert_error(code, err, "give one or more prompts, or --image")


@pytest.mark.parametrize("call,fragment", [
    (lambda p: p.variations(torch.rand(1, 3, 64, 64) * 255), r"variations expects images in \[0, 1\]"),
    (lambda p: p.variations((torch.rand(1, 3, 64, 64) * 255).byte()), "float images"),
    (lambda p: p.variations(torch.rand(1, 4, 64, 64)), "RGB"),
    (lambda p: p.variations(torch.rand(1, 3, 30, 64)), "at least 42x42"),
    (lambda p: p.variations(torch.rand(1, 3, 64, 64), images_per_image=0), "images_per_image must be at least 1"),
    (lambda p: p.variations(torch.rand(1, 3, 64, 64), decoder_steps=0), "decoder_steps must be at least 1"),
    (lambda p: p("sun", image=torch.rand(1, 3, 64, 64), strength=0.0), r"strength must be in \(0, 1\]"),
    (lambda p: p("sun", image=torch.rand(1, 3, 64, 64), strength=True), "strength must be a number"),
    (lambda p: p("sun", strength=0.5), "strength applies to img2img only"),
    (lambda p: p(["a", "b", "c"], image=torch.rand(2, 3, 64, 64)), "2 images for 3 prompt"),
    (lambda p: p("sun", image=torch.rand(1, 3, 64, 64).fill_(float("nan"))), "NaN"),
])
def test_api_image_arguments_are_named(image_pipe, monkeypatch, call, fragment):
    monkeypatch.setattr(Prior, "sample", lambda *a, **k: pytest.fail("sampling started"))
    monkeypatch.setattr(type(image_pipe.decoder), "forward", lambda *a, **k: pytest.fail("decoding started"))
    with pytest.raises(ValueError, match=fragment) as e:
        call(image_pipe)
    assert "\n" not in str(e.value)


def test_a_pipeline_without_compressor_names_the_fix(pipe):
    with pytest.raises(ValueError, match="no semantic compressor; load it with compressor=PATH"):
        pipe.variations(torch.rand(1, 3, 64, 64))


def test_another_compressor_is_refused(bundle, tmp_path):
    other = SemanticCompressor(pretrained=False, trainable="none")
    with torch.no_grad():
        other.mapper[0].weight.mul_(2)
    with pytest.raises(ValueError, match="is not the one Stage C was trained on"):
        load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                           bundle / "stage_a.safetensors", compressor=other)
