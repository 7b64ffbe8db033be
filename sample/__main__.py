"""Text to image from the command line: ``python -m sample "a red apple" --out apple.png``.

Defaults to the tiny checkpoints shipped in ``checkpoints/tiny/``; ``--stage-c``, ``--stage-b`` and
``--stage-a`` take our safetensors exports, Lightning checkpoints or run folders (released weights
go through ``python -m stages.convert`` first). ``--decoder pixel`` renders Stage C's latents with
the greedy-grown pixel decoder (``--pixel-decoder``) instead of Stage B + Stage A.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

from diffusion import TIME_LISTS
from sample.pipeline import add_sampler_arguments, sampler_options

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny"
PIXEL_TRAINING = ("python -m train fit --config configs/pixel_decoder/tiny_phase1.yaml, then "
                  "--config configs/pixel_decoder/tiny_phase2.yaml, and pass --pixel-decoder "
                  "runs/pixel_decoder/tiny_phase2_greedy")


def steps_arg(text: str) -> int | str | list[float]:
    """``12``, an explicit list of times ``1,0.66,0.33,0``, or a named list (``wuerstchen_prior``)."""
    if text in TIME_LISTS:
        return text
    return [float(x) for x in text.split(",")] if "," in text else int(text)


def main(argv: list[str] | None = None) -> list[Path]:
    ap = argparse.ArgumentParser(prog="python -m sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="+", help="one or more prompts")
    ap.add_argument("--out", default="outputs/sample.png", help="PNG: the image, or the grid when several")
    ap.add_argument("--negative", default="", help="negative prompt (replaces the empty prompt in guidance)")
    ap.add_argument("--n", type=int, default=1, help="images per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--prior-steps", type=steps_arg, default=60,
                    help=f"Stage C steps, times '1,0.5,0' or a named list ({', '.join(TIME_LISTS)})")
    ap.add_argument("--decoder-steps", type=steps_arg, default=None,
                    help="decoder steps or times (default: Stage B 12, pixel decoder 50)")
    ap.add_argument("--prior-guidance", type=float, default=4.0)
    ap.add_argument("--decoder-guidance", type=float, default=3.0, help="Stage B guidance (paper: 4; 1 = none)")
    ap.add_argument("--stage-c", default=str(SHIPPED / "stage_c.safetensors"))
    ap.add_argument("--stage-b", default=str(SHIPPED / "stage_b.safetensors"))
    ap.add_argument("--stage-a", default=None, help="default: stage_a.safetensors next to Stage B, else the one it recorded")
    ap.add_argument("--decoder", choices=("semantic", "pixel"), default="semantic",
                    help="semantic: Stage B + Stage A; pixel: the greedy-grown pixel decoder")
    ap.add_argument("--pixel-decoder", default=str(SHIPPED / "pixel_decoder.safetensors"),
                    help="pixel decoder export, .ckpt or run folder (with --decoder pixel)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sampler_arguments(ap)
    args = ap.parse_args(argv)

    notes: list = []
    try:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always", UserWarning)
            paths, images = _sample(args)
    except (ValueError, FileNotFoundError, FileExistsError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        for note in dict.fromkeys(str(n.message) for n in notes if issubclass(n.category, UserWarning)):
            print(f"note: {note}", file=sys.stderr)
    print(json.dumps({"image": str(paths[0]), "images": [str(p) for p in paths[1:]], "prompts": args.prompts,
                      "size": list(images.shape[-2:]), "seed": args.seed}))
    return paths


def _sample(args: argparse.Namespace):
    from sample.pipeline import load_pixel_text_to_image, load_text_to_image, save_images
    from stages.checkpoint import resolve_checkpoint

    samplers = sampler_options(args)  # a bad sampler setting fails before any model is loaded
    if args.decoder == "pixel":
        if not Path(args.pixel_decoder).exists():
            raise FileNotFoundError(f"no pixel decoder at {args.pixel_decoder}; train one with {PIXEL_TRAINING}")
        pipe = load_pixel_text_to_image(args.stage_c, args.pixel_decoder)
    else:
        stage_a = args.stage_a
        if stage_a is None:  # a bundle keeps Stage A next to Stage B; else the path Stage B recorded
            beside = resolve_checkpoint(args.stage_b).with_name("stage_a.safetensors")
            stage_a = beside if beside.exists() else None
        pipe = load_text_to_image(args.stage_c, args.stage_b, stage_a)
    steps = args.decoder_steps if args.decoder_steps is not None else pipe.decoder.default_steps
    images = pipe(args.prompts, args.negative, args.height, args.width, args.n, args.prior_steps,
                  steps, args.prior_guidance, args.decoder_guidance, args.seed, not args.quiet, **samplers)
    # a row per prompt for several images each; otherwise as square a grid as the images make
    nrow = args.n if len(args.prompts) > 1 and args.n > 1 else math.ceil(len(images) ** 0.5)
    return save_images(images, args.out, nrow=nrow, overwrite=args.overwrite), images


if __name__ == "__main__":
    main()
