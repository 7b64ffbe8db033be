"""The greedy-grown pixel decoder (Greedy Growing paper Sec. 3.2-3.3).

A pixel-space diffusion model that renders an image from Stage C's semantic latents (and
optionally text): a drop-in replacement for Stage B + Stage A.

* Phase 1, ``ShallowUViT``: an entry conv (kernel = stride = ``resolution / core_grid``) maps the
  image to the fixed core grid; one residual block (two 3x3 convs, swish) each side; the core
  (``depth`` x [ConvNeXt block, timestep block, self+cross attention block] between two 1x1
  projections, residual); an output head (3x3 conv + pixel shuffle) back to pixels.
* Phase 2, ``grow``: the shallow blocks, entry and head are dropped; U-Net levels (residual conv
  blocks, optional attention, stride-2 down / nearest-neighbour up, one additive skip per level)
  go from ``target_resolution`` down to the core grid, around the *same* core module. The
  condition encoders and the time embedding carry over too.

The output head predicts v by default (``prediction``, read through the ``diffusion``
parameterisation of that name on the shifted schedule): with a direct eps output, small errors near t = 1 blow up in x0 and few-step
DDPM samples come out as noise.

Module names split the model into the groups the phase-2 freezing plans act on
(``freeze_plan``): ``core.`` and ``condition.`` (frozen in ``greedy``), ``time_embed.`` (trained),
everything else new. The condition: the normalised semantic latents ``(B, 16, h, w)`` become
tokens (an MLP of each latent vector and its position) for cross-attention, and a map resized to
the core grid added at the core's input; text states, when used, are mapped to more tokens.

KV token compression (PixArt-Sigma): attention keys/values of the image tokens pass through a
depthwise stride-R conv initialised to the average (1/R^2); queries keep full resolution.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from stages.blocks import (AttentionBlock, ConvNeXtBlock, LayerNorm2d, TimestepBlock, channels_last,
                           scale_residual_branches, timestep_embedding)
from common.config import DictConfig

STAGE = "pixel_decoder"
# Fields that define the core, the condition encoders and the time embedding's width: a phase-2
# model must agree with its phase-1 checkpoint on all of them (``check_core_match``).
CORE_FIELDS = ("core_grid", "entry_channels", "width", "depth", "heads", "c_semantic", "c_text", "c_t", "c_r",
               "prediction")
MODES = ("greedy", "finetune", "scratch", "freeze_unfreeze")
FROZEN_IN_GREEDY = ("core.", "condition.")
POSITION_FREQUENCIES = 4  # Fourier features per axis for the position of each semantic latent


@dataclass(frozen=True)
class PixelDecoderConfig(DictConfig):
    name = "pixel decoder config"

    # Phase 1 (Shallow-UViT); the core and condition encoders carry over to the grown model.
    resolution: int = 64  # phase-1 image side; the base of the logSNR shift 2 log(resolution / d)
    core_grid: int = 16  # side of the core's fixed grid
    entry_channels: int = 256  # entry conv / shallow blocks / core input and output channels
    width: int = 1024  # core hidden size
    depth: int = 12  # core blocks
    heads: int = 16
    c_semantic: int = 16
    c_text: int | None = None  # text state width (MiniLM: 384); None: semantic latents only
    c_t: int = 256  # learned time embedding width
    c_r: int = 64  # sinusoidal embedding of t
    kv_stride: int = 1  # KV token compression ratio R in the core's attention (1: off)
    dropout: float = 0.0
    prediction: str = "v"  # what the output head predicts: v or eps
    # Phase 2 (grown U-Net levels, highest resolution first); target_resolution 0 = not grown.
    target_resolution: int = 0
    level_widths: tuple[int, ...] = ()
    level_blocks: tuple[int, ...] = ()
    level_heads: tuple[int, ...] = ()  # attention heads per level (0: no attention)
    level_kv_strides: tuple[int, ...] = ()  # KV compression per level's attention (1: off)

    def __post_init__(self):
        if self.prediction not in ("v", "eps"):
            raise ValueError(f"prediction must be 'v' or 'eps', got {self.prediction!r}")
        if self.resolution % self.core_grid:
            raise ValueError(f"resolution ({self.resolution}) must be a multiple of core_grid ({self.core_grid})")
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be divisible by heads ({self.heads})")
        if self.kv_stride < 1:
            raise ValueError(f"kv_stride must be at least 1, got {self.kv_stride}")
        n = len(self.level_widths)
        if not (len(self.level_blocks) == len(self.level_heads) == len(self.level_kv_strides) == n):
            raise ValueError("level_widths, level_blocks, level_heads and level_kv_strides need one entry per level, "
                             f"got {self.level_widths}, {self.level_blocks}, {self.level_heads}, {self.level_kv_strides}")
        for w, h, r in zip(self.level_widths, self.level_heads, self.level_kv_strides):
            if h and w % h:
                raise ValueError(f"level width {w} must be divisible by its heads {h}")
            if r < 1:
                raise ValueError(f"level_kv_strides must be at least 1, got {self.level_kv_strides}")
        if self.target_resolution:
            levels_needed(self.target_resolution, self.core_grid)  # a power-of-two multiple of the grid
            if n != levels_needed(self.target_resolution, self.core_grid):
                raise ValueError(f"growing from a {self.core_grid}x{self.core_grid} core to {self.target_resolution} px "
                                 f"takes {levels_needed(self.target_resolution, self.core_grid)} U-Net levels; "
                                 f"the growth plan gives {n} (level_widths {self.level_widths})")

    @property
    def grown(self) -> bool:
        return self.target_resolution > 0

    @property
    def patch(self) -> int:
        """The Shallow-UViT's entry conv kernel and stride."""
        return self.resolution // self.core_grid

    def core_dict(self) -> dict:
        return {k: getattr(self, k) for k in CORE_FIELDS}


def levels_needed(target: int, core_grid: int) -> int:
    """log2(target / core_grid): the U-Net levels between a target side and the core grid."""
    ratio = target / core_grid
    if target <= core_grid or ratio != int(ratio) or int(ratio) & (int(ratio) - 1):
        raise ValueError(f"target_resolution ({target}) must be the core grid ({core_grid}) times a power of two "
                         "greater than 1")
    return int(math.log2(ratio))


def growth_plan(widths: tuple[int, ...], blocks: int | tuple[int, ...] = 1, heads: int | tuple[int, ...] = 0,
                kv_strides: int | tuple[int, ...] = 1) -> dict:
    """Level fields for a config: per-level tuples (an int repeats for every level)."""
    n = len(widths)
    per = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * n  # noqa: E731
    return dict(level_widths=tuple(widths), level_blocks=per(blocks), level_heads=per(heads),
                level_kv_strides=per(kv_strides))


PRESETS: dict[str, PixelDecoderConfig] = {
    # 2 CPU cores: phase 1 at 32 px on an 8x8 core grid (entry stride 4); grows to 128 px with four
    # levels (128, 64, 32, 16 px) around the same core; the 128 px level has no residual block (its
    # convs would cost more than the rest of the network).
    "tiny": PixelDecoderConfig(resolution=32, core_grid=8, entry_channels=64, width=128, depth=4, heads=4,
                               c_t=128, **growth_plan((16, 32, 64, 64), blocks=(0, 1, 1, 1))),
    # Paper-like (Greedy Growing paper Sec. 4): 64 px phase 1, 16x16 core, 256 channels at the entry, a transformer core
    # cross-attending to the semantic latents (text: set c_text, e.g. 1024 for CLIP-H); grows to
    # 512 px with five levels, attention with KV compression (R = 2) at the 32x32 level. The
    # paper's Table 1/2 widths and depths are not in our copy: those here are illustrative.
    "paper": PixelDecoderConfig(resolution=64, core_grid=16, entry_channels=256, width=1024, depth=12, heads=16,
                                c_t=512, **growth_plan((128, 128, 256, 256, 256), blocks=(2, 2, 2, 2, 2),
                                                       heads=(0, 0, 0, 0, 4), kv_strides=(1, 1, 1, 1, 2))),
}


def pixel_decoder_config(size: str | PixelDecoderConfig | dict) -> PixelDecoderConfig:
    """A preset name (``tiny``, ``paper``), a dict of fields, or a config."""
    return PixelDecoderConfig.pick(size, PRESETS)


# -- blocks ---------------------------------------------------------------------------------------
def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class ResBlock(nn.Module):
    """GroupNorm -> swish -> 3x3 conv -> GroupNorm -> time modulation -> swish -> 3x3 conv, residual.

    The second conv starts at zero, so a fresh block is the identity (plus a 1x1 when widths differ).
    """

    def __init__(self, c_in: int, c_out: int, c_t: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(c_out), c_out)
        self.time = TimestepBlock(c_out, c_t)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.silu(self.time(self.norm2(h), t_emb))
        return self.skip(x) + self.conv2(self.dropout(h))


class KVCompressedAttention(AttentionBlock):
    """``AttentionBlock`` whose image keys/values may be compressed (PixArt-Sigma).

    With ``kv_stride`` R > 1 the normalised image tokens that serve as keys and values pass through
    a depthwise R x R conv of stride R, initialised to the average (1/R^2, bias 0); queries keep
    every token. Sides that are not multiples of R are padded by replicating the edge.
    """

    def __init__(self, channels: int, c_cond: int | None, nhead: int, self_attn: bool = True,
                 dropout: float = 0.0, kv_stride: int = 1):
        super().__init__(channels, c_cond, nhead, self_attn, dropout)
        self.kv_compress: nn.Conv2d | None = None
        self.set_kv_stride(kv_stride)

    @property
    def kv_stride(self) -> int:
        return self.kv_compress.stride[0] if self.kv_compress is not None else 1

    def set_kv_stride(self, stride: int) -> list[str]:
        """Switch compression to ``stride`` (a fresh average-initialised conv); returns the new parameter names."""
        if stride < 1:
            raise ValueError(f"kv_stride must be at least 1, got {stride}")
        if stride == self.kv_stride:
            return []
        if stride > 1 and not self.self_attn:
            raise ValueError("KV compression acts on the image tokens: it needs a self-attention block")
        self.kv_compress = None
        if stride == 1:
            return []
        channels = self.to_k.in_features
        conv = nn.Conv2d(channels, channels, stride, stride=stride, groups=channels)
        nn.init.constant_(conv.weight, 1.0 / stride ** 2)
        nn.init.zeros_(conv.bias)
        self.kv_compress = conv.to(self.to_k.weight.device, self.to_k.weight.dtype)
        return ["kv_compress.weight", "kv_compress.bias"]

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if self.kv_compress is None:
            return super().forward(x, cond)
        h, w = x.shape[-2:]
        normed = self.norm(x)
        q_in = normed.flatten(2).transpose(1, 2)
        r = self.kv_stride
        padded = F.pad(normed, (0, (-w) % r, 0, (-h) % r), mode="replicate")
        kv_in = self.kv_compress(padded).flatten(2).transpose(1, 2)
        if self.kv_mapper is not None:
            if cond is None:
                raise ValueError("this attention block needs condition tokens (B, tokens, c_cond)")
            kv_in = torch.cat([kv_in, self.kv_mapper(cond)], dim=1)
        return self.attend(x, q_in, kv_in)


def position_features(h: int, w: int, device=None) -> torch.Tensor:
    """Fourier features (sin, cos) of each cell's centre in [0, 1]^2: ``(h * w, 4 * POSITION_FREQUENCIES)``.

    Normalised coordinates, so a 2x2 and a 3x3 latent grid describe the same image layout.
    """
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(-1, 2)  # (hw, 2)
    freqs = math.pi * 2.0 ** torch.arange(POSITION_FREQUENCIES, device=device, dtype=torch.float32)
    args = (grid[:, :, None] * freqs).flatten(1)  # (hw, 2F)
    return torch.cat([args.sin(), args.cos()], dim=1)


class ConditionEncoder(nn.Module):
    """The condition-encoding layers: semantic latents (+ text) -> cross-attention tokens and a core-grid map."""

    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        self.c_semantic = cfg.c_semantic
        self.semantic_mapper = nn.Sequential(nn.Linear(cfg.c_semantic + 4 * POSITION_FREQUENCIES, cfg.width),
                                             nn.GELU(), nn.Linear(cfg.width, cfg.width))
        self.text_mapper = (nn.Sequential(nn.Linear(cfg.c_text, cfg.width), nn.LeakyReLU(0.2),
                                          nn.Linear(cfg.width, cfg.width)) if cfg.c_text else None)
        self.norm = nn.LayerNorm(cfg.width, elementwise_affine=False, eps=1e-6)
        self.semantic_map = nn.Conv2d(cfg.c_semantic, cfg.entry_channels, kernel_size=1)

    def tokens(self, semantic: torch.Tensor, text: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = semantic.shape
        pos = position_features(h, w, semantic.device).to(semantic.dtype).expand(b, -1, -1)
        tokens = self.semantic_mapper(torch.cat([semantic.flatten(2).transpose(1, 2), pos], dim=-1))
        if self.text_mapper is not None:
            tokens = torch.cat([tokens, self.text_mapper(text)], dim=1)
        return self.norm(tokens)

    def grid_map(self, semantic: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """The latents resized (bicubic) to the core grid, through a 1x1 conv: added at the core's input."""
        return self.semantic_map(F.interpolate(semantic, size=size, mode="bicubic", align_corners=False))


class TimeEmbedding(nn.Module):
    """Sinusoidal embedding of t -> Linear -> swish -> Linear (the time encoding layers; trained in phase 2)."""

    def __init__(self, c_r: int, c_t: int):
        super().__init__()
        self.c_r = c_r
        self.mlp = nn.Sequential(nn.Linear(c_r, c_t), nn.SiLU(), nn.Linear(c_t, c_t))

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(r, self.c_r).to(self.mlp[0].weight.dtype))


class Core(nn.Module):
    """The core representation layers on the fixed grid: x + proj_out(blocks(proj_in(x))), identity at start."""

    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        self.proj_in = nn.Conv2d(cfg.entry_channels, cfg.width, kernel_size=1)
        self.blocks = nn.ModuleList()
        for _ in range(cfg.depth):
            self.blocks.append(ConvNeXtBlock(cfg.width, dropout=cfg.dropout))
            self.blocks.append(TimestepBlock(cfg.width, cfg.c_t))
            self.blocks.append(KVCompressedAttention(cfg.width, cfg.width, cfg.heads, self_attn=True,
                                                     dropout=cfg.dropout, kv_stride=cfg.kv_stride))
        self.proj_out = nn.Sequential(LayerNorm2d(cfg.width, elementwise_affine=False, eps=1e-6),
                                      nn.Conv2d(cfg.width, cfg.entry_channels, kernel_size=1))
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.shape[1] > 1:  # not the depthwise convs
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        scale_residual_branches(self.blocks, cfg.depth)
        nn.init.zeros_(self.proj_out[1].weight)

    @property
    def kv_stride(self) -> int:
        return next(m.kv_stride for m in self.blocks if isinstance(m, KVCompressedAttention))

    def set_kv_stride(self, stride: int) -> list[str]:
        """Switch the KV compression of every attention block; returns the names of new parameters."""
        new = []
        for i, m in enumerate(self.blocks):
            if isinstance(m, KVCompressedAttention):
                new += [f"blocks.{i}.{n}" for n in m.set_kv_stride(stride)]
        return new

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.proj_in(x)
        for block in self.blocks:
            if isinstance(block, KVCompressedAttention):
                h = block(h, cond)
            elif isinstance(block, TimestepBlock):
                h = block(h, t_emb)
            else:
                h = block(h)
        return x + self.proj_out(h)


# -- the two architectures ------------------------------------------------------------------------
class _PixelModel(nn.Module):
    """What both phases share: the time embedding, condition encoders, core and input checks."""

    config: PixelDecoderConfig

    def _shared(self, cfg: PixelDecoderConfig, core: Core | None, condition: ConditionEncoder | None,
                time_embed: TimeEmbedding | None) -> None:
        self.time_embed = time_embed if time_embed is not None else TimeEmbedding(cfg.c_r, cfg.c_t)
        self.condition = condition if condition is not None else ConditionEncoder(cfg)
        self.core = core if core is not None else Core(cfg)

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this."""
        return 2 ** len(self.config.level_widths) if self.config.grown else self.config.patch

    def _check(self, x: torch.Tensor, semantic: torch.Tensor, text: torch.Tensor | None) -> None:
        cfg, m = self.config, self.size_multiple
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"the pixel decoder expects images (B, 3, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % m or x.shape[-1] % m:
            raise ValueError(f"image sides must be multiples of {m} px for this pixel decoder, got "
                             f"{x.shape[-2]}x{x.shape[-1]}")
        if semantic.dim() != 4 or semantic.shape[1] != cfg.c_semantic or semantic.shape[0] != x.shape[0]:
            raise ValueError(f"semantic latents must be (B={x.shape[0]}, {cfg.c_semantic}, h, w), "
                             f"got {tuple(semantic.shape)}")
        if cfg.c_text and (text is None or text.dim() != 3 or text.shape[-1] != cfg.c_text):
            got = None if text is None else tuple(text.shape)
            raise ValueError(f"this pixel decoder needs text states (B, tokens, {cfg.c_text}), got {got}; "
                             "use the empty prompt's states for unconditional sampling")

    def _inputs(self, x, r, semantic, text):
        self._check(x, semantic, text)
        return self.time_embed(r).to(x.dtype), self.condition.tokens(semantic, text if self.config.c_text else None)


class ShallowUViT(_PixelModel):
    """Phase 1: entry conv -> residual block -> [+ semantic map] core -> residual block (+ skip) -> head.

    ``forward(x_t, r, semantic, text)`` predicts the noise eps of ``x_t`` (images in [-1, 1]).
    """

    def __init__(self, config: PixelDecoderConfig | str | dict = "tiny"):
        super().__init__()
        cfg = pixel_decoder_config(config)
        self.config = cfg = replace(cfg, target_resolution=0) if cfg.grown else cfg
        c, p = cfg.entry_channels, cfg.patch
        self._shared(cfg, None, None, None)
        self.entry = nn.Conv2d(3, c, kernel_size=p, stride=p)
        self.encoder = ResBlock(c, c, cfg.c_t, cfg.dropout)
        self.decoder = ResBlock(c, c, cfg.c_t, cfg.dropout)
        self.head = nn.Sequential(nn.GroupNorm(_groups(c), c), nn.SiLU(), nn.Conv2d(c, 3 * p * p, 3, padding=1),
                                  nn.PixelShuffle(p))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)

    def forward(self, x: torch.Tensor, r: torch.Tensor, semantic: torch.Tensor,
                text: torch.Tensor | None = None) -> torch.Tensor:
        t_emb, tokens = self._inputs(x, r, semantic, text)
        skip = h = self.encoder(self.entry(x), t_emb)
        h = self.core(h + self.condition.grid_map(semantic, h.shape[-2:]), t_emb, tokens)
        return self.head(self.decoder(h + skip, t_emb))


class GrownUViT(_PixelModel):
    """Phase 2: U-Net levels from the target resolution down to the core grid, around the core.

    Level i (side ``target / 2^i``, width ``level_widths[i]``): residual blocks (+ attention), the
    skip, a stride-2 conv down; on the way up a nearest-neighbour 2x upsample + 3x3 conv, the skip
    added, the level's blocks again. The deepest level's down conv maps to the core's
    ``entry_channels``. ``core``, ``condition`` and ``time_embed`` may be given (``grow``).
    """

    def __init__(self, config: PixelDecoderConfig | str | dict, core: Core | None = None,
                 condition: ConditionEncoder | None = None, time_embed: TimeEmbedding | None = None):
        super().__init__()
        cfg = pixel_decoder_config(config)
        if not cfg.grown:
            raise ValueError("a grown pixel decoder needs target_resolution (and the level plan) in its config")
        self.config = cfg
        self._shared(cfg, core, condition, time_embed)
        widths = cfg.level_widths
        below = list(widths[1:]) + [cfg.entry_channels]
        self.entry = nn.Conv2d(3, widths[0], 3, padding=1)
        self.down, self.up = nn.ModuleList(), nn.ModuleList()
        self.downsample, self.upsample = nn.ModuleList(), nn.ModuleList()
        for w, w_below, n, heads, kv in zip(widths, below, cfg.level_blocks, cfg.level_heads, cfg.level_kv_strides):
            self.down.append(self._level(cfg, w, n, heads, kv))
            self.downsample.append(nn.Conv2d(w, w_below, kernel_size=2, stride=2))
            self.upsample.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                               nn.Conv2d(w_below, w, 3, padding=1)))
            self.up.append(self._level(cfg, w, n, heads, kv))
        self.head = nn.Sequential(nn.GroupNorm(_groups(widths[0]), widths[0]), nn.SiLU(),
                                  nn.Conv2d(widths[0], 3, 3, padding=1))
        nn.init.zeros_(self.head[2].weight)
        nn.init.zeros_(self.head[2].bias)
        self.added_to_core: tuple[str, ...] = ()  # core parameters that growth added (``grow``)

    @staticmethod
    def _level(cfg: PixelDecoderConfig, width: int, blocks: int, heads: int, kv_stride: int) -> nn.ModuleList:
        level = nn.ModuleList()
        for _ in range(blocks):
            level.append(ResBlock(width, width, cfg.c_t, cfg.dropout))
            if heads:
                level.append(KVCompressedAttention(width, cfg.width, heads, self_attn=True, dropout=cfg.dropout,
                                                   kv_stride=kv_stride))
        return level

    @staticmethod
    def _run(level: nn.ModuleList, h: torch.Tensor, t_emb: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        for block in level:
            h = block(h, tokens) if isinstance(block, KVCompressedAttention) else block(h, t_emb)
        return h

    def forward(self, x: torch.Tensor, r: torch.Tensor, semantic: torch.Tensor,
                text: torch.Tensor | None = None) -> torch.Tensor:
        t_emb, tokens = self._inputs(x, r, semantic, text)
        h, skips = self.entry(channels_last(x)), []
        for level, down in zip(self.down, self.downsample):
            h = self._run(level, h, t_emb, tokens)
            skips.append(h)
            h = down(h)
        h = self.core(h + self.condition.grid_map(semantic, h.shape[-2:]), t_emb, tokens)
        for level, up, skip in reversed(list(zip(self.up, self.upsample, skips))):
            h = self._run(level, up(h) + skip, t_emb, tokens)
        return self.head(h).contiguous()


def build_pixel_model(config: PixelDecoderConfig | str | dict) -> ShallowUViT | GrownUViT:
    """The architecture a config describes: grown when it has a ``target_resolution``, else Shallow-UViT."""
    cfg = pixel_decoder_config(config)
    return GrownUViT(cfg) if cfg.grown else ShallowUViT(cfg)


def grow(model: ShallowUViT, target_resolution: int, plan: PixelDecoderConfig | dict | None = None) -> GrownUViT:
    """Phase 2: discard the shallow encoder/decoder, entry and head; grow U-Net levels around the same core.

    ``plan`` gives the new levels (``level_*`` fields, a ``kv_stride`` for the core's attention and
    ``dropout``; a config or dict), default the model's own config. The returned model holds
    ``model.core``, ``model.condition`` and ``model.time_embed`` themselves (same objects, same
    weights); everything else is freshly initialised. Switching on KV compression in the core adds
    average-initialised convs, listed in ``added_to_core``.
    """
    if not isinstance(model, ShallowUViT):
        raise ValueError(f"grow() takes a phase-1 ShallowUViT, got {type(model).__name__}")
    src = model.config
    if isinstance(plan, PixelDecoderConfig):
        plan = plan.to_dict()
    keys = ("level_widths", "level_blocks", "level_heads", "level_kv_strides", "kv_stride", "dropout")
    plan = {k: v for k, v in (plan or {}).items() if k in keys}
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in plan.items()}
    cfg = replace(src, target_resolution=target_resolution, **fields)
    grown = GrownUViT(cfg, core=model.core, condition=model.condition, time_embed=model.time_embed)
    added = model.core.set_kv_stride(cfg.kv_stride)
    grown.added_to_core = tuple(f"core.{n}" for n in added)
    return grown


def check_core_match(config: PixelDecoderConfig, phase1: PixelDecoderConfig, source: str) -> None:
    """A clear error when a phase-2 config's core differs from the phase-1 checkpoint it grows from."""
    diff = {k: (getattr(config, k), getattr(phase1, k)) for k in CORE_FIELDS if getattr(config, k) != getattr(phase1, k)}
    if diff:
        listed = ", ".join(f"{k}: {mine} vs {theirs}" for k, (mine, theirs) in diff.items())
        raise ValueError(f"the phase 2 config's core does not match the phase 1 checkpoint {source} "
                         f"(phase 2 config vs checkpoint: {listed}); set the size's core fields "
                         f"{list(CORE_FIELDS)} to the checkpoint's ({phase1.core_dict()}) or pick the right init_from")


def freeze_plan(model: nn.Module, mode: str, unfrozen: bool = False) -> dict[str, list[str]]:
    """Which parameters train in phase 2, as ``{"trained": [...], "frozen": [...]}``; sets ``requires_grad``.

    ``greedy``: the core and the condition encoders are frozen (except parameters growth added to
    the core), the time embedding and the new levels train. ``finetune`` and ``scratch``: everything
    trains. ``freeze_unfreeze``: as ``greedy`` until ``unfrozen`` (phase 3), then everything.
    """
    if mode not in MODES:
        raise ValueError(f"unknown training mode {mode!r}; choose one of {list(MODES)}")
    added = set(getattr(model, "added_to_core", ()))
    freeze = mode == "greedy" or (mode == "freeze_unfreeze" and not unfrozen)
    plan: dict[str, list[str]] = {"trained": [], "frozen": []}
    for name, p in model.named_parameters():
        frozen = freeze and name.startswith(FROZEN_IN_GREEDY) and name not in added
        p.requires_grad_(not frozen)
        plan["frozen" if frozen else "trained"].append(name)
    return plan
