"""The released Stable Cascade ControlNets (``canny.safetensors``, ``inpainting.safetensors``,
``super_resolution.safetensors``; StableCascade ``modules/controlnet.py``) <-> our ``ControlNet`` exports.

The released layout is the state dict of StableCascade's ``ControlNet``: ``backbone.*`` (torchvision's
EfficientNetV2-S ``features``, first conv ``backbone.0.0.weight`` of shape (24, c_in, 3, 3); or for
super-resolution the ``large`` bottleneck ``backbone.0`` (1x1 conv c_in -> 16384, bias), ``backbone.2``
(-> 1024), ``backbone.3``..``backbone.10`` (residual blocks ``.blocks.{0,3}`` LayerNorms and ``.blocks.{2,5}``
3x3 convs), ``backbone.11`` (-> 1280)) and ``projections.{i}.0.weight`` (1280 -> 1280) /
``projections.{i}.2.weight`` (1280 -> Stage C width), no biases. Our network uses the same module tree,
so the tensors keep their names; the files do not say which blocks the projections feed, the inference
configs do (``controlnet_blocks: [0, 4, 8, 12, 51, 55, 59, 63]``, the default ``blocks``).
"""
from __future__ import annotations

import re

import torch

from stages.controlnet import CONTROLS, RELEASE_BLOCKS, ControlNet, ControlNetConfig

RELEASE_PATTERN = re.compile(r"(backbone\..+|projections\.\d+\.[02]\.weight)")


def is_release_controlnet(state: dict[str, torch.Tensor]) -> bool:
    return bool(state) and all(RELEASE_PATTERN.fullmatch(k) for k in state) and "projections.0.2.weight" in state


def config_from_release(state: dict[str, torch.Tensor], blocks: tuple[int, ...] = RELEASE_BLOCKS) -> ControlNetConfig:
    """The ``ControlNetConfig`` of a released ControlNet state dict (for the v3 Stage C; ``blocks`` as its
    inference config names them)."""
    if not is_release_controlnet(state):
        raise ValueError("not a Stable Cascade ControlNet state dict (expected only backbone.* and "
                         "projections.{i}.{0,2}.weight keys)")
    projections = len({k.split(".")[1] for k in state if k.startswith("projections.")})
    if projections != len(blocks):
        raise ValueError(f"the file has {projections} projections but {len(blocks)} blocks were given; pass the "
                         "blocks of its inference config (--blocks)")
    hidden, features = state["projections.0.0.weight"].shape[:2]
    c_out = state["projections.0.2.weight"].shape[0]
    if "backbone.0.0.weight" in state:  # EfficientNetV2-S features
        control = {c: k for k, c in CONTROLS.items() if k != "sr"}.get(state["backbone.0.0.weight"].shape[1])
        if control is None:
            raise ValueError(f"an EfficientNet ControlNet with {state['backbone.0.0.weight'].shape[1]} input "
                             f"channels matches no control ({CONTROLS})")
        return ControlNetConfig(control=control, encoder="efficientnet_v2_s", stage="stage_c3", c_out=c_out,
                                blocks=tuple(blocks), c_hidden=hidden)
    res_blocks = len({k.split(".")[1] for k in state if ".blocks." in k})
    return ControlNetConfig(control="sr", encoder="bottleneck", stage="stage_c3", c_out=c_out, blocks=tuple(blocks),
                            c_hidden=hidden, c_features=features, expand=state["backbone.0.weight"].shape[0],
                            width=state["backbone.2.weight"].shape[0], res_blocks=res_blocks)


def to_release(model: ControlNet) -> dict[str, torch.Tensor]:
    """Our ControlNet's state dict in the released layout (only the release's encoders have one)."""
    if model.config.encoder == "efficientnet_lite0":
        raise ValueError("an EfficientNet-Lite0 ControlNet (the tiny presets) has no Stable Cascade layout; only "
                         "efficientnet_v2_s and bottleneck encoders convert")
    return dict(model.state_dict())
