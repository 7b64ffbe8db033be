"""Stable Cascade's previewer (StableCascade ``modules/previewer.py``; ``models/previewer.safetensors``): its
Stage C latents (16 x 24 x 24 at 1024 px) straight to a coarse RGB image 8x their side, without Stage B.

Its layout differs from this project's previewer (``stages.previewer``): a 1x1 conv to ``c_hidden``, then
[3x3 conv, 2x2 transposed conv] stages halving the width (BatchNorm after every GELU), and a 1x1 conv to RGB,
unbounded. The released file's keys (``blocks.<i>.*``) load as they are.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from stages.checkpoint import load_into, load_safetensors, read_metadata, resolve_checkpoint
from stages.previewer import load_previewer


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


def load_any_previewer(path: str | os.PathLike, compressor_fingerprint: str | None = None) -> nn.Module:
    """Our previewer export (checked against the compressor, ``stages.previewer.load_previewer``), or the
    release's ``previewer.safetensors`` (``CascadePreviewer``, in eval mode; outputs clamped to [0, 1])."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors" and read_metadata(path).get("stage") is None:
        state, _ = load_safetensors(path)
        first = state.get("blocks.0.weight")
        if first is None:
            raise ValueError(f"{path} is neither our previewer export nor Stable Cascade's previewer.safetensors")
        model = load_into(CascadePreviewer(first.shape[1], first.shape[0]), state, str(path)).eval()
        return nn.Sequential(model, nn.Hardtanh(0.0, 1.0))
    return load_previewer(path, compressor_fingerprint)
