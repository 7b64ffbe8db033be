"""Training the previewer (``stages.previewer``): the frozen compressor's raw latents of each image ->
the image downscaled (bilinear, antialiased) to the previewer's output size, mean squared error.

Validation logs the MSE and PSNR against the downscaled val images and writes a grid (downscaled
real images on top, previews below); the export records the compressor's fingerprint, which
``load_previewer`` checks against Stage C's.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchmetrics

from weights.checkpoint import fingerprint
from stages.previewer import STAGE, Previewer, previewer_config
from train.engine import StageTraining, ema_of, compressor_for


class PreviewerTraining(StageTraining):
    """``size``: a preset (``tiny``) or its fields. ``compressor``: the trained compressor Stage C was
    trained on (kept frozen). ``cache_latents``: encode each training image once (whole images only)."""

    stage = STAGE
    frozen = ("compressor.",)  # rebuilt on load, never saved
    title = "previewer"

    def __init__(self, size: str | dict = "tiny", compressor: str = "checkpoints/tiny/compressor.safetensors",
                 ema_decay: float | None = 0.995, cache_latents: bool = True, grid_images: int = 8):
        super().__init__()
        self.save_hyperparameters()
        config = previewer_config(size)
        self.compressor = compressor_for(compressor, config.c_latent, "the previewer")
        self.compressor_path = str(Path(compressor).resolve())
        self.compressor_fingerprint = fingerprint(self.compressor)
        self.model = Previewer(config)
        self.ema = ema_of(self.model, ema_decay) if ema_decay else None
        self.val_psnr = torchmetrics.image.PeakSignalNoiseRatio(data_range=1.0)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """The images at the previewer's output size: the latent grid times its upsampling factor."""
        h, w = self.compressor.latent_grid(*images.shape[-2:])
        size = (h * self.model.factor, w * self.model.factor)
        return F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        preview = self.model(self.frozen_encoding("semantic", batch, self.compressor, train=True))
        return self.log_training_loss(F.mse_loss(preview, self.targets(batch["image"])))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        real = self.targets(batch["image"])
        preview = self.eval_model(self.frozen_encoding("semantic", batch, self.compressor, train=False))
        self.log("val/loss", F.mse_loss(preview, real), prog_bar=True)
        self.val_psnr(preview, real)
        self.log("val/psnr", self.val_psnr, prog_bar=True)
        if batch_idx == 0 and self.hparams.grid_images:
            self.write_grid("preview", real, preview, batch["caption"])

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), "compressor_fingerprint": self.compressor_fingerprint,
                "compressor_path": self.compressor_path}
