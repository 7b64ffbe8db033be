"""Checks of what users hand to the models and the sampler: images, numbers, and work that cannot fit.

Every check raises ``ValueError`` (``FloatingPointError`` for non-finite results) with one line
naming the problem and the fix, before any expensive work.

Sampling limits (``Limits``) refuse requests whose rough cost is absurd on the device:

* memory: the decoder's widest activation, ``images x H x W x`` floats per pixel ``x`` bytes per
  float ``x PEAK_FACTOR``. Floats per pixel come from the loaded decoder's config: the largest
  ``4 x width / d^2`` over its levels (ConvNeXt and mixing blocks expand to 4 x width; a level of
  side H/d). For Stage B + Stage A (paper Sec. 3.1) Stage A's first decoder level, at H/2,
  is the widest; for the pixel decoder its highest-resolution level. ``PEAK_FACTOR`` (4) covers the
  block's input, residual and the U-Net skips alive beside it: the shipped tiny Stage B + A peaked
  at 2.9-4.2 times the widest activation on CPU (256-1024 px). The limit is the device's free
  memory (GPU) or physical RAM (CPU).
* time: measured. One Stage C call on the latent grid of a ``REFERENCE_SIDE`` (256) px image and one
  decoder step with its final decode at 256 px are timed on the pipeline's own device and dtype
  (once per pipeline and device; a request smaller than ``MEASURED_ABOVE`` such calls is not
  measured: it cannot come near the limit). The estimate scales both by the request's pixels over
  256^2, its network calls (steps, twice with guidance w != 1) and its images, one at a time: rough,
  and high rather than low (batches run faster per image; the decode is counted at every step).
  Work estimated above ``Limits.seconds`` (an hour by default) is refused with the estimate; above
  a minute the estimate is shown as a note before sampling starts.
* aspect ratio: sides further apart than the widest trained buckets (``imagedata.buckets``' paper
  preset, 3:5 to 5:3) get a note: the models never saw such shapes.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral, Real
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from diffusion import sampling_times
from imagedata.buckets import PRESETS
from imagedata.images import to_rgb
from pipeline.text_encoder import check_prompts

MAX_SEED = 2 ** 63  # torch.Generator seeds are 64-bit; negative ones wrap around
MAX_SECONDS = 3600.0  # refuse sampling estimated above an hour on the device
NOTE_SECONDS = 60.0  # show the estimate of anything longer before it starts
REFERENCE_SIDE = 256  # side of the image whose network calls are timed (TextToImage.call_seconds)
MEASURED_ABOVE = 256  # requests of fewer network calls at the reference size are not timed
TRAINED_RATIOS = (min(h / w for h, w in PRESETS["paper_c3"]), max(h / w for h, w in PRESETS["paper_c3"]))
PEAK_FACTOR = 4
EXPANSION = 4  # channel MLPs of ConvNeXt and mixing blocks widen to 4 x width


def _fail(name: str, problem: str) -> ValueError:
    return ValueError(f"{name} {problem}".strip())


def check_finite(tensor: torch.Tensor, what: str, fix: str) -> torch.Tensor:
    """``tensor`` if every value is finite, else a FloatingPointError naming ``what`` and the ``fix``."""
    bad = int((~torch.isfinite(tensor)).sum())
    if bad:
        raise FloatingPointError(f"{what} contain {bad} NaN/inf values of {tensor.numel()}; {fix}")
    return tensor


# -- numbers (each takes the value and the name to show; the CLI passes an empty name) -----------------
def whole(value: object, name: str = "", low: int = 1) -> int:
    """An int (not a bool) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise _fail(name, f"must be a whole number, got {value!r}")
    if value < low:
        raise _fail(name, f"must be at least {low}, got {value}")
    return int(value)


def seed(value: object, name: str = "") -> int:
    """A seed in [0, 2**63)."""
    value = whole(value, name, 0)
    if value >= MAX_SEED:
        raise _fail(name, f"must be below 2**63, got {value}")
    return value


def guidance(value: object, name: str = "") -> float:
    """A finite classifier-free guidance scale w >= 0 (1: none; 0: unconditional)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _fail(name, f"must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise _fail(name, f"must be a finite number >= 0 (1 = no guidance), got {value}")
    return float(value)


def steps(value: object, name: str = "") -> int | str | list[float]:
    """A step count >= 1, a named time list (``diffusion.TIME_LISTS``), or explicit times decreasing
    from at most 1 to exactly 0."""
    if isinstance(value, str):
        try:
            sampling_times(value)
        except ValueError as e:
            raise _fail(name, str(e)) from None
        return value
    if isinstance(value, Sequence):
        if not all(isinstance(t, Real) and not isinstance(t, bool) for t in value):
            raise _fail(name, f"must be numbers, got {list(value)!r}")
        try:
            sampling_times(value)
        except ValueError as e:
            raise _fail(name, f"is not a valid list of times: {e}") from None
        return [float(t) for t in value]
    return whole(value, name)


def strength(value: object, name: str = "") -> float:
    """An img2img strength in (0, 1]: the time t = strength the image's latents are noised to (1: pure
    noise up to 1% of the image, text-to-image in effect)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise _fail(name, f"must be a number in (0, 1], got {value!r}")
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise _fail(name, f"must be in (0, 1] (the time the image is noised to; 1 = text alone), got {value}")
    return float(value)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype(value: object, name: str = "dtype") -> torch.dtype:
    """A sampling dtype: ``float32``, ``bfloat16`` or ``float16`` (a name or the ``torch.dtype``)."""
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise _fail(name, f"must be one of {', '.join(DTYPES)}, got {value!r}")


def dtype_name(value: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == value)


def check_half(tensor: torch.Tensor, what: str, precision: torch.dtype) -> torch.Tensor:
    """``tensor`` if finite; else a FloatingPointError naming the reduced ``precision`` and bfloat16 as the fix.

    float16's largest value is 65504: the activations of the released Stage C (and of networks trained
    like it) exceed it, and the overflow becomes inf, then NaN, then a black image. bfloat16 keeps
    float32's exponent range.
    """
    fix = (f"in {dtype_name(precision)} an activation overflowed (float16 stops at 65504); sample with "
           "--dtype bfloat16 (Python: dtype=torch.bfloat16), which has float32's range, or float32"
           if precision == torch.float16 else
           f"in {dtype_name(precision)}; try --dtype float32, and check the checkpoints for NaN/inf weights")
    return check_finite(tensor, what, fix)


def load_image(path: str | os.PathLike, flag: str = "--image") -> torch.Tensor:
    """An image file (png, jpg, webp, ...; any mode, alpha composited on white) as ``(1, 3, H, W)`` in [0, 1];
    errors name it as ``flag``."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a folder; give an image file (png, jpg, webp)")
    if not path.is_file():
        raise FileNotFoundError(f"{flag} {path} not found; give an image file (png, jpg, webp)")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = to_rgb(im)
    except Image.DecompressionBombError:
        raise ValueError(f"{flag} {path} declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels, PIL's limit against "
                         "decompression bombs; give a smaller image (resize it first)") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{flag} {path} is not a readable image ({type(e).__name__}); give a png, jpg or "
                         "webp file") from None
    return torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255.0


def network_calls(step_value: int | str | Sequence[float], guidance_scale: float) -> int:
    """Network evaluations of a sampler: one per step, two with guidance w != 1."""
    n = len(sampling_times(step_value)) - 1
    return n * (1 if guidance_scale == 1.0 else 2)


# -- limits ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Limits:
    """What one sampling call may take: ``memory`` bytes (None: the device's) and ``seconds`` (estimated)."""

    memory: int | None = None
    seconds: float = MAX_SECONDS


def device_memory(device: torch.device) -> int:
    """Free memory of a CUDA device, else the machine's physical RAM, in bytes."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def floats_per_pixel(decoder: torch.nn.Module) -> float:
    """Floats per image pixel of the decoder's widest activation: max over levels of 4 x width / d^2.

    Stage B + Stage A: Stage A's decoder levels at H/2 and H/4, Stage B's at H/(4 patch 2^i).
    The pixel decoder: its levels at (render side) / 2^i, or its entry width at full size.
    """
    if hasattr(decoder, "stage_b"):
        a, b = decoder.stage_a.config, decoder.stage_b.config
        levels = [(2, a.widths[0]), (4, a.widths[1])]
        levels += [(4 * b.patch_size * 2 ** i, w) for i, w in enumerate(b.widths)]
    else:
        cfg = decoder.model.config
        levels = [(2 ** i / decoder.scale, w) for i, w in enumerate(cfg.level_widths or (cfg.entry_channels,))]
    return max(EXPANSION * w / d ** 2 for d, w in levels)


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.3g} GiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.3g} h" if seconds < 172800 else f"{seconds / 86400:.3g} days"


def estimate_seconds(pipe: torch.nn.Module, images: int, size: tuple[int, int], prior_calls: int,
                     decoder_calls: int) -> float | None:
    """Rough seconds of sampling ``images`` of ``size`` one at a time (see the module docstring), or None for
    work too small to be worth timing."""
    scale = images * size[0] * size[1] / REFERENCE_SIDE ** 2
    if scale * (prior_calls + decoder_calls) <= MEASURED_ABOVE:
        return None
    prior, decoder = pipe.call_seconds()
    return scale * (prior_calls * prior + decoder_calls * decoder)


def check_aspect(height: int, width: int) -> None:
    """A note for shapes beyond the trained buckets' aspect ratios."""
    low, high = TRAINED_RATIOS
    if not low <= height / width <= high:
        warnings.warn(f"{height}x{width} (height/width {height / width:.3g}) lies outside the aspect ratios of the "
                      f"trained buckets ({low:.2f} to {high:.2f}); expect repeated or distorted content",
                      stacklevel=3)


def check_limits(pipe: torch.nn.Module, images: int, size: tuple[int, int], prior_calls: int, decoder_calls: int,
                 limits: Limits) -> None:
    """Refuse ``images`` of ``size`` taking ``prior_calls`` Stage C and ``decoder_calls`` decoder network calls
    each when the memory or the estimated time exceed ``limits``; show a long estimate as a note."""
    decoder = pipe.decoder
    param = next(decoder.parameters())
    pixels = images * size[0] * size[1]
    memory = pixels * floats_per_pixel(decoder) * param.element_size() * PEAK_FACTOR
    available = limits.memory if limits.memory is not None else device_memory(param.device)
    request = f"{images} image(s) of {size[0]}x{size[1]}"
    if memory > available:
        raise ValueError(f"{request} need about {_gib(memory)} of memory, more than the {_gib(available)} this "
                         f"{param.device.type} device has; use fewer or smaller images (--no-limits, in Python "
                         "limits=None, to try anyway)")
    seconds = estimate_seconds(pipe, images, size, prior_calls, decoder_calls)
    if seconds is None:
        return
    work = f"{request} with {prior_calls} Stage C and {decoder_calls} decoder network calls each"
    if seconds > limits.seconds:
        raise ValueError(f"{work} would take about {_duration(seconds)} on this {param.device.type} device (timed "
                         f"at {REFERENCE_SIDE} px), more than the limit of {_duration(limits.seconds)}; use fewer or "
                         "smaller images or fewer steps (--max-minutes or Limits(seconds=...) to raise the limit, "
                         "--no-limits to skip it)")
    if seconds > NOTE_SECONDS:
        warnings.warn(f"{work}: about {_duration(seconds)} on this {param.device.type} device", stacklevel=3)


def check_request(pipe: torch.nn.Module, prompts: Sequence[str], negative_prompt: str, height: int, width: int,
                  images_per_prompt: int, prior_steps: int | Sequence[float], decoder_steps: int | Sequence[float],
                  prior_guidance: float, decoder_guidance: float, seed_value: int,
                  limits: Limits | None = Limits()) -> None:
    """Every argument of ``TextToImage.forward`` valid, and the work within ``limits`` (None: no limits)."""
    prompts = check_prompts([prompts] if isinstance(prompts, str) else prompts)
    if not isinstance(negative_prompt, str):
        raise TypeError(f"negative_prompt must be a str (or None for none), got {type(negative_prompt).__name__}")
    images = len(prompts) * whole(images_per_prompt, "images_per_prompt")
    sides = [whole(height, "height"), whole(width, "width")]
    prior_calls = network_calls(steps(prior_steps, "prior_steps"), guidance(prior_guidance, "prior_guidance"))
    decoder_calls = network_calls(steps(decoder_steps, "decoder_steps"), guidance(decoder_guidance, "decoder_guidance"))
    seed(seed_value, "seed")
    check_aspect(*sides)
    if limits is not None:
        m = pipe.decoder.size_multiple
        check_limits(pipe, images, tuple(math.ceil(s / m) * m for s in sides), prior_calls, decoder_calls, limits)


def check_image_request(pipe: torch.nn.Module, n_images: int, images_per_image: int, height: int, width: int,
                        decoder_steps: int | Sequence[float], decoder_guidance: float, seed_value: int,
                        limits: Limits | None = Limits()) -> None:
    """Every argument of ``TextToImage.variations`` valid, and the work within ``limits`` (None: no limits)."""
    images = n_images * whole(images_per_image, "images_per_image")
    sides = [whole(height, "height"), whole(width, "width")]
    calls = network_calls(steps(decoder_steps, "decoder_steps"), guidance(decoder_guidance, "decoder_guidance"))
    seed(seed_value, "seed")
    check_aspect(*sides)
    if limits is not None:
        m = pipe.decoder.size_multiple
        check_limits(pipe, images, tuple(math.ceil(s / m) * m for s in sides), 0, calls, limits)
