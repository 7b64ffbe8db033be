"""The C -> B -> A sampler: CLI outputs, reproducibility, sizes, and clear errors for bad input."""
import argparse
import json

import pytest
import torch

import sample.evaluate as evaluate_module
from common.errors import run_command
from imagedata.embedded import openmoji_split
from pipeline.text_to_image import load_text_to_image
from sample.__main__ import main
from sample.compare import main as compare
from sample.evaluate import ValScorer, latent_gallery, nearest_training_images, top5_hits, whole_set, without_skin_tone
from sample.evaluate import main as evaluate
from sample.sweep import main as sweep
from stages.pixel_decoder import ShallowUViT, grow, growth_plan
from stages.stage_a import StageA
from stages.stage_c import StageC
from tests.tiny_stages import TINY_C, randomised
from weights.checkpoint import fingerprint, save_safetensors
from weights.loaders import load_compressor


def sample_main(argv):
    """``python -m sample`` in-process: bad input ends in a one-line error and exit status 2."""
    return run_command(main, argv)


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    """A consistent set of tiny random stages, exported as the training modules export them (read only)."""
    return tiny_bundle


def _args(bundle, *extra):
    return ["--stage-c", str(bundle / "stage_c.safetensors"), "--stage-b", str(bundle / "stage_b.safetensors"),
            "--prior-steps", "2", "--decoder-steps", "2", "--quiet", *extra]


def test_cli_writes_an_image_and_prints_where(bundle, tmp_path, capsys):
    out = tmp_path / "apple.png"
    sample_main(["a red apple", "--out", str(out), *_args(bundle)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["image"] == str(out) and out.exists()
    from PIL import Image
    assert Image.open(out).size == (128, 128)


def test_batches_grid_and_reproducible_seeds(bundle, tmp_path):
    pipe = load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                              bundle / "stage_a.safetensors")
    kw = dict(height=64, width=64, images_per_prompt=2, prior_steps=2, decoder_steps=[1.0, 0.5, 0.0], progress=False)
    one = pipe(["red apple", "café ☕ 寿司"], seed=1, **kw)
    assert one.shape == (4, 3, 64, 64)
    assert torch.equal(one, pipe(["red apple", "café ☕ 寿司"], seed=1, **kw))
    assert not torch.equal(one, pipe(["red apple", "café ☕ 寿司"], seed=2, **kw))
    images, latents = pipe(["red apple", "café ☕ 寿司"], seed=1, return_latents=True, **kw)
    assert torch.equal(images, one) and latents.shape[:2] == (4, 16)  # Stage C's latents beside the same images
    paths = sample_main(["red apple", "sun", "--n", "2", "--out", str(tmp_path / "g.png"), *_args(bundle)])
    assert len(paths) == 5 and all(p.exists() for p in paths)  # grid + 4 single images


def test_png_carries_its_settings_and_a_command_that_makes_it_again(bundle, tmp_path):
    import shlex

    import numpy as np
    from PIL import Image

    out = tmp_path / "first.png"
    sample_main(["-5 degrees", "café ☕", "--out", str(out), *_args(bundle), "--height", "64", "--seed", "5",
                 "--prior-steps", "1,0.5,0", "--sampler", "ddim", "--eta", "0.3", "--n", "2"])
    text = Image.open(out).text
    settings = json.loads(text["settings"])
    assert (settings["prompts"], settings["seed"], settings["height"], settings["width"]) == (
        ["-5 degrees", "café ☕"], 5, 64, None)
    assert (settings["prior_steps"], settings["sampler"], settings["eta"], settings["n"]) == ([1.0, 0.5, 0.0], "ddim",
                                                                                              0.3, 2)
    assert "out" not in settings and "quiet" not in settings  # where the images go does not decide them
    words = shlex.split(text["command"])
    assert words[:3] == ["python", "-m", "sample"] and words[-3:] == ["--", "-5 degrees", "café ☕"]
    again = tmp_path / "again.png"
    words[words.index("--out") + 1] = str(again)
    sample_main(["--quiet", *words[3:]])
    for name in ("", "_0", "_3"):  # the grid and the single images
        first, second = (Image.open(tmp_path / f"{stem}{name}.png") for stem in ("first", "again"))
        assert np.array_equal(np.asarray(first), np.asarray(second))
        assert json.loads(second.text["settings"]) == settings


def test_callback_sees_every_step_of_each_stage_and_can_stop_the_work(bundle):
    pipe = load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                              bundle / "stage_a.safetensors")
    seen = []
    pipe("sun", height=96, width=64, prior_steps=3, decoder_steps=2, progress=False, callback=seen.append)
    assert [(s["stage"], s["i"], s["steps"]) for s in seen] == [("Stage C", 0, 3), ("Stage C", 1, 3), ("Stage C", 2, 3),
                                                                ("Stage B", 0, 2), ("Stage B", 1, 2)]
    assert seen[0]["semantic"].shape[:2] == (1, 16) and seen[0]["x0"] is not None  # DDPM reports its x0 too
    seen.clear()
    pipe.decoder.default_steps = 3  # no decoder_steps: the decoder's own default, as for variations
    pipe("sun", height=64, width=64, prior_steps=1, progress=False, callback=seen.append)
    assert [(s["stage"], s["steps"]) for s in seen][1:] == [("Stage B", 3)] * 3

    def stop(state):
        if state["i"] == 1:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        pipe("sun", height=64, width=64, prior_steps=3, decoder_steps=2, progress=False, callback=stop)


def test_sizes_are_rounded_to_the_grid_with_a_note(bundle, tmp_path, capsys):
    sample_main(["sun", "--height", "100", "--width", "150", "--out", str(tmp_path / "s.png"), *_args(bundle)])
    captured = capsys.readouterr()
    assert json.loads(captured.out.strip().splitlines()[-1])["size"] == [112, 160]  # multiples of 16 px
    assert "rounded up to 112x160" in captured.err


def test_odd_prompts_work_with_notes(bundle, tmp_path, capsys):
    sample_main(["", "--out", str(tmp_path / "e.png"), *_args(bundle)])
    assert "unconditionally" in capsys.readouterr().err
    sample_main([" ".join(["word"] * 1000), "--out", str(tmp_path / "long.png"), *_args(bundle)])
    assert "truncated" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [
    (["--prior-steps", "0"], "at least 1"),
    (["--decoder-steps", "-3"], "at least 1"),
    (["--height", "-5"], "at least 1"),
    (["--n", "0"], "at least 1"),
])
def test_bad_numbers_are_named(bundle, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        sample_main(["sun", "--out", str(tmp_path / "x.png"), *_args(bundle), *extra])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_and_mismatched_checkpoints_are_named(bundle, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sample_main(["sun", "--out", str(tmp_path / "x.png"), *_args(bundle), "--stage-c", str(tmp_path / "none.safetensors")])
    assert "not found" in capsys.readouterr().err
    other_a = randomised(StageA(dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64)))
    save_safetensors(other_a, tmp_path / "other_a.safetensors", "stage_a", other_a.config.to_dict())
    with pytest.raises(SystemExit):
        sample_main(["sun", "--out", str(tmp_path / "x.png"), *_args(bundle), "--stage-a", str(tmp_path / "other_a.safetensors")])
    assert "different Stage A" in capsys.readouterr().err
    c = StageC(TINY_C)
    save_safetensors(c, tmp_path / "c.safetensors", "stage_c", c.config.to_dict(),
                     extra={"compressor_fingerprint": "0123456789abcdef", "text_encoder": "minilm"})
    with pytest.raises(SystemExit):
        sample_main(["sun", "--out", str(tmp_path / "x.png"), *_args(bundle), "--stage-c", str(tmp_path / "c.safetensors")])
    assert "different semantic compressor" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a Stage B file given as Stage C
        sample_main(["sun", "--out", str(tmp_path / "x.png"), *_args(bundle), "--stage-c", str(bundle / "stage_b.safetensors")])
    assert "stage_b model, not a stage_c" in capsys.readouterr().err


def test_existing_output_is_never_overwritten(bundle, tmp_path, capsys):
    out = tmp_path / "keep.png"
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit):
        sample_main(["sun", "--out", str(out), *_args(bundle)])
    assert out.read_bytes() == b"precious" and "exists" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_prints_scores_for_text_to_image_and_true_latents(bundle, openmoji_dir, tmp_path):
    out = tmp_path / "eval.json"
    args = ["--stage-c", str(bundle / "stage_c.safetensors"), "--stage-b", str(bundle / "stage_b.safetensors"),
            "--stage-a", str(bundle / "stage_a.safetensors"), "--data-dir", str(openmoji_dir), "--size", "64",
            "--limit", "4", "--gallery-limit", "8", "--prior-steps", "2", "--decoder-steps", "2", "--batch-size", "4",
            "--out", str(out)]
    report = evaluate(args)
    assert json.loads(out.read_text()) == report
    assert report["n_captions"] == 4 and report["gallery_size"] == 8 and report["chance_top5"] == 0.625
    for scores in (report, report["from_true_latents"]):
        assert scores["fid_vs_val"] > 0
        for key in ("top5_retrieval_own_caption", "top5_retrieval_shuffled_captions"):
            assert 0 <= scores[key] <= 1
    latent_scores = report["stage_c_latent_retrieval"]
    assert set(latent_scores) == {"top5_own_caption", "top5_shuffled_captions", "mean_cosine_to_own_latents"}
    assert all(0 <= v <= 1 for v in latent_scores.values() if v is not latent_scores["mean_cosine_to_own_latents"])
    assert -1 <= latent_scores["mean_cosine_to_own_latents"] <= 1
    with pytest.raises(FileExistsError, match="exists"):  # never overwrites a report
        evaluate(args)
    everyday = report["everyday"]
    assert everyday["n_captions"] == 4 and "fid_vs_val" not in everyday  # too few images for FID
    for scores in (everyday, everyday["from_true_latents"], everyday["stage_a_alone"], report["stage_a_alone"]):
        assert 0 <= scores["top5_retrieval_own_caption"] <= 1

    # no Stage C: only the decoder's and Stage A's ceilings, on the sets asked for
    ceilings = evaluate([*args[2:-2], "--stage-c", "none", "--prompt-sets", "val", "--noised-latents", "0.01,0.9"])
    assert ceilings["stage_c"] == "none" and "everyday" not in ceilings
    noised = ceilings["from_noised_latents"]  # the decoder from noised true latents
    assert set(noised) == {"t=0.01", "t=0.9"} and "fid_vs_val" in noised["t=0.9"]
    assert all(-1 <= scores["mean_cosine_to_true_latents"] < 1 for scores in noised.values())
    assert "top5_retrieval_own_caption" not in ceilings and "stage_c_latent_retrieval" not in ceilings
    assert ceilings["from_true_latents"] == report["from_true_latents"]  # same seeds, same decoder
    assert ceilings["stage_a_alone"] == report["stage_a_alone"]

    # more draws per caption: the first is the single-draw report's (same seeds)
    drawn = evaluate([*args[:-2], "--prompt-sets", "everyday", "--skip-ceilings", "--draws", "3"])["everyday"]
    assert drawn["draws"]["n"] == 3 and len(drawn["draws"]["per_draw"]) == 3
    assert drawn["draws"]["per_draw"][0] == everyday["top5_retrieval_own_caption"]
    assert drawn["draws"]["top5_retrieval_own_caption_mean"] == pytest.approx(sum(drawn["draws"]["per_draw"]) / 3,
                                                                              abs=1e-4)


def test_evaluate_refuses_noise_times_outside_the_schedule_and_draws_without_a_cascade(capsys):
    for bad in ("0", "1.5", "0.2,x", ""):
        with pytest.raises(SystemExit):
            evaluate(["--noised-latents", bad])
        assert "times in (0, 1)" in capsys.readouterr().err
    for bad in (["--stage-c", "none"], ["--baseline-ldm", "x.safetensors"]):
        with pytest.raises(SystemExit):
            evaluate(["--draws", "2", *bad])
        assert "--draws repeats the cascade's" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate(["--draws", "0"])


def test_latent_gallery_follows_the_inception_gallery_order_and_is_cached(bundle, openmoji_dir, monkeypatch):
    compressor = load_compressor(bundle / "compressor.safetensors")
    images, captions = whole_set(str(openmoji_dir), 64, limit=6)
    latents = latent_gallery(str(openmoji_dir), compressor, 64, batch_size=4, limit=6)
    assert len(captions) == 6 and latents.shape[0] == 6
    with torch.no_grad():
        assert torch.allclose(latents[5], compressor(images[5:6]).flatten(), atol=1e-5)
    cache = openmoji_dir / f"compressor_gallery_64_first6_{fingerprint(compressor)}.pt"
    assert cache.is_file()  # the next evaluation with this compressor reads it instead of encoding the set
    monkeypatch.setattr(evaluate_module, "whole_set", None)
    assert torch.equal(latent_gallery(str(openmoji_dir), compressor, 64, batch_size=4, limit=6), latents)


def test_nearest_training_image_is_the_nearest_of_another_caption_by_compressor_latents(bundle, openmoji_dir):
    compressor = load_compressor(bundle / "compressor.safetensors")
    args = argparse.Namespace(data_dir=str(openmoji_dir), size=64, batch_size=8, gallery_limit=190)  # 185 val, 5 train
    train = openmoji_split(str(openmoji_dir), "train", 64, limit=5)
    gallery = [s["caption"] for s in openmoji_split(str(openmoji_dir), "val", 64)] + [s["caption"] for s in train]
    images = torch.stack([s["image"] for s in train])
    with torch.no_grad():
        latents = compressor(images)
    # captions the training set lacks: each training image's own latents recall that very image
    assert torch.equal(nearest_training_images(latents, ["no such emoji"] * 5, compressor, gallery, args), images)
    # their own captions: the image itself is never recalled, another training image is
    recalled = nearest_training_images(latents, [s["caption"] for s in train], compressor, gallery, args)
    assert recalled.shape == images.shape and not any(torch.equal(r, i) for r, i in zip(recalled, images))
    assert all(any(torch.equal(r, i) for i in images) for r in recalled)
    args.gallery_limit = 20  # val images only: nothing to recall
    assert nearest_training_images(latents, ["no such emoji"] * 5, compressor, gallery[:20], args) is None


def test_top5_hits_counts_the_target_among_the_five_nearest():
    gallery = torch.eye(8)
    captions = [f"emoji {i}" for i in range(8)]
    generated = torch.eye(8)[:2] + 0.01
    assert top5_hits(generated, gallery, captions, ["emoji 0", "emoji 1"]) == 1.0
    far = torch.eye(8)[[7, 7]]  # nearest: emoji 7, then 3-6; emoji 0 is sixth or later
    far[:, 3:7] = 0.5
    assert top5_hits(far, gallery, captions, ["emoji 0", "emoji 0"]) == 0.0


def test_skin_tone_scores_tell_a_missed_emoji_from_a_missed_skin_tone():
    assert without_skin_tone("kiss person person medium-light skin tone dark skin tone") == "kiss person person"
    assert without_skin_tone("dark sunglasses") == "dark sunglasses"
    scorer = object.__new__(ValScorer)  # the gallery and captions only; no Inception network needed
    scorer.gallery_feats = torch.eye(8)
    scorer.gallery_captions = ["wave", "wave light skin tone", "wave dark skin tone", "apple", *"bcde"]
    scorer.captions = ["wave dark skin tone", "apple", "wave"]
    feats = torch.eye(8)[[1, 3, 7]]
    feats[0, 3:] = 0.5  # nearest: wave light skin tone, then apple, b-e: the right emoji, the wrong skin tone
    feats[2, 3:7] = 0.5  # nearest: e, then apple, b-d: no wave
    scores = scorer.by_skin_tone(feats, [0])
    assert scores == {"skin_tone_captions": {"n": 1, "top5_own": 0.0, "top5_own_any_skin_tone": 1.0},
                      "other_captions": {"n": 2, "top5_own": 0.5}}  # apple found, wave not


def test_compare_refuses_a_stage_b_of_another_compressor_before_work(bundle, tmp_path):
    c = StageC(TINY_C)
    save_safetensors(c, tmp_path / "c.safetensors", "stage_c", c.config.to_dict(),
                     extra={"compressor_fingerprint": "0123456789abcdef", "text_encoder": "minilm"})
    with pytest.raises(ValueError, match=r"different semantic compressor .* than the one Stage B"):
        compare(["--stage-c", str(tmp_path / "c.safetensors"), "--stage-b", str(bundle / "stage_b.safetensors"),
                 "--stage-a", str(bundle / "stage_a.safetensors"), "--compressor", str(bundle / "compressor.safetensors"),
                 "--out", str(tmp_path / "cmp")])


@pytest.mark.slow
def test_compare_writes_table_json_and_grid_for_every_decoder(bundle, openmoji_dir, tmp_path, capsys):
    small = dict(resolution=32, core_grid=8, entry_channels=16, width=32, depth=1, heads=2, c_t=32,
                 **{k: list(v) for k, v in growth_plan((8, 16, 16), blocks=(0, 1, 1)).items()})
    grown = randomised(grow(ShallowUViT(small), 64))
    pixel = tmp_path / "pixel.safetensors"
    save_safetensors(grown, pixel, "pixel_decoder", grown.config.to_dict(), extra={
        "compressor_fingerprint": fingerprint(load_compressor(bundle / "compressor.safetensors")),
        "semantic_size": 64, "logsnr_shift": -1.39, "init_from": "phase1", "global_step": 10, "wall_time_s": 60.0,
        "init_global_step": 20, "init_wall_time_s": 120.0})
    out = tmp_path / "cmp"
    args = ["--stage-c", str(bundle / "stage_c.safetensors"), "--stage-b", str(bundle / "stage_b.safetensors"),
            "--stage-a", str(bundle / "stage_a.safetensors"), "--pixel", f"greedy={pixel}",
            "--pixel", f"again={pixel}", "--data-dir", str(openmoji_dir), "--size", "64", "--limit", "4",
            "--gallery-limit", "8", "--prior-steps", "2", "--decoder-steps", "2", "--batch-size", "4",
            "--grid-columns", "3", "--out", str(out)]
    report = compare(args)
    assert json.loads((out / "compare.json").read_text()) == report
    rows = {r["decoder"]: r for r in report["decoders"]}
    assert list(rows) == ["stage_b+stage_a", "greedy", "again"]
    assert rows["greedy"]["train_wall_min"] == 3.0 and rows["greedy"]["train_steps"] == "20 + 10"
    assert rows["greedy"]["params_M"] == round(sum(p.numel() for p in grown.parameters()) / 1e6, 2)
    for key in ("recon_psnr", "recon_lpips", "recon_fid", "t2i_fid", "s_per_image"):
        assert rows["greedy"][key] > 0 and rows["stage_b+stage_a"][key] > 0
    timeless = lambda row: {k: v for k, v in row.items() if k not in ("decoder", "s_per_image")}
    assert timeless(rows["greedy"]) == timeless(rows["again"])  # same weights, same seeds: same figures
    table = (out / "compare.md").read_text()
    assert table.count("\n| ") == 3 and "| greedy | " in table
    from PIL import Image
    assert Image.open(out / "compare.png").size == (200 + 3 * 66, 7 * 66)  # real + 2 rows per decoder
    with pytest.raises(FileExistsError, match="not empty"):  # never writes into a non-empty folder
        compare(args)
    with pytest.raises(SystemExit):
        compare([*args[:-1], str(tmp_path / "cmp2"), "--pixel", "no-equals-sign"])
    assert "NAME=PATH" in capsys.readouterr().err
    for bad, message in ((["--pixel", f"greedy={pixel}", "--pixel", f"greedy={pixel}"], "names must differ"),
                         (["--decoder-steps", "0"], "must be at least 1")):
        with pytest.raises((SystemExit, ValueError)) as exit_info:  # before any work, nothing written
            compare([*args[:-1], str(tmp_path / "cmp3"), *bad])
        assert message in str(exit_info.value) + capsys.readouterr().err and not (tmp_path / "cmp3").exists()


def test_sampler_flags_choose_each_stage_and_bad_ones_fail_before_loading(bundle, tmp_path, capsys):
    pipe = load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                              bundle / "stage_a.safetensors")
    common = dict(prompts=["a red apple"], prior_steps=3, decoder_steps=3, seed=4, progress=False)
    ddpm = pipe(**common)
    assert torch.equal(ddpm, pipe(**common, prior_sampler="ddpm", decoder_sampler="ddpm"))
    for sampler in ("ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        other = pipe(**common, prior_sampler=sampler, decoder_sampler=sampler)
        assert other.shape == ddpm.shape and not torch.equal(other, ddpm)
    out = tmp_path / "apple.png"
    sample_main(["a red apple", "--out", str(out), "--sampler", "ddim", "--eta", "0.5",
                 "--decoder-sampler", "dpmpp_2m", *_args(bundle)])
    assert out.exists()
    for extra, message in [(["--sampler", "euler"], "invalid choice: 'euler'"),
                           (["--prior-sampler", "ddim", "--prior-eta", "1.5"], "eta must be between 0"),
                           (["--decoder-eta", "0.5"], "the ddpm sampler takes no eta"),
                           (["--eta", "0.5"], "the ddpm sampler takes no eta"),
                           (["--prior-steps", "release"], "not a step count")]:
        with pytest.raises(SystemExit):
            sample_main(["x", "--out", str(tmp_path / "bad.png"), *_args(bundle)[:-1], *extra,
                         "--stage-b", str(tmp_path / "missing.safetensors")])  # never reached: checks come first
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()


@pytest.mark.slow  # three scored settings per part, Inception included
def test_sweep_writes_tables_plot_and_resumes(bundle, openmoji_dir, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["--stage-c", str(bundle / "stage_c.safetensors"), "--stage-b", str(bundle / "stage_b.safetensors"),
            "--stage-a", str(bundle / "stage_a.safetensors"), "--data-dir", str(openmoji_dir), "--size", "64",
            "--limit", "4", "--gallery-limit", "8", "--batch-size", "4", "--samplers", "ddpm,dpmpp_2m",
            "--prior-step-list", "1,2", "--decoder-step-list", "1,2", "--fast", "1,1", "--out", str(out)]
    report = sweep(args)
    assert {r["sweep"] for r in report["rows"]} == {"stage_c", "stage_b", "cascade"}
    assert len(report["rows"]) == 1 + 2 + 2 * (2 + 2)
    first = next(r for r in report["rows"] if r["sweep"] == "stage_c")
    assert first["prior_nfe"] == 2 * first["prior_steps"] and first["fid"] > 0 and 0 <= first["top5_own"] <= 1
    assert (out / "sweep.md").read_text().count("| ddpm 1 |") >= 1 and (out / "sweep.png").stat().st_size > 0
    settings = sorted((out / "settings").iterdir())
    stamps = [p.stat().st_mtime_ns for p in settings]
    resumed = sweep([*args, "--parts", "stage_b"])["rows"]  # every setting read back, none recomputed
    assert resumed == [r for r in report["rows"] if r["sweep"] == "stage_b"]
    assert [p.stat().st_mtime_ns for p in settings] == stamps
    with pytest.raises(ValueError, match="other options"):
        sweep([*args[:-2], "--samplers", "ddim", "--out", str(out)])
