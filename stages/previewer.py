"""The previewer: Stage C's semantic latents (the compressor's 16 channels, paper Sec. 3.1) straight to a
small RGB image, without Stage B or Stage A, to see what the prior sampled (in the spirit of the
released Würstchen v3 previewer: a small convolutional decoder of the latents).

A 1x1 conv lifts the latents to ``width`` channels, ``blocks`` residual 3x3 conv blocks mix them at the
latent grid, then ``ups`` stages each double the side (nearest upsampling + 3x3 conv + GELU) and a
3x3 conv gives RGB in [0, 1] (sigmoid). Output side: grid x 2**ups (the tiny preset: 3x3 -> 24x24).
The previewer is trained (``train.previewer``) on the raw latents of one compressor; its export records
that compressor's fingerprint.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from common.config import DictConfig

STAGE = "previewer"


@dataclass(frozen=True)
class PreviewerConfig(DictConfig):
    name = "previewer config"

    c_latent: int = 16
    width: int = 48
    blocks: int = 2
    ups: int = 3  # output side = latent side * 2**ups
    up_widths: tuple[int, ...] = (32, 32, 16)


PRESETS: dict[str, PreviewerConfig] = {
    "tiny": PreviewerConfig(),  # ~0.1 M parameters: 3x3 latents of 128 px images -> 24x24 RGB
    "small": PreviewerConfig(width=128, blocks=4, ups=3, up_widths=(96, 64, 32)),
}


def previewer_config(size: str | dict | PreviewerConfig) -> PreviewerConfig:
    config = PreviewerConfig.pick(size, PRESETS)
    if len(config.up_widths) != config.ups:
        raise ValueError(f"previewer up_widths {list(config.up_widths)} must give one width per upsampling stage "
                         f"(ups = {config.ups})")
    return config


class ResBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(1, width), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                  nn.Conv2d(width, width, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Previewer(nn.Module):
    """Raw semantic latents (B, 16, h, w) -> RGB (B, 3, h * 2**ups, w * 2**ups) in [0, 1]."""

    def __init__(self, config: PreviewerConfig | str | dict = "tiny"):
        super().__init__()
        self.config = cfg = previewer_config(config)
        layers: list[nn.Module] = [nn.Conv2d(cfg.c_latent, cfg.width, 1)]
        layers += [ResBlock(cfg.width) for _ in range(cfg.blocks)]
        width = cfg.width
        for out in cfg.up_widths:
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(width, out, 3, padding=1), nn.GELU()]
            width = out
        layers.append(nn.Conv2d(width, 3, 3, padding=1))
        self.net = nn.Sequential(*layers)

    @property
    def factor(self) -> int:
        return 2 ** self.config.ups

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 4 or latents.shape[1] != self.config.c_latent:
            raise ValueError(f"the previewer takes semantic latents (B, {self.config.c_latent}, h, w), got "
                             f"{tuple(latents.shape)}")
        return torch.sigmoid(self.net(latents))
