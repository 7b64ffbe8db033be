"""Text -> image: text encoder -> Stage C prior -> decoder (paper Fig. 3, right).

The decoder is any module called as ``decoder(semantic, size, prompts, steps, guidance,
generator, progress)`` with a ``size_multiple`` attribute (``stages.decoders``); Stage B + Stage A
is the first, the greedy-grown pixel decoder can take its place without touching the rest.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from diffusion import SAMPLERS, Guided, check_sampler, sample, takes_eta
from semantic_compressor import denormalize_latents, latent_grid
from stages.checkpoint import read_metadata, resolve_checkpoint
from stages.denoisers import denoiser_for
from stages.inputs import Limits, check_finite, check_request
from stages.stage_c import StageC, load_stage_c
from stages.text_encoder import TextEncoder, build_text_encoder, check_prompts


@dataclass
class Prior:
    """Stage C with its text encoder, the latent normalisation it was trained with and its denoiser
    (``diffusion``: the description its export recorded; None: Stage C's own)."""

    model: StageC
    text_encoder: TextEncoder
    latent_shift: float = 1.0
    latent_scale: float = 42.0
    compressor_fingerprint: str | None = None
    diffusion: dict | None = None

    def __post_init__(self):
        self.denoiser = denoiser_for(self.model, self.diffusion)

    @torch.no_grad()
    def sample(self, prompts: list[str], negative: list[str], grid: tuple[int, int], steps: int | str | list[float],
               guidance: float, generator: torch.Generator, progress: bool = True, sampler: str = "ddpm",
               eta: float | None = None) -> torch.Tensor:
        """Raw semantic latents (B, 16, *grid) for the prompts, ready for a decoder."""
        guided = Guided(self.denoiser, (self.text_encoder(prompts),), (self.text_encoder(negative),), guidance)
        device = next(self.model.parameters()).device
        noise = torch.randn((len(prompts), self.model.config.c_latent, *grid), generator=generator,
                            device=generator.device).to(device)
        latents = sample(sampler, guided, noise, steps, generator=generator, eta=eta,
                         progress="Stage C" if progress else False)
        return denormalize_latents(latents, self.latent_shift, self.latent_scale)


def load_prior(path: str | os.PathLike, text_encoder: TextEncoder | None = None) -> Prior:
    """Stage C (file or run folder) with the text encoder and normalisation recorded in its export."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    model = load_stage_c(str(path))
    if text_encoder is None:
        text_encoder = build_text_encoder(meta.get("text_encoder") or "minilm")
    if text_encoder.dim != model.config.c_text:
        raise ValueError(f"Stage C {path} expects text states of width {model.config.c_text}; the text encoder "
                         f"gives {text_encoder.dim}")
    return Prior(model, text_encoder, meta.get("latent_shift", 1.0), meta.get("latent_scale", 42.0),
                 meta.get("compressor_fingerprint"), meta.get("diffusion"))


def snap_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Round H and W up to the grid the decoder needs, with a note when they change."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image height and width must be positive, got {height}x{width}")
    h, w = (math.ceil(s / multiple) * multiple for s in (height, width))
    h, w = max(h, multiple), max(w, multiple)
    if (h, w) != (height, width):
        warnings.warn(f"image size {height}x{width} rounded up to {h}x{w}: the decoder needs multiples of "
                      f"{multiple} px", stacklevel=3)
    return h, w


class TextToImage(nn.Module):
    """The composable sampler: prompts -> images ``(B, 3, H, W)`` in [0, 1]."""

    def __init__(self, prior: Prior, decoder: nn.Module):
        super().__init__()
        self.prior, self.decoder = prior, decoder
        self.model, self.text_encoder = prior.model, prior.text_encoder  # registered: .to(device) moves them

    @torch.no_grad()
    def forward(self, prompts: list[str] | str, negative_prompt: str = "", height: int = 128, width: int = 128,
                images_per_prompt: int = 1, prior_steps: int | str | list[float] = 60,
                decoder_steps: int | str | list[float] = 12, prior_guidance: float = 4.0, decoder_guidance: float = 3.0,
                seed: int = 0, progress: bool = True, return_latents: bool = False, prior_sampler: str = "ddpm",
                decoder_sampler: str = "ddpm", prior_eta: float | None = None, decoder_eta: float | None = None,
                limits: Limits | None = Limits(),
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images for every prompt, ``images_per_prompt`` each (prompt-major order).

        The same arguments and seed give the same images. H and W are rounded up to the decoder's
        grid with a note; step counts (or explicit decreasing time lists ending in 0, or a named list
        of ``diffusion.TIME_LISTS``) are per stage, and so are the samplers (``diffusion.SAMPLERS``)
        and their eta. ``return_latents``: also return Stage C's semantic latents, ``(images, latents)``.
        ``limits``: refuse work too large for the device (``stages.inputs.Limits``; None: no check).
        """
        check_sampler(prior_sampler, prior_eta), check_sampler(decoder_sampler, decoder_eta)
        check_request(self, prompts, negative_prompt, height, width, images_per_prompt, prior_steps, decoder_steps,
                      prior_guidance, decoder_guidance, seed, limits)  # everything else, before any work
        prompts = check_prompts([prompts] if isinstance(prompts, str) else prompts)
        h, w = snap_size(height, width, self.decoder.size_multiple)
        if not prompts or any(not p.strip() for p in prompts):
            warnings.warn("an empty prompt samples unconditionally (no text guidance)", stacklevel=2)
        batch = [p for p in prompts for _ in range(images_per_prompt)]
        generator = torch.Generator().manual_seed(seed)
        semantic = self.prior.sample(batch, [negative_prompt] * len(batch), latent_grid(h, w), prior_steps,
                                     prior_guidance, generator, progress, prior_sampler, prior_eta)
        images = self.decoder(semantic, (h, w), batch, decoder_steps, decoder_guidance, generator,
                              getattr(self.decoder, "progress_name", "decoder") if progress else False,
                              decoder_sampler, decoder_eta)
        check_finite(images, "the sampled images", "a model may hold NaN/inf weights (corrupt or diverged checkpoint)")
        return (images, semantic) if return_latents else images


def load_text_to_image(stage_c: str | os.PathLike, stage_b: str | os.PathLike,
                       stage_a: str | os.PathLike | None = None, prior: Prior | None = None) -> TextToImage:
    """The C -> B -> A sampler from checkpoints, refusing stages that were not trained together.

    ``prior``: Stage C already loaded from ``stage_c`` (several decoders share one).
    """
    from stages.decoders import load_semantic_decoder

    prior = prior or load_prior(stage_c)
    decoder = load_semantic_decoder(stage_b, stage_a)
    b_meta = read_metadata(stage_b)
    c_fp, b_fp = prior.compressor_fingerprint, b_meta.get("compressor_fingerprint")
    if c_fp and b_fp and c_fp != b_fp:
        raise ValueError(f"Stage C {stage_c} was trained on a different semantic compressor ({c_fp}) than the one "
                         f"Stage B {stage_b} was trained with ({b_fp}); use the Stage B whose compressor trained C")
    return TextToImage(prior, decoder).eval()


def load_pixel_text_to_image(stage_c: str | os.PathLike, pixel_decoder: str | os.PathLike,
                             prior: Prior | None = None) -> TextToImage:
    """Stage C -> the greedy-grown pixel decoder, refusing a decoder trained on another compressor's latents.

    ``prior``: Stage C already loaded from ``stage_c`` (several decoders share one).
    """
    from stages.decoders import load_pixel_decoder

    prior = prior or load_prior(stage_c)
    decoder = load_pixel_decoder(pixel_decoder)
    c_fp, p_fp = prior.compressor_fingerprint, decoder.compressor_fingerprint
    if c_fp and p_fp and c_fp != p_fp:
        raise ValueError(f"Stage C {stage_c} was trained on a different semantic compressor ({c_fp}) than the one "
                         f"pixel decoder {pixel_decoder} was trained with ({p_fp}); train the pixel decoder with "
                         "the compressor that trained Stage C")
    return TextToImage(prior, decoder).eval()


def save_images(images: torch.Tensor, out: str | os.PathLike, nrow: int, overwrite: bool = False) -> list[Path]:
    """One image: ``out``. Several: ``out`` is the grid and ``<stem>_<i>.png`` the single images."""
    from torchvision.utils import save_image

    out = Path(out)
    paths = [out] if images.shape[0] == 1 else [out] + [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                                      for i in range(images.shape[0])]
    clash = [p for p in paths if p.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]} exists; choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, out, nrow=nrow, padding=2, pad_value=1.0)
    for p, im in zip(paths[1:], images):
        save_image(im, p)
    return paths


def add_sampler_arguments(parser) -> None:
    """``--sampler`` (both stages), ``--prior-sampler``/``--decoder-sampler`` and their eta, from the registry."""
    names = sorted(SAMPLERS)
    group = parser.add_argument_group("samplers", f"any of {', '.join(names)} (diffusion.SAMPLERS) per stage")
    group.add_argument("--sampler", choices=names, default=None, help="the sampler of both stages (default ddpm)")
    group.add_argument("--prior-sampler", choices=names, default=None, help="Stage C's sampler (overrides --sampler)")
    group.add_argument("--decoder-sampler", choices=names, default=None,
                       help="the decoder's sampler (overrides --sampler)")
    group.add_argument("--eta", type=float, default=None, help="eta of both samplers, 0 to 1 (ddim, dpmpp_2m_sde)")
    group.add_argument("--prior-eta", type=float, default=None)
    group.add_argument("--decoder-eta", type=float, default=None)


def sampler_options(args) -> dict:
    """The ``TextToImage`` keywords the sampler arguments give, checked before any work. ``--eta`` goes to
    the stages whose sampler takes one; ``--prior-eta``/``--decoder-eta`` must fit their stage's sampler."""
    options = {}
    for stage in ("prior", "decoder"):
        name = getattr(args, f"{stage}_sampler") or args.sampler or "ddpm"
        eta = getattr(args, f"{stage}_eta")
        if eta is None and takes_eta(name):
            eta = args.eta
        check_sampler(name, eta)
        options.update({f"{stage}_sampler": name, f"{stage}_eta": eta})
    if args.eta is not None and options["prior_eta"] is None and options["decoder_eta"] is None:
        check_sampler(options["prior_sampler"], args.eta)  # names the samplers that take eta
    return options


def non_default(options: dict) -> dict:
    """The sampler options that differ from DDPM without eta (reports keep their earlier keys otherwise)."""
    return {k: v for k, v in options.items() if v not in ("ddpm", None)}
