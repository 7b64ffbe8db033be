"""The Denoiser: a network with its schedule, parameterisation and loss weight (k-diffusion's
``Denoiser``, StableCascade's ``gdf``), and classifier-free guidance written once (``Guided``).

Samplers see only ``denoiser(x_t, t) -> eps`` and ``denoiser.schedule``; training sees
``denoiser.loss(x_0, t, noise, *conditions)``. The networks return raw heads and never import this.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from diffusion.parameterisations import Parameterisation, parameterisation
from diffusion.schedules import CosineSchedule, expand, schedule_from


def paper_p2(t: torch.Tensor, schedule: CosineSchedule, bias: float) -> torch.Tensor:
    """(1 - ab) / (1 + ab): the weight Würstchen's paper calls p2 (Sec. 3.3)."""
    ab = schedule.alpha_bar(t)
    return (1 - ab) / (1 + ab)


def p2(t: torch.Tensor, schedule: CosineSchedule, bias: float) -> torch.Tensor:
    """(1 + SNR)^-1 = 1 - ab: P2 weighting with k = 1, gamma = 1 (Choi et al. 2022), the released code's."""
    ab = schedule.alpha_bar(t)
    return 1 / (1 + ab / (1 - ab))


def constant(t: torch.Tensor, schedule: CosineSchedule, bias: float) -> torch.Tensor:
    """1: the plain eps-MSE."""
    return torch.ones_like(schedule.alpha_bar(t))


def sigmoid(t: torch.Tensor, schedule: CosineSchedule, bias: float) -> torch.Tensor:
    """sigmoid(bias - logSNR) (SiD2 Sec. 2.1; bias ~0 at 128 px, about 1.5 lower per doubling of side).

    With t ~ U(0, 1) the schedule's own density over logSNR multiplies it (SiD2's -dlambda/dt factor,
    which would cancel that, is not applied)."""
    return torch.sigmoid(bias - schedule.logsnr(t))


def v_mse(t: torch.Tensor, schedule: CosineSchedule, bias: float) -> torch.Tensor:
    """1 / ab: turns the eps-MSE into the v-MSE of a v head (eps error = sqrt(ab) v error)."""
    return 1 / schedule.alpha_bar(t)


LOSS_WEIGHTS = {f.__name__: f for f in (paper_p2, p2, constant, sigmoid, v_mse)}
# names earlier configs used
LOSS_WEIGHT_ALIASES = {"paper": "paper_p2", "release": "p2", "none": "constant", "v": "v_mse"}


def check_loss_weight(name: str) -> str:
    """The registered name of a loss weight (earlier aliases accepted), or a clear error."""
    name = LOSS_WEIGHT_ALIASES.get(name, name)
    if name not in LOSS_WEIGHTS:
        raise ValueError(f"unknown loss weight {name!r}; choose one of {sorted(LOSS_WEIGHTS)}")
    return name


class Denoiser:
    """``network(x_t, t, *conditions) -> head``, read through ``parameterisation`` on ``schedule``.

    A plain wrapper, not a module: the network keeps its own parameters, device and state dict.
    """

    def __init__(self, network: nn.Module, parameterisation: Parameterisation | str,
                 schedule: CosineSchedule | None = None, loss_weight: str = "constant", sigmoid_bias: float = 0.0):
        self.network = network
        self.parameterisation = _parameterisation(parameterisation)
        self.schedule = schedule if schedule is not None else CosineSchedule()
        self.loss_weight, self.sigmoid_bias = check_loss_weight(loss_weight), sigmoid_bias

    def __call__(self, x: torch.Tensor, t: torch.Tensor, *conditions) -> torch.Tensor:
        """The noise estimate eps of ``x`` at times ``t`` (B,).

        A network held in another floating dtype than ``x`` (bfloat16 or float16 weights, float32
        sampler state) gets ``x`` and the floating condition tensors in its dtype, and its head comes
        back in ``x``'s dtype: the sampler's arithmetic stays in the precision of ``x``.
        """
        weight = next(self.network.parameters(), None) if isinstance(self.network, nn.Module) else None
        dtype = weight.dtype if weight is not None else x.dtype
        if dtype != x.dtype and dtype.is_floating_point and x.is_floating_point():
            cast = lambda c: c.to(dtype) if isinstance(c, torch.Tensor) and c.is_floating_point() else c  # noqa: E731
            head = self.network(x.to(dtype), t, *map(cast, conditions))
            head = tuple(h.to(x.dtype) for h in head) if isinstance(head, tuple) else head.to(x.dtype)
        else:
            head = self.network(x, t, *conditions)
        return self.parameterisation.eps(x, head, expand(self.schedule.alpha_bar(t), x))

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        return LOSS_WEIGHTS[self.loss_weight](t, self.schedule, self.sigmoid_bias)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *conditions) -> torch.Tensor:
        """The weighted eps-MSE at times ``t`` with ``noise`` (mean over the batch)."""
        eps = self(self.schedule.add_noise(x0, t, noise), t, *conditions)
        per_sample = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
        return (per_sample * self.weight(t).to(per_sample)).mean()

    def describe(self) -> dict:
        """What an export records so that a loader rebuilds this denoiser (``Denoiser.from_description``)."""
        return {"schedule": self.schedule.describe(), "parameterisation": self.parameterisation.name,
                "loss_weight": self.loss_weight, "sigmoid_bias": self.sigmoid_bias}

    @classmethod
    def from_description(cls, network: nn.Module, description: dict) -> Denoiser:
        return cls(network, description["parameterisation"], schedule_from(description.get("schedule", {})),
                   description.get("loss_weight", "constant"), description.get("sigmoid_bias", 0.0))


def _parameterisation(p: Parameterisation | str) -> Parameterisation:
    return parameterisation(p) if isinstance(p, str) else p


class Guided:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u).

    ``conditions`` and ``unconditional`` are the extra arguments of the two network calls; w = 1 is
    the conditional model alone (one call a step).
    """

    def __init__(self, denoiser: Denoiser, conditions: tuple, unconditional: tuple, scale: float):
        if not math.isfinite(scale):
            raise ValueError(f"the guidance scale must be a finite number, got {scale}")
        self.denoiser, self.conditions, self.unconditional, self.scale = denoiser, conditions, unconditional, scale
        self.schedule = denoiser.schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.denoiser(x, t, *self.conditions)
        if self.scale == 1.0:
            return eps
        uncond = self.denoiser(x, t, *self.unconditional)
        return uncond + self.scale * (eps - uncond)
