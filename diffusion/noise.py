"""Training noise other than i.i.d. Gaussian: the pyramid (multi-resolution) noise Stable Cascade's Stage B
trains with (StableCascade ``train/train_b.py``, ``_pyramid_noise``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pyramid_noise(noise: torch.Tensor, generator: torch.Generator | None = None, levels: int = 10,
                  size_range: tuple[int, int] | None = (1, 16), discount: float = 0.75) -> torch.Tensor:
    """``noise`` (B, C, H, W) plus, for i = 1 .. levels - 1, Gaussian noise drawn at (H / 2^i, W / 2^i),
    nearest-upsampled and weighted discount^i, then rescaled to unit variance (divided by the root of the
    sum of the squared weights). Only levels with a side in ``size_range`` (inclusive; None: all) are
    added, and the pyramid stops at a side of 1. The release takes both sides from H (square images);
    here each side is halved from its own length."""
    out, weights = noise.clone(), [1.0]
    h0, w0 = noise.shape[-2:]
    for i in range(1, levels):
        h, w = max(h0 // 2 ** i, 1), max(w0 // 2 ** i, 1)
        if size_range is None or size_range[0] <= h <= size_range[1] or size_range[0] <= w <= size_range[1]:
            device = generator.device if generator is not None else noise.device
            coarse = torch.randn(*noise.shape[:2], h, w, generator=generator, device=device, dtype=noise.dtype)
            out = out + F.interpolate(coarse.to(noise.device), size=(h0, w0), mode="nearest") * discount ** i
            weights.append(discount ** i)
        if h <= 1 or w <= 1:
            break
    return out / sum(m * m for m in weights) ** 0.5
