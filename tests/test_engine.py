"""The training engine: EMA and schedule parts, composition, precomputed-encoder checks, and every stage
(A, B, C, pixel decoder phases 1-3) trained by the CLI under 2-process DDP (gloo) in bf16-mixed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from train.engine import ema_of
from train.optim import WarmupCosine
from weights.loaders import load_compressor
from weights.checkpoint import fingerprint, read_metadata, save_safetensors
from train.stage_c import StageCTraining
from stages.stage_c import StageC
from stages import pixel_decoder, stage_a, stage_b, stage_c
from train.cli import main as cli_main
from train.precompute import main as precompute
from semantic_compressor import SemanticCompressor

ROOT = Path(__file__).resolve().parents[1]
GRID3_COMPRESSOR = ROOT / "checkpoints" / "tiny_grid3" / "compressor.safetensors"


def test_ema_warms_up_then_decays_at_the_set_rate():
    net = nn.Linear(2, 2)
    ema = ema_of(net, decay=0.9)
    assert not any(p.requires_grad for p in ema.parameters())  # never seen by DDP or the optimizer
    expected = net.weight.detach().clone()  # the first update copies
    for n in range(30):
        with torch.no_grad():
            net.weight.add_(1.0)
        ema.update_parameters(net)
        if n:
            d = min(0.9, (1 + n) / (10 + n))
            expected = d * expected + (1 - d) * net.weight.detach()
        else:
            expected = net.weight.detach().clone()
    assert torch.allclose(ema.module.weight, expected, atol=1e-5)
    assert ema.n_averaged.item() == 30


def test_warmup_cosine_factors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = WarmupCosine(opt, warmup_steps=4, total_steps=20, final=0.1)
    lrs = []
    for _ in range(21):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2.0 * 0.25 * (0.1 + 0.9 * 0.5 * (1 + math.cos(0))))
    assert lrs[3] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 20))))
    assert lrs[20] == pytest.approx(0.2)
    constant = WarmupCosine(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), warmup_steps=0)
    assert constant.get_last_lr() == [1.0]
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(opt, total_steps=0)


def test_precomputed_shards_of_other_encoders_are_refused(tmp_path):
    module = StageCTraining(size=dict(width=32, depth=1, heads=2, c_text=384, dropout=0.0),
                            compressor=str(GRID3_COMPRESSOR))

    class Trainer:  # what setup() reads: the data module's manifest
        datamodule = type("Data", (), {"precomputed": {"compressor_fingerprint": "0123456789abcdef"}})()

    module._trainer = Trainer()
    with pytest.raises(ValueError, match="precompute them again"):
        module.setup("fit")
    Trainer.datamodule.precomputed = {"compressor_fingerprint": fingerprint(load_compressor(GRID3_COMPRESSOR))}
    module.setup("fit")  # the same weights: accepted
    # a batch that carries the latents is not encoded again
    latents = torch.randn(2, 16, 2, 2)
    got = module.target(module, {"semantic": latents.half(), "caption": ["a", "b"], "key": ["a", "b"]}, True)
    assert torch.allclose(got, (latents.half().float() + 1) / 42)


# --------------------------------------------------------------------------- every stage under DDP + bf16
TINY_A = dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64)
TINY_B = dict(widths=[16, 32], blocks=[1, 1], heads=[0, 2], inject_semantic=[False, True], c_cond=16, c_text=None,
              dropout=0.0)
TINY_C = dict(width=32, depth=1, heads=2, c_text=384, dropout=0.0)
SMALL_PD = {"resolution": 32, "core_grid": 8, "entry_channels": 16, "width": 32, "depth": 1, "heads": 2, "c_t": 32,
            "level_widths": [8, 16, 16], "level_blocks": [0, 1, 1], "level_heads": [0, 0, 0],
            "level_kv_strides": [1, 1, 1]}


def _ddp_fit(config: str, root: Path, openmoji_dir, *extra: str, image_size: int = 64) -> Path:
    """``python -m train fit`` with 2 gloo processes in bf16-mixed: 2 steps, one validation, an export."""
    cmd = [sys.executable, "-m", "train", "fit", "--config", config,
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
           "--trainer.precision=bf16-mixed", "--trainer.default_root_dir", str(root), "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
           "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", str(image_size),
           "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "2",
           "--data.init_args.val_batch_size", "2", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = sorted(root.glob("*/version_0"))
    assert len(runs) == 1, runs
    run = runs[0]
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])  # the EMA travels in the checkpoint
    assert (run / "model.safetensors").is_file() and "val/" in (run / "metrics.csv").read_text()
    return run


def _size(preset: dict) -> str:
    return json.dumps(preset)


@pytest.mark.slow
def test_every_stage_trains_validates_and_exports_under_ddp_in_bf16(openmoji_dir, tmp_path):
    a = _ddp_fit("configs/stage_a/tiny.yaml", tmp_path / "a", openmoji_dir, "--model.init_args.size", _size(TINY_A),
                 "--model.init_args.disc_widths", "[8, 16]", "--model.init_args.adv_start_step", "1",
                 "--data.init_args.resize", "null", image_size=32)
    assert list((a / "samples").glob("recon_step*.png"))
    b = _ddp_fit("configs/stage_b/tiny.yaml", tmp_path / "b", openmoji_dir, "--model.init_args.size", _size(TINY_B),
                 "--model.init_args.stage_a", str(a), "--model.init_args.sample_steps", "2")
    assert (b / "compressor.safetensors").is_file() and "val/psnr" in (b / "metrics.csv").read_text()
    c = _ddp_fit("configs/stage_c/tiny.yaml", tmp_path / "c", openmoji_dir, "--model.init_args.size", _size(TINY_C),
                 "--model.init_args.compressor", str(b), "--model.init_args.stage_b", str(b),
                 "--model.init_args.sample_steps", "2", "--model.init_args.decoder_steps", "2")
    assert list((c / "samples").glob("text_to_image_step*.png"))
    common = ("--model.init_args.size", _size(SMALL_PD), "--model.init_args.compressor", str(GRID3_COMPRESSOR),
              "--model.init_args.sample_steps", "2")
    p1 = _ddp_fit("configs/pixel_decoder/tiny_phase1.yaml", tmp_path / "p1", openmoji_dir, *common)
    p2 = _ddp_fit("configs/pixel_decoder/tiny_phase2.yaml", tmp_path / "p2", openmoji_dir, *common,
                  "--model.init_args.init_from", str(p1), "--model.init_args.resolution", "64",
                  "--data.init_args.min_size", "64")
    p3 = _ddp_fit("configs/pixel_decoder/tiny_phase3.yaml", tmp_path / "p3", openmoji_dir, *common,
                  "--model.init_args.init_from", str(p2), "--model.init_args.resolution", "64")
    assert [read_metadata(p / "model.safetensors")["phase"] for p in (p1, p2, p3)] == [1, 2, 3]


def test_the_fsdp_overlay_builds_its_strategy():
    """FSDP needs CUDA in Lightning, so only the GPU config's strategy is built here: the prior is the wrapped unit."""
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    parser = ArgumentParser()
    parser.add_class_arguments(FSDPStrategy, "strategy")
    config = yaml.safe_load((ROOT / "configs/stage_c/fsdp_gpu.yaml").read_text())["trainer"]["strategy"]["init_args"]
    strategy = parser.instantiate(parser.parse_object({"strategy": config})).strategy
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {StageC}


def _configs() -> list[Path]:
    return sorted(p for p in (ROOT / "configs").glob("*/*.yaml") if p.parent.name in
                  ("stage_a", "stage_b", "stage_c", "pixel_decoder", "controlnet"))


def test_every_preset_has_a_config():
    import yaml

    named = {}
    for path in _configs():
        size = (yaml.safe_load(path.read_text()).get("model") or {}).get("init_args", {}).get("size")
        named.setdefault(path.parent.name, set()).add(size if isinstance(size, str) else None)
    for stage, module in (("stage_a", stage_a), ("stage_b", stage_b), ("stage_c", stage_c),
                          ("pixel_decoder", pixel_decoder)):
        assert set(module.PRESETS) <= named[stage], (stage, set(module.PRESETS) - named[stage])


@pytest.mark.parametrize("path", _configs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_parses_with_the_shared_trainer(path, capsys):
    """Each stage config (overlays after their base) resolves with configs/trainer.yaml under the CLI."""
    configs = [str(path)]
    if "_finetune" in path.name or "_scratch" in path.name or "freeze_unfreeze" in path.name:
        configs = [str(path.with_name("tiny_phase2.yaml")), str(path)]
    if path.name == "fsdp_gpu.yaml":
        configs = [str(path.with_name("paper_gpu.yaml")), str(path)]
    with pytest.raises(SystemExit) as done:
        cli_main(["fit", *[a for c in configs for a in ("--config", c)], "--print_config"])
    assert done.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "ModelCheckpoint" in printed and "optimizer:" in printed


def test_stage_c_trains_from_precomputed_shards_and_refuses_other_encoders(openmoji_dir, tmp_path):
    """python -m train.precompute over the val split, then the Stage C CLI trains from its shards (the batches
    carry the latents and text states: no image is encoded); another compressor is refused before any step."""
    latents = tmp_path / "latents"
    precompute(["--shards", str(openmoji_dir / "val-*.tar"), "--out", str(latents), "--compressor",
                str(GRID3_COMPRESSOR), "--text-encoder", "minilm", "--image-size", "64"])
    args = ["fit", "--config", "configs/stage_c/tiny.yaml", "--trainer.default_root_dir", str(tmp_path / "runs"),
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
            "--model.init_args.size", _size(TINY_C), "--model.init_args.stage_b", "null",
            "--model.init_args.compressor", str(GRID3_COMPRESSOR), "--data.init_args.train", str(latents),
            "--data.init_args.val", "null", "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0"]
    cli = cli_main(args)
    assert cli.trainer.global_step == 2 and cli.datamodule.precomputed["compressor_fingerprint"] == \
        fingerprint(cli.model.compressor)
    batch = next(iter(cli.datamodule.train_dataloader()))
    assert "image" not in batch and batch["semantic"].shape[1:] == (16, 2, 2) and batch["text"].shape[-1] == 384

    other = SemanticCompressor(pretrained=False, trainable="none")
    save_safetensors(other, tmp_path / "other.safetensors", "semantic_compressor", other.config.to_dict())
    with pytest.raises(ValueError, match="precompute them again"):
        cli_main([*args, "--model.init_args.compressor", str(tmp_path / "other.safetensors")])
