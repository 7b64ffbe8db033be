"""The diffusion process as its own layer: schedules, parameterisations, the Denoiser with its loss
weights and classifier-free guidance, and the samplers. It imports torch only; the networks in
``stages`` never import it (they return raw heads)."""
from diffusion.denoiser import LOSS_WEIGHTS, Denoiser, Guided, check_loss_weight
from diffusion.parameterisations import PARAMETERISATIONS, parameterisation
from diffusion.samplers import (SAMPLERS, TIME_LISTS, check_sampler, check_start, register, sample, sampling_times,
                               takes_eta)
from diffusion.schedules import CosineSchedule, logsnr_shift, schedule_from

__all__ = ["CosineSchedule", "Denoiser", "Guided", "LOSS_WEIGHTS", "PARAMETERISATIONS", "SAMPLERS", "TIME_LISTS",
           "check_loss_weight", "check_sampler", "check_start", "logsnr_shift", "parameterisation", "register", "sample",
           "sampling_times", "schedule_from", "takes_eta"]
