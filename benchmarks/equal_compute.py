"""``python -m benchmarks.equal_compute``: the paper's central claim at small scale (Sec. 4, "Baseline LDM").

Two sides train from scratch on the same data, seed, text encoder, engine, process layer and samplers:

* ``stage_c``: the Stage C config (default ``configs/stage_c/tiny.yaml``; ``configs/stage_c/sc_tiny.yaml`` for
  the Stable Cascade v3 prior) on the given compressor; its images are decoded by the given Stage B (default: the paper-grid set in checkpoints/tiny_grid3/)
  and Stage A;
* ``baseline``: the single-stage baseline LDM (``configs/baseline_ldm/tiny.yaml``): text -> U-Net -> Stage A.

Each side is one run; its training compute is measured as it goes (``ComputeBudget``): wall seconds of the
training steps (validation and snapshot writing left out) and FLOPs (the network's forward + backward per
step, counted once on the first batch with ``benchmarks.measure.count_flops``, times the steps; frozen
encoders are not counted, as in ``python -m benchmarks``). When a side's compute crosses a budget point
(``--budgets``, in ``--unit`` minutes or PFLOP) its EMA weights are written as a snapshot. The learning rate is
constant after warm-up (no side gets a schedule tuned to one budget). Every snapshot is then scored by
``python -m sample.evaluate`` with the same prompts, seeds and settings: val and everyday top-5 caption
retrieval, FID against the val images; Stage C snapshots also through the previewer (App. D: how much of the
prompt Stage C has fixed before Stage B). Finally the last snapshots' sampling time per image is measured at
batch 1, 4 and 16 with the paper's step counts (Fig. 4; cascade: 60 Stage C + 12 Stage B steps, baseline: 60).

Two accountings: Stage C alone against the baseline (the paper's: Stage B's 11,000 GPU-hours are outside its
match), and Stage B + Stage C (the paper-grid Stage B's recorded training time and FLOPs added to every Stage C
point: the honest total when no decoder exists yet).

Resumable: rerun the same command; each side continues from its last checkpoint, snapshots and scores already
written are kept. Everything lives in ``--work``; the results (``equal_compute.{json,csv,md,png}``) go to ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from matplotlib.figure import Figure

from benchmarks.measure import count_flops, time_call
from benchmarks.targets import FACTORIES
from benchmarks.throughput import train_flops
from common.cli import comma_list, positive_int, positive_ints
from common.errors import run_command
from common.files import write_json, write_text
from pipeline.baseline_ldm import DEFAULT_GUIDANCE, load_baseline_text_to_image
from pipeline.cascade import load_cascade_text_to_image
from pipeline.text_to_image import load_text_to_image
from train.cli import main as train_main
from weights.checkpoint import read_metadata, read_weights, save_safetensors

ROOT = Path(__file__).resolve().parents[1]
GRID3 = ROOT / "checkpoints" / "tiny_grid3"
SIDES = ("stage_c", "baseline")
UNITS = ("minutes", "pflop")
STEMS = ("equal_compute.json", "equal_compute.csv", "equal_compute.md", "equal_compute.png")
PRIOR_STEPS, DECODER_STEPS = 60, 12  # the paper's defaults (Fig. 4); the baseline takes Stage C's 60
# the paper-grid (3x3) Stage B's recipe (checkpoints/tiny_grid3/model_card.json: steps and wall minutes per phase); the batch of
# each phase is read from the config that trained it; the first phase also fine-tuned the compressor
GRID3_STAGE_B_PHASES = ("configs/stage_b/tiny.yaml", "configs/stage_b/tiny_refine.yaml",
                          "configs/stage_b/tiny_refine.yaml")


class ComputeBudget(L.Callback):
    """Measures a run's training compute and writes a snapshot of the EMA weights at each budget point.

    Seconds: wall time between consecutive training batches, less validation and snapshot writing (the first
    step after each start is not counted). FLOPs: the network's forward + backward on the first batch
    (``count_flops``; frozen encoders outside the count) times the counted steps. Budgets are in ``unit``
    (``minutes`` or ``pflop``); at the last one training stops. The state travels in the checkpoints."""

    def __init__(self, budgets: list[float], unit: str = "minutes", snapshots: str = "snapshots"):
        self.budgets, self.unit, self.snapshots = list(budgets), unit, Path(snapshots)
        self.seconds, self.steps, self.flops_per_step, self.done = 0.0, 0, None, 0
        self._last, self._paused = None, 0.0

    def state_dict(self) -> dict:
        return {"seconds": self.seconds, "steps": self.steps, "flops_per_step": self.flops_per_step, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.steps = state["seconds"], state["steps"]
        self.flops_per_step, self.done = state["flops_per_step"], state["done"]

    def spent(self) -> float:
        return self.seconds / 60 if self.unit == "minutes" else self.steps * (self.flops_per_step or 0) / 1e15

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.seconds += now - self._last - self._paused
            self.steps += 1
        while self.done < len(self.budgets) and self.spent() >= self.budgets[self.done]:
            self.snapshot(trainer, module)
        if self.done == len(self.budgets):
            trainer.should_stop = True
        if self.flops_per_step is None:
            self.flops_per_step = step_flops(module, batch)
        self._last, self._paused = time.perf_counter(), 0.0

    def on_validation_start(self, trainer, module) -> None:
        self._paused_from = time.perf_counter()

    def on_validation_end(self, trainer, module) -> None:
        self._paused += time.perf_counter() - self._paused_from

    def snapshot(self, trainer, module) -> None:
        """``<snapshots>/budget_<i>.safetensors`` (the EMA weights, the export's metadata and the compute so far),
        then the run's ``last.ckpt``, so that a resumed run continues after this snapshot."""
        path = self.snapshots / f"budget_{self.done}.safetensors"
        compute = {"budget": self.budgets[self.done], "budget_unit": self.unit, "train_seconds": round(self.seconds, 1),
                   "train_steps": self.steps, "flops_per_step": self.flops_per_step,
                   "train_flops": self.steps * (self.flops_per_step or 0)}
        save_safetensors(module.eval_model, path, module.stage, module.eval_model.config.to_dict(), overwrite=True,
                         extra={**module.export_metadata(), **compute})
        self.done += 1
        if trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")
        print(f"equal_compute: {module.stage} snapshot {self.done}/{len(self.budgets)} at step {trainer.global_step}: "
              f"{self.seconds / 60:.1f} min, {compute['train_flops'] / 1e15:.3f} PFLOP -> {path}", flush=True)


def step_flops(module, batch: dict) -> int:
    """FLOPs of the network's forward + backward on this batch (inputs from the frozen encoders not counted);
    the random numbers of training are left as they were."""
    with torch.random.fork_rng(devices=[]):
        with torch.no_grad():
            x0, conditions = module.inputs(batch, train=True)
        t = torch.rand(x0.shape[0], device=x0.device).clamp(0.001, 1.0)
        noise = torch.randn_like(x0)
        flops = count_flops(lambda: module.denoiser(module.model).loss(x0, t, noise, *conditions).backward())
    module.model.zero_grad(set_to_none=True)
    return flops


# -- arguments --------------------------------------------------------------------------------------------------
def increasing(text: str) -> list[float]:
    """``--budgets``: positive, strictly increasing numbers, comma-separated."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text!r}") from None
    if any(not (math.isfinite(v) and v > 0) for v in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise argparse.ArgumentTypeError(f"budgets must be positive and increasing, e.g. 20,40,60; got {text!r}")
    return values


def numbers(count: int, what: str):
    """An argparse type: ``count`` comma-separated non-negative numbers (``what`` names them)."""
    def parse(text: str) -> list[float]:
        try:
            values = [float(x) for x in text.split(",")]
        except ValueError:
            values = []
        if len(values) != count or any(not (math.isfinite(v) and v >= 0) for v in values):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.equal_compute", description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", type=increasing, required=True,
                    help="budget points per side, increasing (in --unit), e.g. 20,40,60")
    ap.add_argument("--unit", choices=UNITS, default="minutes",
                    help="minutes: wall time of the training steps on this machine; pflop: counted training FLOPs")
    ap.add_argument("--sides", type=comma_list(SIDES), default=",".join(SIDES), help="which sides to train and score")
    ap.add_argument("--out", default="benchmarks/results/cpu/equal_compute",
                    help="folder of equal_compute.{json,csv,md,png}")
    ap.add_argument("--work", default="runs/equal_compute", help="runs, snapshots and scores (resumed from)")
    ap.add_argument("--overwrite", action="store_true", help="replace existing results in --out")
    ap.add_argument("--stage-c-config", default="configs/stage_c/tiny.yaml",
                    help="the Stage C side (configs/stage_c/sc_tiny.yaml: the v3 prior, with a --stage-b that "
                         "decodes its latents)")
    ap.add_argument("--baseline-config", default="configs/baseline_ldm/tiny.yaml")
    ap.add_argument("--stage-b", default=str(GRID3 / "stage_b.safetensors"), help="the decoder of the Stage C side")
    ap.add_argument("--stage-a", default=str(GRID3 / "stage_a.safetensors"), help="Stage A of both sides")
    ap.add_argument("--compressor", default=str(GRID3 / "compressor.safetensors"),
                    help="the compressor the Stage C side trains on (the one --stage-b was trained with)")
    ap.add_argument("--previewer", default=str(GRID3 / "previewer.safetensors"),
                    help="previewer of that compressor's latents (App. D), or none")
    ap.add_argument("--stage-b-cost", type=numbers(2, "MINUTES,PFLOP such as 93.2,0.5"), default=None,
                    metavar="MINUTES,PFLOP",
                    help="the decoder's training compute for the B + C accounting (default: the paper-grid Stage B's, "
                         "from checkpoints/tiny_grid3/model_card.json and its configs)")
    ap.add_argument("--val-every", type=positive_int, default=1000, help="validation and checkpoint every N steps")
    ap.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                    help="an extra python -m train argument for both sides (repeatable, e.g. "
                         "--train-arg=--data.init_args.batch_size=8)")
    for side in SIDES:
        ap.add_argument(f"--{side.replace('_', '-')}-arg", action="append", default=[], metavar="ARG",
                        help=f"an extra python -m train argument for the {side} side only (repeatable)")
    ap.add_argument("--eval-arg", action="append", default=[], metavar="ARG",
                    help="an extra python -m sample.evaluate argument for both sides (repeatable, e.g. "
                         "--eval-arg=--prior-steps=20)")
    ap.add_argument("--data-dir", default="data/openmoji")
    ap.add_argument("--prompt-sets", default="val,everyday", help="sample.evaluate --prompt-sets")
    ap.add_argument("--eval-limit", type=positive_int, default=None, help="sample.evaluate --limit (quick checks)")
    ap.add_argument("--gallery-limit", type=positive_int, default=None,
                    help="sample.evaluate --gallery-limit (quick checks)")
    ap.add_argument("--latency-batches", type=positive_ints, default=[1, 4, 16],
                    help="batch sizes of the sampling-time table")
    ap.add_argument("--latency-steps", type=numbers(2, "PRIOR,DECODER step counts such as 60,12"), default=None,
                    metavar="PRIOR,DECODER",
                    help=f"step counts of the sampling-time table (default the paper's {PRIOR_STEPS},{DECODER_STEPS})")
    args = ap.parse_args(argv)
    out = Path(args.out)
    clash = [out / s for s in STEMS if (out / s).exists()]
    if clash and not args.overwrite:
        raise FileExistsError(f"{clash[0]} exists; pass --overwrite to replace the results or choose another --out")
    for name in ("stage_c_config", "baseline_config", "stage_b", "stage_a", "compressor"):
        if not Path(getattr(args, name)).exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {getattr(args, name)} does not exist")
    if args.stage_b_cost is None and Path(args.stage_b).resolve() != (GRID3 / "stage_b.safetensors").resolve():
        raise ValueError(f"--stage-b {args.stage_b} is not the paper-grid Stage B (checkpoints/tiny_grid3), whose training compute is on record; "
                         "pass its training compute as --stage-b-cost MINUTES,PFLOP")
    if args.previewer != "none" and not Path(args.previewer).exists():
        raise FileNotFoundError(f"--previewer {args.previewer} does not exist; pass --previewer none to skip App. D")
    return args


# -- training ----------------------------------------------------------------------------------------------------
def model_class(config: str) -> str:
    return yaml.safe_load(Path(config).read_text())["model"]["class_path"]


def latest_checkpoint(root: Path) -> Path | None:
    found = sorted(root.glob("*/version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def snapshots(args: argparse.Namespace, side: str) -> list[Path]:
    return [Path(args.work) / side / "snapshots" / f"budget_{i}.safetensors" for i in range(len(args.budgets))]


def train_side(args: argparse.Namespace, side: str) -> None:
    """Train ``side`` until its last budget, resuming from its last checkpoint; nothing to do when every snapshot
    exists."""
    if all(p.exists() for p in snapshots(args, side)):
        print(f"equal_compute: {side}: every snapshot exists, not training", flush=True)
        return
    root = Path(args.work) / side
    config = args.stage_c_config if side == "stage_c" else args.baseline_config
    callback = {"class_path": "benchmarks.equal_compute.ComputeBudget",
                "init_args": {"budgets": args.budgets, "unit": args.unit, "snapshots": str(root / "snapshots")}}
    argv = ["fit", "--config", config, "--run_name", side, "--trainer.default_root_dir", str(root / "runs"),
            "--trainer.max_steps", "-1", "--trainer.max_epochs", "-1",
            "--trainer.val_check_interval", str(args.val_every),
            "--trainer.callbacks+=" + json.dumps(callback), "--lr_scheduler.init_args.total_steps", "null",
            "--data.init_args.embedded_dir", args.data_dir]
    if side == "stage_c":
        argv += ["--model.init_args.compressor", args.compressor]
        if model_class(config) == "train.stage_c.StageCTraining":
            argv += ["--model.init_args.stage_b", args.stage_b]
    else:
        argv += ["--model.init_args.stage_a", args.stage_a]
    last = latest_checkpoint(root / "runs")
    if last is not None:
        print(f"equal_compute: {side}: resuming from {last}", flush=True)
        argv += ["--ckpt_path", str(last)]
    train_main(argv + list(args.train_arg) + list(getattr(args, f"{side}_arg")))


# -- scoring -----------------------------------------------------------------------------------------------------
def score(args: argparse.Namespace, side: str, snapshot: Path) -> dict:
    """``python -m sample.evaluate`` of one snapshot (kept in ``<work>/<side>/scores``; reused when present)."""
    out = Path(args.work) / side / "scores" / f"{snapshot.stem}.json"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "sample.evaluate", "--stage-a", args.stage_a, "--data-dir", args.data_dir,
               "--prompt-sets", args.prompt_sets, "--skip-ceilings", "--out", str(out)]
        cmd += ["--limit", str(args.eval_limit)] if args.eval_limit else []
        cmd += ["--gallery-limit", str(args.gallery_limit)] if args.gallery_limit else []
        if side == "stage_c":
            cmd += ["--stage-c", str(snapshot), "--stage-b", args.stage_b, "--compressor", args.compressor]
            cmd += ["--previewer", args.previewer] if args.previewer != "none" else []
        else:
            cmd += ["--baseline-ldm", str(snapshot)]
        cmd += list(args.eval_arg)
        print("equal_compute: " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def stage_b_cost(args: argparse.Namespace) -> dict:
    """The decoder's training compute: ``--stage-b-cost``, or the paper-grid Stage B's phases (model card: steps and
    wall minutes; FLOPs: each phase's steps x batch x the network's training FLOPs per 128 px sample, plus the
    compressor's in the phase that fine-tuned it)."""
    if args.stage_b_cost:
        minutes, pflop = args.stage_b_cost
        return {"minutes": minutes, "pflop": pflop, "source": "--stage-b-cost"}
    card = json.loads((GRID3 / "model_card.json").read_text())["stages"]["stage_b"]
    steps = [int(x) for x in re.findall(r"\d+", str(card["steps"]))]
    minutes = [float(x) for x in re.findall(r"[\d.]+", str(card["wall_time_min"]))]
    flops = 0
    b_per_sample = train_flops(FACTORIES["stage_b"]("tiny"), 128, 1)
    for i, (n, config) in enumerate(zip(steps, GRID3_STAGE_B_PHASES)):
        init = yaml.safe_load((ROOT / config).read_text())
        batch = init["data"]["init_args"]["batch_size"]
        compressor = init["model"]["init_args"].get("compressor")
        per_sample = b_per_sample
        if isinstance(compressor, dict) and compressor.get("trainable") not in (None, "none"):
            per_sample += train_flops(FACTORIES["compressor"](compressor.get("backbone", "efficientnet_lite0")), 128, 1)
        flops += n * batch * per_sample
    return {"minutes": round(sum(minutes), 1), "pflop": flops / 1e15, "steps": sum(steps),
            "source": "checkpoints/tiny_grid3/model_card.json (steps and wall minutes per phase: "
                      f"{card['steps']}; {card['wall_time_min']}); FLOPs: steps x batch ({', '.join(GRID3_STAGE_B_PHASES)})"
                      " x training FLOPs per 128 px sample of the tiny Stage B (and of the compressor it fine-tuned)"}


def point(side: str, snapshot: Path, scores: dict) -> dict:
    meta = read_metadata(snapshot)
    row = {"side": side, "budget": meta["budget"], "unit": meta["budget_unit"], "steps": meta["global_step"],
           "train_minutes": round(meta["train_seconds"] / 60, 2), "train_pflop": float(f"{meta['train_flops'] / 1e15:.4g}"),
           "val_top5": scores.get("top5_retrieval_own_caption"), "val_top5_shuffled":
               scores.get("top5_retrieval_shuffled_captions"), "fid": scores.get("fid_vs_val"),
           "everyday_top5": scores.get("everyday", {}).get("top5_retrieval_own_caption")}
    if side == "stage_c":
        row["latent_top5"] = scores.get("stage_c_latent_retrieval", {}).get("top5_own_caption")
        row["previewer_val_top5"] = scores.get("previewer", {}).get("top5_retrieval_own_caption")
        row["previewer_everyday_top5"] = scores.get("everyday", {}).get("previewer", {}).get("top5_retrieval_own_caption")
    return row


# -- sampling time -----------------------------------------------------------------------------------------------
def sampling_times(args: argparse.Namespace, last: dict[str, Path]) -> list[dict]:
    """Seconds per image of the last snapshots at each batch size (one warm-up call at batch 1, then one timed call
    per batch size), with the paper's step counts and the samplers' default guidance."""
    prior_steps, decoder_steps = ((max(1, int(x)) for x in args.latency_steps) if args.latency_steps
                                  else (PRIOR_STEPS, DECODER_STEPS))
    calls = {}
    if "stage_c" in last:
        cascade = read_metadata(last["stage_c"]).get("stage") == "stage_c3"
        pipe = (load_cascade_text_to_image if cascade else load_text_to_image)(last["stage_c"], args.stage_b,
                                                                               args.stage_a)
        calls["cascade"] = (lambda b: pipe(["red apple"] * b, prior_steps=prior_steps, decoder_steps=decoder_steps,
                                           progress=False, limits=None),
                            f"Stage C {prior_steps} + Stage B {decoder_steps} steps + Stage A")
    if "baseline" in last:
        base = load_baseline_text_to_image(last["baseline"], args.stage_a)
        calls["baseline"] = (lambda b: base(["red apple"] * b, steps=prior_steps, guidance=DEFAULT_GUIDANCE,
                                            progress=False), f"U-Net {prior_steps} steps + Stage A")
    rows = []
    with torch.no_grad():
        for name, (call, what) in calls.items():
            call(1)  # warm-up
            for b in args.latency_batches:
                t = time_call(lambda: call(b), torch.device("cpu"), warmup=0, repeats=1).median
                rows.append({"pipeline": name, "what": what, "batch": b, "seconds": round(t, 2),
                             "seconds_per_image": round(t / b, 3)})
                print(f"equal_compute: sampling {name} batch {b}: {t / b:.2f} s/image", flush=True)
    return rows


# -- report ------------------------------------------------------------------------------------------------------
def compare(cascade: list[dict], baseline: list[dict], shift: dict, key: str, higher: bool) -> dict | None:
    """At the cascade's largest point (compute + ``shift``): the baseline point of the most compute not above it and
    the first at or above it, and which side scores better against each (``key``; ``higher`` is better)."""
    if not cascade or not baseline or cascade[-1].get(key) is None:
        return None
    c = cascade[-1]
    x = {u: c[f"train_{u}"] + shift[u] for u in ("minutes", "pflop")}
    unit = baseline[0]["unit"]
    below = [b for b in baseline if b[f"train_{unit}"] <= x[unit]]
    above = [b for b in baseline if b[f"train_{unit}"] >= x[unit]]
    out = {"cascade": {"compute": x, key: c[key]}}
    for name, b in (("baseline_at_or_below", below[-1] if below else None), ("baseline_at_or_above",
                                                                               above[0] if above else None)):
        if b is not None and b.get(key) is not None:
            better = (c[key] > b[key]) if higher else (c[key] < b[key])
            out[name] = {"compute": {u: b[f"train_{u}"] for u in ("minutes", "pflop")}, key: b[key],
                         "cascade_better": better, "difference": round(c[key] - b[key], 4)}
    return out


def verdict_line(name: str, result: dict | None, key: str, unit: str) -> str:
    if result is None:
        return f"* {name}: no score to compare."
    c = result["cascade"]
    above, below = result.get("baseline_at_or_above"), result.get("baseline_at_or_below")
    head = f"* {name}, {key}: the cascade scores {c[key]} at {c['compute'][unit]:.4g} {unit}"
    if above is not None and above["cascade_better"]:
        return f"{head}; the baseline {above[key]} at {above['compute'][unit]:.4g} (as much compute or more): " \
               f"the claim holds here (by {abs(above['difference']):.4g})."
    if below is not None and not below["cascade_better"]:
        by = "level with it" if below["difference"] == 0 else f"ahead by {abs(below['difference']):.4g}"
        return f"{head}; the baseline {below[key]} at {below['compute'][unit]:.4g} (no more compute): " \
               f"the claim does not hold here (the baseline is {by})."
    parts = [f"the baseline {b[key]} at {b['compute'][unit]:.4g}" for b in (below, above) if b is not None]
    return f"{head}; {' and '.join(parts) or 'no baseline point'}: not decided at these budgets " \
           "(give the baseline a budget point at or above the cascade's compute)."


def markdown(report: dict) -> str:
    unit = report["unit"]
    cols = ["side", "budget", "steps", "train_minutes", "train_pflop", "val_top5", "val_top5_shuffled", "everyday_top5",
            "fid", "latent_top5", "previewer_val_top5", "previewer_everyday_top5"]
    lines = [f"# Equal compute: the cascade against a single-stage LDM ({report['device']})", "",
             f"Command: `{report['command']}`", "",
             f"Budgets ({unit}): {', '.join(f'{b:g}' for b in report['budgets'])}; seed {report['seed']} on both sides; "
             f"data: {report['data']}; scores: `python -m sample.evaluate` ({report['evaluation']}).", "",
             f"* Stage C side: `{report['stage_c']['config']}` ({report['stage_c']['params']:,} parameters: "
             f"`{json.dumps(report['stage_c'].get('network'))}`), decoded by `{report['stage_c']['stage_b']}` + "
             f"`{report['stage_c']['stage_a']}`.",
             f"* Baseline: `{report['baseline']['config']}` ({report['baseline']['params']:,} parameters: "
             f"`{json.dumps(report['baseline'].get('network'))}`), decoded by Stage A `{report['baseline']['stage_a']}`.",
             f"* Stage B's training compute (B + C accounting): {report['stage_b_cost']['minutes']} min, "
             f"{report['stage_b_cost']['pflop']:.4g} PFLOP; from {report['stage_b_cost']['source']}.", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in report["points"]:
        lines.append("| " + " | ".join("" if row.get(c) is None else str(row[c]) for c in cols) + " |")
    lines += ["", "top-5: caption retrieval among the whole embedded set (chance "
              f"{report.get('chance_top5')}); latent_top5: Stage C's latents alone; previewer_*: Stage C's latents "
              "rendered by the previewer, no Stage B (App. D).", "", "## Verdict", ""]
    lines += report["verdict"]
    if report.get("sampling"):
        lines += ["", "## Sampling time per image (paper Fig. 4)", "", "| pipeline | steps | batch | s/image |",
                  "|---|---|---|---|"]
        lines += [f"| {r['pipeline']} | {r['what']} | {r['batch']} | {r['seconds_per_image']} |" for r in report["sampling"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Score against training compute: Stage C alone, Stage B + C, and the baseline, per score."""
    unit = report["unit"]
    keys = [k for k in ("val_top5", "everyday_top5", "fid") if any(p.get(k) is not None for p in report["points"])]
    fig = Figure(figsize=(4.5 * max(1, len(keys)), 3.6))
    axes = fig.subplots(1, max(1, len(keys)), squeeze=False)[0]
    shift = report["stage_b_cost"][unit]
    for ax, key in zip(axes, keys):
        for side, label, offset, style in (("stage_c", "Stage C alone", 0.0, "o-"), ("stage_c", "Stage B + C", shift, "o--"),
                                           ("baseline", "baseline LDM", 0.0, "s-")):
            rows = [p for p in report["points"] if p["side"] == side and p.get(key) is not None]
            if rows:
                ax.plot([p[f"train_{unit}"] + offset for p in rows], [p[key] for p in rows], style, label=label)
        ax.set_xlabel(f"training compute ({'wall minutes on this machine' if unit == 'minutes' else 'PFLOP'})")
        ax.set_ylabel(key + (" (lower is better)" if key == "fid" else " (higher is better)"))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def shown(path: str) -> str:
    """``path`` relative to the repository when it lies inside it (the defaults are absolute)."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else path


def describe(config: str, snapshot: Path | None) -> dict:
    """The side's config file, and the network its last snapshot holds (config and parameters)."""
    out = {"config": config, "size": yaml.safe_load(Path(config).read_text())["model"]["init_args"].get("size"),
           "params": 0}
    if snapshot is not None:
        state, network = read_weights(snapshot, read_metadata(snapshot)["stage"])
        out.update(network=network, params=sum(v.numel() for v in state.values()))
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    for side in args.sides:
        train_side(args, side)
    points = {side: [point(side, p, score(args, side, p)) for p in snapshots(args, side)] for side in args.sides}
    last = {side: snapshots(args, side)[-1] for side in args.sides}
    sampling = sampling_times(args, last) if args.latency_batches else []
    shift0, shift_b = {"minutes": 0.0, "pflop": 0.0}, stage_b_cost(args)
    cascade, baseline = points.get("stage_c", []), points.get("baseline", [])
    verdict = []
    for name, shift in (("Stage C alone (the paper's accounting)", shift0), ("Stage B + Stage C", shift_b)):
        for key, higher in (("val_top5", True), ("everyday_top5", True), ("fid", False)):
            verdict.append(verdict_line(name, compare(cascade, baseline, shift, key, higher), key, args.unit))
    first = json.loads((Path(args.work) / args.sides[0] / "scores" / f"{last[args.sides[0]].stem}.json").read_text())
    report = {
        "command": "python -m benchmarks.equal_compute " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": f"CPU, {os.cpu_count()} cores; sampling timed with {torch.get_num_threads()} threads", "unit": args.unit, "budgets": args.budgets,
        "seed": 0, "data": f"the embedded OpenMoji train split at 128 px ({args.data_dir})",
        "evaluation": f"prompt sets {args.prompt_sets}, limit {args.eval_limit or 'none'}, gallery "
                      f"{args.gallery_limit or 'whole set'}, seeds per batch as sample.evaluate",
        "chance_top5": first.get("chance_top5"),
        "stage_c": {**describe(args.stage_c_config, last.get("stage_c")), "stage_b": shown(args.stage_b),
                    "stage_a": shown(args.stage_a), "compressor": shown(args.compressor)},
        "baseline": {**describe(args.baseline_config, last.get("baseline")), "stage_a": shown(args.stage_a)},
        "stage_b_cost": shift_b, "points": [p for side in args.sides for p in points[side]],
        "sampling": sampling, "verdict": verdict,
        "extra_arguments": {"train": args.train_arg, "stage_c": args.stage_c_arg, "baseline": args.baseline_arg,
                            "evaluate": args.eval_arg}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "equal_compute.json", report)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=sorted({k for p in report["points"] for k in p}))
    writer.writeheader()
    writer.writerows(report["points"])
    write_text(out / "equal_compute.csv", buffer.getvalue())
    write_text(out / "equal_compute.md", markdown(report))
    plot(report, out / "equal_compute.png")
    print(markdown(report))
    print(f"wrote {', '.join(str(out / s) for s in STEMS)}")
    return report


if __name__ == "__main__":
    run_command(main)
