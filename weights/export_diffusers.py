"""Export this project's stages as diffusers Würstchen model folders (the reverse of ``weights.convert``).

    python -m weights.export_diffusers --stage-a A --stage-b B --stage-c C --out DIR [--overwrite]

Any subset of the stages; each goes to the folder the released pipelines use for it, in the
``save_pretrained`` layout (``config.json`` + ``diffusion_pytorch_model.safetensors``):

* Stage A -> ``DIR/vqgan``: ``PaellaVQModel`` (the released VQGAN),
* Stage B -> ``DIR/decoder``: ``WuerstchenDiffNeXt`` (the released decoder),
* Stage C -> ``DIR/prior``: ``WuerstchenPrior`` (the released prior),

A Stable Cascade (v3) Stage B or C export (recognised by its recorded stage) goes to the same folder
as diffusers' ``StableCascadeUNet`` (``weights.convert_cascade``).

So ``PaellaVQModel.from_pretrained(DIR / "vqgan")`` and the others load them and compute what our
modules compute. Values are unchanged; only names (and the config) are translated. Configs the
diffusers modules cannot express are refused with a one-line error naming what differs, before
anything is written. The text encoder and the latent normalisation are not part of these modules:
the printed report names the text encoder each stage was trained with and the prior pipeline's
``latent_mean``/``latent_std`` for the exported Stage C (the release's 42 and 1).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from weights.checkpoint import read_metadata, resolve_checkpoint
from common.cli import shown
from common.errors import run_command
from weights.convert_cascade import check_diffusers_expressible, diffusers_config, to_release
from stages.stable_cascade import StageB3, StageC3
from weights.loaders import load_stage_b3, load_stage_c3, load_stage_a, load_stage_b, load_stage_c
from stages.stage_a import StageA
from stages.stage_b import StageB
from stages.stage_c import StageC

WEIGHTS = "diffusion_pytorch_model.safetensors"
# the first diffusers release with the Würstchen modules (recorded in config.json as save_pretrained does)
DIFFUSERS_VERSION = "0.21.0"
FOLDERS = {"stage_a": "vqgan", "stage_b": "decoder", "stage_c": "prior"}


class NotExpressible(ValueError):
    """A config the diffusers Würstchen modules cannot express."""


def _attention_names(key: str) -> str:
    """Our attention block's ``to_q/k/v/to_out`` -> diffusers' ``attention.to_q/k/v/to_out.0``."""
    key = re.sub(r"\.to_(q|k|v)\.(weight|bias)$", r".attention.to_\1.\2", key)
    return re.sub(r"\.to_out\.(weight|bias)$", r".attention.to_out.0.\1", key)


def _renamed(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        top = key.split(".", 1)[0] + "."
        key = prefixes.get(top, top) + key[len(top):]
        out[_attention_names(key)] = value
    return out


# -- Stage A -> PaellaVQModel ------------------------------------------------------------------------
def stage_a_to_diffusers(model: StageA) -> tuple[dict, dict[str, torch.Tensor]]:
    """(PaellaVQModel config, state dict) of our Stage A (paper Sec. 3.1; the released f4 VQGAN)."""
    cfg = model.config
    c0, c1 = cfg.widths
    if c1 != 2 * c0:
        raise NotExpressible(f"PaellaVQModel ties its level widths to (embed_dim / 2, embed_dim); this Stage A has "
                             f"widths ({c0}, {c1}): export a Stage A whose second width is twice its first")
    n_up = cfg.bottleneck_blocks + 3  # conv, bottleneck blocks, transposed conv, one block
    out = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"\.depthwise\.(weight|bias)$", r".depthwise.1.\1", key)  # ReplicationPad2d + conv
        if m := re.match(r"encoder\.(\d+)\.(.*)", key):
            i, rest = int(m.group(1)), m.group(2)
            new = ("in_block.1." if i == 1 else f"down_blocks.{i - 2}." if i <= 4 else f"down_blocks.3.{i - 5}.") + rest
        elif key == "quantizer.codebook.weight":
            new = "vquantizer.embedding.weight"
        elif m := re.match(r"decoder\.(\d+)\.(.*)", key):
            i, rest = int(m.group(1)), m.group(2)
            new = ("up_blocks.0.0." if i == 0 else f"up_blocks.{i}." if i < n_up else "out_block.0.") + rest
        else:
            raise ValueError(f"unexpected Stage A key {key!r}")
        out[new] = value
    config = {"_class_name": "PaellaVQModel", "in_channels": 3, "out_channels": 3, "up_down_scale_factor": 2,
              "levels": 2, "bottleneck_blocks": cfg.bottleneck_blocks, "embed_dim": c1,
              "latent_channels": cfg.latent_channels, "num_vq_embeddings": cfg.codebook_size,
              "scale_factor": cfg.scale_factor}
    return config, out


# -- Stage B -> WuerstchenDiffNeXt -------------------------------------------------------------------
def stage_b_to_diffusers(model: StageB) -> tuple[dict, dict[str, torch.Tensor]]:
    """(WuerstchenDiffNeXt config, state dict) of our Stage B (paper Sec. 3.1; the released decoder)."""
    cfg = model.config
    if not cfg.c_text:
        raise NotExpressible("WuerstchenDiffNeXt always attends to CLIP text states (clip_embd); this Stage B has "
                             "c_text=None (no text, self-attention only): export a text-conditional Stage B")
    config = {"_class_name": "WuerstchenDiffNeXt", "c_in": cfg.c_latent, "c_out": cfg.c_latent, "c_r": cfg.c_r,
              "patch_size": cfg.patch_size, "c_cond": cfg.c_cond, "c_hidden": list(cfg.widths),
              "nhead": [h if h else -1 for h in cfg.heads], "blocks": list(cfg.blocks),
              "level_config": ["CTA" if h else "CT" for h in cfg.heads], "inject_effnet": list(cfg.inject_semantic),
              "effnet_embd": cfg.c_semantic, "clip_embd": cfg.c_text, "kernel_size": cfg.kernel_size,
              "dropout": cfg.dropout}
    prefixes = {"text_mapper.": "clip_mapper.", "semantic_mappers.": "effnet_mappers.", "head.": "clf."}
    return config, _renamed(model.state_dict(), prefixes)


# -- Stage C -> WuerstchenPrior ----------------------------------------------------------------------
def stage_c_to_diffusers(model: StageC) -> tuple[dict, dict[str, torch.Tensor]]:
    """(WuerstchenPrior config, state dict) of our Stage C (paper Sec. 3.2; the released prior)."""
    cfg = model.config
    config = {"_class_name": "WuerstchenPrior", "c_in": cfg.c_latent, "c": cfg.width, "c_cond": cfg.c_text,
              "c_r": cfg.c_r, "depth": cfg.depth, "nhead": cfg.heads, "dropout": cfg.dropout}
    return config, _renamed(model.state_dict(), {"text_mapper.": "cond_mapper.", "head.": "out."})


# -- Stable Cascade Stage B / C -> StableCascadeUNet -------------------------------------------------
def cascade_to_diffusers(model: StageC3 | StageB3) -> tuple[dict, dict[str, torch.Tensor]]:
    """(StableCascadeUNet config, state dict) of our Stable Cascade Stage C or B."""
    try:
        check_diffusers_expressible(model.config)
    except ValueError as e:
        raise NotExpressible(str(e)) from None
    return diffusers_config(model.config), to_release(model, "diffusers")


CASCADE_EXPORTERS = {"stage_b3": (load_stage_b3, cascade_to_diffusers),
                     "stage_c3": (load_stage_c3, cascade_to_diffusers)}

EXPORTERS = {"stage_a": (load_stage_a, stage_a_to_diffusers), "stage_b": (load_stage_b, stage_b_to_diffusers),
             "stage_c": (load_stage_c, stage_c_to_diffusers)}


def save_diffusers(config: dict, state: dict[str, torch.Tensor], folder: str | Path) -> Path:
    """``config.json`` and ``diffusion_pytorch_model.safetensors`` in ``folder`` (``save_pretrained``'s layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(folder / WEIGHTS),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config, "_diffusers_version": DIFFUSERS_VERSION}, indent=2)
                                        + "\n")
    return folder


def check_out(out: Path, stages: list[str], overwrite: bool) -> None:
    """Refuse an --out that is a file, or that holds a folder this export would write, unless --overwrite."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; give a folder")
    clash = [out / FOLDERS[s] for s in stages if (out / FOLDERS[s]).exists()]
    if clash and not overwrite:
        raise FileExistsError(f"{clash[0]} exists; choose another --out or pass --overwrite")
    above = next(p for p in [out, *out.parents] if p.exists())
    if not above.is_dir():
        raise NotADirectoryError(f"cannot write --out {out}: {above} is a file, not a folder")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m weights.export_diffusers", description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage-a", default=None, help="Stage A export, .ckpt or run folder -> OUT/vqgan")
    ap.add_argument("--stage-b", default=None, help="Stage B export, .ckpt or run folder -> OUT/decoder")
    ap.add_argument("--stage-c", default=None, help="Stage C export, .ckpt or run folder -> OUT/prior")
    ap.add_argument("--out", required=True, type=Path, help="folder for the diffusers model folders")
    ap.add_argument("--overwrite", action="store_true", help="replace model folders that exist under --out")
    args = ap.parse_args(argv)
    sources = {s: getattr(args, s) for s in FOLDERS if getattr(args, s) is not None}
    if not sources:
        ap.error("give at least one of --stage-a, --stage-b, --stage-c")
    check_out(args.out, list(sources), args.overwrite)
    converted, report = {}, {"out": str(args.out), "stages": {}}
    for stage, source in sources.items():  # every stage loaded and checked before anything is written
        path = resolve_checkpoint(source)
        recorded = read_metadata(path).get("stage")
        load, export = CASCADE_EXPORTERS[recorded] if recorded in CASCADE_EXPORTERS and \
            recorded.startswith(stage) else EXPORTERS[stage]
        try:
            converted[stage] = export(load(str(path)))
        except NotExpressible as e:
            raise NotExpressible(f"{stage.replace('_', ' ').title()} {shown(path)}: {e}") from None
        meta = read_metadata(path)
        entry = {"source": shown(path), "folder": str(args.out / FOLDERS[stage]),
                 "class": converted[stage][0]["_class_name"]}
        if stage in ("stage_b", "stage_c"):
            entry["text_encoder"] = meta.get("text_encoder")
        if stage == "stage_c" and recorded != "stage_c3":  # the prior pipeline maps its output to compressor latents as x * mean - std
            entry["prior_pipeline"] = {"latent_mean": meta.get("latent_scale", 42.0),
                                       "latent_std": meta.get("latent_shift", 1.0)}
        report["stages"][stage] = entry
    for stage, (config, state) in converted.items():
        folder = args.out / FOLDERS[stage]
        if folder.exists():  # only with --overwrite (checked above)
            shutil.rmtree(folder)
        save_diffusers(config, state, folder)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run_command(main)
