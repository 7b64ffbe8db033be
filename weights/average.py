"""Average exports of one network fine-tuned from a common start, tensor by tensor (a weight soup: Wortsman et
al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
inference time", Sec. 2). Two exports of one training chain that each lean one way (one fits the training captions,
the other generalises) can average into one that keeps most of both.

The inputs must be one stage with one config, trained on the same conditioning (every ``*_fingerprint`` and
``*_config`` their metadata records agree), with the same tensors. The output keeps the last input's other
metadata (its chain's steps and time: list the latest export of the chain last) and records ``averaged_from``.

    python -m weights.average A.safetensors B.safetensors [--weights 0.5 0.5] --out soup.safetensors [--overwrite]
"""
from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from common.cli import check_output
from common.errors import run_command
from weights.checkpoint import carried_metadata, load_safetensors, read_metadata, resolve_checkpoint, save_tensors


def must_agree(key: str) -> bool:
    """Metadata that ties an export to what it was trained on (its stage, config, Stage A, compressor, ...)."""
    return key in ("stage", "config") or key.endswith(("_fingerprint", "_config"))


def average(paths: Sequence[str | Path], weights: Sequence[float] | None, out: str | Path,
            overwrite: bool = False) -> Path:
    """Write the weighted mean of the exports ``paths`` (equal weights when ``weights`` is None) to ``out``."""
    if len(paths) < 2:
        raise ValueError(f"averaging needs at least two exports, got {len(paths)}")
    weights = [1 / len(paths)] * len(paths) if weights is None else list(weights)
    if len(weights) != len(paths):
        raise ValueError(f"--weights has {len(weights)} values for {len(paths)} exports; give one per export")
    if any(not math.isfinite(w) or w <= 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"--weights {' '.join(map(str, weights))} must be positive and sum to 1")
    out = check_output(out, (".safetensors",), overwrite)
    files = [resolve_checkpoint(p) for p in paths]
    if any(f.suffix != ".safetensors" for f in files):
        raise ValueError("averaging reads .safetensors exports (a run folder's model.safetensors); "
                         f"got {', '.join(str(f) for f in files if f.suffix != '.safetensors')}")
    loaded = [load_safetensors(f) for f in files]
    first_state, first_meta = loaded[0]
    for f, (state, meta) in zip(files[1:], loaded[1:]):
        keys = {k for k in meta.keys() | first_meta.keys() if must_agree(k)}
        differ = sorted(k for k in keys if meta.get(k) != first_meta.get(k))
        if differ:
            raise ValueError(f"{f} differs from {files[0]} in {', '.join(differ)}; average exports of one network "
                             "trained on the same stages")
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in first_state.items()}:
            raise ValueError(f"{f} does not hold the same tensors as {files[0]}; average exports of one network")
    soup = {}
    for key, tensor in first_state.items():
        if tensor.is_floating_point():
            soup[key] = sum(w * state[key].float() for w, (state, _) in zip(weights, loaded)).to(tensor.dtype)
        elif all(torch.equal(state[key], tensor) for state, _ in loaded):
            soup[key] = tensor
        else:
            raise ValueError(f"{key} is an integer tensor that differs between the exports; it cannot be averaged")
    last_meta = read_metadata(files[-1])
    extra = carried_metadata(last_meta)
    extra["averaged_from"] = [{"path": str(p), "weight": w} for p, w in zip(paths, weights)]
    return save_tensors(soup, out, last_meta["stage"], last_meta["config"], overwrite, extra)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m weights.average", description=__doc__.split("\n\n")[0])
    ap.add_argument("exports", nargs="+", help="two or more exports of one network (.safetensors or run folders)")
    ap.add_argument("--weights", type=float, nargs="+", help="one weight per export, summing to 1 (default: equal)")
    ap.add_argument("--out", required=True, help="the averaged export (.safetensors)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)
    out = average(args.exports, args.weights, args.out, args.overwrite)
    print(json.dumps({"averaged": str(out), "from": args.exports, "weights": args.weights}))
    return out


if __name__ == "__main__":
    run_command(main)
