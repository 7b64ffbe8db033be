"""Semantic compressor: EfficientNetV2-S features -> 16 channels at ~42:1 spatial compression (paper Sec. 3.1)."""
from semantic_compressor.compressor import (
    BACKBONES,
    LATENT_SCALE,
    LATENT_SHIFT,
    MIN_IMAGE_SIDE,
    PAPER_INPUT_SCALE,
    CompressorConfig,
    SemanticCompressor,
    denormalize_latents,
    latent_grid,
    normalize_latents,
)

__all__ = [
    "BACKBONES",
    "LATENT_SCALE",
    "LATENT_SHIFT",
    "MIN_IMAGE_SIDE",
    "PAPER_INPUT_SCALE",
    "CompressorConfig",
    "SemanticCompressor",
    "denormalize_latents",
    "latent_grid",
    "normalize_latents",
]
