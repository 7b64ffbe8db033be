"""Training cost of the paper's schedule (App. E) and model FLOPs utilisation.

For every stage and phase: iterations x batch x seconds per sample. Seconds per sample come from
a training-step row measured at that phase's resolution on this device when there is one
("measured"), otherwise from the phase's exact training FLOPs divided by the training FLOP/s this
module reached at another size ("projected"). Separately, the schedule's total training FLOPs give
the ideal A100-hours at 100% of its peak, and with the paper's reported GPU-hours (Stage C 24,602,
Stage B 11,000; Sec. 4.3, Table 2) the utilisation the paper's run implies.

Network only: data loading and the frozen encoders (text encoder, compressor, Stage A encode)
are not counted. Stage C's third phase (multi-aspect 768x1280 / 1280x768 / 768x768 crops) is
counted as 1024x1024 images (24x24 latents; the true mix is ~1.4x as many tokens on average).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from benchmarks.targets import Target
from benchmarks.throughput import train_flops


@dataclass(frozen=True)
class Phase:
    iterations: int
    batch: int
    px: int  # image size fed to Stage A (B) or whose compressor latents C trains on (512 px: 12x12, 1024: 24x24)


SCHEDULE: dict[str, tuple[Phase, ...]] = {
    "stage_a": (Phase(500_000, 256, 128),),  # App. E.1
    "stage_b": (Phase(457_000, 512, 512), Phase(300_000, 128, 1024)),  # App. E.2
    "stage_c": (Phase(500_000, 1536, 512), Phase(364_000, 1536, 1024),  # App. E.3
                Phase(4_000, 768, 1024), Phase(50_000, 384, 1024)),
}
# A100 GPU-hours (paper Sec. 1, 4.3, Table 2), for the models they were reported for: the 0.99 B Stage C
# (our "release" config) and the 1.06 B Stage B ("paper")
REPORTED_GPU_HOURS = {("stage_c", "release"): 24_602, ("stage_b", "paper"): 11_000}
REPORTED_GPU = "A100"

# dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; fp16 for V100, which has no bf16)
PEAK_TFLOPS: dict[str, float] = {
    "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "GH200": 989.0, "B200": 2250.0,
    "A100": 312.0, "A10G": 125.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0, "V100": 125.0, "RTX 4090": 165.0,
}


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    """(device name, peak bf16 FLOP/s) — None where the device is not in the table (CPUs)."""
    if device.type != "cuda":
        return "CPU", None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # ordered: "H100 PCIe" before "H100"
        if key in name:
            return name, tflops * 1e12
    return name, None


def mfu(achieved_flops_per_s: float | None, device: torch.device) -> float | None:
    peak = peak_flops(device)[1]
    return achieved_flops_per_s / peak if achieved_flops_per_s and peak else None


def _seconds_per_sample(target: Target, px: int, rows: list[dict]) -> tuple[float, str, dict] | None:
    train = [r for r in rows if r["module"] == target.kind and r["config"] == target.config and r["mode"] == "train"]
    if not train:
        return None
    at_px = [r for r in train if r["px"] == px]
    if at_px:
        best = max(at_px, key=lambda r: r["items_per_s"])
        return 1 / best["items_per_s"], "measured", {"px": px, "batch": best["batch"]}
    ref = max(train, key=lambda r: (r["px"], r["batch"]))
    if not ref.get("achieved_flops_per_s"):
        return None
    return train_flops(target, px, 1) / ref["achieved_flops_per_s"], "projected", {"px": ref["px"], "batch": ref["batch"]}


def schedule_cost(target: Target, rows: list[dict], device: torch.device) -> dict | None:
    """Device-hours of the paper's schedule for this module, its total FLOPs and the implied MFU of the paper's run."""
    phases = SCHEDULE.get(target.kind)
    if phases is None:
        return None
    total_flops = sum(p.iterations * p.batch * train_flops(target, p.px, 1) for p in phases)
    out = {"module": target.kind, "size": target.size, "config": target.config,
           "phases": [vars(p) for p in phases], "total_train_flops": total_flops,
           "a100_hours_at_peak": total_flops / (PEAK_TFLOPS["A100"] * 1e12) / 3600,
           "reported_gpu_hours": REPORTED_GPU_HOURS.get((target.kind, target.config)), "reported_gpu": REPORTED_GPU}
    if out["reported_gpu_hours"]:
        out["paper_implied_mfu"] = out["a100_hours_at_peak"] / out["reported_gpu_hours"]
    seconds, methods, bases = 0.0, set(), []
    for p in phases:
        per_sample = _seconds_per_sample(target, p.px, rows)
        if per_sample is None:
            seconds = None
            break
        s, method, basis = per_sample
        seconds += p.iterations * p.batch * s
        methods.add(method)
        bases.append({**basis, "phase_px": p.px, "method": method})
    if seconds is not None:
        name, _ = peak_flops(device)
        out.update(device=name, device_hours=seconds / 3600,
                   method="measured" if methods == {"measured"} else "projected" if methods == {"projected"} else "mixed",
                   basis=bases)
    return out
