"""Stable Cascade sampling: our v3 prior and decoder loops against diffusers' StableCascadePriorPipeline and
StableCascadeDecoderPipeline (random weights, the same conditions and noise), and the released defaults."""
import pytest
import torch

import diffusion
from pipeline.cascade import RELEASE, cascade_denoiser
from stages.stable_cascade import StageB3, StageC3
from tests.test_stable_cascade import B_CONFIG, C_CONFIG, diffusers_twin, randomised

pipelines = pytest.importorskip("diffusers.pipelines.stable_cascade")


def close(got: torch.Tensor, expected: torch.Tensor) -> bool:
    return bool((got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item()))


class EmbedsGiven(torch.nn.Module):
    """Stands in for the pipelines' text encoder: every embedding is passed in, only its dtype and device are read."""

    dtype, device = torch.float32, torch.device("cpu")


def small_random(network, config):
    """Random weights at a scale where 20 guided steps stay finite and far from zero."""
    model = randomised(network(config))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.25)
    return model


def test_prior_loop_equals_the_stable_cascade_prior_pipeline():
    from diffusers import DDPMWuerstchenScheduler

    model = small_random(StageC3, C_CONFIG)
    pipe = pipelines.StableCascadePriorPipeline(tokenizer=None, text_encoder=EmbedsGiven(), prior=diffusers_twin(model),
                                                scheduler=DDPMWuerstchenScheduler())
    text, pooled = torch.randn(2, 7, 20), torch.randn(2, 1, 12)
    negative, negative_pooled = torch.randn(2, 7, 20), torch.randn(2, 1, 12)
    image = torch.randn(1, 1, 10)  # the pipeline repeats one image embedding for every prompt
    noise = torch.randn(2, 16, 3, 5)
    theirs = pipe(prompt_embeds=text, prompt_embeds_pooled=pooled, negative_prompt_embeds=negative,
                  negative_prompt_embeds_pooled=negative_pooled, image_embeds=image, height=128, width=213,
                  num_inference_steps=20, guidance_scale=4.0, latents=noise.clone(),
                  generator=torch.Generator().manual_seed(3), output_type="pt").image_embeddings
    image = image.expand(2, 1, 10)
    guided = diffusion.Guided(cascade_denoiser(model, shift=1.0, time_input="t"), (text, pooled, image),
                              (negative, negative_pooled, torch.zeros_like(image)), 4.0)
    ours = diffusion.sample("ddpm", guided, noise, 20, generator=torch.Generator().manual_seed(3))
    assert ours.abs().max() > 0.1 and close(ours, theirs)


def test_decoder_loop_equals_the_stable_cascade_decoder_pipeline():
    from diffusers import DDPMWuerstchenScheduler

    model = small_random(StageB3, B_CONFIG)
    pipe = pipelines.StableCascadeDecoderPipeline(decoder=diffusers_twin(model), tokenizer=None,
                                                  text_encoder=EmbedsGiven(), scheduler=DDPMWuerstchenScheduler(),
                                                  vqgan=None)
    semantic, pooled, negative_pooled = torch.randn(2, 16, 3, 4), torch.randn(2, 1, 12), torch.randn(2, 1, 12)
    noise = torch.randn(2, 4, 32, 42)  # the pipeline's grid: int(3 * 10.67) x int(4 * 10.67)
    theirs = pipe(semantic, prompt_embeds=torch.zeros(2, 1, 12), prompt_embeds_pooled=pooled,
                  negative_prompt_embeds=torch.zeros(2, 1, 12), negative_prompt_embeds_pooled=negative_pooled,
                  num_inference_steps=10, guidance_scale=1.1, latents=noise.clone(),
                  generator=torch.Generator().manual_seed(5), output_type="latent").images
    guided = diffusion.Guided(cascade_denoiser(model, shift=1.0, time_input="t"), (semantic, pooled),
                              (torch.zeros_like(semantic), negative_pooled), 1.1)
    ours = diffusion.sample("ddpm", guided, noise, 10, generator=torch.Generator().manual_seed(5))
    assert ours.abs().max() > 0.1 and close(ours, theirs)


def test_released_defaults_shift_the_prior_and_rescale_guidance():
    assert RELEASE == {"prior": {"steps": 20, "guidance": 4.0, "shift": 2.0, "rescale": 0.7},
                       "decoder": {"steps": 10, "guidance": 1.1, "shift": 1.0, "rescale": 0.7}}
    model = StageC3("tiny")
    shifted, plain = cascade_denoiser(model, 2.0), cascade_denoiser(model, 1.0)
    t = torch.tensor([0.5])
    assert shifted.schedule.alpha_bar(t) < plain.schedule.alpha_bar(t)  # shift 2: noisier at the same t
    assert shifted.network_time(t) > 0.5 and torch.allclose(plain.network_time(t), t, atol=1e-5)
