"""The Lightning data module every stage trains from."""
from __future__ import annotations

from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Dataset, IterableDataset

from stages.embedded import openmoji_shards, training_photos
from train.data.loaders import (FolderDataset, Interleaved, PhotoCrops, SampleCounts, ShardDataset, collate,
                                existing_shards)


class CheckedLoader(DataLoader):
    """A DataLoader whose every pass yields a batch: a pass with none (every sample unreadable or
    filtered, or fewer than one batch) raises instead of letting training loop over empty epochs,
    and an error raised in a worker reaches the user as its own one-line message."""

    def __iter__(self):
        shards = self.dataset.primary if isinstance(self.dataset, Interleaved) else self.dataset
        before = shards.skipped.as_dict() if isinstance(shards, ShardDataset) else {}
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
        if batches == 0 and isinstance(shards, ShardDataset):
            counts = {k: v - before.get(k, 0) for k, v in shards.skipped.as_dict().items()}
            raise ValueError(f"no batch of {self.batch_size} in a whole pass over {shards.describe()} "
                             f"({SampleCounts.text(counts)}); check that the shards hold readable images, "
                             "lower min_size, or lower batch_size")


class ImageTextData(L.LightningDataModule):
    """Image-caption batches ``{"image", "caption", "key"}`` for training and validation.

    A source (``train``/``val``) is ``openmoji`` (the embedded set, built on first use in
    ``embedded_dir``), a webdataset shard pattern (``shards/{000000..000099}.tar``, ``shards/*.tar``,
    or a folder of ``.tar`` files), or a folder of images with optional ``.txt`` captions.

    Training images are resized (shorter side to ``resize``, default ``image_size``) and cropped to
    ``image_size`` (``crop``: random or center); validation images are resized and centre-cropped to
    ``val_size`` (default: ``resize`` or ``image_size``).

    ``photo_crops_every`` (Stage A only; 0 = off): every n-th training sample is a random crop of
    one of the real photos that ship with scikit-image and are not in the held-out set.
    """

    def __init__(self, train: str = "openmoji", val: str | None = "openmoji", image_size: int = 128,
                 resize: int | None = None, val_size: int | None = None, crop: str = "random",
                 min_size: int = 0, batch_size: int = 16, val_batch_size: int | None = None,
                 num_workers: int = 2, shuffle_buffer: int = 1000, embedded_dir: str = "data/openmoji",
                 train_count: int | None = None, val_count: int | None = None, seed: int = 0,
                 photo_crops_every: int = 0):
        super().__init__()
        self.save_hyperparameters()
        for spec in (train, val):  # a missing path or a pattern that matches nothing fails now, not mid-fit
            if spec and spec != "openmoji" and not Path(spec).is_dir():
                existing_shards(spec)
        self.train_set: Dataset | ShardDataset | None = None
        self.val_set: Dataset | ShardDataset | None = None

    def _source(self, spec: str, split: str, train: bool, count: int | None):
        h = self.hparams
        size = h.image_size if train else (h.val_size or h.resize or h.image_size)
        resize = h.resize if train else size
        crop = h.crop if train else "center"
        if spec == "openmoji":
            shards, n = openmoji_shards(h.embedded_dir, split)
            return ShardDataset(shards, size, resize, crop, h.min_size, shuffle=train,
                                shuffle_buffer=h.shuffle_buffer, seed=h.seed, count=n)
        path = Path(spec)
        if path.is_dir() and not any(path.glob("*.tar")):
            return FolderDataset(path, size, resize, crop, h.min_size)
        pattern = str(path / "*.tar") if path.is_dir() else spec
        return ShardDataset(pattern, size, resize, crop, h.min_size, shuffle=train,
                            shuffle_buffer=h.shuffle_buffer, seed=h.seed, count=count)

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = self._source(h.train, "train", True, h.train_count)
            if h.photo_crops_every:
                if not isinstance(self.train_set, ShardDataset):
                    raise ValueError("photo_crops_every works with shard sources (openmoji or .tar shards)")
                self.train_set = Interleaved(self.train_set, PhotoCrops(training_photos(), h.image_size, h.seed),
                                             h.photo_crops_every)
        if self.val_set is None and h.val and stage in (None, "fit", "validate"):
            self.val_set = self._source(h.val, "val", False, h.val_count)

    def _loader(self, dataset, batch_size: int, train: bool) -> DataLoader:
        workers = self.hparams.num_workers
        if not isinstance(dataset, IterableDataset) and train and len(dataset) < batch_size:
            raise ValueError(f"{len(dataset)} images in {dataset.root} make no batch of {batch_size}; lower batch_size")
        shards = dataset.primary if isinstance(dataset, Interleaved) else dataset
        if isinstance(shards, ShardDataset) and self.trainer is not None:
            shards.epoch = self.trainer.current_epoch  # continue the shuffle sequence after a resume
        return CheckedLoader(
            dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
            shuffle=train and isinstance(dataset, Dataset) and not isinstance(dataset, IterableDataset),
            drop_last=train,
            persistent_workers=workers > 0, pin_memory=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.hparams.batch_size, True)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return self._loader(self.val_set, self.hparams.val_batch_size or self.hparams.batch_size, False)
