"""Side by side with the ``diffusers`` implementation of the same modules (``PaellaVQModel``,
``WuerstchenDiffNeXt``, ``WuerstchenPrior``): identical configs and weights (one random set, mapped
into ours by the converters in ``weights.convert``), identical inputs, dtype and settings, in one
process. Outputs are checked to match before timing; runs alternate (ours, theirs, theirs, ours,
...) after a warm-up, and the result is our median time over theirs (< 1: ours is faster).

Stage B ``tiny`` has no text (``c_text=None``), which ``WuerstchenDiffNeXt`` cannot express (it
always maps CLIP states): it is compared with 384-d text added on both sides (MiniLM's width).
The compressor and text encoders have no ``diffusers`` counterpart here and are not compared.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn

from benchmarks.measure import autocast, compiled, time_alternating
from benchmarks.targets import TEXT_TOKENS
from semantic_compressor import latent_grid
from weights.convert import (stage_a_config_from_release, stage_a_from_release, stage_b_config_from_release,
                             stage_b_from_release, stage_c_config_from_release, stage_c_from_release)
from pipeline.denoisers import denoiser_for
from stages.stage_a import PRESETS as A_PRESETS, StageA, StageAConfig
from stages.stage_b import PRESETS as B_PRESETS, StageB, StageBConfig
from stages.stage_c import PRESETS as C_PRESETS, StageC, StageCConfig

WUERSTCHEN = "diffusers.pipelines.deprecated.wuerstchen"


def diffusers_available() -> bool:
    try:
        __import__(f"{WUERSTCHEN}.modeling_wuerstchen_prior")
        return True
    except ImportError:
        return False


def paella_kwargs(cfg: StageAConfig) -> dict:
    if cfg.widths[1] != 2 * cfg.widths[0]:
        raise ValueError("PaellaVQModel's levels are embed_dim // 2 and embed_dim")
    return dict(embed_dim=cfg.widths[1], bottleneck_blocks=cfg.bottleneck_blocks, latent_channels=cfg.latent_channels,
                num_vq_embeddings=cfg.codebook_size, scale_factor=cfg.scale_factor)


def diffnext_kwargs(cfg: StageBConfig) -> dict:
    return dict(c_in=cfg.c_latent, c_out=cfg.c_latent, c_r=cfg.c_r, patch_size=cfg.patch_size, c_cond=cfg.c_cond,
                c_hidden=list(cfg.widths), nhead=[h if h else -1 for h in cfg.heads], blocks=list(cfg.blocks),
                level_config=["CTA" if h else "CT" for h in cfg.heads], inject_effnet=list(cfg.inject_semantic),
                effnet_embd=cfg.c_semantic, clip_embd=cfg.c_text, kernel_size=cfg.kernel_size, dropout=cfg.dropout)


def prior_kwargs(cfg: StageCConfig) -> dict:
    return dict(c_in=cfg.c_latent, c=cfg.width, c_cond=cfg.c_text, c_r=cfg.c_r, depth=cfg.depth, nhead=cfg.heads,
                dropout=cfg.dropout)


@dataclass
class Pair:
    """Our module and the diffusers one, with how to call each on the same inputs."""

    name: str
    note: str
    ours: nn.Module
    theirs: nn.Module
    call_ours: Callable[[tuple], torch.Tensor]
    call_theirs: Callable[[tuple], torch.Tensor]
    inputs: Callable[[int, int, torch.device], tuple]
    check: Callable[[tuple], tuple[torch.Tensor, torch.Tensor]] | None = None  # outputs to compare, if not the calls'


def _random_weights(model: nn.Module, std: float) -> nn.Module:
    """One random draw for every parameter (the zero-initialised ones too) and BatchNorm statistics."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, std)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.5)
    return model


def _ours_from(theirs: nn.Module, cls: type, config, expected, to_ours: Callable[[dict], dict], device: str) -> nn.Module:
    if config != expected:
        raise AssertionError(f"converted config {config} differs from ours {expected}")
    with torch.device("meta"):
        ours = cls(config)
    ours = ours.to_empty(device=device)
    ours.load_state_dict(to_ours(theirs.state_dict()), strict=True)
    return ours


def _build(ref_cls: type, kwargs: dict, device: str, std: float) -> nn.Module:
    with torch.device("meta"):
        ref = ref_cls(**kwargs)
    return _random_weights(ref.to_empty(device=device), std).eval()


def stage_a_pair(preset: str, device: str) -> Pair:
    from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel

    cfg = A_PRESETS[preset]
    ref = _build(PaellaVQModel, paella_kwargs(cfg), device, 0.2)
    state = ref.state_dict()
    ours = _ours_from(ref, StageA, stage_a_config_from_release(state, dict(ref.config)), cfg, stage_a_from_release,
                      device).eval()

    def inputs(b: int, px: int, dev: torch.device) -> tuple:
        return (torch.rand(b, 3, px, px, device=dev),)

    return Pair(f"stage_a/{preset}", "encode + decode (unquantised)", ours, ref,
                lambda a: ours.decode(ours.encode(a[0])), lambda a: ref.decode(ref.encode(a[0]).latents).sample, inputs)


def stage_b_pair(preset: str, device: str) -> Pair:
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext import WuerstchenDiffNeXt

    cfg, note = B_PRESETS[preset], "eps prediction"
    if cfg.c_text is None:
        cfg, note = replace(cfg, c_text=384), "eps prediction; 384-d text added (diffusers always maps text)"
    ref = _build(WuerstchenDiffNeXt, diffnext_kwargs(cfg), device, 0.02)
    state = ref.state_dict()
    ours = _ours_from(ref, StageB, stage_b_config_from_release(state, dict(ref.config)), cfg, stage_b_from_release,
                      device).eval()

    def inputs(b: int, px: int, dev: torch.device) -> tuple:
        return (torch.randn(b, 4, px // 4, px // 4, device=dev), torch.rand(b, device=dev),
                torch.randn(b, 16, *latent_grid(px, px), device=dev), torch.randn(b, TEXT_TOKENS, cfg.c_text, device=dev))

    denoiser = denoiser_for(ours)
    return Pair(f"stage_b/{preset}", note, ours, ref, lambda a: denoiser(*a), lambda a: ref(*a), inputs)


def stage_c_pair(preset: str, device: str) -> Pair:
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_prior import WuerstchenPrior

    cfg = C_PRESETS[preset]
    ref = _build(WuerstchenPrior, prior_kwargs(cfg), device, 0.02)
    state = ref.state_dict()
    ours = _ours_from(ref, StageC, stage_c_config_from_release(state, dict(ref.config)), cfg, stage_c_from_release,
                      device).eval()

    def inputs(b: int, px: int, dev: torch.device) -> tuple:
        return (torch.randn(b, 16, *latent_grid(px, px), device=dev), torch.rand(b, device=dev),
                torch.randn(b, TEXT_TOKENS, cfg.c_text, device=dev))

    def check(a: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The A/B heads: eps = (x - A) / (|1 - B| + 1e-5) amplifies rounding where B ~ 1."""
        captured = {}
        hook = ref.out.register_forward_hook(lambda m, i, o: captured.update(ab=o))
        ref(*a)
        hook.remove()
        return torch.cat(ours(*a), dim=1), captured["ab"]

    denoiser = denoiser_for(ours)
    return Pair(f"stage_c/{preset}", "eps prediction", ours, ref, lambda a: denoiser(*a), lambda a: ref(*a),
                inputs, check)


PAIRS: dict[str, Callable[[str, str], Pair]] = {"stage_a": stage_a_pair, "stage_b": stage_b_pair, "stage_c": stage_c_pair}


def max_relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """max |ours - theirs| over max(1, max |theirs|)."""
    ours, theirs = ours.float(), theirs.float()
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp(min=1.0)).item()


def compare(kind: str, preset: str, device: torch.device, dtype: torch.dtype, px: int, batch: int,
            compile: bool = False, repeats: int = 3) -> dict:
    """Check that outputs match (that call is the warm-up), then time both alternately: our time over theirs."""
    pair = PAIRS[kind](preset, str(device))
    args = pair.inputs(batch, px, device)
    call_ours, call_theirs = pair.call_ours, pair.call_theirs
    if compile:
        call_ours, call_theirs = compiled(call_ours), compiled(call_theirs)
    with torch.no_grad(), autocast(device, dtype):  # doubles as the warm-up
        outputs = pair.check(args) if pair.check else (call_ours(args), call_theirs(args))
        error = max_relative_error(*outputs)
        del outputs
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2

    def run(fn: Callable[[tuple], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            with torch.no_grad(), autocast(device, dtype):
                fn(args)
        return call

    timings = time_alternating({"ours": run(call_ours), "diffusers": run(call_theirs)}, device, warmup=0 if not compile else 1,
                               repeats=repeats)
    note = pair.note
    del pair
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "module": kind, "size": preset, "what": note, "px": px, "batch": batch,
        "device": device.type, "dtype": str(dtype).removeprefix("torch."), "compile": compile,
        "ours_s": timings["ours"].median, "diffusers_s": timings["diffusers"].median,
        "ratio": timings["ours"].median / timings["diffusers"].median, "repeats": repeats,
        "max_relative_error": error, "tolerance": tolerance, "outputs_match": error <= tolerance,
    }

