"""A LoRA for one category of the embedded OpenMoji set, and its effect on caption retrieval.

    python -m sample.lora_category prepare --out data/lora_flags            # image folders, trigger captions
    python -m train fit --config configs/stage_c/tiny.yaml --config configs/stage_c/tiny_lora.yaml \\
        --data.init_args.train data/lora_flags/train --data.init_args.val data/lora_flags/val
    python -m sample.lora_category score --lora runs/stage_c_lora/tiny/version_0/adapter.safetensors

``prepare`` writes the category's images (``--category``: ``flags``, the country and region flags
captioned "France", "Åland Islands", ...) as PNG files with ``.txt`` captions, ``--trigger`` prepended
("flagmoji France"),
in ``train/`` and ``val/`` (the embedded set's fixed split). ``score`` samples Stage C latents for the
category's val captions and reports Stage C latent retrieval (as in ``python -m sample.evaluate``: is
the caption's emoji among the 5 whose compressor latents are nearest, over the whole embedded set?)
and category retrieval (is one of the 5 nearest in the category?) for the base model and the adapter,
each with plain and trigger captions, on the category's val captions (unseen) and training captions.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.utils import save_image

from sample.__main__ import SHIPPED
from sample.evaluate import latent_gallery, top5_hits, whole_set
from weights.loaders import load_compressor
from common.cli import positive_int
from imagedata.embedded import emoji_captions, openmoji_split
from common.errors import run_command
from weights.lora import parse_lora
from pipeline.cascade import load_any_prior


def is_flag(emoji: str) -> bool:
    """Country and region flags: a pair of regional indicator symbols, or a black flag with tag characters."""
    return all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in emoji) or (emoji[:1] == "\U0001F3F4" and len(emoji) > 2)


CATEGORIES = {  # (emoji, caption) -> in the category
    "flags": lambda emoji, caption: is_flag(emoji),
    "faces": lambda emoji, caption: caption.endswith(" face"),
}


def category(data_dir: str, split: str, name: str, size: int) -> list[dict]:
    """The samples of ``split`` in category ``name`` (``CATEGORIES``)."""
    members = {caption for emoji, caption in emoji_captions() if CATEGORIES[name](emoji, caption)}
    return openmoji_split(data_dir, split, size, captions=members)


def prepare(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    counts = {}
    for split in ("train", "val"):
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        samples = category(args.data_dir, split, args.category, args.size)
        for i, s in enumerate(samples):
            save_image(s["image"], folder / f"{i:05d}.png")
            (folder / f"{i:05d}.txt").write_text(f"{args.trigger} {s['caption']}\n")
        counts[split] = len(samples)
    return {"out": str(out), "category": args.category, "trigger": args.trigger, **counts}


def category_hits(latents: torch.Tensor, known: torch.Tensor, in_category: torch.Tensor) -> float:
    """Share of sampled latents whose 5 nearest (cosine) embedded emoji include one of the category."""
    sims = F.normalize(latents.flatten(1), dim=1) @ F.normalize(known, dim=1).T
    return in_category[sims.topk(5, dim=1).indices].any(dim=1).float().mean().item()


@torch.no_grad()
def score(args: argparse.Namespace) -> dict:
    lora = parse_lora(args.lora)
    sets = {"val": [s["caption"] for s in category(args.data_dir, "val", args.category, args.size)],
            "train": [s["caption"] for s in category(args.data_dir, "train", args.category, args.size)][:args.train_limit]}
    compressor = load_compressor(args.compressor).eval()
    known = latent_gallery(args.data_dir, compressor, args.size, 32)
    _, gallery_captions = whole_set(args.data_dir, args.size)
    members = {caption for emoji, caption in emoji_captions() if CATEGORIES[args.category](emoji, caption)}
    in_category = torch.tensor([c in members for c in gallery_captions])
    grid = compressor.latent_grid(args.size, args.size)
    priors = {"base": load_any_prior(args.stage_c), "lora": load_any_prior(args.stage_c, loras=[lora])}

    def scores(model: str, prompts: list[str], captions: list[str]) -> dict:
        gen = torch.Generator().manual_seed(args.seed)
        latents = priors[model].sample(prompts, [""] * len(prompts), grid, args.prior_steps, args.prior_guidance,
                                       gen, progress=False).flatten(1)
        return {"top5_own_caption": round(top5_hits(latents, known, gallery_captions, captions), 4),
                "top5_in_category": round(category_hits(latents, known, in_category), 4)}

    started = time.time()
    report = {"category": args.category, "trigger": args.trigger, "stage_c": args.stage_c, "lora": str(lora[0]),
              "lora_scale": lora[1], "adapter_kb": round(lora[0].stat().st_size / 1024, 1),
              "chance_top5_own_caption": round(5 / len(gallery_captions), 4),
              "category_share_of_set": round(in_category.float().mean().item(), 4)}
    for split, captions in sets.items():
        triggered = [f"{args.trigger} {c}" for c in captions]
        report[f"{split}_captions"] = {"n": len(captions), "base": scores("base", captions, captions),
                                       "base_with_trigger": scores("base", triggered, captions),
                                       "lora_with_trigger": scores("lora", triggered, captions),
                                       "lora_without_trigger": scores("lora", captions, captions)}
    report["score_time_s"] = round(time.time() - started, 1)
    return report


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m sample.lora_category", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    for name in ("prepare", "score"):
        p = sub.add_parser(name)
        p.add_argument("--data-dir", default="data/openmoji")
        p.add_argument("--category", choices=sorted(CATEGORIES), default="flags")
        p.add_argument("--trigger", default="flagmoji", help="the word prepended to the category's captions")
        p.add_argument("--size", type=positive_int, default=128)
    p = sub.choices["prepare"]
    p.add_argument("--out", default="data/lora_flags")
    p.add_argument("--overwrite", action="store_true")
    p = sub.choices["score"]
    p.add_argument("--lora", required=True, help="adapter.safetensors[:SCALE]")
    p.add_argument("--stage-c", default=str(SHIPPED / "stage_c.safetensors"))
    p.add_argument("--compressor", default=str(SHIPPED / "compressor.safetensors"))
    p.add_argument("--prior-steps", type=positive_int, default=60)
    p.add_argument("--prior-guidance", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=positive_int, default=64, help="training captions scored (seen in training)")
    args = ap.parse_args(argv)
    report = prepare(args) if args.command == "prepare" else score(args)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    run_command(main)
