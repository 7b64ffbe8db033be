"""Training the single-stage baseline (Würstchen paper Sec. 4, "Baseline LDM") as a configuration of the
diffusion engine, the same engine, data, text encoder and process layer as Stage C.

Target: the frozen Stage A's unquantised latents. Condition: the text states, replaced by the empty
prompt's 5% of the time (classifier-free guidance, as Stage C). Loss: the v-MSE of the U-Net's v head
(``loss_weight: v_mse``). Validation: the loss at fixed noise and a grid of images sampled for the val
captions (text -> U-Net -> Stage A).
"""
from __future__ import annotations

import torch

from pipeline.baseline_ldm import BaselineTextToImage
from stages.baseline_ldm import STAGE, BaselineLDM, baseline_ldm_config
from train.engine import DiffusionTraining, Latents, TextCondition, text_encoder_for


class BaselineLDMTraining(DiffusionTraining):
    """``size``: a preset (``tiny``, ``paper``) or its fields. ``stage_a``: a trained Stage A (export, ``.ckpt``
    or run folder; frozen). ``text_encoder``: a name or ``{name: open_clip, ...}`` of the width ``c_text``.
    ``cache_latents``: encode each training image once (whole images only). ``sample_steps`` and
    ``guidance``: the validation grid's sampler settings (Stage C's defaults: 60 and 4). ``latent_scale``: Stage A's
    latents are divided by it, to about unit variance as latent diffusion models train (Rombach et al. 2022,
    Sec. 3.3; the tiny Stage A's latents have a std of about 2.5)."""

    stage = STAGE
    frozen = ("stage_a.", "text_encoder.")  # rebuilt on load, never saved
    grid_name = "text_to_image"

    def __init__(self, size: str | dict = "tiny", stage_a: str = "checkpoints/tiny/stage_a.safetensors",
                 text_encoder: str | dict = "minilm", loss_weight: str = "v_mse", text_drop_prob: float = 0.05,
                 ema_decay: float | None = 0.995, sample_steps: int | str = 60, guidance: float = 4.0,
                 grid_images: int = 8, cache_latents: bool = False, latent_scale: float = 1.0):
        super().__init__()
        self.save_hyperparameters()
        config = baseline_ldm_config(size)
        self.use_stage_a(stage_a, config.c_latent, "baseline LDM")
        self.text_encoder = text_encoder_for(text_encoder, config.c_text, f"baseline LDM size {size!r}")
        self.compressor = None
        self.model = BaselineLDM(config)
        self.init_cost: dict = {}
        self.target = Latents("stage_a", 0.0, latent_scale)
        self.conditions = [TextCondition(text_drop_prob)]
        self.setup_parts(ema_decay)

    def validation_images(self, batch: dict, batch_idx: int, gen: torch.Generator):
        """Batch 0 only: text -> baseline -> Stage A for the first captions."""
        h = self.hparams
        if batch_idx or not h.grid_images:
            return None
        n = min(h.grid_images, len(batch["caption"]))
        images, captions = batch["image"][:n], batch["caption"][:n]
        pipe = BaselineTextToImage(self.eval_model, self.stage_a, self.text_encoder,
                                   self.denoiser(self.eval_model).describe(), h.latent_scale)
        return images, pipe(captions, "", *images.shape[-2:], 1, h.sample_steps, h.guidance, 0, progress=False)

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), "stage_a_path": self.stage_a_path,
                "stage_a_config": self.stage_a.config.to_dict(), "text_encoder": self.hparams.text_encoder, "latent_scale": self.hparams.latent_scale}
