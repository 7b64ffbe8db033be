"""Aspect-ratio buckets: every image goes to the bucket (height, width) whose aspect ratio is nearest
its own, and batches are formed within a bucket, so a batch has one shape.

The stages are convolutional (Stage A is f4; the semantic compressor resizes to 3/4 and
downsamples by 32, rounding up; Stage B works on Stage A's grid, Stage C on the compressor's grid,
with attention over whatever token grid results), so any bucket whose sides are multiples of 4
works for every stage; multiples of 128 give compressor grids without padding (768 -> 18,
1280 -> 30, ``semantic_compressor.latent_grid``). The paper's third Stage C phase
(App. E.3) trains on 768x1280, 1280x768 and 768x768 images: the preset ``paper_c3``.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch

PRESETS: dict[str, list[tuple[int, int]]] = {
    "paper_c3": [(768, 1280), (1280, 768), (768, 768)],
}


def parse_buckets(spec: str | Iterable | None, multiple: int = 4) -> list[tuple[int, int]] | None:
    """``None``, a preset name (``paper_c3``) or a list of ``[height, width]`` pairs -> list of (h, w).

    Raises a one-line ``ValueError`` for an unknown preset, a malformed pair, or a side that is not
    a positive multiple of ``multiple``.
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(f"unknown bucket preset {spec!r}; choose one of {sorted(PRESETS)} or give a list "
                             "of [height, width] pairs, e.g. [[768, 1280], [1280, 768], [768, 768]]")
        return list(PRESETS[spec])
    buckets = []
    for pair in spec:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)):
            raise ValueError(f"bucket {pair!r} is not a [height, width] pair of whole numbers")
        h, w = pair
        if h <= 0 or w <= 0 or h % multiple or w % multiple:
            raise ValueError(f"bucket {h}x{w}: both sides must be positive multiples of {multiple}")
        buckets.append((h, w))
    if not buckets:
        raise ValueError("buckets is empty; give at least one [height, width] pair or leave it unset")
    if len(set(buckets)) != len(buckets):
        raise ValueError(f"buckets {buckets} lists a size twice")
    return buckets


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The (h, w) bucket whose aspect ratio is nearest the image's, measured as |log(ratio)|;
    ties go to the earlier bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - ratio))


def shape_key(sample: dict) -> tuple:
    """The shapes of a sample's tensors: samples batch together only when these agree."""
    return tuple((k, tuple(v.shape)) for k, v in sorted(sample.items()) if isinstance(v, torch.Tensor))


def collate(samples: list[dict]) -> dict:
    """Tensors stacked, everything else (caption, key) as lists."""
    return {k: torch.stack([s[k] for s in samples]) if isinstance(v, torch.Tensor) else [s[k] for s in samples]
            for k, v in samples[0].items()}


def batch_by_shape(samples: Iterable[dict], batch_size: int, drop_last: bool) -> Iterator[dict]:
    """Batches of ``batch_size`` samples of one shape, emitted as soon as a shape has that many.
    At the end the partial batches are dropped (``drop_last``) or emitted."""
    pending: dict[tuple, list[dict]] = {}
    for sample in samples:
        group = pending.setdefault(shape_key(sample), [])
        group.append(sample)
        if len(group) == batch_size:
            yield collate(group)
            group.clear()
    if not drop_last:
        for group in pending.values():
            if group:
                yield collate(group)
