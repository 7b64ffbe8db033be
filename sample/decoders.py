"""Decoders: semantic latents (from Stage C or the compressor) -> images. The sampler takes any of them.

A decoder is a module called as ``decoder(semantic, size, prompts, steps, guidance, generator,
progress)`` returning images ``(B, 3, H, W)`` in [0, 1]. ``SemanticDecoder`` is Stage B + Stage A
(paper Fig. 3); the greedy-grown pixel decoder has the same call.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from stages.checkpoint import fingerprint, resolve_checkpoint
from stages.diffusion import ddpm_sample, guide
from stages.stage_a import StageA, load_stage_a
from stages.stage_b import StageB, load_stage_b
from stages.text_encoder import TextEncoder, build_text_encoder


class SemanticDecoder(torch.nn.Module):
    """Stage B samples Stage A latents from the semantic latents (12 DDPM steps), Stage A decodes them."""

    def __init__(self, stage_b: StageB, stage_a: StageA, text_encoder: TextEncoder | None = None):
        super().__init__()
        self.stage_b, self.stage_a, self.text_encoder = stage_b, stage_a, text_encoder

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (Stage A's f4 times Stage B's downsampling)."""
        return 4 * self.stage_b.config.downsampling

    @torch.no_grad()
    def forward(self, semantic: torch.Tensor, size: tuple[int, int], prompts: list[str] | None = None,
                steps: int | list[float] = 12, guidance: float = 1.0, generator: torch.Generator | None = None,
                progress: bool | str = False) -> torch.Tensor:
        """Images of ``size`` (H, W; multiples of the Stage B grid) from raw semantic latents.

        ``guidance`` w > 1 mixes in the prediction without semantic latents (and with the empty
        prompt): eps_uncond + w (eps_cond - eps_uncond). Latents are decoded unquantised.
        """
        b = semantic.shape[0]
        text = uncond_text = None
        if self.stage_b.config.c_text:
            if self.text_encoder is None:
                raise ValueError("this Stage B is text-conditional but no text encoder was given")
            text = self.text_encoder(list(prompts) if prompts is not None else [""] * b)
            uncond_text = self.text_encoder.empty(b)
        uncond_semantic = torch.zeros_like(semantic)

        def eps_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            eps = self.stage_b.predict_eps(x, t, semantic, text)
            if guidance == 1.0:
                return eps
            return guide(eps, self.stage_b.predict_eps(x, t, uncond_semantic, uncond_text), guidance)

        h, w = size
        shape = (b, self.stage_b.config.c_latent, h // 4, w // 4)
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
        latents = ddpm_sample(eps_fn, noise.to(semantic.device), steps, generator, progress)
        return self.stage_a.decode(latents).clamp(0, 1)


def stage_b_metadata(path: str | os.PathLike) -> dict:
    """The metadata our Stage B export carries (Stage A fingerprint and path, text encoder, ...)."""
    from safetensors import safe_open

    if Path(path).suffix != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items() if k not in ("stage",)}


def load_semantic_decoder(stage_b: str | os.PathLike, stage_a: str | os.PathLike | None = None,
                          text_encoder: TextEncoder | None = None) -> SemanticDecoder:
    """Stage B (file or run folder) with the Stage A it was trained on (``stage_a`` or the path it recorded).

    Refuses a Stage A whose weights differ from those Stage B was trained with.
    """
    b_path = resolve_checkpoint(stage_b)
    meta = stage_b_metadata(b_path)
    model_b = load_stage_b(str(b_path))
    if stage_a is None:
        if "stage_a_path" not in meta:
            raise ValueError(f"{b_path} does not record its Stage A; pass the Stage A checkpoint it was trained with")
        stage_a = meta["stage_a_path"]
    a_path = resolve_checkpoint(stage_a)
    model_a = load_stage_a(str(a_path))
    expected = meta.get("stage_a_fingerprint")
    if expected is not None and fingerprint(model_a) != expected:
        raise ValueError(f"Stage B {b_path} was trained on a different Stage A than {a_path} (weights fingerprint "
                         f"{fingerprint(model_a)}, expected {expected}); pass the Stage A it was trained with")
    if model_b.config.c_text and text_encoder is None:
        text_encoder = build_text_encoder(meta.get("text_encoder") or "minilm")
    return SemanticDecoder(model_b, model_a, text_encoder).eval()
