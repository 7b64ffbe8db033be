"""Image variations and img2img through the semantic compressor, scored on the embedded val split.

    python -m sample.image_conditioned [--decoder pixel] [--limit 32] [--out image_conditioned.json]

Variations: each val image -> compressor latents -> decoder, twice (two seeds). Scored by LPIPS
(``common.metrics.Perceptual``) and cosine distance of Inception pool features between each image
and its variations, against the same distances between unrelated val images (image i against image
i + N/2, a different emoji). Variations keep what the latents carry, so their distance to their
own image should be far below that of an unrelated image.

img2img: image i with the caption of image i + N/2 as the new prompt, at each ``--strengths`` s:
the image's latents are noised to t = s and Stage C continues with the new prompt. Caption
retrieval (``sample.evaluate``: is the emoji of a caption among the 5 emoji nearest to the image,
cosine on Inception features, searching the whole embedded set) for the new prompt should rise
with s and for the source image's caption fall; LPIPS to the source rises. The same retrieval on
Stage C's latents, before any decoder (among the compressor latents of the whole set, cosine, as
``sample.evaluate``'s ``stage_c_latent_retrieval``), shows Stage C's part without the decoder's loss;
Stage C's latents do not depend on the decoder. Prints JSON.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from sample.__main__ import SHIPPED
from sample.evaluate import features, gallery, latent_gallery, top5_hits
from common.cli import check_output, emit, positive_int, seed, shown
from imagedata.embedded import openmoji_split
from common.errors import run_command
from common.metrics import InceptionFeatures, Perceptual
from pipeline.cascade import load_any_pixel_text_to_image, load_any_text_to_image


def strengths_arg(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not numbers: {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"strengths must be numbers in (0, 1], got {text!r}")
    return values


def batched(fn, n: int, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(slice(i, i + batch_size)) for i in range(0, n, batch_size)])


def mean(t: torch.Tensor) -> float:
    return round(float(t.float().mean()), 4)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage-c", default=str(SHIPPED / "stage_c.safetensors"))
    ap.add_argument("--stage-b", default=str(SHIPPED / "stage_b.safetensors"))
    ap.add_argument("--stage-a", default=str(SHIPPED / "stage_a.safetensors"))
    ap.add_argument("--compressor", default=str(SHIPPED / "compressor.safetensors"))
    ap.add_argument("--decoder", choices=("semantic", "pixel"), default="semantic")
    ap.add_argument("--pixel-decoder", default=str(SHIPPED / "pixel_decoder.safetensors"))
    ap.add_argument("--data-dir", default="data/openmoji")
    ap.add_argument("--size", type=positive_int, default=128)
    ap.add_argument("--limit", type=positive_int, default=32, help="val images (even, at least 2)")
    ap.add_argument("--strengths", type=strengths_arg, default=[0.3, 0.6, 0.9, 1.0])
    ap.add_argument("--prior-steps", type=positive_int, default=60)
    ap.add_argument("--decoder-steps", type=positive_int, default=None, help="default: Stage B 12, pixel decoder 50")
    ap.add_argument("--prior-guidance", type=float, default=4.0)
    ap.add_argument("--decoder-guidance", type=float, default=None, help="default: the decoder's (Stage B 2, pixel "
                    "decoder 3)")
    ap.add_argument("--batch-size", type=positive_int, default=32)
    ap.add_argument("--gallery-limit", type=positive_int, default=None, help="search only the first N emoji")
    ap.add_argument("--seed", type=seed, default=0)
    ap.add_argument("--out", default=None, help="also write the JSON here (never overwrites)")
    args = ap.parse_args(argv)
    if args.limit < 2 or args.limit % 2:
        ap.error(f"--limit must be even and at least 2 (image i is paired with image i + N/2), got {args.limit}")
    if args.out:
        check_output(args.out, (".json",))
    if args.decoder == "pixel":
        pipe = load_any_pixel_text_to_image(args.stage_c, args.pixel_decoder, compressor=args.compressor)
    else:
        pipe = load_any_text_to_image(args.stage_c, args.stage_b, args.stage_a, compressor=args.compressor)
    steps = args.decoder_steps or pipe.decoder.default_steps
    args.decoder_guidance = pipe.decoder.default_guidance if args.decoder_guidance is None else args.decoder_guidance
    samples = openmoji_split(args.data_dir, "val", args.size, args.limit)
    if len(samples) < args.limit:
        raise ValueError(f"the val split has {len(samples)} images, fewer than --limit {args.limit}")
    real = torch.stack([s["image"] for s in samples])
    captions = [s["caption"] for s in samples]
    n, half, bs = len(real), len(real) // 2, args.batch_size
    partner = torch.arange(n).roll(-half)  # image i's unrelated partner: image i + N/2
    new_prompts = [captions[j] for j in partner.tolist()]

    lpips, inception = Perceptual("alex"), InceptionFeatures()
    gallery_feats, gallery_captions = gallery(args.data_dir, inception, args.size, bs, args.gallery_limit)
    real_feats = features(inception, real, bs, "Inception features of the val images")

    def lpips_to(images: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return batched(lambda s: lpips(images[s], real[index[s]]), n, bs)

    def cosine_distance(feats: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return 1 - F.cosine_similarity(feats, real_feats[index], dim=1)

    own = torch.arange(n)
    report = {"decoder": args.decoder, "stage_c": shown(args.stage_c),
              "decoder_checkpoint": shown(args.pixel_decoder if args.decoder == "pixel" else args.stage_b),
              "n_images": n, "size": args.size, "decoder_steps": steps, "decoder_guidance": args.decoder_guidance,
              "prior_steps": args.prior_steps, "prior_guidance": args.prior_guidance, "lpips": lpips.description,
              "gallery_size": len(gallery_captions), "chance_top5": round(5 / len(gallery_captions), 4)}

    variations, lpips_own, lpips_var_unrelated, cos_own = [], [], [], []
    for k in range(2):
        v = batched(lambda s: pipe.variations(real[s], decoder_steps=steps, decoder_guidance=args.decoder_guidance,
                                              seed=args.seed + 1000 * k + s.start, progress=False), n, bs)
        variations.append(v)
        lpips_own.append(lpips_to(v, own))
        lpips_var_unrelated.append(lpips_to(v, partner))
        cos_own.append(cosine_distance(features(inception, v, bs, "Inception features of the variations"), own))
    lpips_own, lpips_var_unrelated = torch.stack(lpips_own), torch.stack(lpips_var_unrelated)
    lpips_real_unrelated = lpips_to(real, partner)
    between = batched(lambda s: lpips(variations[0][s], variations[1][s]), n, bs)
    var_feats = features(inception, variations[0], bs, "Inception features of the variations")
    report["variations"] = {
        "lpips_image_vs_own_variation": mean(lpips_own),
        "lpips_image_vs_unrelated_image": mean(lpips_real_unrelated),
        "lpips_variation_vs_unrelated_image": mean(lpips_var_unrelated),
        "lpips_between_two_variations": mean(between),
        "share_own_closer_than_unrelated": mean((lpips_own < lpips_real_unrelated[None]).float()),
        "inception_cosine_distance_own": mean(torch.stack(cos_own)),
        "inception_cosine_distance_unrelated_image": mean(cosine_distance(real_feats, partner)),
        "top5_retrieval_own_caption": round(top5_hits(var_feats, gallery_feats, gallery_captions, captions), 4),
        "top5_retrieval_new_prompt": round(top5_hits(var_feats, gallery_feats, gallery_captions, new_prompts), 4),
    }

    rows, latent_sets = [], []
    for strength in args.strengths:
        pairs = [pipe(new_prompts[s], image=real[s], strength=strength, prior_steps=args.prior_steps,
                      decoder_steps=steps, prior_guidance=args.prior_guidance, decoder_guidance=args.decoder_guidance,
                      seed=args.seed + s.start, progress=False, return_latents=True)
                 for s in (slice(i, i + bs) for i in range(0, n, bs))]
        out = torch.cat([images for images, _ in pairs])
        latent_sets.append(torch.cat([latents for _, latents in pairs]).flatten(1))
        feats = features(inception, out, bs, f"Inception features at strength {strength}")
        rows.append({"strength": strength,
                     "top5_retrieval_new_prompt": round(top5_hits(feats, gallery_feats, gallery_captions,
                                                                  new_prompts), 4),
                     "top5_retrieval_source_caption": round(top5_hits(feats, gallery_feats, gallery_captions,
                                                                      captions), 4),
                     "lpips_to_source": mean(lpips_to(out, own)),
                     "lpips_to_new_prompts_image": mean(lpips_to(out, partner))})
    report["img2img"] = rows
    compressor_gallery = latent_gallery(args.data_dir, pipe.compressor, args.size, bs, args.gallery_limit)
    for row, latents in zip(rows, latent_sets):
        row["stage_c_latents_top5_new_prompt"] = round(top5_hits(latents, compressor_gallery, gallery_captions,
                                                                 new_prompts), 4)
        row["stage_c_latents_top5_source_caption"] = round(top5_hits(latents, compressor_gallery, gallery_captions,
                                                                     captions), 4)
    with torch.no_grad():
        own_latents = batched(lambda s: pipe.encode(real[s]), n, bs).flatten(1)
    report["variations"]["compressor_latents_top5_own_caption"] = round(
        top5_hits(own_latents, compressor_gallery, gallery_captions, captions), 4)
    report["variations"]["compressor_latents_top5_new_prompt"] = round(
        top5_hits(own_latents, compressor_gallery, gallery_captions, new_prompts), 4)
    return emit(report, args.out)


if __name__ == "__main__":
    run_command(main)
