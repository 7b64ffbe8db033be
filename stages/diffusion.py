"""The diffusion process shared by Stage B and Stage C, separate from the networks (SPEC "Stage C: Diffusion").

Continuous time ``t`` in [0, 1] (1 = pure noise), the cosine schedule of Nichol & Dhariwal as
used by Würstchen, eps-prediction through the A/B output heads, the p2 loss weight, classifier-free
guidance and the DDPM sampler. Every function works on batches: ``t`` has shape ``(B,)``.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

COSINE_OFFSET = 0.008  # s in the cosine schedule
ALPHA_BAR_RANGE = (1e-4, 0.9999)


def alpha_bar(t: torch.Tensor, s: float = COSINE_OFFSET) -> torch.Tensor:
    """Cosine schedule: cos^2(((t+s)/(1+s)) pi/2) / cos^2((s/(1+s)) pi/2), clamped to [1e-4, 0.9999]."""
    t = torch.as_tensor(t, dtype=torch.float64)
    ab = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    return ab.clamp(*ALPHA_BAR_RANGE).float()


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): sqrt(ab) x0 + sqrt(1 - ab) noise."""
    ab = _expand(alpha_bar(t), x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def p2_weight(t: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Loss weight per sample: ``paper`` (1 - ab) / (1 + ab) (Sec. 4), ``release`` (1 + SNR)^-1, ``none`` 1."""
    ab = alpha_bar(t)
    if form == "paper":
        return (1 - ab) / (1 + ab)
    if form == "release":
        return 1 / (1 + ab / (1 - ab))
    if form == "none":
        return torch.ones_like(ab)
    raise ValueError(f"p2 weight form must be 'paper', 'release' or 'none', got {form!r}")


def eps_loss(eps: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, form: str = "paper") -> torch.Tensor:
    """Training loss of Stages B and C: per-sample MSE between predicted and true noise, times the p2 weight."""
    per_sample = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
    return (per_sample * p2_weight(t, form).to(per_sample)).mean()


def eps_from_sigmoid_ab(x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, margin: float = 1e-3) -> torch.Tensor:
    """Stage B's A/B head: b = sigmoid(b) (1 - 2 margin) + margin; eps = (x_t - a) / b."""
    return (x_t - a) / (b.sigmoid() * (1 - 2 * margin) + margin)


def eps_from_abs_ab(x_t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Stage C's A/B head: eps = (x_t - A) / (|1 - B| + 1e-5)."""
    return (x_t - a) / ((1 - b).abs() + 1e-5)


def guide(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond); w = 1 is the plain conditional model."""
    return eps_uncond + scale * (eps_cond - eps_uncond)


def sampling_times(steps: int | Sequence[float]) -> torch.Tensor:
    """``steps`` equal steps from t = 1 to 0 (``steps + 1`` times), or an explicit decreasing list ending in 0."""
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
        return torch.linspace(1.0, 0.0, steps + 1)
    times = torch.tensor([float(x) for x in steps])
    if times.numel() < 2 or not bool((times[1:] < times[:-1]).all()) or times[0] > 1 or times[-1] != 0:
        raise ValueError(f"explicit timesteps must decrease from at most 1 to exactly 0, got {list(steps)}")
    return times


def ddpm_step(x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One ancestral DDPM step from t to t_prev (SPEC): mu + sigma * noise, no noise where t_prev = 0."""
    ab, ab_prev = _expand(alpha_bar(t), x), _expand(alpha_bar(t_prev), x)
    alpha = ab / ab_prev
    mu = (x - (1 - alpha) * eps / (1 - ab).sqrt()) / alpha.sqrt()
    if noise is None:
        return mu
    sigma = ((1 - alpha) * (1 - ab_prev) / (1 - ab)).sqrt()
    return mu + sigma * noise * _expand((t_prev > 0).float(), x)


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t of shape (B,)) -> eps


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, noise: torch.Tensor, steps: int | Sequence[float],
                generator: torch.Generator | None = None, progress: bool | str = False) -> torch.Tensor:
    """Run the DDPM sampler from ``noise`` (x at t = 1) to x_0; ``progress`` may name the bar."""
    times = sampling_times(steps).to(noise.device)
    x = noise
    pairs = list(zip(times[:-1], times[1:]))
    bar = tqdm(pairs, desc=progress if isinstance(progress, str) else "sampling", disable=not progress, leave=False)
    for t, t_prev in bar:
        tb, tpb = t.expand(x.shape[0]), t_prev.expand(x.shape[0])
        eps = eps_fn(x, tb).to(x.dtype)
        z = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                        dtype=x.dtype).to(x.device)
        x = ddpm_step(x, eps, tb, tpb, z)
    return x
