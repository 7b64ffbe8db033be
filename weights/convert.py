"""Converters from the released Würstchen weights to this project's modules.

Stage B: a ``diffusers`` ``WuerstchenDiffNeXt`` state dict (the released decoder) to our ``StageB``.
Stage C: a ``diffusers`` ``WuerstchenPrior`` state dict (the released prior) to our ``StageC``.

Stage A: a ``diffusers`` ``PaellaVQModel`` state dict, or the original Würstchen/Paella VQGAN
checkpoint (same layout, codebook under ``vquantizer.codebook``), to our ``StageA``.

    python -m weights.convert stage_a --src path/to/vqgan --out stage_a_release.safetensors
    python -m weights.convert stage_b --src path/to/decoder --out stage_b_release.safetensors
    python -m weights.convert stage_c --src path/to/prior --out stage_c_release.safetensors

``--src`` may be a diffusers model folder (``diffusion_pytorch_model.safetensors``), a
``.safetensors`` file, or a ``.pt``/``.bin``/``.ckpt`` state dict (read with ``weights_only=True``).

The version is recognised from the weights: Stable Cascade (Würstchen v3) checkpoints, of the
StableCascade repository (``stage_c.safetensors``, ``stage_b_lite.safetensors``, ...) or diffusers'
``StableCascadeUNet`` folders (``prior``, ``decoder``), become our ``StageC3`` / ``StageB3``
(``weights.convert_cascade``). ``--to stablecascade`` or ``--to diffusers`` goes back: our v3 export to
the repository's single-file layout or diffusers' state-dict layout.

ControlNets: the released Stable Cascade ControlNets (``weights.convert_controlnet``), and ours back with
``--to stablecascade``:

    python -m weights.convert controlnet --src canny.safetensors --out controlnet_canny.safetensors
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from weights.checkpoint import load_safetensors, load_torch, resolve_checkpoint, save_safetensors
from common.state_dict import load_into
from common.cli import check_output
from weights.convert_cascade import (LAYOUTS, cascade_stage, config_from_release, from_release, is_stable_cascade,
                                     to_release)
from common.errors import run_command
from weights.convert_controlnet import config_from_release as controlnet_config_from_release
from weights.convert_controlnet import to_release as controlnet_to_release
from weights.loaders import load_controlnet
from stages.controlnet import STAGE as CONTROLNET_STAGE, ControlNet
from stages.stage_a import StageA, StageAConfig
from stages.stage_b import StageB, StageBConfig
from stages.stable_cascade import STAGE_NAMES, StageB3, StageC3
from weights.loaders import load_stage_b3, load_stage_c3
from stages.stage_c import StageC, StageCConfig


def read_state_dict(src: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, diffusers config or {}) from a diffusers folder or a weights file."""
    src = Path(src)
    config: dict = {}
    if src.is_dir():
        if (src / "config.json").exists():
            try:
                config = json.loads((src / "config.json").read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{src / 'config.json'} is not valid JSON ({e}); re-download it") from None
        files = sorted(src.glob("*.safetensors")) or sorted(src.glob("*.bin"))
        if not files:
            raise FileNotFoundError(f"no .safetensors or .bin weights in {src}")
        src = files[0]
    src = resolve_checkpoint(src)
    state = load_safetensors(src)[0] if src.suffix == ".safetensors" else load_torch(src)
    for key in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{src} does not hold a state dict of tensors; pass the released weights file or folder")
    return state, config


def _levels(state: dict[str, torch.Tensor], prefix: str) -> int:
    return 1 + max(int(m.group(1)) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k)))


def stage_a_config_from_release(state: dict[str, torch.Tensor], config: dict | None = None) -> StageAConfig:
    """Infer our config from a PaellaVQModel / original VQGAN state dict (levels must be 2)."""
    config = config or {}
    if config.get("levels", 2) != 2 or config.get("up_down_scale_factor", 2) != 2:
        raise ValueError("only the f4 layout (levels=2, up_down_scale_factor=2) converts to Stage A")
    c0 = state["in_block.1.weight"].shape[0]
    c1 = state["down_blocks.1.weight"].shape[0]
    codebook = state.get("vquantizer.embedding.weight", state.get("vquantizer.codebook.weight"))
    if codebook is None:
        raise ValueError("no codebook (vquantizer.embedding.weight or vquantizer.codebook.weight) in the state dict")
    n_up = _levels(state, "up_blocks")
    return StageAConfig(widths=(c0, c1), bottleneck_blocks=n_up - 3, latent_channels=codebook.shape[1],
                        codebook_size=codebook.shape[0], scale_factor=config.get("scale_factor", 0.3764))


def stage_a_from_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename PaellaVQModel (or original VQGAN) keys to ``StageA`` keys; values are unchanged."""
    for prefix in ("in_block.", "down_blocks.", "up_blocks.", "out_block."):
        if not any(k.startswith(prefix) for k in state):
            raise ValueError(f"no {prefix}* keys: not a PaellaVQModel / Würstchen VQGAN state dict")
    n_down, n_up = _levels(state, "down_blocks"), _levels(state, "up_blocks")
    out = {}
    for key, value in state.items():
        key = key.replace("depthwise.1.", "depthwise.")  # ReplicationPad2d + conv -> conv (pad in forward)
        if key.startswith("in_block.1."):
            new = "encoder.1." + key[len("in_block.1."):]
        elif m := re.match(rf"down_blocks\.{n_down - 1}\.(\d)\.(.*)", key):  # 1x1 conv + BatchNorm
            new = f"encoder.{n_down + 1 + int(m.group(1))}.{m.group(2)}"
        elif m := re.match(r"down_blocks\.(\d+)\.(.*)", key):
            new = f"encoder.{int(m.group(1)) + 2}.{m.group(2)}"
        elif key in ("vquantizer.embedding.weight", "vquantizer.codebook.weight"):
            new = "quantizer.codebook.weight"
        elif key.startswith("up_blocks.0.0."):
            new = "decoder.0." + key[len("up_blocks.0.0."):]
        elif m := re.match(r"up_blocks\.(\d+)\.(.*)", key):
            new = f"decoder.{m.group(1)}.{m.group(2)}"
        elif key.startswith("out_block.0."):
            new = f"decoder.{n_up}." + key[len("out_block.0."):]
        else:
            raise ValueError(f"unexpected key {key!r}: not a PaellaVQModel / Würstchen VQGAN state dict")
        out[new] = value
    return out


def load_stage_a_release(src: str | Path, scale_factor: float | None = None) -> StageA:
    """Our ``StageA`` with the released VQGAN weights (diffusers folder or original checkpoint). ``scale_factor``
    overrides the config's (0.3764 without one; the StableCascade repository's Stage A uses 0.43)."""
    state, config = read_state_dict(src)
    if scale_factor is not None:
        config = {**config, "scale_factor": scale_factor}
    renamed = stage_a_from_release(state)  # refuses a foreign state dict before reading its shapes
    return load_into(StageA(stage_a_config_from_release(state, config)), renamed, str(src)).eval()


def stage_b_config_from_release(state: dict[str, torch.Tensor], config: dict | None = None) -> StageBConfig:
    """Infer our config from a WuerstchenDiffNeXt state dict (and its diffusers config, when given).

    Without a config, attention heads default to width // 64 (as in the release: 640/10, 1280/20).
    """
    config = config or {}
    if "embedding.1.weight" not in state or "clf.1.weight" not in state:
        raise ValueError("no embedding.1.* / clf.1.* keys: not a WuerstchenDiffNeXt state dict")
    n = _levels(state, "down_blocks")
    widths = [state["embedding.1.weight"].shape[0]] + [state[f"down_blocks.{i}.0.1.weight"].shape[0] for i in range(1, n)]
    blocks = [sum(1 for k in state if re.fullmatch(rf"down_blocks\.{i}\.\d+\.depthwise\.weight", k)) for i in range(n)]
    has_attn = [any(re.match(rf"down_blocks\.{i}\.\d+\.attention\.", k) for k in state) for i in range(n)]
    heads = [h if a else 0 for h, a in zip(config.get("nhead", [w // 64 for w in widths]), has_attn)]
    inject = [f"effnet_mappers.{i}.weight" in state for i in range(n)]
    mapper = next(state[f"effnet_mappers.{i}.weight"] for i in range(2 * n) if f"effnet_mappers.{i}.weight" in state)
    patch = config.get("patch_size", 2)
    return StageBConfig(
        widths=tuple(widths), blocks=tuple(blocks), heads=tuple(heads), inject_semantic=tuple(inject),
        c_semantic=mapper.shape[1], c_cond=state["clip_mapper.weight"].shape[0],
        c_text=state["clip_mapper.weight"].shape[1], c_latent=state["embedding.1.weight"].shape[1] // patch ** 2,
        c_r=config.get("c_r", 64), patch_size=patch, kernel_size=state["down_blocks.0.0.depthwise.weight"].shape[-1],
        dropout=config.get("dropout", 0.1) if not isinstance(config.get("dropout"), list) else config["dropout"][0],
    )


def _rename_diffusers(state: dict[str, torch.Tensor], prefixes: dict[str, str], model: str) -> dict[str, torch.Tensor]:
    """Rename top-level prefixes (``prefixes``: old -> new, every allowed prefix listed) and diffusers'
    ``attention.to_q/k/v/to_out.0`` to our attention block's ``to_q/k/v/to_out``; values are unchanged."""
    out = {}
    for key, value in state.items():
        top = key.split(".", 1)[0] + "."
        if top not in prefixes:
            raise ValueError(f"unexpected key {key!r}: not a {model} state dict")
        key = prefixes[top] + key[len(top):]
        out[key.replace(".attention.to_out.0.", ".to_out.").replace(".attention.", ".")] = value
    return out


def stage_b_from_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename WuerstchenDiffNeXt keys to ``StageB`` keys."""
    prefixes = {"clip_mapper.": "text_mapper.", "effnet_mappers.": "semantic_mappers.", "clf.": "head.",
                "embedding.": "embedding.", "down_blocks.": "down_blocks.", "up_blocks.": "up_blocks."}
    return _rename_diffusers(state, prefixes, "WuerstchenDiffNeXt")


def load_stage_b_release(src: str | Path) -> StageB:
    """Our ``StageB`` with the released decoder weights (diffusers folder or state-dict file)."""
    state, config = read_state_dict(src)
    model = StageB(stage_b_config_from_release(state, config))
    return load_into(model, stage_b_from_release(state), str(src)).eval()


def stage_c_config_from_release(state: dict[str, torch.Tensor], config: dict | None = None) -> StageCConfig:
    """Infer our config from a WuerstchenPrior state dict; heads default to width // 64 without a config."""
    config = config or {}
    if "projection.weight" not in state or "cond_mapper.0.weight" not in state:
        raise ValueError("no projection.* / cond_mapper.* keys: not a WuerstchenPrior state dict")
    width, c_latent = state["projection.weight"].shape[:2]
    dropout = config.get("dropout", 0.1)
    return StageCConfig(width=width, depth=_levels(state, "blocks") // 3, heads=config.get("nhead", width // 64),
                        c_text=state["cond_mapper.0.weight"].shape[1], c_latent=c_latent,
                        c_r=config.get("c_r", 64), dropout=dropout)


def stage_c_from_release(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename WuerstchenPrior keys to ``StageC`` keys."""
    prefixes = {"cond_mapper.": "text_mapper.", "out.": "head.", "projection.": "projection.", "blocks.": "blocks."}
    return _rename_diffusers(state, prefixes, "WuerstchenPrior")


def load_stage_c_release(src: str | Path) -> StageC:
    """Our ``StageC`` with the released prior weights (diffusers folder or state-dict file)."""
    state, config = read_state_dict(src)
    model = StageC(stage_c_config_from_release(state, config))
    return load_into(model, stage_c_from_release(state), str(src)).eval()


def load_cascade_release(src: str | Path, stage: str, read: tuple[dict, dict] | None = None) -> StageC3 | StageB3:
    """Our ``StageC3`` / ``StageB3`` with Stable Cascade weights (either layout); ``stage`` is the one asked for;
    ``read``: ``read_state_dict(src)`` when already read."""
    state, config = read if read is not None else read_state_dict(src)
    found = cascade_stage(state)
    if found != stage:
        raise ValueError(f"{src} holds a Stable Cascade {found.replace('_', ' ').title()}, not a "
                         f"{stage.replace('_', ' ').title()}; pass the {stage} weights or convert it as {found}")
    model = (StageB3 if stage == "stage_b" else StageC3)(config_from_release(state, config))
    return load_into(model, from_release(state), str(src)).eval()


def export_cascade(src: str | Path, stage: str, layout: str, out: str) -> dict:
    """Our v3 export ``src`` written in the StableCascade repository's or diffusers' state-dict layout."""
    model = (load_stage_b3 if stage == "stage_b" else load_stage_c3)(str(src))
    state = {k: v.contiguous() for k, v in to_release(model, layout).items()}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return {"out": str(path), "layout": layout, "params": sum(v.numel() for v in state.values())}


def convert_controlnet(src: str | Path, out: str, overwrite: bool, to: str | None,
                       blocks: tuple[int, ...] | None) -> dict:
    """A released ControlNet file -> our export, or (``to``) our export -> the released layout."""
    if to is not None:
        if to != "stablecascade":
            raise ValueError("ControlNets have one released layout: --to stablecascade")
        state = {k: v.contiguous() for k, v in controlnet_to_release(load_controlnet(src)).items()}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        save_file(state, out, metadata={"format": "pt"})
        return {"out": out, "layout": to, "params": sum(v.numel() for v in state.values())}
    state, _ = read_state_dict(src)
    config = controlnet_config_from_release(state, **({"blocks": blocks} if blocks else {}))
    model = load_into(ControlNet(config, pretrained=False), state, str(src))
    path = save_safetensors(model, out, CONTROLNET_STAGE, config.to_dict(), overwrite=overwrite,
                            extra={"control": config.control})
    return {"out": str(path), "stage": "ControlNet", "params": sum(p.numel() for p in model.parameters()),
            "config": config.to_dict()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Convert released Würstchen weights (v2 or Stable Cascade) to this "
                                             "project's format, or a Stable Cascade export back.")
    ap.add_argument("stage", choices=["stage_a", "stage_b", "stage_c", "controlnet"])
    ap.add_argument("--src", required=True, help="diffusers model folder or weights file")
    ap.add_argument("--out", required=True, help="output .safetensors (an existing file only with --overwrite)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    ap.add_argument("--to", choices=LAYOUTS, default=None,
                    help="write our Stable Cascade export --src back in this layout (stage_b, stage_c)")
    ap.add_argument("--scale-factor", type=float, default=None,
                    help="stage_a: the latent scale (default: config.json's, else 0.3764; StableCascade's "
                         "stage_a: 0.43)")
    ap.add_argument("--blocks", default=None,
                    help="controlnet: the Stage C blocks its projections feed, comma-separated (default: the "
                         "release's 0,4,8,12,51,55,59,63)")
    args = ap.parse_args(argv)
    check_output(args.out, (".safetensors",), args.overwrite)
    if args.blocks is not None and args.stage != "controlnet":
        ap.error("--blocks applies to controlnet")
    if args.stage == "controlnet":
        try:
            blocks = tuple(int(b) for b in args.blocks.split(",")) if args.blocks else None
        except ValueError:
            ap.error(f"--blocks must be whole numbers separated by commas, got {args.blocks!r}")
        print(json.dumps(convert_controlnet(args.src, args.out, args.overwrite, args.to, blocks)))
        return
    if args.scale_factor is not None and args.stage != "stage_a":
        ap.error("--scale-factor applies to stage_a")
    if args.to:
        if args.stage == "stage_a":
            ap.error("--to applies to Stable Cascade Stage B and C exports")
        print(json.dumps(export_cascade(args.src, args.stage, args.to, args.out)))
        return
    loaders = {"stage_a": load_stage_a_release, "stage_b": load_stage_b_release, "stage_c": load_stage_c_release}
    stage = args.stage
    read = read_state_dict(args.src) if stage != "stage_a" else None
    if read is not None and is_stable_cascade(read[0]):
        model, stage = load_cascade_release(args.src, stage, read), stage + "3"
    else:
        model = loaders[stage](args.src, args.scale_factor) if stage == "stage_a" else loaders[stage](args.src)
    path = save_safetensors(model, args.out, stage, model.config.to_dict(), overwrite=args.overwrite)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"out": str(path), "stage": STAGE_NAMES.get(stage, stage), "params": n,
                      "config": model.config.to_dict()}))


if __name__ == "__main__":
    run_command(main)
