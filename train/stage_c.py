"""Training Stage C, the text-to-latent prior (Würstchen paper Sec. 3.2 and App. E.3), as a configuration
of the diffusion engine.

Target: the frozen compressor's latents, (x + shift) / scale (the release: 1 and 42). Condition: the
text states, replaced by the empty prompt's 5% of the time (classifier-free guidance). Loss: the
p2-weighted eps-MSE of the prior's A/B head. Validation: the loss at fixed noise and, given a Stage B
or a previewer, a grid of images sampled for the val captions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from weights.checkpoint import fingerprint
from pipeline.decoders import load_semantic_decoder
from pipeline.text_to_image import Prior
from weights.loaders import load_previewer
from stages.stage_c import StageC, stage_c_config
from train.engine import DiffusionTraining, Latents, TextCondition, compressor_for, text_encoder_for


class PriorValidation:
    """The validation grid of a prior (v2's and v3's Stage C): text -> prior -> Stage B -> Stage A for the first
    captions of batch 0, and their previews (a row below, or the only one without Stage B) when a previewer is
    given. A prior supplies ``sample_grid_latents(captions, size, generator)`` (its sampled latents on its
    compressor's grid) and ``decoder_guidance``."""

    decoder_guidance = 1.0

    def validation_images(self, batch: dict, batch_idx: int, gen: torch.Generator):
        h = self.hparams
        if batch_idx or (self.decoder is None and self.previewer is None) or not h.grid_images:
            return None
        n = min(h.grid_images, len(batch["caption"]))
        images, captions = batch["image"][:n], batch["caption"][:n]
        gen = torch.Generator(device=self.device).manual_seed(0)
        latents = self.sample_grid_latents(captions, images.shape[-2:], gen)
        rows = [] if self.decoder is None else [self.decoder(latents, images.shape[-2:], captions, h.decoder_steps,
                                                             self.decoder_guidance, gen)]
        if self.previewer is not None:
            rows.append(F.interpolate(self.previewer(latents), size=images.shape[-2:], mode="nearest"))
        return images, *rows


class StageCTraining(PriorValidation, DiffusionTraining):
    """``size``: a preset (``tiny``, ``paper``, ``release``) or its fields. ``compressor``: the trained
    compressor (``compressor.safetensors`` or the Stage B run folder). ``stage_b``: optional Stage B
    (file or run folder) for validation grids. ``cache_latents``: encode each training image once
    (whole images only). ``text_encoder``: a name or ``{name: open_clip, model: ..., pretrained: ...}``.
    ``sample_steps``: a number or a named time list (``diffusion.TIME_LISTS``). ``latent_shift`` /
    ``latent_scale``: the release's 1 and 42 suit its compressor (latent std about 42); ours need 0 and 1.
    ``init_from``, ``lora``: as for Stage B. ``previewer``: a trained previewer (same compressor) adds a
    row of the sampled latents' previews to the validation grid."""

    stage = "stage_c"
    frozen = ("compressor.", "text_encoder.", "decoder.", "previewer.")  # rebuilt on load, never saved
    grid_name = "text_to_image"

    def __init__(self, size: str | dict = "tiny", compressor: str = "runs/stage_b/tiny",
                 text_encoder: str | dict = "minilm", stage_b: str | None = None, loss_weight: str = "paper_p2",
                 text_drop_prob: float = 0.05, ema_decay: float | None = 0.999, sample_steps: int | str = 60,
                 guidance: float = 4.0, decoder_steps: int = 12, grid_images: int = 8, cache_latents: bool = False,
                 latent_shift: float = 1.0, latent_scale: float = 42.0, init_from: str | None = None,
                 lora: dict | None = None, previewer: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        config = stage_c_config(size)
        self.compressor = compressor_for(compressor, config.c_latent, "Stage C")
        self.compressor_fingerprint = fingerprint(self.compressor)
        self.text_encoder = text_encoder_for(text_encoder, config.c_text, f"Stage C size {size!r}")
        self.model = StageC(config)
        self.start_from(init_from, stage_c_config, self.trained_on(), {
            "latent_shift": latent_shift, "latent_scale": latent_scale, "text_encoder": text_encoder})
        self.decoder = load_semantic_decoder(stage_b).requires_grad_(False) if stage_b else None
        self.previewer = load_previewer(previewer, self.compressor_fingerprint) if previewer else None
        self.target = Latents("semantic", latent_shift, latent_scale)
        self.conditions = [TextCondition(text_drop_prob)]
        self.setup_parts(ema_decay, lora=lora)

    def sample_grid_latents(self, captions: list[str], size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        h = self.hparams
        prior = Prior(self.eval_model, self.text_encoder, h.latent_shift, h.latent_scale,
                      compressor_input_scale=self.compressor.config.input_scale)
        return prior.sample(captions, [""] * len(captions), self.compressor.latent_grid(*size), h.sample_steps,
                            h.guidance, gen, progress=False)

    def export_metadata(self) -> dict:
        h = self.hparams
        return {**super().export_metadata(), **self.init_cost, "text_encoder": h.text_encoder, "latent_shift": h.latent_shift,
                "latent_scale": h.latent_scale, "compressor_input_scale": self.compressor.config.input_scale}
