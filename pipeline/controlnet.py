"""ControlNets in the sampler and in training: the control a ControlNet takes, computed from an image
(``control_of``), and a loaded ControlNet checked against the Stage C it steers (``Control``).

Controls (``imagedata.filters``): ``canny`` (the edges of a photo, or an edge map given as it is: white
edges on black), ``inpaint`` (the image with the masked region white, plus the mask) and ``sr`` (the
semantic compressor's latents of the low-resolution image, upsampled 2x nearest; the output is twice
its size). The features are computed once per request and go to both guidance branches (Stable Cascade
``train/train_c_controlnet.py``: ``cnet`` in the conditions and the unconditions alike).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from common.checks import check_images
from imagedata.filters import canny, check_mask, downscale, inpaint_control, mask_share
from semantic_compressor import SemanticCompressor
from stages.controlnet import STAGE_KINDS, ControlNet, check_fits
from weights.checkpoint import fingerprint, read_metadata, resolve_checkpoint
from weights.loaders import load_controlnet
from weights.lora import base_fingerprint

SR_FACTOR = 2  # the released super-resolution ControlNet doubles the side


def sr_control(compressor: SemanticCompressor, low_res: torch.Tensor, factor: int = SR_FACTOR) -> torch.Tensor:
    """The super-resolution control: the compressor's raw latents of the low-resolution image, upsampled
    ``factor`` x (nearest), as the release's ``SREffnetFilter``."""
    device = next(compressor.parameters()).device
    with torch.no_grad():
        latents = compressor(low_res.to(device, torch.float32)).float()
    return F.interpolate(latents, scale_factor=factor, mode="nearest")


def inpaint_latents(compressor: SemanticCompressor, control: torch.Tensor) -> torch.Tensor:
    """The inpainting control (B, 4, H, W) as latents (B, 17, h, w) for a bottleneck encoder: the compressor's
    raw latents of the image with the masked region white, and the mask's share of each latent cell."""
    device = next(compressor.parameters()).device
    with torch.no_grad():
        latents = compressor(control[:, :3].to(device, torch.float32)).float()
    return torch.cat([latents, mask_share(control[:, 3:].to(device), latents.shape[-2:])], dim=1)


def control_of(kind: str, images: torch.Tensor, mask: torch.Tensor | None = None,
               compressor: SemanticCompressor | None = None, latents: bool = False) -> torch.Tensor:
    """The control ``kind`` of images in [0, 1] whose output has their size: canny edges, the inpainting
    control with ``mask`` (``latents``: through ``compressor``, ``inpaint_latents``), or the super-resolution
    control of their 2x downscale (``compressor``)."""
    if kind == "canny":
        return canny(images)
    if kind == "inpaint":
        if mask is None:
            raise ValueError("the inpaint control needs a mask (white: repaint, black: keep); CLI: --mask")
        control = inpaint_control(images, mask)
        if not latents:
            return control
        if compressor is None:
            raise ValueError("an inpaint ControlNet on latents needs the semantic compressor Stage C was trained on")
        return inpaint_latents(compressor, control)
    if kind == "sr":
        if compressor is None:
            raise ValueError("the sr control needs the semantic compressor Stage C was trained on")
        return sr_control(compressor, downscale(images, SR_FACTOR))
    raise ValueError(f"unknown control {kind!r}; choose canny, inpaint or sr")


def as_edge_map(image: torch.Tensor) -> torch.Tensor | None:
    """An image that already is an edge map (grey, at least 95% of its pixels black or white) as
    (B, 1, H, W) in {0, 1} with white edges; None for a photo."""
    grey = (image[:, :1] - image).abs().max() < 1e-3
    extreme = ((image[:, :1] < 0.1) | (image[:, :1] > 0.9)).float().mean() >= 0.95
    return (image[:, :1] > 0.5).float() if grey and extreme else None


@dataclass
class Control:
    """A loaded ControlNet (``path``) for one Stage C; ``compressor`` for a control given as latents (sr, or
    inpaint on a bottleneck encoder)."""

    controlnet: ControlNet
    path: str
    compressor: SemanticCompressor | None = None

    @property
    def kind(self) -> str:
        return self.controlnet.config.control

    def default_size(self, image: torch.Tensor) -> tuple[int, int]:
        """The output size a control image gives when none is asked for (sr: twice its sides)."""
        factor = SR_FACTOR if self.kind == "sr" else 1
        return image.shape[-2] * factor, image.shape[-1] * factor

    @torch.no_grad()
    def features(self, image: torch.Tensor, mask: torch.Tensor | None, size: tuple[int, int],
                 scale: float = 1.0) -> list[torch.Tensor | None]:
        """The ControlNet's features for a control image (1, 3, H, W) in [0, 1] at output ``size``: the image
        (and mask) resized to it with a note when their size differs; every feature times ``scale``."""
        check_images(image, f"the {self.kind} control image")
        wanted = (size[0] // SR_FACTOR, size[1] // SR_FACTOR) if self.kind == "sr" else tuple(size)
        if tuple(image.shape[-2:]) != wanted:
            warnings.warn(f"the control image ({image.shape[-2]}x{image.shape[-1]}) was resized to "
                          f"{wanted[0]}x{wanted[1]}" + (f", half the output's {size[0]}x{size[1]} (sr doubles it)"
                                                        if self.kind == "sr" else " (the output size)"), stacklevel=3)
            image = F.interpolate(image.float(), size=wanted, mode="bicubic", antialias=True,
                                  align_corners=False).clamp(0, 1)
        if mask is not None:
            if self.kind != "inpaint":
                raise ValueError(f"a mask goes with the inpaint control; this ControlNet is {self.kind}")
            mask = check_mask(mask)
            if tuple(mask.shape[-2:]) != tuple(size):
                warnings.warn(f"the mask ({mask.shape[-2]}x{mask.shape[-1]}) was resized to {size[0]}x{size[1]} "
                              "(nearest)", stacklevel=3)
        if self.kind == "canny":
            edges = as_edge_map(image)
            control = canny(image) if edges is None else edges
        elif self.controlnet.config.takes_latents and self.compressor is None:
            raise ValueError(f"the {self.kind} ControlNet takes compressor latents: it needs the semantic compressor; "
                             "load it with compressor= (CLI: --compressor)")
        elif self.kind == "sr":
            control = sr_control(self.compressor, image)
        else:
            control = control_of(self.kind, image, mask, self.compressor, self.controlnet.config.takes_latents)
        weight = next(self.controlnet.parameters())
        features = self.controlnet(control.to(weight.device, weight.dtype))
        return [None if f is None else f * scale for f in features]


def controlnet_kind(path: str | os.PathLike) -> str | None:
    """The control a ControlNet export or Lightning checkpoint was made for (canny, inpaint, sr), from its header."""
    return _recorded_config(path).get("control")


def controlnet_takes_latents(path: str | os.PathLike) -> bool:
    """Whether a ControlNet export or checkpoint takes its control as compressor latents (a bottleneck encoder)."""
    return _recorded_config(path).get("encoder") == "bottleneck"


def _recorded_config(path: str | os.PathLike) -> dict:
    meta = read_metadata(path)
    return meta.get("config") or meta.get("model_config") or {}


def load_control(path: str | os.PathLike, stage_c: torch.nn.Module, stage_c_path: str | os.PathLike,
                 compressor: SemanticCompressor | None = None) -> Control:
    """A trained ControlNet for ``stage_c`` (loaded from ``stage_c_path``, adapters allowed), refused in one
    line naming both when it was made or trained for another Stage C, or for another compressor (a control given
    as latents)."""
    path = resolve_checkpoint(path)
    meta = read_metadata(path)
    if meta.get("stage") != "controlnet":
        raise ValueError(f"{path} is not a ControlNet export (stage {meta.get('stage')!r}); pass a ControlNet "
                         "(python -m train fit --config configs/controlnet/tiny_canny.yaml)")
    controlnet = load_controlnet(path)
    check_fits(controlnet.config, stage_c, f"the ControlNet {path}", f"Stage C {stage_c_path}")
    trained_for, ours = meta.get("stage_c_fingerprint"), base_fingerprint(stage_c)
    if trained_for and trained_for != ours:
        raise ValueError(f"the ControlNet {path} was trained for another {STAGE_KINDS[controlnet.config.stage]} "
                         f"({meta.get('stage_c_path', 'fingerprint ' + trained_for)}) than Stage C {stage_c_path} "
                         f"(fingerprint {ours}); pass the Stage C it was trained with")
    if controlnet.config.takes_latents and compressor is not None and meta.get("compressor_fingerprint") \
            and meta["compressor_fingerprint"] != fingerprint(compressor):
        raise ValueError(f"the {controlnet.config.control} ControlNet {path} was trained on another semantic "
                         "compressor's latents; pass the compressor Stage C was trained with")
    return Control(controlnet.requires_grad_(False), str(path), compressor)
