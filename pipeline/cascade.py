"""Stable Cascade text -> image: pooled text encoder -> v3 Stage C -> v3 Stage B -> Stage A, run by the
same ``TextToImage`` as v2 (``pipeline.text_to_image``): ``CascadePrior`` and ``CascadeDecoder`` have the
prior's and decoder's calls.

Process (StableCascade ``gdf``, its inference notebooks' settings, ``RELEASE``): noise predicted
directly (``eps``), the cosine schedule clamped to [1e-4, 0.9999] with the shift factor applied to its
logSNR and clamped again, the network's time input the cosine time recovered from that logSNR, DDPM
steps, classifier-free guidance std-rescaled with rho = 0.7; Stage C 20 steps, guidance 4, shift 2;
Stage B 10 steps, guidance 1.1, shift 1. The unconditional calls get the negative (else empty)
prompt's text, zero image embeddings and, for Stage B, zero compressor latents. ``time_input="t"``,
shift 1 and rho 0 are diffusers' ``StableCascadePriorPipeline`` / ``StableCascadeDecoderPipeline``.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from diffusion import CosineSchedule, Denoiser, Guided, KeepKnown, check_start, sample, shift_from_factor
from pipeline.cascade_conditioning import build_pooled_text_encoder, split
from semantic_compressor import PAPER_INPUT_SCALE, latent_grid
from weights.checkpoint import fingerprint, read_metadata, recorded_path, resolve_checkpoint
from pipeline.decoders import SemanticDecoder, load_semantic_decoder, sample_stage_a_images, staged
from weights.lora import load_loras
from pipeline.text_to_image import (Prior, TextToImage, _cast, _with_compressor, check_stage_b_fits,
                                    load_pixel_text_to_image, load_prior, load_text_to_image, split_loras)
from stages.stable_cascade import StageB3, StageC3
from weights.loaders import load_stage_b3, load_stage_c3, load_stage_a
from stages.stage_a import StageA
from pipeline.text_encoder import TextEncoder
from pipeline import inputs

# the released inference settings (StableCascade inference notebooks; gdf's cfg_rho default)
RELEASE = {"prior": {"steps": 20, "guidance": 4.0, "shift": 2.0, "rescale": 0.7},
           "decoder": {"steps": 10, "guidance": 1.1, "shift": 1.0, "rescale": 0.7}}


def cascade_denoiser(network: StageC3 | StageB3, shift: float = 1.0, time_input: str = "cosine_t") -> Denoiser:
    """The denoiser of a Stable Cascade stage (its head: ``config.prediction``) on gdf's schedule at shift
    factor ``shift``."""
    schedule = CosineSchedule(shift=shift_from_factor(shift), clamp_shifted=True)
    return Denoiser(network, network.config.prediction, schedule, time_input=time_input)


def _texts(encoder: TextEncoder, prompts: Sequence[str] | None, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    return split(encoder(list(prompts) if prompts is not None else [""] * b))


@dataclass
class CascadePrior:
    """v3 Stage C with its pooled text encoder; ``sample`` has ``pipeline.text_to_image.Prior.sample``'s call.
    ``image_embeds``: CLIP image embeddings (B or 1, n, c_image) added to the conditional call (zeros else).
    ``compressor_input_scale``: the resize of the compressor Stage C was trained on (sets the latent grid)."""

    model: StageC3
    text_encoder: TextEncoder
    compressor_fingerprint: str | None = None
    shift: float = RELEASE["prior"]["shift"]
    rescale: float = RELEASE["prior"]["rescale"]
    time_input: str = "cosine_t"
    image_embeds: torch.Tensor | None = None
    compressor_input_scale: float = PAPER_INPUT_SCALE

    @property
    def denoiser(self) -> Denoiser:
        return cascade_denoiser(self.model, self.shift, self.time_input)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid Stage C samples for an image of ``height x width`` (the compressor's resize, 3/4 in the
        paper)."""
        return latent_grid(height, width, self.compressor_input_scale)

    @torch.no_grad()
    def conditions(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """What the denoiser takes after ``(x, t)`` for ``prompts``: the text states and the pooled embedding."""
        return _texts(self.text_encoder, prompts, len(prompts))

    def sample(self, prompts: list[str], negative: list[str], grid: tuple[int, int], steps: int | str | list[float],
               guidance: float, generator: torch.Generator, progress: bool = True, sampler: str = "ddpm",
               eta: float | None = None, init: torch.Tensor | None = None,
               strength: float | None = None, callback: Callable[[dict], None] | None = None,
               control: list[torch.Tensor | None] | None = None,
               known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Compressor latents (B, 16, *grid), float32. ``init`` (compressor latents) with ``strength``: img2img,
        the latents noised to t = strength and denoised from there (no normalisation in v3). ``callback``,
        ``control`` (ControlNet features, both guidance branches) and ``known`` (inpainting: latents held where
        kept) as ``pipeline.text_to_image.Prior.sample``'s."""
        b, device = len(prompts), next(self.model.parameters()).device
        text, pooled = _texts(self.text_encoder, prompts, b)
        uncond_text, uncond_pooled = _texts(self.text_encoder, negative, b)
        image = None
        if self.model.config.c_image:
            zeros = torch.zeros(b, 1, self.model.config.c_image, device=device)
            given = self.image_embeds
            image = zeros if given is None else given.to(device).expand(b, *given.shape[1:])
            uncond_image = torch.zeros_like(image)
        extra = () if control is None else (control,)
        conditions = (text, pooled, image if image is not None else None) + extra
        unconditional = (uncond_text, uncond_pooled, uncond_image if image is not None else None) + extra
        guided = Guided(self.denoiser, conditions, unconditional, guidance, self.rescale)
        if known is not None:
            guided = KeepKnown(guided, known[0].float(), known[1])
        noise = torch.randn((b, self.model.config.c_latent, *grid), generator=generator,
                            device=generator.device).to(device)
        if init is not None:
            x0 = init.float().to(device)
            if x0.shape != noise.shape:
                raise ValueError(f"img2img latents have shape {tuple(x0.shape)}; Stage C samples {tuple(noise.shape)}")
            noise = guided.schedule.add_noise(x0, torch.full((b,), check_start(strength)), noise)
        report = None if callback is None else lambda state: callback(
            {**state, "stage": "Stage C", "semantic": state["x0"].float()})
        return sample(sampler, guided, noise, steps, generator=generator, eta=eta, callback=report,
                      progress="Stage C" if progress else False, start=strength if init is not None else None)


class CascadeDecoder(torch.nn.Module):
    """v3 Stage B samples Stage A latents from the compressor latents, Stage A decodes them
    (``pipeline.decoders.SemanticDecoder``'s call)."""

    default_steps = RELEASE["decoder"]["steps"]
    default_guidance = RELEASE["decoder"]["guidance"]
    progress_name = "Stage B"

    def __init__(self, stage_b: StageB3, stage_a: StageA, text_encoder: TextEncoder,
                 shift: float = RELEASE["decoder"]["shift"], rescale: float = RELEASE["decoder"]["rescale"],
                 time_input: str = "cosine_t"):
        super().__init__()
        self.stage_b, self.stage_a, self.text_encoder = stage_b, stage_a, text_encoder
        self.shift, self.rescale, self.time_input = shift, rescale, time_input

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (Stage A's f4 times Stage B's patch; other grids are resized)."""
        return 4 * self.stage_b.config.patch_size

    @torch.no_grad()
    def forward(self, semantic: torch.Tensor, size: tuple[int, int], prompts: list[str] | None = None,
                steps: int | str | list[float] = 10, guidance: float = 1.1, generator: torch.Generator | None = None,
                progress: bool | str = False, sampler: str = "ddpm", eta: float | None = None,
                negative_prompts: list[str] | None = None,
                callback: Callable[[dict], None] | None = None) -> torch.Tensor:
        b = semantic.shape[0]
        _, pooled = _texts(self.text_encoder, prompts, b)
        _, uncond_pooled = _texts(self.text_encoder, negative_prompts, b)
        denoiser = cascade_denoiser(self.stage_b, self.shift, self.time_input)
        guided = Guided(denoiser, (semantic, pooled), (torch.zeros_like(semantic), uncond_pooled), guidance,
                        self.rescale)
        shape = (b, self.stage_b.config.c_latent, size[0] // 4, size[1] // 4)
        return sample_stage_a_images(self.stage_a, guided, shape, semantic.device, steps, generator, progress,
                                     sampler, eta, staged(callback, self.progress_name))


def load_cascade_prior(path: str | os.PathLike, text_encoder: TextEncoder | None = None,
                       loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> CascadePrior:
    """v3 Stage C (file or run folder) with the text encoder its export recorded (MiniLM pooled by default)."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    model = load_stage_c3(str(path))
    if loras:
        load_loras(model, loras, "stage_c3")
    text_encoder = text_encoder or build_pooled_text_encoder(meta.get("text_encoder") or "minilm")
    if text_encoder.dim != model.config.c_text or text_encoder.dim != model.config.c_pooled:
        raise ValueError(f"Stage C {path} expects text states of width {model.config.c_text} and a pooled embedding "
                         f"of {model.config.c_pooled}; the text encoder gives {text_encoder.dim}")
    time_input = (meta.get("diffusion") or {}).get("time_input", "cosine_t")
    return CascadePrior(model, text_encoder, meta.get("compressor_fingerprint"), time_input=time_input,
                        compressor_input_scale=meta.get("compressor_input_scale", PAPER_INPUT_SCALE))


def load_cascade_decoder(stage_b: str | os.PathLike, stage_a: str | os.PathLike | None = None,
                         text_encoder: TextEncoder | None = None) -> CascadeDecoder:
    """v3 Stage B (file or run folder) with the Stage A it was trained on (``stage_a`` or the path it recorded)."""
    b_path = resolve_checkpoint(stage_b)
    meta = read_metadata(b_path)
    model_b = load_stage_b3(str(b_path))
    if stage_a is None:
        if "stage_a_path" not in meta:
            raise ValueError(f"{b_path} does not record its Stage A; pass the Stage A checkpoint it was trained with")
        stage_a = recorded_path(meta["stage_a_path"], b_path)
    model_a = load_stage_a(str(resolve_checkpoint(stage_a)))
    expected = meta.get("stage_a_fingerprint")
    if expected is not None and fingerprint(model_a) != expected:
        raise ValueError(f"Stage B {b_path} was trained on a different Stage A than {stage_a} (weights fingerprint "
                         f"{fingerprint(model_a)}, expected {expected}); pass the Stage A it was trained with")
    text_encoder = text_encoder or build_pooled_text_encoder(meta.get("text_encoder") or "minilm")
    if text_encoder.dim != model_b.config.c_pooled:
        raise ValueError(f"Stage B {b_path} expects a pooled text embedding of width {model_b.config.c_pooled}; the "
                         f"text encoder gives {text_encoder.dim}")
    time_input = (meta.get("diffusion") or {}).get("time_input", "cosine_t")
    return CascadeDecoder(model_b, model_a, text_encoder, time_input=time_input).eval()


def is_stage_b3(stage_b: str | os.PathLike) -> bool:
    """Whether a Stage B checkpoint (file or run folder) is a Stable Cascade (v3) one, by its recorded stage."""
    return read_metadata(resolve_checkpoint(stage_b)).get("stage") == "stage_b3"


def load_any_prior(stage_c: str | os.PathLike,
                   loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> Prior | CascadePrior:
    """A v3 (``stage_c3``) or v2 Stage C (file or run folder) with its text encoder and LoRA adapters, by the
    checkpoint's recorded stage; anything else is refused with one line."""
    path = resolve_checkpoint(stage_c)
    stage = read_metadata(path).get("stage", "stage_c")
    if stage not in ("stage_c", "stage_c3"):
        raise ValueError(f"{stage_c} is a {stage} checkpoint, not a Stage C; give a Stage C export or run folder")
    return load_cascade_prior(path, loras=loras) if stage == "stage_c3" else load_prior(path, loras=loras)


def load_any_text_to_image(stage_c: str | os.PathLike, stage_b: str | os.PathLike,
                           stage_a: str | os.PathLike | None = None, compressor=None,
                           dtype: torch.dtype | str | None = None,
                           loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> TextToImage:
    """The C -> B -> A sampler for a v3 or a v2 Stage C (by the checkpoint's recorded stage)."""
    stage = read_metadata(resolve_checkpoint(stage_c)).get("stage")
    load = load_cascade_text_to_image if stage == "stage_c3" else load_text_to_image
    return load(stage_c, stage_b, stage_a, compressor=compressor, dtype=dtype, loras=loras)


def load_any_pixel_text_to_image(stage_c: str | os.PathLike, pixel_decoder: str | os.PathLike, compressor=None,
                                 dtype: torch.dtype | str | None = None,
                                 loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> TextToImage:
    """A v2 or v3 Stage C -> the greedy-grown pixel decoder: both priors sample the raw latents of the compressor
    they were trained on, which the decoder renders when it was trained on the same one (checked)."""
    prior = load_any_prior(stage_c, loras=loras)
    return load_pixel_text_to_image(stage_c, pixel_decoder, prior=prior, compressor=compressor, dtype=dtype)


def load_any_decoder(stage_b: str | os.PathLike, stage_a: str | os.PathLike | None = None,
                     text_encoder: TextEncoder | None = None) -> SemanticDecoder | CascadeDecoder:
    """A v3 or v2 Stage B with its Stage A (by the checkpoint's recorded stage): both decode the raw latents of
    the compressor they were trained on, whichever prior sampled them. ``text_encoder``: a pooled one for v3."""
    if is_stage_b3(stage_b):
        return load_cascade_decoder(stage_b, stage_a, text_encoder)
    return load_semantic_decoder(stage_b, stage_a)


def load_cascade_text_to_image(stage_c: str | os.PathLike, stage_b: str | os.PathLike,
                               stage_a: str | os.PathLike | None = None, compressor=None,
                               dtype: torch.dtype | str | None = None,
                               loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> TextToImage:
    """The v3 C -> B -> A sampler from checkpoints (as ``pipeline.text_to_image.load_text_to_image`` for v2), refusing
    stages trained on different compressors; one text encoder serves both stages when they record the same.
    ``stage_b`` may also be a v2 Stage B trained on the same compressor (it decodes the same latents)."""
    dtype = None if dtype is None else inputs.dtype(dtype)
    b_stage = "stage_b3" if is_stage_b3(stage_b) else "stage_b"
    by_stage = split_loras(loras, ("stage_c3", b_stage), None)
    prior = load_cascade_prior(stage_c, loras=by_stage["stage_c3"])
    b_meta = read_metadata(resolve_checkpoint(stage_b))
    same_text = b_meta.get("text_encoder") == read_metadata(resolve_checkpoint(stage_c)).get("text_encoder")
    decoder = load_any_decoder(stage_b, stage_a, prior.text_encoder if same_text else None)
    if by_stage[b_stage]:
        load_loras(decoder.stage_b, by_stage[b_stage], b_stage)
    b_fp = b_meta.get("compressor_fingerprint")
    check_stage_b_fits(prior, stage_c, stage_b, b_fp)
    pipe = _with_compressor(TextToImage(prior, decoder), compressor, b_fp, "Stage B")
    return _cast(pipe, dtype).eval()
