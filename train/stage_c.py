"""Training Stage C, the text-to-latent prior (Würstchen paper Sec. 3.3 and App. E.3).

Targets are the frozen semantic compressor's latents of the training images, normalised as in
the release ((x + 1) / 42). The prior predicts the noise of x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps
from x_t, t and the text states, with a p2-weighted MSE; text is replaced by the empty prompt 5%
of the time for classifier-free guidance.

Validation logs the same loss on the val split at fixed noise, and, when a Stage B is given,
samples latents for the val captions and decodes them with Stage B + Stage A into a PNG grid.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torchvision.utils import save_image

from stages.decoders import load_semantic_decoder
from stages.pipeline import Prior
from semantic_compressor import latent_grid, load_compressor, normalize_latents
from stages.checkpoint import fingerprint, save_safetensors
from stages.denoisers import denoiser_for
from stages.stage_c import StageC, stage_c_config
from stages.text_encoder import build_text_encoder
from train.ema import make_ema, update_ema, warmup_decay
from train.export import ExportsWeights
from train.optim import with_schedule


class StageCTraining(ExportsWeights, L.LightningModule):
    """LightningModule for Stage C; ``size`` names a preset (``tiny``, ``paper``, ``release``) or gives its fields.

    ``compressor``: the trained compressor (``compressor.safetensors`` or the Stage B run folder).
    ``stage_b``: optional Stage B (file or run folder) for validation grids. ``cache_latents``
    keeps each training image's latents in memory by sample key (only valid without random crops).
    ``latent_shift``/``latent_scale``: targets are (x + shift) / scale; the release's 1 and 42 suit
    its compressor, whose latents have a standard deviation of about 42; ours leave BatchNorm with
    about unit variance, so the tiny config uses 0 and 1 (the same goal: unit-variance targets).
    """

    stage = "stage_c"
    frozen = ("compressor.", "text_encoder.", "decoder.")  # rebuilt on load, never saved

    def __init__(self, size: str | dict = "tiny", compressor: str = "runs/stage_b/tiny",
                 text_encoder: str = "minilm", stage_b: str | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.01, warmup_steps: int = 0,
                 lr_schedule: str = "constant", loss_weight: str = "paper_p2", text_drop_prob: float = 0.05,
                 ema_decay: float | None = 0.999, sample_steps: int = 60, guidance: float = 4.0,
                 decoder_steps: int = 12, grid_images: int = 8, cache_latents: bool = False,
                 latent_shift: float = 1.0, latent_scale: float = 42.0):
        super().__init__()
        self.save_hyperparameters()
        config = stage_c_config(size)
        self.compressor = load_compressor(compressor).requires_grad_(False)
        self.compressor_fingerprint = fingerprint(self.compressor)
        self.text_encoder = build_text_encoder(text_encoder)
        if self.text_encoder is None or self.text_encoder.dim != config.c_text:
            raise ValueError(f"Stage C size {size!r} expects text states of width {config.c_text}, but text_encoder "
                             f"is {text_encoder!r}; pick a matching text_encoder or set c_text in the size")
        self.model = StageC(config)
        self.ema = make_ema(self.model) if ema_decay else None
        self.decoder = load_semantic_decoder(stage_b) if stage_b else None
        self.latent_cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> "StageCTraining":
        super().train(mode)
        for frozen in (self.compressor, self.ema, self.decoder):
            if frozen is not None:
                frozen.eval()
        return self

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return normalize_latents(latents, self.hparams.latent_shift, self.hparams.latent_scale)

    @torch.no_grad()
    def targets(self, batch: dict) -> torch.Tensor:
        """Normalised compressor latents of the batch's images (cached by key when asked)."""
        if not self.hparams.cache_latents:
            return self.normalize(self.compressor(batch["image"]))
        missing = [i for i, k in enumerate(batch["key"]) if k not in self.latent_cache]
        if missing:
            fresh = self.normalize(self.compressor(batch["image"][missing])).cpu()
            self.latent_cache.update({batch["key"][i]: z for i, z in zip(missing, fresh)})
        return torch.stack([self.latent_cache[k] for k in batch["key"]]).to(self.device)

    def denoiser(self, network: StageC):
        return denoiser_for(network, loss_weight=self.hparams.loss_weight)

    def loss(self, x0: torch.Tensor, text: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.denoiser(self.model).loss(x0, t, noise, text)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = self.targets(batch)
        b = x0.shape[0]
        text = self.text_encoder(batch["caption"])
        drop = (torch.rand(b, device=self.device) < self.hparams.text_drop_prob)[:, None, None]
        text = torch.where(drop, self.text_encoder.empty(b).to(text), text)
        return self.log_training_loss(self.loss(x0, text, torch.rand(b, device=self.device), torch.randn_like(x0)))

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            step = self.global_step
            update_ema(self.ema, self.model, warmup_decay(self.hparams.ema_decay, step))

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=(0.9, 0.95))
        return with_schedule(opt, h.warmup_steps, h.lr_schedule, self.trainer.max_steps if self.trainer else -1)

    # -- checkpoints ------------------------------------------------------------------------
    def trained_on(self) -> dict[str, tuple[str, str]]:
        return {"compressor_fingerprint": (self.compressor_fingerprint, "semantic compressor")}

    # -- validation -------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0 = self.normalize(self.compressor(batch["image"]))
        text = self.text_encoder(batch["caption"])
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)  # the same noise at every validation
        t = torch.rand(x0.shape[0], generator=gen, device=self.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        model, self.model = self.model, self.eval_model
        try:
            self.log("val/loss", self.loss(x0, text, t, noise), prog_bar=True)
        finally:
            self.model = model
        if batch_idx == 0 and self.decoder is not None and self.hparams.grid_images:
            self.write_grid(batch)

    def write_grid(self, batch: dict) -> None:
        out = self.run_dir / "samples" / f"text_to_image_step{self.global_step:07d}.png"
        if not self.trainer.is_global_zero:
            return
        n = min(self.hparams.grid_images, batch["image"].shape[0])
        images, captions = batch["image"][:n], batch["caption"][:n]
        gen = torch.Generator(device=self.device).manual_seed(0)
        prior = Prior(self.eval_model, self.text_encoder, self.hparams.latent_shift, self.hparams.latent_scale)
        latents = prior.sample(captions, [""] * n, latent_grid(*images.shape[-2:]), self.hparams.sample_steps,
                               self.hparams.guidance, gen, progress=False)
        generated = self.decoder(latents, images.shape[-2:], captions, self.hparams.decoder_steps, 1.0, gen)
        out.parent.mkdir(parents=True, exist_ok=True)
        save_image(torch.cat([images, generated]), out, nrow=n, padding=2, pad_value=1.0)
        (out.with_suffix(".txt")).write_text("\n".join(captions) + "\n")

    def export(self) -> Path | None:
        """``<run>/model.safetensors`` (Stage C, EMA), with the compressor and text encoder it needs."""
        path = self.run_dir / "model.safetensors"
        if not self.trainer.is_global_zero:
            return None
        extra = {**self.export_metadata(), "compressor_fingerprint": self.compressor_fingerprint,
                 "text_encoder": self.hparams.text_encoder, "latent_shift": self.hparams.latent_shift,
                 "latent_scale": self.hparams.latent_scale, "diffusion": self.denoiser(self.eval_model).describe()}
        return save_safetensors(self.eval_model, path, "stage_c", self.model.config.to_dict(), overwrite=True,
                                extra=extra)
