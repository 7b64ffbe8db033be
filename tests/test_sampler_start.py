"""Samplers that start at an intermediate time t = s (SDEdit, the img2img of the pipeline): the time
lists, unchanged results at the default, and exact continuation on a Gaussian toy."""
import math

import pytest
import torch

import diffusion as d
from tests.test_diffusion import GaussianToy


def test_start_cuts_the_time_lists():
    assert torch.equal(d.sampling_times(10, None), d.sampling_times(10))
    assert torch.equal(d.sampling_times(10, 1.0), d.sampling_times(10))  # full strength: the same list
    assert torch.allclose(d.sampling_times(10, 0.6), torch.linspace(0.6, 0.0, 7))  # round(10 * 0.6) steps
    assert d.sampling_times(3, 0.1).tolist() == pytest.approx([0.1, 0.0])  # at least one step
    times = d.sampling_times([1.0, 0.8, 0.5, 0.2, 0.0], 0.5)
    assert times.tolist() == pytest.approx([0.5, 0.2, 0.0])  # the listed times below s, after s itself
    named = d.sampling_times("wuerstchen_prior", 0.5)
    assert named[0].item() == pytest.approx(0.5) and bool((named[1:] < 0.5).all()) and named[-1].item() == 0
    for bad in (0.0, -0.2, 1.5, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match=r"start time .* in \(0, 1\]"):
            d.sampling_times(10, bad)


@pytest.mark.parametrize("name", sorted(d.SAMPLERS))
def test_default_start_leaves_every_sampler_bit_identical(name):
    toy = GaussianToy()
    x = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    runs = [d.sample(name, toy, x, 12, generator=torch.Generator().manual_seed(3), **extra)
            for extra in ({}, {"start": None}, {"start": 1.0})]
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])


def _start_from(value: float, s: float, n: int, seed: int = 0):
    toy, gen = GaussianToy(), torch.Generator().manual_seed(seed)
    x0 = torch.full((n, 1, 1, 1), value)
    x_s = toy.schedule.add_noise(x0, torch.full((n,), s), torch.randn(x0.shape, generator=gen))
    ab = float(toy.schedule.alpha_bar(torch.tensor(s), torch.float64))
    return toy, gen, x_s, ab


@pytest.mark.parametrize("s", [0.3, 0.6, 0.9])
def test_ddpm_from_s_samples_the_posterior_of_the_noised_value(s):
    """x_s = sqrt(ab) v + sqrt(1 - ab) eps, then ancestral DDPM from s: x_0 ~ p(x_0 | x_s). Over eps the
    outputs have mean mu + k (v - mu), k = ab std^2 / D, D = ab std^2 + 1 - ab, and variance
    std^2 (1 - ab) / D (the posterior's) + (sqrt(ab) std^2 / D)^2 (1 - ab) (the spread of its mean)."""
    mu, std, v = 0.5, 0.3, 1.4
    toy, gen, x_s, ab = _start_from(v, s, 8000)
    out = d.sample("ddpm", toy, x_s, round(200 / s), generator=gen, start=s)  # 200 steps from s
    denom = ab * std ** 2 + 1 - ab
    k = ab * std ** 2 / denom
    posterior_var = std ** 2 * (1 - ab) / denom
    spread_of_the_mean = (math.sqrt(ab) * std ** 2 / denom) ** 2 * (1 - ab)  # E[x0|x_s] varies with eps
    assert out.mean().item() == pytest.approx(mu + k * (v - mu), abs=0.01)
    assert out.var().item() == pytest.approx(posterior_var + spread_of_the_mean, rel=0.05)


@pytest.mark.parametrize("s", [0.3, 0.6])
def test_deterministic_samplers_from_s_follow_the_probability_flow(s):
    """DDIM (eta 0) and DPM-Solver++(2M) from x_s follow the ODE, linear here:
    x_0 = mu + std / sqrt(ab std^2 + 1 - ab) (x_s - sqrt(ab) mu)."""
    mu, std, v = 0.5, 0.3, 1.4
    toy, _, x_s, ab = _start_from(v, s, 16)
    expected = mu + std / math.sqrt(ab * std ** 2 + 1 - ab) * (x_s - math.sqrt(ab) * mu)
    for name in ("ddim", "dpmpp_2m"):
        out = d.sample(name, toy, x_s, 400, start=s)
        assert torch.allclose(out, expected, atol=5e-3), name
