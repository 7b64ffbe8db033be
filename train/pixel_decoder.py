"""Training the greedy-grown pixel decoder (Greedy Growing paper Sec. 3.2-3.3, 4).

One LightningModule for every phase; each phase is its own CLI run and config
(``configs/pixel_decoder/``):

* ``phase: 1``: the Shallow-UViT at its low ``resolution`` on all training data. Images are loaded
  at the sampler's size (the frozen compressor's latents come from them, as Stage C's targets do)
  and downsampled to ``resolution`` for the diffusion target.
* ``phase: 2``: grows the phase-1 model (``init_from``: its export, ``.ckpt`` or run folder) to the
  target ``resolution``, trained on the shifted schedule (logSNR + 2 log(base / d), ``base`` the
  phase-1 resolution), on data filtered to images at least that size (``data.min_size``).
  ``mode``: ``greedy`` (core and condition encoders frozen; the paper's recipe), ``finetune``
  (nothing frozen), ``scratch`` (the grown architecture from random weights, no ``init_from``),
  ``freeze_unfreeze`` (``greedy`` until ``unfreeze_step``, then everything trains).
* ``phase: 3`` (optional): continues a grown model (``init_from`` a phase-2 export) with everything
  trainable.

Training is as for Stage B: the semantic condition is noised at a small random t 30% of the time
and zeroed 10% of the time (classifier-free guidance); text, when used, is dropped 10% of the
time. Loss on the eps implied by the network's output (its ``diffusion`` denoiser): the v-MSE
(``loss_weight: v_mse``, for the default v-predicting head), plain eps-MSE (``constant``), p2 or
SiD2's sigmoid(b - logSNR) (``loss_weight: sigmoid``, ``sigmoid_bias`` b; ``diffusion.LOSS_WEIGHTS``). Validation decodes the val images from their own
semantic latents (a PNG grid: real images on top, decoded below) and logs PSNR and the loss.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torchvision.utils import save_image

from stages.decoders import PixelDecoder, pixel_decoder_metadata
from semantic_compressor import load_compressor, normalize_latents
from stages.checkpoint import fingerprint, load_into, read_weights, resolve_checkpoint, save_safetensors
from stages.denoisers import denoiser_for
from diffusion import CosineSchedule, check_loss_weight
from diffusion import logsnr_shift as shift_for_resolution
from stages.pixel_decoder import (
    MODES,
    STAGE,
    GrownUViT,
    ShallowUViT,
    build_pixel_model,
    check_core_match,
    freeze_plan,
    grow,
    pixel_decoder_config,
)
from stages.text_encoder import build_text_encoder
from train.ema import make_ema, update_ema, warmup_decay
from train.export import ExportsWeights
from train.optim import with_schedule


class PixelDecoderTraining(ExportsWeights, L.LightningModule):
    """LightningModule for the pixel decoder; ``size`` names a preset (``tiny``, ``paper``) or gives its fields.

    The size holds the phase-1 architecture and the growth plan (``level_*``). ``resolution``: the
    side trained at (phase 1: the size's ``resolution``; phase 2: the target, required).
    ``compressor``: the trained compressor (``compressor.safetensors`` or a Stage B run folder), the
    one the Stage C to pair with was trained on. ``logsnr_shift``: None = 2 log(base / resolution).
    """

    stage = STAGE
    frozen = ("compressor.", "text_encoder.")  # rebuilt on load, never saved

    def __init__(self, size: str | dict = "tiny", phase: int = 1, mode: str = "greedy", init_from: str | None = None,
                 resolution: int | None = None, unfreeze_step: int | None = None,
                 compressor: str = "runs/stage_b/tiny", text_encoder: str | None = None,
                 latent_shift: float = 0.0, latent_scale: float = 1.0,
                 loss_weight: str = "constant", sigmoid_bias: float = 0.0, logsnr_shift: float | None = None,
                 lr: float = 1e-4, weight_decay: float = 0.01, warmup_steps: int = 0, lr_schedule: str = "constant",
                 semantic_noise_prob: float = 0.3, semantic_noise_max_t: float = 0.3, semantic_drop_prob: float = 0.1,
                 text_drop_prob: float = 0.1, ema_decay: float | None = 0.999, sample_steps: int = 25,
                 guidance: float = 1.0, grid_images: int = 8, cache_latents: bool = False):
        super().__init__()
        self.save_hyperparameters()
        if phase not in (1, 2, 3):
            raise ValueError(f"phase must be 1 (Shallow-UViT), 2 (grown) or 3 (unfreeze all), got {phase}")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
        check_loss_weight(loss_weight)
        if mode == "freeze_unfreeze" and phase == 2 and not (unfreeze_step and unfreeze_step > 0):
            raise ValueError("mode freeze_unfreeze needs unfreeze_step (the step at which everything starts to train)")
        config = pixel_decoder_config(size)
        self.compressor = load_compressor(compressor).requires_grad_(False)
        self.compressor_path = str(Path(compressor).resolve())  # recorded absolute, as every path in an export
        self.compressor_fingerprint = fingerprint(self.compressor)
        if self.compressor.config.latent_channels != config.c_semantic:
            raise ValueError(f"the compressor gives {self.compressor.config.latent_channels} channels; "
                             f"the pixel decoder expects c_semantic = {config.c_semantic}")
        self.text_encoder = build_text_encoder(text_encoder)
        want_text = bool(config.c_text)
        if want_text != (self.text_encoder is not None) or (want_text and self.text_encoder.dim != config.c_text):
            raise ValueError(f"pixel decoder size {size!r} expects text states of width {config.c_text}, but "
                             f"text_encoder is {text_encoder!r}; pick a matching text_encoder or set c_text in the size")
        self.init_fingerprint: str | None = None
        self.init_cost: dict = {}  # the starting checkpoint's own steps and wall time (training cost so far)
        self.inherited_shift: float | None = None  # phase 3: the shift phase 2 trained with
        self.model = self._build(config)
        self.resolution = self.model.config.target_resolution if phase > 1 else self.model.config.resolution
        if logsnr_shift is not None:
            self.logsnr_shift = float(logsnr_shift)
        elif self.inherited_shift is not None:
            self.logsnr_shift = float(self.inherited_shift)
        else:  # 2 log(base / d), base the phase-1 side: 0 in phase 1
            self.logsnr_shift = shift_for_resolution(self.model.config.resolution, self.resolution)
        self.unfrozen = False
        self.plan = freeze_plan(self.model, mode if phase == 2 else "finetune")
        self.ema = make_ema(self.model) if ema_decay else None
        self.val_psnr = torchmetrics.image.PeakSignalNoiseRatio(data_range=1.0)
        self.latent_cache: dict[str, torch.Tensor] = {}
        self.semantic_size: int | None = None

    # -- building each phase's model ------------------------------------------------------------
    def _build(self, config) -> ShallowUViT | GrownUViT:
        h = self.hparams
        if h.phase == 1:
            if h.init_from:
                raise ValueError("phase 1 trains the Shallow-UViT from scratch; drop init_from (to continue a run, "
                                 "pass --ckpt_path its last.ckpt)")
            if h.resolution is not None and h.resolution != config.resolution:
                config = replace(config, resolution=h.resolution)
            return ShallowUViT(config)
        if h.phase == 2 and h.mode == "scratch":
            if h.init_from:
                raise ValueError("mode scratch trains the grown model from random weights; drop init_from "
                                 "(greedy, finetune and freeze_unfreeze start from it)")
            return GrownUViT(replace(config, target_resolution=self._target(config)))
        if not h.init_from:
            raise ValueError(f"phase {h.phase} ({h.mode}) starts from a checkpoint: set init_from to the "
                             f"{'phase 1' if h.phase == 2 else 'phase 2'} export or run folder")
        path = resolve_checkpoint(h.init_from)
        state, stored = read_weights(path, STAGE)
        if stored is None:
            raise ValueError(f"{path} carries no pixel decoder config")
        stored = pixel_decoder_config(stored)
        meta = pixel_decoder_metadata(path)
        trained_fp = meta.get("compressor_fingerprint")
        if trained_fp and trained_fp != self.compressor_fingerprint:
            raise ValueError(f"{path} was trained on a different semantic compressor ({trained_fp}) than "
                             f"{self.compressor_path} ({self.compressor_fingerprint}); pass the compressor it used")
        if h.phase == 2:
            if stored.grown:
                raise ValueError(f"{path} is already a grown (phase 2) model; phase 2 starts from a phase 1 export "
                                 "(use phase 3 to keep training a grown model)")
            check_core_match(config, stored, str(path))
            phase1 = load_into(ShallowUViT(stored), state, str(path))
            self.init_cost = {f"init_{k}": meta[k] for k in ("global_step", "wall_time_s") if k in meta}
            self.init_fingerprint = fingerprint(phase1)
            return grow(phase1, self._target(config), config)
        if not stored.grown:
            raise ValueError(f"{path} is a phase 1 (Shallow-UViT) model; phase 3 continues a grown (phase 2) one")
        if h.resolution is not None and h.resolution != stored.target_resolution:
            raise ValueError(f"{path} was grown to {stored.target_resolution} px; resolution is {h.resolution}")
        model = load_into(build_pixel_model(stored), state, str(path))
        self.init_fingerprint = fingerprint(model)
        self.inherited_shift = meta.get("logsnr_shift")
        return model

    def _target(self, config) -> int:
        if self.hparams.resolution is None:
            raise ValueError("phase 2 needs resolution: the target image side to grow to (e.g. 128)")
        return self.hparams.resolution

    def train(self, mode: bool = True) -> "PixelDecoderTraining":
        super().train(mode)
        self.compressor.eval()
        if self.ema is not None:
            self.ema.eval()
        return self

    # -- data -----------------------------------------------------------------------------------
    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return normalize_latents(latents, self.hparams.latent_shift, self.hparams.latent_scale)

    @torch.no_grad()
    def semantic(self, batch: dict) -> torch.Tensor:
        """Normalised compressor latents of the batch's images at their loaded size (cached by key when asked)."""
        images = batch["image"]
        if not self.hparams.cache_latents:
            return self.normalize(self.compressor(images))
        missing = [i for i, k in enumerate(batch["key"]) if k not in self.latent_cache]
        if missing:
            fresh = self.normalize(self.compressor(images[missing])).cpu()
            self.latent_cache.update({batch["key"][i]: z for i, z in zip(missing, fresh)})
        return torch.stack([self.latent_cache[k] for k in batch["key"]]).to(self.device)

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] at the loaded size -> the diffusion target at ``resolution``, in [-1, 1]."""
        scale = self.resolution / images.shape[-2]
        size = (self.resolution, round(images.shape[-1] * scale))
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return images.clamp(0, 1) * 2 - 1

    def augment(self, semantic: torch.Tensor, text: torch.Tensor | None):
        h, b = self.hparams, semantic.shape[0]
        noised = torch.rand(b, device=self.device) < h.semantic_noise_prob
        if noised.any():
            t = torch.rand(b, device=self.device) * h.semantic_noise_max_t
            semantic = torch.where(noised[:, None, None, None], CosineSchedule().add_noise(semantic, t, torch.randn_like(semantic)),
                                   semantic)
        semantic = semantic * (torch.rand(b, device=self.device) >= h.semantic_drop_prob)[:, None, None, None]
        if text is not None:
            drop = (torch.rand(b, device=self.device) < h.text_drop_prob)[:, None, None]
            text = torch.where(drop, self.text_encoder.empty(b).to(text), text)
        return semantic, text

    # -- training -------------------------------------------------------------------------------
    def denoiser(self, network):
        h = self.hparams
        return denoiser_for(network, logsnr_shift=self.logsnr_shift, loss_weight=h.loss_weight,
                            sigmoid_bias=h.sigmoid_bias)

    def loss(self, model, x0, semantic, text, t, noise) -> torch.Tensor:
        return self.denoiser(model).loss(x0, t, noise, semantic, text)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        self.semantic_size = images.shape[-2]
        text = self.text_encoder(batch["caption"]) if self.text_encoder is not None else None
        semantic, text = self.augment(self.semantic(batch), text)
        x0 = self.pixels(images)
        t = torch.rand(images.shape[0], device=self.device)
        return self.log_training_loss(self.loss(self.model, x0, semantic, text, t, torch.randn_like(x0)))

    def on_train_batch_start(self, batch, batch_idx) -> None:
        h = self.hparams
        if h.phase == 2 and h.mode == "freeze_unfreeze" and not self.unfrozen and self.global_step >= h.unfreeze_step:
            self.plan = freeze_plan(self.model, "freeze_unfreeze", unfrozen=True)
            self.unfrozen = True

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            update_ema(self.ema, self.model, warmup_decay(self.hparams.ema_decay, self.global_step))

    def configure_optimizers(self):
        h = self.hparams
        # freeze_unfreeze hands every parameter to the optimizer: frozen ones get no gradient (AdamW
        # skips them, weight decay included) until they are unfrozen. Greedy gives only the trained ones.
        trained = set(self.plan["trained"])
        params = [p for n, p in self.model.named_parameters() if h.mode == "freeze_unfreeze" or n in trained]
        opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay, betas=(0.9, 0.95))
        return with_schedule(opt, h.warmup_steps, h.lr_schedule, self.trainer.max_steps if self.trainer else -1)

    # -- checkpoints ----------------------------------------------------------------------------
    def trained_on(self) -> dict[str, tuple[str, str]]:
        return {"compressor_fingerprint": (self.compressor_fingerprint, "semantic compressor")}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint.update(self.settings())

    def settings(self) -> dict:
        """What sampling and later phases need besides the weights."""
        h = self.hparams
        return {"phase": h.phase, "mode": h.mode if h.phase == 2 else ("phase1" if h.phase == 1 else "unfreeze"),
                "resolution": self.resolution, "logsnr_shift": self.logsnr_shift,
                "latent_shift": h.latent_shift, "latent_scale": h.latent_scale, "text_encoder": h.text_encoder,
                "semantic_size": self.semantic_size, "loss_weight": h.loss_weight, "sigmoid_bias": h.sigmoid_bias,
                "init_from": h.init_from, "init_fingerprint": self.init_fingerprint, **self.init_cost,
                "diffusion": self.denoiser(self.eval_model).describe()}

    # -- validation -----------------------------------------------------------------------------
    def decoder(self) -> PixelDecoder:
        h = self.hparams
        return PixelDecoder(self.eval_model, h.latent_shift, h.latent_scale, self.logsnr_shift, self.semantic_size,
                            self.text_encoder, self.compressor_fingerprint)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        images = batch["image"]
        if self.semantic_size is None:
            self.semantic_size = images.shape[-2]
        semantic = self.normalize(self.compressor(images))
        text = self.text_encoder(batch["caption"]) if self.text_encoder is not None else None
        x0 = self.pixels(images)
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)  # the same noise at every validation
        t = torch.rand(x0.shape[0], generator=gen, device=self.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        self.log("val/loss", self.loss(self.eval_model, x0, semantic, text, t, noise), prog_bar=True)
        if not h.sample_steps:
            return
        raw = semantic * h.latent_scale - h.latent_shift  # the decoder takes raw latents, as from Stage C
        recon = self.decoder().render(raw, tuple(x0.shape[-2:]), batch["caption"], h.sample_steps, h.guidance, gen)
        real = (x0 + 1) / 2
        self.val_psnr(recon, real)
        self.log("val/psnr", self.val_psnr, prog_bar=True)
        if batch_idx == 0 and h.grid_images and self.trainer.is_global_zero:
            n = min(h.grid_images, images.shape[0])
            out = self.run_dir / "samples" / f"semantic_recon_step{self.global_step:07d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            save_image(torch.cat([real[:n], recon[:n]]), out, nrow=n, padding=2, pad_value=1.0)

    def export(self) -> Path | None:
        """``<run>/model.safetensors`` (EMA weights) with the config and ``settings()`` in the metadata (rank 0)."""
        if not self.trainer.is_global_zero:
            return None
        extra = {**self.export_metadata(), **self.settings(), "compressor_fingerprint": self.compressor_fingerprint,
                 "compressor_path": self.compressor_path}
        return save_safetensors(self.eval_model, self.run_dir / "model.safetensors", STAGE,
                                self.eval_model.config.to_dict(), overwrite=True, extra=extra)
