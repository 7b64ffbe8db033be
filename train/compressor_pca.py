"""A frozen semantic compressor whose 16-channel head is the principal components of its backbone's
features on the training images (a closed-form alternative to fine-tuning the head with Stage B).

The paper (Sec. 3.1) fine-tunes the whole compressor with Stage B. On 2 CPU cores that costs about
1.8 s per Stage B step at an 8x8 grid; with this head the compressor is fixed before Stage B starts,
so Stage B trains on cached latents from its first step. The 1x1 projection holds the 16 leading
principal directions of the backbone's 1280 features (over every grid cell of every image) and the
BatchNorm's running statistics whiten them, so the latents come out with zero mean and unit variance
per channel, as Stage C expects.

    python -m train.compressor_pca --input-scale 2 --out runs/compressor/pca_s2/compressor.safetensors
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from tqdm import tqdm

from semantic_compressor import BACKBONES, PAPER_INPUT_SCALE, SemanticCompressor
from weights.checkpoint import save_safetensors
from common.cli import check_output
from imagedata.embedded import openmoji_split
from common.errors import run_command


@torch.no_grad()
def fit_pca_head(compressor: SemanticCompressor, images: torch.Tensor, batch_size: int = 64,
                 progress: bool = True) -> dict:
    """Set ``compressor.mapper`` to the whitened leading principal components of the backbone features
    of ``images`` (B, 3, H, W) in [0, 1]; returns the share of the feature variance they keep."""
    compressor.eval()
    channels = compressor.config.latent_channels
    total, total_sq, count = None, None, 0
    chunks = range(0, len(images), batch_size)
    for i in tqdm(chunks, desc="backbone features", disable=not progress):
        f = compressor.backbone(compressor.preprocess(images[i:i + batch_size])).double()
        f = f.permute(0, 2, 3, 1).reshape(-1, f.shape[1])  # every grid cell is a sample
        total = f.sum(0) if total is None else total + f.sum(0)
        total_sq = f.T @ f if total_sq is None else total_sq + f.T @ f
        count += len(f)
    mean = total / count
    covariance = total_sq / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    components = eigenvectors[:, -channels:].flip(1).T  # (channels, 1280), largest first
    variances = eigenvalues[-channels:].flip(0).clamp_min(float(eigenvalues[-1]) * 1e-9)
    conv, norm = compressor.mapper
    conv.weight.copy_(components.view(channels, -1, 1, 1).float())
    norm.running_mean.copy_((components @ mean).float())
    norm.running_var.copy_((variances - norm.eps).clamp_min(0).float())
    norm.weight.fill_(1.0)
    norm.bias.zero_()
    return {"variance_kept": float(variances.sum() / eigenvalues.clamp_min(0).sum()), "cells": count}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m train.compressor_pca", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="compressor.safetensors to write")
    ap.add_argument("--backbone", default="efficientnet_lite0", choices=BACKBONES)
    ap.add_argument("--input-scale", type=float, default=PAPER_INPUT_SCALE,
                    help="resize before the backbone (paper: 0.75; 2 gives an 8x8 grid at 128 px)")
    ap.add_argument("--data-dir", default="data/openmoji", help="embedded set (built on first use)")
    ap.add_argument("--size", type=int, default=128, help="image side the stages train at")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    out = check_output(args.out, (".safetensors",), args.overwrite)
    compressor = SemanticCompressor(args.backbone, trainable="none", input_scale=args.input_scale)
    start = time.perf_counter()
    images = torch.stack([s["image"] for s in openmoji_split(args.data_dir, "train", args.size, args.limit)])
    stats = fit_pca_head(compressor, images)
    path = save_safetensors(compressor, out, "semantic_compressor", compressor.config.to_dict(), overwrite=args.overwrite,
                            extra={"head": "pca", "images": len(images), **stats})
    print(json.dumps({"compressor": str(path), "images": len(images), "grid": compressor.latent_grid(args.size, args.size),
                      **stats, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    run_command(main)
