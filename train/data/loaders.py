"""Image-caption datasets: LAION-style webdataset shards and plain folders of images.

Both yield dicts ``{"image": (3, S, S) float in [0, 1], "caption": str, "key": str}``.

Shards are split across DDP ranks and dataloader workers so that the consumers' parts are
disjoint and together cover the data: by shard when there are at least as many shards as consumers
(ranks x workers), otherwise by sample index. When the total count is known, every rank yields
exactly ``count // world_size`` samples so that DDP ranks stay in step: with uneven shard sizes a
rank short of that repeats some of its own samples and a rank over it stops early (with the sample
split, at most ``world_size - 1`` samples an epoch are left out and none repeat).
"""
from __future__ import annotations

import glob
import json
import logging
import os
import random
import tarfile
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from stages.images import IMAGE_EXTENSIONS, TooSmall, decode_image, resize_crop

log = logging.getLogger(__name__)
CAPTION_KEYS = ("txt", "caption", "text")


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard list from a list, a glob (``data/*.tar``) or brace notation (``shard-{000000..000099}.tar``)."""
    if isinstance(spec, (list, tuple)):
        out = [s for item in spec for s in expand_shards(item)]
    elif "{" in spec:
        import braceexpand

        out = list(braceexpand.braceexpand(spec))
    elif any(c in spec for c in "*?["):
        out = sorted(glob.glob(spec))
    else:
        out = [spec]
    if not out:
        raise FileNotFoundError(f"no shards match {spec!r}; check the path or build the data first")
    return out


def existing_shards(spec: str | list[str]) -> list[str]:
    """``expand_shards``, failing at once when not one of the shards is a file (a wrong path or pattern)."""
    shards = expand_shards(spec)
    if not any(os.path.isfile(s) for s in shards):
        if shards == [spec]:
            raise FileNotFoundError(f"data source {spec!r} does not exist; give openmoji, a folder of images or .tar "
                                    "shards, a .tar file, a glob (data/*.tar) or a brace pattern (data/{000..009}.tar)")
        raise FileNotFoundError(f"none of the {len(shards)} shards of {spec!r} exists (the first is {shards[0]}); "
                                "check the path or build the data first")
    return shards


class SampleCounts:
    """Samples yielded and skipped (by reason), in shared memory: DataLoader workers count, the main
    process reads. Each worker adds to its own row (``row``), so no two processes write one cell."""

    REASONS = ("yielded", "corrupt_shard", "no_image", "corrupt_sample", "too_small")

    def __init__(self, rows: int = 64):
        self.table = torch.zeros(rows, len(self.REASONS), dtype=torch.int64).share_memory_()
        self.row = 0

    def add(self, reason: str) -> int:
        cell = self.table[self.row % len(self.table), self.REASONS.index(reason)]
        cell += 1
        return self[reason]

    def __getitem__(self, reason: str) -> int:
        return int(self.table[:, self.REASONS.index(reason)].sum())

    def as_dict(self) -> dict[str, int]:
        return {r: self[r] for r in self.REASONS}

    @staticmethod
    def text(counts: dict[str, int]) -> str:
        """``yielded 0, skipped: corrupt_shard 2, too_small 5`` (reasons with a count only)."""
        skipped = ", ".join(f"{r} {n}" for r, n in counts.items() if n and r != "yielded") or "none"
        return f"yielded {counts.get('yielded', 0)}, skipped: {skipped}"


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def consumer_plan(num_shards: int, rank: int, world: int, worker: int, workers: int) -> tuple[str, int, int]:
    """How one (rank, worker) consumer takes its part: ("shard" | "sample", index, stride)."""
    consumers = world * workers
    cid = rank * workers + worker
    return ("shard" if num_shards >= consumers else "sample"), cid, consumers


def _tar_samples(path: str, skipped: SampleCounts) -> Iterator[dict]:
    """Group the members of one tar by key; a broken or unreadable shard is skipped with a warning."""
    current_key, sample = None, {}
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                key, _, ext = os.path.basename(name).partition(".")
                key = os.path.join(os.path.dirname(name), key)
                if key != current_key:
                    if sample:
                        yield sample
                    current_key, sample = key, {"__key__": key, "__shard__": path}
                sample[ext.lower()] = tar.extractfile(member).read()
        if sample:
            yield sample
    except (tarfile.TarError, OSError, EOFError) as e:
        skipped.add("corrupt_shard")
        log.warning("skipping the rest of shard %s: %s (%s)", path, type(e).__name__, e)


def caption_of(sample: dict) -> str:
    for k in CAPTION_KEYS:
        if k in sample:
            return sample[k].decode("utf-8", errors="replace").strip()
    if "json" in sample:
        meta = json.loads(sample["json"])
        for k in ("caption", "text", "TEXT", "prompt"):
            if isinstance(meta.get(k), str):
                return meta[k].strip()
    return ""


class ShardDataset(IterableDataset):
    """Image-caption pairs from webdataset tar shards (``jpg``/``png``/``webp`` + ``txt`` or ``json``).

    Args:
        shards: list, glob or brace pattern of tar files.
        size: output side; images are resized (shorter side to ``resize``, default ``size``) and cropped.
        crop: ``center`` or ``random``. min_size: skip images whose shorter side is smaller.
        shuffle: shuffle shard order each epoch and samples in a buffer of ``shuffle_buffer``.
        count: total number of samples, if known; makes every DDP rank yield the same number.
    """

    def __init__(self, shards: str | list[str], size: int, resize: int | None = None, crop: str = "center",
                 min_size: int = 0, shuffle: bool = False, shuffle_buffer: int = 1000, seed: int = 0,
                 count: int | None = None):
        self.shards = existing_shards(shards)
        self.size, self.resize, self.crop, self.min_size = size, resize, crop, min_size
        self.shuffle, self.shuffle_buffer, self.seed, self.count = shuffle, shuffle_buffer, seed, count
        self.epoch = 0  # set by the data module from the trainer's epoch; advanced by each new pass
        self.skipped = SampleCounts()
        self._passes = 0
        self._dist: tuple[int, int] | None = None

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver (not fork) see no process group; send the rank along
        return {**self.__dict__, "_dist": rank_and_world()}

    def describe(self) -> str:
        return self.shards[0] if len(self.shards) == 1 else f"{len(self.shards)} shards ({self.shards[0]}, ...)"

    def samples_per_rank(self, world: int) -> int | None:
        return None if self.count is None else self.count // world

    def _raw(self, epoch: int, rank: int, world: int, worker: int, workers: int) -> Iterator[dict]:
        shards = list(self.shards)
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(shards)
        mode, cid, stride = consumer_plan(len(shards), rank, world, worker, workers)
        if mode == "shard":
            for path in shards[cid::stride]:
                yield from _tar_samples(path, self.skipped)
        else:
            for i, sample in enumerate(s for path in shards for s in _tar_samples(path, self.skipped)):
                if i % stride == cid:
                    yield sample

    def _decoded(self, raw: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        for sample in raw:
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                self._skip("no_image", sample)
                continue
            try:
                image = resize_crop(decode_image(sample[ext]), self.size, self.resize, self.crop, self.min_size, rng)
                caption = caption_of(sample)
            except TooSmall:
                self.skipped.add("too_small")
                continue
            except Exception as e:  # undecodable image or caption: count, warn, go on
                self._skip("corrupt_sample", sample, e)
                continue
            self.skipped.add("yielded")
            yield {"image": image, "caption": caption, "key": sample["__key__"]}

    def _skip(self, reason: str, sample: dict, error: Exception | None = None) -> None:
        n = self.skipped.add(reason)
        if n <= 5 or n % 1000 == 0:
            log.warning("skipped sample %s in %s (%s%s); %d skipped for this reason so far",
                        sample.get("__key__"), sample.get("__shard__"), reason, f": {error}" if error else "", n)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = rank_and_world()
        if info is not None and self._dist is not None and not torch.distributed.is_initialized():
            rank, world = self._dist  # a spawned worker has no process group: the rank it was sent with
        self.skipped.row = worker
        epoch = self.epoch + self._passes
        self._passes += 1
        rng = random.Random(hash((self.seed, epoch, rank, worker)))
        quota = self.samples_per_rank(world)
        if quota is not None:  # this worker's share of the rank's quota
            quota = quota // workers + (worker < quota % workers)
        stream = self._decoded(self._raw(epoch, rank, world, worker, workers), rng)
        if self.shuffle:
            stream = _buffer_shuffle(stream, self.shuffle_buffer, rng)
        n = 0
        for sample in stream:
            if quota is not None and n >= quota:
                return
            n += 1
            yield sample
        # Fewer samples than the quota (the shard split gave this consumer fewer): repeat its own from the start.
        got = n
        while quota is not None and n < quota:
            if got == 0:
                raise ValueError(f"no readable sample for rank {rank} worker {worker} in {self.describe()} "
                                 f"({SampleCounts.text(self.skipped.as_dict())}); check the shards, or lower min_size")
            got = 0
            for sample in self._decoded(self._raw(epoch, rank, world, worker, workers), rng):
                if n >= quota:
                    return
                n, got = n + 1, got + 1
                yield sample


def _buffer_shuffle(stream: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    buf: list[dict] = []
    for item in stream:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


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
            from PIL import Image

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
    """Endless random crops of a few real photos, at a random scale (``key`` is ``photo:<name>``)."""

    def __init__(self, photos: list, size: int, seed: int = 0):
        if not photos:
            raise ValueError("no photos to crop from")
        self.photos, self.size, self.seed = photos, size, seed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        rank, _ = rank_and_world()
        rng = random.Random(hash((self.seed, rank, info.id if info else 0, random.random())))
        while True:
            name, image = self.photos[rng.randrange(len(self.photos))]
            resize = rng.randint(self.size, max(self.size, min(image.size)))
            yield {"image": resize_crop(image, self.size, resize, "random", rng=rng), "caption": "",
                   "key": f"photo:{name}"}


class Interleaved(IterableDataset):
    """``primary`` with one sample of ``extra`` after every ``every - 1`` of its own (epoch ends with primary)."""

    def __init__(self, primary: IterableDataset, extra: IterableDataset, every: int):
        if every < 2:
            raise ValueError(f"every must be at least 2, got {every}")
        self.primary, self.extra, self.every = primary, extra, every

    def __iter__(self) -> Iterator[dict]:
        extra = iter(self.extra)
        for i, sample in enumerate(self.primary, start=1):
            yield sample
            if i % (self.every - 1) == 0:
                yield next(extra)


def collate(samples: list[dict]) -> dict:
    return {
        "image": torch.stack([s["image"] for s in samples]),
        "caption": [s["caption"] for s in samples],
        "key": [s["key"] for s in samples],
    }
