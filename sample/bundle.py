"""Collect trained stages into one folder the sampler reads, with a model card.

    python -m sample.bundle --stage-a runs/stage_a/tiny --stage-b runs/stage_b/tiny \\
        --stage-c runs/stage_c/tiny --out checkpoints/tiny

Copies ``stage_a``, ``stage_b``, ``compressor`` and ``stage_c`` safetensors (checking that they were
trained together: Stage B on that Stage A, Stage B and Stage C on that compressor) and writes ``MODEL_CARD.md``
and ``model_card.json``: per stage the config, steps, training command, wall time (recorded in the export by the
training module; for a run continued from another export, also the whole chain's) and the metrics of the last
validation. Stage C and Stage B may be Würstchen v2 or Stable Cascade v3 ones (``pipeline.cascade``); the
compressor is the one next to Stage B unless ``--compressor`` names the run that trained it (a Stage B refined
on a frozen compressor). Never replaces a file already in ``--out``; every path a card records is absolute.
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
from pathlib import Path

import torch

from pipeline.cascade import load_any_decoder, load_any_prior
from weights.loaders import load_compressor, load_stage_a
from weights.checkpoint import fingerprint, read_metadata, resolve_checkpoint
from common.cli import check_output
from common.errors import run_command

STAGE_FILES = ("stage_a.safetensors", "stage_b.safetensors", "compressor.safetensors", "stage_c.safetensors")
CARDS = ("model_card.json", "MODEL_CARD.md")


def run_summary(export: Path) -> dict:
    """Steps, wall time, last validation metrics and the command of the run that wrote ``export``."""
    run = export.parent
    meta = read_metadata(export)
    summary = {"stage": meta.get("stage"), "config": meta.get("config"), "steps": meta.get("global_step"),
               "wall_time_min": round(meta["wall_time_s"] / 60, 1) if "wall_time_s" in meta else "not recorded"}
    if {"init_global_step", "init_wall_time_s", "wall_time_s"} <= meta.keys():  # continued: the whole chain's cost
        summary["chain_steps"] = meta["global_step"] + meta["init_global_step"]
        summary["chain_wall_time_min"] = round((meta["wall_time_s"] + meta["init_wall_time_s"]) / 60, 1)
    metrics = run / "metrics.csv"
    if metrics.exists():
        rows = list(csv.DictReader(metrics.open()))
        last = {}
        for row in rows:
            last.update({k: v for k, v in row.items() if k.startswith("val/") and v})
        summary["last_validation"] = {k: round(float(v), 4) for k, v in last.items()}
    config = run / "config.yaml"
    if config.exists():
        summary["config_file"] = next((line.split(":", 1)[1].strip() for line in config.read_text().splitlines()
                                       if line.startswith("# config:")), None)
    return summary


def compressor_file(spec: str | None, stage_b: Path) -> Path:
    """The compressor to bundle: ``spec`` (its file, or the Stage B run that trained it), else Stage B's neighbour."""
    if spec is None:
        return stage_b.with_name("compressor.safetensors")
    path = resolve_checkpoint(spec)
    trained_with_b = Path(spec).is_dir() or path.name == "model.safetensors"
    return (path.with_name("compressor.safetensors") if trained_with_b else path).resolve()


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage-a", required=True)
    ap.add_argument("--stage-b", required=True)
    ap.add_argument("--stage-c", required=True)
    ap.add_argument("--compressor", default=None, help="compressor.safetensors or the Stage B run that trained it "
                    "(default: the one next to --stage-b)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--commands", nargs="*", default=[], help="the training commands, for the card")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for name in STAGE_FILES + CARDS:  # never replaces anything already there, bundle or not
        check_output(out / name, (Path(name).suffix,))
    a, b, c = (resolve_checkpoint(p).resolve() for p in (args.stage_a, args.stage_b, args.stage_c))
    compressor = compressor_file(args.compressor, b)
    prior, _ = load_any_prior(c), load_any_decoder(b, a)  # each a readable Stage C / Stage B (v2 or v3)
    if read_metadata(b).get("stage_a_fingerprint") != fingerprint(load_stage_a(str(a))):
        raise ValueError(f"Stage B {b} was not trained on Stage A {a}; pass the Stage A it was trained with")
    compressor_fp = fingerprint(load_compressor(compressor))
    for stage, path, trained_on in (("Stage B", b, read_metadata(b).get("compressor_fingerprint")),
                                    ("Stage C", c, prior.compressor_fingerprint)):
        if trained_on != compressor_fp:
            raise ValueError(f"{stage} {path} was not trained on the compressor {compressor}; pass the compressor "
                             "(--compressor) or Stage B run whose compressor trained it")
    out.mkdir(parents=True, exist_ok=True)
    files = dict(zip(STAGE_FILES, (a, b, compressor, c)))
    for name, src in files.items():
        shutil.copyfile(src, out / name)
    card = {
        "stages": {name.split(".")[0]: {"source": str(src), "size_mb": round(src.stat().st_size / 2**20, 2),
                                        **(run_summary(src) if name != "compressor.safetensors"
                                           else {"trained_with": "stage_b"})}
                   for name, src in files.items()},
        "hardware": f"{platform.machine()}, {torch.get_num_threads()} CPU threads (torch), no GPU",
        "commands": args.commands,
        "total_size_mb": round(sum((out / n).stat().st_size for n in files) / 2**20, 2),
    }
    (out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    lines = ["# Tiny Würstchen checkpoints", "",
             "Trained by this repository's own commands on the embedded OpenMoji data (CC BY-SA 4.0).", "",
             "| stage | file | MB | steps | wall time (min) | last validation |", "|---|---|---|---|---|---|"]
    for stage, info in card["stages"].items():
        steps, minutes = info.get("steps", "(with stage_b)"), info.get("wall_time_min", "")
        if "chain_steps" in info:
            steps, minutes = f"{steps} (chain {info['chain_steps']})", f"{minutes} (chain {info['chain_wall_time_min']})"
        lines.append(f"| {stage} | `{stage}.safetensors` | {info['size_mb']} | {steps} | {minutes} | "
                     f"{json.dumps(info.get('last_validation', {}))} |")
    lines += ["", f"Hardware: {card['hardware']}.", "", "Commands:", ""] + [f"    {c}" for c in args.commands]
    (out / "MODEL_CARD.md").write_text("\n".join(lines) + "\n")
    print(json.dumps({"out": str(out), "total_size_mb": card["total_size_mb"]}))
    return out


if __name__ == "__main__":
    run_command(main)
