"""Each network from our exports, Lightning checkpoints or run folders: the config is read from the file
(``weights.checkpoint``), the network built and the weights loaded strictly, in eval mode.

Loading lives here, above the networks: no network module imports checkpoint code.
"""
from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from common.state_dict import load_into
from semantic_compressor import SemanticCompressor
from stages.baseline_ldm import STAGE as BASELINE_LDM_STAGE, BaselineLDM, BaselineLDMConfig
from stages.cascade_previewer import CascadePreviewer
from stages.controlnet import STAGE as CONTROLNET_STAGE, ControlNet, controlnet_config
from stages.pixel_decoder import (STAGE as PIXEL_DECODER_STAGE, GrownUViT, PixelDecoderConfig, ShallowUViT,
                                  build_pixel_model)
from stages.previewer import STAGE as PREVIEWER_STAGE, Previewer
from stages.stable_cascade import STAGE_NAMES, CascadeConfig, StageB3, StageC3
from stages.stage_a import StageA, StageAConfig, stage_a_config
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig
from weights.checkpoint import load_model, load_safetensors, read_metadata, read_weights, resolve_checkpoint


def load_stage_a(path: str, config: str | StageAConfig | dict | None = None) -> StageA:
    """A Stage A from our safetensors export or Lightning checkpoint (config read from the file).

    Passing ``config`` checks that the file was trained with it, with a clear error if not.
    """
    state, saved = read_weights(path, "stage_a")
    if config is not None and saved is not None and stage_a_config(config) != stage_a_config(saved):
        raise ValueError(f"{path} holds a Stage A with config {saved}, not the requested {stage_a_config(config)}")
    model = StageA(config if config is not None else (saved or "paper"))
    return load_into(model, state, str(path)).eval()


def load_stage_b(path: str, config: StageBConfig | str | dict | None = None) -> StageB:
    """A Stage B from a safetensors export or Lightning checkpoint (config from the file if not given)."""
    return load_model(path, "stage_b", StageB, config)


def load_stage_c(path: str, config: StageCConfig | str | dict | None = None) -> StageC:
    """A Stage C from a safetensors export or Lightning checkpoint (config from the file if not given)."""
    return load_model(path, "stage_c", StageC, config)


def load_baseline_ldm(path: str, config: BaselineLDMConfig | str | dict | None = None) -> BaselineLDM:
    """The single-stage baseline LDM from a safetensors export or Lightning checkpoint (config from the file)."""
    return load_model(path, BASELINE_LDM_STAGE, BaselineLDM, config)


def load_pixel_model(path: str, config: PixelDecoderConfig | str | dict | None = None) -> ShallowUViT | GrownUViT:
    """A pixel decoder network from a safetensors export or Lightning checkpoint (config from the file)."""
    return load_model(path, PIXEL_DECODER_STAGE, build_pixel_model, config)


def check_version(path, expected: str) -> None:
    """Refuse a checkpoint of the other Würstchen version (or stage) in one line naming both."""
    found = read_metadata(path).get("stage")
    if found in STAGE_NAMES and found != expected:
        raise ValueError(f"{path} holds a {STAGE_NAMES[found]} ({found}), but a {STAGE_NAMES[expected]} ({expected}) "
                         f"is expected here; pass a {expected} checkpoint (python -m weights.convert converts released "
                         "weights)")


def load_stage_c3(path: str, config: CascadeConfig | str | dict | None = None) -> StageC3:
    """A Stable Cascade Stage C from our export or Lightning checkpoint (config from the file unless given)."""
    path = resolve_checkpoint(path)
    check_version(path, "stage_c3")
    return load_model(path, "stage_c3", StageC3, config)


def load_stage_b3(path: str, config: CascadeConfig | str | dict | None = None) -> StageB3:
    """A Stable Cascade Stage B from our export or Lightning checkpoint (config from the file unless given)."""
    path = resolve_checkpoint(path)
    check_version(path, "stage_b3")
    return load_model(path, "stage_b3", StageB3, config)


def load_previewer(path: str | os.PathLike, compressor_fingerprint: str | None = None) -> Previewer:
    """A trained previewer (export, ``.ckpt`` or run folder), refused when it was trained on another
    compressor's latents than ``compressor_fingerprint`` (Stage C's, when given)."""
    path = resolve_checkpoint(path)
    trained_on = read_metadata(path).get("compressor_fingerprint")
    if compressor_fingerprint and trained_on and trained_on != compressor_fingerprint:
        raise ValueError(f"the previewer {path} was trained on another semantic compressor's latents ({trained_on}) "
                         f"than Stage C's ({compressor_fingerprint}); train a previewer with Stage C's compressor")
    return load_model(path, PREVIEWER_STAGE, Previewer).requires_grad_(False)


def load_any_previewer(path: str | os.PathLike, compressor_fingerprint: str | None = None) -> nn.Module:
    """Our previewer export (checked against the compressor, ``load_previewer``), or the release's
    ``previewer.safetensors`` (``CascadePreviewer``, in eval mode; outputs clamped to [0, 1])."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors" and read_metadata(path).get("stage") is None:
        state, _ = load_safetensors(path)
        first = state.get("blocks.0.weight")
        if first is None:
            raise ValueError(f"{path} is neither our previewer export nor Stable Cascade's previewer.safetensors")
        model = load_into(CascadePreviewer(first.shape[1], first.shape[0]), state, str(path)).eval()
        return nn.Sequential(model, nn.Hardtanh(0.0, 1.0))
    return load_previewer(path, compressor_fingerprint)


def load_compressor(path: str | os.PathLike) -> SemanticCompressor:
    """A trained compressor: ``compressor.safetensors``, or a Stage B run folder holding one."""
    path = Path(path)
    if path.is_dir() or path.name == "model.safetensors":
        path = resolve_checkpoint(path).with_name("compressor.safetensors")
    state, config = read_weights(path, "semantic_compressor")
    model = SemanticCompressor(**{**(config or {}), "trainable": "none"}, pretrained=False)
    return load_into(model, state, str(path)).eval()


def load_controlnet(path: str | os.PathLike) -> ControlNet:
    """A trained ControlNet (export, ``.ckpt`` or run folder; config from the file), in eval mode. One
    trained with a frozen encoder (``train_encoder: false``) gets that encoder's pretrained weights back."""
    path = resolve_checkpoint(path)
    state, config = read_weights(path, CONTROLNET_STAGE)
    if config is None:
        raise ValueError(f"{path} carries no ControlNet config; pass a ControlNet export")
    model = ControlNet(config, pretrained=not controlnet_config(config).train_encoder)
    return load_into(model, model.full_state(state), str(path)).eval()
