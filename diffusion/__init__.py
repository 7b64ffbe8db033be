"""The diffusion process as its own layer: schedules, parameterisations, the Denoiser with its loss
weights and classifier-free guidance, and the samplers. It imports torch only; the networks in
``stages`` never import it (they return raw heads)."""
from diffusion.denoiser import (LOSS_WEIGHTS, TIME_INPUTS, AdaptiveLossWeight, Denoiser, Guided, KeepKnown,
                                check_loss_weight, rescaled_guidance)
from diffusion.noise import pyramid_noise
from diffusion.parameterisations import PARAMETERISATIONS, parameterisation
from diffusion.samplers import (SAMPLERS, TIME_LISTS, check_sampler, check_start, register, sample, sampling_times,
                               takes_eta)
from diffusion.schedules import CosineSchedule, logsnr_shift, schedule_from, shift_from_factor

__all__ = ["AdaptiveLossWeight", "CosineSchedule", "Denoiser", "Guided", "KeepKnown", "LOSS_WEIGHTS",
           "PARAMETERISATIONS", "SAMPLERS", "TIME_INPUTS", "TIME_LISTS", "check_loss_weight", "check_sampler",
           "check_start", "logsnr_shift", "parameterisation", "pyramid_noise", "register", "rescaled_guidance",
           "sample", "sampling_times", "schedule_from", "shift_from_factor", "takes_eta"]
