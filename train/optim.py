"""The learning-rate schedule every stage uses: linear warm-up, then constant or cosine down to 10%."""
from __future__ import annotations

import math

import torch


def with_schedule(opt: torch.optim.Optimizer, warmup_steps: int, schedule: str, max_steps: int) -> dict:
    """Lightning's ``configure_optimizers`` return value: ``opt`` with a per-step LambdaLR."""
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {schedule!r}")
    total = max(1, max_steps)

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        if schedule == "constant" or max_steps < 0:
            return warm
        return warm * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, step / total))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
