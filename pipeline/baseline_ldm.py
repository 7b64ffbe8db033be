"""Text -> image with the single-stage baseline (paper Sec. 4, "Baseline LDM"): the text-conditional U-Net
(``stages.baseline_ldm``) samples Stage A latents from noise with classifier-free guidance, Stage A decodes
them. The same text encoders, diffusion process, samplers and Stage A decoding as the cascade
(``pipeline.decoders.sample_stage_a_images``), without Stage C, the semantic latents or Stage B.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from diffusion import Guided, check_sampler
from pipeline.decoders import sample_stage_a_images, staged, stage_a_of, text_states
from pipeline.denoisers import denoiser_for
from pipeline.text_encoder import TextEncoder, build_text_encoder, check_prompts
from pipeline.text_to_image import snap_size
from stages.baseline_ldm import BaselineLDM
from stages.stage_a import StageA
from weights.checkpoint import read_metadata, resolve_checkpoint
from weights.loaders import load_baseline_ldm

DEFAULT_STEPS, DEFAULT_GUIDANCE = 60, 4.0  # Stage C's defaults: the baseline takes Stage C's place


class BaselineTextToImage(nn.Module):
    """Prompts -> images ``(B, 3, H, W)`` in [0, 1] (``diffusion``: the denoiser its export recorded;
    ``latent_scale``: the U-Net diffuses Stage A's latents divided by it)."""

    progress_name = "baseline LDM"

    def __init__(self, model: BaselineLDM, stage_a: StageA, text_encoder: TextEncoder, diffusion: dict | None = None,
                 latent_scale: float = 1.0):
        super().__init__()
        self.model, self.stage_a, self.text_encoder = model, stage_a, text_encoder
        self.latent_scale = latent_scale
        self.denoiser = denoiser_for(model, diffusion)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (Stage A's f4 times the U-Net's downsampling)."""
        return 4 * self.model.config.downsampling

    @torch.no_grad()
    def forward(self, prompts: list[str] | str, negative_prompt: str = "", height: int = 128, width: int = 128,
                images_per_prompt: int = 1, steps: int | str | list[float] = DEFAULT_STEPS,
                guidance: float = DEFAULT_GUIDANCE, seed: int = 0, progress: bool = True, sampler: str = "ddpm",
                eta: float | None = None, callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        """Images for every prompt, ``images_per_prompt`` each (prompt-major order); the same arguments and seed
        give the same images. H and W are rounded up to ``size_multiple`` with a note."""
        check_sampler(sampler, eta)
        prompts = check_prompts([prompts] if isinstance(prompts, str) else list(prompts))
        h, w = snap_size(height, width, self.size_multiple)
        batch = [p for p in prompts for _ in range(images_per_prompt)]
        text, uncond = text_states(self.text_encoder, self.model.config.c_text, batch,
                                   [negative_prompt] * len(batch), len(batch), "baseline LDM")
        guided = Guided(self.denoiser, (text,), (uncond,), guidance)
        generator = torch.Generator().manual_seed(seed)
        device = next(self.model.parameters()).device
        return sample_stage_a_images(self.stage_a, guided, (len(batch), self.model.config.c_latent, h // 4, w // 4),
                                     device, steps, generator, self.progress_name if progress else False, sampler,
                                     eta, staged(callback, self.progress_name), self.latent_scale)


def load_baseline_text_to_image(path: str | os.PathLike, stage_a: str | os.PathLike | None = None,
                                text_encoder: TextEncoder | None = None) -> BaselineTextToImage:
    """The baseline (export, ``.ckpt`` or run folder) with the Stage A it was trained on (``stage_a`` or the path it
    recorded; refused when the weights differ) and the text encoder its export names."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    model = load_baseline_ldm(str(path))
    if text_encoder is None:
        text_encoder = build_text_encoder(meta.get("text_encoder") or "minilm")
    if text_encoder.dim != model.config.c_text:
        raise ValueError(f"baseline LDM {path} expects text states of width {model.config.c_text}; the text encoder "
                         f"gives {text_encoder.dim}")
    return BaselineTextToImage(model, stage_a_of(path, meta, stage_a, "baseline LDM"), text_encoder,
                               meta.get("diffusion"), meta.get("latent_scale", 1.0)).eval()
