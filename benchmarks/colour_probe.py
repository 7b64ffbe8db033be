"""``python -m benchmarks.colour_probe COMPRESSOR [COMPRESSOR ...]``: how much of the images' colour a semantic
compressor's latents keep (an ablation probe for the tiny presets, docs/evaluation.md).

For the first ``--images`` embedded training emoji, each latent cell's 16 channels are mapped linearly (one map
shared by all cells, least squares with a bias) to the mean RGB colour of the image region under that cell. The
map is fitted on all but the last ``--held-out`` images and scored on those: R^2, the share of the held-out
colour variance it explains (1: the colour of every cell is a linear read-out of its latents; 0: no better than
the mean colour). A decoder cannot be expected to draw colours its semantic latents do not carry.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common.cli import at_least, check_output, emit, positive_int, shown
from common.errors import run_command
from imagedata.embedded import openmoji_split
from weights.loaders import load_compressor


def cells(tensor: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N * h * w, C): one row per latent cell."""
    return tensor.permute(0, 2, 3, 1).reshape(-1, tensor.shape[1])


def linear_r2(x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """R^2 on the test rows of the least-squares affine map fitted on the fit rows (float64)."""
    with_bias = lambda x: torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    weights = torch.linalg.lstsq(with_bias(x_fit), y_fit.double()).solution
    residual = ((with_bias(x_test) @ weights - y_test.double()) ** 2).sum()
    spread = ((y_test.double() - y_fit.double().mean(0)) ** 2).sum()
    return float(1 - residual / spread)


@torch.no_grad()
def colour_r2(compressor: torch.nn.Module, images: torch.Tensor, held_out: int, batch_size: int = 64) -> dict:
    """The probe of one compressor on ``images`` (float, [0, 1]); the last ``held_out`` images are the test set."""
    latents = torch.cat([compressor(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
    colours = F.adaptive_avg_pool2d(images, latents.shape[-2:])
    split = len(images) - held_out
    r2 = linear_r2(cells(latents[:split]), cells(colours[:split]), cells(latents[split:]), cells(colours[split:]))
    return {"grid": list(latents.shape[-2:]), "colour_r2_held_out": round(r2, 4)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("compressors", nargs="+", help="compressor.safetensors files or Stage B run folders")
    ap.add_argument("--images", type=at_least(2), default=1200, help="training emoji used (fit + held out)")
    ap.add_argument("--held-out", type=positive_int, default=200, help="of those, the last N score the fit")
    ap.add_argument("--size", type=positive_int, default=128)
    ap.add_argument("--data-dir", default="data/openmoji", help="embedded OpenMoji shards (built if missing)")
    ap.add_argument("--out", default=None, help="also write the JSON here (never overwrites)")
    args = ap.parse_args(argv)
    if args.held_out >= args.images:
        ap.error(f"--held-out {args.held_out} leaves no image to fit on: give fewer than --images {args.images}")
    if args.out:
        check_output(args.out, (".json",))
    compressors = {path: load_compressor(path).eval() for path in args.compressors}  # every file checked first
    samples = openmoji_split(args.data_dir, "train", args.size, args.images)
    images = torch.stack([s["image"] for s in samples])
    report = {"images": len(images), "held_out": args.held_out, "size": args.size,
              "compressors": {shown(path): colour_r2(c, images, args.held_out) for path, c in compressors.items()}}
    return emit(report, args.out)


if __name__ == "__main__":
    run_command(main)
