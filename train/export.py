"""What every stage trainer shares: its run folder and wall-clock time, exporting at each validation and
at the end, and checkpoints that name their stage, leave out frozen networks and remember what the
stage was trained on."""
from __future__ import annotations

import time
from pathlib import Path


class ExportsWeights:
    """Mixin for the stage LightningModules; they implement ``export()`` and pass ``export_metadata()`` along.

    ``stage`` names the stage (``stage_a``...), ``frozen`` the prefixes of networks rebuilt on load
    (never saved), and ``trained_on()`` the fingerprints of the frozen inputs the stage depends on,
    as ``{key: (fingerprint, what)}``; resuming with different ones is refused.
    """

    stage: str = ""
    frozen: tuple[str, ...] = ()

    @property
    def title(self) -> str:
        return "Stage " + self.stage.removeprefix("stage_").upper()  # stage_b -> Stage B

    def trained_on(self) -> dict[str, tuple[str, str]]:
        return {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stage"] = self.stage
        checkpoint["model_config"] = self.model.config.to_dict()
        checkpoint.update({key: fp for key, (fp, _) in self.trained_on().items()})
        for k in [k for k in checkpoint["state_dict"] if k.startswith(self.frozen)]:
            del checkpoint["state_dict"][k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("stage", self.stage) != self.stage:
            raise ValueError(f"this is a {checkpoint['stage']} checkpoint, not a {self.title} one")
        for key, (fp, what) in self.trained_on().items():
            saved = checkpoint.get(key)
            if saved is not None and saved != fp:
                raise ValueError(f"this {self.title} checkpoint was trained on a different {what} (fingerprint {saved}, "
                                 f"the given one is {fp}); pass the {what} it was trained with")
        for k, v in self.state_dict().items():  # frozen networks come from the module, not the file
            if k.startswith(self.frozen):
                checkpoint["state_dict"][k] = v

    def nan_advice(self) -> str:
        """What to change after a NaN or infinite loss; resuming is advised only from a checkpoint that exists."""
        advice = ("lower the learning rate (--model.init_args.lr) or enable gradient clipping "
                  "(--trainer.gradient_clip_val)")
        callback = self.trainer.checkpoint_callback
        candidates = [Path(callback.dirpath) / "last.ckpt"] if callback and callback.dirpath else []
        candidates += [Path(self.trainer.ckpt_path)] if self.trainer.ckpt_path else []
        last = next((p for p in candidates if p.is_file()), None)
        if last is None:
            return f"{advice} and start again (no checkpoint was saved before this step)"
        return f"{advice} and resume with --ckpt_path {last}"

    def log_training_loss(self, loss):
        """Log the step's loss; a NaN or infinite loss stops training with what to change."""
        if not loss.isfinite():
            raise FloatingPointError(f"{self.title} loss is {loss.item()} at step {self.global_step}; "
                                     f"{self.nan_advice()}")
        self.log("train/loss", loss)
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    def on_train_start(self) -> None:
        """The learning rate and weight decay given now take effect, also on resume, where Lightning has
        restored the saved optimizer and schedule: every group's base rate becomes ``lr``, at the
        schedule's current factor."""
        h = self.hparams
        for config in self.trainer.lr_scheduler_configs:
            sched = config.scheduler
            sched.base_lrs = [h.lr] * len(sched.optimizer.param_groups)
            for group, factor in zip(sched.optimizer.param_groups, sched.lr_lambdas):
                group.update(initial_lr=h.lr, lr=h.lr * factor(sched.last_epoch), weight_decay=h.weight_decay)

    @property
    def eval_model(self):
        """The weights validation and exports use: the EMA copy when there is one."""
        return self.ema if self.ema is not None else self.model

    def on_fit_start(self) -> None:
        self._fit_started = time.time()

    @property
    def run_dir(self) -> Path:
        """The run's folder; under DDP every rank must ask (``trainer.log_dir`` is a collective call)."""
        return Path(self.trainer.log_dir or ".")

    def export_metadata(self) -> dict:
        """Step and wall time of this fit (since it started or resumed), for the export's metadata."""
        meta = {"global_step": self.global_step}
        if hasattr(self, "_fit_started"):
            meta["wall_time_s"] = round(time.time() - self._fit_started, 1)
        return meta

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.export()

    def on_train_end(self) -> None:
        self.export()
