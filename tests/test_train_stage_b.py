"""Stage B training: CLI run outputs, semantic reconstruction, Stage A pairing, clear errors."""
import json

import pytest
import torch

from weights.checkpoint import save_safetensors, fingerprint
from stages.stage_a import StageA
from train.cli import main as cli_main
from weights.loaders import load_stage_b, load_compressor
from pipeline.decoders import load_semantic_decoder
from sample.evaluate_stage_b import main as evaluate
from train.stage_b import StageBTraining

TINY_A = dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64)
TINY_B = dict(widths=[16, 32, 32], blocks=[1, 1, 1], heads=[0, 2, 2], inject_semantic=[False, True, True],
              c_cond=16, c_text=None, dropout=0.0)


@pytest.fixture(scope="module")
def stage_a_file(tmp_path_factory):
    torch.manual_seed(0)
    model = StageA(TINY_A)
    return save_safetensors(model, tmp_path_factory.mktemp("a") / "model.safetensors", "stage_a",
                            model.config.to_dict())


def _fit(root, openmoji_dir, stage_a, steps=4, extra=(), config="configs/stage_b/tiny.yaml"):
    cli_main(["fit", "--config", config,
              "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.log_every_n_steps", "1",
              "--model.init_args.size", json.dumps(TINY_B), "--model.init_args.stage_a", str(stage_a),
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "64",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--data.init_args.val_batch_size", "4", *extra])


@pytest.mark.slow
def test_cli_fit_writes_weights_grids_and_metrics(openmoji_dir, stage_a_file, tmp_path):
    _fit(tmp_path / "runs", openmoji_dir, stage_a_file)
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert list((run / "samples").glob("semantic_recon_step*.png"))
    metrics = (run / "metrics.csv").read_text()
    assert "val/fid" in metrics and "val/lpips" in metrics and "train/loss" in metrics
    from safetensors import safe_open

    model = load_stage_b(str(run / "model.safetensors"))
    assert model.config.widths == (16, 32, 32)
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["stage_a_config"])["widths"] == [8, 16]
    with safe_open(str(run / "compressor.safetensors"), "pt") as f:
        assert f.metadata()["stage"] == "semantic_compressor"
    # frozen networks (Stage A, LPIPS, Inception) are not stored in the Lightning checkpoint
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not any(k.startswith(("stage_a.", "perceptual.", "val_fid.")) for k in ckpt["state_dict"])
    assert ckpt["stage"] == "stage_b" and len(ckpt["stage_a_fingerprint"]) == 16
    assert load_stage_b(str(run / "checkpoints" / "last.ckpt")).config == model.config

    # the decoder finds the Stage A that Stage B recorded, and refuses any other
    assert load_semantic_decoder(run).stage_a.config.widths == (8, 16)
    other = StageA(TINY_A)
    with torch.no_grad():
        other.decoder[0].weight.add_(0.1)
    other_file = save_safetensors(other, tmp_path / "other_a.safetensors", "stage_a", other.config.to_dict())
    with pytest.raises(ValueError, match="different Stage A"):
        load_semantic_decoder(run, other_file)

    # the evaluation prints JSON for own and shuffled latents, and never overwrites its --out
    out = tmp_path / "eval.json"
    report = evaluate(["--checkpoint", str(run), "--data-dir", str(openmoji_dir), "--size", "64", "--limit", "6",
                       "--steps", "2", "--batch-size", "3", "--out", str(out)])
    assert json.loads(out.read_text()) == report
    for key in ("own_latents", "shuffled_latents"):
        assert set(report[key]) == {"lpips", "psnr", "fid"}
    assert report["n_images"] == 6
    with pytest.raises(FileExistsError, match="exists"):
        evaluate(["--checkpoint", str(run), "--out", str(out)])


@pytest.mark.slow
def test_resume_with_another_stage_a_is_refused(openmoji_dir, stage_a_file, tmp_path):
    # Stage B follows the newest export in a Stage A run folder; a Stage A retrained in the meantime
    # must not be silently paired with a Stage B checkpoint trained on the earlier one
    a_run = tmp_path / "stage_a"
    (a_run / "version_0").mkdir(parents=True)
    (a_run / "version_0" / "model.safetensors").write_bytes(stage_a_file.read_bytes())
    _fit(tmp_path / "runs", openmoji_dir, a_run, steps=2)
    ckpt = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    other = StageA(TINY_A)
    with torch.no_grad():
        other.decoder[0].weight.add_(0.1)
    save_safetensors(other, a_run / "version_1" / "model.safetensors", "stage_a", other.config.to_dict())
    with pytest.raises(ValueError, match="different Stage A"):
        _fit(tmp_path / "runs", openmoji_dir, a_run, steps=3, extra=["--ckpt_path", str(ckpt)])


def test_cached_backbone_features_train_the_compressor_head(stage_a_file):
    """With only the compressor's head trainable, cache_latents keeps the backbone's features per image; the head
    runs each step with gradients and gives what the whole compressor gives."""
    module = StageBTraining(size=TINY_B, stage_a=str(stage_a_file), cache_latents=True, val_fid=False,
                            compressor={"trainable": "head", "pretrained": False, "input_scale": 2})
    module.compressor.eval()  # the head's BatchNorm on running statistics: both paths see the same normalisation
    batch = {"image": torch.rand(2, 3, 64, 64), "key": ["a", "b"]}
    semantic = module.encode("semantic", batch, train=True)
    assert {k for k in module.latent_cache if k[0] == "backbone"} == {("backbone", "a"), ("backbone", "b")}
    assert semantic.shape == (2, 16, 4, 4)  # input_scale 2: a 4x4 grid at 64 px
    assert torch.allclose(semantic, module.compressor(batch["image"]), atol=1e-5)
    semantic.square().sum().backward()
    assert module.compressor.mapper[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.compressor.backbone.parameters())


def test_mismatched_text_setting_is_named(stage_a_file, tmp_path):
    wide = StageA(dict(TINY_A, latent_channels=8))  # a Stage A whose latents Stage B cannot take
    wide_file = save_safetensors(wide, tmp_path / "wide.safetensors", "stage_a", wide.config.to_dict())
    with pytest.raises(ValueError, match="8 latent channels"):
        StageBTraining(size=TINY_B, stage_a=str(wide_file), val_fid=False)

    with pytest.raises(ValueError, match="text_encoder"):
        StageBTraining(size=TINY_B, stage_a=str(stage_a_file), text_encoder="minilm", val_fid=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        StageBTraining(size=TINY_B, stage_a="no/such/model.safetensors", val_fid=False)


def test_semantic_decoder_gives_images_of_the_asked_size(stage_a_file):
    module = StageBTraining(size=dict(TINY_B, c_text=384), stage_a=str(stage_a_file), text_encoder="minilm",
                            val_fid=False, sample_steps=2, guidance=2.0).eval()
    images = torch.rand(2, 3, 64, 96)
    x0, (semantic, text) = module.inputs({"image": images, "caption": ["red apple", ""]}, train=False)
    assert x0.shape == (2, 4, 16, 24) and semantic.shape == (2, 16, 2, 3) and text.shape == (2, 77, 384)
    real, out = module.validation_images({"image": images, "caption": ["red apple", "café ☕"]}, 0, None)
    assert real is images and out.shape == (2, 3, 64, 96) and 0 <= out.min() and out.max() <= 1


@pytest.mark.slow
def test_refine_continues_with_the_frozen_compressor_on_cached_latents(openmoji_dir, stage_a_file, tmp_path):
    from safetensors import safe_open

    _fit(tmp_path / "first", openmoji_dir, stage_a_file, steps=2)
    first = tmp_path / "first" / "tiny" / "version_0"
    _fit(tmp_path / "refine", openmoji_dir, stage_a_file, steps=3, config="configs/stage_b/tiny_refine.yaml",
         extra=["--model.init_args.init_from", str(first), "--model.init_args.compressor", str(first)])
    run = tmp_path / "refine" / "tiny" / "version_0"
    # the compressor is the first run's, unchanged: a Stage C trained on it still fits
    assert fingerprint(load_compressor(run)) == fingerprint(load_compressor(first))
    with safe_open(str(run / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["init_global_step"]) == 2 and json.loads(meta["global_step"]) == 3
    _fit(tmp_path / "again", openmoji_dir, stage_a_file, steps=2, config="configs/stage_b/tiny_refine.yaml",
         extra=["--model.init_args.init_from", str(run), "--model.init_args.compressor", str(first)])
    with safe_open(str(tmp_path / "again" / "tiny" / "version_0" / "model.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["init_global_step"]) == 2 + 3  # the whole chain
    before, after = load_stage_b(str(first / "model.safetensors")), load_stage_b(str(run / "model.safetensors"))
    assert any(not torch.equal(p, q) for p, q in zip(before.parameters(), after.parameters()))

    # cached latents are those of the frozen networks
    module = StageBTraining(size=TINY_B, stage_a=str(stage_a_file), compressor=str(first), init_from=str(first),
                            cache_latents=True, val_fid=False)
    batch = {"image": torch.rand(2, 3, 64, 64), "key": ["a", "b"]}
    x0, semantic = module.encode("stage_a", batch, train=True), module.encode("semantic", batch, train=True)
    assert set(module.latent_cache) == {(kind, k) for kind in ("stage_a", "semantic") for k in "ab"}
    assert torch.allclose(x0, module.stage_a.encode(batch["image"]))
    assert torch.allclose(semantic, module.compressor(batch["image"]))

    # mismatches are named before any training
    with pytest.raises(ValueError, match="frozen compressor backbone"):
        StageBTraining(size=TINY_B, stage_a=str(stage_a_file), cache_latents=True, val_fid=False,
                       compressor={"trainable": "all", "pretrained": False})
    with pytest.raises(ValueError, match="another size"):
        StageBTraining(size=dict(TINY_B, c_cond=8), stage_a=str(stage_a_file), compressor=str(first),
                       init_from=str(first), val_fid=False)
    # dropout changes no weight: a run may continue an export with another (regularising a trained decoder)
    dropped = StageBTraining(size=dict(TINY_B, dropout=0.2), stage_a=str(stage_a_file), compressor=str(first),
                             init_from=str(first), val_fid=False)
    assert dropped.model.config.dropout == 0.2
    assert all(torch.equal(p, q) for p, q in zip(dropped.model.parameters(), before.parameters()))
    with pytest.raises(ValueError, match="another semantic compressor"):  # a fresh compressor is not the one it used
        StageBTraining(size=TINY_B, stage_a=str(stage_a_file), init_from=str(first), val_fid=False)
