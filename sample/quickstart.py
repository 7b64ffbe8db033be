"""Retrain the shipped tiny checkpoints from scratch on the embedded data (``PHASES``: the 8x8-grid chain, a v-head
Stable Cascade prior and a Stage B trained on that prior's samples), bundle them and sample a grid: about 20 hours
on 2 CPU cores, the sum of the phases' measured times. Most phases continue the previous one's export and several
stop early on a longer cosine schedule, so fewer steps train other weights, not the same ones sooner. ``--quick``
(45.5 minutes on 2 CPU cores, ``QUICK``) reproduces the paper's grid recipe of the earlier shipped set before
Stage B's refinement: one run per stage of ``configs/*/tiny.yaml``, 3x3 semantic grid.

    python -m sample.quickstart [--out runs/quickstart] [--quick]
    python -m sample.quickstart --out /tmp/qs --max-steps 2 --train data/openmoji/train-000007.tar   # smoke run

Stages train in the paper's order (Sec. 3, Fig. 3): Stage A; Stage B with the semantic compressor's head (Sec.
3.1); Stage C on that compressor's frozen latents (Sec. 3.2). Stage B is then refined on the frozen compressor, last
on the prior's own samples for each training caption as well as on the noised true latents (Sec. 3.1 noises them
because Stage C's will be imperfect). Each command shows its progress bar; the exports are bundled into
``<out>/checkpoints`` with a model card (``python -m sample.bundle``), and the prompts are drawn into
``<out>/grid.png``. ``--max-steps N`` (smoke runs) gives every phase N steps (N sampling steps for the prior's
samples); ``--train`` trains every phase on other shards (one small shard keeps a smoke run to minutes). Never
reuses a non-empty ``--out``; works from any directory (the configs are read from the checkout's ``configs/``).
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common.cli import check_output, positive_int, shown
from common.errors import run_command
from imagedata.shards import shard_sets

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PROMPTS = ["red apple", "grinning face", "sun", "fire", "blue heart", "snowman", "rocket", "green apple"]

BALANCED = " --data.init_args.caption_weights '{\"skin tone\": 0.2}'"  # skin-tone variants at a fifth of their share
# Stage B refined on the frozen compressor of phase 2's run ({out}/stage_b/grid8), as every later phase uses it
REFINE = ("train fit --config stage_b/tiny_grid8_v_refine.yaml --trainer.default_root_dir {out}/stage_b_refine "
          "--model.init_args.stage_a {out}/stage_a/tiny --model.init_args.compressor {out}/stage_b/grid8" + BALANCED)
PRIOR = ("train fit --config stage_c/sc_tiny.yaml --trainer.default_root_dir {out}/stage_c3 "
         "--model.init_args.compressor {out}/stage_b/grid8" + BALANCED)
V_PRIOR = PRIOR + " --model.init_args.size '{\"preset\": \"tiny\", \"prediction\": \"v\"}'"


def pooled(*names: str) -> str:
    """The prior-sample files ``{out}/prior_samples_<name>.safetensors`` as one pooled list argument."""
    return "'[" + ", ".join(f"{{out}}/prior_samples_{name}.safetensors" for name in names) + "]'"

# (phase, minutes measured on 2 CPU cores, python -m <arguments>); {out} is --out, --config is under configs/
PHASES = [
    ("Stage A", 7.1, "train fit --config stage_a/tiny.yaml --trainer.default_root_dir {out}/stage_a"),
    ("Stage B + compressor head, 8x8 grid: 2,500 of 6,000 steps", 30.8,
     "train fit --config stage_b/tiny_grid8_v.yaml --trainer.default_root_dir {out}/stage_b --run_name grid8 "
     "--model.init_args.stage_a {out}/stage_a/tiny --trainer.max_steps 2500 --lr_scheduler.init_args.total_steps 6000"
     + BALANCED),
    ("Stage B refined on the frozen compressor, 6,000 steps", 83.6,
     REFINE + " --run_name r1 --model.init_args.init_from {out}/stage_b/grid8"),
    ("Stage B refined again, 6,000 steps", 76.7,
     REFINE + " --run_name r2 --model.init_args.init_from {out}/stage_b_refine/r1"),
    ("Stage B refined a third time, 4,000 steps", 45.5,
     REFINE + " --run_name r3 --model.init_args.init_from {out}/stage_b_refine/r2 --trainer.max_steps 4000"),
    ("Stage C (v3, eps head): 4,000 of 5,000 steps", 83.7,
     PRIOR + " --run_name eps --trainer.max_steps 4000 --lr_scheduler.init_args.total_steps 5000 "
     "--trainer.val_check_interval 500"),
    ("Stage C with a v head, 3,000 steps at lr 5e-4", 58.6,
     V_PRIOR + " --run_name v1 --model.init_args.init_from {out}/stage_c3/eps --trainer.max_steps 3000 "
     "--optimizer.init_args.lr 5e-4 --trainer.val_check_interval 500"),
    ("Stage C v, 3,000 steps at lr 3e-4", 53.1,
     V_PRIOR + " --run_name v2 --model.init_args.init_from {out}/stage_c3/v1 --trainer.max_steps 3000 "
     "--optimizer.init_args.lr 3e-4 --trainer.val_check_interval 500"),
    ("Stage C v, 4,000 steps at lr 2.5e-4", 86.6,
     V_PRIOR + " --run_name v3 --model.init_args.init_from {out}/stage_c3/v2 --trainer.max_steps 4000 "
     "--optimizer.init_args.lr 2.5e-4"),
    ("the 6,000-step v prior's sample for every training caption", 22.0,
     "train.prior_samples --stage-c {out}/stage_c3/v2 --out {out}/prior_samples.safetensors"),
    ("Stage B on the prior's samples: 4,000 of 6,000 steps", 61.8,
     REFINE + " --run_name prior --model.init_args.init_from {out}/stage_b_refine/r3 "
     "--model.init_args.prior_samples {out}/prior_samples.safetensors "
     "--trainer.max_steps 4000 --lr_scheduler.init_args.total_steps 6000 --trainer.val_check_interval 1000"),
    ("the 10,000-step v prior's samples, two per training caption", 40.0,
     "train.prior_samples --stage-c {out}/stage_c3/v3 --out {out}/prior_samples_v3.safetensors --samples 2 --seed 1000"),
    ("Stage B on those samples, 6,000 steps", 94.8,
     REFINE + " --run_name prior2 --model.init_args.init_from {out}/stage_b_refine/prior "
     "--model.init_args.prior_samples {out}/prior_samples_v3.safetensors --trainer.val_check_interval 500"),
    ("Stage B on them again, 4,000 steps at lr 2.5e-4", 51.5,
     REFINE + " --run_name prior3 --model.init_args.init_from {out}/stage_b_refine/prior2 "
     "--model.init_args.prior_samples {out}/prior_samples_v3.safetensors --optimizer.init_args.lr 2.5e-4 "
     "--trainer.max_steps 4000 --trainer.val_check_interval 1000"),
    ("Stage B on them once more, 4,000 steps at lr 1.5e-4", 53.0,
     REFINE + " --run_name prior4 --model.init_args.init_from {out}/stage_b_refine/prior3 "
     "--model.init_args.prior_samples {out}/prior_samples_v3.safetensors --optimizer.init_args.lr 1.5e-4 "
     "--trainer.max_steps 4000 --trainer.val_check_interval 1000"),
    ("two more samples per training caption, another seed", 34.3,
     "train.prior_samples --stage-c {out}/stage_c3/v3 --out {out}/prior_samples_v3_seed2000.safetensors --samples 2 "
     "--seed 2000"),
    ("Stage B on all four samples per caption, 4,000 steps at lr 2.5e-4", 54.1,
     REFINE + " --run_name prior5 --model.init_args.init_from {out}/stage_b_refine/prior4 "
     "--model.init_args.prior_samples " + pooled("v3", "v3_seed2000") + " "
     "--optimizer.init_args.lr 2.5e-4 --trainer.max_steps 4000 --trainer.val_check_interval 1000"),
    ("Stage B on the same four samples per caption, 4,000 steps at lr 1.5e-4", 58.6,
     REFINE + " --run_name prior6 --model.init_args.init_from {out}/stage_b_refine/prior5 "
     "--model.init_args.prior_samples " + pooled("v3", "v3_seed2000") + " "
     "--optimizer.init_args.lr 1.5e-4 --trainer.max_steps 4000 --trainer.val_check_interval 1000"),
    ("two more samples per training caption, a third seed", 31.0,
     "train.prior_samples --stage-c {out}/stage_c3/v3 --out {out}/prior_samples_v3_seed3000.safetensors --samples 2 "
     "--seed 3000"),
    ("Stage B on all six samples per caption, 4,000 steps at lr 2.5e-4", 48.3,
     REFINE + " --run_name prior7 --model.init_args.init_from {out}/stage_b_refine/prior6 "
     "--model.init_args.prior_samples " + pooled("v3", "v3_seed2000", "v3_seed3000") + " "
     "--optimizer.init_args.lr 2.5e-4 --trainer.max_steps 4000 --trainer.val_check_interval 1000"),
    ("Stage B on the same six samples per caption, 4,000 steps at lr 1.5e-4", 50.5,
     REFINE + " --run_name prior8 --model.init_args.init_from {out}/stage_b_refine/prior7 "
     "--model.init_args.prior_samples " + pooled("v3", "v3_seed2000", "v3_seed3000") + " "
     "--optimizer.init_args.lr 1.5e-4 --trainer.max_steps 4000 --trainer.val_check_interval 1000"),
    ("two more samples per training caption, a fourth seed", 29.5,
     "train.prior_samples --stage-c {out}/stage_c3/v3 --out {out}/prior_samples_v3_seed4000.safetensors --samples 2 "
     "--seed 4000"),
    ("Stage B on all eight samples per caption, 4,000 steps at lr 2.5e-4", 51.1,
     REFINE + " --run_name prior9 --model.init_args.init_from {out}/stage_b_refine/prior8 "
     "--model.init_args.prior_samples " + pooled("v3", "v3_seed2000", "v3_seed3000", "v3_seed4000") + " "
     "--optimizer.init_args.lr 2.5e-4 --trainer.max_steps 4000 --trainer.val_check_interval 1000"),
]
BUNDLE = ("--stage-a {out}/stage_a/tiny --stage-b {out}/stage_b_refine/prior9 --compressor {out}/stage_b/grid8 "
          "--stage-c {out}/stage_c3/v3")

QUICK = [  # the paper's 3x3 grid: compressor fine-tuned with Stage B, Stage C on it
    ("Stage A", 7.1, "train fit --config stage_a/tiny.yaml --trainer.default_root_dir {out}/stage_a"),
    ("Stage B + compressor", 25.3,
     "train fit --config stage_b/tiny.yaml --trainer.default_root_dir {out}/stage_b "
     "--model.init_args.stage_a {out}/stage_a/tiny"),
    ("Stage C", 12.5,
     "train fit --config stage_c/tiny.yaml --trainer.default_root_dir {out}/stage_c "
     "--model.init_args.compressor {out}/stage_b/tiny --model.init_args.stage_b {out}/stage_b/tiny"),
]
QUICK_BUNDLE = "--stage-a {out}/stage_a/tiny --stage-b {out}/stage_b/tiny --stage-c {out}/stage_c/tiny"


# --max-steps: one validation of one small batch, at the end (the export's metrics)
SMOKE = ["--trainer.num_sanity_val_steps", "0", "--trainer.limit_val_batches", "1",
         "--data.init_args.val_batch_size", "8"]


def run(cmd: list[str], what: str) -> None:
    print(f"\n{what}\n$ " + shlex.join(cmd), flush=True)
    start = time.time()
    code = subprocess.run(cmd).returncode
    if code != 0:
        raise ChildProcessError(f"this step failed (exit status {code}; its error is above): {shlex.join(cmd)}")
    print(f"done in {(time.time() - start) / 60:.1f} min", flush=True)


def config_file(name: str) -> Path:
    """``configs/<name>`` of this checkout, wherever the command runs."""
    path = CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the quickstart needs the configs/ folder of a source checkout "
                                "(git clone, then pip install -e .)")
    return path


def expand(args: str, out: Path) -> list[str]:
    """A table entry's arguments with ``{out}`` filled in and each ``--config`` found in this checkout."""
    words = [word.replace("{out}", str(out)) for word in shlex.split(args)]
    return [shown(config_file(word)) if flag == "--config" else word for flag, word in zip([""] + words, words)]


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/quickstart")
    ap.add_argument("--quick", action="store_true", help="the earlier shipped set's recipe: configs/*/tiny.yaml, "
                    "3x3 grid, 45.5 min on 2 CPU cores")
    ap.add_argument("--max-steps", type=positive_int, default=None, help="override every phase's steps (smoke tests)")
    ap.add_argument("--train", default="openmoji", help="every phase's training data: openmoji (default) or .tar "
                    "shards with .txt captions; one small shard keeps a --max-steps run short")
    ap.add_argument("--prompts", nargs="+", default=PROMPTS)
    args = ap.parse_args(argv)
    out = check_output(args.out)
    if args.train != "openmoji":
        try:  # a missing source fails now, not in the first phase
            shard_sets(args.train)
        except (FileNotFoundError, ValueError) as error:
            raise type(error)(f"--train: {error}") from None
    phases, bundle_args = (QUICK, QUICK_BUNDLE) if args.quick else (PHASES, BUNDLE)
    py = sys.executable
    commands = []
    for _, _, text in phases:
        cmd = expand(text, out)
        fit = cmd[:2] == ["train", "fit"]
        if args.train != "openmoji":
            cmd += ["--data.init_args.train" if fit else "--train", args.train]
        if args.max_steps is not None:
            cmd += [*SMOKE, "--trainer.max_steps", str(args.max_steps), "--trainer.val_check_interval",
                    str(args.max_steps)] if fit else ["--steps", str(args.max_steps)]
        commands.append([py, "-m", *cmd])
    start = time.time()
    for i, ((name, minutes, _), cmd) in enumerate(zip(phases, commands)):
        run(cmd, f"[{i + 1}/{len(phases)}] {name} ({minutes:g} min measured on 2 CPU cores)")
    bundle = out / "checkpoints"
    run([py, "-m", "sample.bundle", *expand(bundle_args, out), "--out", str(bundle),
         "--commands", *[shlex.join(["python", *cmd[1:]]) for cmd in commands]], "bundle, with a model card")
    run([py, "-m", "sample", *args.prompts, "--out", str(out / "grid.png"), "--stage-c", str(bundle / "stage_c.safetensors"),
         "--stage-b", str(bundle / "stage_b.safetensors"), "--stage-a", str(bundle / "stage_a.safetensors")],
        "sample the prompts from the bundle")
    print(f"\nquickstart finished in {(time.time() - start) / 60:.1f} min: checkpoints in {bundle}, "
          f"samples in {out / 'grid.png'}")
    return out


if __name__ == "__main__":
    run_command(main)
