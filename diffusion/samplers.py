"""Samplers: pure functions from noise at t = 1 (or a noised sample at t = times[0] < 1) to a sample at
t = 0, all with one signature

    sampler(denoiser, x, times, *, generator=None, callback=None, progress=False, **options) -> x_0

``denoiser(x_t, t) -> eps`` (a ``Denoiser`` or ``Guided``) with a ``schedule``; ``times`` a
decreasing 1-D tensor from at most 1 to 0 (``sampling_times``). ``callback({"i", "steps", "t", "x", "x0"})``
sees every step (step ``i`` of ``steps``, the sample ``x`` at time ``t`` and the model's prediction
``x0`` of the clean sample from it). To add a sampler, write one such function below and decorate it with ``@register``:
``sample``, the command-line flags and the sweep find it by name.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from diffusion.parameterisations import x0_from_eps
from diffusion.schedules import expand

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {}

# explicit time lists of the released pipelines: the Würstchen/Stable Cascade prior pipeline's
# DEFAULT_STAGE_C_TIMESTEPS, 20 times from 1 to 2/3 and 10 more to 0 (29 steps)
TIME_LISTS: dict[str, list[float]] = {
    "wuerstchen_prior": [1 - i * (1 / 3) / 19 for i in range(20)] + [(2 / 3) * (1 - i / 10) for i in range(1, 11)],
}


def register(sampler: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    SAMPLERS[sampler.__name__] = sampler
    return sampler


def sampling_times(steps: int | str | Sequence[float], start: float | None = None) -> torch.Tensor:
    """``steps`` equal steps from t = 1 to 0 (``steps + 1`` times), a named list (``TIME_LISTS``), or an
    explicit decreasing list of times from at most 1 to exactly 0.

    ``start`` in (0, 1]: begin at t = ``start`` instead (SDEdit, Meng et al. 2022: a sample noised to
    ``start`` is denoised from there). A step count keeps its step length, ``max(1, round(steps *
    start))`` equal steps from ``start`` to 0; a list keeps its times below ``start``, after ``start``
    itself. None (the default) is the list unchanged.
    """
    if start is not None:
        return _from(sampling_times(steps), steps, start)
    if isinstance(steps, str):
        if steps not in TIME_LISTS:
            raise ValueError(f"unknown time list {steps!r}; give a step count, explicit times or one of "
                             f"{sorted(TIME_LISTS)}")
        steps = TIME_LISTS[steps]
    if isinstance(steps, bool) or not isinstance(steps, (int, Sequence, torch.Tensor)):
        raise ValueError(f"sampling steps must be a count, a named time list or explicit times, got {steps!r}")
    if isinstance(steps, int):
        if steps < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
        return torch.linspace(1.0, 0.0, steps + 1)
    times = torch.tensor([float(x) for x in steps])
    if (times.numel() < 2 or not bool(times.isfinite().all()) or not bool((times[1:] < times[:-1]).all())
            or times[0] > 1 or times[-1] != 0):
        raise ValueError(f"explicit timesteps must decrease from at most 1 to exactly 0, got {list(steps)}")
    return times


def check_start(start: float) -> float:
    """A start time in (0, 1], or a clear error."""
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0.0 < start <= 1.0:
        raise ValueError(f"the start time (img2img strength) must be a number in (0, 1], got {start!r}")
    return float(start)


def _from(times: torch.Tensor, steps, start: float) -> torch.Tensor:
    start = check_start(start)
    if isinstance(steps, int) and not isinstance(steps, bool):
        return torch.linspace(start, 0.0, max(1, round(steps * start)) + 1)
    return torch.cat([torch.tensor([start]), times[times < start]])


def takes_eta(name: str) -> bool:
    return "eta" in inspect.signature(SAMPLERS[name]).parameters


def check_sampler(name: str, eta: float | None = None) -> dict:
    """The options for sampler ``name`` (``{"eta": ...}`` where it takes one), or a clear error."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}")
    if eta is None:
        return {}
    if not takes_eta(name):
        raise ValueError(f"the {name} sampler takes no eta; eta applies to {sorted(filter(takes_eta, SAMPLERS))}")
    if not (isinstance(eta, (int, float)) and 0.0 <= eta <= 1.0):
        raise ValueError(f"eta must be between 0 (deterministic) and 1 (fully stochastic), got {eta}")
    return {"eta": float(eta)}


@torch.no_grad()
def sample(sampler: str, denoiser, noise: torch.Tensor, steps: int | str | Sequence[float], *,
           generator: torch.Generator | None = None, callback: Callable[[dict], None] | None = None,
           progress: bool | str = False, eta: float | None = None, start: float | None = None) -> torch.Tensor:
    """Run sampler ``sampler`` (a name in ``SAMPLERS``) from ``noise`` over ``steps``; checks come first.

    ``start``: ``noise`` is the sample at t = ``start`` (e.g. ``schedule.add_noise(x0, start, eps)``)
    and sampling runs from there (``sampling_times``); None starts from pure noise at t = 1.
    """
    options = check_sampler(sampler, eta)
    times = sampling_times(steps, start).to(noise.device)
    return SAMPLERS[sampler](denoiser, noise, times, generator=generator, callback=callback, progress=progress,
                             **options)


def _steps(times: torch.Tensor, progress: bool | str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    pairs = list(zip(times[:-1], times[1:]))
    bar = tqdm(pairs, desc=progress if isinstance(progress, str) else "sampling", disable=not progress, leave=False)
    for i, (t, t_prev) in enumerate(bar):
        yield i, t, t_prev


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise like ``x``, drawn on the generator's device (same draws on every device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _ab(schedule, t: torch.Tensor) -> float:
    return float(schedule.alpha_bar(t, torch.float64))


def _report(callback, i, times, x, x0):
    if callback is not None:
        callback({"i": i, "steps": len(times) - 1, "t": float(times[i]), "x": x, "x0": x0})


@register
@torch.no_grad()
def ddpm(denoiser, x, times, *, generator=None, callback=None, progress=False):
    """Ancestral DDPM (Ho et al. 2020) on continuous t, as the released ``DDPMWuerstchenScheduler``:
    alpha = ab_t / ab_prev, mu = (x - (1 - alpha) eps / sqrt(1 - ab_t)) / sqrt(alpha),
    sigma = sqrt((1 - alpha)(1 - ab_prev) / (1 - ab_t)); no noise on the last step."""
    schedule, b = denoiser.schedule, x.shape[0]
    for i, t, t_prev in _steps(times, progress):
        tb, tpb = t.expand(b), t_prev.expand(b)
        eps = denoiser(x, tb).to(x.dtype)
        z = _noise(x, generator)
        ab, ab_prev = expand(schedule.alpha_bar(tb), x), expand(schedule.alpha_bar(tpb), x)
        alpha = ab / ab_prev
        mu = (x - (1 - alpha) * eps / (1 - ab).sqrt()) / alpha.sqrt()
        sigma = ((1 - alpha) * (1 - ab_prev) / (1 - ab)).sqrt()
        if callback is not None:
            _report(callback, i, times, x, x0_from_eps(x, eps, ab))
        x = mu + sigma * z * expand((tpb > 0).float(), x)
    return x


@register
@torch.no_grad()
def ddim(denoiser, x, times, *, generator=None, callback=None, progress=False, eta=0.0):
    """DDIM (Song et al. 2021, eq. 12): x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - s^2) eps + s z,
    s = eta sqrt((1 - ab_prev) / (1 - ab) (1 - ab / ab_prev)). eta = 0 is deterministic; eta = 1 is
    the DDPM posterior (ancestral sampling). No noise on the last step."""
    b = x.shape[0]
    for i, t, t_prev in _steps(times, progress):
        ab, ab_prev = _ab(denoiser.schedule, t), _ab(denoiser.schedule, t_prev)
        eps = denoiser(x, t.expand(b)).to(x.dtype)
        x0 = x0_from_eps(x, eps, torch.tensor(ab, dtype=x.dtype))
        _report(callback, i, times, x, x0)
        s = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
        x = math.sqrt(ab_prev) * x0 + math.sqrt(max(1 - ab_prev - s * s, 0.0)) * eps
        if t_prev > 0 and s > 0:
            x = x + s * _noise(x, generator)
    return x


def _lambda(ab: float) -> float:
    """Half the log signal-to-noise ratio, log(alpha / sigma), DPM-Solver's time variable."""
    return 0.5 * math.log(ab / (1 - ab))


@register
@torch.no_grad()
def dpmpp_2m(denoiser, x, times, *, generator=None, callback=None, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), multistep second order in data prediction:
    x_next = (sigma_next / sigma) x + alpha_next (1 - e^-h) D, h = lambda_next - lambda, with
    D = x0 on the first step and (1 + 1/2r) x0 - (1/2r) x0_prev after (r = h_prev / h): exactly
    ``dpmpp_2m_sde`` with eta = 0."""
    return dpmpp_2m_sde(denoiser, x, times, generator=generator, callback=callback, progress=progress, eta=0.0)


@register
@torch.no_grad()
def dpmpp_2m_sde(denoiser, x, times, *, generator=None, callback=None, progress=False, eta=1.0):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, Sec. 5; midpoint form of k-diffusion's sampler):
    x_next = (sigma_next / sigma) e^-eta*h x + alpha_next (1 - e^-(1+eta)h) (x0 + (x0 - x0_prev) / 2r)
    + sigma_next sqrt(1 - e^-2 eta*h) z. eta = 0 is the deterministic 2M. The first step, and one after
    a step of h = 0 (where the clamped schedule stands still), is first order; no noise on the last step."""
    b, x0_prev, h_prev = x.shape[0], None, 0.0
    for i, t, t_prev in _steps(times, progress):
        ab, ab_next = _ab(denoiser.schedule, t), _ab(denoiser.schedule, t_prev)
        eps = denoiser(x, t.expand(b)).to(x.dtype)
        x0 = x0_from_eps(x, eps, torch.tensor(ab, dtype=x.dtype))
        _report(callback, i, times, x, x0)
        h = _lambda(ab_next) - _lambda(ab)
        d = x0 if not h_prev else x0 + h / (2 * h_prev) * (x0 - x0_prev)
        x = (math.sqrt((1 - ab_next) / (1 - ab)) * math.exp(-eta * h) * x
             + math.sqrt(ab_next) * -math.expm1(-(1 + eta) * h) * d)
        if t_prev > 0 and eta > 0:
            x = x + math.sqrt(1 - ab_next) * math.sqrt(-math.expm1(-2 * eta * h)) * _noise(x, generator)
        x0_prev, h_prev = x0, h
    return x
