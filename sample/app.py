"""A local web page for the cascade: ``python -m sample.app`` (Gradio, the ``app`` extra: ``pip install -e ".[app]"``).

Every request is the command ``python -m sample`` would run: the page's fields become its arguments,
checked by its parser and checks (so bad input gets the command's one-line errors), and the images
are rendered by the same code (``sample.__main__.render``) into ``--out-dir``, each PNG carrying its
settings and the command that reproduces it bit for bit (text chunks ``settings`` and ``command``).
One pipeline stays loaded (reloaded only when a request names another decoder, adapters, ControlNet or
the compressor); requests wait in Gradio's queue and run one at a time. While Stage C samples, the
previewer (``stages.previewer``) renders its prediction of the clean latents every few steps; each
stage has a progress bar; Cancel stops the work at the next sampler step. A ControlNet (``--control``:
canny, inpaint with its mask, sr) steers Stage C with a control image, as on the command line.
"""
import argparse
import html
import math
import queue
import secrets
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid

from diffusion import SAMPLERS
from sample.__main__ import (SHIPPED, build_parser, check_control, check_request, controlnet_path, load_pipeline,
                             parse_args, render, request_compressor)
from stages.controlnet import CONTROLS
from common.errors import USER_ERRORS, one_line, run_command
from pipeline.text_to_image import TextToImage, snap_size
from stages.previewer import Previewer
from weights.loaders import load_previewer

try:  # the optional `app` extra; the rest of the project runs without it
    import gradio as gr
except ImportError:
    gr = None

DECODERS = {"Stage B + Stage A": "semantic", "pixel decoder": "pixel"}
NO_CONTROL = "none"  # the page's ControlNet choice without one
PREVIEW_SIDE = 256  # px: the previews are upscaled (nearest) to at least this, in whole multiples of the image size
# the command's flags that choose checkpoints: given to the app, they go into every request
CHECKPOINT_FLAGS = ("--stage-c", "--stage-b", "--stage-a", "--pixel-decoder", "--compressor", "--dtype")


class Cancelled(Exception):
    """Raised in a sampler callback to stop the work (the page's Cancel button)."""


class RaisingParser(argparse.ArgumentParser):
    """The command's parser, raising its one-line message instead of printing usage and exiting."""

    def error(self, message: str):
        raise ValueError(message)


def number_text(value: float | str | None) -> str | None:
    """A page number as the command line takes it: whole numbers without '.0'; a text field's words as
    typed (empty: None, the command's default); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def request_argv(prompt: str, negative: str, seed: str, n: float | None, height: float | None, width: float | None,
                 prior_steps: str, decoder_steps: str, prior_guidance: float | str | None,
                 decoder_guidance: float | str | None, prior_sampler: str, decoder_sampler: str, decoder: str,
                 loras: str, image: str | None, strength: float | None, checkpoints: list[str], out: Path,
                 control: str = NO_CONTROL, control_image: str | None = None, mask: str | None = None,
                 control_scale: float | str | None = None, keep_unmasked: bool = False) -> list[str]:
    """The ``python -m sample`` arguments of the page's fields (checked later by the command's parser).

    An empty prompt with an image asks for variations of it; with a prompt and an image it is img2img
    at ``strength``. Seed "random" draws one (below 2**32, so the page shows it exactly). ``control``
    (``NO_CONTROL`` or a kind of ``stages.controlnet.CONTROLS``) with its image, mask and scale: the
    ``--control`` options; a control image or mask without a control still goes to the parser, which
    names the mistake.
    """
    seed = str(secrets.randbelow(2**32)) if seed.strip().lower() == "random" else seed.strip()
    argv = [*checkpoints, "--seed", seed, "--decoder", DECODERS.get(decoder, decoder), "--out", str(out), "--quiet"]
    for flag, value in (("--n", number_text(n)), ("--height", number_text(height)), ("--width", number_text(width)),
                        ("--prior-steps", prior_steps.strip()), ("--decoder-steps", decoder_steps.strip()),
                        ("--prior-guidance", number_text(prior_guidance)),
                        ("--decoder-guidance", number_text(decoder_guidance))):
        if value:
            argv += [flag, value]
    for flag, name in (("--prior-sampler", prior_sampler), ("--decoder-sampler", decoder_sampler)):
        if name and name != "ddpm":
            argv += [flag, name]
    for line in loras.splitlines():
        if line.strip():
            argv += ["--lora", line.strip()]
    if image:
        argv += ["--image", str(image)]
        if prompt:
            argv += ["--strength", number_text(strength) or ""]
    if control and control != NO_CONTROL:
        argv += ["--control", control]
        scale = number_text(control_scale)
        if scale and scale != "1":
            argv += ["--control-scale", scale]
    for flag, path in (("--control-image", control_image), ("--mask", mask)):
        if path:
            argv += [flag, str(path)]
    if keep_unmasked:
        argv.append("--keep-unmasked")
    return argv + ["--"] + ([prompt] if prompt or not image else [])


def progress_html(bars: dict[str, tuple[int, int]]) -> str:
    """One labelled progress bar per stage: {stage: (steps done, steps)}."""
    rows = "".join(f'<div class="stage-bar" data-stage="{html.escape(stage)}" data-done="{done}" data-steps="{steps}">'
                   f'<span>{html.escape(stage)}</span> <progress value="{done}" max="{max(steps, 1)}"></progress> '
                   f'<span>{done}/{steps}</span></div>' for stage, (done, steps) in bars.items())
    return f'<div id="stage-progress">{rows}</div>'


def to_pixels(images: torch.Tensor, size: tuple[int, int]):
    """A grid of (B, 3, h, w) images in [0, 1], each upscaled (nearest) to ``size``, as an (H, W, 3) uint8 array."""
    images = F.interpolate(images.float(), size=size, mode="nearest")
    grid = make_grid(images, nrow=math.ceil(len(images) ** 0.5), padding=2, pad_value=1.0)
    return grid.mul(255).add_(0.5).clamp_(0, 255).permute(1, 2, 0).to(torch.uint8).numpy()


class Studio:
    """One loaded pipeline serving the page's requests in turn, with previews, progress and cancelling."""

    def __init__(self, checkpoints: list[str], out_dir: Path, previewer: str | None, preview_every: int = 2):
        self.checkpoints, self.out_dir, self.previewer_path = checkpoints, Path(out_dir), previewer
        self.preview_every = preview_every
        self.lock = threading.Lock()  # one request on the model at a time, even one Gradio has given up on
        self.loaded: tuple[tuple, TextToImage] | None = None
        self.previewer: tuple[str | None, Previewer | None, str] | None = None  # (Stage C fingerprint, model, note)
        self.cancels: dict[str, threading.Event] = {}
        self.multiples: dict[str, int] = {}  # the loaded decoders' size multiples (for the size note)
        self.count = 0

    # --- the model -----------------------------------------------------------------------------------------
    def pipeline(self, args: argparse.Namespace, loras: list, image: torch.Tensor | None) -> TextToImage:
        """The request's pipeline: the one loaded when its checkpoints, adapters and compressor are the same."""
        compressor = request_compressor(args, image)
        control = str(controlnet_path(args)) if args.control is not None else None
        key = (args.decoder, args.stage_c, args.stage_b, args.stage_a, args.pixel_decoder, str(compressor),
               args.dtype, tuple((str(p), s) for p, s in loras), control)
        if self.loaded is None or self.loaded[0] != key:
            self.loaded = None  # one pipeline in memory: drop the old before loading the new
            pipe = load_pipeline(args, loras, compressor)
            self.loaded = (key, pipe)
            self.multiples[args.decoder] = pipe.decoder.size_multiple
        return self.loaded[1]

    def load_previewer(self, pipe: TextToImage) -> tuple[Previewer | None, str]:
        """The previewer for this Stage C, or None with the reason (missing, or trained on another compressor)."""
        fp = pipe.prior.compressor_fingerprint
        if self.previewer is None or self.previewer[0] != fp:
            model, note = None, ""
            if not self.previewer_path:
                note = "no previewer given (--previewer)"
            else:
                try:
                    model = load_previewer(self.previewer_path, fp)
                except USER_ERRORS as e:
                    note = f"no Stage C previews: {one_line(e)}"
            self.previewer = (fp, model, note)
        return self.previewer[1], self.previewer[2]

    def size_note(self, height: float | None, width: float | None, decoder: str) -> str:
        """What the requested size renders at: rounded up to the decoder's grid."""
        multiple = self.multiples.get(DECODERS.get(decoder, decoder))
        try:
            h, w = (int(v) if v is not None else 128 for v in (height, width))
        except (TypeError, ValueError):
            return ""
        if h <= 0 or w <= 0:
            return ""
        if multiple is None:
            return f"{h} x {w} px, rounded up to the {decoder}'s grid when it runs"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sh, sw = snap_size(h, w, multiple)
        return f"renders **{sh} x {sw} px** (multiples of {multiple} px)"

    # --- a request -----------------------------------------------------------------------------------------
    def cancel(self, request: "gr.Request") -> str:
        flag = self.cancels.get(request.session_hash) if request is not None else None
        if flag is not None:
            flag.set()
        return "cancelled"

    def generate(self, prompt: str, negative: str, seed: str, n: float | None, height: float | None,
                 width: float | None, prior_steps: str, decoder_steps: str, prior_guidance: float | str | None,
                 decoder_guidance: float | str | None, prior_sampler: str, decoder_sampler: str, decoder: str,
                 loras: str, image: str | None, strength: float | None, control: str = NO_CONTROL,
                 control_image: str | None = None, mask: str | None = None, control_scale: float | str | None = None,
                 keep_unmasked: bool = False, request: "gr.Request" = None) -> Iterator[tuple]:
        """(preview, progress, gallery, files, command, status) updates while the request runs."""
        skip, session = gr.skip(), request.session_hash if request is not None else ""
        self.count += 1
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{self.count:04d}"
        out = self.out_dir / f"{stem}.png"
        try:
            # keep the inputs beside the result, so the command names files that stay
            image, control_image, mask = (self._keep(path, f"{stem}-{name}") for path, name in (
                (image, "input"), (control_image, "control"), (mask, "mask")))
            argv = request_argv(prompt, negative, seed, n, height, width, prior_steps, decoder_steps, prior_guidance,
                                decoder_guidance, prior_sampler, decoder_sampler, decoder, loras, image, strength,
                                self.checkpoints, out.resolve(), control, control_image, mask, control_scale,
                                keep_unmasked)
            args = parse_args(argv, build_parser(RaisingParser))
        except USER_ERRORS as e:
            yield None, "", skip, skip, "", f"error: {one_line(e)}"
            return
        yield None, progress_html({}), [], None, "", "running ..."  # the last request's results go
        cancel = self.cancels[session] = threading.Event()
        events: queue.Queue = queue.Queue()
        worker = threading.Thread(target=self._work, args=(args, cancel, events, f"outputs/{stem}.png"), daemon=True)
        worker.start()
        try:
            while True:
                kind, *payload = events.get()
                if kind == "progress":
                    bars, preview = payload
                    # the status is left alone: Cancel's "cancelled" must not be overwritten by a late step
                    yield (preview if preview is not None else skip), progress_html(bars), skip, skip, skip, skip
                elif kind == "error":
                    yield skip, skip, skip, skip, skip, payload[0]
                    return
                else:
                    paths, command, status = payload
                    shown = [str(p) for p in (paths[1:] if len(paths) > 1 else paths)]
                    yield skip, skip, shown, shown, command, status
                    return
        finally:
            cancel.set()  # a request Gradio stopped (Cancel, a closed page) stops sampling at the next step
            if self.cancels.get(session) is cancel:
                del self.cancels[session]

    def _keep(self, path: str | None, stem: str) -> str | None:
        """An uploaded file copied into the output folder as ``stem`` (its suffix kept): its new path."""
        if not path:
            return None
        kept = self.out_dir / f"{stem}{Path(path).suffix.lower() or '.png'}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
        return str(kept.resolve())

    def _work(self, args: argparse.Namespace, cancel: threading.Event, events: queue.Queue, command_out: str):
        """Check, load and sample one request (in a thread), reporting progress and the result to ``events``."""
        try:
            with self.lock, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                samplers, loras, image = check_request(args)
                control = check_control(args)
                pipe = self.pipeline(args, loras, image)
                previewer, preview_note = self.load_previewer(pipe)
                bars = ({} if image is not None and not args.prompts else {"Stage C": (0, 0)})
                bars[getattr(pipe.decoder, "progress_name", "decoder")] = (0, 0)
                events.put(("progress", dict(bars), None))
                size = (args.height or (128 if image is None else image.shape[-2]),
                        args.width or (128 if image is None else image.shape[-1]))
                zoom = max(1, math.ceil(PREVIEW_SIDE / max(size)))  # previews of small images shown larger

                def step(state: dict) -> None:
                    if cancel.is_set():
                        raise Cancelled
                    stage, done, steps = state["stage"], state["i"] + 1, state["steps"]
                    bars[stage] = (done, steps)
                    preview = None
                    if (stage == "Stage C" and previewer is not None
                            and (done % self.preview_every == 0 or done == steps)):
                        with torch.no_grad():
                            preview = to_pixels(previewer(state["semantic"].to(torch.float32)),
                                                (size[0] * zoom, size[1] * zoom))
                    events.put(("progress", dict(bars), preview))

                paths, images = render(args, pipe, samplers, image, callback=step, command_out=command_out,
                                       control=control)
                notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
            status = (f"done: {len(images)} image(s) of {images.shape[-2]} x {images.shape[-1]} px, seed "
                      f"{args.seed}" + "".join(f"\n\nnote: {n}" for n in dict.fromkeys(notes + [preview_note])
                                                     if n))
            with Image.open(paths[0]) as im:
                command = im.text["command"]
            events.put(("done", paths, command, status))
        except Cancelled:
            events.put(("error", "cancelled"))
        except USER_ERRORS as e:
            events.put(("error", f"error: {one_line(e)}"))
        except Exception as e:  # a programming error: shown in the page, with its trace in the terminal
            events.put(("error", f"error: {type(e).__name__}: {one_line(e)}"))
            raise

    # --- the page ------------------------------------------------------------------------------------------
    def page(self) -> "gr.Blocks":
        names = sorted(SAMPLERS)
        with gr.Blocks(title="Würstchen", analytics_enabled=False) as demo:  # nothing sent anywhere
            gr.Markdown("## Würstchen: text -> Stage C -> decoder\nEvery result is a `python -m sample` command "
                        "(below it, to copy); its PNG carries the settings.")
            with gr.Row():
                with gr.Column(scale=3):
                    prompt = gr.Textbox(label="Prompt", elem_id="prompt", lines=2,
                                        placeholder="red apple (empty with an image: variations of it)")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                    with gr.Row():
                        seed = gr.Textbox(label="Seed (a number or 'random')", value="0", elem_id="seed")
                        n = gr.Number(label="Images", value=1, elem_id="n")
                        height = gr.Number(label="Height (px)", value=128, elem_id="height")
                        width = gr.Number(label="Width (px)", value=128, elem_id="width")
                    size_note = gr.Markdown(self.size_note(128, 128, "Stage B + Stage A"), elem_id="size-note")
                    with gr.Row():
                        prior_steps = gr.Textbox(label="Stage C steps", value="", elem_id="prior-steps",
                                                 info="a count, times 1,0.5,0 or wuerstchen_prior; empty: "
                                                      "Würstchen 60, Stable Cascade 20")
                        # guidance and control scale are text fields: an empty Number reads as 0 in the browser,
                        # not as the command's default
                        prior_guidance = gr.Textbox(label="Stage C guidance", value="4", info="empty: 4",
                                                    elem_id="prior-guidance")
                        prior_sampler = gr.Dropdown(names, value="ddpm", label="Stage C sampler",
                                                    elem_id="prior-sampler")
                    with gr.Row():
                        decoder_steps = gr.Textbox(label="Decoder steps", value="", elem_id="decoder-steps",
                                                   info="empty: Stage B 12, pixel decoder 50")
                        decoder_guidance = gr.Textbox(label="Decoder guidance", value="",
                                                      info="empty: Stage B 2, Stable Cascade 1.1, pixel decoder 3",
                                                      elem_id="decoder-guidance")
                        decoder_sampler = gr.Dropdown(names, value="ddpm", label="Decoder sampler",
                                                      elem_id="decoder-sampler")
                    with gr.Row():
                        decoder = gr.Radio(list(DECODERS), value="Stage B + Stage A", label="Decoder",
                                           elem_id="decoder")
                        loras = gr.Textbox(label="LoRA adapters, one PATH[:SCALE] per line", lines=2,
                                           elem_id="loras")
                    with gr.Row():
                        image = gr.Image(label="Image for variations (no prompt) or img2img", type="filepath",
                                         image_mode=None, elem_id="image", height=150)
                        strength = gr.Slider(0.05, 1.0, value=0.6, step=0.05, label="img2img strength",
                                             elem_id="strength")
                    with gr.Accordion("ControlNet: steer Stage C with a control image", open=False):
                        with gr.Row():
                            control = gr.Dropdown([NO_CONTROL, *CONTROLS], value=NO_CONTROL, label="ControlNet",
                                                  elem_id="control",
                                                  info="the shipped checkpoints/tiny/controlnet_<kind>")
                            control_scale = gr.Textbox(label="Control scale", value="1", info="empty: 1",
                                                       elem_id="control-scale")
                            keep_unmasked = gr.Checkbox(label="inpaint: keep the unmasked part", value=False,
                                                        elem_id="keep-unmasked")
                        with gr.Row():
                            control_image = gr.Image(label="Control image (canny: photo or edge map; inpaint: the "
                                                           "image; sr: the small image)", type="filepath",
                                                     image_mode=None, elem_id="control-image", height=150)
                            mask = gr.Image(label="Inpaint mask (white: repaint, black: keep)", type="filepath",
                                            image_mode=None, elem_id="mask", height=150)
                    with gr.Row():
                        run = gr.Button("Run", variant="primary", elem_id="run")
                        stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Column(scale=2):
                    status = gr.Markdown("", elem_id="status")
                    progress = gr.HTML(progress_html({}), elem_id="progress")
                    with gr.Row():
                        preview = gr.Image(label="Stage C preview", elem_id="preview", format="png",
                                           interactive=False, height=180)
                        gallery = gr.Gallery(label="Result", elem_id="gallery", format="png", columns=2, height=180)
                    files = gr.File(label="PNGs with their settings", elem_id="files", file_count="multiple",
                                    interactive=False)
                    command = gr.Textbox(label="Copy as command", elem_id="command", buttons=["copy"],
                                         interactive=False, lines=3)
            fields = [prompt, negative, seed, n, height, width, prior_steps, decoder_steps, prior_guidance,
                      decoder_guidance, prior_sampler, decoder_sampler, decoder, loras, image, strength, control,
                      control_image, mask, control_scale, keep_unmasked]

            job = run.click(self.generate, fields, [preview, progress, gallery, files, command, status],
                            api_name="generate", concurrency_limit=1, concurrency_id="model",
                            show_progress="hidden")
            stop.click(self.cancel, None, status, cancels=[job], queue=False, api_visibility="private")
            for field in (height, width, decoder):
                field.change(self.size_note, [height, width, decoder], size_note, queue=False,
                             show_progress="hidden", api_visibility="private")
        return demo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m sample.app", description=__doc__.split("\n\n")[0])
    command = build_parser()
    for flag in CHECKPOINT_FLAGS:  # the command's own options, defaults and help
        action = next(a for a in command._actions if flag in a.option_strings)
        ap.add_argument(flag, default=None, choices=action.choices,
                        help=f"as python -m sample {flag}" + (f": {action.help}" if action.help else ""))
    ap.add_argument("--previewer", default=str(SHIPPED / "previewer.safetensors"),
                    help="the previewer of Stage C's latents (default: the shipped tiny one; '' for none)")
    ap.add_argument("--preview-every", type=int, default=2, help="a Stage C preview every N steps")
    ap.add_argument("--out-dir", type=Path, default=Path("outputs/app"), help="where the images are written")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: this machine only; 0.0.0.0: your network)")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--share", action="store_true", help="also a public gradio.live link (needs the internet)")
    args = ap.parse_args(argv)
    if gr is None:
        raise ModuleNotFoundError("the web app needs Gradio: pip install -e \".[app]\"")
    if args.preview_every < 1:
        ap.error(f"argument --preview-every: must be at least 1, got {args.preview_every}")
    checkpoints = [part for flag in CHECKPOINT_FLAGS if getattr(args, flag[2:].replace("-", "_")) is not None
                   for part in (flag, getattr(args, flag[2:].replace("-", "_")))]
    studio = Studio(checkpoints, args.out_dir, args.previewer or None, args.preview_every)
    warm(studio)
    local = args.host in ("127.0.0.1", "localhost")
    print(f"the page: http://{args.host}:{args.port} ({'this machine only' if local else 'open to your network'}); "
          "to share it, pass --host 0.0.0.0 (your network) or --share (a public gradio.live link)", file=sys.stderr)
    serve(studio, args.host, args.port, share=args.share, quiet=True)


# tiny images shown large stay sharp; the progress bars fill their row
CSS = """
#gallery img, #preview img { image-rendering: pixelated; }
#stage-progress .stage-bar { display: flex; gap: 0.5em; align-items: center; }
#stage-progress progress { flex: 1; }
"""


def serve(studio: Studio, host: str = "127.0.0.1", port: int = 7860, **launch) -> "gr.Blocks":
    """The page with its queue (one request on the model at a time), served at ``host:port``."""
    demo = studio.page().queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, allowed_paths=[str(studio.out_dir.resolve())], css=CSS,
                **launch)
    return demo


def warm(studio: Studio) -> None:
    """Load the default pipeline and previewer before the page opens: a bad checkpoint fails here, in one line."""
    args = parse_args([*studio.checkpoints, "--out", str((studio.out_dir / "x.png").resolve()), "--", "warm"],
                      build_parser(RaisingParser))
    _, loras, _ = check_request(args)
    studio.load_previewer(studio.pipeline(args, loras, None))


if __name__ == "__main__":
    run_command(main)
