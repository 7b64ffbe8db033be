"""The Lightning CLI every stage trains from: ``python -m train fit --config configs/<stage>/<size>.yaml``."""
from __future__ import annotations


import lightning as L
from jsonargparse import set_parsing_settings
from lightning.pytorch.cli import LightningCLI

# "omegaconf+" resolves ${...} interpolations after command-line overrides; absolute paths such as
# ${trainer.default_root_dir} then work in every subcommand (fit, validate, ...).
set_parsing_settings(omegaconf_absolute_to_relative_paths=True)


class TrainCLI(LightningCLI):
    """LightningCLI with OmegaConf interpolation in YAML and one run folder for all loggers."""

    def before_fit(self) -> None:
        loggers = self.trainer.loggers
        if len(loggers) > 1:  # CSV and TensorBoard write into the same version folder
            version = loggers[0].version
            for lg in loggers[1:]:
                if hasattr(lg, "_version"):
                    lg._version = version


def main(args: list[str] | None = None) -> TrainCLI:
    return TrainCLI(
        L.LightningModule, L.LightningDataModule,
        subclass_mode_model=True, subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=args,
    )
