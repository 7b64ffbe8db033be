"""Building blocks shared by every stage (Würstchen paper, Appendix E, and the released models).

Each block is written once here and reused by Stage A (``MixingBlock``), Stage B and
Stage C (``ConvNeXtBlock``, ``TimestepBlock``, ``AttentionBlock``, ``LayerNorm2d``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``(B, C, H, W)`` tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def add_control(h: torch.Tensor, control, index: int) -> torch.Tensor:
    """``h`` plus a ControlNet's features for the ``index``-th ConvNeXt block (None where it has none), resized
    bilinearly (corners aligned) to ``h``'s grid, as before each chosen block of StableCascade's
    ``modules/stage_c.py``. Adding the zeros of an untrained ControlNet leaves ``h`` unchanged bit for bit."""
    if control is None or index >= len(control) or control[index] is None:
        return h
    c = control[index]
    if c.dim() != 4 or c.shape[1] != h.shape[1] or c.shape[0] not in (1, h.shape[0]):
        raise ValueError(f"ControlNet features for block {index} are {tuple(c.shape)}; this Stage C needs "
                         f"({h.shape[0]} or 1, {h.shape[1]}, h, w): the ControlNet was made for a Stage C of width "
                         f"{c.shape[1] if c.dim() == 4 else '?'}, this one has {h.shape[1]}")
    if c.shape[-2:] != h.shape[-2:]:
        c = F.interpolate(c.float(), size=h.shape[-2:], mode="bilinear", align_corners=True)
    return h + c.to(h.dtype)


def check_control(control, blocks: int) -> None:
    """Refuse ControlNet features meant for more ConvNeXt blocks than a Stage C has."""
    if control is not None and len(control) > blocks:
        raise ValueError(f"the ControlNet injects before ConvNeXt block {len(control) - 1}, but this Stage C has "
                         f"{blocks} ConvNeXt blocks; use a ControlNet made for this Stage C")


class GlobalResponseNorm(nn.Module):
    """GRN of ConvNeXt-V2 on channels-last ``(B, H, W, C)`` tensors."""

    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, channels))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.norm(x, p=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` (B, C, H, W) stored channels-last (NHWC): the blocks' permutes to (B, H, W, C) for
    LayerNorm and the channel MLPs become free views. Same values; the networks convert their image
    or latent input once (CPU: Stage A 8-19% and Stage B 5-7% faster, ``python -m benchmarks``)."""
    return x.contiguous(memory_format=torch.channels_last)


def replicate_pad1(x: torch.Tensor) -> torch.Tensor:
    """``F.pad(x, (1, 1, 1, 1), mode="replicate")`` written as two concatenations: same values, no slower
    eagerly, and ``torch.compile`` handles its backward (inductor's replication_pad2d_backward gets
    channels-last strides wrong in torch 2.14)."""
    x = torch.cat([x[:, :, :1], x, x[:, :, -1:]], dim=2)
    return torch.cat([x[..., :1], x, x[..., -1:]], dim=3)


class MixingBlock(nn.Module):
    """Stage A's ConvNeXt "mixing" block: x + g2 * f(norm(x) * (1 + g0) + g1), twice.

    Branch 1 is a replicate-padded depthwise 3x3 conv, branch 2 a channel MLP (c -> 4c -> c).
    The six scalars ``gammas`` start at zero, so a fresh block is the identity.
    """

    def __init__(self, channels: int, expansion: int = 4):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.depthwise = nn.Conv2d(channels, channels, kernel_size=3, groups=channels)
        self.norm2 = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(channels, channels * expansion), nn.GELU(), nn.Linear(channels * expansion, channels)
        )
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gammas
        h = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * (1 + g[0]) + g[1]
        x = x + self.depthwise(replicate_pad1(h)) * g[2]
        h = self.norm2(x.permute(0, 2, 3, 1)) * (1 + g[3]) + g[4]
        return x + self.channelwise(h).permute(0, 3, 1, 2) * g[5]


class ConvNeXtBlock(nn.Module):
    """Stage B/C ConvNeXt block: dw 3x3 -> LN -> [concat skip] -> Linear(4c) -> GELU -> GRN -> Linear(c).

    ``c_skip`` extra channels (U-Net skips, resized semantic latents) join after the norm.
    """

    def __init__(self, channels: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.norm = LayerNorm2d(channels, elementwise_affine=False, eps=1e-6)
        self.channelwise = nn.Sequential(
            nn.Linear(channels + c_skip, channels * 4),
            nn.GELU(),
            GlobalResponseNorm(channels * 4),
            nn.Dropout(dropout),
            nn.Linear(channels * 4, channels),
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(self.depthwise(x))
        if skip is not None:
            h = torch.cat([h, skip], dim=1)
        return x + self.channelwise(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def timestep_embedding(r: torch.Tensor, dim: int = 64, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the continuous time ``r`` in [0, 1], taken of ``r * max_positions``.

    The frequencies are computed as the released models compute them (``exp(-i * log(max) / (half - 1))``
    in float32): at arguments up to 10^4 a different rounding of them moves the embedding by ~2e-4.
    """
    r = r * max_positions
    half = dim // 2
    freqs = torch.arange(half, device=r.device, dtype=torch.float32).mul(-math.log(max_positions) / (half - 1)).exp()
    args = r.float()[:, None] * freqs[None, :]
    emb = torch.cat([args.sin(), args.cos()], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepBlock(nn.Module):
    """Linear conditioning on the time embedding: x * (1 + a) + b, zero-initialised (identity at start).

    ``conds`` names extra scalar conditions (Stable Cascade's ``sca``, ``crp``): ``r_embed`` is then the
    time embedding followed by one embedding per condition, and each has its own ``mapper_<name>`` whose
    (a, b) add to the time's.
    """

    def __init__(self, channels: int, c_r: int = 64, conds: tuple[str, ...] = ()):
        super().__init__()
        self.conds = tuple(conds)
        self.mapper = nn.Linear(c_r, channels * 2)
        for name in self.conds:
            setattr(self, f"mapper_{name}", nn.Linear(c_r, channels * 2))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        embeds = r_embed.chunk(len(self.conds) + 1, dim=1)
        a, b = self.mapper(embeds[0])[:, :, None, None].chunk(2, dim=1)
        for name, embed in zip(self.conds, embeds[1:]):
            ac, bc = getattr(self, f"mapper_{name}")(embed)[:, :, None, None].chunk(2, dim=1)
            a, b = a + ac, b + bc
        return x * (1 + a) + b


class AttentionBlock(nn.Module):
    """Pre-norm attention of image tokens to condition tokens (SDPA).

    Keys/values come from ``Linear(SiLU(cond))``; with ``self_attn`` the image tokens are
    concatenated to the condition tokens, giving self- plus cross-attention in one call.
    With ``c_cond=None`` there are no condition tokens and the block is plain self-attention.
    """

    def __init__(self, channels: int, c_cond: int | None, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        if channels % nhead:
            raise ValueError(f"channels ({channels}) must be divisible by nhead ({nhead})")
        if c_cond is None and not self_attn:
            raise ValueError("an attention block without condition tokens must be a self-attention block")
        self.self_attn = self_attn
        self.nhead = nhead
        self.dropout = dropout
        self.norm = LayerNorm2d(channels, elementwise_affine=False, eps=1e-6)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, channels)) if c_cond else None
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        q_in = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.kv_mapper is None:  # no condition tokens: self-attention only
            kv_in = q_in
        else:
            if cond is None:
                raise ValueError("this attention block needs condition tokens (B, tokens, c_cond)")
            kv_in = self.kv_mapper(cond)
            if self.self_attn:
                kv_in = torch.cat([q_in, kv_in], dim=1)
        return self.attend(x, q_in, kv_in)

    def attend(self, x: torch.Tensor, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
        """``x`` plus the attention of query tokens ``q_in`` (B, HW, C) to key/value tokens ``kv_in`` (B, N, C)."""
        heads = lambda t: t.unflatten(-1, (self.nhead, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(
            heads(self.to_q(q_in)), heads(self.to_k(kv_in)), heads(self.to_v(kv_in)),
            dropout_p=self.dropout if self.training else 0.0,
        )
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return x + out.transpose(1, 2).reshape(x.shape)


def scale_residual_branches(blocks: nn.Module, depth: int) -> None:
    """Init of Stage C (the released prior): residual output layers scaled by sqrt(1/depth), timestep mappers zero."""
    scale = math.sqrt(1 / depth)
    for m in blocks.modules():
        if isinstance(m, ConvNeXtBlock):
            m.channelwise[-1].weight.data.mul_(scale)
        elif isinstance(m, AttentionBlock):
            m.to_out.weight.data.mul_(scale)
        elif isinstance(m, TimestepBlock):
            nn.init.zeros_(m.mapper.weight)
