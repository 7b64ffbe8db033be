"""Saving and loading stage weights safely: safetensors (config in the metadata) or Lightning ``.ckpt``.

Nothing here unpickles code: ``.ckpt`` files are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn


def save_safetensors(model: nn.Module, path: str | os.PathLike, stage: str, config: dict,
                     overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``model``'s weights with ``{"stage", "config"}`` metadata; refuses to overwrite unless asked."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"stage": stage, "config": json.dumps(config), **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_weights(path: str | os.PathLike, stage: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Load ``(state_dict, config)`` of one stage from a ``.safetensors`` file or a Lightning ``.ckpt``.

    From a Lightning checkpoint the EMA weights are taken when present, else the raw ones.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            state = load_file(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
        if meta.get("stage") not in (None, stage):
            raise ValueError(f"{path} holds a {meta['stage']} model, not a {stage} model")
        return state, json.loads(meta["config"]) if "config" in meta else None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint (safetensors or Lightning .ckpt): {e}") from e
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} does not hold a state dict")
    state = ckpt.get("state_dict", ckpt)
    if ckpt.get("stage") not in (None, stage):
        raise ValueError(f"{path} is a {ckpt['stage']} checkpoint, not a {stage} checkpoint")
    for prefix in ("ema.", "model."):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub, ckpt.get("model_config")
    return state, ckpt.get("model_config")


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """``load_state_dict(strict=True)`` with an error that names the missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches (checkpoint vs model): {few(shapes)}" if shapes else ""]
        raise ValueError(f"{source} does not match this model's configuration; "
                         + "; ".join(p for p in parts if p)
                         + ". Build the model with the config the checkpoint was trained with.")
    model.load_state_dict(state)
    return model


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A file, or a run folder (newest ``version_*/model.safetensors`` under it)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("**/model.safetensors"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"no model.safetensors under {p}; train first or pass the file itself")
        return found[-1]
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} not found")
    return p


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights: tells whether a later stage was trained on this exact model."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def load_model(path: str | os.PathLike, stage: str, build, config=None) -> nn.Module:
    """``build(config)`` (config from the file unless given) with the file's weights, in eval mode."""
    state, stored = read_weights(path, stage)
    if config is None and stored is None:
        raise ValueError(f"{path} carries no {stage} config; pass config= (a preset name or dict)")
    return load_into(build(config if config is not None else stored), state, str(path)).eval()
