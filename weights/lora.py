"""LoRA adapters for Stage C and Stage B (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language
Models", Sec. 4.1): a frozen linear layer W gets a trainable low-rank update, h = W x + (alpha / r) B A x,
with A (r x in) and B (out x r, zero at the start, so training begins at the base network).

The layers are peft's (``peft.LoraConfig`` + ``peft.inject_adapter_in_model``), targeted by module
name. An adapter file holds only the A and B matrices (a few KB at tiny size) and records the stage it
adapts, the fingerprint of the base weights it was trained on, its rank, alpha, dropout and targets.
Several adapters can be loaded onto one base, each with its own scale (the update becomes
scale * alpha / r * B A), and merged into the base weights for a plain export.

``python -m weights.lora merge --base stage_c.safetensors --lora adapter.safetensors[:scale] --out merged.safetensors``
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from weights.checkpoint import (carried_metadata, load_model, load_safetensors, read_metadata, resolve_checkpoint,
                                save_tensors, tensor_digest)
from common.errors import run_command
from stages.stage_b import StageB
from stages.stage_c import StageC
from stages.stable_cascade import StageB3, StageC3

ADAPTER_STAGE = "lora"  # the ``stage`` an adapter file records (its base's stage is ``base_stage``)
# Stage C and Stage B attention: queries, keys, values, output, and the mapping of the condition (text) into keys/values
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out", "kv_mapper.1")
BUILDERS = {"stage_c": StageC, "stage_b": StageB, "stage_c3": StageC3, "stage_b3": StageB3}


def base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base network's weights under their own names, adapters left out (``.base_layer`` unwrapped)."""
    return {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}


def base_fingerprint(model: nn.Module) -> str:
    """``weights.checkpoint.fingerprint`` of the base weights, with or without adapters injected."""
    return tensor_digest(base_state(model))[:16]


def check_settings(rank: int, alpha: float | None, target_modules: Sequence[str], dropout: float) -> None:
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
    if alpha is not None and alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive (or null: alpha = rank), got {alpha!r}")
    if not target_modules or isinstance(target_modules, str):
        raise ValueError(f"LoRA target_modules must be a list of module names such as {list(DEFAULT_TARGETS)}, "
                         f"got {target_modules!r}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


def add_lora(model: nn.Module, rank: int = 4, alpha: float | None = None,
             target_modules: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0, name: str = "default") -> dict:
    """Inject a LoRA adapter ``name`` into ``model`` in place and freeze everything else; returns the
    adapter's settings (``rank``, ``alpha``, ``target_modules``, ``dropout``, ``base_fingerprint``)."""
    check_settings(rank, alpha, target_modules, dropout)
    settings = {"rank": rank, "alpha": float(alpha if alpha is not None else rank),
                "target_modules": list(target_modules), "dropout": float(dropout),
                "base_fingerprint": base_fingerprint(model)}
    matched = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, LoraLayer))
               and any(n == t or n.endswith("." + t) for t in target_modules)}
    if not matched:
        raise ValueError(f"LoRA target_modules {list(target_modules)} match no linear layer of this "
                         f"{type(model).__name__}; use names such as {list(DEFAULT_TARGETS)}")
    config = LoraConfig(r=rank, lora_alpha=settings["alpha"], target_modules=list(target_modules),
                        lora_dropout=dropout, bias="none")
    with warnings.catch_warnings():  # several adapters on one network are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        inject_adapter_in_model(config, model, adapter_name=name)
    for param_name, param in model.named_parameters():
        param.requires_grad_(f".lora_A.{name}." in param_name or f".lora_B.{name}." in param_name)
    return settings


def add_lora_from_config(model: nn.Module, settings: dict | None) -> dict | None:
    """``add_lora`` with a config's ``lora:`` mapping (``{rank, alpha, target_modules, dropout}``); None adds none."""
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ValueError(f"lora must be a mapping {{rank, alpha, target_modules, dropout}} or null, got {settings!r}")
    unknown = set(settings) - {"rank", "alpha", "target_modules", "dropout"}
    if unknown:
        raise ValueError(f"lora has unknown keys {sorted(unknown)}; use rank, alpha, target_modules, dropout")
    return add_lora(model, **settings)


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def adapter_state(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The A and B matrices of adapter ``name``, keyed without the adapter's name (``blocks.2.to_q.lora_A.weight``)."""
    marks = (f".lora_A.{name}.", f".lora_B.{name}.")
    state = {k.replace(f".{name}.", "."): v for k, v in model.state_dict().items() if any(m in k for m in marks)}
    if not state:
        raise ValueError(f"the model holds no LoRA adapter {name!r}; add one with weights.lora.add_lora")
    return state


def save_adapter(model: nn.Module, path: str | os.PathLike, stage: str, settings: dict, name: str = "default",
                 overwrite: bool = False, extra: dict | None = None) -> Path:
    """The adapter alone as safetensors, recording ``base_stage``, the base fingerprint, rank, alpha,
    dropout and target modules (``settings`` as ``add_lora`` returned them) and ``extra``."""
    return save_tensors(adapter_state(model, name), path, ADAPTER_STAGE, {k: v for k, v in settings.items()
                        if k != "base_fingerprint"}, overwrite,
                        {"base_stage": stage, "base_fingerprint": settings["base_fingerprint"], **(extra or {})})


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata with ``config`` = the LoRA settings) of an adapter file; anything else refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter {path} not found; give an adapter.safetensors of a LoRA training run")
    state, _ = load_safetensors(path)
    meta = read_metadata(path)
    if meta.get("stage") != ADAPTER_STAGE or "base_fingerprint" not in meta:
        raise ValueError(f"{path} is not a LoRA adapter (it holds a {meta.get('stage') or 'unknown'} model); give "
                         "the adapter.safetensors a LoRA run exported")
    return state, meta


def load_loras(model: nn.Module, loras: Iterable[tuple[str | os.PathLike, float]], stage: str) -> nn.Module:
    """Add each adapter ``(path, scale)`` to ``model`` (a ``stage`` network), all active together, after
    checking every file first: its stage and base fingerprint must be this network's."""
    loras = [(Path(p), float(s)) for p, s in loras]
    ours = base_fingerprint(model)
    adapters = []
    for path, scale in loras:
        state, meta = read_adapter(path)
        if meta["base_stage"] != stage:
            raise ValueError(f"LoRA adapter {path} is for {meta['base_stage']}, not {stage}; load it onto a "
                             f"{meta['base_stage']} network")
        if meta["base_fingerprint"] != ours:
            raise ValueError(f"LoRA adapter {path} was trained on another {stage} (base fingerprint "
                             f"{meta['base_fingerprint']}) than this one ({ours}); load it onto the {stage} it was "
                             "trained from")
        adapters.append((path, scale, state, meta["config"]))
    names, start = [], len(names_in(model))
    for i, (path, scale, state, cfg) in enumerate(adapters):
        name = f"adapter{start + i}"
        add_lora(model, cfg["rank"], cfg["alpha"], cfg["target_modules"], 0.0, name=name)
        own = adapter_state(model, name)
        if set(own) != set(state) or any(own[k].shape != v.shape for k, v in state.items()):
            raise ValueError(f"LoRA adapter {path} does not fit this {stage}'s layers; it was made for another "
                             "configuration")
        named = {k.replace(".lora_A.", f".lora_A.{name}.").replace(".lora_B.", f".lora_B.{name}."): v
                 for k, v in state.items()}
        model.load_state_dict(named, strict=False)
        for layer in lora_layers(model):
            layer.set_scale(name, scale)
        names.append(name)
    active = names_in(model)
    for layer in lora_layers(model):
        layer.set_adapter([n for n in active if n in layer.lora_A])
    return model.requires_grad_(False).eval()


def names_in(model: nn.Module) -> list[str]:
    """The adapters already loaded into ``model``."""
    return sorted({n for layer in lora_layers(model) for n in layer.lora_A})


def merged_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base weights with every active adapter (at its scale) added: W + scale * alpha / r * B A."""
    for layer in lora_layers(model):
        if layer.active_adapters:
            layer.merge(adapter_names=list(layer.active_adapters))
    return {k: v.detach().clone() for k, v in base_state(model).items()}


def parse_lora(text: str) -> tuple[Path, float]:
    """``PATH`` or ``PATH:SCALE`` (scale a number, default 1)."""
    path, sep, scale = text.rpartition(":")
    if not sep:
        return Path(text), 1.0
    try:
        value = float(scale)
    except ValueError:
        raise ValueError(f"--lora {text!r}: the scale after ':' must be a number, e.g. adapter.safetensors:0.8") from None
    if not path or value != value or abs(value) == float("inf"):
        raise ValueError(f"--lora {text!r}: give PATH or PATH:SCALE with a finite scale, e.g. adapter.safetensors:0.8")
    return Path(path), value


def check_loras(loras: Iterable[tuple[str | os.PathLike, float]]) -> list[tuple[Path, float, dict]]:
    """Each adapter file read and checked (exists, is an adapter) before any network is loaded: (path, scale, meta)."""
    return [(Path(p), s, read_adapter(p)[1]) for p, s in loras]


def merge(base: str | os.PathLike, loras: Sequence[tuple[str | os.PathLike, float]], out: str | os.PathLike,
          overwrite: bool = False) -> Path:
    """A full export of ``base`` (Stage C or Stage B) with the adapters merged in; its metadata is the base's
    (text encoder, latent normalisation, fingerprints, ...) plus ``merged_loras``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; choose another --out or pass --overwrite")
    if not loras:
        raise ValueError("give at least one --lora adapter to merge")
    checked = check_loras(loras)
    path = resolve_checkpoint(base)
    meta = read_metadata(path)
    stage = meta.get("stage")
    if stage not in BUILDERS:
        raise ValueError(f"{path} is a {stage or 'unknown'} export; LoRA merges into Stage C or Stage B exports")
    model = load_loras(load_model(path, stage, BUILDERS[stage]), loras, stage)
    extra = carried_metadata(meta)
    extra["merged_loras"] = extra.get("merged_loras", []) + [
        {"path": str(p), "scale": s, "base_fingerprint": m["base_fingerprint"], **m["config"]} for p, s, m in checked]
    return save_tensors(merged_state(model), out, stage, meta["config"], overwrite, extra)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m weights.lora", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge adapters into a Stage C or Stage B export")
    m.add_argument("--base", required=True, help="the Stage C or Stage B export the adapters were trained on")
    m.add_argument("--lora", action="append", required=True, help="adapter.safetensors[:SCALE] (repeatable)")
    m.add_argument("--out", required=True, type=Path, help="the merged export (.safetensors)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out} must end in .safetensors")
    out = merge(args.base, [parse_lora(t) for t in args.lora], args.out, args.overwrite)
    print(json.dumps({"merged": str(out), "base": args.base, "loras": args.lora}))
    return out


if __name__ == "__main__":
    run_command(main)
