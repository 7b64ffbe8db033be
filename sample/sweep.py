"""Sweep the samplers: FID and caption retrieval against network evaluations, per stage.

    python -m sample.sweep --out runs/sweep [--samplers ddpm,ddim,dpmpp_2m,dpmpp_2m_sde]
        [--prior-step-list 10,20,30,60] [--decoder-step-list 4,8,12,40] [--fast 20,12] [--limit N]

On the embedded val captions (as ``sample.evaluate``: one image per caption, FID against the real
val images, top-5 caption retrieval among all emoji):
* Stage C: each sampler at each of ``--prior-step-list``, decoded by the reference decoder (DDPM at its
  default 12 steps);
* Stage B: each sampler at each of ``--decoder-step-list``, decoding the reference Stage C latents
  (DDPM at the largest of ``--prior-step-list``);
* the cascade: each sampler on both stages at ``--fast`` steps (default 20 + 12) against DDPM at
  the reference 60 + 40 (the largest step counts).
Network evaluations (NFE) count both guidance branches; a row's ``seconds`` is the wall time of its
generation and scoring (Stage C latents that an earlier row made are reused, not counted). Writes
``sweep.json``, ``sweep.md`` (the tables) and ``sweep.png`` (FID and retrieval against NFE) into
``--out``; each finished setting is kept in ``--out/settings/``, so an interrupted sweep rerun with
the same ``--out`` continues where it stopped (other sweep options against an existing folder are
refused).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib
import torch
from tqdm.auto import tqdm

from diffusion import SAMPLERS
from sample.compare import decode_all
from sample.evaluate import ValScorer, add_common_arguments, write_outputs
from pipeline.decoders import SemanticDecoder
from pipeline.text_to_image import load_text_to_image
from common.cli import check_output, comma_list, positive_ints, shown
from common.errors import run_command

matplotlib.use("Agg")
from matplotlib import pyplot as plt  # noqa: E402

REFERENCE = "ddpm"
PARTS = ("cascade", "stage_c", "stage_b")


def nfe(steps: int, guidance: float) -> int:
    """Network evaluations per image: two a step with classifier-free guidance, one without."""
    return steps * (1 if guidance == 1.0 else 2)


class Sweep:
    """Generates and scores one setting at a time, keeping each result in ``out/settings``."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.settings = args, Path(args.out) / "settings"
        self.pipe = load_text_to_image(args.stage_c, args.stage_b, args.stage_a)
        self.scorer = ValScorer(args.data_dir, args.size, args.batch_size, args.limit, args.gallery_limit)
        self.latents: dict[tuple[str, int], torch.Tensor] = {}

    def prior_latents(self, sampler: str, steps: int) -> torch.Tensor:
        """Stage C latents for every val caption (fixed seeds per batch, as ``sample.compare``)."""
        if (sampler, steps) not in self.latents:
            a, captions = self.args, self.scorer.captions
            self.latents[sampler, steps] = torch.cat([
                self.pipe.prior.sample(captions[i:i + a.batch_size], [""] * len(captions[i:i + a.batch_size]),
                                       self.pipe.prior.grid(a.size, a.size), steps, a.prior_guidance,
                                       torch.Generator().manual_seed(a.seed + i), progress=False, sampler=sampler)
                for i in tqdm(range(0, len(captions), a.batch_size), desc=f"Stage C {sampler} {steps}")])
        return self.latents[sampler, steps]

    def score(self, sweep: str, prior: tuple[str, int], decoder: tuple[str, int]) -> dict:
        """One setting's row: read back when an earlier run (or another sweep) finished it, else generated."""
        key = f"C-{prior[0]}-{prior[1]}_B-{decoder[0]}-{decoder[1]}"
        saved = self.settings / f"{key}.json"
        if saved.exists():
            return {**json.loads(saved.read_text()), "sweep": sweep}
        a = self.args
        start = time.perf_counter()
        images, _ = decode_all(self.pipe.decoder, self.prior_latents(*prior), a.size, self.scorer.captions,
                               decoder[1], a.decoder_guidance, a.batch_size, a.seed,
                               f"Stage B {decoder[0]} {decoder[1]}", sampler=decoder[0])
        scores = self.scorer(images, key)
        row = {"sweep": sweep, "prior_sampler": prior[0], "prior_steps": prior[1], "decoder_sampler": decoder[0],
               "decoder_steps": decoder[1], "prior_nfe": nfe(prior[1], a.prior_guidance),
               "decoder_nfe": nfe(decoder[1], a.decoder_guidance), "fid": scores["fid_vs_val"],
               "top5_own": scores["top5_retrieval_own_caption"],
               "top5_shuffled": scores["top5_retrieval_shuffled_captions"],
               "seconds": round(time.perf_counter() - start, 1)}
        self.settings.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(row) + "\n")
        return row

    def run(self) -> list[dict]:
        a = self.args
        ref_prior, ref_decoder = (REFERENCE, max(a.prior_steps)), (REFERENCE, self.pipe.decoder.default_steps)
        fast_c, fast_b = a.fast
        rows = []
        if "cascade" in a.parts:
            rows.append(self.score("cascade", ref_prior, (REFERENCE, max(a.decoder_steps))))
            rows += [self.score("cascade", (sampler, fast_c), (sampler, fast_b)) for sampler in a.samplers]
        for sampler in a.samplers:
            if "stage_c" in a.parts:
                rows += [self.score("stage_c", (sampler, n), ref_decoder) for n in a.prior_steps]
            if "stage_b" in a.parts:
                rows += [self.score("stage_b", ref_prior, (sampler, n)) for n in a.decoder_steps]
        return rows


def markdown(report: dict) -> str:
    rows = report["rows"]
    n, chance = report["n_captions"], report["chance_top5"]
    lines = [f"Samplers on {n} val captions at {report['size']} px (one image = {100 / n:.2f}% of retrieval; "
             f"chance {100 * chance:.2f}%), guidance C {report['prior_guidance']} / B {report['decoder_guidance']}.", ""]
    titles = {"stage_c": f"Stage C swept (decoder: DDPM, {report['reference_decoder_steps']} steps)",
              "stage_b": f"Stage B swept (Stage C: DDPM, {report['reference_prior_steps']} steps)",
              "cascade": "Both stages"}
    for sweep, title in ((k, v) for k, v in titles.items() if any(r["sweep"] == k for r in rows)):
        lines += [f"**{title}**", "", "| Stage C | Stage B | NFE C + B | FID ↓ | top-5 own ↑ | top-5 shuffled |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["sweep"] == sweep):
            lines.append(f"| {r['prior_sampler']} {r['prior_steps']} | {r['decoder_sampler']} {r['decoder_steps']} | "
                         f"{r['prior_nfe']} + {r['decoder_nfe']} | {r['fid']:.1f} | {100 * r['top5_own']:.1f}% | "
                         f"{100 * r['top5_shuffled']:.1f}% |")
        lines.append("")
    return "\n".join(lines)


def plot(report: dict, out: Path) -> None:
    panels = [(sweep, who, f"{who}_nfe") for sweep, who in (("stage_c", "prior"), ("stage_b", "decoder"))
              if sweep in report["parts"]] or [("cascade", "prior", "prior_nfe")]
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), squeeze=False)
    for col, (sweep, who, nfe_key) in enumerate(panels):
        for sampler in report["samplers"]:
            rows = [r for r in report["rows"] if r["sweep"] == sweep and r[f"{who}_sampler"] == sampler]
            x = [r["prior_nfe"] + r["decoder_nfe"] if sweep == "cascade" else r[nfe_key] for r in rows]
            axes[0][col].plot(x, [r["fid"] for r in rows], marker="o", label=sampler)
            axes[1][col].plot(x, [100 * r["top5_own"] for r in rows], marker="o", label=sampler)
        axes[0][col].set_title({"stage_c": "Stage C swept", "stage_b": "Stage B swept", "cascade": "both stages"}[sweep])
        axes[0][col].set_ylabel("FID vs val ↓")
        axes[1][col].set_ylabel("top-5 caption retrieval, % ↑")
        axes[1][col].set_xlabel("network evaluations per image" + (" (C + B)" if sweep == "cascade" else ""))
        axes[1][col].axhline(100 * report["chance_top5"], color="grey", lw=0.8, ls=":")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


@torch.no_grad()
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(ap)
    ap.add_argument("--samplers", type=comma_list(sorted(SAMPLERS)), default=sorted(SAMPLERS))
    ap.add_argument("--prior-step-list", dest="prior_steps_list", type=positive_ints, default=[10, 20, 30, 60])
    ap.add_argument("--decoder-step-list", dest="decoder_steps_list", type=positive_ints, default=[4, 8, 12, 40])
    ap.add_argument("--fast", type=positive_ints, default=[20, 12], help="Stage C,Stage B steps of the fast cascade")
    ap.add_argument("--parts", type=comma_list(PARTS), default=list(PARTS),
                    help="which sweeps to run and report (a folder's finished settings serve every part)")
    ap.add_argument("--out", default="runs/sweep", help="output folder (an existing sweep folder is continued)")
    single = ("prior_steps", "decoder_steps", "sampler", "prior_sampler", "decoder_sampler", "eta", "prior_eta",
              "decoder_eta")  # the one-setting flags of sample.evaluate, which a sweep sets itself
    ap.set_defaults(**dict.fromkeys(single))
    args = ap.parse_args(argv)
    given = ["--" + k.replace("_", "-") for k in single if getattr(args, k) is not None]
    if given:
        raise ValueError(f"sample.sweep sets {', '.join(given)} itself; use --samplers, --prior-step-list, "
                         "--decoder-step-list and --fast")
    args.prior_guidance = 4.0 if args.prior_guidance is None else args.prior_guidance  # Würstchen's defaults
    args.decoder_guidance = (SemanticDecoder.default_guidance if args.decoder_guidance is None
                             else args.decoder_guidance)
    args.prior_steps, args.decoder_steps = sorted(set(args.prior_steps_list)), sorted(set(args.decoder_steps_list))
    if len(args.fast) != 2:
        raise ValueError(f"--fast takes two step counts, Stage C's and Stage B's (e.g. 20,12), got {args.fast}")
    out = Path(args.out)
    options = {k: getattr(args, k) for k in ("samplers", "prior_steps", "decoder_steps", "fast", "limit", "size",
                                             "seed", "prior_guidance", "decoder_guidance", "stage_c", "stage_b")}
    stamp = out / "options.json"
    if stamp.exists() and json.loads(stamp.read_text()) != options:
        raise ValueError(f"{out} holds a sweep with other options; choose another --out")
    if not stamp.exists():
        check_output(out)  # a new sweep: a new or empty, writable folder
    sweep = Sweep(args)
    out.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(options) + "\n")
    rows = sweep.run()
    report = {"stage_c": shown(args.stage_c), "stage_b": shown(args.stage_b), "n_captions": len(sweep.scorer.captions),
              "size": args.size, "prior_guidance": args.prior_guidance, "decoder_guidance": args.decoder_guidance,
              "reference_prior_steps": max(args.prior_steps),
              "reference_decoder_steps": sweep.pipe.decoder.default_steps, "samplers": args.samplers, "parts": args.parts,
              "chance_top5": sweep.scorer.chance_top5, "threads": torch.get_num_threads(), "rows": rows}
    write_outputs(out, "sweep", report, markdown(report), lambda path: plot(report, path))
    return report


if __name__ == "__main__":
    run_command(main)
