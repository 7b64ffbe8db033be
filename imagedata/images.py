"""Images for every loader: decoding any image file to an RGB tensor in [0, 1], resizing and cropping,
folders of images, and random crops of photos."""
from __future__ import annotations

import io
import logging
import os
import random
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset
from torchvision.utils import save_image
from webdataset.utils import pytorch_worker_info

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


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
    """Bytes of a jpg/png/webp file -> RGB PIL image. Raises on undecodable data and on images above PIL's
    decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``; PIL itself only warns up to twice that)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb(im)


def image_bytes(images: torch.Tensor, suffix: str, nrow: int = 8) -> bytes:
    """One image, or a grid of several (``nrow`` per row, white gaps), encoded in the format ``suffix`` names."""
    buffer = io.BytesIO()
    save_image(images, buffer, format=Image.registered_extensions()[suffix.lower()], nrow=nrow, padding=2,
               pad_value=1.0)
    return buffer.getvalue()


def resize_crop(
    image: Image.Image,
    size: int | tuple[int, int],
    resize: int | None = None,
    crop: str = "center",
    rng: random.Random | None = None,
) -> torch.Tensor:
    """Resize (bicubic) and crop to ``size``: a side (square) or ``(height, width)``.

    Without ``resize`` the image is scaled to just cover the target (for a square: shorter side to
    ``size``); with it the shorter side goes to ``resize`` (at least the target's longer side).
    Returns ``(3, height, width)`` in [0, 1]. ``crop`` is ``center`` or ``random``.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    if resize is not None and resize < max(th, tw):
        raise ValueError(f"resize ({resize}) must be at least the crop size ({max(th, tw)})")
    w, h = image.size
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


class FolderDataset(Dataset):
    """Every image under a folder (recursively); the caption is the sidecar ``name.txt`` if present.
    Images whose shorter side is below ``min_size`` are left out; an unreadable one is replaced by the next."""

    def __init__(self, root: str | os.PathLike, size: int, resize: int | None = None, crop: str = "center",
                 min_size: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}")
        self.size, self.resize, self.crop = size, resize, crop
        if min_size:
            found = len(self.files)
            self.files = [p for p in self.files if shorter_side(p, default=min_size) >= min_size]
            if not self.files:
                raise ValueError(f"none of the {found} images under {self.root} is at least min_size {min_size} px "
                                 "on its shorter side; lower min_size")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        for tries in range(len(self)):  # a loop, not recursion: many unreadable files in a row must not overflow
            path = self.files[(i + tries) % len(self)]
            try:
                image = resize_crop(decode_image(path.read_bytes()), self.size, self.resize, self.crop)
            except Exception as e:
                if len(self) == 1:
                    raise ValueError(f"cannot decode the only image {path}: {e}") from e
                log.warning("unreadable image %s (%s); using the next one instead", path, e)
                continue
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text(encoding="utf-8", errors="replace").strip() if caption_file.exists() else ""
            return {"image": image, "caption": caption, "key": str(path.relative_to(self.root))}
        raise ValueError(f"cannot decode any of the {len(self)} images under {self.root}")


def shorter_side(path: Path, default: int) -> int:
    """The shorter side of an image file, or ``default`` when it cannot be read (reported when loaded)."""
    try:
        with Image.open(path) as im:
            return min(im.size)
    except Exception:
        return default


class PhotoCrops(IterableDataset):
    """Endless random crops of a few real photos, at a random scale (``key`` is ``photo:<name>``);
    with ``buckets`` each crop takes a random bucket's (height, width)."""

    def __init__(self, photos: list, size: int, seed: int = 0, buckets: list[tuple[int, int]] | None = None):
        if not photos:
            raise ValueError("no photos to crop from")
        self.photos, self.size, self.seed, self.buckets = photos, size, seed, buckets

    def __iter__(self) -> Iterator[dict]:
        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(hash((self.seed, rank, worker, random.random())))
        while True:
            name, image = self.photos[rng.randrange(len(self.photos))]
            target = rng.choice(self.buckets) if self.buckets else (self.size, self.size)
            resize = rng.randint(max(target), max(max(target), min(image.size)))
            yield {"image": resize_crop(image, target, resize, "random", rng=rng), "caption": "",
                   "key": f"photo:{name}"}
