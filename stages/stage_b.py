"""Stage B: the ConvNeXt U-Net diffusion model in Stage A's latent space (paper Sec. 3.1, App. E.2).

Input: noised Stage A latents ``x_t`` (B, 4, H/4, W/4), time ``r`` in [0, 1], the semantic
compressor's latents (B, 16, h, w) and, optionally, text token states (B, T, c_text). The semantic
latents are bicubic-resized to each injected level's grid, mapped by a 1x1 conv and concatenated
into every ConvNeXt block's skip input, as in the released model. Output: the A/B head (a, b)
with eps = (x_t - a) / (sigmoid(b) (1 - 2e-3) + 1e-3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.blocks import (AttentionBlock, ConvNeXtBlock, LayerNorm2d, TimestepBlock, channels_last,
                           timestep_embedding)
from common.config import DictConfig


@dataclass(frozen=True)
class StageBConfig(DictConfig):
    name = "Stage B config"

    widths: tuple[int, ...] = (320, 640, 1280, 1280)  # channels per U-Net level
    blocks: tuple[int, ...] = (4, 4, 14, 4)  # ConvNeXt+timestep(+attention) groups per level
    heads: tuple[int, ...] = (0, 10, 20, 20)  # attention heads per level; 0 = no attention there
    inject_semantic: tuple[bool, ...] = (False, True, True, True)  # levels that get the semantic latents
    c_semantic: int = 16  # semantic compressor channels
    c_cond: int = 1024  # width of the mapped text tokens and semantic maps
    c_text: int | None = 1024  # text state width (CLIP-H: 1024); None = no text, attention is self-only
    c_latent: int = 4  # Stage A latent channels
    c_r: int = 64  # sinusoidal time-embedding width
    patch_size: int = 2
    kernel_size: int = 3
    dropout: float = 0.1
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory; same results)
    prediction: str = "sigmoid_ab"  # the head: the released decoder's A/B pair, or "v" (one map; the tiny decoders)

    def __post_init__(self):
        n = len(self.widths)
        if not (len(self.blocks) == len(self.heads) == len(self.inject_semantic) == n):
            raise ValueError("widths, blocks, heads and inject_semantic need one entry per level")
        if self.prediction not in ("sigmoid_ab", "v"):
            raise ValueError(f"Stage B prediction must be 'sigmoid_ab' or 'v', got {self.prediction!r}")

    @property
    def downsampling(self) -> int:
        """Stage A latent pixels per level-(n-1) pixel: H/4 and W/4 must be multiples of this."""
        return self.patch_size * 2 ** (len(self.widths) - 1)


PRESETS: dict[str, StageBConfig] = {
    # 128 px images -> 32x32 latents; no text: the semantic latents alone carry the image (paper Sec. 3.1)
    "tiny": StageBConfig(widths=(48, 96, 192), blocks=(1, 2, 2), heads=(0, 4, 8),
                         inject_semantic=(False, True, True), c_cond=64, c_text=None, dropout=0.0),
    "paper": StageBConfig(),  # 1055.4 M parameters, as WuerstchenDiffNeXt's defaults
}


def stage_b_config(size: str | StageBConfig | dict) -> StageBConfig:
    """A preset name (``tiny``, ``paper``), a dict of fields, or a config."""
    return StageBConfig.pick(size, PRESETS)


class StageB(nn.Module):
    """The U-Net; ``forward`` returns the A/B head ``(a, b)`` (read as eps by ``diffusion.parameterisations.SigmoidAB``)."""

    def __init__(self, config: StageBConfig | str = "tiny"):
        super().__init__()
        self.config = cfg = stage_b_config(config)
        n = len(cfg.widths)
        self.text_mapper = nn.Linear(cfg.c_text, cfg.c_cond) if cfg.c_text else None
        self.text_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        # one 1x1 conv per injected level, down path then up path (the up path runs the levels in reverse)
        inject = list(cfg.inject_semantic) + list(reversed(cfg.inject_semantic))
        self.semantic_mappers = nn.ModuleList(
            [nn.Conv2d(cfg.c_semantic, cfg.c_cond, kernel_size=1) if on else None for on in inject])
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_latent * cfg.patch_size ** 2, cfg.widths[0], kernel_size=1),
            LayerNorm2d(cfg.widths[0], elementwise_affine=False, eps=1e-6),
        )

        def group(level: int, c_skip: int) -> list[nn.Module]:
            c, dropout = cfg.widths[level], cfg.dropout
            sem = cfg.c_cond if cfg.inject_semantic[level] else 0
            out = [ConvNeXtBlock(c, c_skip + sem, cfg.kernel_size, dropout), TimestepBlock(c, cfg.c_r)]
            if cfg.heads[level]:
                out.append(AttentionBlock(c, cfg.c_cond if cfg.c_text else None, cfg.heads[level], True, dropout))
            return out

        self.down_blocks = nn.ModuleList()
        for i in range(n):
            level = []
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(cfg.widths[i - 1], elementwise_affine=False, eps=1e-6),
                                           nn.Conv2d(cfg.widths[i - 1], cfg.widths[i], kernel_size=2, stride=2)))
            for _ in range(cfg.blocks[i]):
                level += group(i, 0)
            self.down_blocks.append(nn.ModuleList(level))

        self.up_blocks = nn.ModuleList()
        for i in reversed(range(n)):
            level = []
            for j in range(cfg.blocks[i]):  # the U-Net skip joins the first block of each level but the lowest
                level += group(i, cfg.widths[i] if i < n - 1 and j == 0 else 0)
            if i > 0:
                level.append(nn.Sequential(LayerNorm2d(cfg.widths[i], elementwise_affine=False, eps=1e-6),
                                           nn.ConvTranspose2d(cfg.widths[i], cfg.widths[i - 1], kernel_size=2, stride=2)))
            self.up_blocks.append(nn.ModuleList(level))

        self.head = nn.Sequential(
            LayerNorm2d(cfg.widths[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(cfg.widths[0], (2 if cfg.prediction == "sigmoid_ab" else 1) * cfg.c_latent * cfg.patch_size ** 2,
                      kernel_size=1),
            nn.PixelShuffle(cfg.patch_size),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier everywhere; small conditioning maps; zero output conv; residual outputs scaled by sqrt(1/depth)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in [*[m for m in self.semantic_mappers if m is not None], self.text_mapper]:
            if m is not None:
                nn.init.normal_(m.weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
        nn.init.zeros_(self.head[1].weight)
        depth = sum(self.config.blocks)
        for m in self.modules():
            if isinstance(m, ConvNeXtBlock):
                m.channelwise[-1].weight.data.mul_(math.sqrt(1 / depth))
            elif isinstance(m, TimestepBlock):
                nn.init.zeros_(m.mapper.weight)

    def _semantic_map(self, index: int, semantic: torch.Tensor, size: tuple[int, int]) -> torch.Tensor | None:
        mapper = self.semantic_mappers[index]
        if mapper is None:
            return None
        resized = F.interpolate(semantic.float(), size=size, mode="bicubic", antialias=True, align_corners=True)
        return mapper(resized.to(semantic.dtype))

    def _check(self, x: torch.Tensor, semantic: torch.Tensor, text: torch.Tensor | None) -> None:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.c_latent:
            raise ValueError(f"Stage B expects latents (B, {cfg.c_latent}, H/4, W/4), got {tuple(x.shape)}")
        d = cfg.downsampling
        if x.shape[-2] % d or x.shape[-1] % d:
            raise ValueError(
                f"latent grid {tuple(x.shape[-2:])} is not a multiple of {d} (image sides must be multiples of "
                f"{4 * d} px for this Stage B); resize or crop the images")
        if semantic.dim() != 4 or semantic.shape[1] != cfg.c_semantic:
            raise ValueError(f"semantic latents must be (B, {cfg.c_semantic}, h, w), got {tuple(semantic.shape)}")
        if cfg.c_text and text is None:
            raise ValueError("this Stage B is text-conditional: pass text states (use the empty prompt's for none)")
        if text is not None and (text.dim() != 3 or text.shape[-1] != cfg.c_text):
            raise ValueError(f"text states must be (B, tokens, {cfg.c_text}), got {tuple(text.shape)}")

    def forward(self, x: torch.Tensor, r: torch.Tensor, semantic: torch.Tensor,
                text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, semantic, text)
        r_embed = timestep_embedding(r, self.config.c_r).to(x.dtype)
        cond = self.text_norm(self.text_mapper(text)) if self.text_mapper is not None else None
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()

        def run(block: nn.Module, h: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
            if isinstance(block, ConvNeXtBlock):
                return block(h, skip)
            if isinstance(block, TimestepBlock):
                return block(h, r_embed)
            if isinstance(block, AttentionBlock):
                return block(h, cond)
            return block(h)  # down- or up-sampling

        if recompute:
            plain = run
            run = lambda block, h, skip: checkpoint(plain, block, h, skip, use_reentrant=False)  # noqa: E731

        h = self.embedding(channels_last(x))
        levels = []
        for i, blocks in enumerate(self.down_blocks):
            sem = None
            for block in blocks:
                if isinstance(block, ConvNeXtBlock) and sem is None:
                    sem = self._semantic_map(i, semantic, h.shape[-2:])
                h = run(block, h, sem)
            levels.insert(0, h)
        n = len(self.down_blocks)
        h = levels[0]
        for i, blocks in enumerate(self.up_blocks):
            sem = self._semantic_map(n + i, semantic, h.shape[-2:])
            for j, block in enumerate(blocks):
                skip = sem
                if j == 0 and i > 0:
                    skip = levels[i] if sem is None else torch.cat([levels[i], sem], dim=1)
                h = run(block, h, skip)
        out = self.head(h)
        return out if self.config.prediction == "v" else tuple(out.chunk(2, dim=1))
