"""``python -m benchmarks.controlnet_probe --controlnet RUN --stage-c C --compressor COMP``: how much an inpaint
ControlNet tells its Stage C about the image it should keep (an ablation probe, docs/controlnet.md).

For ``--images`` val emoji, each with a random inpainting mask (``imagedata.filters.random_masks``, fixed seed, no
outpainting), the compressor's latents are noised to each of ``--times`` with fixed noise, and Stage C, steered by
the ControlNet, predicts the clean latents from them for the images' own captions; its prediction is scored by
the mean squared error per latent entry, over the cells the mask leaves whole (kept) and over the others (masked),
with the image's control and with the control of a fully masked image (which carries nothing of it). A ControlNet
that passes on the kept region lowers the kept cells' error toward zero at every time; one that does not leaves the
two controls alike.
"""
from __future__ import annotations

import argparse

import torch

from common.cli import check_output, emit, positive_int, shown
from common.errors import run_command
from diffusion import Denoiser
from diffusion.parameterisations import x0_from_eps
from imagedata.embedded import openmoji_split
from imagedata.filters import mask_share, random_masks
from pipeline.cascade import load_cascade_prior
from pipeline.controlnet import control_of, controlnet_kind, load_control
from pipeline.text_to_image import load_prior
from semantic_compressor import normalize_latents
from stages.controlnet import ControlledStageC
from weights.checkpoint import read_metadata, resolve_checkpoint
from weights.loaders import load_compressor


def x0_errors(denoiser: Denoiser, latents: torch.Tensor, conditions: tuple, control: torch.Tensor,
              keep: torch.Tensor, t: float, seed: int = 1) -> tuple[float, float]:
    """Mean squared error per entry of the predicted clean latents at time ``t`` (fixed noise), over the kept
    cells (``keep`` 1) and over the masked ones."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    r = torch.full((len(latents),), t)
    x_t = denoiser.schedule.add_noise(latents, r, noise)
    eps = denoiser(x_t, r, *conditions, control)
    error = (x0_from_eps(x_t, eps, denoiser.schedule.alpha_bar(r).view(-1, 1, 1, 1)) - latents) ** 2
    channels = latents.shape[1]
    return (float((error * keep).sum() / (keep.sum() * channels)),
            float((error * (1 - keep)).sum() / ((1 - keep).sum() * channels)))


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--controlnet", required=True, help="an inpaint ControlNet export or run folder")
    ap.add_argument("--stage-c", required=True, help="the Stage C it was trained for (v2 or v3)")
    ap.add_argument("--compressor", required=True, help="the compressor Stage C was trained on")
    ap.add_argument("--images", type=positive_int, default=32, help="val emoji, evenly spaced over the split")
    ap.add_argument("--times", default="0.3,0.6,0.8,0.95", help="comma-separated times in (0, 1)")
    ap.add_argument("--size", type=positive_int, default=128)
    ap.add_argument("--data-dir", default="data/openmoji", help="embedded OpenMoji shards (built if missing)")
    ap.add_argument("--out", default=None, help="also write the JSON here (never overwrites)")
    args = ap.parse_args(argv)
    try:
        times = [float(t) for t in args.times.split(",")]
    except ValueError:
        ap.error(f"--times takes comma-separated numbers in (0, 1), got {args.times!r}")
    if not all(0 < t < 1 for t in times):
        ap.error(f"--times must lie in (0, 1), got {args.times}")
    if args.out:
        check_output(args.out, (".json",))
    path = resolve_checkpoint(args.controlnet)
    if controlnet_kind(path) != "inpaint":
        raise ValueError(f"{path} is a {controlnet_kind(path)} ControlNet; this probe scores inpaint ControlNets")
    v3 = read_metadata(resolve_checkpoint(args.stage_c)).get("stage") == "stage_c3"
    prior = (load_cascade_prior if v3 else load_prior)(args.stage_c)
    compressor = load_compressor(args.compressor).eval()
    controlnet = load_control(path, prior.model, args.stage_c, compressor).controlnet.eval()
    own = prior.denoiser
    denoiser = Denoiser(ControlledStageC(prior.model.eval(), controlnet), own.parameterisation, own.schedule,
                        own.loss_weight, own.sigmoid_bias, own.time_input)
    samples = openmoji_split(args.data_dir, "val", args.size)
    picked = torch.linspace(0, len(samples) - 1, min(args.images, len(samples))).round().long().tolist()
    images = torch.stack([samples[i]["image"] for i in picked])
    masks = random_masks(len(images), args.size, args.size, torch.Generator().manual_seed(0), outpaint_prob=0.0)
    latents = compressor(images)
    if not v3:
        latents = normalize_latents(latents, prior.latent_shift, prior.latent_scale)  # the v2 prior's space
    keep = (mask_share(masks, latents.shape[-2:]) == 0).float()
    conditions = prior.conditions([samples[i]["caption"] for i in picked])
    if v3:
        conditions = (*conditions, None)  # no image embeddings
    takes_latents = controlnet.config.takes_latents
    controls = {"image": control_of("inpaint", images, masks, compressor, takes_latents),
                "fully_masked": control_of("inpaint", images, torch.ones_like(masks), compressor, takes_latents)}
    report = {"controlnet": shown(path), "stage_c": args.stage_c, "images": len(images),
              "kept_cell_share": round(float(keep.mean()), 4), "x0_mse": {}}
    for t in times:
        scores = {name: x0_errors(denoiser, latents, conditions, c, keep, t) for name, c in controls.items()}
        report["x0_mse"][f"t={t:g}"] = {f"{name}_control": {"kept": round(kept, 4), "masked": round(masked, 4)}
                                         for name, (kept, masked) in scores.items()}
    return emit(report, args.out)


if __name__ == "__main__":
    run_command(main)
