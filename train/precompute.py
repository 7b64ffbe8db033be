"""``python -m train.precompute``: run the frozen encoders once over image shards and write shards of
their outputs, so that training reads latents instead of decoding and encoding images every step.

Per sample (webdataset members ``<key>.<field>``): ``stage_a.npy`` (Stage A's unquantised, scaled
latents, ``StageA.encode``), ``semantic.npy`` (the compressor's raw, un-normalised output),
``text.npy`` (the text encoder's states), all float16; ``txt`` (the caption); with
``--keep-images`` also ``image.npy`` (the cropped image, uint8). Any of the three encoders may be
left out (Stage C needs only the compressor and the text encoder).

Images are scaled to cover ``--image-size`` (or the nearest ``--buckets`` bucket) and centre-cropped,
as validation crops them. Each input shard gives one output shard of the same name, written under a
temporary name, synced and renamed when complete (``common.files``; a full disk ends with a one-line
error and leaves the finished shards); ``manifest.json`` records the encoders' fingerprints
(``weights.checkpoint.fingerprint``), the settings and the samples per finished shard. Running the same
command again after an interruption continues with the shards not yet written; a finished output
folder is only replaced with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import webdataset as wds
from tqdm.auto import tqdm

from weights.loaders import load_compressor, load_stage_a
from weights.checkpoint import fingerprint
from common.cli import check_output, positive_int
from common.errors import run_command
from pipeline.text_encoder import ENCODERS, build_text_encoder
from imagedata.buckets import batch_by_shape, parse_buckets
from imagedata.shards import (BASE_REASONS, FINGERPRINTS, FORMAT, LATENT_KEYS, MANIFEST, Filters, ImagePrep,
                              SampleCounts, existing_shards, npy_bytes, shard_samples)
from common.files import PARTIAL, atomic_file, write_json



def buckets_arg(text: str) -> list[tuple[int, int]]:
    """An argparse type: a preset name (``paper_c3``) or ``HxW,HxW,...`` (``768x1280,1280x768``)."""
    try:
        if "x" not in text:
            return parse_buckets(text)
        return parse_buckets([[int(v) for v in pair.split("x")] for pair in text.split(",") if pair.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).split(";")[0] + " (give paper_c3 or HxW,HxW, e.g. 768x1280,1280x768)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.precompute", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="input image shards: a folder, glob, brace pattern or URL")
    p.add_argument("--out", required=True, help="output folder (new, empty, or an interrupted precompute's)")
    p.add_argument("--stage-a", help="Stage A weights (safetensors export or checkpoint)")
    p.add_argument("--compressor", help="semantic compressor: compressor.safetensors or a Stage B run folder")
    p.add_argument("--text-encoder", choices=sorted(ENCODERS), help="text encoder name")
    p.add_argument("--image-size", type=positive_int, default=256, help="square crop side (default 256)")
    p.add_argument("--buckets", type=buckets_arg, help="aspect-ratio buckets instead: paper_c3 or HxW,HxW,...")
    p.add_argument("--min-size", type=int, default=0, help="skip images whose shorter side is smaller")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--keep-images", action="store_true", help="also store the cropped images (uint8)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished (or differently set) precompute")
    args = p.parse_args(argv)
    if not (args.stage_a or args.compressor or args.text_encoder):
        p.error("give at least one of --stage-a, --compressor, --text-encoder")
    if args.image_size % 4:
        p.error(f"--image-size must be a multiple of 4 (Stage A is f4), got {args.image_size}")
    return args


def output_names(shards: list[str]) -> list[str]:
    """An output shard name per input: its file name, or ``NNNNNN.tar`` when those are not unique .tar names."""
    names = [os.path.basename(s.split()[-1] if s.startswith("pipe:") else s.split("?")[0]) for s in shards]
    if len(set(names)) == len(names) and all(n.endswith(".tar") and not n.startswith(".") for n in names):
        return names
    return [f"{i:06d}.tar" for i in range(len(shards))]


def prepare_output(out: Path, settings: dict, overwrite: bool) -> dict:
    """The manifest to continue from: a fresh one, or an interrupted run's with the same settings.
    A finished run, or an interrupted one with other settings, is replaced only with ``overwrite``."""
    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        try:
            old = json.loads(manifest_path.read_text())
        except ValueError:
            old = {}
        same = {k: old.get(k) for k in settings} == settings
        if old.get("complete") or not same:
            if not overwrite:
                state = "a finished precompute" if old.get("complete") else "an interrupted precompute with other settings"
                raise FileExistsError(f"--out {out} holds {state}; choose another --out or pass --overwrite")
            for name in old.get("names", []):
                for path in (out / name, out / (name + PARTIAL)):
                    path.unlink(missing_ok=True)
            manifest_path.unlink()
        else:
            return old
    else:
        check_output(out)  # new or empty, and writable
    out.mkdir(parents=True, exist_ok=True)
    manifest = {**settings, "format": FORMAT, "complete": False, "shards": {}, "count": 0, "skipped": {}}
    write_json(manifest_path, manifest)
    return manifest


@torch.no_grad()
def encode(batch: dict, encoders: dict, device: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one batch (same-shape images), by encoder name (``LATENT_KEYS``)."""
    images = batch["image"].to(device)
    inputs = {"stage_a": images, "semantic": images, "text": batch["caption"]}
    return {k: (m.encode if k == "stage_a" else m)(inputs[k]) for k, m in encoders.items()}


def precompute_shard(url: str, path: Path, prep: ImagePrep, encoders: dict, args) -> tuple[int, SampleCounts]:
    """Encode one input shard into the tar ``path``, written atomically (``common.files``: complete or not
    there); returns the samples written and those skipped."""
    n, counts = 0, SampleCounts(BASE_REASONS + prep.filters.reasons())
    samples = prep(shard_samples([{"url": url}], counts), counts, rng=None)
    with atomic_file(path) as file, wds.TarWriter(file) as sink:
        for batch in batch_by_shape(samples, args.batch_size, drop_last=False):
            tensors = encode(batch, encoders, args.device)
            for i, key in enumerate(batch["key"]):
                record = {"__key__": key, "txt": batch["caption"][i]}
                for name, t in tensors.items():
                    record[f"{name}.npy"] = npy_bytes(t[i].to(torch.float16).cpu().numpy())
                if args.keep_images:
                    record["image.npy"] = npy_bytes((batch["image"][i] * 255).round().to(torch.uint8).numpy())
                sink.write(record)
                n += 1
    return n, counts


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    shards = existing_shards(args.shards)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a new or empty folder")
    # every encoder loads before anything is written: a wrong path fails now
    encoders = {"stage_a": args.stage_a and load_stage_a(args.stage_a),
                "semantic": args.compressor and load_compressor(args.compressor),
                "text": args.text_encoder and build_text_encoder(args.text_encoder)}
    encoders = {k: m.to(args.device).eval() for k, m in encoders.items() if m}
    settings = {"source": str(args.shards), "names": output_names(shards), "image_size": args.image_size,
                "buckets": [list(b) for b in args.buckets] if args.buckets else None, "min_size": args.min_size,
                "keep_images": args.keep_images, "text_encoder": args.text_encoder, "keys": list(encoders),
                **{fp: fingerprint(encoders[k]) if k in encoders else None for k, fp in zip(LATENT_KEYS, FINGERPRINTS)}}
    manifest = prepare_output(out, settings, args.overwrite)

    prep = ImagePrep(args.image_size, None, "center", Filters(min_size=args.min_size), args.buckets)
    todo = [(url, name) for url, name in zip(shards, settings["names"]) if name not in manifest["shards"]]
    bar = tqdm(todo, desc="precompute", unit="shard", initial=len(shards) - len(todo), total=len(shards),
               file=sys.stderr)
    for url, name in bar:
        manifest["shards"][name], counts = precompute_shard(url, out / name, prep, encoders, args)
        manifest["count"] = sum(manifest["shards"].values())
        for reason, k in counts.as_dict().items():
            if reason != "yielded" and k:
                manifest["skipped"][reason] = manifest["skipped"].get(reason, 0) + k
        write_json(out / MANIFEST, manifest)
        bar.set_postfix(samples=manifest["count"])
    if manifest["count"] == 0:
        raise ValueError(f"no sample of {args.shards} could be encoded ({SampleCounts.text(manifest['skipped'])}); "
                         "check the shards or lower --min-size")
    manifest["complete"] = True
    write_json(out / MANIFEST, manifest)
    print(json.dumps({"out": str(out), "shards": len(shards), "count": manifest["count"],
                      "skipped": manifest["skipped"], "keys": manifest["keys"]}))
    return manifest


if __name__ == "__main__":
    run_command(main)
