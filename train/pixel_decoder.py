"""Training the greedy-grown pixel decoder (Greedy Growing paper Sec. 3.2-3.3, 4) as a configuration of
the diffusion engine; each phase is its own CLI run and config (``configs/pixel_decoder/``):

* ``phase: 1``: the Shallow-UViT at its low ``resolution``; images load at the sampler's size (the
  compressor's latents come from them) and are downsampled to ``resolution`` for the target.
* ``phase: 2``: grows the phase-1 model (``init_from``) to the target ``resolution`` on the shifted
  schedule (logSNR + 2 log(base / d)), on images at least that size (``data.min_size``). ``mode``:
  ``greedy`` (core and condition encoders frozen; the paper's recipe), ``finetune`` (nothing frozen),
  ``scratch`` (grown architecture, random weights), ``freeze_unfreeze`` (greedy until ``unfreeze_step``).
* ``phase: 3`` (optional): continues a grown model (``init_from`` a phase-2 export), all trainable.

Target: the images in [-1, 1]; conditions as for Stage B. ``loss_weight``: ``constant`` (eps-MSE),
``v_mse``, ``p2`` or SiD2's ``sigmoid`` (``sigmoid_bias``). Validation decodes the val images from
their own semantic latents (PSNR, grid).
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from diffusion import check_loss_weight, logsnr_shift as shift_for_resolution
from weights.checkpoint import fingerprint
from common.state_dict import load_into
from pipeline.decoders import PixelDecoder
from stages.pixel_decoder import (MODES, STAGE, GrownUViT, ShallowUViT, build_pixel_model, check_core_match,
                                  freeze_plan, grow, pixel_decoder_config)
from train.engine import (DiffusionTraining, Pixels, SemanticCondition, TextCondition, compressor_for,
                          initial_weights, text_encoder_for, training_cost)


class PixelDecoderTraining(DiffusionTraining):
    """``size``: a preset (``tiny``, ``paper``) or its fields: the phase-1 architecture and the growth plan
    (``level_*``). ``resolution``: the side trained at (phase 1: the size's; phase 2: the target,
    required). ``compressor``: the trained compressor the Stage C to pair with was trained on.
    ``logsnr_shift``: None = 2 log(base / resolution) (phase 3: the shift phase 2 trained with)."""

    stage = STAGE
    frozen = ("compressor.", "text_encoder.")  # rebuilt on load, never saved
    paired_metrics = True
    grid_name = "semantic_recon"

    def __init__(self, size: str | dict = "tiny", phase: int = 1, mode: str = "greedy", init_from: str | None = None,
                 resolution: int | None = None, unfreeze_step: int | None = None,
                 compressor: str = "runs/stage_b/tiny", text_encoder: str | None = None,
                 latent_shift: float = 0.0, latent_scale: float = 1.0,
                 loss_weight: str = "constant", sigmoid_bias: float = 0.0, logsnr_shift: float | None = None,
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
        if phase == 2 and resolution is None:
            raise ValueError("phase 2 needs resolution: the target image side to grow to (e.g. 128)")
        config = pixel_decoder_config(size)
        self.compressor = compressor_for(compressor, config.c_semantic, "the pixel decoder")
        self.compressor_path = str(Path(compressor).resolve())  # recorded absolute, as every path in an export
        self.compressor_fingerprint = fingerprint(self.compressor)
        self.text_encoder = text_encoder_for(text_encoder, config.c_text, f"pixel decoder size {size!r}")
        self.init_fingerprint: str | None = None
        self.init_cost: dict = {}
        self.model, inherited_shift = self.build(config)
        self.resolution = self.model.config.target_resolution if phase > 1 else self.model.config.resolution
        if logsnr_shift is None:  # 2 log(base / d), base the phase-1 side: 0 in phase 1
            logsnr_shift = inherited_shift if inherited_shift is not None else \
                shift_for_resolution(self.model.config.resolution, self.resolution)
        self.logsnr_shift = float(logsnr_shift)
        # greedy freezes by requires_grad; freeze_unfreeze trains everything but drops the held parameters'
        # gradients until unfreeze_step (so DDP syncs the same parameters throughout)
        self.held = set(freeze_plan(self.model, "greedy")["frozen"]) if phase == 2 and mode == "freeze_unfreeze" else set()
        freeze_plan(self.model, mode if phase == 2 and mode != "freeze_unfreeze" else "finetune")
        self.semantic_size: int | None = None
        self.target = Pixels(self.resolution)
        self.conditions = [SemanticCondition(latent_shift, latent_scale, semantic_noise_prob, semantic_noise_max_t,
                                             semantic_drop_prob), TextCondition(text_drop_prob)]
        self.setup_parts(ema_decay)

    def build(self, config) -> tuple[ShallowUViT | GrownUViT, float | None]:
        """Each phase's network (and, for phase 3, the logSNR shift phase 2 trained with)."""
        h = self.hparams
        if h.phase == 1:
            if h.init_from:
                raise ValueError("phase 1 trains the Shallow-UViT from scratch; drop init_from (to continue a run, "
                                 "pass --ckpt_path its last.ckpt)")
            return ShallowUViT(replace(config, resolution=h.resolution or config.resolution)), None
        if h.phase == 2 and h.mode == "scratch":
            if h.init_from:
                raise ValueError("mode scratch trains the grown model from random weights; drop init_from "
                                 "(greedy, finetune and freeze_unfreeze start from it)")
            return GrownUViT(replace(config, target_resolution=h.resolution)), None
        if not h.init_from:
            raise ValueError(f"phase {h.phase} ({h.mode}) starts from a checkpoint: set init_from to the "
                             f"{'phase 1' if h.phase == 2 else 'phase 2'} export or run folder")
        state, stored, meta = initial_weights(h.init_from, STAGE, {
            "compressor_fingerprint": (self.compressor_fingerprint, "semantic compressor")})
        path = meta["path"]
        if stored is None:
            raise ValueError(f"{path} carries no pixel decoder config")
        stored = pixel_decoder_config(stored)
        self.init_cost = training_cost(meta)
        if h.phase == 2:
            if stored.grown:
                raise ValueError(f"{path} is already a grown (phase 2) model; phase 2 starts from a phase 1 export "
                                 "(use phase 3 to keep training a grown model)")
            check_core_match(config, stored, path)
            phase1 = load_into(ShallowUViT(stored), state, path)
            self.init_fingerprint = fingerprint(phase1)
            return grow(phase1, h.resolution, config), None
        if not stored.grown:
            raise ValueError(f"{path} is a phase 1 (Shallow-UViT) model; phase 3 continues a grown (phase 2) one")
        if h.resolution is not None and h.resolution != stored.target_resolution:
            raise ValueError(f"{path} was grown to {stored.target_resolution} px; resolution is {h.resolution}")
        model = load_into(build_pixel_model(stored), state, path)
        self.init_fingerprint = fingerprint(model)
        return model, meta.get("logsnr_shift")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.semantic_size = batch["image"].shape[-2]
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.held and self.global_step < self.hparams.unfreeze_step:
            for name, p in self.model.named_parameters():
                if name in self.held:
                    p.grad = None  # no update, weight decay included

    def validation_images(self, batch: dict, batch_idx: int, gen: torch.Generator):
        h, images = self.hparams, batch["image"]
        self.semantic_size = self.semantic_size or images.shape[-2]
        real = (self.target(self, batch, False) + 1) / 2
        decoder = PixelDecoder(self.eval_model, h.latent_shift, h.latent_scale, self.logsnr_shift, self.semantic_size,
                               self.text_encoder, self.compressor_fingerprint)
        semantic = self.encode("semantic", batch, False)  # raw latents, as from Stage C
        return real, decoder.render(semantic, tuple(real.shape[-2:]), batch["caption"], h.sample_steps, h.guidance, gen)

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

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), **self.settings(), "compressor_path": self.compressor_path}
