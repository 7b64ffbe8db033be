"""Decoders: semantic latents (from Stage C or the compressor) -> images. The sampler takes any of them.

A decoder is a module called as ``decoder(semantic, size, prompts, steps, guidance, generator,
progress, sampler, eta, negative_prompts=..., callback=...)`` returning images ``(B, 3, H, W)`` in
[0, 1]; ``callback`` sees every sampler step's state (``diffusion.sample``) with ``"stage"`` set to
the decoder's ``progress_name``.
``SemanticDecoder`` is Stage B + Stage A (paper Fig. 3); ``PixelDecoder`` (the greedy-grown pixel-space model, ``stages.pixel_decoder``) has
the same call.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from diffusion import Guided, sample
from weights.checkpoint import fingerprint, read_metadata, recorded_path, resolve_checkpoint
from pipeline.denoisers import denoiser_for
from pipeline.inputs import check_half
from stages.stage_a import StageA
from weights.loaders import load_stage_a, load_stage_b, load_pixel_model
from stages.stage_b import StageB
from pipeline.text_encoder import TextEncoder, build_text_encoder


def text_states(encoder: TextEncoder | None, c_text: int | None, prompts: list[str] | None,
                negative_prompts: list[str] | None, b: int, what: str) -> tuple:
    """(text, unconditional text) states of a decoder: None, None without text; the prompts' (else the empty
    prompt's) and the negative prompts' (else the empty prompt's) for a text-conditional one."""
    if not c_text:
        return None, None
    if encoder is None:
        raise ValueError(f"this {what} is text-conditional but no text encoder was given")
    text = encoder(list(prompts) if prompts is not None else [""] * b)
    return text, encoder(list(negative_prompts)) if negative_prompts is not None else encoder.empty(b)


def staged(callback: Callable[[dict], None] | None, stage: str) -> Callable[[dict], None] | None:
    """A sampler callback that passes each step's state on to ``callback`` with ``"stage"`` added."""
    return None if callback is None else lambda state: callback({**state, "stage": stage})


class SemanticDecoder(torch.nn.Module):
    """Stage B samples Stage A latents from the semantic latents (12 DDPM steps), Stage A decodes them."""

    default_steps = 12
    default_guidance = 2.0  # paper Sec. 4: w = 4; the tiny checkpoints decode best at 2 (docs/evaluation.md)
    progress_name = "Stage B"

    def __init__(self, stage_b: StageB, stage_a: StageA, text_encoder: TextEncoder | None = None,
                 diffusion: dict | None = None):
        super().__init__()
        self.stage_b, self.stage_a, self.text_encoder = stage_b, stage_a, text_encoder
        self.denoiser = denoiser_for(stage_b, diffusion)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (Stage A's f4 times Stage B's downsampling)."""
        return 4 * self.stage_b.config.downsampling

    @torch.no_grad()
    def forward(self, semantic: torch.Tensor, size: tuple[int, int], prompts: list[str] | None = None,
                steps: int | str | list[float] = 12, guidance: float = 1.0, generator: torch.Generator | None = None,
                progress: bool | str = False, sampler: str = "ddpm", eta: float | None = None,
                negative_prompts: list[str] | None = None, callback: Callable[[dict], None] | None = None
                ) -> torch.Tensor:
        """Images of ``size`` (H, W; multiples of the Stage B grid) from raw semantic latents.

        ``guidance`` w > 1 mixes in the prediction without semantic latents (and, for a text-conditional
        Stage B, with ``negative_prompts``, else the empty prompt, as the released decoder pipeline):
        eps_uncond + w (eps_cond - eps_uncond). Latents are decoded unquantised, in Stage A's dtype.
        """
        b = semantic.shape[0]
        text, uncond_text = text_states(self.text_encoder, self.stage_b.config.c_text, prompts, negative_prompts, b,
                                        "Stage B")
        guided = Guided(self.denoiser, (semantic, text), (torch.zeros_like(semantic), uncond_text), guidance)
        shape = (b, self.stage_b.config.c_latent, size[0] // 4, size[1] // 4)
        return sample_stage_a_images(self.stage_a, guided, shape, semantic.device, steps, generator, progress,
                                     sampler, eta, staged(callback, self.progress_name))


def sample_stage_a_images(stage_a: StageA, guided: Guided, shape: tuple[int, ...], device: torch.device,
                          steps: int | str | list[float], generator: torch.Generator | None, progress: bool | str,
                          sampler: str, eta: float | None, callback: Callable[[dict], None] | None,
                          latent_scale: float = 1.0) -> torch.Tensor:
    """Stage A latents of ``shape`` sampled with the guided Stage B from seeded noise, decoded unquantised in
    Stage A's dtype to images in [0, 1] (every Stage B, v2 or v3, ends here). ``latent_scale``: the sampled
    latents are Stage A's divided by it (a model trained on normalised latents, as the baseline LDM)."""
    noise = torch.randn(shape, generator=generator, device=generator.device if generator else "cpu")
    latents = sample(sampler, guided, noise.to(device), steps, generator=generator, progress=progress, eta=eta,
                     callback=callback)
    dtype = next(stage_a.parameters()).dtype
    images = stage_a.decode((latents * latent_scale).to(dtype)).float()
    if dtype != torch.float32:  # an overflow must not be clamped into a black or white image
        check_half(images, "Stage A's decoded images", dtype)
    return images.clamp(0, 1)


def stage_a_of(path, meta: dict, stage_a: str | os.PathLike | None, what: str) -> StageA:
    """The Stage A the model at ``path`` (``what``, with metadata ``meta``) was trained on: ``stage_a`` or the path
    it recorded; refused when its weights differ from the ones it recorded."""
    if stage_a is None:
        if "stage_a_path" not in meta:
            raise ValueError(f"{path} does not record its Stage A; pass the Stage A checkpoint it was trained with")
        stage_a = recorded_path(meta["stage_a_path"], path)
    a_path = resolve_checkpoint(stage_a)
    model_a = load_stage_a(str(a_path))
    expected = meta.get("stage_a_fingerprint")
    if expected is not None and fingerprint(model_a) != expected:
        raise ValueError(f"{what} {path} was trained on a different Stage A than {a_path} (weights fingerprint "
                         f"{fingerprint(model_a)}, expected {expected}); pass the Stage A it was trained with")
    return model_a


def load_semantic_decoder(stage_b: str | os.PathLike, stage_a: str | os.PathLike | None = None,
                          text_encoder: TextEncoder | None = None) -> SemanticDecoder:
    """Stage B (file or run folder) with the Stage A it was trained on (``stage_a`` or the path it recorded).

    Refuses a Stage A whose weights differ from those Stage B was trained with.
    """
    b_path = resolve_checkpoint(stage_b)
    meta = read_metadata(b_path)
    model_b = load_stage_b(str(b_path))
    model_a = stage_a_of(b_path, meta, stage_a, "Stage B")
    if model_b.config.c_text and text_encoder is None:
        text_encoder = build_text_encoder(meta.get("text_encoder") or "minilm")
    return SemanticDecoder(model_b, model_a, text_encoder, meta.get("diffusion")).eval()


class PixelDecoder(torch.nn.Module):
    """The greedy-grown pixel decoder: DDPM in pixel space from the semantic latents, no Stage A.

    ``model`` (``ShallowUViT`` or ``GrownUViT``) predicts eps of images in [-1, 1] on the logSNR
    schedule shifted by ``logsnr_shift``; it sees semantic latents normalised as (x + shift) / scale.
    A model trained on images of side ``resolution`` from the latents of images of side
    ``semantic_size`` (a phase-1 model: 32 px from 128 px latents) renders at ``size`` scaled by
    their ratio and the result is resized (bicubic) to ``size``; grown models render at ``size``.
    """

    default_steps = 50
    default_guidance = 3.0
    progress_name = "pixel decoder"

    def __init__(self, model: torch.nn.Module, latent_shift: float = 0.0, latent_scale: float = 1.0,
                 logsnr_shift: float = 0.0, semantic_size: int | None = None,
                 text_encoder: TextEncoder | None = None, compressor_fingerprint: str | None = None,
                 diffusion: dict | None = None):
        super().__init__()
        self.model, self.text_encoder = model, text_encoder
        self.latent_shift, self.latent_scale = latent_shift, latent_scale
        self.denoiser = denoiser_for(model, diffusion, logsnr_shift=logsnr_shift)
        cfg = model.config
        resolution = cfg.target_resolution if cfg.grown else cfg.resolution
        self.scale = resolution / semantic_size if semantic_size else 1.0
        self.compressor_fingerprint = compressor_fingerprint

    @property
    def size_multiple(self) -> int:
        """Requested sides must be multiples of this (after scaling, the network's own multiple)."""
        import math

        return max(1, math.ceil(self.model.size_multiple / self.scale))

    def render_size(self, size: tuple[int, int]) -> tuple[int, int]:
        m = self.model.size_multiple
        return tuple(max(m, round(s * self.scale / m) * m) for s in size)  # type: ignore[return-value]

    def normalize(self, semantic: torch.Tensor) -> torch.Tensor:
        return (semantic + self.latent_shift) / self.latent_scale

    @torch.no_grad()
    def render(self, semantic: torch.Tensor, size: tuple[int, int], prompts: list[str] | None = None,
               steps: int | str | list[float] = 50, guidance: float = 1.0, generator: torch.Generator | None = None,
               progress: bool | str = False, sampler: str = "ddpm", eta: float | None = None,
               negative_prompts: list[str] | None = None, callback: Callable[[dict], None] | None = None
               ) -> torch.Tensor:
        """Images in [0, 1] at the network's own size ``size`` (multiples of its grid) from raw latents.

        ``guidance`` w > 1: eps_uncond + w (eps_cond - eps_uncond), unconditional = zero latents
        (and ``negative_prompts``, else the empty prompt, for a text-conditional model).
        """
        b = semantic.shape[0]
        cond = self.normalize(semantic)
        text, uncond_text = text_states(self.text_encoder, self.model.config.c_text, prompts, negative_prompts, b,
                                        "pixel decoder")
        guided = Guided(self.denoiser, (cond, text), (torch.zeros_like(cond), uncond_text), guidance)
        noise = torch.randn((b, 3, *size), generator=generator, device=generator.device if generator else "cpu")
        x = sample(sampler, guided, noise.to(semantic.device), steps, generator=generator, progress=progress, eta=eta,
                   callback=staged(callback, self.progress_name))
        dtype = next(self.model.parameters()).dtype
        if dtype != torch.float32:  # an overflow must not be clamped into a black or white image
            check_half(x, "the pixel decoder's images", dtype)
        return ((x + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def forward(self, semantic: torch.Tensor, size: tuple[int, int], prompts: list[str] | None = None,
                steps: int | str | list[float] = 50, guidance: float = 1.0, generator: torch.Generator | None = None,
                progress: bool | str = False, sampler: str = "ddpm", eta: float | None = None,
                negative_prompts: list[str] | None = None, callback: Callable[[dict], None] | None = None
                ) -> torch.Tensor:
        """Images ``(B, 3, *size)`` in [0, 1] from raw semantic latents (the decoder interface)."""
        size = tuple(int(s) for s in size)
        images = self.render(semantic, self.render_size(size), prompts, steps, guidance, generator, progress,
                             sampler, eta, negative_prompts, callback)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
        return images


def load_pixel_decoder(path: str | os.PathLike, text_encoder: TextEncoder | None = None) -> PixelDecoder:
    """The pixel decoder of an export, Lightning checkpoint or run folder, with the settings it was trained with."""

    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    model = load_pixel_model(str(path))
    if model.config.c_text and text_encoder is None:
        text_encoder = build_text_encoder(meta.get("text_encoder") or "minilm")
    if text_encoder is not None and model.config.c_text and text_encoder.dim != model.config.c_text:
        raise ValueError(f"pixel decoder {path} expects text states of width {model.config.c_text}; the text encoder "
                         f"gives {text_encoder.dim}")
    return PixelDecoder(model, meta.get("latent_shift", 0.0), meta.get("latent_scale", 1.0),
                        meta.get("logsnr_shift", 0.0), meta.get("semantic_size"), text_encoder,
                        meta.get("compressor_fingerprint"), meta.get("diffusion")).eval()
