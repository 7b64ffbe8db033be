"""Checks of the tensors handed to the networks: float RGB images in [0, 1].

Every check raises ``ValueError`` with one line naming the problem and the fix, before any work.
"""
from __future__ import annotations

import math

import torch


def check_images(images: torch.Tensor, who: str) -> None:
    """Float RGB images ``(B, 3, H, W)``, B, H, W >= 1, finite and in [0, 1]; ``who`` names the model.

    Integer images (uint8) are refused, not rescaled: divide by 255 first. One ``aminmax`` per call
    checks range and finiteness (skipped for meta tensors and while ``torch.compile`` traces).
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{who} expects a tensor of images (B, 3, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{who} expects RGB images of shape (B, 3, H, W) in [0, 1], got shape "
                         f"{tuple(images.shape)}; convert grayscale/RGBA images to RGB first")
    if images.numel() == 0:
        raise ValueError(f"{who} got an empty batch of images, shape {tuple(images.shape)}; pass at least one image")
    if not images.is_floating_point():
        raise ValueError(f"{who} expects float images in [0, 1], got dtype {images.dtype}; "
                         "convert with images.float() / 255")
    if images.is_meta or torch.compiler.is_compiling():  # no values: shape-only runs (FLOP counts) and tracing
        return
    low, high = torch.stack(torch.aminmax(images.detach())).tolist()
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{who} got images containing NaN; check how they were made")
    if not (0.0 <= low and high <= 1.0):
        problem = "inf" if math.isinf(low) or math.isinf(high) else f"values in [{low:.4g}, {high:.4g}]"
        raise ValueError(f"{who} expects images in [0, 1], got {problem}; rescale (e.g. (x + 1) / 2 for [-1, 1], "
                         "x / 255 for 0..255) or clamp to [0, 1]")
