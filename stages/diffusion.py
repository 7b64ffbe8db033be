"""The diffusion process shared by Stage B, Stage C and the pixel decoder, separate from the networks.

Continuous time ``t`` in [0, 1] (1 = pure noise), the cosine schedule of Nichol & Dhariwal as
used by Würstchen (SPEC "Stage C: Diffusion"), eps-prediction through the A/B output heads, the
p2 loss weight, classifier-free guidance and the DDPM sampler. Every function works on batches:
``t`` has shape ``(B,)``.

The pixel decoder adds two things (SPEC "Greedy-grown pixel decoder", "Related techniques"):
a ``shift`` of the schedule's log signal-to-noise ratio, logSNR(t) + shift with
shift = 2 log(base / d) for images of side d (``logsnr_shift``; the shifted cosine of simple
diffusion), and the sigmoid loss weight of SiD2, sigmoid(b - logSNR). ``shift=0`` (the default
everywhere) is exactly the unshifted schedule.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

COSINE_OFFSET = 0.008  # s in the cosine schedule
ALPHA_BAR_RANGE = (1e-4, 0.9999)


def alpha_bar(t: torch.Tensor, s: float = COSINE_OFFSET, shift: float = 0.0) -> torch.Tensor:
    """Cosine schedule: cos^2(((t+s)/(1+s)) pi/2) / cos^2((s/(1+s)) pi/2), clamped to [1e-4, 0.9999].

    ``shift`` moves its logSNR: alpha_bar = sigmoid(logit(alpha_bar) + shift) (0: unchanged).
    """
    return _alpha_bar64(t, s, shift).float()


def _alpha_bar64(t: torch.Tensor, s: float = COSINE_OFFSET, shift: float = 0.0) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=torch.float64)
    ab = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    ab = ab.clamp(*ALPHA_BAR_RANGE)
    return torch.sigmoid(torch.logit(ab) + shift) if shift else ab


def logsnr(t: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """log(alpha_bar / (1 - alpha_bar)) of the (shifted) cosine schedule (computed in float64)."""
    return torch.logit(_alpha_bar64(t, shift=shift)).float()


def logsnr_shift(base: int, resolution: int) -> float:
    """2 log(base / d): the shift for images of side d = ``resolution`` when ``base`` had shift 0 (negative above)."""
    if base <= 0 or resolution <= 0:
        raise ValueError(f"resolutions must be positive, got base {base} and {resolution}")
    return 2 * math.log(base / resolution)


def _expand(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *[1] * (like.dim() - 1))


def add_noise(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """Forward process q(x_t | x_0): sqrt(ab) x0 + sqrt(1 - ab) noise."""
    ab = _expand(alpha_bar(t, shift=shift), x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """eps of a v prediction (v = sqrt(ab) eps - sqrt(1 - ab) x0, Salimans & Ho 2022): sqrt(1 - ab) x_t + sqrt(ab) v.

    Near t = 1 eps is then x_t up to a small correction, so a network error costs little in x0: with
    a direct eps output it is amplified by sqrt((1 - ab) / ab) (100x at t = 1), which few-step
    samplers of pixel-space models do not survive.
    """
    ab = _expand(alpha_bar(t, shift=shift), x_t)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v


WEIGHT_FORMS = ("paper", "release", "none", "sigmoid", "v")


def p2_weight(t: torch.Tensor, form: str = "paper", shift: float = 0.0, bias: float = 0.0) -> torch.Tensor:
    """Loss weight per sample on the eps-MSE.

    ``paper`` (1 - ab) / (1 + ab) (Würstchen Sec. 4), ``release`` (1 + SNR)^-1, ``none`` 1 (plain
    eps-MSE), ``sigmoid`` sigmoid(bias - logSNR) (SiD2 Sec. 2.1; bias ~0 at 128 px, about 1.5 lower per
    doubling of resolution), ``v`` 1 / ab (the v-MSE of a v prediction: eps error = sqrt(ab) v error). With t ~ U(0, 1) the schedule's own density over logSNR multiplies
    every form (SiD2's -dlambda/dt factor, which would cancel it, is not applied).
    """
    ab = alpha_bar(t, shift=shift)
    if form == "paper":
        return (1 - ab) / (1 + ab)
    if form == "release":
        return 1 / (1 + ab / (1 - ab))
    if form == "none":
        return torch.ones_like(ab)
    if form == "sigmoid":
        return torch.sigmoid(bias - logsnr(t, shift))
    if form == "v":
        return 1 / ab
    raise ValueError(f"p2 weight form (the loss weight) must be one of {list(WEIGHT_FORMS)}, got {form!r}")


def eps_loss(eps: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, form: str = "paper",
             shift: float = 0.0, bias: float = 0.0) -> torch.Tensor:
    """Per-sample MSE between predicted and true noise, times the loss weight (``p2_weight``)."""
    per_sample = (eps.float() - noise.float()).pow(2).flatten(1).mean(1)
    return (per_sample * p2_weight(t, form, shift, bias).to(per_sample)).mean()


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
              noise: torch.Tensor | None, shift: float = 0.0) -> torch.Tensor:
    """One ancestral DDPM step from t to t_prev (SPEC): mu + sigma * noise, no noise where t_prev = 0."""
    ab, ab_prev = _expand(alpha_bar(t, shift=shift), x), _expand(alpha_bar(t_prev, shift=shift), x)
    alpha = ab / ab_prev
    mu = (x - (1 - alpha) * eps / (1 - ab).sqrt()) / alpha.sqrt()
    if noise is None:
        return mu
    sigma = ((1 - alpha) * (1 - ab_prev) / (1 - ab)).sqrt()
    return mu + sigma * noise * _expand((t_prev > 0).float(), x)


EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t of shape (B,)) -> eps


@torch.no_grad()
def ddpm_sample(eps_fn: EpsFn, noise: torch.Tensor, steps: int | Sequence[float],
                generator: torch.Generator | None = None, progress: bool | str = False,
                shift: float = 0.0) -> torch.Tensor:
    """Run the DDPM sampler from ``noise`` (x at t = 1) to x_0; ``progress`` may name the bar.

    ``shift``: the logSNR shift of the schedule the model was trained with (0 for Stages B and C).
    """
    times = sampling_times(steps).to(noise.device)
    x = noise
    pairs = list(zip(times[:-1], times[1:]))
    bar = tqdm(pairs, desc=progress if isinstance(progress, str) else "sampling", disable=not progress, leave=False)
    for t, t_prev in bar:
        tb, tpb = t.expand(x.shape[0]), t_prev.expand(x.shape[0])
        eps = eps_fn(x, tb).to(x.dtype)
        z = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device,
                        dtype=x.dtype).to(x.device)
        x = ddpm_step(x, eps, tb, tpb, z, shift)
    return x
