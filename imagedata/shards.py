"""Webdataset shard streams: image-caption shards (LAION/img2dataset layout) and precomputed-latent shards.

A shard set is a local tar, a folder of ``.tar`` files, a glob (``data/*.tar``), a brace pattern
(``data/{000000..000099}.tar``) or a URL that ``webdataset.gopen`` opens: ``pipe:<command>``,
``http(s)://`` (through curl) and ``s3://`` (through ``aws s3 cp <url> -``). Each pass is a
``webdataset.DataPipeline``: a ``SimpleShardList`` (``ResampledShards`` with ``resampled``), a split
across DDP ranks and dataloader workers, ``tarfile_to_samples``' parts with a handler that counts a
broken shard and goes on, a seeded ``shuffle`` buffer (training), decoding with filters, and
batching by shape (aspect-ratio buckets, ``imagedata.buckets``).

Split: the consumers (ranks x workers) take disjoint parts that together cover the data: whole
shards when there are at least as many shards as consumers, otherwise every consumer reads every
shard and keeps every n-th sample. Both are a ``webdataset.slice`` by consumer index, with the rank
as ``webdataset.utils.pytorch_worker_info`` finds it (``RANK``/``WORLD_SIZE`` or the process group),
or as sent along to a spawned worker, which may have neither (``split_by_node`` would then see rank 0).
Equal batches per rank: with ``count`` (the samples in the set) every rank yields
``count // world // batch_size`` batches in training (and ``count // world`` samples in validation);
a consumer short of its share repeats its own part, one over it stops. Resampled streams and
weighted mixtures are endless, so they need ``count`` (the epoch length).

Determinism: shard order, shuffle buffer, crops and resampling are seeded by (seed, epoch, rank,
worker), so a pass at epoch ``e`` gives the same batches for the same seed, ranks and workers.

Precomputed shards (written by ``python -m train.precompute``) hold ``<key>.npy`` float16 tensors
per sample and a ``manifest.json`` next to them naming the encoders' fingerprints; the manifest is
read and checked here, where the stream reads the shards.
"""
from __future__ import annotations

import contextlib
import glob
import io
import itertools
import json
import logging
import os
import random
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener
from webdataset.utils import pytorch_worker_info

from imagedata.buckets import batch_by_shape, nearest_bucket
from imagedata.images import IMAGE_EXTENSIONS, decode_image, resize_crop

log = logging.getLogger(__name__)
CAPTION_KEYS = ("txt", "caption", "text")
MANIFEST = "manifest.json"
FORMAT = "wuerstchen-precomputed/1"
LATENT_KEYS = ("stage_a", "semantic", "text")  # precomputed tensors, stored as ``<key>.npy`` (fp16)
FINGERPRINTS = ("stage_a_fingerprint", "compressor_fingerprint", "text_encoder_fingerprint")
FLIPPED = "#flipped"  # key suffix of a horizontally flipped training image (ImagePrep.flip)
# a shard that cannot be read counts under its cause: a local file not there, a URL that cannot be fetched, a
# pipe: command that fails, or data that is not a readable tar
SHARD_REASONS = ("missing_shard", "unreachable_shard", "failed_command", "corrupt_shard")
BASE_REASONS = ("yielded", *SHARD_REASONS, "no_image", "corrupt_sample")
CURL_EXITS = {6: "host not found", 7: "connection refused", 28: "timed out", 35: "TLS handshake failed",
              52: "empty reply", 56: "connection reset"}  # curl's exit statuses (webdataset fetches URLs with curl)


def rank_and_world() -> tuple[int, int]:
    """DDP rank and world size as webdataset sees them (``RANK``/``WORLD_SIZE``, else the process group)."""
    rank, world, _, _ = pytorch_worker_info()
    return rank, world


# --------------------------------------------------------------------------------------- shard lists

@dataclass
class ShardSet:
    """One shard set of a source: its URLs, its mixing weight and how the user wrote it."""

    shards: list[str]
    weight: float = 1.0
    spec: str = ""


def is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def opened_url(url: str) -> str:
    """``s3://`` goes through the AWS command line; everything else as ``webdataset.gopen`` opens it."""
    return f"pipe:aws s3 cp {url} -" if url.startswith("s3://") else url


def list_shards(spec: str | os.PathLike | list) -> list[str]:
    """Shard URLs of a spec: a list of specs, braces (``{000..009}``) expanded, a folder -> its
    ``.tar`` files, a glob -> its matches (sorted); URLs are kept as given. Raises when nothing matches."""
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in list_shards(item)]
    spec = str(spec)
    out = []
    for item in expand_urls(spec):
        if is_url(item):
            out.append(opened_url(item))
        elif os.path.isdir(item):
            found = sorted(glob.glob(os.path.join(item, "*.tar")))
            if not found:
                raise FileNotFoundError(f"no .tar shards in the folder {item}; give a folder of shards or a pattern")
            out += found
        elif any(c in item for c in "*?["):
            out += sorted(glob.glob(item))
        else:
            out.append(item)
    if not out:
        raise FileNotFoundError(f"no shards match {spec!r}; check the path or build the data first")
    return out


def existing_shards(spec: str | list) -> list[str]:
    """``list_shards``, failing at once when the shards are local and not one of them is a file."""
    shards = list_shards(spec)
    if not any(is_url(s) or os.path.isfile(s) for s in shards):
        if shards == [str(spec)]:
            raise FileNotFoundError(f"data source {spec!r} does not exist; give openmoji, a folder of images or .tar "
                                    "shards, a .tar file, a glob (data/*.tar), a brace pattern (data/{000..009}.tar) "
                                    "or a URL (pipe:..., https://..., s3://...)")
        raise FileNotFoundError(f"none of the {len(shards)} shards of {spec!r} exists (the first is {shards[0]}); "
                                "check the path or build the data first")
    return shards


def shard_sets(spec: str | list) -> list[ShardSet]:
    """A source as shard sets: a spec (path, folder, pattern, URL) or a list of specs is one set; a
    list of ``{shards: spec, weight: number}`` is a weighted mixture."""
    if not (isinstance(spec, (list, tuple)) and any(isinstance(s, dict) for s in spec)):
        return [ShardSet(existing_shards(spec), 1.0, str(spec))]
    if not all(isinstance(s, dict) for s in spec):
        raise ValueError("a source list holds either shard patterns or {shards, weight} entries, not both")
    sets = []
    for item in spec:
        weight = item.get("weight", 1)
        if set(item) - {"shards", "weight"} or "shards" not in item:
            raise ValueError(f"mixture entry {item!r} must be {{shards: <pattern>, weight: <number>}}")
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
            raise ValueError(f"mixture weight of {item['shards']!r} must be a positive number, got {weight!r}")
        sets.append(ShardSet(existing_shards(item["shards"]), float(weight), str(item["shards"])))
    return sets


def find_manifest(spec: str | list, shards: list[str]) -> Path | None:
    """``manifest.json`` next to local shards (in the folder given, or the first shard's folder)."""
    first = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(first, (str, os.PathLike)) and os.path.isdir(first):
        candidate = Path(first) / MANIFEST
    elif shards and not is_url(shards[0]):
        candidate = Path(shards[0]).parent / MANIFEST
    else:
        return None
    return candidate if candidate.is_file() else None


def read_manifest(path: str | os.PathLike) -> dict:
    """A precompute manifest, refusing one whose run did not finish."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the precompute manifest {path}: {e}") from None
    if not isinstance(manifest, dict) or "keys" not in manifest:
        raise ValueError(f"{path} is not a precompute manifest (written by python -m train.precompute)")
    if not manifest.get("complete"):
        raise ValueError(f"the precompute in {path.parent} did not finish; run the same python -m train.precompute "
                         "command again to complete it")
    return manifest


def source_manifest(sets: list[ShardSet], given: bool | str | None = None) -> dict | None:
    """The precompute manifest of a source's shard sets (all must share one), or None for image shards.
    ``given``: True requires one next to the shards; a path names it (e.g. for remote shards)."""
    if isinstance(given, str):
        return read_manifest(given)
    found = [find_manifest(s.spec, s.shards) for s in sets]
    if given and not all(found):
        missing = next(s.spec for s, m in zip(sets, found) if not m)
        raise FileNotFoundError(f"precomputed is set, but there is no manifest.json next to {missing}; "
                                "give its path as precomputed: <path>/manifest.json")
    if not any(found):
        return None
    if not all(found):
        raise ValueError("a mixture cannot combine precomputed shards with image shards")
    manifests = [read_manifest(m) for m in found]
    if any(m.get(k) != manifests[0].get(k) for m in manifests[1:] for k in (*FINGERPRINTS, "keys")):
        raise ValueError("the precomputed shard sets of the mixture were made by different encoders; "
                         "mix only sets with the same manifest fingerprints")
    return manifests[0]


def check_made_with(manifest: dict, fingerprints: dict[str, str]) -> None:
    """Refuse precomputed shards whose manifest names other encoder weights than ``fingerprints``
    (``{manifest key: fingerprint}``, e.g. ``compressor_fingerprint``)."""
    for key, ours in fingerprints.items():
        if manifest.get(key) not in (None, ours):
            raise ValueError(f"the precomputed shards were made with other weights ({key} {manifest[key]}, "
                             f"this run's is {ours}); precompute them again with this run's encoders")


def manifest_count(manifest: dict, sets: list[ShardSet]) -> int | None:
    """The samples in ``sets`` as the manifest records them (None when it does not list every shard)."""
    per_shard = manifest.get("shards", {})
    names = [Path(s).name for ss in sets for s in ss.shards]
    return sum(per_shard[n] for n in names) if all(n in per_shard for n in names) else None


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


# --------------------------------------------------------------------------------------- skip counts

class SampleCounts:
    """Samples yielded and skipped (by reason), in shared memory: DataLoader workers count, the main
    process reads. Each worker adds to its own row (``row``), so no two processes write one cell."""

    def __init__(self, reasons: Iterable[str] = BASE_REASONS, rows: int = 64):
        self.reasons = tuple(reasons)
        self.table = torch.zeros(rows, len(self.reasons), dtype=torch.int64).share_memory_()
        self.row = 0
        self.causes: dict[str, str] = {}  # the first shard failure of each reason seen in this process

    def add(self, reason: str) -> int:
        self.table[self.row % len(self.table), self.reasons.index(reason)] += 1
        return self[reason]

    def __getitem__(self, reason: str) -> int:
        return int(self.table[:, self.reasons.index(reason)].sum())

    def as_dict(self) -> dict[str, int]:
        return {r: self[r] for r in self.reasons}

    @staticmethod
    def text(counts: dict[str, int], causes: dict[str, str] | None = None) -> str:
        """``yielded 0, skipped: corrupt_shard 2, too_small 5`` (reasons with a count only), with the first
        shard failure of a reason when known (``unreachable_shard 2 (first: HTTP 404: <url>)``)."""
        def shown(reason: str, n: int) -> str:
            return f"{reason} {n}" + (f" (first: {causes[reason]})" if causes and reason in causes else "")
        skipped = ", ".join(shown(r, n) for r, n in counts.items() if n and r != "yielded") or "none"
        return f"yielded {counts.get('yielded', 0)}, skipped: {skipped}"


def skip(counts: SampleCounts, reason: str, sample: dict, detail: object = "") -> None:
    """Count a skipped sample; warn for the first five of a reason and every thousandth after."""
    n = counts.add(reason)
    if n <= 5 or n % 1000 == 0:
        log.warning("skipped sample %s in %s (%s%s); %d skipped for this reason so far", sample.get("__key__"),
                    sample.get("__url__"), reason, f": {detail}" if detail else "", n)


def http_status(url: str) -> str:
    """The HTTP status a URL answers with (asked again with a HEAD request, curl having been told to be silent)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as response:
            return f"HTTP {response.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except Exception:
        return "HTTP error (400 or above)"


def shard_failure(url: str, error: Exception, exit_status: int | None) -> tuple[str, str]:
    """(reason, cause) of a shard that could not be read: ``missing_shard`` (file not found),
    ``unreachable_shard`` (connection refused, host not found, HTTP status, ...), ``failed_command`` (a
    ``pipe:`` command's exit status) or ``corrupt_shard`` (read, but not a complete tar)."""
    if isinstance(error, FileNotFoundError) and not is_url(url):
        return "missing_shard", "file not found"
    if exit_status not in (None, 0, 141):  # 141: SIGPIPE, the reader stopped early
        if url.startswith(("http://", "https://")):
            return "unreachable_shard", http_status(url) if exit_status == 22 else \
                CURL_EXITS.get(exit_status, f"curl exit status {exit_status}")
        return "failed_command", f"exit status {exit_status} of {url.removeprefix('pipe:')!r}"
    detail = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    return "corrupt_shard", f"{type(error).__name__}: {detail.split(' @ ')[0][:200]}"


def exit_status(stream: object) -> int | None:
    """The exit status of the command behind a ``webdataset.gopen.Pipe`` stream (None for a plain file)."""
    proc = getattr(stream, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(timeout=30)
    except Exception:
        return None


def shard_samples(shards: Iterable[dict], counts: SampleCounts) -> Iterator[dict]:
    """``{"url": ...}`` -> samples, with webdataset's ``url_opener``, ``tar_file_expander`` and
    ``group_by_keys`` (the parts of ``tarfile_to_samples``). Their handler records an error and stops
    that shard: a shard that cannot be read is counted by its cause (``SHARD_REASONS``), logged with
    the cause named, and the stream goes on with the next; the sample being read when it broke is dropped."""
    for shard in shards:
        source, errors = dict(shard), []

        def stop(error: Exception) -> bool:
            errors.append(error)
            return False
        last = None
        try:
            files = tar_file_expander(url_opener([source], handler=stop), handler=stop)
            for sample in group_by_keys(files, handler=stop):
                if last is not None:
                    yield last
                last = sample
        finally:
            status = exit_status(source.get("stream")) if errors else None
            with contextlib.suppress(Exception):  # a pipe's exit status was already seen while reading
                source["stream"].close()
        if errors:
            reason, cause = shard_failure(source["url"], errors[0], status)
            counts.add(reason)
            counts.causes.setdefault(reason, f"{cause}: {source['url']}")
            log.warning("skipping the rest of shard %s: %s (%s)", source["url"], reason, cause)
        elif last is not None:
            yield last


# ------------------------------------------------------------------------------------------- filters

@dataclass
class Filters:
    """What LAION users filter on. ``min_size``: shorter side in px; ``aspect_ratio``: [min, max] of
    width / height; ``metadata``: thresholds on numbers in the sample's ``json``, e.g.
    ``{"aesthetic": {"min": 5.0}, "pwatermark": {"max": 0.5}}`` (a sample without the key fails).
    Each failed filter is its own skip reason: ``too_small``, ``aspect_ratio``, ``metadata:<key>``.
    ``caption_weights``: rebalancing, not quality: a sample whose caption contains one of these phrases
    (case-insensitive) is kept with that probability (the smallest of those it contains), e.g.
    ``{"skin tone": 0.25}``; the others are counted as ``caption_weight``, without warnings."""

    min_size: int = 0
    aspect_ratio: tuple[float, float] | None = None
    metadata: dict[str, dict[str, float]] = field(default_factory=dict)
    caption_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.aspect_ratio is not None:
            ar = self.aspect_ratio
            if (not isinstance(ar, (list, tuple)) or len(ar) != 2
                    or not all(isinstance(v, (int, float)) and v > 0 for v in ar) or ar[0] > ar[1]):
                raise ValueError(f"aspect_ratio must be [min, max] of width/height with 0 < min <= max, got {ar!r}")
            self.aspect_ratio = (float(ar[0]), float(ar[1]))
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata_filters must map json keys to {{min: x, max: y}}, got {self.metadata!r}")
        for key, bounds in self.metadata.items():
            if (not isinstance(bounds, dict) or not bounds or set(bounds) - {"min", "max"}
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds.values())):
                raise ValueError(f"metadata filter {key}: {bounds!r} must be {{min: number}}, {{max: number}} or both, "
                                 'e.g. {"aesthetic": {"min": 5.0}}')

        if not isinstance(self.caption_weights, dict) or not all(
                isinstance(k, str) and k.strip() and isinstance(w, (int, float)) and not isinstance(w, bool)
                and 0 < w <= 1 for k, w in self.caption_weights.items()):
            raise ValueError(f"caption_weights must map caption phrases to keep probabilities in (0, 1], got "
                             f"{self.caption_weights!r}, e.g. {{\"skin tone\": 0.25}}")
        self.caption_weights = {k.lower(): float(w) for k, w in self.caption_weights.items()}

    def reasons(self) -> tuple[str, ...]:
        return ("too_small", "aspect_ratio", *(f"metadata:{k}" for k in self.metadata),
                *(("caption_weight",) if self.caption_weights else ()))

    def keep_probability(self, caption: str) -> float:
        """The smallest ``caption_weights`` value among the phrases the caption contains (1 for none)."""
        text = caption.lower()
        return min((w for phrase, w in self.caption_weights.items() if phrase in text), default=1.0)

    def failed_metadata(self, sample: dict) -> tuple[str, str] | None:
        """(reason, detail) of the first metadata threshold a sample fails, or None."""
        if not self.metadata:
            return None
        try:
            meta = json.loads(sample["json"]) if "json" in sample else {}
        except ValueError:
            meta = {}
        for key, bounds in self.metadata.items():
            value = meta.get(key) if isinstance(meta, dict) else None
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                return f"metadata:{key}", "missing"
            if value < bounds.get("min", -float("inf")) or value > bounds.get("max", float("inf")):
                return f"metadata:{key}", f"{value}"
        return None

    def failed_image(self, width: int, height: int) -> tuple[str, str] | None:
        if min(width, height) < self.min_size:
            return "too_small", f"{width}x{height}"
        if self.aspect_ratio and not self.aspect_ratio[0] <= width / height <= self.aspect_ratio[1]:
            return "aspect_ratio", f"{width}x{height}"
        return None


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


@dataclass
class ImagePrep:
    """Decoding, filtering and cropping of image samples: to ``size`` (square; shorter side resized
    to ``resize`` first) or, with ``buckets``, to the bucket of nearest aspect ratio (cover, crop). ``flip``:
    the probability of a horizontal flip; a flipped sample's key ends in ``FLIPPED`` (another image: latents
    cached per key stay apart)."""

    size: int
    resize: int | None = None
    crop: str = "center"
    filters: Filters = field(default_factory=Filters)
    buckets: list[tuple[int, int]] | None = None
    flip: float = 0.0

    def target(self, width: int, height: int) -> int | tuple[int, int]:
        return nearest_bucket(width, height, self.buckets) if self.buckets else self.size

    def __call__(self, samples: Iterable[dict], counts: SampleCounts, rng: random.Random) -> Iterator[dict]:
        for sample in samples:
            failed = self.filters.failed_metadata(sample)
            if failed:
                skip(counts, failed[0], sample, failed[1])
                continue
            ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
            if ext is None:
                skip(counts, "no_image", sample)
                continue
            try:
                caption = caption_of(sample)
                if self.filters.caption_weights and rng.random() >= self.filters.keep_probability(caption):
                    counts.add("caption_weight")  # rebalanced away this time, not a faulty sample
                    continue
                image = decode_image(sample[ext])
            except Exception as e:  # undecodable image or caption: count, warn, go on
                skip(counts, "corrupt_sample", sample, e)
                continue
            failed = self.filters.failed_image(*image.size)
            if failed:
                skip(counts, failed[0], sample, failed[1])
                continue
            resize = None if self.buckets else self.resize
            tensor = resize_crop(image, self.target(*image.size), resize, self.crop, rng=rng)
            key = sample["__key__"]
            if self.flip and rng.random() < self.flip:
                tensor, key = tensor.flip(-1), key + FLIPPED
            counts.add("yielded")
            yield {"image": tensor, "caption": caption, "key": key}


def precomputed_samples(samples: Iterable[dict], counts: SampleCounts) -> Iterator[dict]:
    """Precomputed shards (``train.precompute``) -> ``{"caption", "key", "stage_a"?, "semantic"?,
    "text"?, "image"?}``: float32 tensors of whichever were stored (``image`` from uint8 to [0, 1])."""
    for sample in samples:
        try:
            out = {"caption": caption_of(sample), "key": sample["__key__"]}
            for key in LATENT_KEYS:
                if f"{key}.npy" in sample:
                    out[key] = torch.from_numpy(npy(sample[f"{key}.npy"]).astype(np.float32))
            if "image.npy" in sample:
                out["image"] = torch.from_numpy(npy(sample["image.npy"]).astype(np.float32) / 255.0)
        except Exception as e:
            skip(counts, "corrupt_sample", sample, e)
            continue
        if len(out) == 2:
            skip(counts, "no_image", sample, "no stored tensor")
            continue
        counts.add("yielded")
        yield out


# ------------------------------------------------------------------------------------------- streams

def endless(make_pass: Callable[[int], Iterator]) -> Iterator:
    """Passes 0, 1, 2, ... one after the other; stops after a pass that yields nothing."""
    k = 0
    while True:
        got = False
        for item in make_pass(k):
            got = True
            yield item
        if not got:
            return
        k += 1


def mix(streams: list[Iterator], weights: list[float], rng: random.Random) -> Iterator:
    """Each next sample from a stream drawn with probability proportional to its weight; a stream
    that ends leaves the mix."""
    streams, weights = list(streams), list(weights)
    while streams:
        i = rng.choices(range(len(streams)), weights)[0]
        try:
            yield next(streams[i])
        except StopIteration:
            del streams[i], weights[i]


def interleave(primary: Iterable[dict], extra: Iterable[dict], every: int) -> Iterator[dict]:
    """``primary`` with one sample of ``extra`` after every ``every - 1`` of its own (ends with primary)."""
    extra = iter(extra)
    for i, sample in enumerate(primary, start=1):
        yield sample
        if i % (every - 1) == 0:
            yield next(extra)


class ShardStream(IterableDataset):
    """Batches (``{"image": (B, 3, H, W), "caption": [...], "key": [...]}``, or precomputed tensors) from
    one shard set or a weighted mixture; see the module docstring for splitting, quotas and seeds.

    Args:
        sets: the shard sets (weights matter with more than one).
        batch_size: samples per batch; training drops partial batches, validation keeps them.
        prep: how images are decoded, filtered and cropped (``None`` for precomputed shards).
        train: shuffle shard order and samples (buffer ``shuffle_buffer``), drop partial batches.
        count: samples in the set (all ranks together), if known: equal batches per rank.
        resampled: draw shards with replacement (``ResampledShards``), endlessly.
        extra: ``(dataset, every)``: one of its samples after every ``every - 1`` (Stage A's photo crops).
    """

    def __init__(self, sets: list[ShardSet], batch_size: int, prep: ImagePrep | None, *, train: bool = False,
                 shuffle_buffer: int = 1000, seed: int = 0, count: int | None = None, resampled: bool = False,
                 extra: tuple[IterableDataset, int] | None = None):
        if (resampled or len(sets) > 1) and not count:
            kind = "a resampled stream" if resampled else "a weighted mixture of shard sets"
            raise ValueError(f"{kind} is endless; set train_count (val_count) to the samples per epoch")
        self.sets, self.batch_size, self.prep, self.train = sets, batch_size, prep, train
        self.shuffle_buffer, self.seed, self.count, self.resampled = shuffle_buffer, seed, count, resampled
        self.extra = extra
        reasons = BASE_REASONS + (prep.filters.reasons() if prep else ())
        self.skipped = SampleCounts(reasons)
        self.epoch = 0  # set by the data module from the trainer's epoch; advanced by each new pass
        self._passes = 0
        self._dist: tuple[int, int] | None = None

    def __getstate__(self) -> dict:
        # DataLoader workers started by spawn/forkserver (not fork) see no process group; send the rank along
        return {**self.__dict__, "_dist": rank_and_world()}

    def describe(self) -> str:
        if len(self.sets) > 1:
            return f"a mixture of {len(self.sets)} shard sets ({', '.join(s.spec for s in self.sets)})"
        shards = self.sets[0].shards
        return shards[0] if len(shards) == 1 else f"{len(shards)} shards ({shards[0]}, ...)"

    def consumer(self) -> tuple[int, int, int, int]:
        """(rank, world, worker, workers) of the process iterating."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        rank, world = rank_and_world()
        if info is not None and self._dist is not None and not torch.distributed.is_initialized():
            rank, world = self._dist  # a spawned worker has no process group: the rank it was sent with
        return rank, world, worker, workers

    def raw(self, shard_set: ShardSet, epoch: int, k: int, cid: int, consumers: int) -> Iterator[dict]:
        """One pass of undecoded samples of a shard set for consumer ``cid`` of ``consumers``."""
        urls = shard_set.shards
        if self.resampled:  # every consumer draws its own shards, seeded by (seed, epoch, pass, consumer)
            shards = wds.ResampledShards(urls, seed=self.seed, worker_seed=lambda: cid, deterministic=True)
            shards.epoch = epoch * 100_003 + k - 1  # ResampledShards adds 1 per iteration
            return wds.DataPipeline(shards, lambda src: shard_samples(src, self.skipped)).iterator1()
        order = wds.SimpleShardList(urls, seed=self.seed * 1_000_003 + epoch if self.train else None)
        by_shard = len(urls) >= consumers
        return wds.DataPipeline(
            order,
            wds.slice(cid, None, consumers) if by_shard else None,  # whole shards per rank and worker ...
            lambda src: shard_samples(src, self.skipped),
            None if by_shard else wds.slice(cid, None, consumers),  # ... or every n-th sample
        ).iterator1()

    def samples(self, epoch: int, k: int, cid: int, consumers: int, rng: random.Random) -> Iterator[dict]:
        """One pass of decoded samples (endless for mixtures and resampled streams)."""
        if len(self.sets) == 1:
            raw = self.raw(self.sets[0], epoch, k, cid, consumers)
        else:
            streams = [endless(lambda j, s=s: self.raw(s, epoch, k + j, cid, consumers)) for s in self.sets]
            raw = mix(streams, [s.weight for s in self.sets], rng)
        if self.train and self.shuffle_buffer > 1:
            raw = wds.shuffle(self.shuffle_buffer, initial=min(100, self.shuffle_buffer), rng=rng)(raw)
        out = self.prep(raw, self.skipped, rng) if self.prep else precomputed_samples(raw, self.skipped)
        if self.extra is not None:
            out = interleave(out, *self.extra)
        return out

    def __iter__(self) -> Iterator[dict]:
        rank, world, worker, workers = self.consumer()
        self.skipped.row = worker
        epoch = self.epoch + self._passes
        self._passes += 1
        cid, consumers = rank * workers + worker, world * workers
        rng = random.Random(hash((self.seed, epoch, rank, worker)))
        per_rank = None if self.count is None else self.count // world
        if per_rank is not None and self.train:
            per_rank //= self.batch_size  # training counts whole batches, validation samples
        quota = None if per_rank is None else per_rank // workers + (worker < per_rank % workers)

        if quota is None:
            samples = self.samples(epoch, 0, cid, consumers, rng)
        else:  # repeated passes up to the quota: a consumer short of its share repeats its own part
            samples = endless(lambda k: self.samples(epoch, k, cid, consumers, rng))
        if self.train:
            stream = itertools.islice(batch_by_shape(samples, self.batch_size, drop_last=True), quota)
        else:
            stream = batch_by_shape(itertools.islice(samples, quota), self.batch_size, drop_last=False)
        got = 0
        for batch in stream:
            got += 1 if self.train else len(batch["key"])
            yield batch
        if quota is not None and got < quota:
            raise ValueError(f"no readable sample for rank {rank} worker {worker} in {self.describe()} "
                             f"({SampleCounts.text(self.skipped.as_dict(), self.skipped.causes)}); check the shards, or lower min_size "
                             "or loosen the filters")
