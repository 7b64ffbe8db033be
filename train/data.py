"""The Lightning data module every stage trains from; the datasets it serves are the library's
(``imagedata.shards``: webdataset streams; ``imagedata.images``: image folders)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from imagedata.buckets import collate, parse_buckets
from imagedata.embedded import openmoji_shards, training_photos
from imagedata.images import FolderDataset, PhotoCrops
from imagedata.shards import (Filters, ImagePrep, SampleCounts, ShardSet, ShardStream, manifest_count, shard_sets,
                              source_manifest)
from train.faults import delay_sigterm

log = logging.getLogger(__name__)


class CheckedLoader(DataLoader):
    """A DataLoader whose every pass yields a batch: a pass with none (every sample unreadable or
    filtered, or fewer than one batch) raises instead of letting training loop over empty epochs,
    and an error raised in a worker reaches the user as its own one-line message."""

    def __iter__(self):
        stream = self.dataset if isinstance(self.dataset, ShardStream) else None
        before = stream.skipped.as_dict() if stream else {}
        batches = 0
        try:
            for batch in super().__iter__():
                batches += 1
                yield batch
        except (ValueError, OSError) as error:
            if "DataLoader worker" not in str(error).split("\n", 1)[0]:
                raise
            # PyTorch re-raises a worker's error with the worker's traceback as its message; keep the last line
            raise type(error)(str(error).strip().splitlines()[-1].partition(": ")[2]) from None
        if batches == 0 and stream is not None:
            counts = {k: v - before.get(k, 0) for k, v in stream.skipped.as_dict().items()}
            raise ValueError(f"no batch of {stream.batch_size} in a whole pass over {stream.describe()} "
                             f"({SampleCounts.text(counts, stream.skipped.causes)}); check that the shards hold readable images, "
                             "lower min_size, loosen the filters, or lower batch_size")


def is_folder_of_images(spec: str | list | None) -> bool:
    return isinstance(spec, (str, Path)) and Path(spec).is_dir() and not any(Path(spec).glob("*.tar"))


class ImageTextData(L.LightningDataModule):
    """Image-caption batches ``{"image", "caption", "key"}`` (or precomputed latents) for training and validation.

    A source (``train``/``val``) is ``openmoji`` (the embedded set, built on first use in
    ``embedded_dir``), webdataset shards (``shards/{000000..000099}.tar``, ``shards/*.tar``, a folder
    of ``.tar`` files, ``pipe:...``, ``https://...``, ``s3://...``; see ``imagedata.shards``), a
    weighted mixture (``[{shards: a/{000..009}.tar, weight: 3}, {shards: b/*.tar, weight: 1}]``),
    or a folder of images with optional ``.txt`` captions (small local data).

    Training images are resized (shorter side to ``resize``, default ``image_size``) and cropped to
    ``image_size`` (``crop``: random or center); validation images are resized and centre-cropped to
    ``val_size`` (default: ``resize`` or ``image_size``). With ``buckets`` (a list of [height, width]
    or the preset ``paper_c3``) every image is scaled to cover the bucket of nearest aspect ratio
    and cropped to it, and each batch holds one bucket (``imagedata.buckets``).

    Filters (counted by reason): ``min_size`` (shorter side), ``aspect_ratio`` ([min, max] of
    width/height), ``metadata_filters`` (thresholds on the sample's json, e.g.
    ``{aesthetic: {min: 5.0}, pwatermark: {max: 0.5}}``). ``caption_weights`` rebalances the training
    mix (validation is left as it is): a training sample whose caption contains a phrase is kept with
    its probability, e.g. ``{"skin tone": 0.25}`` (``imagedata.shards.Filters``); with a known
    ``train_count`` an epoch keeps its number of batches, drawing more passes over the rest.

    ``train_count``/``val_count``: samples in the source; with it every DDP rank yields the same
    number of batches (``openmoji`` and precomputed shards know theirs). ``resampled``: draw
    training shards with replacement, endlessly (needs ``train_count`` as the epoch length).

    Precomputed shards (``python -m train.precompute``) are recognised by the ``manifest.json``
    next to them (``precomputed``, for the training source: True requires one, a path names it,
    e.g. for remote shards); their batches hold ``stage_a``/``semantic``/``text`` tensors.
    ``self.precomputed`` is the training source's manifest (None for image data),
    ``self.manifests["val"]`` the validation source's.

    ``photo_crops_every`` (Stage A only; 0 = off): every n-th training sample is a random crop of
    one of the real photos that ship with scikit-image and are not in the held-out set.

    ``flip`` (shard sources): each training image is flipped horizontally with this probability, as another
    image (its key ends in ``imagedata.shards.FLIPPED``): more images for a decoder to learn from. Not for a
    prior whose captions name a direction.
    """

    def __init__(self, train: str | list | None = "openmoji", val: str | list | None = "openmoji", image_size: int = 128,
                 resize: int | None = None, val_size: int | None = None, crop: str = "random",
                 min_size: int = 0, aspect_ratio: list[float] | None = None,
                 metadata_filters: dict[str, dict[str, float]] | None = None,
                 buckets: str | list[list[int]] | None = None, batch_size: int = 16,
                 val_batch_size: int | None = None, num_workers: int = 2, shuffle_buffer: int = 1000,
                 embedded_dir: str = "data/openmoji", train_count: int | None = None, val_count: int | None = None,
                 seed: int = 0, photo_crops_every: int = 0, resampled: bool = False,
                 precomputed: bool | str | None = None, caption_weights: dict[str, float] | None = None,
                 flip: float = 0.0):
        super().__init__()
        self.save_hyperparameters()
        # every check runs now, not mid-fit: a missing path, a pattern matching nothing, a bad filter or bucket
        self.buckets = parse_buckets(buckets)
        self.filters = {"train": Filters(min_size, aspect_ratio, metadata_filters or {}, caption_weights or {}),
                        "val": Filters(min_size, aspect_ratio, metadata_filters or {})}  # val: the data as it is
        if caption_weights and is_folder_of_images(train):
            raise ValueError("caption_weights work with shard sources (openmoji or .tar shards), not a folder of images")
        self.sets = {name: None if spec in (None, "openmoji") or is_folder_of_images(spec) else shard_sets(spec)
                     for name, spec in (("train", train), ("val", val))}
        if precomputed and self.sets["train"] is None:
            raise ValueError("precomputed is set, but the training source is not a set of shards")
        # ``precomputed`` speaks of the training source; validation shards are recognised by their manifest
        self.manifests = {name: sets and source_manifest(sets, precomputed if name == "train" else None)
                          for name, sets in self.sets.items()}
        self.precomputed: dict | None = self.manifests["train"]
        if self.buckets and any(is_folder_of_images(s) for s in (train, val)):
            raise ValueError("buckets work with shard sources; pack the image folder into .tar shards "
                             "(webdataset.ShardWriter) or leave buckets unset")
        if photo_crops_every and (photo_crops_every < 2 or self.precomputed or is_folder_of_images(train)):
            raise ValueError(f"photo_crops_every {photo_crops_every}: every n-th sample (n >= 2, 0 = off) of image "
                             "shards (openmoji or .tar shards of images, not precomputed ones or a folder)")
        if not 0 <= flip <= 1:
            raise ValueError(f"flip is a probability in [0, 1], got {flip}")
        if flip and (self.precomputed or is_folder_of_images(train)):
            raise ValueError("flip works with image shards (openmoji or .tar shards of images), not precomputed "
                             "shards or a folder of images; set flip to 0")
        self.train_set = self.val_set = None  # datasets (imagedata.images) or streams (imagedata.shards), made in setup

    def _source(self, name: str, train: bool):
        h = self.hparams
        spec, count = (h.train, h.train_count) if train else (h.val, h.val_count)
        size = h.image_size if train else (h.val_size or h.resize or h.image_size)
        resize = h.resize if train else size
        crop = h.crop if train else "center"
        batch_size = h.batch_size if train else (h.val_batch_size or h.batch_size)
        sets, manifest = self.sets[name], self.manifests[name]
        if spec == "openmoji":
            shards, n = openmoji_shards(h.embedded_dir, name)
            sets, count = [ShardSet(shards, 1.0, "openmoji")], count or n
        elif sets is None:  # a folder of images
            return FolderDataset(spec, size, resize, crop, h.min_size)
        if manifest is not None:
            count = count or manifest_count(manifest, sets)
            prep = None
            if self.buckets or h.aspect_ratio or h.metadata_filters or (train and h.caption_weights):
                log.warning("buckets and filters do not apply to the precomputed shards of %s (they hold latents); "
                            "pass --buckets / --min-size to python -m train.precompute instead", spec)
        else:
            prep = ImagePrep(size, resize, crop, self.filters[name], self.buckets, h.flip if train else 0.0)
        extra = None
        if train and h.photo_crops_every:
            extra = (PhotoCrops(training_photos(), h.image_size, h.seed, self.buckets), h.photo_crops_every)
        return ShardStream(sets, batch_size, prep, train=train, shuffle_buffer=h.shuffle_buffer, seed=h.seed,
                           count=count, resampled=train and h.resampled, extra=extra)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set is None and h.train and stage in (None, "fit"):
            self.train_set = self._source("train", True)
        if self.val_set is None and h.val and stage in (None, "fit", "validate"):
            self.val_set = self._source("val", False)

    def _loader(self, dataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        if isinstance(dataset, ShardStream):
            if self.trainer is not None:
                dataset.epoch = self.trainer.current_epoch  # continue the seeded sequence after a resume
                if train and dataset.count is None and self.trainer.world_size > 1:
                    raise ValueError(f"{self.trainer.world_size} DDP ranks need train_count (the samples in "
                                     f"{dataset.describe()}) so that every rank yields the same number of batches; "
                                     "set --data.init_args.train_count")
            return CheckedLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=workers > 0,
                                 worker_init_fn=delay_sigterm if workers else None)
        if train and len(dataset) < batch_size:
            raise ValueError(f"{len(dataset)} images in {dataset.root} make no batch of {batch_size}; lower batch_size")
        return CheckedLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate, shuffle=train,
                             drop_last=train, persistent_workers=workers > 0,
                             worker_init_fn=delay_sigterm if workers else None)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.hparams.val_batch_size or self.hparams.batch_size, False)
