"""``python -m benchmarks.precomputed_training``: Stage C trained from images and from precomputed shards.

The embedded OpenMoji train split is precomputed once (``python -m train.precompute``: the shipped
tiny compressor and the MiniLM text encoder, 128 px), then the tiny Stage C config trains for
``--steps`` steps twice with the same seed: from the image shards (encoding every batch with the
frozen compressor and text encoder) and from the precomputed shards. Prints and writes
(``--out``) the training samples/s of both, their loss curves (means over windows of 25 steps) and
a PNG plot of the two curves.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import lightning as L
from matplotlib.figure import Figure

from common.cli import check_output, positive_int
from imagedata.embedded import openmoji_shards
from common.errors import run_command
from common.files import write_json
from train.cli import main as train_main
from train.precompute import main as precompute_main

ROOT = Path(__file__).resolve().parents[1]
COMPRESSOR = ROOT / "checkpoints" / "tiny_grid3" / "compressor.safetensors"  # the paper-grid compressor the figures were measured with
WINDOW = 25


class StepTimer(L.Callback):
    """Wall time of the training batches after the first ``skip`` (data loading included)."""

    def __init__(self, skip: int = 5):
        self.skip, self.start, self.result = skip, None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.skip:
            self.start = time.perf_counter()

    def on_train_end(self, trainer, module):
        self.result = (time.perf_counter() - self.start, trainer.global_step - self.skip)


def losses(run: Path) -> list[float]:
    with open(run / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def fit(name: str, out: Path, steps: int, batch: int, data: list[str]) -> dict:
    root = out / name
    cli = train_main(["fit", "--config", str(ROOT / "configs/stage_c/tiny.yaml"), "--trainer.default_root_dir", str(root),
                "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0", "--trainer.log_every_n_steps", "1",
                "--trainer.callbacks+=benchmarks.precomputed_training.StepTimer",
                "--model.init_args.compressor", str(COMPRESSOR), "--model.init_args.stage_b", "null",
                "--model.init_args.cache_latents", "false", "--data.init_args.batch_size", str(batch),
                "--data.init_args.val", "null", "--data.init_args.num_workers", "1", *data])
    # found by name: run as ``python -m`` this module is ``__main__``, the CLI's instance is of the imported one
    seconds, timed = next(cb.result for cb in cli.trainer.callbacks if type(cb).__name__ == "StepTimer")
    curve = losses(next(root.glob("*/version_0")))
    return {"samples_per_s": round(timed * batch / seconds, 1), "steps": len(curve),
            "loss_windows": [round(sum(curve[i:i + WINDOW]) / len(curve[i:i + WINDOW]), 4)
                             for i in range(0, len(curve), WINDOW)], "curve": curve}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=positive_int, default=200)
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--data-dir", default="data/openmoji", help="embedded OpenMoji shards (built if missing)")
    ap.add_argument("--out", default="runs/precomputed_training", help="folder for the runs and results (finished precomputed latents in it are reused)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    check_output(out / "precomputed_training.json", (".json",))
    shards, _ = openmoji_shards(args.data_dir, "train")
    latents = out / "latents"
    if not (latents / "manifest.json").is_file() or not json.loads((latents / "manifest.json").read_text())["complete"]:
        precompute_main(["--shards", str(Path(shards[0]).parent / "train-*.tar"), "--out", str(latents),
                         "--compressor", str(COMPRESSOR), "--text-encoder", "minilm", "--image-size", "128"])
    images = fit("images", out, args.steps, args.batch_size, ["--data.init_args.embedded_dir", args.data_dir])
    pre = fit("precomputed", out, args.steps, args.batch_size, ["--data.init_args.train", str(latents)])
    n = min(len(images["curve"]), len(pre["curve"]))
    report = {"steps": args.steps, "batch_size": args.batch_size, "images": images, "precomputed": pre,
              "speedup": round(pre["samples_per_s"] / images["samples_per_s"], 2),
              "mean_abs_loss_difference": round(sum(abs(a - b) for a, b in zip(images["curve"], pre["curve"])) / n, 5)}
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    for name, run in (("from images", images), ("from precomputed shards", pre)):
        ax.plot(run["curve"], label=f"{name} ({run['samples_per_s']} samples/s)", lw=0.8)
    ax.set_xlabel("step"), ax.set_ylabel("train/loss"), ax.set_yscale("log"), ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    for run in (images, pre):
        run.pop("curve")
    write_json(out / "precomputed_training.json", report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run_command(main)
