"""Decoding and preprocessing shared by every loader: any image file -> RGB float tensor in [0, 1]."""
from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class TooSmall(Exception):
    """An image below the configured minimum size (filtered, not an error)."""


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL mode (grayscale, palette, RGBA/LA, 16-bit, CMYK) -> 8-bit RGB; alpha is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or a.max() > 255 else 255.0
        image = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Bytes of a jpg/png/webp file -> RGB PIL image (raises on undecodable data)."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb(im)


def resize_crop(
    image: Image.Image,
    size: int | tuple[int, int],
    resize: int | None = None,
    crop: str = "center",
    min_size: int = 0,
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize (bicubic) and crop to ``size``: a side (square) or ``(height, width)``.

    Without ``resize`` the image is scaled to just cover the target (for a square: shorter side to
    ``size``); with it the shorter side goes to ``resize`` (at least the target's longer side).
    Returns ``(3, height, width)`` in [0, 1]. ``crop`` is ``center`` or ``random``; images whose
    shorter side is below ``min_size`` raise ``TooSmall``.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    if resize is not None and resize < max(th, tw):
        raise ValueError(f"resize ({resize}) must be at least the crop size ({max(th, tw)})")
    w, h = image.size
    if min(w, h) < min_size:
        raise TooSmall(f"{w}x{h} is below the minimum side {min_size}")
    scale = resize / min(w, h) if resize is not None else max(th / h, tw / w)
    if scale != 1:
        image = image.resize((max(tw, round(w * scale)), max(th, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    if crop == "center":
        left, top = (w - tw) // 2, (h - th) // 2
    elif crop == "random":
        rng = rng or random
        left, top = rng.randint(0, w - tw), rng.randint(0, h - th)
    else:
        raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
    image = image.crop((left, top, left + tw, top + th))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
