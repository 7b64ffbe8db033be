"""Evaluate a trained Stage A: reconstruction PSNR / SSIM / LPIPS next to a naive f4 baseline.

    python -m sample.evaluate_stage_a --checkpoint runs/stage_a/tiny [--out stage_a_eval.json]

Sets: the embedded OpenMoji val split (128 px) and the held-out real photos (256 px). Baseline:
downsample by 4 (bicubic, antialiased) and upsample back (bicubic): the same spatial compression
as Stage A with 3 instead of 4 channels, unquantised. Prints JSON.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure as ssim

from common.cli import emit, positive_int
from common.errors import run_command
from common.metrics import Perceptual
from imagedata.embedded import heldout_photos, openmoji_split
from sample.options import add_evaluation_arguments, parse_evaluation_arguments
from stages.stage_a import StageA
from weights.checkpoint import resolve_checkpoint
from weights.loaders import load_stage_a


def bicubic_f4(images: torch.Tensor) -> torch.Tensor:
    small = F.interpolate(images, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=images.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


class Scores:
    """Running means of per-image PSNR, SSIM and LPIPS."""

    def __init__(self, lpips: Perceptual):
        self.lpips, self.n, self.sums = lpips, 0, {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}

    @torch.no_grad()
    def add(self, recon: torch.Tensor, target: torch.Tensor) -> None:
        recon = recon.clamp(0, 1)
        mse = (recon - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        self.sums["psnr"] += (10 * torch.log10(1 / mse)).sum().item()
        self.sums["ssim"] += ssim(recon, target, data_range=1.0, reduction="none").sum().item()
        self.sums["lpips"] += self.lpips(recon, target).sum().item()
        self.n += recon.shape[0]

    def result(self) -> dict:
        return {k: round(v / max(self.n, 1), 4) for k, v in self.sums.items()}


def batches(images: list[torch.Tensor], size: int):
    for i in range(0, len(images), size):
        yield torch.stack(images[i:i + size])


@torch.no_grad()
def evaluate(model: StageA, images: list[torch.Tensor], lpips: Perceptual, batch_size: int = 16) -> dict:
    scores = {"stage_a_quantized": Scores(lpips), "stage_a_unquantized": Scores(lpips), "bicubic_f4": Scores(lpips)}
    for x in batches(images, batch_size):
        z = model.encode(x)
        scores["stage_a_quantized"].add(model.decode(z, quantize=True), x)
        scores["stage_a_unquantized"].add(model.decode(z), x)
        scores["bicubic_f4"].add(bicubic_f4(x), x)
    out = {k: s.result() for k, s in scores.items()}
    base = out["bicubic_f4"]
    for k in ("stage_a_quantized", "stage_a_unquantized"):
        r = out[k]
        out[k]["beats_baseline"] = r["psnr"] > base["psnr"] and r["ssim"] > base["ssim"] and r["lpips"] < base["lpips"]
    return {"n_images": len(images), "side": int(images[0].shape[-1]), **out}


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="model.safetensors, a Lightning .ckpt, or a run folder")
    ap.add_argument("--photo-size", type=positive_int, default=256, help="side of the held-out photos")
    add_evaluation_arguments(ap, batch_size=16, seeded=False)
    args = parse_evaluation_arguments(ap, argv)
    ckpt = resolve_checkpoint(args.checkpoint)
    model = load_stage_a(str(ckpt))
    lpips = Perceptual("alex")
    val = [s["image"] for s in openmoji_split(args.data_dir, "val", 128, args.limit)]
    photos = [im for _, im in heldout_photos(args.photo_size)]
    report = {
        "checkpoint": str(ckpt),
        "lpips": lpips.description,
        "openmoji_val": evaluate(model, val, lpips, args.batch_size),
        "heldout_photos": evaluate(model, photos, lpips, args.batch_size),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    run_command(main)
