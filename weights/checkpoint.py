"""Saving and loading stage weights safely: safetensors (config in the metadata) or Lightning ``.ckpt``.

Nothing here unpickles code: ``.ckpt`` files are read with ``torch.load(weights_only=True)``. Our
exports carry a checksum of their tensors; a file whose bytes changed since is refused. Every
unreadable file (empty, truncated, corrupt, mislabelled, a folder) is a one-line ``ValueError`` or
``FileNotFoundError`` that names it and what to do.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from common.files import write_atomic
from common.state_dict import load_into

REDOWNLOAD = "re-export or re-download it"
TEXT_KEYS = ("stage", "checksum")  # safetensors metadata stored as plain text; every other value is JSON
WRITTEN_KEYS = ("stage", "config", "checksum")  # the metadata save_tensors writes itself; the rest is ``extra``
TRAINING_STATE = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "callbacks", "hyper_parameters")


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and raw bytes of the tensors, in sorted key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights: tells whether a later stage was trained on this exact model."""
    return tensor_digest(model.state_dict())[:16]


def save_safetensors(model: nn.Module, path: str | os.PathLike, stage: str, config: dict,
                     overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write ``model``'s weights with ``{"stage", "config", "checksum"}`` metadata; refuses to overwrite
    unless asked. ``extra`` values are stored as JSON."""
    return save_tensors(model.state_dict(), path, stage, config, overwrite, extra)


def save_tensors(state: dict[str, torch.Tensor], path: str | os.PathLike, stage: str, config: dict,
                 overwrite: bool = False, extra: dict | None = None) -> Path:
    """``save_safetensors`` for a bare state dict (adapters, merged weights); written atomically
    (``common.files``), so a kill or a full disk leaves the earlier file intact."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another path or pass overwrite=True")
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    meta = {"stage": stage, "config": json.dumps(config), "checksum": tensor_digest(state),
            **{k: json.dumps(v) for k, v in (extra or {}).items()}}
    return write_atomic(path, save(state, metadata=meta))


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A file, or a run folder (newest ``version_*/model.safetensors`` under it)."""
    p = Path(path)
    if p.is_dir():
        found = sorted(p.glob("**/model.safetensors"), key=lambda f: f.stat().st_mtime)
        if not found:
            raise FileNotFoundError(f"{p} is a folder without a model.safetensors under it; pass the checkpoint "
                                    "file itself, or a run folder (train first)")
        return found[-1]
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {p} not found")
    if p.stat().st_size == 0:
        raise ValueError(f"{p} is empty (0 bytes); {REDOWNLOAD}")
    return p


def recorded_path(record: str | os.PathLike, checkpoint: str | os.PathLike) -> Path:
    """A path that ``checkpoint`` records (Stage B's Stage A, ...), found from any working directory.

    Absolute records are taken as they are. A relative one (older exports recorded paths relative to
    where training ran) is tried against the checkpoint's folder and each folder above it, then the
    working directory; the first that exists wins.
    """
    record = Path(record)
    folder = Path(checkpoint).resolve().parent
    candidates = [record] if record.is_absolute() else [f / record for f in (folder, *folder.parents)] + [record]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise FileNotFoundError(f"{checkpoint} records {record}, which is not found beside it, above it or in the "
                                "working directory; pass that file explicitly")
    return found


def _header(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # the Rust reader raises its own error type
        raise ValueError(f"{path} is not a readable safetensors file ({e}); {REDOWNLOAD}") from None


def load_torch(path: str | os.PathLike, advice: str = REDOWNLOAD) -> object:
    """A ``torch.save`` file read with ``weights_only=True``; refusals and corrupt files as one line ending
    with ``advice``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):
            raise ValueError(f"{path} holds objects that weights-only loading refuses (they could run code); if "
                             f"you trust it, re-save just its state dict with torch.save, or convert it; {advice}") from None
        raise ValueError(f"{path} is not a readable checkpoint (damaged pickle data); {advice}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} is not a readable checkpoint ({first}); {advice}") from None


def load_safetensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, raw metadata) of a safetensors file, checked against its checksum when it has one."""
    path = Path(path)
    meta = _header(path)
    try:
        state = load_file(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); {REDOWNLOAD}") from None
    if "checksum" in meta and tensor_digest(state) != meta["checksum"]:
        raise ValueError(f"{path} is corrupt: checksum mismatch; {REDOWNLOAD}")
    return state, meta


def read_metadata(path: str | os.PathLike) -> dict:
    """What a checkpoint records besides the weights (stage, config, fingerprints, Stage A path, costs, ...).

    Of a ``.safetensors`` export: its header's metadata (the tensors are not read). Of a Lightning
    ``.ckpt``: its top-level entries, training state left out.
    """
    path = resolve_checkpoint(path)
    if path.suffix != ".safetensors":
        ckpt = load_torch(path)
        return {k: v for k, v in ckpt.items() if k not in TRAINING_STATE} if isinstance(ckpt, dict) else {}
    return _decoded(path, _header(path))


def carried_metadata(meta: dict) -> dict:
    """``meta`` without what ``save_tensors`` writes itself: the ``extra`` a re-save of the same export carries over."""
    return {k: v for k, v in meta.items() if k not in WRITTEN_KEYS}


def _decoded(path: Path, raw: dict[str, str]) -> dict:
    meta = {}
    for key, value in raw.items():
        try:
            meta[key] = value if key in TEXT_KEYS else json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{path} has unreadable metadata {key}={value[:40]!r}; {REDOWNLOAD}") from None
    return meta


def read_weights(path: str | os.PathLike, stage: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Load ``(state_dict, config)`` of one stage from a ``.safetensors`` file, a Lightning ``.ckpt``
    or a run folder.

    From a Lightning checkpoint the EMA weights are taken when present, else the raw ones.
    """
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        state, meta = load_safetensors(path)
        if meta.get("stage") not in (None, stage):
            raise ValueError(f"{path} holds a {meta['stage']} model, not a {stage} model; pass the {stage} checkpoint")
        return state, _decoded(path, meta).get("config")
    ckpt = load_torch(path)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors; pass a {stage} export or Lightning checkpoint")
    if ckpt.get("stage") not in (None, stage):
        raise ValueError(f"{path} is a {ckpt['stage']} checkpoint, not a {stage} checkpoint; pass the {stage} one")
    for prefix in ("ema.module.", "model."):  # the EMA weights (AveragedModel), else the raw ones
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            return sub, ckpt.get("model_config")
    return state, ckpt.get("model_config")


def load_model(path: str | os.PathLike, stage: str, build, config=None) -> nn.Module:
    """``build(config)`` (config from the file unless given) with the file's weights, in eval mode."""
    state, stored = read_weights(path, stage)
    if config is None and stored is None:
        raise ValueError(f"{path} carries no {stage} config; pass config= (a preset name or dict)")
    return load_into(build(config if config is not None else stored), state, str(path)).eval()
