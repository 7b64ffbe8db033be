"""Evaluate a ControlNet on the embedded val images: Stage C steered by the control of each image, against
the same prompts and seeds without it (control scale 0, which is Stage C alone bit for bit).

    python -m sample.evaluate_controlnet --controlnet runs/controlnet/tiny_canny [--limit 64] [--out eval.json]

Prints JSON. For a canny ControlNet, each val image's Canny edges steer the sampling of its own caption;
scores: edge precision, recall and F1 between the Canny edges of the generated image and the control edges,
an edge pixel counting as matched when one of the other set lies within ``tolerance`` px (Chebyshev
distance, a square of side 2 * tolerance + 1), for each ``--tolerances``, pooled over the images; per image,
how many images have the higher F1 with the ControlNet than without, and the sign test's p-value; and the
top-5 caption retrieval of the generated images (``sample.evaluate``). For an inpaint ControlNet, each val image is kept outside a
random mask (``imagedata.filters.random_masks``, fixed seed, no outpainting) and the prompt is the caption of
the evaluated image half the list away (another category: new content for the masked region); scores: PSNR against the source image outside
the mask (kept) and inside it, the top-5 retrieval of the prompt's caption and of the source image's, and
``masked_region_top5``: the masked region of each generated image against the same region of every evaluated
val image (Inception, cosine; white outside the mask): how often the prompt's emoji is among the 5 nearest,
the source's, and an unrelated one's (the image a quarter of the list away: the level of a region that ignores
the prompt), and the sign test of prompt against unrelated hits per image;
``--keep-unmasked`` holds Stage C's latents to the source's where the mask leaves a latent cell whole, with
and without the ControlNet alike.
"""
from __future__ import annotations

import argparse
import math

import torch
from tqdm.auto import tqdm

from common.cli import at_least, check_output, emit, positive_int
from common.errors import run_command
from imagedata.filters import canny, random_masks
from pipeline.cascade import load_any_text_to_image
from pipeline.controlnet import controlnet_kind, controlnet_takes_latents, load_control
from sample.__main__ import SHIPPED
from common.metrics import InceptionFeatures
from imagedata.embedded import openmoji_split
from sample.evaluate import compressor_beside, features, gallery, top5_hits
from weights.checkpoint import resolve_checkpoint


def edge_scores(generated: torch.Tensor, control: torch.Tensor, tolerance: int) -> dict[str, float]:
    """Precision, recall and F1 of generated edge maps against control edge maps (B, 1, H, W) in {0, 1},
    pooled over the batch, within ``tolerance`` px."""
    grow = lambda e: torch.nn.functional.max_pool2d(e, 2 * tolerance + 1, 1, tolerance) if tolerance else e  # noqa: E731
    matched_generated = (generated * grow(control)).sum()
    matched_control = (control * grow(generated)).sum()
    precision = (matched_generated / generated.sum().clamp(min=1)).item()
    recall = (matched_control / control.sum().clamp(min=1)).item()
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4)}


def edge_f1_per_image(generated: torch.Tensor, control: torch.Tensor, tolerance: int) -> torch.Tensor:
    """``edge_scores``' F1 of each image on its own (B,)."""
    return torch.tensor([edge_scores(g[None], c[None], tolerance)["f1"] for g, c in zip(generated, control)])


def paired_sign_test(with_: torch.Tensor, without: torch.Tensor) -> dict:
    """Per-image comparison of a score with and without the ControlNet (same prompt and seed): how many images
    score higher with it, lower, the same, and the two-sided sign-test p-value over the untied ones."""
    better, worse = int((with_ > without).sum()), int((with_ < without).sum())
    untied, fewer = better + worse, min(better, worse)
    p = min(1.0, 2 * sum(math.comb(untied, k) for k in range(fewer + 1)) / 2 ** untied) if untied else 1.0
    return {"images_higher_with": better, "images_lower_with": worse, "images_tied": len(with_) - untied,
            "sign_test_p": round(p, 4)}


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR (dB, peak 1) of ``a`` against ``b`` over the pixels where ``where`` (B, 1, H, W) is 1."""
    where = where.expand_as(a)
    mse = ((a - b) ** 2 * where).sum() / where.sum().clamp(min=1)
    return round(10 * math.log10(1 / max(mse.item(), 1e-12)), 2)


def masked_view(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The images inside the masks, white (the emoji's background) outside them."""
    return images * masks + (1 - masks)


@torch.no_grad()
def masked_region_top5(net: InceptionFeatures, generated: dict[str, torch.Tensor], candidates: torch.Tensor,
                       masks: torch.Tensor, targets: dict[str, list[int]], batch_size: int) -> dict[str, dict]:
    """Is candidate ``targets[name][i]`` among the 5 whose masked region is nearest to generated image i's? The
    Inception features (cosine) of image i's masked region against the same region of every candidate image
    (``masked_view``); per set of generated images and named list of targets, a (N,) bool tensor of hits."""
    embed = lambda views: torch.nn.functional.normalize(  # noqa: E731
        torch.cat([net(views[j:j + batch_size]) for j in range(0, len(views), batch_size)]), dim=1)
    own = {name: embed(masked_view(images, masks)) for name, images in generated.items()}
    hits = {name: {t: torch.zeros(len(masks), dtype=torch.bool) for t in targets} for name in generated}
    for i in tqdm(range(len(masks)), desc="masked regions against the candidates"):
        nearby = embed(masked_view(candidates, masks[i:i + 1]))
        for name, feats in own.items():
            nearest = (nearby @ feats[i]).topk(min(5, len(candidates))).indices.tolist()
            for target_name, target in targets.items():
                hits[name][target_name][i] = target[i] in nearest
    return hits


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m sample.evaluate_controlnet", description=__doc__.split("\n\n")[0])
    ap.add_argument("--controlnet", required=True, help="ControlNet export or run folder (canny or inpaint)")
    ap.add_argument("--stage-c", default=str(SHIPPED / "stage_c.safetensors"))
    ap.add_argument("--stage-b", default=str(SHIPPED / "stage_b.safetensors"))
    ap.add_argument("--stage-a", default=None, help="default: the Stage A that Stage B recorded")
    ap.add_argument("--keep-unmasked", action="store_true",
                    help="inpaint: hold the latents the mask leaves whole to the source's, with and without")
    ap.add_argument("--compressor", default=None, help="for a ControlNet on compressor latents (default: "
                    "compressor.safetensors beside Stage C or Stage B)")
    ap.add_argument("--data-dir", default="data/openmoji", help="the embedded set (its gallery cache is reused)")
    ap.add_argument("--limit", type=positive_int, default=None,
                    help="N val images evenly spaced over the split (default all 185; the split is ordered by category)")
    ap.add_argument("--batch-size", type=positive_int, default=16)
    ap.add_argument("--prior-steps", type=positive_int, default=20)
    ap.add_argument("--decoder-steps", type=positive_int, default=12)
    ap.add_argument("--guidance", type=float, default=4.0, help="Stage C guidance")
    ap.add_argument("--tolerances", default="1,2,4", help="canny: edge match tolerances in px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gallery-limit", type=at_least(5), default=None,
                    help="retrieval searches only the first N emoji, N >= 5 (quick checks)")
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.out:
        check_output(args.out, (".json",), False)
    tolerances = [int(t) for t in args.tolerances.split(",")]
    path = resolve_checkpoint(args.controlnet)
    kind = controlnet_kind(path)
    if kind not in ("canny", "inpaint"):
        raise ValueError(f"{path} is a {kind} ControlNet; this evaluation scores canny and inpaint ControlNets")
    if args.keep_unmasked and kind != "inpaint":
        raise ValueError("--keep-unmasked applies to an inpaint ControlNet")
    compressor = None
    if controlnet_takes_latents(path) or args.keep_unmasked:
        compressor = args.compressor or compressor_beside(args.stage_c, args.stage_b)
    pipe = load_any_text_to_image(args.stage_c, args.stage_b, args.stage_a, compressor=compressor)
    pipe.attach_control(load_control(path, pipe.prior.model, args.stage_c, pipe.compressor))
    samples = openmoji_split(args.data_dir, "val", 128)
    keep = torch.linspace(0, len(samples) - 1, min(args.limit or len(samples), len(samples))).round().long().tolist()
    real = torch.stack([samples[i]["image"] for i in keep])
    captions = [samples[i]["caption"] for i in keep]
    net = InceptionFeatures()
    gallery_feats, gallery_captions = gallery(args.data_dir, net, 128, args.batch_size, args.gallery_limit)
    n = len(captions)  # inpaint: image i prompted with the caption of the image half the split away (another
    away = [(i + n // 2) % n for i in range(n)]  # category: the split is ordered by category), never its own
    prompts = captions if kind == "canny" else [captions[j] for j in away]
    masks = random_masks(len(real), 128, 128, torch.Generator().manual_seed(args.seed), outpaint_prob=0.0)
    outputs = {"with": [], "without": []}
    for i in tqdm(range(0, len(real), args.batch_size), desc=f"sampling with and without the {kind} ControlNet"):
        images, batch = real[i:i + args.batch_size], prompts[i:i + args.batch_size]
        mask = masks[i:i + args.batch_size] if kind == "inpaint" else None
        for name, scale in (("with", 1.0), ("without", 0.0)):
            outputs[name].append(pipe(batch, height=128, width=128, prior_steps=args.prior_steps,
                                      decoder_steps=args.decoder_steps, prior_guidance=args.guidance,
                                      seed=args.seed + i, progress=False, limits=None, control_image=images,
                                      mask=mask, control_scale=scale, keep_unmasked=args.keep_unmasked))
    generated = {name: torch.cat(parts) for name, parts in outputs.items()}
    report = {"controlnet": str(path), "control": kind, "stage_c": args.stage_c, "val_images": keep,
              "prior_steps": args.prior_steps, "decoder_steps": args.decoder_steps, "guidance": args.guidance,
              "seed": args.seed, "chance_top5": round(5 / len(gallery_captions), 4),
              **({"keep_unmasked": True} if args.keep_unmasked else {})}
    control = canny(real) if kind == "canny" else None  # the val images' own edges
    edges = {}  # canny: the generated images' edge maps, by name
    for name, images in generated.items():
        feats = features(net, images, args.batch_size, f"Inception features ({name})")
        top5 = lambda targets: round(top5_hits(feats, gallery_feats, gallery_captions, targets), 4)  # noqa: E731
        if kind == "canny":
            edges[name] = canny(images)
            scores = {f"edges_tolerance_{t}px": edge_scores(edges[name], control, t) for t in tolerances}
            scores["top5_retrieval_own_caption"] = top5(captions)
        else:
            scores = {"psnr_outside_mask_db": psnr(images, real, 1 - masks),
                      "psnr_inside_mask_db": psnr(images, real, masks),
                      "top5_retrieval_prompt_caption": top5(prompts),
                      "top5_retrieval_source_caption": top5(captions)}
        report[f"{name}_controlnet"] = scores
    if kind == "inpaint":  # the masked region against the same region of each evaluated val image
        targets = {"prompt": away, "source": list(range(n)), "unrelated": [(i + n // 4) % n for i in range(n)]}
        regions = masked_region_top5(net, generated, real, masks, targets, args.batch_size)
        for name, hits in regions.items():  # and paired: does the region find the prompt more than an unrelated one?
            report[f"{name}_controlnet"]["masked_region_top5"] = {
                **{t: round(h.float().mean().item(), 4) for t, h in hits.items()},
                "prompt_vs_unrelated": paired_sign_test(hits["prompt"].float(), hits["unrelated"].float())}
        report["masked_region_chance_top5"] = round(5 / n, 4)
    if kind == "canny":  # paired: the same prompt, seed and control with and without the ControlNet
        per_image = {name: {t: edge_f1_per_image(edges[name], control, t) for t in tolerances}
                     for name in generated}
        report["edge_f1_per_image"] = {f"tolerance_{t}px": paired_sign_test(per_image["with"][t], per_image["without"][t])
                                       for t in tolerances}
    emit(report, args.out)
    return report


if __name__ == "__main__":
    run_command(main)
