"""The shared diffusion process against the formulas of SPEC (cosine schedule, p2, A/B heads, DDPM, CFG)."""
import math

import pytest
import torch

from stages import diffusion as d


def test_cosine_schedule_values_and_clamp():
    s = 0.008
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    expected = [min(max(math.cos((x + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2,
                        1e-4), 0.9999) for x in t.tolist()]
    assert torch.allclose(d.alpha_bar(t), torch.tensor(expected), atol=1e-6)
    assert d.alpha_bar(torch.tensor([0.0])).item() == pytest.approx(0.9999)
    assert d.alpha_bar(torch.tensor([1.0])).item() == pytest.approx(1e-4)
    assert bool((d.alpha_bar(torch.linspace(0, 1, 50)).diff() <= 0).all())  # decreasing in t


def test_forward_noising():
    x0, noise, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.tensor([0.1, 0.5, 0.9])
    ab = d.alpha_bar(t).view(-1, 1, 1, 1)
    assert torch.allclose(d.add_noise(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-6)


def test_p2_weights():
    t = torch.tensor([0.2, 0.6])
    ab = d.alpha_bar(t)
    assert torch.allclose(d.p2_weight(t, "paper"), (1 - ab) / (1 + ab))
    snr = ab / (1 - ab)
    assert torch.allclose(d.p2_weight(t, "release"), 1 / (1 + snr))
    assert torch.equal(d.p2_weight(t, "none"), torch.ones(2))
    with pytest.raises(ValueError, match="p2 weight form"):
        d.p2_weight(t, "edm")


def test_ab_heads():
    x, a, b = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert torch.allclose(d.eps_from_sigmoid_ab(x, a, b), (x - a) / (torch.sigmoid(b) * (1 - 2e-3) + 1e-3))
    assert torch.allclose(d.eps_from_abs_ab(x, a, b), (x - a) / ((1 - b).abs() + 1e-5))


def test_guidance_is_a_linear_mix():
    c, u = torch.randn(5), torch.randn(5)
    assert torch.allclose(d.guide(c, u, 1.0), c)
    assert torch.allclose(d.guide(c, u, 0.0), u)
    assert torch.allclose(d.guide(c, u, 4.0), u + 4 * (c - u))


def test_ddpm_step_formula_and_last_step_without_noise():
    x, eps, z = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t, tp = torch.tensor([0.6, 0.6]), torch.tensor([0.4, 0.4])
    ab, abp = d.alpha_bar(t)[0], d.alpha_bar(tp)[0]
    alpha = ab / abp
    mu = (x - (1 - alpha) * eps / (1 - ab).sqrt()) / alpha.sqrt()
    sigma = ((1 - alpha) * (1 - abp) / (1 - ab)).sqrt()
    assert torch.allclose(d.ddpm_step(x, eps, t, tp, z), mu + sigma * z, atol=1e-5)
    last = d.ddpm_step(x, eps, torch.tensor([0.1, 0.1]), torch.zeros(2), z)
    assert torch.allclose(last, d.ddpm_step(x, eps, torch.tensor([0.1, 0.1]), torch.zeros(2), None))


def test_sampler_recovers_data_with_the_true_noise_predictor():
    """With the exact eps of a point mass at x0, DDPM sampling lands on x0."""
    x0 = torch.randn(2, 3, 4, 4)

    def eps_fn(x, t):
        ab = d.alpha_bar(t).view(-1, 1, 1, 1)
        return (x - ab.sqrt() * x0) / (1 - ab).sqrt()

    out = d.ddpm_sample(eps_fn, torch.randn(2, 3, 4, 4), 20, torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-2)  # residual noise: alpha_bar(0) is clamped to 0.9999


def test_sampling_times():
    assert torch.allclose(d.sampling_times(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert torch.equal(d.sampling_times([1.0, 0.5, 0.0]), torch.tensor([1.0, 0.5, 0.0]))
    for bad in (0, -3):
        with pytest.raises(ValueError, match="at least 1"):
            d.sampling_times(bad)
    for bad in ([1.0, 0.5], [0.5, 0.7, 0.0], [1.5, 0.0]):
        with pytest.raises(ValueError, match="explicit timesteps"):
            d.sampling_times(bad)


def test_seeded_sampling_is_reproducible():
    fn = lambda x, t: 0.1 * x  # noqa: E731
    a = d.ddpm_sample(fn, torch.ones(1, 2, 2, 2), 5, torch.Generator().manual_seed(3))
    b = d.ddpm_sample(fn, torch.ones(1, 2, 2, 2), 5, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_eps_loss_is_p2_weighted_mse():
    eps, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.1, 0.5, 0.9])
    per_sample = ((eps - noise) ** 2).flatten(1).mean(1)
    assert torch.allclose(d.eps_loss(eps, noise, t, "paper"), (per_sample * d.p2_weight(t, "paper")).mean())
