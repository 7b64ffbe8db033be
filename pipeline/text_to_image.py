"""Text -> image: text encoder -> Stage C prior -> decoder (paper Fig. 3, right).

The decoder is any module called as ``decoder(semantic, size, prompts, steps, guidance,
generator, progress)`` with a ``size_multiple`` attribute (``pipeline.decoders``); Stage B + Stage A
is the first, the greedy-grown pixel decoder can take its place without touching the rest.
"""
from __future__ import annotations

import io
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import nn
from torchvision.utils import make_grid

from diffusion import SAMPLERS, Guided, KeepKnown, check_sampler, check_start, sample, takes_eta
from semantic_compressor import PAPER_INPUT_SCALE, SemanticCompressor, denormalize_latents, latent_grid, normalize_latents
from weights.loaders import load_compressor, load_stage_c
from weights.checkpoint import fingerprint, read_metadata, resolve_checkpoint
from pipeline.denoisers import denoiser_for
from common.files import write_together
from pipeline import inputs
from weights.lora import check_loras, load_loras
from common.checks import check_images
from imagedata.filters import check_mask, mask_share
from pipeline.inputs import Limits, check_finite, check_half, check_image_request, check_request
from stages.stage_c import StageC
from pipeline.text_encoder import TextEncoder, build_text_encoder, check_prompts
from pipeline.decoders import load_semantic_decoder, load_pixel_decoder
from pipeline.controlnet import Control


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
    compressor_input_scale: float = PAPER_INPUT_SCALE  # the resize its compressor applies (sets the latent grid)

    def __post_init__(self):
        self.denoiser = denoiser_for(self.model, self.diffusion)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid Stage C samples for an image of ``height x width`` (its compressor's grid)."""
        return latent_grid(height, width, self.compressor_input_scale)

    @torch.no_grad()
    def conditions(self, prompts: list[str]) -> tuple[torch.Tensor, ...]:
        """What the denoiser takes after ``(x, t)`` for ``prompts``: the text states."""
        return (self.text_encoder(prompts),)

    def sample(self, prompts: list[str], negative: list[str], grid: tuple[int, int], steps: int | str | list[float],
               guidance: float, generator: torch.Generator, progress: bool = True, sampler: str = "ddpm",
               eta: float | None = None, init: torch.Tensor | None = None,
               strength: float | None = None, callback: Callable[[dict], None] | None = None,
               control: list[torch.Tensor | None] | None = None,
               known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Raw semantic latents (B, 16, *grid) for the prompts, ready for a decoder (float32, whatever
        the model's dtype: the sampler's state stays in float32).

        ``control``: a ControlNet's features (``pipeline.controlnet.Control.features``), given to both
        guidance branches. ``known``: (raw latents, keep) for inpainting: where ``keep`` (B or 1, 1, *grid)
        is 1 the sample is held to the known latents (``diffusion.KeepKnown``).

        ``init`` (raw compressor latents, B x 16 x grid) and ``strength`` s in (0, 1]: img2img in the
        semantic space (SDEdit, Meng et al. 2022). The latents are normalised as Stage C's training
        latents are, noised to t = s (``x_s = sqrt(ab_s) x_0 + sqrt(1 - ab_s) eps``), and Stage C
        continues from t = s with the prompts.

        ``callback``: called at every step with the sampler's state (``diffusion.sample``) plus
        ``"stage": "Stage C"`` and ``"semantic"``, the raw latents of the step's prediction ``x0`` (what a
        decoder or the previewer takes).
        """
        extra = () if control is None else (control,)
        guided = Guided(self.denoiser, self.conditions(prompts) + extra, self.conditions(negative) + extra, guidance)
        if known is not None:
            guided = KeepKnown(guided, normalize_latents(known[0].float(), self.latent_shift, self.latent_scale),
                               known[1])
        device = next(self.model.parameters()).device
        noise = torch.randn((len(prompts), self.model.config.c_latent, *grid), generator=generator,
                            device=generator.device).to(device)
        if init is not None:
            x0 = normalize_latents(init.float().to(device), self.latent_shift, self.latent_scale)
            if x0.shape != noise.shape:
                raise ValueError(f"img2img latents have shape {tuple(x0.shape)}; Stage C samples {tuple(noise.shape)}")
            noise = self.denoiser.schedule.add_noise(x0, torch.full((len(prompts),), check_start(strength)), noise)
        report = None if callback is None else lambda state: callback(
            {**state, "stage": "Stage C",
             "semantic": denormalize_latents(state["x0"].float(), self.latent_shift, self.latent_scale)})
        latents = sample(sampler, guided, noise, steps, generator=generator, eta=eta, callback=report,
                         progress="Stage C" if progress else False, start=strength if init is not None else None)
        return denormalize_latents(latents, self.latent_shift, self.latent_scale)


def load_prior(path: str | os.PathLike, text_encoder: TextEncoder | None = None,
               loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> Prior:
    """Stage C (file or run folder) with the text encoder and normalisation recorded in its export;
    ``loras``: Stage C LoRA adapters ``(path, scale)`` added to it (``weights.lora.load_loras``)."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    model = load_stage_c(str(path))
    if loras:
        load_loras(model, loras, "stage_c")
    if text_encoder is None:
        text_encoder = build_text_encoder(meta.get("text_encoder") or "minilm")
    if text_encoder.dim != model.config.c_text:
        raise ValueError(f"Stage C {path} expects text states of width {model.config.c_text}; the text encoder "
                         f"gives {text_encoder.dim}")
    return Prior(model, text_encoder, meta.get("latent_shift", 1.0), meta.get("latent_scale", 42.0),
                 meta.get("compressor_fingerprint"), meta.get("diffusion"),
                 meta.get("compressor_input_scale", PAPER_INPUT_SCALE))


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


DEFAULT_STRENGTH = 0.6


class TextToImage(nn.Module):
    """The composable sampler: prompts (and optionally an image) -> images ``(B, 3, H, W)`` in [0, 1].

    ``compressor``: the semantic compressor Stage C and the decoder were trained on (paper Sec. 3.1);
    needed only for image variations and img2img (``variations``, ``forward(image=...)``). ``control``: a
    ControlNet on Stage C (``pipeline.controlnet.load_control``), used by ``forward(control_image=...)``.
    """

    def __init__(self, prior: Prior, decoder: nn.Module, compressor: SemanticCompressor | None = None,
                 control: Control | None = None):
        super().__init__()
        self.prior, self.decoder, self.compressor = prior, decoder, compressor
        self.model, self.text_encoder = prior.model, prior.text_encoder  # registered: .to(device) moves them
        self.control = control
        self.controlnet = None if control is None else control.controlnet

    def attach_control(self, control: Control) -> TextToImage:
        """Steer Stage C with ``control`` (``pipeline.controlnet.load_control``), moved to Stage C's device."""
        self.control, self.controlnet = control, control.controlnet.to(next(self.prior.model.parameters()).device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The dtype Stage C runs in (``load_text_to_image(..., dtype=)``; float32 by default)."""
        return next(self.prior.model.parameters()).dtype

    @torch.no_grad()
    def forward(self, prompts: list[str] | str, negative_prompt: str | None = None, height: int | None = None,
                width: int | None = None, images_per_prompt: int = 1, prior_steps: int | str | list[float] = 60,
                decoder_steps: int | str | list[float] | None = None, prior_guidance: float = 4.0,
                decoder_guidance: float | None = None,
                seed: int = 0, progress: bool = True, return_latents: bool = False, prior_sampler: str = "ddpm",
                decoder_sampler: str = "ddpm", prior_eta: float | None = None, decoder_eta: float | None = None,
                limits: Limits | None = Limits(), image: torch.Tensor | None = None, strength: float | None = None,
                callback: Callable[[dict], None] | None = None, control_image: torch.Tensor | None = None,
                mask: torch.Tensor | None = None, control_scale: float = 1.0, keep_unmasked: bool = False,
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Images for every prompt, ``images_per_prompt`` each (prompt-major order).

        The same arguments and seed give the same images. H and W (default 128, or the image's size)
        are rounded up to the decoder's grid with a note; step counts (or explicit decreasing time
        lists ending in 0, or a named list of ``diffusion.TIME_LISTS``) are per stage, and so are the
        samplers (``diffusion.SAMPLERS``) and their eta; ``decoder_steps`` and ``decoder_guidance`` default to
        the decoder's own (as for ``variations``). ``negative_prompt`` (None: none) replaces the empty prompt
        in the guidance of Stage C and of a text-conditional decoder (the released pipelines use it in
        both); a decoder without text ignores it. ``return_latents``: also return Stage C's semantic
        latents, ``(images, latents)``. ``limits``: refuse work too large for the device
        (``pipeline.inputs.Limits``; None: no check). ``callback``: called at every step of every stage
        with the sampler's state and ``"stage"`` ("Stage C", then the decoder's ``progress_name``);
        Stage C's also carries ``"semantic"`` (``Prior.sample``). An exception it raises stops the work.

        ``image`` (1 or ``len(prompts)`` images ``(B, 3, H, W)`` in [0, 1]) with ``strength`` s in
        (0, 1] (default 0.6): img2img. The image's compressor latents are noised to t = s and Stage C
        continues from there with the prompts (``Prior.sample``); it runs ``round(prior_steps * s)``
        of a step count. The image is resized to the output size first.

        ``control_image`` (1, 3, H, W) in [0, 1] (with ``mask`` (1, 1, H, W) of 0s and 1s, 1 = repaint, for
        inpainting): steers Stage C through the pipeline's ControlNet (``control``), its features times
        ``control_scale``; the output size defaults to the control image's (twice it for sr).
        ``keep_unmasked`` (inpainting): Stage C's latents are held to the control image's compressor latents in
        the latent cells the mask leaves whole (``diffusion.KeepKnown``); needs the compressor.
        """
        check_sampler(prior_sampler, prior_eta), check_sampler(decoder_sampler, decoder_eta)
        if (control_image is not None or mask is not None) and self.control is None:
            raise ValueError("a control image needs a ControlNet: load one with pipeline.controlnet.load_control "
                             "(CLI: --control KIND --controlnet PATH)")
        if self.control is not None and control_image is None:
            raise ValueError(f"this pipeline has a {self.control.kind} ControlNet: pass its control image (CLI: "
                             "--control-image)")
        if self.control is not None:
            check_images(control_image, "the control image")
            if self.control.kind == "inpaint" and mask is None:
                raise ValueError("the inpaint ControlNet needs a mask (white: repaint, black: keep; CLI: --mask)")
        if keep_unmasked and (self.control is None or self.control.kind != "inpaint"):
            raise ValueError("keep_unmasked holds what the mask keeps of the control image: it needs the inpaint "
                             "ControlNet with its control image and mask (CLI: --control inpaint --mask)")
        if keep_unmasked and self.compressor is None:
            raise ValueError("keep_unmasked needs the semantic compressor for the control image's latents; load it "
                             "with compressor=PATH (CLI: --compressor)")
        if self.control is not None:
            if mask is not None:
                check_mask(mask)  # a mask that is not binary fails before any work
            if not math.isfinite(control_scale):
                raise ValueError(f"the control scale must be a finite number, got {control_scale}")
            if height is None and width is None and image is None:
                height, width = self.control.default_size(control_image)
        if image is None and strength is not None:
            raise ValueError("strength applies to img2img only; pass image= (CLI: --image) or drop strength")
        if image is not None:
            strength = inputs.strength(DEFAULT_STRENGTH if strength is None else strength, "strength")
            self._check_image(image, "img2img")
            n_prompts = 1 if isinstance(prompts, str) else len(prompts) if isinstance(prompts, (list, tuple)) else 0
            if image.shape[0] not in (1, n_prompts):
                raise ValueError(f"img2img got {image.shape[0]} images for {n_prompts} prompt(s); pass one image "
                                 "for all prompts or one per prompt")
        height, width = self._size(image, height, width)
        negative_prompt = "" if negative_prompt is None else negative_prompt  # None: no negative prompt (diffusers)
        decoder_steps = self.decoder.default_steps if decoder_steps is None else decoder_steps
        decoder_guidance = self.decoder.default_guidance if decoder_guidance is None else decoder_guidance
        check_request(self, prompts, negative_prompt, height, width, images_per_prompt, prior_steps, decoder_steps,
                      prior_guidance, decoder_guidance, seed, limits)  # everything else, before any work
        prompts = check_prompts([prompts] if isinstance(prompts, str) else prompts)
        h, w = snap_size(height, width, self.decoder.size_multiple)
        if not prompts or any(not p.strip() for p in prompts):
            warnings.warn("an empty prompt samples unconditionally (no text guidance)", stacklevel=2)
        batch = [p for p in prompts for _ in range(images_per_prompt)]
        negatives = [negative_prompt] * len(batch)
        init = None
        if image is not None:
            init = self.encode(image, (h, w))
            init = init.expand(len(prompts), *init.shape[1:]).repeat_interleave(images_per_prompt, 0)
        control = None if self.control is None else self.control.features(control_image, mask, (h, w),
                                                                           control_scale)
        known = None
        if keep_unmasked:  # the latent cells the mask leaves whole
            masked = F.interpolate(check_mask(mask).to(torch.float32), size=(h, w), mode="nearest")
            known = (self.encode(control_image, (h, w)), (mask_share(masked, self.prior.grid(h, w)) == 0).float())
        generator = torch.Generator().manual_seed(seed)
        semantic = self.prior.sample(batch, negatives, self.prior.grid(h, w), prior_steps, prior_guidance, generator,
                                     progress, prior_sampler, prior_eta, init=init, strength=strength,
                                     callback=callback, control=control, known=known)
        if self.dtype != torch.float32:
            check_half(semantic, "Stage C's latents", self.dtype)
        images = self.decoder(semantic, (h, w), batch, decoder_steps, decoder_guidance, generator,
                              getattr(self.decoder, "progress_name", "decoder") if progress else False,
                              decoder_sampler, decoder_eta, negative_prompts=negatives, callback=callback)
        self._check_images_out(images)
        return (images, semantic) if return_latents else images

    @torch.no_grad()
    def variations(self, images: torch.Tensor, images_per_image: int = 1, height: int | None = None,
                   width: int | None = None, decoder_steps: int | str | list[float] | None = None,
                   decoder_guidance: float | None = None, seed: int = 0, progress: bool = True,
                   decoder_sampler: str = "ddpm", decoder_eta: float | None = None, limits: Limits | None = Limits(),
                   return_latents: bool = False, callback: Callable[[dict], None] | None = None,
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Variations of ``images`` ``(B, 3, H, W)`` in [0, 1]: each image's semantic latents (the
        compressor's 42:1 code, paper Sec. 3.1) rendered ``images_per_image`` times by the decoder with
        different noise (image-major order). Stage C is not used; output size defaults to the image's.
        ``decoder_steps`` and ``decoder_guidance`` default to the decoder's own (Stage B 12 steps at guidance 2,
        pixel decoder 50 at 3); ``callback`` as for ``forward``.
        """
        check_sampler(decoder_sampler, decoder_eta)
        self._check_image(images, "variations")
        height, width = self._size(images, height, width)
        steps = self.decoder.default_steps if decoder_steps is None else decoder_steps
        decoder_guidance = self.decoder.default_guidance if decoder_guidance is None else decoder_guidance
        check_image_request(self, images.shape[0], images_per_image, height, width, steps, decoder_guidance, seed,
                            limits)
        h, w = snap_size(height, width, self.decoder.size_multiple)
        semantic = self.encode(images, (h, w)).repeat_interleave(images_per_image, 0)
        generator = torch.Generator().manual_seed(seed)
        out = self.decoder(semantic, (h, w), [""] * semantic.shape[0], steps, decoder_guidance, generator,
                           getattr(self.decoder, "progress_name", "decoder") if progress else False,
                           decoder_sampler, decoder_eta, callback=callback)
        self._check_images_out(out)
        return (out, semantic) if return_latents else out

    @torch.no_grad()
    def encode(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Raw semantic latents (float32) of images in [0, 1], resized (bicubic, antialiased) to ``size`` first."""
        if self.compressor is None:
            raise ValueError("this pipeline has no semantic compressor; load it with compressor=PATH (the "
                             "compressor.safetensors Stage C and the decoder were trained with; CLI: --compressor)")
        self._check_image(images, "the semantic compressor")
        device = next(self.compressor.parameters()).device
        images = images.to(device, torch.float32)
        if size is not None and tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        dtype = next(self.compressor.parameters()).dtype
        return self.compressor(images.to(dtype)).float()

    @torch.no_grad()
    def call_seconds(self) -> tuple[float, float]:
        """(seconds of one Stage C call on the latent grid of a ``REFERENCE_SIDE`` (256) px image, seconds of one
        decoder step with its decode at that size), timed on the pipeline's device and dtype, once per device
        and dtype (``pipeline.inputs.check_limits`` scales them to a request)."""
        stage_c, decoder = next(self.prior.model.parameters()), next(self.decoder.parameters())
        key = (str(stage_c.device), stage_c.dtype, str(decoder.device), decoder.dtype)
        measured = self.__dict__.setdefault("_call_seconds", {})
        if key not in measured:
            side = inputs.REFERENCE_SIDE
            latents = torch.zeros(1, self.prior.model.config.c_latent, *self.prior.grid(side, side), device=stage_c.device)
            conditions, t = self.prior.conditions([""]), torch.full((1,), 0.5, device=stage_c.device)
            measured[key] = (
                _timed(lambda: self.prior.denoiser(latents, t, *conditions), stage_c.device),
                _timed(lambda: self.decoder(latents.to(decoder.device), (side, side), [""], 1, 1.0,
                                            torch.Generator().manual_seed(0), False), decoder.device))
        return measured[key]

    def _check_image(self, images: torch.Tensor, who: str) -> None:
        check_images(images, who)
        self.prior.grid(*images.shape[-2:])  # at least one compressor cell, with the fix named

    @staticmethod
    def _size(image: torch.Tensor | None, height: int | None, width: int | None) -> tuple[int, int]:
        """Requested H and W; unset ones are the image's, else 128."""
        default = (128, 128) if image is None else tuple(image.shape[-2:])
        return (default[0] if height is None else height, default[1] if width is None else width)

    def _check_images_out(self, images: torch.Tensor) -> None:
        if self.dtype != torch.float32:
            check_half(images, "the sampled images", self.dtype)
        check_finite(images, "the sampled images", "a model may hold NaN/inf weights (corrupt or diverged checkpoint)")


def _timed(call, device: torch.device) -> float:
    """Seconds of ``call()`` on ``device`` (on a GPU after one untimed call, which pays for kernel selection)."""
    if device.type == "cuda":
        call()
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def check_same_compressor(prior: Prior, stage_c: str | os.PathLike, decoder_fingerprint: str | None, decoder: str,
                          fix: str) -> None:
    """Refuse a decoder trained on another compressor's latents than the ones Stage C samples (paper Sec. 3:
    both stages work in the compressor's latent space); unrecorded fingerprints pass."""
    c_fp = prior.compressor_fingerprint
    if c_fp and decoder_fingerprint and c_fp != decoder_fingerprint:
        raise ValueError(f"Stage C {stage_c} was trained on a different semantic compressor ({c_fp}) than the one "
                         f"{decoder} was trained with ({decoder_fingerprint}); {fix}")


def check_stage_b_fits(prior: Prior, stage_c: str | os.PathLike, stage_b: str | os.PathLike,
                       b_fingerprint: str | None) -> None:
    """``check_same_compressor`` for a Stage B (its recorded compressor fingerprint ``b_fingerprint``)."""
    check_same_compressor(prior, stage_c, b_fingerprint, f"Stage B {stage_b}",
                          "use the Stage B whose compressor trained C")


def _with_compressor(pipe: TextToImage, compressor: str | os.PathLike | SemanticCompressor | None,
                     decoder_fingerprint: str | None, decoder_name: str) -> TextToImage:
    """Attach the compressor, refusing one other than the compressor Stage C and the decoder were trained on."""
    if compressor is None:
        return pipe
    model = compressor if isinstance(compressor, SemanticCompressor) else load_compressor(compressor)
    got = fingerprint(model)
    for who, expected in (("Stage C", pipe.prior.compressor_fingerprint), (decoder_name, decoder_fingerprint)):
        if expected and got != expected:
            raise ValueError(f"the semantic compressor {compressor} (fingerprint {got}) is not the one {who} was "
                             f"trained on ({expected}); pass the compressor.safetensors of its training run")
    pipe.compressor = model.eval()
    return pipe


def _cast(pipe: TextToImage, dtype: torch.dtype | str | None) -> TextToImage:
    """Every network in ``dtype`` but the semantic compressor, which stays in float32 (its antialiased
    bicubic resize has no half-precision kernel on CPU; it runs once per image)."""
    if dtype is None:
        return pipe
    pipe.to(inputs.dtype(dtype))
    if pipe.compressor is not None:
        pipe.compressor.float()
    return pipe


def split_loras(loras: Sequence[tuple[str | os.PathLike, float]], stages: tuple[str, ...],
                prior: Prior | None) -> dict[str, list[tuple[str | os.PathLike, float]]]:
    """LoRA adapters by the stage each was made for (every file read and checked before any network loads)."""
    found: dict[str, list] = {stage: [] for stage in stages}
    for path, scale, meta in check_loras(loras):
        if meta["base_stage"] not in found:
            raise ValueError(f"LoRA adapter {path} is for {meta['base_stage']}, which this pipeline does not use "
                             f"({', '.join(stages)}); drop it or use the decoder it was made for")
        found[meta["base_stage"]].append((path, scale))
    if prior is not None and found.get("stage_c"):
        raise ValueError("Stage C LoRA adapters go to load_prior(..., loras=) when a loaded prior is passed")
    return found


def load_text_to_image(stage_c: str | os.PathLike, stage_b: str | os.PathLike,
                       stage_a: str | os.PathLike | None = None, prior: Prior | None = None,
                       compressor: str | os.PathLike | SemanticCompressor | None = None,
                       dtype: torch.dtype | str | None = None,
                       loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> TextToImage:
    """The C -> B -> A sampler from checkpoints, refusing stages that were not trained together.

    ``prior``: Stage C already loaded from ``stage_c`` (several decoders share one). ``compressor``:
    the semantic compressor (a path or model) for variations and img2img. ``dtype``: float32
    (default), bfloat16 or float16 weights; samplers keep their state in float32. ``loras``: LoRA
    adapters ``(path, scale)`` (``weights.lora``), each added to the stage (C or B) it was trained for.
    """

    dtype = None if dtype is None else inputs.dtype(dtype)
    by_stage = split_loras(loras, ("stage_c", "stage_b"), prior)
    prior = prior or load_prior(stage_c, loras=by_stage["stage_c"])
    decoder = load_semantic_decoder(stage_b, stage_a)
    if by_stage["stage_b"]:
        load_loras(decoder.stage_b, by_stage["stage_b"], "stage_b")
    b_fp = read_metadata(stage_b).get("compressor_fingerprint")
    check_stage_b_fits(prior, stage_c, stage_b, b_fp)
    pipe = _with_compressor(TextToImage(prior, decoder), compressor, b_fp, "Stage B")
    return _cast(pipe, dtype).eval()


def load_pixel_text_to_image(stage_c: str | os.PathLike, pixel_decoder: str | os.PathLike,
                             prior: Prior | None = None,
                             compressor: str | os.PathLike | SemanticCompressor | None = None,
                             dtype: torch.dtype | str | None = None,
                             loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> TextToImage:
    """Stage C -> the greedy-grown pixel decoder, refusing a decoder trained on another compressor's latents.

    ``prior``: Stage C already loaded from ``stage_c`` (several decoders share one); ``compressor``,
    ``dtype`` and ``loras`` (Stage C adapters only) as for ``load_text_to_image``.
    """

    dtype = None if dtype is None else inputs.dtype(dtype)
    prior = prior or load_prior(stage_c, loras=split_loras(loras, ("stage_c",), prior)["stage_c"])
    decoder = load_pixel_decoder(pixel_decoder)
    check_same_compressor(prior, stage_c, decoder.compressor_fingerprint, f"pixel decoder {pixel_decoder}",
                          "train the pixel decoder with the compressor that trained Stage C")
    pipe = _with_compressor(TextToImage(prior, decoder), compressor, decoder.compressor_fingerprint,
                            "the pixel decoder")
    return _cast(pipe, dtype).eval()


def save_images(images: torch.Tensor, out: str | os.PathLike, nrow: int, overwrite: bool = False,
                text: dict[str, str] | None = None) -> list[Path]:
    """One image: ``out``. Several: ``out`` is the grid and ``<stem>_<i>.png`` the single images. All are
    written together (``common.files.write_together``): a full disk or a crash replaces none of them.

    ``text``: key -> value pairs written into every PNG as text chunks (``iTXt``; PIL reads them back as
    ``Image.open(path).text``); other formats are written without them.
    """
    out = Path(out)
    paths = [out] if images.shape[0] == 1 else [out] + [out.with_name(f"{out.stem}_{i}{out.suffix}")
                                                      for i in range(images.shape[0])]
    clash = [p for p in paths if p.exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]} exists; choose another --out or pass --overwrite")
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    encoded = [_image_bytes(grid, out.suffix, text)] + [_image_bytes(im, p.suffix, text)
                                                        for p, im in zip(paths[1:], images)]
    write_together(dict(zip(paths, encoded)))
    return paths


def _image_bytes(image: torch.Tensor, suffix: str, text: dict[str, str] | None) -> bytes:
    """One (3, H, W) image in [0, 1], encoded in the format ``suffix`` names, at 8 bits as
    ``torchvision.utils.save_image`` rounds it, with PNG text."""
    pixels = image.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to("cpu", torch.uint8).numpy()
    info = None
    if text and suffix.lower() == ".png":
        info = PngInfo()
        for key, value in text.items():
            info.add_itxt(key, value)  # iTXt: UTF-8, so prompts in any script survive
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=Image.registered_extensions()[suffix.lower()], pnginfo=info)
    return buffer.getvalue()


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
