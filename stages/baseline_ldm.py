"""The single-stage baseline: a text-conditional latent diffusion U-Net on Stage A's latents (Würstchen paper
Sec. 4, "Baseline LDM": a 1B U-Net on an f8 autoencoder, trained for the compute of Stage C).

Input: noised Stage A latents ``x_t`` (B, 4, H/4, W/4), time ``r`` in [0, 1] and text token states
(B, T, c_text). The network is Stage B's ConvNeXt U-Net (``stages.stage_b``: ConvNeXt, timestep and
self+cross attention blocks per level) with no semantic input: text is its only condition. Stage A is
f4; the U-Net's 2x2 patch embedding gives the f8 token grid of the paper's baseline (16x16 tokens at
128 px, 64x64 at 512 px).

Head: ``v`` (v = sqrt(ab) eps - sqrt(1 - ab) x0, Salimans & Ho 2022) by default, trained on the v-MSE.
Near t = 1 a v head is a regression of the latents on the text, which a small network learns in few
steps; an eps head must reproduce x_t almost exactly there, and its error is amplified by
sqrt((1 - ab) / ab) in x0. The tiny Stage B decoders train much faster with a v head for this reason,
and the comparison should not handicap the baseline. ``sigmoid_ab`` (the released decoder's A/B head)
is accepted too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.config import DictConfig
from stages.stage_b import StageB, StageBConfig

STAGE = "baseline_ldm"


@dataclass(frozen=True)
class BaselineLDMConfig(DictConfig):
    name = "baseline LDM config"

    widths: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per U-Net level
    blocks: tuple[int, ...] = (4, 4, 18, 4)  # ConvNeXt+timestep(+attention) groups per level
    heads: tuple[int, ...] = (0, 10, 20, 20)  # attention heads per level; 0 = no attention there
    c_text: int = 1024  # text state width (CLIP-H, the text encoder of SD 2.1 the paper's baseline used)
    c_cond: int = 1024  # width of the mapped text tokens
    c_latent: int = 4  # Stage A latent channels
    c_r: int = 64  # sinusoidal time-embedding width
    patch_size: int = 2  # f4 latents in 2x2 patches: the f8 token grid
    kernel_size: int = 3
    dropout: float = 0.1
    activation_checkpointing: bool = False
    prediction: str = "v"  # or "sigmoid_ab"

    def __post_init__(self):
        if not (len(self.widths) == len(self.blocks) == len(self.heads)):
            raise ValueError("baseline LDM widths, blocks and heads need one entry per level")
        if not self.c_text:
            raise ValueError("the baseline LDM is text-conditional: c_text must be the text encoder's width")

    def unet(self) -> StageBConfig:
        """The U-Net's config: Stage B's, with no level injecting semantic latents."""
        return StageBConfig(widths=self.widths, blocks=self.blocks, heads=self.heads,
                            inject_semantic=(False,) * len(self.widths), c_semantic=1, c_cond=self.c_cond,
                            c_text=self.c_text, c_latent=self.c_latent, c_r=self.c_r, patch_size=self.patch_size,
                            kernel_size=self.kernel_size, dropout=self.dropout,
                            activation_checkpointing=self.activation_checkpointing, prediction=self.prediction)

    @property
    def downsampling(self) -> int:
        return self.unet().downsampling


PRESETS: dict[str, BaselineLDMConfig] = {
    # 128 px -> 32x32 Stage A latents -> 16x16 tokens; MiniLM text (as the tiny Stage C); 2 CPU cores.
    # 1.18 M parameters (tiny Stage C: 1.00 M); 11.9 GFLOP per training step of 64 (tiny Stage C: 4.3)
    "tiny": BaselineLDMConfig(widths=(32, 64, 128), blocks=(1, 1, 2), heads=(0, 2, 4), c_text=384, c_cond=64,
                              dropout=0.0),
    # 1014.9 M parameters (the paper's baseline: a 1B U-Net), CLIP-H text
    "paper": BaselineLDMConfig(),
}


def baseline_ldm_config(size: str | BaselineLDMConfig | dict) -> BaselineLDMConfig:
    """A preset name (``tiny``, ``paper``), a dict of fields, or a config."""
    return BaselineLDMConfig.pick(size, PRESETS)


class BaselineLDM(nn.Module):
    """The U-Net; ``forward(x, r, text)`` returns the head (``v``: one map; ``sigmoid_ab``: ``(a, b)``)."""

    def __init__(self, config: BaselineLDMConfig | str | dict = "tiny"):
        super().__init__()
        self.config = cfg = baseline_ldm_config(config)
        self.unet = StageB(cfg.unet())

    def forward(self, x: torch.Tensor, r: torch.Tensor, text: torch.Tensor):
        if text is None:
            raise ValueError("the baseline LDM needs text states (B, tokens, c_text); use the empty prompt's for none")
        no_semantic = x.new_zeros(x.shape[0], 1, 1, 1)  # no level reads it
        return self.unet(x, r, no_semantic, text)
