"""Retrain all three tiny stages on the embedded data, in training order (A, B, C), then sample a grid.

    python -m sample.quickstart [--out runs/quickstart]

Runs the documented training commands one after the other (each shows its progress bar), bundles
the exports into ``<out>/checkpoints`` with a model card, and samples the val captions' first
prompts into ``<out>/grid.png``. About 55 minutes on 2 CPU cores. Never reuses a non-empty ``--out``.
Works from any directory: the configs are read from the checkout's ``configs/``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from common.cli import check_output, positive_int, shown
from common.errors import run_command

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMPTS = ["red apple", "grinning face", "sun", "fire", "blue heart", "snowman", "rocket", "green apple"]


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    start = time.time()
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise ChildProcessError(f"this step failed (exit status {code}; its error is above): {' '.join(cmd)}")
    print(f"done in {(time.time() - start) / 60:.1f} min", flush=True)


def stage_config(stage: str) -> Path:
    """``configs/<stage>/tiny.yaml`` of this checkout, wherever the command runs."""
    path = CONFIGS / stage / "tiny.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the quickstart needs the configs/ folder of a source checkout "
                                "(git clone, then pip install -e .)")
    return path


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--max-steps", type=positive_int, default=None, help="override every stage's steps (smoke tests)")
    ap.add_argument("--prompts", nargs="+", default=PROMPTS)
    args = ap.parse_args(argv)
    out = check_output(args.out)
    configs = {stage: shown(stage_config(stage)) for stage in ("stage_a", "stage_b", "stage_c")}
    py = sys.executable
    extra = []
    if args.max_steps is not None:
        interval = max(1, args.max_steps // 2)
        extra = ["--trainer.max_steps", str(args.max_steps), "--trainer.val_check_interval", str(interval),
                 "--trainer.limit_val_batches", "1"]
    a, b, c = out / "stage_a", out / "stage_b", out / "stage_c"
    commands = [
        [py, "-m", "train", "fit", "--config", configs["stage_a"], "--trainer.default_root_dir", str(a)],
        [py, "-m", "train", "fit", "--config", configs["stage_b"], "--trainer.default_root_dir", str(b),
         "--model.init_args.stage_a", str(a / "tiny")],
        [py, "-m", "train", "fit", "--config", configs["stage_c"], "--trainer.default_root_dir", str(c),
         "--model.init_args.compressor", str(b / "tiny"), "--model.init_args.stage_b", str(b / "tiny")],
    ]
    start = time.time()
    for cmd in commands:
        run(cmd + extra)
    bundle = out / "checkpoints"
    run([py, "-m", "sample.bundle", "--stage-a", str(a / "tiny"), "--stage-b", str(b / "tiny"),
         "--stage-c", str(c / "tiny"), "--out", str(bundle), "--commands", *[" ".join(["python", *cmd[1:]]) for cmd in commands]])
    run([py, "-m", "sample", *args.prompts, "--out", str(out / "grid.png"), "--stage-c", str(bundle / "stage_c.safetensors"),
         "--stage-b", str(bundle / "stage_b.safetensors"), "--stage-a", str(bundle / "stage_a.safetensors")])
    print(f"\nquickstart finished in {(time.time() - start) / 60:.1f} min: checkpoints in {bundle}, "
          f"samples in {out / 'grid.png'}")
    return out


if __name__ == "__main__":
    run_command(main)
