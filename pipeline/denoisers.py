"""How each network's head is read (``diffusion.Denoiser``), and rebuilding that from an export.

Stage B's A/B head is ``sigmoid_ab`` (released decoder), Stage C's ``abs_ab`` (paper Sec. 3.2),
the pixel decoder's ``v`` or ``eps``, the baseline LDM's ``v`` or ``sigmoid_ab`` (their config's ``prediction``),
on the cosine schedule shifted
by its ``logsnr_shift``. Exports record ``Denoiser.describe()`` as their ``diffusion`` metadata;
older exports without it get these defaults.
"""
from __future__ import annotations

from torch import nn

from diffusion import CosineSchedule, Denoiser
from stages.baseline_ldm import BaselineLDM
from stages.pixel_decoder import GrownUViT, ShallowUViT
from stages.stable_cascade import StageB3, StageC3
from stages.stage_b import StageB
from stages.stage_c import StageC


def parameterisation_of(network: nn.Module) -> str:
    """The parameterisation a network of this project was trained with."""
    if isinstance(network, (StageB, StageB3, StageC3)):
        return network.config.prediction
    if isinstance(network, StageC):
        return "abs_ab"
    if isinstance(network, (ShallowUViT, GrownUViT, BaselineLDM)):
        return network.config.prediction
    raise ValueError(f"no default parameterisation for a {type(network).__name__}; pass its description")


def denoiser_for(network: nn.Module, description: dict | None = None, *, logsnr_shift: float = 0.0,
                 loss_weight: str = "constant", sigmoid_bias: float = 0.0) -> Denoiser:
    """The denoiser an export recorded (``description``, its ``diffusion`` metadata), else the
    network's own parameterisation on the cosine schedule shifted by ``logsnr_shift``."""
    if description:
        return Denoiser.from_description(network, description)
    return Denoiser(network, parameterisation_of(network), CosineSchedule(shift=logsnr_shift), loss_weight,
                    sigmoid_bias)
