"""Compare decoders on the embedded val split: Stage B + Stage A against greedy-grown pixel decoders.

    python -m sample.compare --pixel greedy=checkpoints/tiny/pixel_decoder.safetensors \\
        --pixel scratch=runs/pixel_decoder/tiny_phase2_scratch --out runs/compare

Every decoder renders the same two sets of semantic latents:
* reconstruction: each val image's own compressor latents (the decoder alone): PSNR, LPIPS and FID
  against the real images, and caption retrieval (as ``sample.evaluate``);
* text-to-image: Stage C latents sampled once for the val captions (fixed seeds), identical for every
  decoder: FID and top-5 caption retrieval with own and with shuffled captions.
Also parameters, training wall time (export metadata; a grown decoder's includes its phase 1;
Stage B + A's is Stage A plus Stage B with the compressor fine-tuned inside it; Stage C is shared
and not counted) and decoding seconds per image on this machine.

Writes ``compare.json``, ``compare.md`` (the table) and ``compare.png`` (rows: the real images, then
each decoder's reconstructions and text-to-image samples for the first val captions) into ``--out``,
which must be new or empty.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sample.__main__ import SHIPPED, fill_sampling_defaults
from sample.evaluate import ValScorer, add_common_arguments, compressor_beside, write_outputs
from pipeline.cascade import load_any_decoder, load_any_prior
from pipeline.text_to_image import check_stage_b_fits, load_pixel_text_to_image, sampler_options
from weights.loaders import load_compressor
from weights.checkpoint import fingerprint, read_metadata, resolve_checkpoint
from common.cli import check_output, positive_int, shown
from common.errors import run_command
from sample.evaluate_stage_a import Scores
from common.metrics import Perceptual

SEMANTIC = "stage_b+stage_a"


def parse_named(spec: str) -> tuple[str, str]:
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--pixel takes NAME=PATH (e.g. greedy=checkpoints/tiny/pixel_decoder.safetensors), "
                                         f"got {spec!r}")
    return name, path


def training_cost(meta: dict) -> dict:
    """Steps and wall time an export's metadata records, the starting checkpoint's (``init_*``) included."""
    steps, wall = meta.get("global_step"), meta.get("wall_time_s")
    if wall is not None and "init_wall_time_s" in meta:
        wall += meta["init_wall_time_s"]
        steps = f"{meta.get('init_global_step')} + {steps}"
    elif wall is not None and meta.get("init_from"):
        wall = None  # started from a checkpoint whose cost the export does not record
    return {"train_steps": steps, "train_wall_min": None if wall is None else round(wall / 60, 1)}


def decode_all(decoder, semantic: torch.Tensor, size: int, captions: list[str], steps: int, guidance: float,
               batch_size: int, seed: int, what: str, sampler: str = "ddpm", eta: float | None = None
               ) -> tuple[torch.Tensor, float]:
    """Images for every latent (the same generator seeds for every decoder) and decoding s/image."""
    out, seconds = [], 0.0
    for i in tqdm(range(0, len(semantic), batch_size), desc=what):
        start = time.perf_counter()
        out.append(decoder(semantic[i:i + batch_size], (size, size), captions[i:i + batch_size], steps, guidance,
                           torch.Generator().manual_seed(seed + i), sampler=sampler, eta=eta))
        seconds += time.perf_counter() - start
    return torch.cat(out), seconds / len(semantic)


def labelled_grid(rows: list[tuple[str, torch.Tensor]], out: Path, label_width: int = 200, pad: int = 2) -> None:
    """One PNG: a row of images per entry, its label on the left."""
    from PIL import Image, ImageDraw

    n, size = rows[0][1].shape[0], rows[0][1].shape[-1]
    canvas = Image.new("RGB", (label_width + n * (size + pad), len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (size + pad)
        draw.text((6, y + size // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            canvas.paste(Image.fromarray(array), (label_width + c * (size + pad), y))
    canvas.save(out)


def markdown(report: dict) -> str:
    cols = [("decoder", "decoder"), ("params_M", "params (M)"), ("train_wall_min", "train wall (min)"),
            ("decoder_steps", "steps"), ("s_per_image", "s / image"), ("recon_psnr", "recon PSNR"),
            ("recon_lpips", "recon LPIPS"), ("recon_fid", "recon FID"), ("recon_top5", "recon top-5"),
            ("t2i_fid", "T2I FID"), ("t2i_top5_own", "T2I top-5 own"), ("t2i_top5_shuffled", "T2I top-5 shuffled")]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for row in report["decoders"]:
        lines.append("| " + " | ".join("-" if row.get(k) is None else str(row[k]) for k, _ in cols) + " |")
    notes = (f"\n{report['n_captions']} val captions at {report['size']} px; Stage C {report['stage_c']} "
             f"({report['prior_steps']} steps, guidance {report['prior_guidance']}), decoder guidance "
             f"{report['decoder_guidance']}. Top-5 retrieval among {report['gallery_size']} emoji "
             f"(chance {report['chance_top5']}). LPIPS: {report['lpips']}. Latency on {report['threads']} CPU "
             "threads, batch " f"{report['batch_size']}.\n")
    return "\n".join(lines) + "\n" + notes


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(ap)
    ap.add_argument("--pixel", type=parse_named, action="append", default=None, metavar="NAME=PATH",
                    help="a pixel decoder export or run folder; repeat for several "
                         "(default: greedy=the shipped pixel_decoder.safetensors)")
    ap.add_argument("--no-semantic", action="store_true", help="leave Stage B + Stage A out")
    ap.add_argument("--grid-columns", type=positive_int, default=8)
    ap.add_argument("--out", default="runs/compare", help="output folder (new or empty)")
    args = ap.parse_args(argv)
    fill_sampling_defaults(args)  # Würstchen's defaults (these commands take v2 stages)
    samplers = sampler_options(args)
    out = check_output(args.out)
    pixels = args.pixel or [("greedy", str(SHIPPED / "pixel_decoder.safetensors"))]
    names = [SEMANTIC] * (not args.no_semantic) + [name for name, _ in pixels]
    if len(set(names)) != len(names):
        raise ValueError(f"decoder names must differ, got {names}; give each --pixel its own NAME")
    compressor_path = args.compressor or compressor_beside(args.stage_c)

    # every decoder is loaded (and checked against Stage C's compressor) before any work
    prior = load_any_prior(args.stage_c)
    decoders: dict[str, tuple] = {}
    if not args.no_semantic:
        decoder = load_any_decoder(args.stage_b, args.stage_a)
        b_meta = read_metadata(resolve_checkpoint(args.stage_b))
        check_stage_b_fits(prior, args.stage_c, args.stage_b, b_meta.get("compressor_fingerprint"))
        cost = training_cost(b_meta)
        a_wall = read_metadata(args.stage_a).get("wall_time_s")
        if cost["train_wall_min"] is not None and a_wall is not None:
            cost["train_wall_min"] = round(cost["train_wall_min"] + a_wall / 60, 1)
        params = sum(p.numel() for m in (decoder.stage_b, decoder.stage_a) for p in m.parameters())
        decoders[SEMANTIC] = (decoder, args.stage_b, params, cost)
    for name, path in pixels:
        decoder = load_pixel_text_to_image(args.stage_c, path, prior).decoder
        params = sum(p.numel() for p in decoder.model.parameters())
        decoders[name] = (decoder, path, params, training_cost(read_metadata(path)))
    compressor = load_compressor(compressor_path)
    if prior.compressor_fingerprint not in (None, fingerprint(compressor)):
        raise ValueError(f"the compressor {compressor_path} is not the one Stage C {args.stage_c} was trained on; "
                         "pass the one it was trained on (--compressor)")

    scorer = ValScorer(args.data_dir, args.size, args.batch_size, args.limit, args.gallery_limit)
    lpips = Perceptual("alex")
    captions, n = scorer.captions, len(scorer.captions)
    true_latents = torch.cat([compressor(scorer.real[i:i + args.batch_size]) for i in range(0, n, args.batch_size)])
    prior_latents = torch.cat([
        prior.sample(captions[i:i + args.batch_size], [""] * len(captions[i:i + args.batch_size]),
                     prior.grid(args.size, args.size), args.prior_steps, args.prior_guidance,
                     torch.Generator().manual_seed(args.seed + i), progress=False,
                     sampler=samplers["prior_sampler"], eta=samplers["prior_eta"])
        for i in tqdm(range(0, n, args.batch_size), desc="Stage C latents")])

    k = min(args.grid_columns, n)
    grid_rows, rows = [("real", scorer.real[:k])], []
    for name, (decoder, path, params, cost) in decoders.items():
        steps = args.decoder_steps if args.decoder_steps is not None else decoder.default_steps
        common = (args.size, captions, steps, args.decoder_guidance, args.batch_size, args.seed)
        chosen = {"sampler": samplers["decoder_sampler"], "eta": samplers["decoder_eta"]}
        recon, s_per_image = decode_all(decoder, true_latents, *common, f"{name}: reconstructions", **chosen)
        t2i, _ = decode_all(decoder, prior_latents, *common, f"{name}: text-to-image", **chosen)
        pixel_scores = Scores(lpips)
        for i in range(0, n, args.batch_size):
            pixel_scores.add(recon[i:i + args.batch_size], scorer.real[i:i + args.batch_size])
        recon_scores, t2i_scores = scorer(recon, f"{name} reconstructions"), scorer(t2i, f"{name} samples")
        pixel = pixel_scores.result()
        rows.append({"decoder": name, "checkpoint": shown(path), "params_M": round(params / 1e6, 2), **cost,
                     "decoder_steps": steps, "s_per_image": round(s_per_image, 3),
                     "recon_psnr": round(pixel["psnr"], 2), "recon_lpips": pixel["lpips"],
                     "recon_fid": recon_scores["fid_vs_val"], "recon_top5": recon_scores["top5_retrieval_own_caption"],
                     "t2i_fid": t2i_scores["fid_vs_val"], "t2i_top5_own": t2i_scores["top5_retrieval_own_caption"],
                     "t2i_top5_shuffled": t2i_scores["top5_retrieval_shuffled_captions"]})
        grid_rows += [(f"{name}: reconstruction", recon[:k]), (f"{name}: text-to-image", t2i[:k])]

    report = {"stage_c": shown(args.stage_c), "compressor": shown(compressor_path), "n_captions": n, "size": args.size,
              "prior_steps": args.prior_steps, "prior_guidance": args.prior_guidance,
              "decoder_guidance": args.decoder_guidance, **samplers, "gallery_size": len(scorer.gallery_captions),
              "chance_top5": scorer.chance_top5, "lpips": lpips.description, "threads": torch.get_num_threads(),
              "batch_size": args.batch_size, "grid_captions": captions[:k], "decoders": rows}
    write_outputs(out, "compare", report, markdown(report), lambda path: labelled_grid(grid_rows, path))
    return report


if __name__ == "__main__":
    run_command(main)
