"""Text to image from the command line: ``python -m sample "a red apple" --out apple.png``.

Defaults to the tiny checkpoints shipped in ``checkpoints/tiny/``; ``--stage-c``, ``--stage-b`` and
``--stage-a`` take our safetensors exports, Lightning checkpoints or run folders (released weights
go through ``python -m weights.convert`` first). ``--decoder pixel`` renders Stage C's latents with
the greedy-grown pixel decoder (``--pixel-decoder``) instead of Stage B + Stage A.

``--image in.png`` without a prompt renders variations of the image (its semantic compressor latents,
decoded ``--n`` times); with a prompt it is img2img: the image's latents are noised to t =
``--strength`` and Stage C continues from there with the prompt. ``--dtype bfloat16`` halves memory.

Stable Cascade (v3) exports (``python -m weights.convert`` of the released weights, or our v3 runs) are
recognised: ``--stage-c`` and ``--stage-b`` then run the v3 chain with the released defaults (Stage C
20 steps, guidance 4, shift 2; Stage B 10 steps, guidance 1.1; ``pipeline.cascade``).

``--baseline-ldm PATH`` samples the single-stage baseline instead (``pipeline.baseline_ldm``: a text-conditional
U-Net on Stage A's latents, decoded by Stage A; ``--prior-steps``, ``--prior-guidance`` and ``--prior-sampler``
set its sampler, as they set Stage C's).

``--control canny|inpaint|sr --control-image PATH`` steers Stage C with a ControlNet (``--controlnet``, trained
with ``configs/controlnet/``): canny takes a photo (its edges are drawn) or an edge map (white on black), inpaint
a photo and ``--mask`` (white: repaint, black: keep), sr a low-resolution image (the output is twice its size);
``--control-scale`` multiplies its features. It composes with ``--image``/``--strength`` and ``--lora``.

``--lora PATH[:SCALE]`` (repeatable) adds LoRA adapters (``weights.lora``) to the stage each was trained
for. ``--preview`` renders Stage C's latents with the previewer (``stages.previewer``) instead of a
decoder: a coarse image at 8x the latent grid, no Stage B.

Every PNG carries its settings (text chunk ``settings``, JSON) and the command that writes the same
pixels again (``command``); ``python -m sample.app`` serves the same command as a web page.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusion import TIME_LISTS
from semantic_compressor import latent_grid
from pipeline import inputs
from weights.checkpoint import read_metadata, recorded_path, resolve_checkpoint
from pipeline.text_to_image import DEFAULT_STRENGTH, add_sampler_arguments, sampler_options, save_images
from pipeline.baseline_ldm import load_baseline_text_to_image
from pipeline.decoders import PixelDecoder, SemanticDecoder
from pipeline.cascade import (RELEASE, CascadeDecoder, load_any_pixel_text_to_image, load_any_prior,
                              load_any_text_to_image)
from weights.loaders import load_any_previewer
from pipeline.text_encoder import check_prompts
from common.errors import run_command
from imagedata.filters import check_mask
from pipeline.controlnet import controlnet_kind, controlnet_takes_latents, load_control
from stages.controlnet import CONTROLS
from weights.lora import check_loras, parse_lora

SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints" / "tiny"
PIXEL_TRAINING = ("python -m train fit --config configs/pixel_decoder/tiny_phase1.yaml, then "
                  "--config configs/pixel_decoder/tiny_phase2.yaml, and pass --pixel-decoder "
                  "runs/pixel_decoder/tiny_phase2_greedy")
OUT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
STEPS = "a step count or times such as 1,0.5,0"


def checked(check: Callable, convert: Callable = int, what: str = "a whole number") -> Callable[[str], object]:
    """An argparse type: ``convert`` the text (else 'not <what>'), then ``check`` it; argparse names the flag."""
    def parse(text: str):
        try:
            value = convert(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def steps_arg(text: str) -> int | str | list[float]:
    """``12``, an explicit list of times ``1,0.66,0.33,0``, or a named list (``wuerstchen_prior``)."""
    if text in TIME_LISTS:
        return text
    return [float(x) for x in text.split(",")] if "," in text else int(text)


def positive_minutes(value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"must be a number of minutes > 0, got {value}")
    return value


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an --out that is a folder, has no image extension, lies under a file, or exists (without --overwrite)."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give an image file such as {out / 'sample.png'}")
    if out.suffix.lower() not in OUT_EXTENSIONS:
        raise ValueError(f"--out {out} needs an image extension, one of {', '.join(OUT_EXTENSIONS)}")
    above = next(p for p in out.parents if p.exists())
    if not above.is_dir():
        raise ValueError(f"--out {out} lies under {above}, which is a file, not a folder; choose another --out")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")


def build_parser(parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command's arguments (``parser_class``: the web app's raises its errors instead of exiting)."""
    ap = parser_class(prog="python -m sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="*", help="one or more prompts (none with --image: variations of the image)")
    ap.add_argument("--out", type=Path, default=Path("outputs/sample.png"),
                    help=f"image ({', '.join(OUT_EXTENSIONS)}): the image, or the grid when several; a PNG carries "
                         "its settings and the command that reproduces it (text chunks 'settings', 'command')")
    ap.add_argument("--negative", "--negative-prompt", dest="negative", default="",
                    help="negative prompt: replaces the empty prompt in the guidance of Stage C and of a "
                         "text-conditional decoder (the shipped tiny decoders take no text)")
    ap.add_argument("--image", type=Path, default=None,
                    help="an image file: variations of it (no prompt) or img2img (with a prompt and --strength)")
    ap.add_argument("--strength", type=checked(inputs.strength, float, "a number"), default=None,
                    help=f"img2img: the time in (0, 1] the image's latents are noised to (default {DEFAULT_STRENGTH}; "
                         "1 = the prompt alone)")
    ap.add_argument("--compressor", default=None,
                    help="semantic compressor for --image (default: compressor.safetensors beside Stage C or "
                         "the decoder, else the one the pixel decoder recorded)")
    ap.add_argument("--dtype", choices=tuple(inputs.DTYPES), default="float32",
                    help="weights' precision; float16 can overflow (refused with a note), bfloat16 does not")
    ap.add_argument("--n", type=checked(inputs.whole), default=1, help="images per prompt")
    ap.add_argument("--seed", type=checked(inputs.seed), default=0, help="in [0, 2**63)")
    ap.add_argument("--height", type=checked(inputs.whole), default=None, help="default 128, or the --image's")
    ap.add_argument("--width", type=checked(inputs.whole), default=None, help="default 128, or the --image's")
    ap.add_argument("--prior-steps", type=checked(inputs.steps, steps_arg, STEPS), default=None,
                    help=f"Stage C steps, times '1,0.5,0' or a named list ({', '.join(TIME_LISTS)}); default 60 "
                         "(Stable Cascade: 20)")
    ap.add_argument("--decoder-steps", type=checked(inputs.steps, steps_arg, STEPS), default=None,
                    help="decoder steps or times (default: Stage B 12, Stable Cascade's 10, pixel decoder 50)")
    ap.add_argument("--prior-guidance", type=checked(inputs.guidance, float, "a number"), default=None,
                    help="Stage C guidance (default 4)")
    ap.add_argument("--decoder-guidance", type=checked(inputs.guidance, float, "a number"), default=None,
                    help="decoder guidance (default: Stage B 2, pixel decoder 3; paper: 4; Stable "
                         "Cascade: 1.1; 1 = none)")
    ap.add_argument("--stage-c", default=str(SHIPPED / "stage_c.safetensors"))
    ap.add_argument("--stage-b", default=str(SHIPPED / "stage_b.safetensors"))
    ap.add_argument("--stage-a", default=None, help="default: stage_a.safetensors next to Stage B, else the one it recorded")
    ap.add_argument("--decoder", choices=("semantic", "pixel"), default="semantic",
                    help="semantic: Stage B + Stage A; pixel: the greedy-grown pixel decoder")
    ap.add_argument("--pixel-decoder", default=str(SHIPPED / "pixel_decoder.safetensors"),
                    help="pixel decoder export, .ckpt or run folder (with --decoder pixel)")
    ap.add_argument("--baseline-ldm", default=None, metavar="PATH",
                    help="sample the single-stage baseline LDM (python -m train fit --config "
                         "configs/baseline_ldm/tiny.yaml) instead of the cascade: text -> U-Net -> Stage A; "
                         "--prior-steps/--prior-guidance/--prior-sampler set its sampler")
    ap.add_argument("--max-minutes", type=checked(positive_minutes, float, "a number"),
                    default=inputs.MAX_SECONDS / 60,
                    help="refuse work estimated (from network calls timed on this device) to take longer "
                         "(default %(default).0f)")
    ap.add_argument("--no-limits", action="store_true",
                    help="skip the memory and time estimates that refuse work too large for this device")
    ap.add_argument("--preview", nargs="?", const=str(SHIPPED / "previewer.safetensors"), default=None,
                    metavar="PREVIEWER",
                    help="render Stage C's latents with the previewer (default: the shipped tiny one) instead of a "
                         "decoder: a coarse image (latent grid x 8, upscaled to --height x --width), no Stage B")
    ap.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                    help="a LoRA adapter.safetensors (Stage C or Stage B, python -m train ... tiny_lora.yaml) with "
                         "its scale (default 1); repeatable")
    control = ap.add_argument_group("ControlNet", "steer Stage C with a control image (pipeline.controlnet)")
    control.add_argument("--control", choices=tuple(CONTROLS), default=None,
                         help="the control: canny edges, inpaint (with --mask) or sr (2x super-resolution)")
    control.add_argument("--control-image", type=Path, default=None,
                         help="canny: a photo or an edge map (white edges on black); inpaint: the photo; sr: the "
                              "low-resolution image. Resized to the output size (sr: half of it) with a note")
    control.add_argument("--controlnet", default=None,
                         help="the ControlNet export or run folder (default: checkpoints/tiny/controlnet_<control>"
                              ".safetensors)")
    control.add_argument("--control-scale", type=checked(inputs.guidance, float, "a number"), default=None,
                         help="multiplies the ControlNet's features (default 1; 0 = no control)")
    control.add_argument("--mask", type=Path, default=None,
                         help="inpaint: a black-and-white image, white where the image is repainted")
    control.add_argument("--keep-unmasked", action="store_true",
                         help="inpaint: hold Stage C's latents to the control image's where the mask leaves a latent "
                              "cell whole (imputation by replacement; needs the compressor)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sampler_arguments(ap)
    return ap


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """The arguments, each checked when parsed and together after (before any file is read)."""
    ap = parser or build_parser()
    args = ap.parse_args(argv)
    check_out(args.out, args.overwrite)
    fill_sampling_defaults(args)
    if not args.prompts and args.image is None:
        ap.error("give one or more prompts, or --image for variations of an image")
    if args.preview is not None and (args.image is not None or args.decoder == "pixel"):
        ap.error("--preview shows what Stage C samples for prompts without a decoder; drop --image and --decoder")
    if args.baseline_ldm is not None and (args.image is not None or args.preview is not None or args.lora
                                          or args.decoder == "pixel"):
        ap.error("--baseline-ldm samples from prompts alone, without Stage C or a decoder; drop --image, --preview, "
                 "--lora and --decoder")
    if args.baseline_ldm is not None and args.control is not None:
        ap.error("--baseline-ldm has no Stage C to steer: drop --control")
    if (args.control is None) != (args.control_image is None):
        ap.error("--control and --control-image go together: name the control (canny, inpaint, sr) and its image")
    if args.control is None and (args.controlnet or args.control_scale is not None or args.mask is not None):
        ap.error("--controlnet, --control-scale and --mask apply with --control")
    if (args.mask is not None) != (args.control == "inpaint"):
        ap.error("--control inpaint takes --mask (white: repaint, black: keep), and only it")
    if args.keep_unmasked and args.control != "inpaint":
        ap.error("--keep-unmasked applies with --control inpaint (it keeps what --mask leaves black)")
    if args.control is not None and (not args.prompts or args.preview is not None):
        ap.error("--control steers Stage C for a prompt: give a prompt, and drop --preview")
    if args.strength is not None and (args.image is None or not args.prompts):
        ap.error("--strength applies to img2img: give --image and a prompt (variations of an image take no "
                 "--strength)")
    return args


# what only says where the images go or how the command behaves; every other argument decides the images
NOT_SETTINGS = ("help", "out", "overwrite", "quiet", "no_limits", "max_minutes")


def settings(args: argparse.Namespace) -> dict:
    """Every argument that decides the images, by name, as JSON values (embedded in each PNG)."""
    def plain(value):
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else (
            str(value) if isinstance(value, Path) else value)
    return {action.dest: plain(getattr(args, action.dest)) for action in build_parser()._actions
            if action.dest not in NOT_SETTINGS}


def command_line(settings: dict, out: str | os.PathLike) -> str:
    """``python -m sample ...`` that makes these images again (bit for bit, on the same checkpoints) at ``out``:
    the settings that differ from the command's defaults, as flags."""
    def text(value) -> str:
        if isinstance(value, list):  # explicit times
            return ",".join(repr(float(v)) for v in value)
        return repr(value) if isinstance(value, float) else str(value)

    flags = []
    for action in build_parser()._actions:
        if action.dest not in settings or not action.option_strings:
            continue
        value, flag = settings[action.dest], action.option_strings[0]
        default = action.default if not isinstance(action.default, Path) else str(action.default)
        if value == default:
            continue
        if isinstance(action, argparse._StoreTrueAction):
            flags.append(flag)
        elif isinstance(action, argparse._AppendAction):
            flags += [part for item in value for part in (flag, text(item))]
        else:
            flags += [flag, text(value)]
    flags += ["--out", str(out)]
    prompts = list(settings.get("prompts", []))
    # a prompt starting with '-' would read as a flag: after '--' every word is a prompt
    argv = flags + ["--"] + prompts if any(p.startswith("-") for p in prompts) else prompts + flags
    return "python -m sample " + shlex.join(argv)


def embedded(args: argparse.Namespace, command_out: str | os.PathLike | None = None) -> dict[str, str]:
    """The PNG text chunks: ``settings`` (JSON) and ``command`` (with ``--out command_out``, default ``args.out``)."""
    record = settings(args)
    return {"settings": json.dumps(record, ensure_ascii=False),
            "command": command_line(record, args.out if command_out is None else command_out)}


def main(argv: list[str] | None = None) -> list[Path]:
    args = parse_args(argv)
    shown: set[str] = set()

    def note(message, category, *_) -> None:
        """Each note once, as it comes (a time estimate must show before the work it estimates)."""
        if issubclass(category, UserWarning) and str(message) not in shown:
            shown.add(str(message))
            print(f"note: {message}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("always", UserWarning)
        warnings.showwarning = note
        paths, images = _sample(args)
    print(json.dumps({"image": str(paths[0]), "images": [str(p) for p in paths[1:]], "prompts": args.prompts,
                      "size": list(images.shape[-2:]), "seed": args.seed,
                      **({"source": str(args.image), "mode": "img2img" if args.prompts else "variations"}
                         if args.image is not None else {})}))
    return paths


def _recorded_stage(path: str) -> str | None:
    """The stage a checkpoint records; None for an unreadable one (left to the loader's error)."""
    try:
        return read_metadata(resolve_checkpoint(path)).get("stage")
    except (ValueError, OSError):
        return None


def is_cascade(stage_c: str) -> bool:
    """Whether --stage-c is a Stable Cascade (v3) export (its recorded stage)."""
    return _recorded_stage(stage_c) == "stage_c3"


def fill_sampling_defaults(args: argparse.Namespace) -> bool:
    """Unset --prior-steps and --prior-guidance: Würstchen's (60, 4), or the released Stable Cascade settings
    (20, 4) for a v3 --stage-c; unset --decoder-guidance: the decoder's own (Stage B 2, a v3 Stage B 1.1, the
    pixel decoder 3). Returns whether --stage-c is v3."""
    cascade = is_cascade(args.stage_c)
    decoder = (PixelDecoder if getattr(args, "decoder", "semantic") == "pixel" else
               CascadeDecoder if _recorded_stage(args.stage_b) == "stage_b3" else SemanticDecoder)
    defaults = (*((RELEASE["prior"]["steps"], RELEASE["prior"]["guidance"]) if cascade else (60, 4.0)),
                decoder.default_guidance)
    for name, value in zip(("prior_steps", "prior_guidance", "decoder_guidance"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, value)
    return cascade


def find_compressor(args: argparse.Namespace) -> Path:
    """--compressor, else compressor.safetensors beside Stage C or the decoder, else the pixel decoder's record."""
    if args.compressor is not None:
        return Path(args.compressor)
    decoder = args.pixel_decoder if args.decoder == "pixel" else args.stage_b
    for checkpoint in (args.stage_c, decoder):
        beside = resolve_checkpoint(checkpoint).with_name("compressor.safetensors")
        if beside.exists():
            return beside
    if args.decoder == "pixel":
        path = resolve_checkpoint(args.pixel_decoder)
        recorded = read_metadata(path).get("compressor_path")
        if recorded:
            return recorded_path(recorded, path)
    raise FileNotFoundError(f"no compressor.safetensors beside {args.stage_c} or {decoder}; pass --compressor "
                            "(the compressor Stage C and the decoder were trained with)")


def _sample(args: argparse.Namespace):
    samplers, loras, image = check_request(args)
    if args.baseline_ldm is not None:
        return _baseline(args, samplers)
    if args.preview is not None:
        return _preview(args, samplers, loras)
    control_inputs = check_control(args)
    pipe = load_pipeline(args, loras, request_compressor(args, image))
    return render(args, pipe, samplers, image, control=control_inputs)


def request_compressor(args: argparse.Namespace, image: torch.Tensor | None) -> Path | None:
    """The compressor a request needs (its image's latents: img2img, variations, a latent ControlNet,
    --keep-unmasked), or None."""
    needs = image is not None or args.keep_unmasked or (
        args.control is not None and controlnet_takes_latents(resolve_checkpoint(controlnet_path(args))))
    return find_compressor(args) if needs else None


def controlnet_path(args: argparse.Namespace) -> Path:
    path = Path(args.controlnet) if args.controlnet else SHIPPED / f"controlnet_{args.control}.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no ControlNet at {path}; train one with python -m train fit --config "
                                f"configs/controlnet/tiny_{args.control}.yaml and pass --controlnet "
                                f"runs/controlnet/tiny_{args.control}")
    return path


def check_control(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """``--control-image`` and ``--mask`` read and checked (a mask must be black and white) before any model loads."""
    if args.control is None:
        return None
    image = inputs.load_image(args.control_image, "--control-image")
    mask = None
    if args.mask is not None:
        mask = check_mask(inputs.load_image(args.mask, "--mask").mean(1, keepdim=True), what=f"--mask {args.mask}")
    path = resolve_checkpoint(controlnet_path(args))
    kind = controlnet_kind(path)
    if kind != args.control:
        raise ValueError(f"{path} is a {kind} ControlNet, but --control asks for {args.control}; pass a ControlNet "
                         f"trained for {args.control} (--controlnet)")
    return image, mask


def check_request(args: argparse.Namespace) -> tuple[dict, list[tuple[Path, float]], torch.Tensor | None]:
    """The sampler options, LoRA adapters and ``--image`` of a request, each checked before any model is loaded."""
    samplers = sampler_options(args)  # a bad sampler setting fails before any model is loaded
    loras = [parse_lora(text) for text in args.lora]
    check_loras(loras)  # a missing or wrong adapter file fails here too
    image = inputs.load_image(args.image) if args.image is not None else None  # a bad file fails here too
    if image is not None:
        latent_grid(*image.shape[-2:])  # too small for the compressor: refused before any model is loaded
    if args.decoder == "pixel" and not Path(args.pixel_decoder).exists():
        raise FileNotFoundError(f"no pixel decoder at {args.pixel_decoder}; train one with {PIXEL_TRAINING}")
    return samplers, loras, image


def load_pipeline(args: argparse.Namespace, loras: list[tuple[Path, float]], compressor: Path | None):
    """Stage C with the decoder ``--decoder`` names (``TextToImage``), in ``--dtype``, with the adapters and the
    ``--control`` ControlNet."""
    if args.decoder == "pixel":
        pipe = load_any_pixel_text_to_image(args.stage_c, args.pixel_decoder, compressor=compressor, dtype=args.dtype,
                                            loras=loras)
    else:
        stage_a = args.stage_a
        if stage_a is None:  # a bundle keeps Stage A next to Stage B; else the path Stage B recorded
            beside = resolve_checkpoint(args.stage_b).with_name("stage_a.safetensors")
            stage_a = beside if beside.exists() else None
        pipe = load_any_text_to_image(args.stage_c, args.stage_b, stage_a, compressor=compressor, dtype=args.dtype,
                                      loras=loras)
    if args.control is not None:
        pipe.attach_control(load_control(controlnet_path(args), pipe.prior.model, args.stage_c, pipe.compressor))
    return pipe


def render(args: argparse.Namespace, pipe, samplers: dict, image: torch.Tensor | None,
           callback: Callable[[dict], None] | None = None, command_out: str | os.PathLike | None = None,
           control: tuple[torch.Tensor, torch.Tensor | None] | None = None):
    """The request's images from a loaded pipeline, written to ``--out`` with their settings: (paths, images).

    ``callback`` sees every sampler step (``TextToImage.forward``); ``command_out``: the ``--out`` of the
    embedded command (default ``--out`` itself); ``control``: the control image and mask (``check_control``)
    for the pipeline's ControlNet.
    """
    steps = args.decoder_steps if args.decoder_steps is not None else pipe.decoder.default_steps
    limits = None if args.no_limits else inputs.Limits(seconds=args.max_minutes * 60)
    text = embedded(args, command_out)
    if image is not None and not args.prompts:
        images = pipe.variations(image, args.n, args.height, args.width, steps, args.decoder_guidance, args.seed,
                                 not args.quiet, samplers["decoder_sampler"], samplers["decoder_eta"], limits,
                                 callback=callback)
        return save_images(images, args.out, nrow=math.ceil(len(images) ** 0.5), overwrite=args.overwrite,
                           text=text), images
    images = pipe(args.prompts, args.negative, args.height, args.width, args.n, args.prior_steps,
                  steps, args.prior_guidance, args.decoder_guidance, args.seed, not args.quiet, limits=limits,
                  image=image, strength=args.strength, callback=callback, **samplers,
                  **({} if control is None else {"control_image": control[0], "mask": control[1],
                                                 "control_scale": 1.0 if args.control_scale is None else
                                                 args.control_scale, "keep_unmasked": args.keep_unmasked}))
    # a row per prompt for several images each; otherwise as square a grid as the images make
    nrow = args.n if len(args.prompts) > 1 and args.n > 1 else math.ceil(len(images) ** 0.5)
    return save_images(images, args.out, nrow=nrow, overwrite=args.overwrite, text=text), images


def _baseline(args: argparse.Namespace, samplers: dict):
    """The prompts' images from the single-stage baseline LDM (``--stage-a``: default, the Stage A it recorded)."""
    pipe = load_baseline_text_to_image(args.baseline_ldm, args.stage_a)
    images = pipe(args.prompts, args.negative, args.height or 128, args.width or 128, args.n, args.prior_steps,
                  args.prior_guidance, args.seed, not args.quiet, samplers["prior_sampler"], samplers["prior_eta"])
    nrow = args.n if len(args.prompts) > 1 and args.n > 1 else math.ceil(len(images) ** 0.5)
    return save_images(images, args.out, nrow=nrow, overwrite=args.overwrite, text=embedded(args)), images


def _preview(args: argparse.Namespace, samplers: dict, loras: list):
    """Stage C's latents for the prompts, rendered by the previewer (``stages.previewer``) without Stage B."""
    if not Path(args.preview).exists():
        raise FileNotFoundError(f"no previewer at {args.preview}; train one with python -m train fit --config "
                                "configs/previewer/tiny.yaml and pass --preview runs/previewer/tiny")
    prior = load_any_prior(args.stage_c, loras=loras)
    previewer = load_any_previewer(args.preview, prior.compressor_fingerprint)
    h, w = args.height or 128, args.width or 128
    batch = [p for p in check_prompts(args.prompts) for _ in range(args.n)]
    generator = torch.Generator().manual_seed(args.seed)
    latents = prior.sample(batch, [args.negative] * len(batch), prior.grid(h, w), args.prior_steps,
                           args.prior_guidance, generator, not args.quiet, samplers["prior_sampler"],
                           samplers["prior_eta"])
    with torch.no_grad():
        images = F.interpolate(previewer(latents), size=(h, w), mode="nearest")
    nrow = args.n if len(args.prompts) > 1 and args.n > 1 else math.ceil(len(images) ** 0.5)
    return save_images(images, args.out, nrow=nrow, overwrite=args.overwrite, text=embedded(args)), images


if __name__ == "__main__":
    run_command(main)
