"""Measuring one callable: wall time (warm-up, device sync, median), FLOPs, peak memory, parameters.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention;
a multiply-add counts as 2 FLOPs; element-wise ops are not counted). It also runs on the meta
device, so paper-size models are counted at 1024 px without allocating memory.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the call (tensors only). On CPU
PyTorch keeps no allocator statistics, so a dispatch mode counts the bytes of every tensor the
call creates while it is alive and keeps the peak: the same quantity without the allocator's
cache, and it works on the meta device too (paper sizes at 1024 px without allocating).
"""
from __future__ import annotations

import math

import gc
import statistics
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                        _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A convolution's backward: the forward's FLOPs once for the input gradient, once for the weights'.

    Replaces torch's formula, which counts a grouped (e.g. depthwise) convolution's backward as if
    it were dense (``groups`` times too many FLOPs: 66x the forward for a 64-channel depthwise conv).
    """
    spatial = x_shape if transposed else grad_out_shape  # the side that sees every weight once
    forward = 2 * math.prod(spatial) * w_shape[1] * math.prod(w_shape[2:])
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward, or forward + backward when ``fn`` calls backward)."""
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: conv_backward_flops}) as counter:
        fn()
    return int(counter.get_total_flops())


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Seconds per call: the median and all repeats (after ``warmup`` discarded calls)."""

    median: float
    times: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "min_s": min(self.times), "max_s": max(self.times), "repeats": len(self.times)}


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 1, repeats: int = 3,
              budget_s: float | None = None) -> Timing:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` calls, with device sync.

    ``budget_s`` stops repeating early once that much time has gone (at least one timed call).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
        if budget_s is not None and time.perf_counter() - start_all > budget_s:
            break
    return Timing(statistics.median(times), times)


def time_alternating(fns: dict[str, Callable[[], object]], device: torch.device, warmup: int = 1,
                     repeats: int = 3) -> dict[str, Timing]:
    """Time several callables in turn (A B A B ...) so that drifting machine load hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i in range(repeats):
        order = list(fns.items()) if i % 2 == 0 else list(reversed(fns.items()))
        for name, fn in order:
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(t), t) for name, t in times.items()}


class _LiveTensors(TorchDispatchMode):
    """Counts the bytes of tensors created inside the block while they are alive; keeps the peak.

    Views and in-place results share memory with a tensor already counted and are skipped.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._ids: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self._ids.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not t._is_view() and id(t) not in self._ids:
                nbytes = t.untyped_storage().nbytes()
                self._ids.add(id(t))
                self.live += nbytes
                weakref.finalize(t, self._release, id(t), nbytes)
        self.peak = max(self.peak, self.live)
        return out


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict]:
    """Yields a dict that holds ``peak_bytes`` (and ``method``) after the block.

    CUDA: the allocator's ``max_memory_allocated`` minus what was allocated before. Elsewhere
    (CPU, meta) PyTorch keeps no allocator statistics, so every tensor an op creates is counted
    while it lives (the same quantity: peak bytes of tensors created during the call; the
    allocator's caching and fragmentation are not included).
    """
    out: dict = {}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out.update(peak_bytes=torch.cuda.max_memory_allocated(device) - base, method="cuda max_memory_allocated")
        return
    tracker = _LiveTensors()
    with tracker:
        yield out
    out.update(peak_bytes=tracker.peak, method="peak bytes of live tensors created in the call (dispatch tracking)")


def autocast(device: torch.device, dtype: torch.dtype):
    """bf16/fp16 autocast on the device, or a no-op context for float32."""
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def compiled(fn: Callable, enabled: bool = True) -> Callable:
    """``torch.compile(fn)`` with static shapes and dynamo's caches cleared first.

    Every measurement then compiles its own graph (during its warm-up call): sharing the cache across
    measurements would hit dynamo's recompile limit (and fall back to eager) or switch to dynamic shapes.
    """
    if not enabled:
        return fn
    torch._dynamo.reset()
    return torch.compile(fn, dynamic=False)

