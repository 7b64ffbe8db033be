"""The diffusion layer: the cosine schedule (paper Sec. 3.2), parameterisations, loss weights, the
Denoiser and guidance, and every sampler on a Gaussian toy with a closed-form denoiser."""
import math

import pytest
import torch

import diffusion as d
from diffusion.parameterisations import AbsAB, Eps, SigmoidAB, V, X0, eps_from_x0, x0_from_eps
from diffusion.schedules import expand


def test_cosine_schedule_values_and_clamp():
    s, sched = 0.008, d.CosineSchedule()
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    expected = [min(max(math.cos((x + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2,
                        1e-4), 0.9999) for x in t.tolist()]
    assert torch.allclose(sched.alpha_bar(t), torch.tensor(expected), atol=1e-6)
    assert sched.alpha_bar(torch.tensor([0.0])).item() == pytest.approx(0.9999)
    assert sched.alpha_bar(torch.tensor([1.0])).item() == pytest.approx(1e-4)
    assert bool((sched.alpha_bar(torch.linspace(0, 1, 50)).diff() <= 0).all())  # decreasing in t


def test_logsnr_shift_of_the_schedule():
    t = torch.linspace(0, 1, 11)
    plain, shift = d.CosineSchedule(), d.logsnr_shift(32, 128)
    shifted = d.CosineSchedule(shift=shift)
    assert torch.equal(d.CosineSchedule(shift=0.0).alpha_bar(t), plain.alpha_bar(t))
    assert shift == pytest.approx(2 * math.log(32 / 128)) and d.logsnr_shift(64, 64) == 0.0
    assert torch.allclose(shifted.logsnr(t), plain.logsnr(t) + shift, atol=1e-4)
    ab = plain.alpha_bar(t).double()
    assert torch.allclose(shifted.alpha_bar(t).double(), torch.sigmoid(torch.log(ab / (1 - ab)) + shift), atol=1e-6)
    assert bool((shifted.alpha_bar(t) < plain.alpha_bar(t)).all())  # higher resolution: noisier at every t
    with pytest.raises(ValueError, match="positive"):
        d.logsnr_shift(0, 64)


def test_forward_noising_and_description_round_trip():
    sched = d.CosineSchedule(shift=-1.0)
    x0, noise, t = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5), torch.tensor([0.1, 0.5, 0.9])
    ab = sched.alpha_bar(t).view(-1, 1, 1, 1)
    assert torch.allclose(sched.add_noise(x0, t, noise), ab.sqrt() * x0 + (1 - ab).sqrt() * noise, atol=1e-6)
    assert d.schedule_from(sched.describe()) == sched
    with pytest.raises(ValueError, match="unknown noise schedule"):
        d.schedule_from({"name": "linear"})


def test_parameterisations_map_heads_to_the_true_noise():
    sched = d.CosineSchedule()
    x0, noise, t = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3), torch.tensor([0.02, 0.5, 1.0])
    ab = expand(sched.alpha_bar(t), x0)
    x_t = sched.add_noise(x0, t, noise)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert torch.allclose(V().eps(x_t, v, ab), noise, atol=1e-5)
    assert torch.allclose(X0().eps(x_t, x0, ab), noise, atol=1e-3)
    assert torch.equal(Eps().eps(x_t, noise, ab), noise)
    assert torch.allclose(x0_from_eps(x_t, eps_from_x0(x_t, x0, ab), ab), x0, atol=1e-3)
    a, b = torch.randn(3, 4, 3, 3), torch.randn(3, 4, 3, 3)  # the released A/B heads
    assert torch.allclose(SigmoidAB().eps(x_t, (a, b), ab), (x_t - a) / (torch.sigmoid(b) * (1 - 2e-3) + 1e-3))
    assert torch.allclose(AbsAB().eps(x_t, (a, b), ab), (x_t - a) / ((1 - b).abs() + 1e-5))
    with pytest.raises(ValueError, match="unknown parameterisation"):
        d.parameterisation("score")


def test_loss_weights():
    sched, t = d.CosineSchedule(), torch.tensor([0.05, 0.5, 0.95])
    ab = sched.alpha_bar(t)
    weights = {name: d.Denoiser(torch.nn.Identity(), "eps", sched, name, sigmoid_bias=-1.0).weight(t)
               for name in d.LOSS_WEIGHTS}
    assert torch.allclose(weights["paper_p2"], (1 - ab) / (1 + ab))  # paper Sec. 3.2
    assert torch.allclose(weights["p2"], 1 / (1 + ab / (1 - ab)))  # released code: (1 + SNR)^-1
    assert torch.equal(weights["constant"], torch.ones(3))
    assert torch.allclose(weights["sigmoid"], torch.sigmoid(-1.0 - sched.logsnr(t)))  # SiD2
    assert bool((weights["sigmoid"].diff() > 0).all())  # decreasing in logSNR
    assert torch.allclose(weights["v_mse"], 1 / ab)
    assert d.check_loss_weight("paper_p2") == "paper_p2"
    for name in ("edm", "paper"):
        with pytest.raises(ValueError, match="unknown loss weight"):
            d.check_loss_weight(name)


def test_denoiser_loss_is_the_weighted_eps_mse():
    net = torch.nn.Conv2d(4, 4, 1)
    den = d.Denoiser(lambda x, t: net(x), "eps", loss_weight="paper_p2")
    x0, noise, t = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2), torch.tensor([0.1, 0.5, 0.9])
    eps = net(den.schedule.add_noise(x0, t, noise))
    per_sample = ((eps - noise) ** 2).flatten(1).mean(1)
    assert torch.allclose(den.loss(x0, t, noise), (per_sample * den.weight(t)).mean())
    # a v head with the v-MSE weight: the same v error everywhere gives that error squared as loss
    v_den = d.Denoiser(lambda x, t: v_true(x0, noise, t, den.schedule) + 0.1, "v", loss_weight="v_mse")
    assert torch.allclose(v_den.loss(x0, t, noise), torch.tensor(0.01), rtol=1e-3)
    rebuilt = d.Denoiser.from_description(net, d.Denoiser(net, "v", d.CosineSchedule(shift=-2.0), "sigmoid", -1.5)
                                          .describe())
    assert rebuilt.describe() == {"schedule": {"name": "cosine", "s": 0.008, "shift": -2.0}, "parameterisation": "v",
                                  "loss_weight": "sigmoid", "sigmoid_bias": -1.5}


def v_true(x0, noise, t, schedule):
    ab = expand(schedule.alpha_bar(t), x0)
    return ab.sqrt() * noise - (1 - ab).sqrt() * x0


def test_guidance_is_a_linear_mix_and_skips_the_second_call_at_one():
    calls = []

    def net(x, t, c):
        calls.append(c)
        return x * c

    den, x, t = d.Denoiser(net, "eps"), torch.randn(2, 3), torch.rand(2)
    assert torch.allclose(d.Guided(den, (2.0,), (0.5,), 4.0)(x, t), 0.5 * x + 4 * (2 * x - 0.5 * x))
    calls.clear()
    assert torch.equal(d.Guided(den, (2.0,), (0.5,), 1.0)(x, t), 2 * x) and calls == [2.0]
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            d.Guided(den, (2.0,), (0.5,), bad)


class GaussianToy:
    """The exact eps of data x0 ~ N(mu, std^2): E[x0 | x_t] = mu + a std^2 / (a^2 std^2 + s^2) (x_t - a mu)."""

    schedule = d.CosineSchedule()

    def __init__(self, mu: float = 0.5, std: float = 0.3):
        self.mu, self.std = mu, std

    def __call__(self, x, t):
        ab = expand(self.schedule.alpha_bar(t, torch.float64), x)
        a, xd = ab.sqrt(), x.double()
        mean = self.mu + a * self.std ** 2 / (ab * self.std ** 2 + 1 - ab) * (xd - a * self.mu)
        return ((xd - a * mean) / (1 - ab).sqrt()).to(x.dtype)


@pytest.mark.parametrize("name", sorted(d.SAMPLERS))
def test_every_sampler_reaches_the_toy_data_mean_and_variance(name):
    toy, gen = GaussianToy(), torch.Generator().manual_seed(0)
    out = d.sample(name, toy, torch.randn(4000, 2, 1, 1, generator=gen), 200, generator=gen)
    assert out.mean().item() == pytest.approx(0.5, abs=0.01)
    assert out.std().item() == pytest.approx(0.3, rel=0.03)
    assert d.sample(name, toy, torch.randn(4000, 2, 1, 1, generator=gen), 2, generator=gen).std().item() != \
        pytest.approx(0.3, rel=0.03)  # two steps are not enough: the tolerance above is meaningful


def test_ddim_with_eta_one_is_ddpm():
    """DDIM's eta = 1 noise is the DDPM posterior's; both draw their noise in the same order, so with the
    same seed the trajectories agree up to rounding (and so do their distributions)."""
    toy = GaussianToy()
    noise = torch.randn(500, 2, 1, 1, generator=torch.Generator().manual_seed(1))
    ddpm = d.sample("ddpm", toy, noise, 12, generator=torch.Generator().manual_seed(2))
    ddim = d.sample("ddim", toy, noise, 12, generator=torch.Generator().manual_seed(2), eta=1.0)
    assert torch.allclose(ddpm, ddim, atol=1e-4)
    deterministic = d.sample("ddim", toy, noise, 12, generator=torch.Generator().manual_seed(2), eta=0.0)
    assert not torch.allclose(ddpm, deterministic, atol=1e-2)


def test_ddpm_step_formula_matches_the_released_scheduler():
    """Step by step, our DDPM equals diffusers' DDPMWuerstchenScheduler (the released pipelines' sampler)
    for the same eps, noise and timesteps, the prior pipeline's explicit list included."""
    from diffusers import DDPMWuerstchenScheduler

    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(timesteps=d.TIME_LISTS["wuerstchen_prior"])
    den, x = GaussianToy(), torch.randn(2, 4, 3, 3)
    ours = d.sample("ddpm", den, x, "wuerstchen_prior", generator=torch.Generator().manual_seed(5))
    ref, gen = x.clone(), torch.Generator().manual_seed(5)
    with torch.no_grad():
        for t in scheduler.timesteps[:-1]:
            tb = t.expand(2).float()
            ref = scheduler.step(den(ref, tb), tb, ref, generator=gen).prev_sample
    assert torch.allclose(ours, ref, atol=1e-5)


def test_explicit_and_named_time_lists_are_honoured():
    seen = []
    toy = GaussianToy()
    for name in d.SAMPLERS:
        seen.clear()
        d.sample(name, toy, torch.randn(2, 1, 1, 1), [1.0, 0.7, 0.2, 0.0], callback=lambda s: seen.append(s["t"]))
        assert seen == pytest.approx([1.0, 0.7, 0.2])
    assert d.sampling_times("wuerstchen_prior").numel() == 30  # 29 steps, as the released prior pipeline
    assert torch.allclose(d.sampling_times(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))


def test_bad_samplers_steps_and_eta_are_named():
    toy, x = GaussianToy(), torch.randn(2, 1, 1, 1)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of"):
        d.sample("euler", toy, x, 4)
    for eta in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="eta must be between 0"):
            d.sample("ddim", toy, x, 4, eta=eta)
    with pytest.raises(ValueError, match="the ddpm sampler takes no eta"):
        d.sample("ddpm", toy, x, 4, eta=0.5)
    for bad in (0, -3):
        with pytest.raises(ValueError, match="at least 1"):
            d.sampling_times(bad)
    for bad in ([1.0, 0.5], [0.5, 0.7, 0.0], [1.5, 0.0], [1.0, math.nan, 0.0]):
        with pytest.raises(ValueError, match="explicit timesteps"):
            d.sampling_times(bad)
    with pytest.raises(ValueError, match="unknown time list"):
        d.sampling_times("release")


def test_seeded_sampling_is_reproducible():
    toy = GaussianToy()
    for name in d.SAMPLERS:
        a = d.sample(name, toy, torch.ones(1, 2, 2, 2), 5, generator=torch.Generator().manual_seed(3))
        b = d.sample(name, toy, torch.ones(1, 2, 2, 2), 5, generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_the_layer_imports_torch_only_and_the_networks_never_import_it():
    import pathlib
    import re

    root = pathlib.Path(d.__file__).parent
    for f in root.glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import) (\w+)", f.read_text(), re.M)
        assert set(imports) <= {"__future__", "torch", "diffusion", "math", "inspect", "collections", "dataclasses",
                                "tqdm"}, f
    for net in ("stage_a", "stage_b", "stage_c", "pixel_decoder", "blocks"):
        assert "diffusion" not in re.findall(r"^\s*(?:from|import) (\w+)", (root.parent / "stages" / f"{net}.py")
                                             .read_text(), re.M)


@pytest.mark.parametrize("name", sorted(d.SAMPLERS))
def test_keep_known_ends_every_sampler_on_the_known_entries_and_leaves_the_others(name):
    toy, gen = GaussianToy(), torch.Generator().manual_seed(0)
    noise = torch.randn(4000, 2, 1, 1, generator=gen)
    known = torch.full((1, 2, 1, 1), 2.0)
    keep = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)  # channel 0 held to 2, channel 1 sampled
    out = d.sample(name, d.KeepKnown(toy, known, keep), noise, 200, generator=torch.Generator().manual_seed(1))
    # held to 2 up to the noise every sampler leaves at t = 0 (sqrt(1 - ab(0)), about 0.01)
    assert out[:, 0].mean().item() == pytest.approx(2.0, abs=1e-3) and out[:, 0].std().item() < 0.02
    assert out[:, 1].mean().item() == pytest.approx(0.5, abs=0.02)  # the toy data's mean, as without
    assert out[:, 1].std().item() == pytest.approx(0.3, rel=0.04)
