"""Stable Cascade (Würstchen v3): its Stage C and Stage B, as released in Stability-AI/StableCascade
(``modules/stage_c.py``, ``modules/stage_b.py``) and diffusers' ``StableCascadeUNet``.

Both stages are one U-Net design: levels of [ConvNeXt block, timestep block, (attention block)] groups,
each level run ``repeats`` times with shared weights (a 1x1 conv between repeats), joined by a
LayerNorm and a resampling conv, a U-Net skip into the first block of each up level but the lowest,
and a head that predicts the noise eps directly (zero-initialised). The attention blocks attend to
their own image tokens plus the condition tokens (self- and cross-attention in one call); the time
embedding is followed by one embedding per extra scalar condition (``sca``, ``crp``; zeros unless
given), each with its own mapper in every timestep block.

* ``StageC3`` (the prior): one resolution (the level switch is a LayerNorm + 1x1 conv), condition tokens
  = mapped text states (77 of CLIP ViT-bigG's last hidden layer, before its final norm) + ``c_seq`` tokens
  of the pooled text embedding + ``c_seq`` of a CLIP ViT-L image embedding (zeros unless given),
  under a LayerNorm without parameters: 85 tokens in the release.
* ``StageB3`` (the decoder): four levels with strided convs; the compressor's latents are added once at
  the input (``semantic_mapper``, bilinear-resized), as is an 8x8 ``pixels`` map (zeros by default);
  condition tokens come from the pooled text alone.

The networks return the raw eps head; ``diffusion`` reads it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from stages.blocks import (AttentionBlock, ConvNeXtBlock, LayerNorm2d, TimestepBlock, add_control, check_control,
                           timestep_embedding)
from common.config import DictConfig

# checkpoint stage names of each version, and how errors name them
STAGE_NAMES = {"stage_c": "Würstchen v2 Stage C", "stage_b": "Würstchen v2 Stage B",
               "stage_c3": "Stable Cascade (v3) Stage C", "stage_b3": "Stable Cascade (v3) Stage B"}


@dataclass(frozen=True)
class CascadeConfig(DictConfig):
    name = "Stable Cascade config"

    widths: tuple[int, ...] = (2048, 2048)  # channels per level
    heads: tuple[int, ...] = (32, 32)  # attention heads per level; 0 = no attention block there
    blocks_down: tuple[int, ...] = (8, 24)  # groups per level on the way down
    blocks_up: tuple[int, ...] = (8, 24)  # groups per level on the way up (level order, like blocks_down)
    repeats_down: tuple[int, ...] = (1, 1)  # times each down level runs its (shared) groups
    repeats_up: tuple[int, ...] = (1, 1)
    resample: str = "pointwise"  # level switch: "pointwise" (LayerNorm + 1x1 conv, one resolution) or "strided"
    c_latent: int = 16  # input and output channels
    patch_size: int = 1
    c_cond: int = 2048  # width of the condition tokens
    c_r: int = 64  # sinusoidal embedding width of the time and of each extra condition
    t_conds: tuple[str, ...] = ("sca", "crp")  # extra scalar conditions of the timestep blocks
    c_text: int | None = 1280  # text state width (CLIP ViT-bigG: 1280); None = no text state tokens
    c_pooled: int = 1280  # pooled text embedding width
    c_image: int | None = 768  # CLIP image embedding width (ViT-L: 768); None = no image tokens
    c_seq: int = 4  # tokens per pooled text / image embedding
    c_semantic: int | None = None  # compressor latent channels added at the input (Stage B: 16)
    c_pixels: int | None = None  # channels of the low-resolution pixel map added at the input (Stage B: 3)
    kernel_size: int = 3
    dropout: tuple[float, ...] = (0.1, 0.1)
    self_attn: bool = True
    activation_checkpointing: bool = False  # recompute each block in backward (saves memory; same results)
    prediction: str = "eps"  # the head: the noise (as released) or "v" (the tiny decoder)

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"Stable Cascade prediction must be 'eps' or 'v', got {self.prediction!r}")
        n = len(self.widths)
        per_level = (self.heads, self.blocks_down, self.blocks_up, self.repeats_down, self.repeats_up, self.dropout)
        if any(len(v) != n for v in per_level):
            raise ValueError("widths, heads, blocks_down, blocks_up, repeats_down, repeats_up and dropout need one "
                             "entry per level")
        if self.resample not in ("pointwise", "strided"):
            raise ValueError(f"resample must be 'pointwise' or 'strided', got {self.resample!r}")
        for w, h in zip(self.widths, self.heads):
            if h and w % h:
                raise ValueError(f"level width {w} is not divisible by its {h} attention heads")


def _levels(widths, heads, down, up, **kw) -> CascadeConfig:
    n = len(widths)
    kw.setdefault("repeats_down", (1,) * n)
    kw.setdefault("repeats_up", (1,) * n)
    return CascadeConfig(widths=widths, heads=heads, blocks_down=down, blocks_up=up, **kw)


STAGE_C_PRESETS: dict[str, CascadeConfig] = {
    # MiniLM states (384) and their mean as the pooled text; the release's image slot (768, zeros unless
    # given) kept so the diffusers layout can express it; trains on 2 CPU cores
    "tiny": _levels((128, 128), (4, 4), (2, 2), (2, 2), c_cond=128, c_text=384, c_pooled=384, dropout=(0.0, 0.0)),
    # finetune_c_1b / stage_c_lite: 1536 channels, 24 heads, blocks [[4, 12], [12, 4]]
    "sc_lite": _levels((1536, 1536), (24, 24), (4, 12), (4, 12), c_cond=1536),
    # finetune_c_3b / stage_c: 2048 channels, 32 heads, blocks [[8, 24], [24, 8]]
    "sc_big": _levels((2048, 2048), (32, 32), (8, 24), (8, 24), c_cond=2048),
}

_STAGE_B = dict(resample="strided", c_latent=4, patch_size=2, c_cond=1280, t_conds=("sca",), c_text=None,
                c_pooled=1280, c_image=None, c_semantic=16, c_pixels=3, dropout=(0.0, 0.0, 0.1, 0.1))
STAGE_B_PRESETS: dict[str, CascadeConfig] = {
    # 128 px images -> 32x32 Stage A latents; MiniLM mean-pooled text; attention on the two lower levels
    "tiny": _levels((48, 96, 192), (0, 4, 8), (1, 2, 2), (2, 2, 1), **{
        **_STAGE_B, "c_cond": 64, "c_pooled": 384, "dropout": (0.0, 0.0, 0.0), "repeats_up": (2, 1, 1)}),
    # finetune_b_700m / stage_b_lite: [320, 576, 1152, 1152], blocks [[2, 4, 14, 4], [4, 14, 4, 2]], repeats 2 up
    "sc_lite": _levels((320, 576, 1152, 1152), (0, 0, 18, 18), (2, 4, 14, 4), (2, 4, 14, 4),
                       repeats_up=(2, 2, 2, 2), **_STAGE_B),
    # finetune_b_3b / stage_b: [320, 640, 1280, 1280], blocks [[2, 6, 28, 6], [6, 28, 6, 2]], repeats [3, 3, 2, 2] up
    "sc_big": _levels((320, 640, 1280, 1280), (0, 0, 20, 20), (2, 6, 28, 6), (2, 6, 28, 6),
                      repeats_up=(2, 2, 3, 3), **_STAGE_B),
}


def stage_c3_config(size: str | CascadeConfig | dict) -> CascadeConfig:
    """A Stable Cascade Stage C preset name (``tiny``, ``sc_lite``, ``sc_big``), a dict of fields, or a config."""
    return CascadeConfig.pick(size, STAGE_C_PRESETS)


def stage_b3_config(size: str | CascadeConfig | dict) -> CascadeConfig:
    """A Stable Cascade Stage B preset name (``tiny``, ``sc_lite``, ``sc_big``), a dict of fields, or a config."""
    return CascadeConfig.pick(size, STAGE_B_PRESETS)


def _mapper(c_in: int, width: int) -> nn.Sequential:
    """1x1 conv to 4x width, GELU, 1x1 conv to width, LayerNorm: the input maps of the compressor latents and pixels."""
    return nn.Sequential(nn.Conv2d(c_in, width * 4, kernel_size=1), nn.GELU(),
                         nn.Conv2d(width * 4, width, kernel_size=1),
                         LayerNorm2d(width, elementwise_affine=False, eps=1e-6))


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x.float(), size=tuple(size), mode="bilinear", align_corners=True).to(x.dtype)


class CascadeUNet(nn.Module):
    """The U-Net body both Stable Cascade stages share; subclasses gather the conditions."""

    def __init__(self, config: CascadeConfig):
        super().__init__()
        self.config = cfg = config
        n = len(cfg.widths)
        self.pooled_mapper = nn.Linear(cfg.c_pooled, cfg.c_cond * cfg.c_seq)
        self.text_mapper = nn.Linear(cfg.c_text, cfg.c_cond) if cfg.c_text else None
        self.image_mapper = nn.Linear(cfg.c_image, cfg.c_cond * cfg.c_seq) if cfg.c_image else None
        self.cond_norm = nn.LayerNorm(cfg.c_cond, elementwise_affine=False, eps=1e-6)
        self.semantic_mapper = _mapper(cfg.c_semantic, cfg.widths[0]) if cfg.c_semantic else None
        self.pixels_mapper = _mapper(cfg.c_pixels, cfg.widths[0]) if cfg.c_pixels else None
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(cfg.patch_size),
            nn.Conv2d(cfg.c_latent * cfg.patch_size ** 2, cfg.widths[0], kernel_size=1),
            LayerNorm2d(cfg.widths[0], elementwise_affine=False, eps=1e-6),
        )

        def groups(level: int, count: int, c_skip: int) -> nn.ModuleList:
            c, heads, dropout = cfg.widths[level], cfg.heads[level], cfg.dropout[level]
            out = nn.ModuleList()
            for j in range(count):
                out.append(ConvNeXtBlock(c, c_skip if j == 0 else 0, cfg.kernel_size, dropout))
                out.append(TimestepBlock(c, cfg.c_r, cfg.t_conds))
                if heads:
                    out.append(AttentionBlock(c, cfg.c_cond, heads, cfg.self_attn, dropout))
            return out

        def switch(c_in: int, c_out: int, up: bool) -> nn.Sequential:
            if cfg.resample == "pointwise":
                conv = nn.Conv2d(c_in, c_out, kernel_size=1)
            else:
                conv = (nn.ConvTranspose2d if up else nn.Conv2d)(c_in, c_out, kernel_size=2, stride=2)
            return nn.Sequential(LayerNorm2d(c_in, elementwise_affine=False, eps=1e-6), conv)

        self.down_scalers = nn.ModuleList([nn.Identity()] + [switch(cfg.widths[i - 1], cfg.widths[i], False)
                                                             for i in range(1, n)])
        self.down_blocks = nn.ModuleList([groups(i, cfg.blocks_down[i], 0) for i in range(n)])
        self.down_repeat_mappers = nn.ModuleList(
            [nn.ModuleList([nn.Conv2d(cfg.widths[i], cfg.widths[i], 1) for _ in range(cfg.repeats_down[i] - 1)])
             for i in range(n)])
        up_levels = list(reversed(range(n)))
        self.up_blocks = nn.ModuleList([groups(i, cfg.blocks_up[i], cfg.widths[i] if i < n - 1 else 0)
                                        for i in up_levels])
        self.up_repeat_mappers = nn.ModuleList(
            [nn.ModuleList([nn.Conv2d(cfg.widths[i], cfg.widths[i], 1) for _ in range(cfg.repeats_up[i] - 1)])
             for i in up_levels])
        self.up_scalers = nn.ModuleList([switch(cfg.widths[i], cfg.widths[i - 1], True) if i > 0 else nn.Identity()
                                         for i in up_levels])
        self.head = nn.Sequential(
            LayerNorm2d(cfg.widths[0], elementwise_affine=False, eps=1e-6),
            nn.Conv2d(cfg.widths[0], cfg.c_latent * cfg.patch_size ** 2, kernel_size=1),
            nn.PixelShuffle(cfg.patch_size),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """As released: Xavier; condition maps N(0, 0.02); input conv Xavier with gain 0.02; zero head;
        ConvNeXt outputs scaled by sqrt(1 / sum(blocks_down)); timestep mappers zero."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in (self.pooled_mapper, self.text_mapper, self.image_mapper):
            if m is not None:
                nn.init.normal_(m.weight, std=0.02)
        for m in (self.semantic_mapper, self.pixels_mapper):
            if m is not None:
                nn.init.normal_(m[0].weight, std=0.02)
                nn.init.normal_(m[2].weight, std=0.02)
        nn.init.xavier_uniform_(self.embedding[1].weight, gain=0.02)
        nn.init.zeros_(self.head[1].weight)
        scale = math.sqrt(1 / sum(self.config.blocks_down))
        for m in [*self.down_blocks.modules(), *self.up_blocks.modules()]:
            if isinstance(m, ConvNeXtBlock):
                m.channelwise[-1].weight.data.mul_(scale)
            elif isinstance(m, TimestepBlock):
                for linear in m.modules():
                    if isinstance(linear, nn.Linear):
                        nn.init.zeros_(linear.weight)

    def time_embedding(self, r: torch.Tensor, extra: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The embedding of ``r`` followed by one of each ``t_conds`` condition (zeros where not given)."""
        unknown = set(extra) - set(self.config.t_conds)
        if unknown:
            raise ValueError(f"unknown time conditions {sorted(unknown)}; this network takes "
                             f"{list(self.config.t_conds)}")
        embeds = [timestep_embedding(r, self.config.c_r)]
        for name in self.config.t_conds:
            value = extra.get(name)
            embeds.append(timestep_embedding(torch.zeros_like(r) if value is None else value, self.config.c_r))
        return torch.cat(embeds, dim=1)

    def pooled_tokens(self, mapper: nn.Linear, embedding: torch.Tensor) -> torch.Tensor:
        """(B, c) or (B, n, c) -> (B, n * c_seq, c_cond)."""
        if embedding.dim() == 2:
            embedding = embedding[:, None]
        return mapper(embedding).view(embedding.shape[0], embedding.shape[1] * self.config.c_seq, -1)

    @property
    def convnext_calls(self) -> int:
        """ConvNeXt block calls of one forward pass, repeats included: the injection points a ControlNet
        counts (StableCascade ``modules/stage_c.py``)."""
        cfg = self.config
        return sum(b * r for b, r in zip(cfg.blocks_down, cfg.repeats_down)) + \
            sum(b * r for b, r in zip(cfg.blocks_up, cfg.repeats_up))

    def run(self, h: torch.Tensor, r_embed: torch.Tensor, cond: torch.Tensor,
            control: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """The down and up paths from the embedded input ``h`` to the head's output; ``control``: ControlNet
        features added before the ConvNeXt block calls they are listed for (``add_control``)."""
        recompute = self.config.activation_checkpointing and self.training and torch.is_grad_enabled()
        check_control(control, self.convnext_calls)
        calls = 0

        def call(block: nn.Module, h: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
            nonlocal calls
            if isinstance(block, ConvNeXtBlock):
                h = add_control(h, control, calls)
                calls += 1
            extra = ((skip,) if isinstance(block, ConvNeXtBlock) else (r_embed,) if isinstance(block, TimestepBlock)
                     else (cond,) if isinstance(block, AttentionBlock) else ())
            return checkpoint(block, h, *extra, use_reentrant=False) if recompute else block(h, *extra)

        levels = []
        for scaler, blocks, mappers in zip(self.down_scalers, self.down_blocks, self.down_repeat_mappers):
            h = scaler(h)
            for repeat in range(len(mappers) + 1):
                for block in blocks:
                    h = call(block, h)
                if repeat < len(mappers):
                    h = mappers[repeat](h)
            levels.insert(0, h)
        h = levels[0]
        for i, (blocks, mappers, scaler) in enumerate(zip(self.up_blocks, self.up_repeat_mappers, self.up_scalers)):
            for repeat in range(len(mappers) + 1):
                for k, block in enumerate(blocks):
                    skip = levels[i] if k == 0 and i > 0 else None
                    if skip is not None and h.shape[-2:] != skip.shape[-2:]:  # odd sides: match the skip's grid
                        h = _resize(h, skip.shape[-2:])
                    h = call(block, h, skip)
                if repeat < len(mappers):
                    h = mappers[repeat](h)
            h = scaler(h)
        return self.head(h)

    def _check_input(self, x: torch.Tensor, what: str) -> None:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.c_latent:
            raise ValueError(f"{type(self).__name__} expects {what} (B, {cfg.c_latent}, h, w), got {tuple(x.shape)}")
        p = cfg.patch_size  # other sides pass: the up path resizes to each skip's grid, as released
        if x.shape[-2] % p or x.shape[-1] % p:
            raise ValueError(f"{type(self).__name__}: the grid {tuple(x.shape[-2:])} is not a multiple of the patch "
                             f"size {p}; resize or crop the images")

    def _check_pooled(self, pooled: torch.Tensor | None, batch: int) -> None:
        c = self.config.c_pooled
        if pooled is None or pooled.dim() not in (2, 3) or pooled.shape[-1] != c or pooled.shape[0] != batch:
            got = None if pooled is None else tuple(pooled.shape)
            raise ValueError(f"{type(self).__name__} needs a pooled text embedding ({batch}, {c}) or "
                             f"({batch}, 1, {c}), "
                             f"got {got}; use the empty prompt's for unconditional sampling")


class StageC3(CascadeUNet):
    """Stable Cascade's Stage C: ``forward(x, r, text, pooled, image=None, **{sca, crp})`` -> eps."""

    def __init__(self, config: CascadeConfig | str | dict = "tiny"):
        super().__init__(stage_c3_config(config))
        if self.config.c_semantic or self.config.c_pixels:
            raise ValueError("a Stage C takes no compressor latents or pixel map (c_semantic, c_pixels must be None)")

    def conditions(self, text: torch.Tensor | None, pooled: torch.Tensor, image: torch.Tensor | None) -> torch.Tensor:
        """The normalised condition tokens: mapped text states, pooled text tokens, image tokens."""
        cfg, b = self.config, pooled.shape[0]
        tokens = []
        if self.text_mapper is not None:
            if text is None or text.dim() != 3 or text.shape[-1] != cfg.c_text or text.shape[0] != b:
                got = None if text is None else tuple(text.shape)
                raise ValueError(f"Stage C needs text states ({b}, tokens, {cfg.c_text}), got {got}; "
                                 "use the empty prompt's states for unconditional sampling")
            tokens.append(self.text_mapper(text))
        tokens.append(self.pooled_tokens(self.pooled_mapper, pooled))
        if self.image_mapper is not None:
            if image is None:  # no image prompt: the release's zeros
                image = pooled.new_zeros(b, 1, cfg.c_image)
            if image.dim() not in (2, 3) or image.shape[-1] != cfg.c_image or image.shape[0] != b:
                raise ValueError(f"image embeddings must be ({b}, {cfg.c_image}) or ({b}, n, {cfg.c_image}), "
                                 f"got {tuple(image.shape)}")
            tokens.append(self.pooled_tokens(self.image_mapper, image))
        elif image is not None:
            raise ValueError("this Stage C has no image conditioning (c_image is None); drop the image embedding")
        return self.cond_norm(torch.cat(tokens, dim=1))

    def forward(self, x: torch.Tensor, r: torch.Tensor, text: torch.Tensor | None, pooled: torch.Tensor,
                image: torch.Tensor | None = None, control: list[torch.Tensor | None] | None = None,
                **time_conditions: torch.Tensor | None) -> torch.Tensor:
        """``control``: a ControlNet's features (``stages.controlnet``), one entry (or None) per ConvNeXt block call."""
        self._check_input(x, "compressor latents")
        self._check_pooled(pooled, x.shape[0])
        cond = self.conditions(text, pooled.to(x.dtype), None if image is None else image.to(x.dtype))
        r_embed = self.time_embedding(r, time_conditions).to(x.dtype)
        return self.run(self.embedding(x), r_embed, cond, control)


class StageB3(CascadeUNet):
    """Stable Cascade's Stage B: ``forward(x, r, semantic, pooled, pixels=None, **{sca})`` -> eps."""

    def __init__(self, config: CascadeConfig | str | dict = "tiny"):
        super().__init__(stage_b3_config(config))
        cfg = self.config
        if not cfg.c_semantic or cfg.c_text or cfg.c_image:
            raise ValueError("a Stage B takes compressor latents (c_semantic) and pooled text only "
                             "(c_text and c_image must be None)")

    def forward(self, x: torch.Tensor, r: torch.Tensor, semantic: torch.Tensor, pooled: torch.Tensor,
                pixels: torch.Tensor | None = None, **time_conditions: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        self._check_input(x, "Stage A latents")
        self._check_pooled(pooled, x.shape[0])
        if semantic is None or semantic.dim() != 4 or semantic.shape[1] != cfg.c_semantic:
            got = None if semantic is None else tuple(semantic.shape)
            raise ValueError(f"compressor latents must be (B, {cfg.c_semantic}, h, w), got {got}")
        cond = self.cond_norm(self.pooled_tokens(self.pooled_mapper, pooled.to(x.dtype)))
        r_embed = self.time_embedding(r, time_conditions).to(x.dtype)
        h = self.embedding(x)
        h = h + self.semantic_mapper(_resize(semantic, h.shape[-2:]).to(x.dtype))
        if self.pixels_mapper is not None:
            if pixels is None:  # the release's default: an 8x8 map of zeros
                pixels = x.new_zeros(x.shape[0], cfg.c_pixels, 8, 8)
            h = h + _resize(self.pixels_mapper(pixels.to(x.dtype)), h.shape[-2:])
        return self.run(h, r_embed, cond)
