"""Losses for Stage A (paper E.1): perceptual (LPIPS) and adversarial (patch discriminator, hinge)."""
from __future__ import annotations

import contextlib
import logging
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


class Perceptual(nn.Module):
    """LPIPS distance of images in [0, 1] (the ``lpips`` package), one value per image.

    Uses the ImageNet-pretrained backbone when torchvision can load it (from its cache or the
    network). Otherwise it warns loudly and falls back to a randomly initialised backbone
    (``pnet_rand``, fixed seed) with the package's calibrated linear heads: still a deterministic
    deep-feature distance, but not the published LPIPS. ``pretrained_backbone`` records which.
    """

    def __init__(self, net: str = "alex", allow_random_backbone: bool = True):
        super().__init__()
        import lpips

        self.net_name = net
        try:  # torch.hub reports its download on stdout: keep stdout clean for JSON-printing commands
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.simplefilter("ignore")
                self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
            self.pretrained_backbone = True
        except Exception as e:  # offline: the torchvision weights cannot be fetched
            if not allow_random_backbone:
                raise RuntimeError(f"LPIPS needs the pretrained {net} backbone, which could not be loaded: {e}") from e
            msg = (f"LPIPS: the ImageNet-pretrained {net} backbone could not be loaded ({type(e).__name__}); "
                   "falling back to a RANDOM backbone (pnet_rand, seed 0). Perceptual loss and LPIPS figures "
                   "are then not comparable with published LPIPS. Put torchvision's weights in its cache "
                   "(~/.cache/torch/hub/checkpoints) to use the real one.")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
            self.pretrained_backbone = False
        self.lpips.eval().requires_grad_(False)

    @property
    def description(self) -> str:
        return f"lpips-{self.net_name} ({'pretrained' if self.pretrained_backbone else 'random'} backbone)"

    def train(self, mode: bool = True) -> "Perceptual":
        super().train(mode)
        self.lpips.eval()  # always in eval mode (dropout off)
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a, b, normalize=True).flatten()


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
