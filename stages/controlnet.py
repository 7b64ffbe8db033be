"""ControlNets on Stage C (Stable Cascade ``modules/controlnet.py``, ``train/train_c_controlnet.py``).

A control encoder turns a control image into features; per injection point a projection (1x1 conv ->
LeakyReLU(0.2) -> 1x1 conv, no biases) maps them to Stage C's width, and Stage C adds them, resized
bilinearly, before the chosen ConvNeXt blocks (``stages.blocks.add_control``). The last conv of every
projection starts at zero, so an untrained ControlNet leaves Stage C's output unchanged bit for bit.

Encoders:

* ``efficientnet_v2_s``: torchvision's EfficientNetV2-S features (1280 channels at stride 32), the release's
  (same module tree, so the released files' keys load as they are). The first conv takes ``c_in`` channels:
  fewer than 3 keep the first pretrained input channels, more than 3 add input channels whose weights are zero.
* ``efficientnet_lite0``: the semantic compressor's offline EfficientNet-Lite0 features (the tiny presets),
  widened the same way.
* ``bottleneck``: for super-resolution, whose control is already compressor latents: 1x1 conv to ``expand``
  -> LeakyReLU -> 1x1 conv to ``width`` -> ``res_blocks`` residual blocks (LayerNorm, GELU, 3x3 conv, twice)
  -> 1x1 conv to ``c_features`` (the release's ``large`` bottleneck: 16384, 1024, 8 blocks, 1280). It also
  takes an inpainting control given as latents (``LATENT_CONTROLS``; a departure from the release, whose
  inpainting encoder is an EfficientNet on the image and mask): the compressor's latents of the image with the
  masked region white, and the mask's share of each latent cell.

The backbone's BatchNorms stay in eval mode while the ControlNet trains, as in the release. ``input_scale``
resizes the control before the encoder (as the semantic compressor's ``input_scale``): the release's stride-32
features are at least as fine as Stage C's grid (a 768 px control gives 24x24), and a tiny Stage C on a larger
grid than the paper's (8x8 at 128 px) needs its control seen at 2x to keep that.
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from common.config import DictConfig
from semantic_compressor.compressor import FEATURE_CHANNELS, Lite0Features, read_state_dict
from stages.blocks import LayerNorm2d
from stages.stable_cascade import StageC3
from stages.stage_c import StageC

STAGE = "controlnet"  # what its checkpoints record as their stage
CONTROLS = {"canny": 1, "inpaint": 4, "sr": 16}  # control kind -> input channels (sr: compressor latents)
# controls given as semantic compressor latents, for the bottleneck encoder -> input channels: sr's latents, or the
# latents of the image with the masked region white plus the mask's share of each latent cell (inpaint)
LATENT_CONTROLS = {"sr": 16, "inpaint": 17}
ENCODERS = ("efficientnet_v2_s", "efficientnet_lite0", "bottleneck")
STAGE_KINDS = {"stage_c": "Würstchen v2 Stage C", "stage_c3": "Stable Cascade (v3) Stage C"}
RELEASE_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)  # the released 3.6B ControlNets' injection points


@dataclass(frozen=True)
class ControlNetConfig(DictConfig):
    name = "ControlNet config"

    control: str = "canny"  # canny, inpaint or sr: sets the input channels (CONTROLS)
    encoder: str = "efficientnet_v2_s"  # one of ENCODERS (sr needs bottleneck)
    stage: str = "stage_c3"  # the Stage C it steers: stage_c (v2) or stage_c3 (Stable Cascade)
    c_out: int = 2048  # that Stage C's width
    blocks: tuple[int, ...] = RELEASE_BLOCKS  # ConvNeXt block calls to add features before
    c_hidden: int = FEATURE_CHANNELS  # projections' hidden width (release: 1280, the features' width)
    c_features: int = FEATURE_CHANNELS  # encoder output channels (EfficientNets: 1280; bottleneck: its choice)
    expand: int = 16384  # bottleneck: first 1x1 conv's width
    width: int = 1024  # bottleneck: residual blocks' width
    res_blocks: int = 8  # bottleneck: residual blocks
    train_encoder: bool = True  # the release trains it; False keeps the pretrained encoder frozen (and unsaved)
    input_scale: float = 1.0  # the control is resized by this factor before the encoder (the release: 1)

    def __post_init__(self):
        if self.control not in CONTROLS:
            raise ValueError(f"unknown control {self.control!r}; choose one of {sorted(CONTROLS)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown ControlNet encoder {self.encoder!r}; choose one of {list(ENCODERS)}")
        if self.control == "sr" and self.encoder != "bottleneck":
            raise ValueError("the sr control (compressor latents) goes with the bottleneck encoder")
        if self.encoder == "bottleneck" and self.control not in LATENT_CONTROLS:
            raise ValueError("the bottleneck encoder takes compressor latents: control "
                             f"{' or '.join(LATENT_CONTROLS)}, not {self.control}")
        if self.encoder != "bottleneck" and self.c_features != FEATURE_CHANNELS:
            raise ValueError(f"EfficientNet features have {FEATURE_CHANNELS} channels; c_features is only set for "
                             "the bottleneck encoder")
        if self.stage not in STAGE_KINDS:
            raise ValueError(f"stage must be one of {sorted(STAGE_KINDS)}, got {self.stage!r}")
        if not self.train_encoder and self.encoder == "bottleneck":
            raise ValueError("the bottleneck encoder has no pretrained weights: it must train (train_encoder: true)")
        if not (math.isfinite(self.input_scale) and self.input_scale > 0):
            raise ValueError(f"input_scale must be a positive number (the control's resize before the encoder), got "
                             f"{self.input_scale}")
        if not self.blocks or min(self.blocks) < 0 or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"blocks must be distinct block indices >= 0, got {list(self.blocks)}")

    @property
    def takes_latents(self) -> bool:
        """The control is given as semantic compressor latents (``LATENT_CONTROLS``), not as an image."""
        return self.encoder == "bottleneck"

    @property
    def c_in(self) -> int:
        return LATENT_CONTROLS[self.control] if self.takes_latents else CONTROLS[self.control]


PRESETS: dict[str, ControlNetConfig] = {
    # the shipped tiny v2 Stage C (width 128, 4 ConvNeXt blocks): features before every block; the packaged
    # ImageNet encoder stays frozen (its features are cached per image on 2 CPU cores; exports hold the rest)
    "tiny": ControlNetConfig(encoder="efficientnet_lite0", stage="stage_c", c_out=128, blocks=(0, 1, 2, 3),
                             c_hidden=64, train_encoder=False),
    # the tiny v3 Stage C (2 + 2 groups down, 2 + 2 up): the first two and the last two, as the release
    "sc_tiny": ControlNetConfig(encoder="efficientnet_lite0", stage="stage_c3", c_out=128, blocks=(0, 1, 6, 7),
                                c_hidden=64, train_encoder=False),
    # v2 paper Stage C (16 blocks, width 1280): every fourth block
    "paper": ControlNetConfig(stage="stage_c", c_out=1280, blocks=(0, 4, 8, 12)),
    # the released ControlNets for the 3.6B Stable Cascade Stage C (sc_big)
    "sc_big": ControlNetConfig(),
}
TINY_SR = dict(encoder="bottleneck", expand=256, width=64, res_blocks=2, c_features=128,
               train_encoder=True)  # the tiny presets' sr


def controlnet_config(size: str | ControlNetConfig | dict, control: str | None = None) -> ControlNetConfig:
    """A preset (``tiny``, ``sc_tiny``, ``paper``, ``sc_big``) or a dict of fields (``preset`` to start from
    one), for ``control`` (canny, inpaint, sr; an sr ControlNet takes the bottleneck encoder, small in the
    tiny presets)."""
    config = ControlNetConfig.pick(size, PRESETS)
    if control is None or control == config.control:
        return config
    changes = {"control": control}
    if control == "sr":
        changes.update(TINY_SR if config.c_out <= 256 else {"encoder": "bottleneck"})
    elif config.encoder == "bottleneck":
        changes["encoder"] = "efficientnet_lite0" if config.c_out <= 256 else "efficientnet_v2_s"
        changes["c_features"] = FEATURE_CHANNELS
        changes["train_encoder"] = config.c_out > 256
    return ControlNetConfig.from_dict({**config.to_dict(), **changes})


def stage_kind(stage_c: nn.Module) -> str:
    if isinstance(stage_c, StageC3):
        return "stage_c3"
    if isinstance(stage_c, StageC):
        return "stage_c"
    raise ValueError(f"a ControlNet steers a Stage C (v2 or v3), not a {type(stage_c).__name__}")


def stage_width_and_blocks(stage_c: nn.Module) -> tuple[int, int]:
    """Stage C's width where features are added, and its number of ConvNeXt block calls."""
    if isinstance(stage_c, StageC3):
        return stage_c.config.widths[0], stage_c.convnext_calls
    return stage_c.config.width, stage_c.config.depth


def check_fits(config: ControlNetConfig, stage_c: nn.Module, what: str = "the ControlNet",
               stage_name: str = "this Stage C") -> None:
    """Refuse, in one line naming both, a ControlNet made for another kind, width or depth of Stage C."""
    kind = stage_kind(stage_c)
    width, blocks = stage_width_and_blocks(stage_c)
    if kind != config.stage:
        raise ValueError(f"{what} was made for a {STAGE_KINDS[config.stage]}, but {stage_name} is a "
                         f"{STAGE_KINDS[kind]}; use a ControlNet trained for it")
    if config.c_out != width or max(config.blocks) >= blocks:
        widths = (config.c_out, width) if (config.c_out != width) else None
        detail = (f"width {widths[0]} vs {widths[1]}" if widths else
                  f"it injects before ConvNeXt block {max(config.blocks)}, {stage_name} has {blocks}")
        raise ValueError(f"{what} was made for another {STAGE_KINDS[kind]} than {stage_name} ({detail}); use a "
                         "ControlNet trained for it")


def widen_first_conv(conv: nn.Conv2d, c_in: int) -> nn.Conv2d:
    """``conv`` taking ``c_in`` input channels: its first ``min(c_in, 3)`` input weights kept, any more zero
    (the release's ``ControlNet``); the same class (TensorFlow "SAME" padding kept)."""
    if c_in == conv.in_channels:
        return conv
    wider = copy.deepcopy(conv)
    weight = conv.weight.new_zeros(conv.out_channels, c_in, *conv.kernel_size)
    keep = min(c_in, conv.in_channels)
    weight[:, :keep] = conv.weight.detach()[:, :keep]
    wider.weight = nn.Parameter(weight)
    wider.in_channels = c_in
    return wider


def efficientnet_v2_s_features(c_in: int, pretrained: bool, weights: str | os.PathLike | None) -> nn.Sequential:
    """torchvision's ``efficientnet_v2_s().features`` with its first conv widened to ``c_in`` channels.
    ``weights``: a torchvision-layout file; ``pretrained`` without it fetches torchvision's ImageNet weights."""
    import torchvision  # torchvision's network, not timm's: the released files hold its keys and padding

    fetch = pretrained and weights is None
    try:
        net = torchvision.models.efficientnet_v2_s(weights="DEFAULT" if fetch else None)
    except Exception as e:
        if not fetch:
            raise
        raise RuntimeError(f"could not get torchvision's EfficientNetV2-S weights ({type(e).__name__}: {e}); "
                           "offline, pass weights='path/to/efficientnet_v2_s.pth' or pretrained=False (random, for "
                           "tests)") from e
    if weights is not None:
        net.load_state_dict({k: v for k, v in read_state_dict(weights).items() if not k.startswith("classifier.")},
                            strict=False)
    features = net.features
    features[0][0] = widen_first_conv(features[0][0], c_in)
    return features


class ResBlock(nn.Module):
    """x + [LayerNorm, GELU, 3x3 conv] x 2 (the release's ``CNetResBlock``, same keys)."""

    def __init__(self, c: int):
        super().__init__()
        self.blocks = nn.Sequential(LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1),
                                    LayerNorm2d(c), nn.GELU(), nn.Conv2d(c, c, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


class ControlNet(nn.Module):
    """``forward(control) -> [features or None]``: one entry per ConvNeXt block up to the last chosen one,
    features ``(B, c_out, h, w)`` at the encoder's grid (Stage C resizes them). ``control``: the filter's
    output (``imagedata.filters``; images in [0, 1]). ``pretrained``: the EfficientNet encoders start from
    ImageNet weights (``weights``: a local file for ``efficientnet_v2_s``); False: random, for tests."""

    def __init__(self, config: ControlNetConfig | str | dict = "tiny", *, pretrained: bool = True,
                 weights: str | os.PathLike | None = None):
        super().__init__()
        self.config = cfg = controlnet_config(config)
        if cfg.encoder == "efficientnet_v2_s":
            self.backbone = efficientnet_v2_s_features(cfg.c_in, pretrained, weights)
        elif cfg.encoder == "efficientnet_lite0":
            self.backbone = Lite0Features(pretrained, weights)
            self.backbone.net._conv_stem = widen_first_conv(self.backbone.net._conv_stem, cfg.c_in)
        else:
            self.backbone = nn.Sequential(
                nn.Conv2d(cfg.c_in, cfg.expand, 1), nn.LeakyReLU(0.2),
                nn.Conv2d(cfg.expand, cfg.width, 1), *[ResBlock(cfg.width) for _ in range(cfg.res_blocks)],
                nn.Conv2d(cfg.width, cfg.c_features, 1))
        self.projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(cfg.c_features, cfg.c_hidden, 1, bias=False), nn.LeakyReLU(0.2),
                          nn.Conv2d(cfg.c_hidden, cfg.c_out, 1, bias=False)) for _ in cfg.blocks)
        for projection in self.projections:
            nn.init.zeros_(projection[-1].weight)  # training starts at the unchanged Stage C
        self.backbone.requires_grad_(cfg.train_encoder)
        self.train()

    def train(self, mode: bool = True):
        """The EfficientNet backbones' BatchNorm statistics stay frozen (eval mode), as in the release."""
        super().train(mode)
        if self.config.encoder != "bottleneck":
            self.backbone.eval()
        return self

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """What an export holds: everything, or without the frozen pretrained encoder (``train_encoder``
        false; rebuilt from its pretrained weights on load, first conv widened again)."""
        state = self.state_dict()
        if self.config.train_encoder:
            return state
        return {k: v for k, v in state.items() if not k.startswith("backbone.")}

    def full_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An export's ``state`` with the frozen encoder it leaves out (``trained_state_dict``) taken from this
        network's, which holds the pretrained weights; unchanged when the encoder trains."""
        if self.config.train_encoder:
            return state
        return {**{k: v for k, v in self.state_dict().items() if k.startswith("backbone.")}, **state}

    def forward(self, control: torch.Tensor) -> list[torch.Tensor | None]:
        return self.project(self.encode(control))

    def encode(self, control: torch.Tensor) -> torch.Tensor:
        """The control encoder's features (B, c_features, h, w), of the control resized by ``input_scale``."""
        cfg = self.config
        if control.dim() != 4 or control.shape[1] != cfg.c_in:
            raise ValueError(f"the {cfg.control} ControlNet takes a control of shape (B, {cfg.c_in}, H, W), got "
                             f"{tuple(control.shape)}")
        control = control.to(self.projections[0][0].weight.dtype)
        if cfg.input_scale != 1:
            control = F.interpolate(control, scale_factor=cfg.input_scale, mode="bilinear", align_corners=False)
        return self.backbone(control)

    def project(self, features: torch.Tensor) -> list[torch.Tensor | None]:
        """Encoder features -> one entry per ConvNeXt block up to the last chosen one (None elsewhere)."""
        cfg = self.config
        out: list[torch.Tensor | None] = [None] * (max(cfg.blocks) + 1)
        for index, projection in zip(cfg.blocks, self.projections):
            out[index] = projection(features.to(projection[0].weight.dtype))
        return out


class ControlledStageC(nn.Module):
    """A frozen Stage C steered by a ControlNet, called as Stage C is plus the control last:
    ``(x, r, *conditions, control)`` -> Stage C's head. ``checkpointing``: Stage C's activations are
    recomputed in the backward pass (only the ControlNet trains; its gradients flow through Stage C).
    ``encoded``: the control given is already the encoder's features (a frozen encoder's, cached)."""

    def __init__(self, stage_c: nn.Module, controlnet: ControlNet, checkpointing: bool = False,
                 encoded: bool = False):
        super().__init__()
        check_fits(controlnet.config, stage_c)
        self.stage_c, self.controlnet, self.checkpointing, self.encoded = stage_c, controlnet, checkpointing, encoded
        self.config = stage_c.config

    def forward(self, x: torch.Tensor, r: torch.Tensor, *conditions):
        *conditions, control = conditions
        features = self.controlnet.project(control) if self.encoded else self.controlnet(control)
        if self.checkpointing and torch.is_grad_enabled():
            return checkpoint(self.stage_c, x, r, *conditions, control=features, use_reentrant=False)
        return self.stage_c(x, r, *conditions, control=features)
