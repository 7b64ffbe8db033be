"""Training Stage B (Würstchen paper Sec. 3.1 and App. E.2) as a configuration of the diffusion engine.

Target: the frozen Stage A's unquantised latents. Conditions: the semantic compressor's latents
(trained with Stage B; noised at a small random t 30% of the time, zeroed 10%) and optional text
(dropped 10%). Loss: the p2-weighted eps-MSE of the released decoder's A/B head. Validation:
image -> compressor -> Stage B (12 DDPM steps) -> Stage A, scored by PSNR, LPIPS and FID.
"""
from __future__ import annotations

import torch

from weights.checkpoint import fingerprint, save_safetensors
from pipeline.decoders import SemanticDecoder
from stages.stage_b import StageB, stage_b_config
from train.engine import DiffusionTraining, compressor_for, text_encoder_for


class StageBTraining(DiffusionTraining):
    """``size``: a preset (``tiny``, ``paper``) or its fields. ``stage_a``: a trained Stage A (export,
    ``.ckpt`` or run folder). ``compressor``: ``SemanticCompressor`` arguments (trained with Stage B), or a
    trained ``compressor.safetensors`` / Stage B run folder (kept frozen: refinement, as in
    ``configs/stage_b/tiny_refine.yaml``). ``text_encoder``: a name or null (matching ``c_text``).
    ``init_from``: a Stage B to continue from (same size, Stage A and compressor). ``lora``: ``{rank, alpha,
    target_modules, dropout}``: train LoRA adapters on the frozen network (export ``adapter.safetensors``).
    ``cache_latents``: encode each training image once (frozen compressor, whole images; with only the
    compressor's head trainable, its backbone features)."""

    stage = "stage_b"
    frozen = ("stage_a.", "text_encoder.", "perceptual.", "val_fid.")  # rebuilt on load, never saved
    paired_metrics = True
    grid_name = "semantic_recon"

    def __init__(self, size: str | dict = "tiny", stage_a: str = "runs/stage_a/tiny",
                 compressor: dict | str | None = None, text_encoder: str | None = None,
                 init_from: str | None = None, cache_latents: bool = False, loss_weight: str = "paper_p2",
                 semantic_noise_prob: float = 0.3, semantic_noise_max_t: float = 0.3,
                 semantic_drop_prob: float = 0.1, text_drop_prob: float = 0.1,
                 ema_decay: float | None = 0.999, sample_steps: int = 12, guidance: float = 1.0,
                 grid_images: int = 8, metric_net: str = "alex", val_fid: bool = True, lora: dict | None = None,
                 prior_samples: str | list[str] | None = None, prior_samples_prob: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        config = stage_b_config(size)
        self.use_stage_a(stage_a, config.c_latent, "Stage B")
        self.text_encoder = text_encoder_for(text_encoder, config.c_text, f"Stage B size {size!r}")
        self.compressor = compressor_for(compressor, config.c_semantic, "Stage B")
        if cache_latents and self.compressor.trainable == "all":
            raise ValueError("cache_latents needs a frozen compressor backbone: set compressor to a trained "
                             "compressor.safetensors or Stage B run folder, or its trainable to 'head'")
        self.setup_decoder(StageB(config), stage_b_config, init_from, semantic_noise_prob, semantic_noise_max_t,
                           semantic_drop_prob, text_drop_prob, prior_samples, prior_samples_prob)
        self.setup_parts(ema_decay, metric_net, val_fid, lora)

    def validation_images(self, batch: dict, batch_idx: int, gen: torch.Generator):
        images, h = batch["image"], self.hparams
        semantic = self.eval_compressor(images)
        decoder = SemanticDecoder(self.eval_model, self.stage_a, self.text_encoder)
        return images, decoder(semantic, images.shape[-2:], batch["caption"], h.sample_steps, h.guidance, gen)

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), **self.init_cost, "stage_a_path": self.stage_a_path,
                "stage_a_config": self.stage_a.config.to_dict(), "text_encoder": self.hparams.text_encoder,
                "compressor_config": self.compressor.config.to_dict(),
                "compressor_fingerprint": fingerprint(self.eval_compressor)}

    def export(self):
        """``<run>/model.safetensors`` (Stage B, EMA) and ``<run>/compressor.safetensors`` (rank 0)."""
        path = super().export()
        if path is not None:
            save_safetensors(self.eval_compressor, path.with_name("compressor.safetensors"), "semantic_compressor",
                             self.compressor.config.to_dict(), overwrite=True, extra=self.run_metadata())
        return path
