"""Stage C: the text-conditional prior in the semantic latent space (paper Sec. 3.2, App. E.3).

Input: noised, normalised compressor latents ``x_t`` (B, 16, h, w), time ``r`` in [0, 1] and
text token states (B, T, c_text). A 1x1 conv lifts the latents to ``width`` channels; ``depth``
groups of [ConvNeXt block, timestep block, self+cross attention block] run at that one
resolution; the A/B head gives eps = (x_t - A) / (|1 - B| + 1e-5).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.blocks import (AttentionBlock, ConvNeXtBlock, LayerNorm2d, TimestepBlock, add_control, check_control,
                           scale_residual_branches, timestep_embedding)
from common.config import DictConfig


@dataclass(frozen=True)
class StageCConfig(DictConfig):
    name = "Stage C config"

    width: int = 1280
    depth: int = 16
    heads: int = 16
    c_text: int = 1024  # text state width (CLIP-H: 1024, CLIP-bigG: 1280, MiniLM: 384)
    c_latent: int = 16
    c_r: int = 64
    dropout: float = 0.1
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory; same results)


PRESETS: dict[str, StageCConfig] = {
    "tiny": StageCConfig(width=128, depth=4, heads=4, c_text=384, dropout=0.0),  # MiniLM text, 2 CPU cores
    "paper": StageCConfig(),  # 347.0 M: 16 blocks, width 1280, CLIP-H text (paper Sec. 4.1)
    "release": StageCConfig(width=1536, depth=32, heads=24, c_text=1280),  # 993.6 M: the v2 release, CLIP-bigG
}


def stage_c_config(size: str | StageCConfig | dict) -> StageCConfig:
    """A preset name (``tiny``, ``paper``, ``release``), a dict of fields, or a config."""
    return StageCConfig.pick(size, PRESETS)


class StageC(nn.Module):
    """The prior; ``forward`` returns the A/B head ``(a, b)`` (read as eps by ``diffusion.parameterisations.AbsAB``)."""

    def __init__(self, config: StageCConfig | str = "tiny"):
        super().__init__()
        self.config = cfg = stage_c_config(config)
        self.projection = nn.Conv2d(cfg.c_latent, cfg.width, kernel_size=1)
        self.text_mapper = nn.Sequential(nn.Linear(cfg.c_text, cfg.width), nn.LeakyReLU(0.2),
                                         nn.Linear(cfg.width, cfg.width))
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            self.blocks.append(ConvNeXtBlock(cfg.width, dropout=cfg.dropout))
            self.blocks.append(TimestepBlock(cfg.width, cfg.c_r))
            self.blocks.append(AttentionBlock(cfg.width, cfg.width, cfg.heads, self_attn=True, dropout=cfg.dropout))
        self.head = nn.Sequential(LayerNorm2d(cfg.width, elementwise_affine=False, eps=1e-6),
                                  nn.Conv2d(cfg.width, 2 * cfg.c_latent, kernel_size=1))
        self._init_weights()

    def _init_weights(self) -> None:
        """Xavier; zero output conv and timestep mappers; residual outputs scaled by sqrt(1/depth) (the released prior)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head[1].weight)
        scale_residual_branches(self.blocks, self.config.depth)

    def forward(self, x: torch.Tensor, r: torch.Tensor, text: torch.Tensor,
                control: list[torch.Tensor | None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``control``: a ControlNet's features (``stages.controlnet``), one entry (or None) per ConvNeXt block,
        added before that block."""
        cfg = self.config
        check_control(control, cfg.depth)
        if x.dim() != 4 or x.shape[1] != cfg.c_latent:
            raise ValueError(f"Stage C expects semantic latents (B, {cfg.c_latent}, h, w), got {tuple(x.shape)}")
        if text is None or text.dim() != 3 or text.shape[-1] != cfg.c_text:
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"Stage C needs text states (B, tokens, {cfg.c_text}), got {got}; "
                             "use the empty prompt's states for unconditional sampling")
        r_embed = timestep_embedding(r, cfg.c_r).to(x.dtype)
        cond = self.text_mapper(text)
        h = self.projection(x)
        recompute = cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if isinstance(block, ConvNeXtBlock):
                h = add_control(h, control, i // 3)
            extra = (cond,) if isinstance(block, AttentionBlock) else (r_embed,) if isinstance(block, TimestepBlock) else ()
            h = checkpoint(block, h, *extra, use_reentrant=False) if recompute else block(h, *extra)
        a, b = self.head(h).chunk(2, dim=1)
        return a, b
