"""Tiny random stages for the tests, and the bundle of exports the sampling tests share (the fixtures
``tiny_bundle`` and ``tiny_bundle_copy`` in ``tests/conftest.py``)."""
from pathlib import Path

import torch

from semantic_compressor import SemanticCompressor
from weights.checkpoint import fingerprint, save_safetensors
from stages.stage_a import StageA
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig

TINY_A = dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64)
TINY_B = StageBConfig(widths=(16, 32), blocks=(1, 1), heads=(0, 2), inject_semantic=(False, True), c_cond=16,
                      c_text=None, dropout=0.0)
TINY_C = StageCConfig(width=32, depth=1, heads=2, c_text=384, dropout=0.0)
BUNDLE_FILES = ("stage_a.safetensors", "compressor.safetensors", "stage_b.safetensors", "stage_c.safetensors")


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
