"""Paper-scale training presets (``configs/stage_{b,c}/paper_gpu.yaml``): build the preset's network
(activation checkpointing on) and run a few optimizer steps with the preset's trainer settings
(precision, strategy, gradient clipping) and per-GPU batch at its resolution, on random inputs.

This checks that the preset builds, fits and steps on the device, and times it; the full
``python -m train fit`` run additionally needs the trained Stage A / compressor and the data.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import yaml

from benchmarks.targets import FACTORIES
from stages.stage_b import StageB
from stages.stage_c import StageC

ROOT = Path(__file__).resolve().parent.parent
PRESETS = {"stage_b": ROOT / "configs/stage_b/paper_gpu.yaml", "stage_c": ROOT / "configs/stage_c/paper_gpu.yaml"}


def read_preset(path: str | Path) -> dict:
    """The settings of a training YAML that matter here."""
    cfg = yaml.safe_load(Path(path).read_text())
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    return {"precision": trainer.get("precision", "32-true"), "strategy": trainer.get("strategy", "auto"),
            "gradient_clip_val": trainer.get("gradient_clip_val"), "size": model["size"],
            "lr": cfg.get("optimizer", {}).get("init_args", {}).get("lr", 1e-4),
            "px": data["image_size"], "batch": data["batch_size"]}


def run_preset(kind: str, path: str | Path | None = None, steps: int = 3, accelerator: str = "gpu",
               overrides: dict | None = None) -> dict:
    """Run ``steps`` training steps of the preset's network under its trainer settings; seconds per step, memory.

    ``overrides`` replace preset settings (e.g. ``size``/``px``/``batch``/``precision`` for a CPU check).
    """
    import lightning as L

    settings = {**read_preset(path or PRESETS[kind]), **(overrides or {})}
    network = {"stage_b": StageB, "stage_c": StageC}[kind](settings["size"])
    target = FACTORIES[kind](network.config)  # inputs and loss for exactly this config
    inputs = lambda device: target.inputs(settings["batch"], settings["px"], device)  # noqa: E731
    step_times: list[float] = []

    class Step(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = network

        def training_step(self, batch, batch_idx):
            args = inputs(self.device)
            return target.loss(self.model, args)

        def on_train_batch_start(self, batch, batch_idx):
            self._start = time.perf_counter()

        def on_train_batch_end(self, outputs, batch, batch_idx):
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            step_times.append(time.perf_counter() - self._start)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=settings["lr"])

        def train_dataloader(self):
            return torch.utils.data.DataLoader(range(steps), batch_size=1)

    strategy = settings["strategy"] if accelerator == "gpu" else "auto"
    trainer = L.Trainer(accelerator=accelerator, devices=1, strategy=strategy, precision=settings["precision"],
                        max_steps=steps, gradient_clip_val=settings["gradient_clip_val"], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(Step())
    peak = torch.cuda.max_memory_allocated() if accelerator == "gpu" else None
    return {"module": kind, "preset": str(path or PRESETS[kind]), "accelerator": accelerator, "steps": len(step_times),
            "activation_checkpointing": network.config.activation_checkpointing, "precision": settings["precision"],
            "strategy": strategy, "px": settings["px"], "batch": settings["batch"],
            "params": sum(p.numel() for p in network.parameters()),
            "s_per_step_after_first": sorted(step_times[1:])[len(step_times[1:]) // 2] if len(step_times) > 1 else None,
            "peak_memory_bytes": peak}
