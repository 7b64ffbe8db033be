"""Small local data and the pieces every stream shares: folders of images, Stage A's photo crops,
interleaving, the DDP rank. Webdataset shards stream through ``train.data.stream``."""
from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Iterator

from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from webdataset.utils import pytorch_worker_info

from stages.images import IMAGE_EXTENSIONS, decode_image, resize_crop

log = logging.getLogger(__name__)


def rank_and_world() -> tuple[int, int]:
    """DDP rank and world size as webdataset sees them (``RANK``/``WORLD_SIZE``, else the process group)."""
    rank, world, _, _ = pytorch_worker_info()
    return rank, world


class FolderDataset(Dataset):
    """Every image under a folder (recursively); the caption is the sidecar ``name.txt`` if present."""

    def __init__(self, root: str | os.PathLike, size: int, resize: int | None = None, crop: str = "center",
                 min_size: int = 0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS)
        if not self.files:
            raise FileNotFoundError(f"no {'/'.join(IMAGE_EXTENSIONS)} images under {self.root}")
        self.size, self.resize, self.crop, self.min_size = size, resize, crop, min_size
        if min_size:
            def big_enough(p: Path) -> bool:
                try:
                    with Image.open(p) as im:
                        return min(im.size) >= min_size
                except Exception:
                    return True  # reported when loaded
            found = len(self.files)
            self.files = [p for p in self.files if big_enough(p)]
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


class PhotoCrops(IterableDataset):
    """Endless random crops of a few real photos, at a random scale (``key`` is ``photo:<name>``);
    with ``buckets`` each crop takes a random bucket's (height, width)."""

    def __init__(self, photos: list, size: int, seed: int = 0, buckets: list[tuple[int, int]] | None = None):
        if not photos:
            raise ValueError("no photos to crop from")
        self.photos, self.size, self.seed, self.buckets = photos, size, seed, buckets

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        rank, _ = rank_and_world()
        rng = random.Random(hash((self.seed, rank, info.id if info else 0, random.random())))
        while True:
            name, image = self.photos[rng.randrange(len(self.photos))]
            target = rng.choice(self.buckets) if self.buckets else (self.size, self.size)
            resize = rng.randint(max(target), max(max(target), min(image.size)))
            yield {"image": resize_crop(image, target, resize, "random", rng=rng), "caption": "",
                   "key": f"photo:{name}"}


class Interleaved(IterableDataset):
    """``primary`` with one sample of ``extra`` after every ``every - 1`` of its own (epoch ends with primary)."""

    def __init__(self, primary, extra: IterableDataset, every: int):
        if every < 2:
            raise ValueError(f"every must be at least 2, got {every}")
        self.primary, self.extra, self.every = primary, extra, every

    def __iter__(self) -> Iterator[dict]:
        extra = iter(self.extra)
        for i, sample in enumerate(self.primary, start=1):
            yield sample
            if i % (self.every - 1) == 0:
                yield next(extra)
