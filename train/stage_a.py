"""Training Stage A, the f4 VQGAN (Würstchen paper, Appendix E.1).

Loss = MSE + 0.1 * LPIPS + (vq + 0.25 * commitment) + w_adv * adversarial, with the adversarial
term switched on after ``adv_start_step`` (paper: 0 for 10k steps, then 0.01) and quantisation
skipped with probability 0.1, since Stage B later works in the unquantised space.

The discriminator (hinge loss) trains from step 0; its term reaches the generator only from
``adv_start_step``. Both share one optimizer: the discriminator takes no gradient from the generator's
term nor the generator from the discriminator's, so one backward and one step per batch train both.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import torchmetrics

from common.metrics import Perceptual
from stages.stage_a import PatchDiscriminator, StageA, stage_a_config
from train.engine import StageTraining, ema_of


class StageATraining(StageTraining):
    """LightningModule for Stage A; ``size`` names a preset (``tiny``, ``paper``) or gives its fields."""

    stage = "stage_a"
    frozen = ("perceptual.", "metric_lpips.")

    def __init__(self, size: str | dict = "tiny", mse_weight: float = 1.0, perceptual_weight: float = 0.1,
                 perceptual_net: str = "alex", adv_weight: float = 0.01, adv_start_step: int = 10_000,
                 disc_widths: tuple[int, ...] = (64, 128, 256), quantize_skip_prob: float = 0.1,
                 ema_decay: float | None = 0.999, codebook_init_from_data: bool = True,
                 grid_images: int = 8, metric_net: str = "alex"):
        super().__init__()
        config = stage_a_config(size)
        self.save_hyperparameters()
        self.model = StageA(config)
        self.ema = ema_of(self.model, ema_decay) if ema_decay else None
        self.discriminator = PatchDiscriminator(tuple(disc_widths)) if adv_weight > 0 else None
        self.perceptual = Perceptual(perceptual_net)
        self.metric_lpips = self.perceptual if metric_net == perceptual_net else Perceptual(metric_net)
        self.val_psnr = torchmetrics.image.PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = torchmetrics.image.StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_lpips = torchmetrics.MeanMetric()
        self.register_buffer("codebook_ready", torch.tensor(not codebook_init_from_data))

    # -- training ---------------------------------------------------------------------------
    @torch.no_grad()
    def _init_codebook(self, images: torch.Tensor) -> None:
        """Data-dependent codebook init: codes start as encoder outputs of the first batch (+ jitter)."""
        z = self.model.encoder(images).permute(0, 2, 3, 1).reshape(-1, self.model.config.latent_channels)
        if self.trainer is not None and self.trainer.world_size > 1:
            z = self.all_gather(z).reshape(-1, z.shape[1])  # every rank gets the same codebook
        gen = torch.Generator(device="cpu").manual_seed(0)
        k = self.model.quantizer.codebook.weight.shape[0]
        pick = torch.randint(0, z.shape[0], (k,), generator=gen).to(z.device)
        noise = torch.randn(k, z.shape[1], generator=gen).to(z) * 0.01
        self.model.quantizer.codebook.weight.copy_(z[pick] + noise)
        self.codebook_ready.fill_(True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        h = self.hparams
        images = batch["image"]
        if not bool(self.codebook_ready):
            self._init_codebook(images)
        quantize = torch.rand(()).item() >= h.quantize_skip_prob
        recon, vq_loss = self.model(images, quantize=quantize)
        mse = F.mse_loss(recon, images)
        perceptual = self.perceptual(recon, images).mean() if h.perceptual_weight > 0 else mse.new_zeros(())
        loss = h.mse_weight * mse + h.perceptual_weight * perceptual + vq_loss
        if self.discriminator is not None:
            # D trains from the start (so every parameter gets a gradient each step, as DDP needs);
            # the generator feels it only from adv_start_step on.
            d_loss = 0.5 * (F.relu(1 - self.discriminator(images)).mean()  # hinge loss
                            + F.relu(1 + self.discriminator(recon.detach())).mean())
            loss = loss + d_loss
            self.log("train/d_loss", d_loss)
            if self.global_step >= h.adv_start_step:
                self.discriminator.requires_grad_(False)  # generator term: no gradient into D
                g_adv = -self.discriminator(recon).mean()
                self.discriminator.requires_grad_(True)
                loss = loss + h.adv_weight * g_adv
                self.log("train/g_adv", g_adv)
        return self.log_training_loss(loss, {"mse": mse, "perceptual": perceptual, "vq": vq_loss})

    # -- validation -------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch["image"]
        model = self.eval_model
        recon = model.decode(model.encode(images), quantize=True).clamp(0, 1)
        self.val_psnr(recon, images)
        self.val_ssim(recon, images)
        self.val_lpips.update(self.metric_lpips(recon, images))
        self.log_dict({"val/psnr": self.val_psnr, "val/ssim": self.val_ssim, "val/lpips": self.val_lpips},
                      prog_bar=True)
        if batch_idx == 0 and self.hparams.grid_images:
            self.write_grid("recon", images, recon)

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), "lpips": self.perceptual.description}
