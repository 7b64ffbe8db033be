"""Control images computed from images on the fly, for ControlNets on Stage C (Stable Cascade
``modules/controlnet.py``'s filters, without OpenCV or a saliency network).

* ``canny``: (B, 3, H, W) in [0, 1] -> (B, 1, H, W) edge maps in {0, 1} (scikit-image's Canny detector on the
  luminance; the release runs OpenCV's at 224 px with thresholds 100/200 of 255).
* ``inpaint_control``: the image with the masked region set to 1 (white), and the mask: (B, 4, H, W).
* ``random_masks``: training masks, a share of them outpainting masks (the border masked, a centre kept);
  the release draws its inpainting masks from a saliency network, here they are random ellipses and rectangles.
* ``downscale``: the 2x smaller image the super-resolution control is computed from.

Masks are 1 where the image is to be (re)generated, 0 where it is kept.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, scikit-image's rgb2gray weights are close (0.2125, 0.7154, 0.0721)


def canny(images: torch.Tensor, sigma: float = 1.0, low: float = 0.1, high: float = 0.2) -> torch.Tensor:
    """Canny edges of images in [0, 1] (``sigma``: Gaussian smoothing in px; ``low``, ``high``: hysteresis
    thresholds on the gradient magnitude of the [0, 1] luminance), as (B, 1, H, W) floats in {0, 1}."""
    from skimage.feature import canny as skimage_canny  # scikit-image is imported only where edges are drawn

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"canny takes images (B, 3, H, W) or (B, 1, H, W), got {tuple(images.shape)}")
    gray = images.float().clamp(0, 1)
    if gray.shape[1] == 3:
        gray = sum(w * gray[:, i] for i, w in enumerate(LUMA))
    else:
        gray = gray[:, 0]
    edges = [skimage_canny(g.cpu().numpy().astype(np.float64), sigma=sigma, low_threshold=low, high_threshold=high)
             for g in gray]
    return torch.from_numpy(np.stack(edges)).float()[:, None].to(images.device)


def check_mask(mask: torch.Tensor, size: tuple[int, int] | None = None, what: str = "the mask") -> torch.Tensor:
    """A (B, 1, H, W) mask of 0s and 1s, refused in one line when it holds other values."""
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"{what} must be one channel (B, 1, H, W), got {tuple(mask.shape)}")
    odd = ~((mask == 0) | (mask == 1))
    if odd.any():
        raise ValueError(f"{what} is not binary (a value {mask[odd].flatten()[0].item():.3g} among 0s and 1s); save it "
                         "with pure black (keep) and pure white (repaint) pixels, or threshold it")
    if size is not None and tuple(mask.shape[-2:]) != tuple(size):
        mask = F.interpolate(mask.float(), size=size, mode="nearest")
    return mask.float()


def inpaint_control(images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) images and (B or 1, 1, H, W) binary masks -> (B, 4, H, W): the image with the masked
    region white, then the mask (the release's ``InpaintFilter``)."""
    mask = check_mask(mask, tuple(images.shape[-2:])).to(images.device)
    mask = mask.expand(images.shape[0], *mask.shape[1:])
    return torch.cat([torch.where(mask.bool(), torch.ones_like(images), images), mask.to(images.dtype)], dim=1)


def mask_share(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The masked share of each cell of a ``grid`` laid over (B, 1, H, W) masks: (B, 1, *grid), 0 where a cell
    is kept whole, 1 where it is all repainted."""
    return F.adaptive_avg_pool2d(mask.float(), tuple(grid))


def random_masks(batch: int, height: int, width: int, generator: torch.Generator | None = None,
                 outpaint_prob: float = 0.4, min_share: float = 0.1, max_share: float = 0.5) -> torch.Tensor:
    """(batch, 1, H, W) binary masks: an ellipse or a rectangle covering about ``min_share``..``max_share`` of
    the image at a random place (inpainting), or with probability ``outpaint_prob`` its complement
    (outpainting: the border is generated around a kept region)."""
    if not 0 <= outpaint_prob <= 1 or not 0 < min_share <= max_share < 1:
        raise ValueError("outpaint_prob must be in [0, 1] and 0 < min_share <= max_share < 1")
    u = torch.rand(batch, 6, generator=generator)
    share = min_share + (max_share - min_share) * u[:, 0]
    aspect = torch.exp((u[:, 1] - 0.5) * 1.4)  # about 1:2 to 2:1
    half_h = (share / aspect).sqrt() / 2 * height
    half_w = (share * aspect).sqrt() / 2 * width
    cy = half_h + (height - 2 * half_h).clamp(min=0) * u[:, 2]
    cx = half_w + (width - 2 * half_w).clamp(min=0) * u[:, 3]
    ys = torch.arange(height).float()[None, :, None] + 0.5
    xs = torch.arange(width).float()[None, None, :] + 0.5
    dy = (ys - cy[:, None, None]) / half_h[:, None, None]
    dx = (xs - cx[:, None, None]) / half_w[:, None, None]
    ellipse = dy ** 2 + dx ** 2 <= 1
    rectangle = (dy.abs() <= math.sqrt(math.pi) / 2) & (dx.abs() <= math.sqrt(math.pi) / 2)  # the ellipse's area
    mask = torch.where((u[:, 4] < 0.5)[:, None, None], ellipse, rectangle)
    mask = torch.where((u[:, 5] < outpaint_prob)[:, None, None], ~mask, mask)
    return mask[:, None].float()


def downscale(images: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """Images ``factor`` x smaller (area average), the low-resolution input of the super-resolution control."""
    return F.avg_pool2d(images, factor) if factor > 1 else images
