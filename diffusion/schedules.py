"""Noise schedules on continuous time t in [0, 1] (1 = pure noise): x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps.

The cosine schedule of Nichol & Dhariwal as Würstchen uses it (paper Sec. 3.2; released
``DDPMWuerstchenScheduler``): ab(t) = cos^2(((t+s)/(1+s)) pi/2) / cos^2((s/(1+s)) pi/2), s = 0.008,
clamped to [1e-4, 0.9999]. ``shift`` moves its log signal-to-noise ratio, logSNR(t) + shift, the
shifted cosine of simple diffusion that the pixel decoder trains with (shift = 2 log(base / d)
for images of side d; SiD2 Sec. 2). ``shift = 0`` is exactly the unshifted schedule. Stable Cascade's
``gdf`` writes the same shift as a factor f (logSNR + 2 log(1/f), ``shift_from_factor``) and clamps the
shifted ab back into the unshifted range (``clamp_shifted``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

ALPHA_BAR_RANGE = (1e-4, 0.9999)


@dataclass(frozen=True)
class CosineSchedule:
    s: float = 0.008
    shift: float = 0.0
    clamp_shifted: bool = False  # clamp the shifted ab to ALPHA_BAR_RANGE again (Stable Cascade's gdf)

    def alpha_bar(self, t: torch.Tensor | float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ab(t), computed in float64 and returned as ``dtype``."""
        t = torch.as_tensor(t, dtype=torch.float64)
        s = self.s
        ab = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
        ab = ab.clamp(*ALPHA_BAR_RANGE)
        ab = torch.sigmoid(torch.logit(ab) + self.shift) if self.shift else ab
        ab = ab.clamp(*ALPHA_BAR_RANGE) if self.clamp_shifted else ab
        return ab.to(dtype)

    def cosine_t(self, t: torch.Tensor | float) -> torch.Tensor:
        """The time of the unshifted, unclamped cosine at which ab equals this schedule's ab(t), in [0, 1]:
        the network's time input in Stable Cascade (``gdf``'s ``CosineTNoiseCond`` of the logSNR)."""
        ab = self.alpha_bar(t, torch.float64)
        s = self.s
        c0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
        t_cos = torch.acos((ab * c0).clamp(0, 1).sqrt()) / (math.pi / 2) * (1 + s) - s
        return t_cos.clamp(0, 1).float()

    def logsnr(self, t: torch.Tensor | float) -> torch.Tensor:
        """log(ab / (1 - ab))."""
        return torch.logit(self.alpha_bar(t, torch.float64)).float()

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The forward process q(x_t | x_0) for a batch of times ``t`` (B,)."""
        ab = expand(self.alpha_bar(t), x0)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def describe(self) -> dict:
        """What an export records so that a loader rebuilds this schedule (``schedule_from``)."""
        fields = asdict(self)
        if not self.clamp_shifted:  # recorded only where set (Stable Cascade)
            del fields["clamp_shifted"]
        return {"name": "cosine", **fields}


SCHEDULES = {"cosine": CosineSchedule}


def schedule_from(description: dict) -> CosineSchedule:
    kind = description.get("name", "cosine")
    if kind not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {kind!r} (known: {sorted(SCHEDULES)})")
    return SCHEDULES[kind](**{k: v for k, v in description.items() if k != "name"})


def logsnr_shift(base: int, resolution: int) -> float:
    """2 log(base / d): the shift for images of side d = ``resolution`` when ``base`` had shift 0."""
    if base <= 0 or resolution <= 0:
        raise ValueError(f"resolutions must be positive, got base {base} and {resolution}")
    return 2 * math.log(base / resolution)


def shift_from_factor(factor: float) -> float:
    """Stable Cascade's shift factor f (``gdf``: logSNR + 2 log(1/f); 2 for its Stage C at inference) as our
    additive logSNR shift."""
    if not factor > 0:
        raise ValueError(f"a shift factor must be positive, got {factor}")
    return 2 * math.log(1 / factor)


def expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample value (B,) shaped to broadcast over ``like`` (B, ...)."""
    return v.to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))
