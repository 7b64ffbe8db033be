"""End-to-end sampling latency versus batch size, and where the time goes (paper Fig. 4: 1024x1024
images, 60 DDPM steps of Stage C, 12 of Stage B, then Stage A; classifier-free guidance doubles the
C and B calls, as in ``pipeline.text_to_image``).

Two ways, always labelled in the output:

* ``measured``: the real sampler (``pipeline.text_to_image.TextToImage`` with ``Prior`` and a decoder) on
  random-weight models, timed per stage with hooks on each module's calls;
* ``projected``: per-call FLOPs at the target size (counted exactly on the meta device) divided by
  the FLOP/s each module achieved in the throughput runs on this device, times the number of calls.
  Used where measuring is too slow (paper sizes at 1024 px on a CPU).

Decoders are pluggable like the sampler's: ``DECODERS`` maps a name to a builder of a module with
the ``pipeline.decoders`` call: Stage B + Stage A, and the greedy-grown pixel decoder (its grown
architecture, at its own default step count); both are projected too.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from benchmarks.measure import autocast, synchronize
from benchmarks.targets import CONFIGS, Target, build_text_encoder, grown_pixel_decoder, targets
from pipeline.decoders import PixelDecoder, SemanticDecoder
from benchmarks.throughput import forward_flops
from stages.stage_a import StageA
from stages.stage_b import StageB, stage_b_config
from pipeline.text_to_image import Prior, TextToImage
from stages.stage_c import StageC

PRIOR_STEPS, DECODER_STEPS = 60, 12  # the paper's Fig. 4
PIXEL_STEPS = PixelDecoder.default_steps  # 50
# sampler defaults: guidance > 1 runs each model twice per step
PRIOR_GUIDANCE, DECODER_GUIDANCE = 4.0, SemanticDecoder.default_guidance
STAGES = ("text", "stage_c", "stage_b", "stage_a", "pixel_decoder")


def build_semantic_decoder(size: str, device: str, text_encoder: nn.Module | None) -> nn.Module:
    """Stage B + Stage A (paper Fig. 3) with random weights."""

    with torch.device(device):
        stage_b, stage_a = StageB(CONFIGS["stage_b"].get(size, "paper")), StageA(CONFIGS["stage_a"].get(size, "paper"))
    return SemanticDecoder(stage_b, stage_a, text_encoder if stage_b_config(stage_b.config).c_text else None).eval()


def build_pixel_decoder(size: str, device: str, text_encoder: nn.Module | None) -> nn.Module:
    """The greedy-grown pixel decoder (phase 2 architecture) with random weights; ``release`` uses ``paper``."""
    with torch.device(device):
        model = grown_pixel_decoder(CONFIGS["pixel_decoder"].get(size, "paper"))
    return PixelDecoder(model, text_encoder=text_encoder if model.config.c_text else None).eval()


# name -> builder(size, device, text encoder)
DECODERS: dict[str, Callable[[str, str, nn.Module | None], nn.Module]] = {
    "stage_b+stage_a": build_semantic_decoder, "pixel": build_pixel_decoder}


def calls_per_image_batch(decoder: str = "stage_b+stage_a") -> dict[str, int]:
    """Module calls per sampled batch: text (prompts + negative), C and the decoder's diffusion model
    (x2 with guidance), and for Stage B + Stage A one Stage A decode."""
    guided = 2 if DECODER_GUIDANCE != 1 else 1
    calls = {"text": 2, "stage_c": PRIOR_STEPS * (2 if PRIOR_GUIDANCE != 1 else 1)}
    if decoder == "pixel":
        return {**calls, "pixel_decoder": PIXEL_STEPS * guided}
    return {**calls, "stage_b": DECODER_STEPS * guided, "stage_a": 1}


def _sync_timer(device: torch.device, totals: dict[str, float], name: str, fn: Callable) -> Callable:
    def timed(*args, **kwargs):
        synchronize(device)
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        synchronize(device)
        totals[name] += time.perf_counter() - start
        return out
    return timed


@contextmanager
def timed_modules(pipe: nn.Module, device: torch.device) -> Iterator[dict[str, float]]:
    """Accumulate seconds spent in the text encoder, Stage C and the decoder's networks during the block."""
    totals = {name: 0.0 for name in STAGES}
    decoder = pipe.decoder
    patched = [(pipe.prior.text_encoder, "encode_uncached", "text"), (pipe.prior.model, "forward", "stage_c"),
               (getattr(decoder, "stage_b", None), "forward", "stage_b"),
               (getattr(decoder, "stage_a", None), "decode", "stage_a"),
               (getattr(decoder, "model", None), "forward", "pixel_decoder")]
    patched = [(m, attr, name) for m, attr, name in patched if m is not None]
    for module, attr, name in patched:
        setattr(module, attr, _sync_timer(device, totals, name, getattr(module, attr)))
    try:
        yield totals
    finally:
        for module, attr, _ in patched:
            delattr(module, attr)  # back to the class's method


def measure_sampling(size: str, device: torch.device, dtype: torch.dtype, px: int, batches: list[int],
                     decoder: str = "stage_b+stage_a", repeats: int = 1, notes: list[str] | None = None) -> list[dict]:
    """The real sampler, random weights, ``repeats`` runs per batch size after one warm-up (median).

    A batch that runs out of device memory ends the sweep with a line in ``notes``."""

    text_encoder = build_text_encoder(CONFIGS["text_encoder"][size], str(device))
    with torch.device(str(device)):
        prior_model = StageC(CONFIGS["stage_c"].get(size, "paper")).eval()
    pipe = TextToImage(Prior(prior_model, text_encoder), DECODERS[decoder](size, str(device), text_encoder)).eval()
    decoder_steps = pipe.decoder.default_steps
    rows = []
    for batch in batches:
        runs = []
        try:
            for i in range(1 + repeats):  # distinct prompts each run: the text encoder caches prompts
                prompts = [f"benchmark run {i} image {j} of a red fox in the snow" for j in range(batch)]
                with timed_modules(pipe, device) as totals, autocast(device, dtype):
                    synchronize(device)
                    start = time.perf_counter()
                    pipe(prompts, height=px, width=px, prior_steps=PRIOR_STEPS, decoder_steps=decoder_steps,
                         prior_guidance=PRIOR_GUIDANCE, decoder_guidance=DECODER_GUIDANCE, seed=i, progress=False,
                         limits=None)  # the sweep itself finds the largest batch that fits
                    synchronize(device)
                    total = time.perf_counter() - start
                if i > 0:
                    runs.append({**totals, "total": total})
        except torch.OutOfMemoryError:
            if notes is not None:
                notes.append(f"sampling {size} with {decoder} at {px} px: batch {batch} ran out of device memory; "
                             f"larger batches skipped.")
            break
        best = sorted(runs, key=lambda r: r["total"])[len(runs) // 2]
        stages = {k: best[k] for k in STAGES}
        rows.append({"method": "measured", "size": size, "decoder": decoder, "px": px, "batch": batch,
                     "device": device.type, "dtype": str(dtype).removeprefix("torch."), "total_s": best["total"],
                     "stages_s": stages, "other_s": best["total"] - sum(stages.values()),
                     "prior_steps": PRIOR_STEPS, "decoder_steps": decoder_steps})
    return rows


def _module_targets(size: str, stages: list[str]) -> dict[str, Target]:
    out = {}
    for stage in stages:
        kind = "text_encoder" if stage == "text" else stage
        config = CONFIGS[kind].get(size, CONFIGS[kind]["paper"])
        out[stage] = next(t for t in targets(list(CONFIGS[kind]), (kind,)) if t.config == config)
    return out


def project_sampling(size: str, throughput: list[dict], px: int, batches: list[int],
                     decoder: str = "stage_b+stage_a") -> list[dict]:
    """Latency from FLOPs at ``px`` and the FLOP/s each module reached in ``throughput`` (inference rows).

    The rate used is that of the largest measured batch of each module (closest to the target's
    work); that the rate stays the same at larger inputs is an assumption, stated in the output.
    """
    calls = calls_per_image_batch(decoder)
    rows = []
    for batch in batches:
        stages, basis = {}, {}
        for stage, target in _module_targets(size, list(calls)).items():
            measured = [r for r in throughput if r["module"] == target.kind and r["config"] == target.config
                        and r["mode"] == "inference" and r.get("achieved_flops_per_s")]
            if not measured:
                stages = None
                break
            ref = max(measured, key=lambda r: (r["batch"], r["px"]))
            stage_px = px if stage != "text" else ref["px"]
            stages[stage] = calls[stage] * forward_flops(target, stage_px, batch) / ref["achieved_flops_per_s"]
            basis[stage] = {"px": ref["px"], "batch": ref["batch"], "flops_per_s": ref["achieved_flops_per_s"]}
        if stages is None:
            continue
        rows.append({"method": "projected", "size": size, "decoder": decoder, "px": px, "batch": batch,
                     "device": throughput[0]["device"], "dtype": throughput[0]["dtype"], "total_s": sum(stages.values()),
                     "stages_s": {s: stages.get(s, 0.0) for s in STAGES}, "other_s": 0.0, "basis": basis,
                     "prior_steps": PRIOR_STEPS,
                     "decoder_steps": PIXEL_STEPS if decoder == "pixel" else DECODER_STEPS})
    return rows
