"""Retrain all three tiny stages on the embedded data, in training order (A, B, C), then sample a grid.

    python -m sample.quickstart [--out runs/quickstart]

Runs the documented training commands one after the other (each shows its progress bar), bundles
the exports into ``<out>/checkpoints`` with a model card, and samples the val captions' first
prompts into ``<out>/grid.png``. About 55 minutes on 2 CPU cores. Never reuses a non-empty ``--out``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["red apple", "grinning face", "sun", "fire", "blue heart", "snowman", "rocket", "green apple"]


def run(cmd: list[str]) -> None:
    print("\n$ " + " ".join(cmd), flush=True)
    start = time.time()
    subprocess.run(cmd, check=True)
    print(f"done in {(time.time() - start) / 60:.1f} min", flush=True)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--max-steps", type=int, default=None, help="override every stage's steps (smoke tests)")
    ap.add_argument("--prompts", nargs="+", default=PROMPTS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        ap.error(f"{out} is not empty; choose another --out")
    py = sys.executable
    extra = []
    if args.max_steps is not None:
        interval = max(1, args.max_steps // 2)
        extra = ["--trainer.max_steps", str(args.max_steps), "--trainer.val_check_interval", str(interval),
                 "--trainer.limit_val_batches", "1"]
    a, b, c = out / "stage_a", out / "stage_b", out / "stage_c"
    commands = [
        [py, "-m", "train", "fit", "--config", "configs/stage_a/tiny.yaml", "--trainer.default_root_dir", str(a)],
        [py, "-m", "train", "fit", "--config", "configs/stage_b/tiny.yaml", "--trainer.default_root_dir", str(b),
         "--model.init_args.stage_a", str(a / "tiny")],
        [py, "-m", "train", "fit", "--config", "configs/stage_c/tiny.yaml", "--trainer.default_root_dir", str(c),
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
    main()
