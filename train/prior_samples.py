"""``python -m train.prior_samples``: sample a trained Stage C once for every training caption and write the
latents, so that a Stage B can be trained on what the prior draws as well as on the compressor's latents of
the true image (``StageBTraining(prior_samples=...)``).

Stage B learns to decode the compressor's latents of real images (paper Sec. 3.1), noised a little so that it
accepts imperfect Stage C output; at sampling time it gets Stage C's samples, which sit further from any
image's latents than that noise. Training it on the prior's own samples for the caption of each training
image (a fraction of the steps, the rest on the true latents) closes that gap for the captions it sees.

The file (safetensors): ``latents`` (N, K, 16, h, w) float16, raw compressor latents as the decoder receives
them, ``K`` samples per caption; metadata: the sample ``keys`` in the same order, the Stage C's path and
checksum, the compressor fingerprint the prior was trained on (a Stage B must be trained on that compressor),
and the sampling settings. An existing file is only replaced with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import webdataset as wds
from tqdm.auto import tqdm

from common.cli import at_least, check_output, positive_int, seed
from common.errors import run_command
from imagedata.embedded import openmoji_shards
from imagedata.shards import shard_sets
from pipeline import inputs
from pipeline.cascade import load_any_prior
from weights.checkpoint import load_safetensors, read_metadata, resolve_checkpoint, save_tensors

STAGE = "prior_samples"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.prior_samples", description=__doc__.split("\n\n")[0])
    p.add_argument("--stage-c", required=True, help="a trained Stage C (v2 or v3 export, or run folder)")
    p.add_argument("--out", required=True, help="output file (.safetensors)")
    p.add_argument("--train", default="openmoji",
                   help="the training source of the Stage B run: openmoji (default) or webdataset shards with .txt captions")
    p.add_argument("--embedded-dir", default="data/openmoji", help="where the embedded set lives (default data/openmoji)")
    p.add_argument("--image-size", type=positive_int, default=128, help="the Stage B run's image size (default 128)")
    p.add_argument("--samples", type=positive_int, default=1, help="samples per caption (default 1)")
    p.add_argument("--steps", type=positive_int, default=20, help="Stage C sampling steps (default 20)")
    p.add_argument("--guidance", type=float, default=4.0, help="Stage C guidance scale (default 4)")
    p.add_argument("--batch-size", type=at_least(1), default=64, help="captions per batch (default 64)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the first batch (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p.parse_args(argv)


def training_captions(train: str, embedded_dir: str) -> list[tuple[str, str]]:
    """``(key, caption)`` of every sample of a training source, in shard order."""
    urls = openmoji_shards(embedded_dir, "train")[0] if train == "openmoji" else [
        url for s in shard_sets(train) for url in s.shards]
    pairs = [(key, text.decode("utf-8").strip()) for key, text in wds.WebDataset(urls, shardshuffle=False)
             .to_tuple("__key__", "txt")]
    if not pairs:
        raise ValueError(f"no captioned samples in {train}; give the Stage B run's training shards (with .txt captions)")
    return pairs


def load_prior_samples(paths: str | os.PathLike | list, compressor_fingerprint: str) -> dict[str, torch.Tensor]:
    """``{sample key: (K, 16, h, w) raw latents}`` of one file this command wrote, or of several pooled (each
    caption's samples from all of them, e.g. two runs with different ``--seed``); refused (one line) when a
    file's prior was trained on another compressor than ``compressor_fingerprint``."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        raise ValueError("prior_samples is an empty list; give one or more files of python -m train.prior_samples")
    pooled: dict[str, list[torch.Tensor]] = {}
    shapes = {}
    for path in paths:
        path = resolve_checkpoint(path)
        tensors, raw = load_safetensors(path)
        if raw.get("stage") != STAGE or "latents" not in tensors:
            raise ValueError(f"{path} is not a prior-samples file; make one with python -m train.prior_samples")
        meta = read_metadata(path)
        if meta.get("compressor_fingerprint") != compressor_fingerprint:
            raise ValueError(f"{path} holds samples of a Stage C trained on another semantic compressor "
                             f"({meta.get('compressor_fingerprint')}; this run's is {compressor_fingerprint}); "
                             "sample a Stage C trained on this run's compressor")
        shapes[str(path)] = tuple(tensors["latents"].shape[2:])
        if len(set(shapes.values())) > 1:
            raise ValueError(f"the prior-samples files hold latents of different shapes ({shapes}); sample them all "
                             "at the Stage B run's --image-size")
        for key, latents in zip(meta["keys"], tensors["latents"].float()):
            pooled.setdefault(key, []).append(latents)
    return {key: torch.cat(parts) for key, parts in pooled.items()}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = check_output(args.out, (".safetensors",), args.overwrite)
    inputs.guidance(args.guidance, "--guidance")
    prior = load_any_prior(args.stage_c)
    if not prior.compressor_fingerprint:
        raise ValueError(f"{args.stage_c} does not record the compressor it was trained on; export it with this "
                         "version's trainer")
    pairs = training_captions(args.train, args.embedded_dir)
    grid = prior.grid(args.image_size, args.image_size)
    latents = []
    prior.model.eval()
    with torch.no_grad():
        for k in range(args.samples):
            drawn = []
            for i in tqdm(range(0, len(pairs), args.batch_size), desc=f"Stage C samples {k + 1}/{args.samples}"):
                captions = [c for _, c in pairs[i:i + args.batch_size]]
                gen = torch.Generator().manual_seed(args.seed + k * len(pairs) + i)
                drawn.append(prior.sample(captions, [""] * len(captions), grid, args.steps, args.guidance, gen,
                                          progress=False).half())
            latents.append(torch.cat(drawn))
    path = resolve_checkpoint(args.stage_c)
    report = {"samples": len(pairs), "per_caption": args.samples, "grid": list(grid), "stage_c": str(path),
              "out": str(out)}
    save_tensors({"latents": torch.stack(latents, 1)}, out, STAGE, {}, overwrite=args.overwrite, extra={
        "keys": [key for key, _ in pairs], "stage_c": str(path.resolve()),
        "stage_c_checksum": read_metadata(path).get("checksum"), "compressor_fingerprint": prior.compressor_fingerprint,
        "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "image_size": args.image_size})
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    run_command(main)
