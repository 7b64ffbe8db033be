"""What every stage trainer shares: its run folder, its wall-clock time, and exporting at each validation and at the end."""
from __future__ import annotations

import time
from pathlib import Path


class ExportsWeights:
    """Mixin for the stage LightningModules; they implement ``export()`` and pass ``export_metadata()`` along."""

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
