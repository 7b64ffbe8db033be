"""``python -m benchmarks``: cost and efficiency of every stage (see ``--help`` and docs/benchmarks.md).

Default on a CPU (about 4 minutes on 2 cores): counts for every size at 1024 px (meta device),
throughput of the tiny models at 128 px and of the paper sizes at small images (batch 1; training
steps only below 100 M parameters), the diffusers side by side, the tiny cascade's sampling
latency measured with the real sampler at 256 px, the paper cascade's at 1024 px projected, and the
paper schedule's cost. ``--full`` (meant for a GPU) measures everything at the paper's sizes.
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from benchmarks import cost, latency, reference, report, presets
from benchmarks.targets import SIZES, TRAIN_PX, targets
from benchmarks.throughput import forward_flops, parameters, run_target, train_flops
from common.cli import check_output, comma_list, positive_int, positive_ints
from common.errors import run_command
from common.files import write_json

CPU_TRAIN_LIMIT = 100e6  # parameters; bigger models' AdamW steps are skipped on CPU unless --full
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARTS = ("counts", "throughput", "reference", "latency", "cost", "presets")


def device_arg(text: str) -> torch.device | None:
    """An argparse type: ``auto`` (None: cuda when available) or a torch device this machine has."""
    if text == "auto":
        return None
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: no CUDA device here; use cpu or auto")
    return device


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", type=device_arg, default="auto", help="cpu, cuda or auto (cuda when available)")
    ap.add_argument("--sizes", type=comma_list(SIZES), default="tiny,paper,release",
                    help="comma-separated subset of " + ",".join(SIZES))
    ap.add_argument("--batch-sizes", type=positive_ints, default=None,
                    help="comma-separated (default: 1,2 on CPU, 1,2,4,8,16 on GPU)")
    ap.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                    help="autocast dtype (auto: bfloat16 on GPU, float32 on CPU); parameters stay float32")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the throughput and side-by-side calls, ours and diffusers' alike (static "
                         "shapes; each measurement compiles during its warm-up call; sampling latency stays eager)")
    ap.add_argument("--threads", type=positive_int, default=os.cpu_count(), help="torch CPU threads (default: all cores)")
    ap.add_argument("--repeats", type=positive_int, default=3, help="timed calls per measurement after warm-up (median)")
    ap.add_argument("--latency-px", type=positive_int, default=1024,
                    help="image side for the end-to-end latency (paper: 1024)")
    ap.add_argument("--parts", type=comma_list(PARTS), default=",".join(PARTS),
                    help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--quick", action="store_true", help="tiny models only, batch 1, one repeat (CI smoke run, ~1 min)")
    ap.add_argument("--full", action="store_true",
                    help="paper sizes at 1024 px (training at the paper's resolutions), every batch size, measured "
                         "latency and the training presets: for a GPU")
    ap.add_argument("--out", default=None, help="output folder (default runs/benchmarks/version_N); never overwritten. "
                    "partial.json there holds the parts finished so far until the run ends")
    return ap.parse_args(argv)


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    model = platform.processor() or "CPU"
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} CPU cores ({model}), no GPU"


def default_out() -> Path:
    root = Path("runs/benchmarks")
    n = 0
    while (root / f"version_{n}").exists():
        n += 1
    return root / f"version_{n}"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = check_output(args.out or default_out())
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = DTYPES["bfloat16" if gpu else "float32"] if args.dtype == "auto" else DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    sizes = ["tiny"] if args.quick else args.sizes
    batches = args.batch_sizes or ([1, 2, 4, 8, 16] if gpu else [1, 2])
    if args.quick:
        batches = batches[:1]
    repeats = 1 if args.quick else args.repeats
    parts = set(args.parts)
    notes: list[str] = []
    results: dict = {"environment": {
        "hardware": hardware(device), "device": device.type, "torch": torch.__version__, "threads": args.threads,
        "dtype": str(dtype).removeprefix("torch."), "compile": args.compile, "python": platform.python_version(),
        "command": "python -m benchmarks" + ("" if argv is None and len(sys.argv) == 1 else
                                             " " + shlex.join(sys.argv[1:] if argv is None else argv)),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }, "notes": notes}
    all_targets = targets(sizes)
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    partial = out / "partial.json"

    def save_partial(**extra) -> None:
        """What is finished so far, so that an interrupted run still leaves its figures."""
        write_json(partial, {**results, **extra}, indent=1)

    if "counts" in parts:
        results["counts"] = [{
            "module": t.kind, "size": t.size, "config": t.config, "params": parameters(t),
            "forward_gflops_1024": forward_flops(t, 1024) / 1e9,
            "train_gflops_512": None if t.loss is None else train_flops(t, 512) / 1e9,
        } for t in tqdm(all_targets, desc="parameters and FLOPs (meta device)")]
        save_partial()
        notes.append("FLOPs: torch.utils.flop_counter (matmuls, convolutions, attention; multiply-add = 2 FLOPs), "
                     "counted on the meta device. Stage A's forward is decode (what the sampler runs); text encoders: "
                     "77 tokens.")

    rows: list[dict] = []
    if "throughput" in parts or "latency" in parts or "cost" in parts:
        for t in tqdm(all_targets, desc="throughput"):
            px_list = [1024] if (args.full or gpu) else [t.cpu_px()]
            train = t.loss is not None and (args.full or gpu or parameters(t) < CPU_TRAIN_LIMIT)
            b = batches if (t.size == "tiny" or gpu) else batches[:1]
            for px in px_list:
                rows += run_target(t, device, dtype, px, b, ("inference",), args.compile, repeats,
                                   budget_s=None if gpu else 30, notes=notes)
            if train:
                train_px = TRAIN_PX.get(t.kind, (512,)) if (args.full or gpu) else (t.cpu_px(),)
                for px in train_px:
                    rows += run_target(t, device, dtype, px, b, ("train",), args.compile, repeats,
                                       budget_s=None if gpu else 30, notes=notes)
            elif t.loss is not None:
                notes.append(f"{t.name} ({parameters(t) / 1e6:.0f} M parameters): no training step on CPU (AdamW "
                             f"state alone is {parameters(t) * 16 / 2**30:.1f} GiB; use --full on a GPU).")
            save_partial(throughput=rows)
        for r in rows:
            r["mfu"] = cost.mfu(r["achieved_flops_per_s"], device)
        if not (gpu or args.full):
            notes.append("CPU runs: paper/release sizes at small images (Stage A, B and the pixel decoder 128 px, Stage C "
                         "and the compressor 256 px) and batch 1 only; tiny models at 128 px.")
        if not gpu:
            notes.append("MFU needs a GPU's peak FLOP/s (n/a on a CPU).")
        results["throughput"] = rows if "throughput" in parts else []
        results["throughput_rows_used"] = len(rows)

    if "reference" in parts:
        if not reference.diffusers_available():
            notes.append("diffusers is not installed (pip install -e '.[test]'): no side-by-side comparison.")
        else:
            pairs = [(t.kind, t.config, t.cpu_px() if not (gpu or args.full) else 1024)
                     for t in all_targets if t.kind in reference.PAIRS]
            results["reference"] = []
            for kind, preset, px in tqdm(pairs, desc="diffusers side by side"):
                b = batches if (preset == "tiny" or gpu) else batches[:1]
                for batch in b:
                    reps = repeats if preset != "tiny" or args.quick else max(repeats, 10)
                    results["reference"].append(reference.compare(kind, preset, device, dtype, px, batch, args.compile,
                                                                  reps))
                    save_partial()
            notes.append(reference.__doc__.split("\n\n")[1].replace("\n", " "))

    if "latency" in parts:
        lat: list[dict] = []
        measured_sizes = sizes if (gpu or args.full) else ["tiny"]
        measured_px = args.latency_px if (gpu or args.full) else (64 if args.quick else 256)
        for size in tqdm(measured_sizes, desc="sampling latency (real sampler)"):
            for decoder in latency.DECODERS:
                lat += latency.measure_sampling(size, device, dtype, measured_px, batches, decoder, repeats=1,
                                                notes=notes)
                save_partial(latency=lat)
        for size in sizes:
            for decoder in latency.DECODERS:
                lat += latency.project_sampling(size, rows, args.latency_px, batches, decoder)
                if not (gpu or args.full) and size == "tiny":  # checks the projection against the measured rows
                    lat += latency.project_sampling(size, rows, measured_px, batches, decoder)
        results["latency"] = lat
        notes.append("Latency: random weights (timing does not depend on them). 'measured' = the real sampler "
                     "(pipeline.text_to_image.TextToImage) with each decoder of benchmarks.latency.DECODERS at its default steps "
                     "(Stage B 12, pixel decoder 50), per-stage times from hooks; "
                     "'projected' = exact FLOPs at that size / the FLOP/s the module reached in the throughput rows "
                     "x the number of calls (60 x 2 for C, 12 x 2 for B and 50 x 2 for the pixel decoder with "
                     "guidance, 1 Stage A decode, 2 text encodes).")

    if "cost" in parts:
        results["cost"] = [c for t in all_targets if (c := cost.schedule_cost(t, rows, device)) is not None]
        notes.append(cost.__doc__.split("\n\n")[1].replace("\n", " ") + " " + cost.__doc__.split("\n\n")[2].replace("\n", " "))

    if "presets" in parts:
        if gpu:

            results["presets"] = []
            for kind in tqdm(presets.PRESETS, desc="training presets"):
                results["presets"].append(presets.run_preset(kind))
                save_partial()
        else:
            notes.append("Training presets (configs/stage_{b,c}/paper_gpu.yaml): not run, no GPU.")

    results["environment"]["wall_s"] = round(time.perf_counter() - started, 1)
    paths = report.write(results, out)
    partial.unlink()
    print(report.markdown(results))
    print({k: str(v) for k, v in paths.items()})
    return results


if __name__ == "__main__":
    run_command(main)
