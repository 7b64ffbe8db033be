"""Stable Cascade's process pieces (``gdf``): the shift factor with its re-clamp, the cosine time input,
std-rescaled guidance, the adaptive loss weight and its state, pyramid noise."""
import math

import pytest
import torch

import diffusion as d

LOGSNR_LIMITS = (math.log(1e-4 / (1 - 1e-4)), math.log(0.9999 / 0.0001))


def gdf_logsnr(t: torch.Tensor, factor: float, s: float = 0.008) -> torch.Tensor:
    """gdf's CosineSchedule(clamp_range=[1e-4, 0.9999]) at shift ``factor``, written out independently."""
    t = t.double()
    var = torch.cos((s + t) / (1 + s) * math.pi / 2).clamp(0, 1) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    logsnr = (var.clamp(1e-4, 0.9999) / (1 - var.clamp(1e-4, 0.9999))).log() + 2 * math.log(1 / factor)
    return logsnr.clamp(*LOGSNR_LIMITS)


def gdf_cosine_t(logsnr: torch.Tensor, s: float = 0.008) -> torch.Tensor:
    min_var = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return ((logsnr.sigmoid() * min_var).sqrt().acos() / (math.pi / 2) * (1 + s) - s).clamp(0, 1)


def test_shift_factor_and_reclamp_match_gdf():
    t = torch.linspace(0, 1, 41)
    assert d.shift_from_factor(1) == 0 and d.shift_from_factor(2) == pytest.approx(-2 * math.log(2))
    for factor in (1, 2, 4):
        schedule = d.CosineSchedule(shift=d.shift_from_factor(factor), clamp_shifted=True)
        assert torch.allclose(schedule.logsnr(t).double(), gdf_logsnr(t, factor), atol=1e-5)
    unclamped = d.CosineSchedule(shift=d.shift_from_factor(2))
    assert unclamped.logsnr(torch.tensor([1.0])) < LOGSNR_LIMITS[0] - 1  # the re-clamp is what differs
    with pytest.raises(ValueError, match="positive"):
        d.shift_from_factor(0)
    assert d.schedule_from(d.CosineSchedule(shift=-1.0, clamp_shifted=True).describe()).clamp_shifted


def test_cosine_time_input_is_gdfs_noise_condition():
    t = torch.linspace(0, 1, 41)
    plain = d.CosineSchedule()
    mid = (t > 0.05) & (t < 0.95)
    assert torch.allclose(plain.cosine_t(t)[mid], t[mid], atol=1e-5)  # where ab is not clamped: t itself
    shifted = d.CosineSchedule(shift=d.shift_from_factor(2), clamp_shifted=True)
    assert torch.allclose(shifted.cosine_t(t).double(), gdf_cosine_t(gdf_logsnr(t, 2)), atol=1e-5)
    seen = []
    denoiser = d.Denoiser(lambda x, r: seen.append(r) or torch.zeros_like(x), "eps", shifted, time_input="cosine_t")
    denoiser(torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 0.5]))
    assert torch.allclose(seen[0], shifted.cosine_t(torch.tensor([1.0, 0.5])))
    assert seen[0][1] > 0.5  # shift 2: the network sees a noisier time than t
    assert d.Denoiser.from_description(None, denoiser.describe()).time_input == "cosine_t"
    with pytest.raises(ValueError, match="unknown time input"):
        d.Denoiser(None, "eps", time_input="sigma")


def test_rescaled_guidance():
    eps, guided = torch.randn(3, 4, 5, 5), 3 * torch.randn(3, 4, 5, 5) + 1
    assert torch.equal(d.rescaled_guidance(eps, guided, 0.0), guided)
    full = d.rescaled_guidance(eps, guided, 1.0)
    assert torch.allclose(full.flatten(1).std(1), eps.flatten(1).std(1), atol=1e-5)
    mixed = d.rescaled_guidance(eps, guided, 0.7)
    assert torch.allclose(mixed, 0.7 * full + 0.3 * guided, atol=1e-6)
    calls = {"cond": torch.randn(2, 4, 3, 3), "uncond": torch.randn(2, 4, 3, 3)}
    denoiser = d.Denoiser(lambda x, t, which: calls[which], "eps")
    out = d.Guided(denoiser, ("cond",), ("uncond",), 4.0, rescale=0.7)(torch.zeros(2, 4, 3, 3), torch.rand(2))
    plain = torch.lerp(calls["uncond"], calls["cond"], 4.0)
    assert torch.allclose(out, d.rescaled_guidance(calls["cond"], plain, 0.7), atol=1e-6)
    with pytest.raises(ValueError, match="rescale"):
        d.Guided(denoiser, (), (), 2.0, rescale=1.5)


def test_adaptive_loss_weight_learns_per_bucket_and_its_state_resumes():
    weight = d.AdaptiveLossWeight(buckets=300)
    logsnr = torch.tensor([-5.0, 0.0, 5.0])
    assert torch.equal(weight.weight(logsnr), torch.ones(3))
    weight.update(torch.tensor([0.0]), torch.tensor([3.0]))
    assert weight.weight(logsnr)[1] == pytest.approx(1 / (0.99 + 0.03))
    assert weight.weight(logsnr)[0] == 1 and weight.weight(logsnr)[2] == 1  # other buckets untouched
    resumed = d.AdaptiveLossWeight(buckets=300)
    resumed.load_state_dict(weight.state_dict())
    assert torch.equal(resumed.weight(logsnr), weight.weight(logsnr))
    with pytest.raises(ValueError, match="buckets"):
        d.AdaptiveLossWeight(buckets=10).load_state_dict(weight.state_dict())

    class Net(torch.nn.Conv2d):
        def forward(self, x, t):
            return super().forward(x)

    net = Net(2, 2, 1)
    denoiser = d.Denoiser(net, "eps", loss_weight="adaptive")
    x0, t, noise = torch.randn(4, 2, 3, 3), torch.rand(4), torch.randn(4, 2, 3, 3)
    net.eval()
    denoiser.loss(x0, t, noise)
    assert torch.equal(denoiser.adaptive.losses, torch.ones(300, dtype=torch.float64))  # eval: no update
    net.train()
    first = denoiser.loss(x0, t, noise)
    assert not torch.equal(denoiser.adaptive.losses, torch.ones(300, dtype=torch.float64))
    assert torch.isfinite(first) and d.check_loss_weight("adaptive") == "adaptive"
    with pytest.raises(ValueError, match="adaptive"):
        d.Denoiser(net, "eps", loss_weight="p2", adaptive=d.AdaptiveLossWeight())


def test_pyramid_noise():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(8, 4, 32, 48, generator=gen)
    noise = d.pyramid_noise(base, torch.Generator().manual_seed(1))
    assert noise.shape == base.shape
    assert torch.equal(noise, d.pyramid_noise(base, torch.Generator().manual_seed(1)))  # the generator decides
    assert noise.std().item() == pytest.approx(1.0, abs=0.05)  # rescaled to unit variance
    neighbours = lambda x: torch.corrcoef(torch.stack([x[..., :-1].flatten(), x[..., 1:].flatten()]))[0, 1]  # noqa: E731
    assert neighbours(base).abs() < 0.05 and neighbours(noise) > 0.2  # low frequencies added
    assert torch.equal(d.pyramid_noise(base, size_range=(100, 200)), base)  # no level in range: unchanged
