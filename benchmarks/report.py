"""Writing the results: ``results.json`` (everything), ``results.md`` (the tables docs/benchmarks.md shows)
and PNG plots (latency vs batch size per stage; training cost per stage). Never overwrites.

``python -m benchmarks.report RESULTS.json [MORE.json ...] --out DIR`` renders the same files from
saved results: the ``partial.json`` of an interrupted run, or several runs of one machine split by
``--parts`` or ``--sizes`` (joined into one report).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common.cli import check_output
from common.errors import run_command
from common.files import write_json, write_text


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def _g(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def table(columns: list[str], rows: list[list], intro: list[str] = ()) -> list[str]:
    """A markdown table (after ``intro`` lines) and a blank line: one row of cells per entry of ``rows``."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"  # noqa: E731
    return [*intro, line(columns), "|" + "---|" * len(columns), *map(line, rows), ""]


def markdown(results: dict) -> str:
    env, out = results["environment"], []
    out.append(f"Hardware: {env['hardware']}; torch {env['torch']}, {env['threads']} threads, dtype {env['dtype']}, "
               f"compile {env['compile']}. Command: `{env['command']}`.\n")
    if results.get("counts"):
        out += table(["module", "size", "config", "parameters", "GFLOPs / forward at 1024 px, batch 1",
                      "training GFLOPs / sample at 512 px"],
                     [[r["module"], r["size"], r["config"], f"{r['params'] / 1e6:,.2f} M", f"{r['forward_gflops_1024']:,.1f}",
                       "frozen" if r["train_gflops_512"] is None else f"{r['train_gflops_512']:,.1f}"]
                      for r in results["counts"]])
    if results.get("throughput"):
        out += table(["module", "size", "mode", "px", "batch", "s / call", "items / s", "GFLOP/s", "MFU", "peak memory"],
                     [[r["module"], r["size"], r["mode"], r["px"], r["batch"], f"{r['median_s']:.4f}",
                       f"{r['items_per_s']:.3g}", _g(r["achieved_flops_per_s"] and r["achieved_flops_per_s"] / 1e9),
                       _g(r.get("mfu"), 2), _fmt_bytes(r["peak_memory_bytes"])] for r in results["throughput"]])
    if results.get("reference"):
        out += table(["module", "size", "what", "px", "batch", "ours (s)", "diffusers (s)", "ratio",
                      "outputs match (max rel. error)"],
                     [[r["module"], r["size"], r["what"], r["px"], r["batch"], f"{r['ours_s']:.4f}", f"{r['diffusers_s']:.4f}",
                       f"**{r['ratio']:.2f}**",
                       f"{'yes' if r['outputs_match'] else 'NO'} ({r['max_relative_error']:.1e})"] for r in results["reference"]],
                     ["Ours vs `diffusers` (same config, weights, inputs, dtype; alternating runs; ratio < 1: ours faster):", ""])
    if results.get("latency"):
        out += table(["method", "size", "decoder (steps)", "px", "batch", "total", "text", "Stage C", "Stage B", "Stage A",
                      "pixel decoder", "other"],
                     [[r["method"], r["size"], f"{r['decoder']} ({r['decoder_steps']})", r["px"], r["batch"],
                       f"{r['total_s']:.1f}", f"{r['stages_s']['text']:.2f}", f"{r['stages_s']['stage_c']:.1f}",
                       f"{r['stages_s']['stage_b']:.1f}", f"{r['stages_s']['stage_a']:.1f}",
                       f"{r['stages_s'].get('pixel_decoder', 0.0):.1f}", f"{r['other_s']:.2f}"] for r in results["latency"]],
                     [f"Sampling latency ({results['latency'][0]['prior_steps']} Stage C steps, guidance on every "
                      "stage; seconds):", ""])
    if results.get("cost"):
        out += table(["module", "size", "total training PFLOPs", "A100-hours at 100% peak", "reported A100-hours",
                      "implied MFU of the paper's run", "this device: hours (method)"],
                     [[r["module"], r["size"], f"{r['total_train_flops'] / 1e15:,.0f}", f"{r['a100_hours_at_peak']:,.0f}",
                       r["reported_gpu_hours"] or "n/a", _g(r.get("paper_implied_mfu"), 2),
                       f"{r['device_hours']:,.0f} ({r['method']})" if "device_hours" in r else "n/a (no training rows)"]
                      for r in results["cost"]],
                     ["Paper training schedule (App. E), network only:", ""])
    if results.get("presets"):
        out += table(["preset", "result"],
                     [[p.get("preset", p.get("module")), json.dumps({k: v for k, v in p.items() if k != "preset"})]
                      for p in results["presets"]], ["Training presets:", ""])
    if results.get("notes"):
        out += ["Notes:", ""] + [f"* {n}" for n in results["notes"]] + [""]
    return "\n".join(out)


def plot_latency(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["size"], r["decoder"], r["px"]), []).append(r)
    cols = min(4, len(groups))
    rows_ = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(5 * cols, 4 * rows_), squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    for ax, ((method, size, decoder, px), rs) in zip(axes.flat, groups.items()):
        rs = sorted(rs, key=lambda r: r["batch"])
        batches = [r["batch"] for r in rs]
        ax.plot(batches, [r["total_s"] for r in rs], "k-o", label="total")
        for stage, style, color in (("stage_c", "s--", "C0"), ("stage_b", "^--", "C1"), ("stage_a", "v--", "C2"),
                                    ("pixel_decoder", "d--", "C4"), ("text", "x:", "C3")):
            if any(r["stages_s"].get(stage) for r in rs):
                ax.plot(batches, [r["stages_s"].get(stage, 0.0) for r in rs], style, color=color,
                        label=stage.replace("_", " ").title())
        ax.set(title=f"{size}, {decoder}, {px} px, {method} ({rs[0]['device']})", xlabel="batch size", ylabel="seconds",
               xticks=batches)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_cost(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['module']}\n{r['size']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    ax.bar([i - 0.2 for i in x], [r["a100_hours_at_peak"] for r in rows], 0.4, label="A100-hours at 100% peak (FLOPs)")
    ax.bar([i + 0.2 for i in x], [r["reported_gpu_hours"] or 0 for r in rows], 0.4, label="reported A100-hours (paper)")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set(ylabel="GPU-hours", yscale="log", title="Training cost of the paper's schedule per stage")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(results: dict, out: Path) -> dict[str, Path]:
    """results.json, results.md and the plots under ``out`` (which must not hold them yet)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "results.md"}
    if results.get("latency"):
        paths["latency_plot"] = out / "latency_vs_batch.png"
    if results.get("cost"):
        paths["cost_plot"] = out / "cost_per_stage.png"
    clash = [p for p in paths.values() if p.exists()]
    if clash:
        raise FileExistsError(f"{clash[0]} exists; benchmarks never overwrite: choose another --out")
    write_json(paths["json"], results, indent=1)
    write_text(paths["markdown"], markdown(results))
    if "latency_plot" in paths:
        plot_latency(results["latency"], paths["latency_plot"])
    if "cost_plot" in paths:
        plot_cost(results["cost"], paths["cost_plot"])
    return paths


def merge(runs: list[dict]) -> dict:
    """One results dict from several runs on the same hardware: their rows and notes joined."""
    hardware = {r["environment"]["hardware"] for r in runs}
    if len(hardware) > 1:
        raise ValueError(f"these results come from different hardware ({sorted(hardware)}); report each on its own")
    merged = {"environment": {**runs[0]["environment"],
                              "command": " ; ".join(r["environment"]["command"] for r in runs)}}
    for run in runs:
        for key, rows in run.items():
            if isinstance(rows, list):
                merged.setdefault(key, []).extend(row for row in rows if row not in merged[key])
    return merged


def read_results(path: str) -> dict:
    try:
        results = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a benchmarks results file (not JSON: {e})") from None
    if not isinstance(results, dict) or "environment" not in results:
        raise ValueError(f"{path} is not a benchmarks results file (no environment); pass results.json or partial.json")
    return results


def main(argv: list[str] | None = None) -> dict[str, Path]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json or partial.json files of one machine")
    ap.add_argument("--out", required=True, help="output folder for results.json, results.md and the plots")
    args = ap.parse_args(argv)
    out = Path(args.out)
    for name in ("results.json", "results.md"):  # the plots are checked by write(), before anything is written
        check_output(out / name, (Path(name).suffix,))
    missing = [p for p in args.results if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"no such results file: {missing[0]}")
    merged = merge([read_results(p) for p in args.results])
    paths = write(merged, out)
    print(markdown(merged))
    print({k: str(v) for k, v in paths.items()})
    return paths


if __name__ == "__main__":
    run_command(main)
