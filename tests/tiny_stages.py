"""Tiny random stages for the tests, the bundle of exports the sampling tests share (the fixtures
``tiny_bundle`` and ``tiny_bundle_copy`` in ``tests/conftest.py``), and a tiny Stage A training run's arguments."""
import json
from pathlib import Path

import torch

from semantic_compressor import SemanticCompressor
from weights.checkpoint import fingerprint, save_safetensors
from weights.loaders import load_stage_c3
from weights.lora import add_lora, save_adapter
from stages.stage_a import StageA
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig

TINY_A = dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64)
TINY_B = StageBConfig(widths=(16, 32), blocks=(1, 1), heads=(0, 2), inject_semantic=(False, True), c_cond=16,
                      c_text=None, dropout=0.0)
TINY_C = StageCConfig(width=32, depth=1, heads=2, c_text=384, dropout=0.0)
BUNDLE_FILES = ("stage_a.safetensors", "compressor.safetensors", "stage_b.safetensors", "stage_c.safetensors")
ROOT = Path(__file__).resolve().parents[1]


def stage_a_args(root: Path, openmoji_dir: Path, *extra: str, steps: int = 2, every: int = 1) -> list[str]:
    """``python -m train`` arguments of a tiny Stage A run from the shipped config on the embedded data: a
    checkpoint every ``every`` steps, no validation."""
    return ["fit", "--config", str(ROOT / "configs" / "stage_a" / "tiny.yaml"),
            "--trainer.default_root_dir", str(root), "--trainer.max_steps", str(steps),
            "--trainer.val_check_interval", str(every), "--trainer.limit_val_batches", "0",
            "--model.init_args.size", json.dumps(TINY_A), "--model.init_args.disc_widths", "[8, 16]",
            "--model.init_args.adv_start_step", "1",
            "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.num_workers", "0",
            "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4",
            "--data.init_args.shuffle_buffer", "8", *extra]


def randomised(model, std=0.02):
    """``model`` with noise of ``std`` added to every parameter (zero-initialised heads give outputs)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


def stage_c_extra(compressor) -> dict:
    """The metadata a Stage C export records: its compressor, text encoder and latent normalisation."""
    return {"compressor_fingerprint": fingerprint(compressor), "text_encoder": "minilm", "latent_shift": 0.0,
            "latent_scale": 1.0}


def save_tiny_bundle(out: Path) -> Path:
    """Stage A, the compressor (random backbone), Stage B and Stage C, tiny and randomised, exported into
    ``out`` as the training modules export them: Stage B records the fingerprints of that Stage A and
    compressor, Stage C the compressor's."""
    torch.manual_seed(0)
    out.mkdir(parents=True, exist_ok=True)
    a = StageA(TINY_A)
    compressor = SemanticCompressor(pretrained=False, trainable="none")
    b, c = randomised(StageB(TINY_B)), randomised(StageC(TINY_C))
    save_safetensors(a, out / "stage_a.safetensors", "stage_a", a.config.to_dict())
    save_safetensors(compressor, out / "compressor.safetensors", "semantic_compressor", compressor.config.to_dict())
    save_safetensors(b, out / "stage_b.safetensors", "stage_b", b.config.to_dict(),
                     extra={"stage_a_fingerprint": fingerprint(a), "compressor_fingerprint": fingerprint(compressor)})
    save_safetensors(c, out / "stage_c.safetensors", "stage_c", c.config.to_dict(), extra=stage_c_extra(compressor))
    return out


def random_v3_lora(stage_c3: Path, out: Path) -> Path:
    """A rank-2 LoRA adapter for a v3 Stage C export whose up-projections are random (a zero one changes nothing)."""
    model = load_stage_c3(str(stage_c3))
    settings = add_lora(model, rank=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    return save_adapter(model, out, "stage_c3", settings)
