"""What a training run survives: a kill or a full disk while a checkpoint is written, and preemption.

``AtomicCheckpointIO``: Lightning's checkpoint writer with the write made atomic (``common.files``):
the checkpoint is serialised, written to ``<name>.partial`` beside the target, flushed, fsync-ed and
renamed. Lightning's own writer opens ``last.ckpt`` and writes into it, so a kill or a full disk
in the middle leaves no resumable checkpoint; here the previous ``last.ckpt`` stays until the new
one is complete, and a full disk is a one-line error naming the folder and the space needed.

``SaveOnPreemption``: clusters stop jobs with SIGTERM and kill them a grace period later (SLURM,
Kubernetes, spot instances). Lightning's signal handling (its ``_SignalConnector``, which also runs
``SLURMEnvironment``'s auto-requeue where that is on) records the signal, and its loops end the run
with ``SIGTERMException`` after the step in progress. This callback then saves ``last.ckpt`` at that
step and says how to resume; ``train.cli.main`` exits with status 143 (128 + SIGTERM). DataLoader
workers outlive SIGTERM for a grace period (``delay_sigterm``), so the step in progress can finish.
"""
from __future__ import annotations

import io
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from common.files import write_atomic

PREEMPTED_EXIT = 128 + signal.SIGTERM  # how shells and schedulers report a process ended by SIGTERM


SIGTERM_GRACE_SECONDS = 20  # a worker outlives SIGTERM this long (SLURM's default KillWait is 30 s)


def delay_sigterm(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: SLURM signals every process of a job, and a worker ended by
    SIGTERM at once would fail the step in progress before the main process saves. So SIGTERM only arms
    an alarm: the worker ends ``SIGTERM_GRACE_SECONDS`` later (SIGALRM's default action), also when it is
    the parent's own exit that terminates it, so no exit waits on it for ever."""
    signal.signal(signal.SIGTERM, lambda *_: signal.alarm(SIGTERM_GRACE_SECONDS))


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` of the checkpoint, written atomically to a local path (remote URLs as Lightning writes them)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getbuffer())


class SaveOnPreemption(L.Callback):
    """On SIGTERM (after the step in progress): ``last.ckpt`` at the current step, and how to resume."""

    def __init__(self):
        self.saved: Path | None = None

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else \
            Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        return folder / "last.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if trainer.sanity_checking:
            print("stopped by SIGTERM (preemption) before the first step; nothing to save", file=sys.stderr)
            return
        self.saved = self.checkpoint_path(trainer)
        trainer.save_checkpoint(self.saved, weights_only=False)  # full state to resume; rank 0 writes
        if trainer.is_global_zero:
            print(f"stopped by SIGTERM (preemption) after step {trainer.global_step}: saved {self.saved}; resume with "
                  f"the same command and --ckpt_path {self.saved}", file=sys.stderr, flush=True)
