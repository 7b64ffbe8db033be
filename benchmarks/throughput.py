"""Per-module cost: parameters and FLOPs (counted on the meta device), inference and training-step
throughput, and peak memory, at a given image size and batch (paper Sec. 4.2 "efficiency").

A training step is forward + backward + AdamW on the network alone with random inputs (no data
loading, no frozen encoders), under the same autocast dtype as inference.
"""
from __future__ import annotations

import gc

import torch
from torch import nn

from benchmarks.measure import autocast, compiled, count_flops, count_parameters, peak_memory, time_call
from benchmarks.targets import Target


_META: dict[tuple[str, str], nn.Module] = {}


def meta_module(target: Target) -> nn.Module:
    """The target's module on the meta device (shapes only), built once."""
    key = (target.kind, target.config)
    if key not in _META:
        _META[key] = target.build("meta")
    return _META[key]


def parameters(target: Target) -> int:
    return count_parameters(meta_module(target))


def forward_flops(target: Target, px: int, batch: int = 1) -> int:
    """FLOPs of one inference forward at ``px`` (counted on the meta device, nothing allocated)."""
    model = meta_module(target).eval()
    device = next(model.parameters()).device
    args = target.inputs(batch, px, device)
    with torch.no_grad():
        return count_flops(lambda: target.forward(model, args))


def train_flops(target: Target, px: int, batch: int = 1) -> int | None:
    """FLOPs of forward + backward (the optimizer's element-wise work is not counted); None if frozen."""
    if target.loss is None:
        return None
    model = meta_module(target).train()
    device = next(model.parameters()).device
    args = target.inputs(batch, px, device)
    return count_flops(lambda: target.loss(model, args).backward())


def measure(target: Target, model: nn.Module, device: torch.device, dtype: torch.dtype, px: int, batch: int,
            train: bool, compile: bool = False, repeats: int = 3, warmup: int = 1, budget_s: float | None = None,
            optimizer: torch.optim.Optimizer | None = None) -> dict:
    """One row: median seconds per call, items/s, FLOPs, achieved FLOP/s and peak memory."""
    args = target.inputs(batch, px, device)
    if train:
        model.train()
        loss_fn = compiled(lambda: target.loss(model, args), compile)

        def call() -> None:
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, dtype):
                loss = loss_fn()
            loss.backward()
            optimizer.step()
        flops = train_flops(target, px, batch)
    else:
        model.eval()
        fwd = compiled(lambda: target.forward(model, args), compile)

        def call() -> None:
            with torch.no_grad(), autocast(device, dtype):
                fwd()
        flops = forward_flops(target, px, batch)
    timing = time_call(call, device, warmup=warmup, repeats=repeats, budget_s=budget_s)
    with peak_memory(device) as mem:
        call()
    return {
        "module": target.kind, "size": target.size, "config": target.config, "mode": "train" if train else "inference",
        "px": px, "batch": batch, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "compile": compile, **timing.to_dict(), "items_per_s": batch / timing.median, "flops": flops,
        "achieved_flops_per_s": flops / timing.median if flops else None,
        "peak_memory_bytes": mem.get("peak_bytes"), "memory_method": mem.get("method"),
    }


def run_target(target: Target, device: torch.device, dtype: torch.dtype, px: int, batches: list[int],
               modes: tuple[str, ...] = ("inference", "train"), compile: bool = False, repeats: int = 3,
               budget_s: float | None = None, notes: list[str] | None = None) -> list[dict]:
    """Rows for each mode ("inference", "train": only if the module trains) and batch size.

    A batch that runs out of device memory ends its mode (larger ones would too) with a line in ``notes``
    instead of ending the whole run.
    """
    model = target.build(str(device) if device.type != "cpu" else "cpu")
    rows = []
    for mode in modes:
        if mode == "train" and target.loss is None:
            continue
        optimizer = None
        if mode == "train":
            fused = {"fused": True} if device.type == "cuda" else {}
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, **fused)
        for b in batches:
            try:
                rows.append(measure(target, model, device, dtype, px, b, mode == "train", compile, repeats,
                                    budget_s=budget_s, optimizer=optimizer))
            except torch.OutOfMemoryError:
                if notes is not None:
                    notes.append(f"{target.name} {mode} at {px} px: batch {b} ran out of device memory; "
                                 f"larger batches skipped.")
                break
        model.zero_grad(set_to_none=True)
        del optimizer
        _free(device)
    del model
    _free(device)
    return rows


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
