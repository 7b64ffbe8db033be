"""Adversarial losses for Stage A (paper E.1): a patch discriminator with the hinge loss (the perceptual
term is ``stages.metrics.Perceptual``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: stride-2 4x4 convs with LeakyReLU, one logit per patch."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256)):
        super().__init__()
        layers, c_in = [], 3
        for i, c in enumerate(widths):
            layers += [nn.Conv2d(c_in, c, 4, stride=2, padding=1), nn.GroupNorm(1, c) if i else nn.Identity(),
                       nn.LeakyReLU(0.2)]
            c_in = c
        layers.append(nn.Conv2d(c_in, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def generator_adv_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()
