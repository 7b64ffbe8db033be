"""The learning-rate schedule of the configs: linear warm-up, then constant or cosine down to ``final``.

Named in YAML as ``lr_scheduler: {class_path: train.optim.WarmupCosine, init_args: {...}}``; any torch
scheduler can be named instead. The Lightning CLI steps it every optimizer step (``train.cli``).
"""
from __future__ import annotations

import math

import torch


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Factor min(1, (step + 1) / warmup_steps), times 1 (``total_steps`` None) or a cosine from 1 at step 0
    down to ``final`` at ``total_steps``."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0, total_steps: int | None = None,
                 final: float = 0.1, last_epoch: int = -1):
        if warmup_steps < 0 or (total_steps is not None and total_steps < 1):
            raise ValueError(f"lr_scheduler: warmup_steps must be >= 0 and total_steps >= 1, got {warmup_steps} and "
                             f"{total_steps}")

        def factor(step: int) -> float:
            warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
            if total_steps is None:
                return warm
            return warm * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps))))

        super().__init__(optimizer, factor, last_epoch)
