"""``python -m benchmarks.data_throughput``: samples/s of one data-loader worker, and the workers one
H100 would need at the paper's batch sizes.

Measured here, in one process (= one DataLoader worker), through the training loader
(``train.data.ImageTextData``: read, shuffle buffer, decode, filter, resize, crop, batch):

* image shards at 256 and 512 px: JPEGs of 768x576 (an img2dataset-like size), random crops;
* precomputed shards (``train.precompute``) in the paper's shapes at 512 px: Stage C reads the
  compressor latents (16x12x12) and CLIP-H text states (77x1024), Stage B also Stage A's latents
  (4x128x128), all float16.

Assumed, not measured: what an H100 consumes. Its bf16 dense peak (989 TFLOP/s,
``benchmarks.cost.PEAK_TFLOPS``) at ``--mfu`` (default 0.4) divided by the training FLOPs of one
sample (``benchmarks.throughput.train_flops``: Stage C "paper" and Stage B "paper" at 512 px, their
first training phase) gives the samples/s one H100 takes; the paper's global batches of that phase
(``benchmarks.cost.SCHEDULE``: Stage C 1536, Stage B 512) then give the step rate of an 8-GPU node. The frozen encoders' GPU time (when images are loaded
instead of latents) is not counted.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from benchmarks.cost import PEAK_TFLOPS, SCHEDULE
from benchmarks.targets import targets
from benchmarks.throughput import train_flops
from common.cli import check_output, positive_int
from common.errors import run_command
from common.files import write_json
from imagedata.shards import npy_bytes
from train.data import ImageTextData

PX = 512  # the first training phase of Stage B and Stage C (App. E.2, E.3)
PAPER_BATCH = {kind: next(p.batch for p in SCHEDULE[kind] if p.px == PX) for kind in ("stage_c", "stage_b")}
GPUS_PER_NODE = 8
LATENTS = {  # per-sample tensors of precomputed shards at 512 px (float16)
    "stage_c": {"semantic": (16, 12, 12), "text": (77, 1024)},
    "stage_b": {"stage_a": (4, 128, 128), "semantic": (16, 12, 12), "text": (77, 1024)},
}
SHARD_SAMPLES = 48


def photo(rng: np.random.Generator, w: int = 768, h: int = 576) -> bytes:
    """A JPEG with a photo's statistics roughly: smooth gradients plus noise (quality 90)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * rng.uniform(0.1, 0.4) + y * rng.uniform(0.1, 0.4) + rng.uniform(0, 255)) % 256
                     for _ in range(3)], -1)
    noisy = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_shards(folder: Path, n: int, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    pictures = [photo(rng) for _ in range(8)]  # encoding is setup, not measured: reuse a few
    for s in range(math.ceil(n / SHARD_SAMPLES)):
        with wds.TarWriter(str(folder / f"{s:06d}.tar")) as sink:
            for j in range(min(SHARD_SAMPLES, n - s * SHARD_SAMPLES)):
                sink.write({"__key__": f"{s}_{j}", "jpg": pictures[j % len(pictures)], "txt": f"a photo {s} {j}"})


def latent_shards(folder: Path, n: int, shapes: dict, rng: np.random.Generator) -> None:
    folder.mkdir(parents=True)
    names = {}
    arrays = {k: npy_bytes(rng.standard_normal(shape).astype(np.float16)) for k, shape in shapes.items()}
    for s in range(math.ceil(n / SHARD_SAMPLES)):
        name, count = f"{s:06d}.tar", min(SHARD_SAMPLES, n - s * SHARD_SAMPLES)
        with wds.TarWriter(str(folder / name)) as sink:
            for j in range(count):
                sink.write({"__key__": f"{s}_{j}", "txt": f"a photo {s} {j}", **{f"{k}.npy": v for k, v in arrays.items()}})
        names[name] = count
    write_json(folder / "manifest.json", {"format": "wuerstchen-precomputed/1", "complete": True, "keys": list(shapes),
                                          "shards": names, "count": n})


def samples_per_s(source: str, repeats: int = 2, **kw) -> float:
    """Samples/s of a loader pass in this process on one thread (as a DataLoader worker runs),
    after the first batch; the best of ``repeats`` passes (the machine may be shared)."""
    dm = ImageTextData(train=source, val=None, num_workers=0, batch_size=16, shuffle_buffer=64, **kw)
    dm.setup("fit")
    best = 0.0
    for _ in range(repeats):
        it = iter(dm.train_dataloader())
        next(it)
        start, n = time.perf_counter(), 0
        for batch in it:
            n += len(batch["key"])
        best = max(best, n / (time.perf_counter() - start))
    return best


def h100_need(mfu: float) -> dict:
    """Samples/s one H100 trains on (assumed MFU), per stage, from the FLOPs of one training sample."""
    peak = PEAK_TFLOPS["H100"] * 1e12
    out = {}
    for target in targets(["paper"], tuple(PAPER_BATCH)):
        flops = train_flops(target, PX, 1)
        per_gpu = mfu * peak / flops
        out[target.kind] = {"train_tflop_per_sample": round(flops / 1e12, 3), "samples_per_s_per_h100": round(per_gpu, 1),
                            "paper_batch": PAPER_BATCH[target.kind],
                            "assumed_steps_per_s_on_8_h100": round(per_gpu * GPUS_PER_NODE / PAPER_BATCH[target.kind], 3)}
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_throughput", description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=positive_int, default=160, help="samples per measurement (default 160)")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation of an H100 (default 0.4)")
    p.add_argument("--out", help="also write the report (JSON) here")
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        p.error(f"--mfu must be in (0, 1], got {args.mfu}")
    if args.out:
        check_output(args.out, (".json",))
    torch.set_num_threads(1)  # what torch gives each DataLoader worker
    rng = np.random.default_rng(0)
    measured: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        images = Path(tmp) / "images"
        image_shards(images, args.samples, rng)
        for px in (256, 512):
            measured[f"images_{px}px"] = samples_per_s(str(images), image_size=px, crop="random")
        for stage, shapes in LATENTS.items():
            folder = Path(tmp) / stage
            latent_shards(folder, args.samples, shapes, rng)
            measured[f"precomputed_{stage}"] = samples_per_s(str(folder))
    need = h100_need(args.mfu)
    workers = {}
    for stage, info in need.items():
        for source, rate in measured.items():
            if source == f"images_{PX}px" or source.endswith(stage):
                workers[f"{stage} from {source}"] = math.ceil(info["samples_per_s_per_h100"] / rate)
    report = {
        "measured_samples_per_s_per_worker": {k: round(v, 1) for k, v in measured.items()},
        "assumption": f"H100 at {args.mfu:.0%} MFU of its {PEAK_TFLOPS['H100']:.0f} TFLOP/s bf16 peak, training FLOPs "
                      f"per sample of the paper configs at {PX} px; the frozen encoders' GPU time is not counted",
        "assumed_h100": need,
        "workers_per_h100": workers,
    }
    print(json.dumps(report, indent=2))
    if args.out:
        write_json(args.out, report)
    return report


if __name__ == "__main__":
    run_command(main)
