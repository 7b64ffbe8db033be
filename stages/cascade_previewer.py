"""Stable Cascade's previewer (StableCascade ``modules/previewer.py``; ``models/previewer.safetensors``): its
Stage C latents (16 x 24 x 24 at 1024 px) straight to a coarse RGB image 8x their side, without Stage B.

Its layout differs from this project's previewer (``stages.previewer``): a 1x1 conv to ``c_hidden``, then
[3x3 conv, 2x2 transposed conv] stages halving the width (BatchNorm after every GELU), and a 1x1 conv to RGB,
unbounded. The released file's keys (``blocks.<i>.*``) load as they are.
"""
from __future__ import annotations


import torch
from torch import nn



class CascadePreviewer(nn.Module):
    """The release's previewer: ``(B, c_in, h, w)`` -> ``(B, 3, 8h, 8w)``."""

    def __init__(self, c_in: int = 16, c_hidden: int = 512, c_out: int = 3):
        super().__init__()
        widths = [c_hidden, c_hidden // 2, c_hidden // 4, c_hidden // 4]

        def act(c: int) -> list[nn.Module]:
            return [nn.GELU(), nn.BatchNorm2d(c)]

        layers = [nn.Conv2d(c_in, c_hidden, kernel_size=1), *act(c_hidden)]
        for c, c_next in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c, c, kernel_size=3, padding=1), *act(c),
                       nn.ConvTranspose2d(c, c_next, kernel_size=2, stride=2), *act(c_next)]
        layers += [nn.Conv2d(widths[-1], widths[-1], kernel_size=3, padding=1), *act(widths[-1]),
                   nn.Conv2d(widths[-1], c_out, kernel_size=1)]
        self.blocks = nn.Sequential(*layers)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.blocks(latents)
