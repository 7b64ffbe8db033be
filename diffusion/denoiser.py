"""The Denoiser: a network with its schedule, parameterisation and loss weight (k-diffusion's
``Denoiser``, StableCascade's ``gdf``), and classifier-free guidance written once (``Guided``).

Samplers see only ``denoiser(x_t, t) -> eps`` and ``denoiser.schedule``; training sees
``denoiser.loss(x_0, t, noise, *conditions)``. The networks return raw heads and never import this.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from diffusion.parameterisations import Parameterisation, eps_from_x0, parameterisation
from diffusion.schedules import CosineSchedule, expand, schedule_from


def paper_p2(t: torch.Tensor, schedule: CosineSchedule, bias: float) -> torch.Tensor:
    """(1 - ab) / (1 + ab): the weight Würstchen's paper calls p2 (Sec. 3.2)."""
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


class AdaptiveLossWeight:
    """Stable Cascade's adaptive loss weight (``gdf.AdaptiveLossWeight``): logSNR is cut into ``buckets``
    bins (edges evenly over ``logsnr_range``), each keeps an EMA (``beta``) of the unweighted per-sample
    loss seen in it, and a sample weighs 1 / its bin's EMA, clamped to ``weight_range``: every noise
    level contributes about equally. The EMAs are training state: ``state_dict`` / ``load_state_dict``
    (kept in checkpoints so a resumed run weighs as the interrupted one would have)."""

    def __init__(self, logsnr_range: tuple[float, float] = (-10.0, 10.0), buckets: int = 300,
                 weight_range: tuple[float, float] = (1e-7, 1e7), beta: float = 0.99):
        self.edges = torch.linspace(logsnr_range[0], logsnr_range[1], buckets - 1, dtype=torch.float64)
        self.losses = torch.ones(buckets, dtype=torch.float64)
        self.weight_range, self.beta = weight_range, beta

    def _bins(self, logsnr: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.edges, logsnr.detach().double().cpu())

    def weight(self, logsnr: torch.Tensor) -> torch.Tensor:
        return (1 / self.losses[self._bins(logsnr)]).clamp(*self.weight_range).float().to(logsnr.device)

    @torch.no_grad()
    def update(self, logsnr: torch.Tensor, loss: torch.Tensor) -> None:
        """Move each sample's bin EMA towards its loss (as released: one write per bin, the last sample's)."""
        bins = self._bins(logsnr)
        self.losses[bins] = self.losses[bins] * self.beta + loss.detach().double().cpu() * (1 - self.beta)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"edges": self.edges.clone(), "losses": self.losses.clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state["losses"].shape != self.losses.shape:
            raise ValueError(f"adaptive loss weight state has {state['losses'].numel()} buckets, this run "
                             f"{self.losses.numel()}; resume with the same buckets")
        self.edges, self.losses = state["edges"].double().clone(), state["losses"].double().clone()


LOSS_WEIGHTS = {f.__name__: f for f in (paper_p2, p2, constant, sigmoid, v_mse)}
ADAPTIVE = "adaptive"  # the stateful AdaptiveLossWeight, held by the Denoiser


def check_loss_weight(name: str) -> str:
    """``name`` when it is a registered loss weight, or a clear error."""
    if name not in LOSS_WEIGHTS and name != ADAPTIVE:
        raise ValueError(f"unknown loss weight {name!r}; choose one of {sorted([*LOSS_WEIGHTS, ADAPTIVE])}")
    return name


class Denoiser:
    """``network(x_t, t, *conditions) -> head``, read through ``parameterisation`` on ``schedule``.

    A plain wrapper, not a module: the network keeps its own parameters, device and state dict.
    """

    def __init__(self, network: nn.Module, parameterisation: Parameterisation | str,
                 schedule: CosineSchedule | None = None, loss_weight: str = "constant", sigmoid_bias: float = 0.0,
                 time_input: str = "t", adaptive: AdaptiveLossWeight | None = None):
        self.network = network
        self.parameterisation = _parameterisation(parameterisation)
        self.schedule = schedule if schedule is not None else CosineSchedule()
        self.loss_weight, self.sigmoid_bias = check_loss_weight(loss_weight), sigmoid_bias
        if time_input not in TIME_INPUTS:
            raise ValueError(f"unknown time input {time_input!r}; choose one of {sorted(TIME_INPUTS)}")
        self.time_input = time_input
        if adaptive is not None and self.loss_weight != ADAPTIVE:
            raise ValueError(f"an adaptive loss weight state was given with loss_weight {loss_weight!r}; "
                             "use 'adaptive'")
        self.adaptive = (adaptive if adaptive is not None else AdaptiveLossWeight()) if self.loss_weight == ADAPTIVE \
            else None

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
            head = self.network(x.to(dtype), self.network_time(t), *map(cast, conditions))
            head = tuple(h.to(x.dtype) for h in head) if isinstance(head, tuple) else head.to(x.dtype)
        else:
            head = self.network(x, self.network_time(t), *conditions)
        return self.parameterisation.eps(x, head, expand(self.schedule.alpha_bar(t), x))

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network is given for ``t`` (``time_input``)."""
        return TIME_INPUTS[self.time_input](t, self.schedule)

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        if self.adaptive is not None:
            return self.adaptive.weight(self.schedule.logsnr(t))
        return LOSS_WEIGHTS[self.loss_weight](t, self.schedule, self.sigmoid_bias)

    def loss(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, *conditions) -> torch.Tensor:
        """The weighted eps-MSE at times ``t`` with ``noise`` (mean over the batch). With the adaptive weight
        and a network in training mode, the per-sample losses then update its bucket EMAs."""
        eps = self(self.schedule.add_noise(x0, t, noise), t, *conditions)
        per_sample = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
        loss = (per_sample * self.weight(t).to(per_sample)).mean()
        if self.adaptive is not None and getattr(self.network, "training", False):
            self.adaptive.update(self.schedule.logsnr(t), per_sample)
        return loss

    def describe(self) -> dict:
        """What an export records so that a loader rebuilds this denoiser (``Denoiser.from_description``)."""
        return {"schedule": self.schedule.describe(), "parameterisation": self.parameterisation.name,
                "loss_weight": self.loss_weight, "sigmoid_bias": self.sigmoid_bias,
                **({"time_input": self.time_input} if self.time_input != "t" else {})}

    @classmethod
    def from_description(cls, network: nn.Module, description: dict) -> Denoiser:
        return cls(network, description["parameterisation"], schedule_from(description.get("schedule", {})),
                   description.get("loss_weight", "constant"), description.get("sigmoid_bias", 0.0),
                   description.get("time_input", "t"))


# what the network is given as its time: t itself (Würstchen v2, diffusers' Stable Cascade pipelines), or
# the unshifted cosine time recovered from the (shifted, clamped) logSNR (Stable Cascade's gdf)
TIME_INPUTS = {"t": lambda t, schedule: t,
               "cosine_t": lambda t, schedule: schedule.cosine_t(t).to(t.device, t.dtype)}


def _parameterisation(p: Parameterisation | str) -> Parameterisation:
    return parameterisation(p) if isinstance(p, str) else p


def rescaled_guidance(eps: torch.Tensor, guided: torch.Tensor, rho: float) -> torch.Tensor:
    """Std-rescaled CFG (Stable Cascade's ``cfg_rho``; Lin et al. 2024, Sec. 3.4): the guided prediction scaled
    to the conditional one's standard deviation, mixed in with weight ``rho``. The std is taken per sample
    (the release takes it over the whole batch: the same for one image)."""
    if not rho:
        return guided
    dims = tuple(range(1, eps.dim()))
    ratio = eps.std(dim=dims, keepdim=True) / (guided.std(dim=dims, keepdim=True) + 1e-9)
    return rho * guided * ratio + (1 - rho) * guided


class Guided:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w (eps_c - eps_u), optionally std-rescaled
    (``rescale``, see ``rescaled_guidance``).

    ``conditions`` and ``unconditional`` are the extra arguments of the two network calls; w = 1 is
    the conditional model alone (one call a step).
    """

    def __init__(self, denoiser: Denoiser, conditions: tuple, unconditional: tuple, scale: float,
                 rescale: float = 0.0):
        if not math.isfinite(scale):
            raise ValueError(f"the guidance scale must be a finite number, got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"the guidance rescale must be in [0, 1], got {rescale}")
        self.denoiser, self.conditions, self.unconditional, self.scale = denoiser, conditions, unconditional, scale
        self.rescale = rescale
        self.schedule = denoiser.schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.denoiser(x, t, *self.conditions)
        if self.scale == 1.0:
            return eps
        uncond = self.denoiser(x, t, *self.unconditional)
        return rescaled_guidance(eps, uncond + self.scale * (eps - uncond), self.rescale)


class KeepKnown:
    """Inpainting by replacement (Song et al. 2021, "Score-Based Generative Modeling through SDEs", Sec. 5 and
    App. I.2, imputation): where ``keep`` is 1 the prediction of the clean sample is the known ``x0``, so that
    every sampler moves those entries toward it and ends on it; elsewhere ``model``'s prediction. ``model``:
    ``(x_t, t) -> eps`` with a ``schedule`` (a ``Denoiser`` or ``Guided``); ``x0``: the known sample
    (B or 1, ...); ``keep``: 0/1, broadcastable to it."""

    def __init__(self, model, x0: torch.Tensor, keep: torch.Tensor):
        self.model, self.x0, self.keep = model, x0, keep.bool()
        self.schedule = model.schedule

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = self.model(x, t)
        known = eps_from_x0(x, self.x0.to(x), expand(self.schedule.alpha_bar(t), x))
        return torch.where(self.keep.to(x.device), known.to(eps.dtype), eps)
