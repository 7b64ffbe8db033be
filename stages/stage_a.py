"""Stage A: the f4 VQGAN (Würstchen paper, Sec. 3.1 and Appendix E.1).

Images are ``(B, 3, H, W)`` in [0, 1] with H and W divisible by 4. ``encode`` gives the
continuous latents divided by ``scale_factor`` (what Stage B diffuses in); ``decode``
multiplies them back and runs the decoder, optionally quantising first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stages.blocks import MixingBlock, channels_last
from common.config import DictConfig
from common.checks import check_images


@dataclass(frozen=True)
class StageAConfig(DictConfig):
    name = "Stage A config"

    widths: tuple[int, ...] = (192, 384)  # channels of the two levels (full and half resolution)
    bottleneck_blocks: int = 12  # decoder blocks at the lowest level
    latent_channels: int = 4
    codebook_size: int = 8192
    scale_factor: float = 0.3764  # release value; latents are divided by it on encode


PRESETS: dict[str, StageAConfig] = {
    "tiny": StageAConfig(widths=(32, 64), bottleneck_blocks=2, codebook_size=1024),
    "paper": StageAConfig(),  # 18.4 M parameters, as PaellaVQModel's defaults
}


def stage_a_config(size: str | StageAConfig | dict) -> StageAConfig:
    """A preset name (``tiny``, ``paper``), a dict of fields, or a config."""
    return StageAConfig.pick(size, PRESETS)


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook with a straight-through gradient; loss = vq + 0.25 * commitment."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.beta = beta
        self.codebook = nn.Embedding(codebook_size, dim)
        nn.init.uniform_(self.codebook.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """Code index of every latent pixel: ``(B, C, H, W) -> (B, H, W)``."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        return torch.cdist(flat.float(), self.codebook.weight.float()).argmin(dim=1).view(z.shape[0], *z.shape[2:])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self.codebook(idx).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (quantised z with straight-through gradient, loss, indices)."""
        idx = self.indices(z)
        zq = self.lookup(idx).to(z.dtype)
        loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(z, zq.detach())
        return z + (zq - z).detach(), loss, idx


class StageA(nn.Module):
    """The f4 VQGAN: PixelUnshuffle(2) + one stride-2 level, mixing blocks, 4-channel latents."""

    def __init__(self, config: str | StageAConfig | dict = "paper"):
        super().__init__()
        self.config = cfg = stage_a_config(config)
        if len(cfg.widths) != 2:
            raise ValueError("Stage A is an f4 model: widths must name exactly two levels")
        c0, c1 = cfg.widths
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(2),
            nn.Conv2d(3 * 4, c0, kernel_size=1),
            MixingBlock(c0),
            nn.Conv2d(c0, c1, kernel_size=4, stride=2, padding=1),
            MixingBlock(c1),
            nn.Conv2d(c1, cfg.latent_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(cfg.latent_channels),
        )
        self.quantizer = VectorQuantizer(cfg.codebook_size, cfg.latent_channels)
        self.decoder = nn.Sequential(
            nn.Conv2d(cfg.latent_channels, c1, kernel_size=1),
            *[MixingBlock(c1) for _ in range(cfg.bottleneck_blocks)],
            nn.ConvTranspose2d(c1, c0, kernel_size=4, stride=2, padding=1),
            MixingBlock(c0),
            nn.Conv2d(c0, 3 * 4, kernel_size=1),
            nn.PixelShuffle(2),
        )

    @staticmethod
    def check_images(images: torch.Tensor) -> None:
        """Float RGB images in [0, 1] (``common.checks.check_images``; uint8 is refused) with sides divisible by 4."""
        check_images(images, "Stage A")
        h, w = images.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(
                f"Stage A is f4: image height and width must be divisible by 4, got {h}x{w}; "
                f"resize or crop to e.g. {max(4, h // 4 * 4)}x{max(4, w // 4 * 4)}"
            )

    def encode(self, images: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Float images in [0, 1] (uint8 is refused: divide by 255) -> latents ``(B, 4, H/4, W/4)``.

        The latents are divided by ``scale_factor``. Float images of another precision than the weights'
        (float64, float16, ...) are cast to it.
        """
        self.check_images(images)
        z = self.encoder(channels_last(images.to(self.encoder[1].weight.dtype)))
        if quantize:
            z = self.quantizer(z)[0]
        return (z / self.config.scale_factor).contiguous()

    def decode(self, latents: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """Scaled latents -> images (unclamped; clamp to [0, 1] for display)."""
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels or not latents.numel():
            raise ValueError(
                f"Stage A decodes latents of shape (B, {self.config.latent_channels}, h, w) with B, h, w >= 1, "
                f"got {tuple(latents.shape)}"
            )
        z = channels_last(latents * self.config.scale_factor)
        if quantize:
            z = self.quantizer(z)[0]
        return self.decoder(z).contiguous()

    def forward(self, images: torch.Tensor, quantize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Training pass on raw (unscaled) latents: returns (reconstruction, vq loss).

        The codebook loss is computed on every pass, so the codebook keeps learning (and every
        parameter gets a gradient, as DDP requires) when ``quantize=False`` decodes the raw latents.
        """
        self.check_images(images)
        z = self.encoder(channels_last(images.to(self.encoder[1].weight.dtype)))
        zq, vq_loss, _ = self.quantizer(z)
        return self.decoder(zq if quantize else z).contiguous(), vq_loss


class PatchDiscriminator(nn.Module):
    """Stage A's adversary in training (paper App. E.1): a small PatchGAN of stride-2 4x4 convs with
    LeakyReLU, one logit per patch."""

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
