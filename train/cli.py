"""The Lightning CLI every stage trains from: ``python -m train fit --config configs/<stage>/<size>.yaml``.

Resuming (``--ckpt_path``) keeps the configuration given now. A checkpoint of another stage or
configuration is refused, and of the model's settings only those in ``CHANGEABLE_ON_RESUME`` may
differ from the checkpoint's; they take effect (the learning rate and weight decay in the restored
optimizer too, see ``train.engine.StageTraining.on_train_start``); the optimizer and schedule
(``optimizer:``, ``lr_scheduler:``) may always change.
"""
from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from weights.checkpoint import load_torch
from train.faults import PREEMPTED_EXIT, AtomicCheckpointIO, SaveOnPreemption

# "omegaconf+" resolves ${...} interpolations after command-line overrides; absolute paths such as
# ${trainer.default_root_dir} then work in every subcommand (fit, validate, ...).
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
# Every stage has a fallback configure_optimizers; the config's optimizer replacing it is the normal case.
warnings.filterwarnings("ignore", message=".*configure_optimizers` will be overridden")

# Read at every step or validation, never baked into weights or optimizer state: these may change when
# resuming (stage_a and stage_b name frozen networks by path; the checkpoint's fingerprints check them).
CHANGEABLE_ON_RESUME = frozenset({
    "mse_weight", "perceptual_weight", "adv_start_step", "quantize_skip_prob", "loss_weight", "sigmoid_bias",
    "semantic_noise_prob", "semantic_noise_max_t", "semantic_drop_prob", "text_drop_prob", "unfreeze_step",
    "cache_latents", "sample_steps", "guidance", "decoder_steps", "grid_images", "val_fid", "stage_a", "stage_b",
    "previewer", "prior_samples", "prior_samples_prob",
})


def read_checkpoint(path: str | Path) -> dict:
    """A Lightning training checkpoint, loaded weights-only (no pickled code runs); anything else is
    refused with what to give instead."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"--ckpt_path {path} is a folder; give a checkpoint file, e.g. {path}/checkpoints/last.ckpt")
    if not path.is_file():
        raise ValueError(f"--ckpt_path {path} does not exist; give a run's checkpoints/last.ckpt")
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} is an export (weights only, no optimizer state) and cannot resume a run; resume "
                         "from the run's checkpoints/last.ckpt, or start a new run from the export with "
                         "--model.init_args.init_from where the stage has it")
    ckpt = load_torch(path, "resume from another checkpoint of the run (checkpoints/*.ckpt)")
    if not isinstance(ckpt, dict) or not {"state_dict", "optimizer_states", "global_step"} <= ckpt.keys():
        raise ValueError(f"{path} is not a Lightning training checkpoint (no state_dict, optimizer_states and "
                         "global_step); resume from a run's checkpoints/last.ckpt")
    return ckpt


def check_resumable(ckpt: dict, class_path: str, settings: dict, path: str) -> None:
    """Refuse a checkpoint of another stage, or whose settings outside ``CHANGEABLE_ON_RESUME`` differ."""
    saved = dict(ckpt.get("hyper_parameters") or {})
    saved.pop("_instantiator", None)
    saved_class = saved.pop("_class_path", None)
    module, _, name = class_path.rpartition(".")
    stage = getattr(getattr(importlib.import_module(module), name), "stage", None)
    if saved_class not in (None, class_path) or ckpt.get("stage", stage) != stage:
        raise ValueError(f"{path} is a checkpoint of {ckpt.get('stage') or saved_class} ({saved_class or 'its class'}"
                         f"), but this config trains {stage} ({class_path}); resume it with the config it was "
                         "trained with, or drop --ckpt_path")

    def same(a, b) -> bool:  # tuples and lists, nested dicts: compared as JSON
        return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

    fixed = [k for k in settings if k in saved and k not in CHANGEABLE_ON_RESUME and not same(settings[k], saved[k])]
    if fixed:
        differ = "; ".join(f"{k}: checkpoint {saved[k]!r}, given {settings[k]!r}" for k in fixed)
        raise ValueError(f"cannot change {', '.join(fixed)} when resuming from {path} ({differ}); set them back "
                         "to the checkpoint's, or start a new run without --ckpt_path")


class TrainCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation in YAML, one run folder for all loggers, and resuming
    that checks the checkpoint against the configuration instead of replacing it."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI would take the model's class and settings from the checkpoint's hyper_parameters,
        # silently training another stage or ignoring settings given now; check them instead.
        sub = self.config.get("subcommand")
        if not sub or not self.config[sub].get("ckpt_path"):
            return
        config = self.config[sub]
        if config.get("weights_only") is False:
            raise ValueError("--weights_only false is not allowed: checkpoints are loaded weights-only")
        if "weights_only" in config:
            config["weights_only"] = True
        path = config["ckpt_path"]
        ckpt = read_checkpoint(path)
        check_resumable(ckpt, config["model"]["class_path"], config["model"]["init_args"].as_dict(), path)

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        """The configured trainer, writing checkpoints atomically (unless the config names another writer) and
        saving one on preemption (``train.faults``)."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        trainer.callbacks.append(SaveOnPreemption())
        return trainer

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--run_name", default="default", help="the run's folder under trainer.default_root_dir "
                            "(the loggers' name in configs/trainer.yaml)")

    @staticmethod
    def configure_optimizers(lightning_module, optimizer, lr_scheduler=None):
        """The config's ``optimizer`` (over every parameter that gets a gradient) and ``lr_scheduler``, stepped
        every optimizer step."""
        if lr_scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": lr_scheduler, "interval": "step"}}

    def before_fit(self) -> None:
        loggers = self.trainer.loggers
        if len(loggers) > 1:  # CSV and TensorBoard write into the same version folder
            version = loggers[0].version
            for lg in loggers[1:]:
                if hasattr(lg, "_version"):
                    lg._version = version


SHARED_TRAINER = Path(__file__).resolve().parents[1] / "configs" / "trainer.yaml"


def main(args: list[str] | None = None) -> TrainCLI:
    """The CLI; a run stopped by SIGTERM exits with status 143 after saving its checkpoint (``train.faults``)."""
    shared = {"default_config_files": [str(SHARED_TRAINER)]}
    try:
        return TrainCLI(
            L.LightningModule, L.LightningDataModule,
            subclass_mode_model=True, subclass_mode_data=True,
            parser_kwargs={"parser_mode": "omegaconf+", **{sub: shared for sub in TrainCLI.subcommands()}},
            args=args,
        )
    except SIGTERMException:
        raise SystemExit(PREEMPTED_EXIT) from None
