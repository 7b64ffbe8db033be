"""Training Stable Cascade's (Würstchen v3) Stage C and Stage B as configurations of the diffusion engine
(StableCascade ``train/train_c.py``, ``train/train_b.py``, ``gdf``).

Process: the noise is the target (``eps`` head); training times t = 1 - u + 0.001 (u ~ U[0, 1)), clamped to
[0.001, 1], on the cosine schedule clamped to [1e-4, 0.9999] at shift 1; the network sees the cosine time
recovered from the logSNR; the loss weight is P2 ((1 + SNR)^-1, ``p2``) or the adaptive weight
(``adaptive``: per-logSNR-bucket EMAs of the loss, saved in checkpoints and restored on resume).
Stage B trains on pyramid noise. The compressor's latents are used as they come (no normalisation).

Stage C: target the frozen compressor's latents; conditions the text states and pooled embedding of a
pooled text encoder (``pipeline.cascade_conditioning``), replaced by the empty prompt's with probability
``text_drop_prob``; no image embeddings (the release's optional CLIP image slot gets its zeros).
Stage B: target the frozen Stage A's latents; conditions the frozen compressor's latents (noised and
dropped as for v2's Stage B) and the pooled text embedding (dropped with ``text_drop_prob``).
Precomputed shards hold v2's text states only: v3 trains from images.
"""
from __future__ import annotations

import torch

from diffusion import AdaptiveLossWeight, CosineSchedule, Denoiser, pyramid_noise
from pipeline.cascade_conditioning import build_pooled_text_encoder, split
from pipeline.cascade import RELEASE, CascadeDecoder, CascadePrior, load_cascade_decoder
from weights.checkpoint import fingerprint
from weights.loaders import load_previewer
from stages.stable_cascade import StageB3, StageC3, stage_b3_config, stage_c3_config
from train.engine import DiffusionTraining, Latents, TextCondition, compressor_for
from train.stage_c import PriorValidation

LOSS_WEIGHTS = ("adaptive", "p2")  # the release's two (gdf AdaptiveLossWeight, P2LossWeight)


class CascadeTraining(DiffusionTraining):
    """What both Stable Cascade stages share: the gdf process, the adaptive weight's state, pooled text."""

    def setup_process(self, loss_weight: str) -> None:
        if loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"Stable Cascade trains with loss_weight {' or '.join(LOSS_WEIGHTS)}, got {loss_weight!r}")
        self.adaptive_weight = AdaptiveLossWeight() if loss_weight == "adaptive" else None

    def pooled_text_encoder(self, name: str | dict, widths: set[int], what: str):
        encoder = build_pooled_text_encoder(name)
        if {encoder.dim} != widths:
            raise ValueError(f"{what} expects text of width {sorted(widths)}, but text_encoder {name!r} gives "
                             f"{encoder.dim}; pick a matching text_encoder or set c_text/c_pooled in the size")
        return encoder

    def denoiser(self, network) -> Denoiser:
        return Denoiser(network, network.config.prediction, CosineSchedule(clamp_shifted=True), self.hparams.loss_weight,
                        time_input="cosine_t", adaptive=self.adaptive_weight)

    def setup(self, stage: str) -> None:
        if self.trainer and getattr(self.trainer.datamodule, "precomputed", None):
            raise ValueError("precomputed shards hold v2 text states, not Stable Cascade's pooled text; train "
                             "Stable Cascade stages from images (data.train: a folder, shards or openmoji)")

    def training_noise(self, x0: torch.Tensor) -> torch.Tensor:
        return torch.randn_like(x0)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0, conditions = self.inputs(batch, train=True)
        t = (1 - torch.rand(x0.shape[0], device=x0.device)).add(0.001).clamp(0.001, 1.0)  # gdf's training times
        return self.log_training_loss(self.denoiser(self.model).loss(x0, t, self.training_noise(x0), *conditions))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.adaptive_weight is not None:
            checkpoint["adaptive_loss_weight"] = self.adaptive_weight.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if self.adaptive_weight is not None and "adaptive_loss_weight" in checkpoint:
            self.adaptive_weight.load_state_dict(checkpoint["adaptive_loss_weight"])


class StageC3Training(PriorValidation, CascadeTraining):
    """``size``: a preset (``tiny``, ``sc_lite``, ``sc_big``) or its fields. ``compressor``: the trained
    compressor (``compressor.safetensors`` or a Stage B run folder; frozen). ``text_encoder``: ``minilm`` or
    ``{name: clip, path: ...}``. ``stage_b``: optional v3 Stage B (file or run folder) for validation grids,
    ``previewer``: optional previewer (same compressor) for a row of previews. ``init_from``, ``lora``: as v2's."""

    stage = "stage_c3"
    frozen = ("compressor.", "text_encoder.", "decoder.", "previewer.")
    decoder_guidance = RELEASE["decoder"]["guidance"]
    grid_name = "text_to_image"

    def __init__(self, size: str | dict = "tiny", compressor: str = "checkpoints/tiny/compressor.safetensors",
                 text_encoder: str | dict = "minilm", stage_b: str | None = None, loss_weight: str = "adaptive",
                 text_drop_prob: float = 0.05, ema_decay: float | None = 0.999, sample_steps: int = 20,
                 guidance: float = 4.0, decoder_steps: int = 10, grid_images: int = 8, cache_latents: bool = False,
                 init_from: str | None = None, lora: dict | None = None, previewer: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        config = stage_c3_config(size)
        self.setup_process(loss_weight)
        self.compressor = compressor_for(compressor, config.c_latent, "Stage C")
        self.compressor_fingerprint = fingerprint(self.compressor)
        self.text_encoder = self.pooled_text_encoder(text_encoder, {config.c_text, config.c_pooled},
                                                     f"Stage C size {size!r}")
        self.model = StageC3(config)
        self.start_from(init_from, stage_c3_config, self.trained_on(), {"text_encoder": text_encoder})
        self.decoder = load_cascade_decoder(stage_b).requires_grad_(False) if stage_b else None
        self.previewer = load_previewer(previewer, self.compressor_fingerprint) if previewer else None
        self.target = Latents("semantic")
        self.conditions = [TextCondition(text_drop_prob)]
        self.setup_parts(ema_decay, lora=lora)

    def inputs(self, batch: dict, train: bool):
        x0, (packed,) = super().inputs(batch, train)
        return x0, list(split(packed))

    def sample_grid_latents(self, captions: list[str], size: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        h = self.hparams
        return CascadePrior(self.eval_model, self.text_encoder).sample(
            captions, [""] * len(captions), self.compressor.latent_grid(*size), h.sample_steps, h.guidance, gen,
            progress=False)

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), **self.init_cost, "text_encoder": self.hparams.text_encoder,
                "compressor_input_scale": self.compressor.config.input_scale}


class StageB3Training(CascadeTraining):
    """``size``: a preset (``tiny``, ``sc_lite``, ``sc_big``) or its fields. ``stage_a``: a trained Stage A;
    ``compressor``: a trained compressor (frozen, as the release's EfficientNet). ``text_encoder``: as Stage C's
    (only its pooled embedding is used). ``pyramid_noise``: train on pyramid noise (the release). The
    compressor's latents are noised at a random t < ``semantic_noise_max_t`` with probability
    ``semantic_noise_prob`` and zeroed with ``semantic_drop_prob`` (classifier-free guidance)."""

    stage = "stage_b3"
    frozen = ("stage_a.", "compressor.", "text_encoder.", "perceptual.", "val_fid.")
    paired_metrics = True
    grid_name = "semantic_recon"

    def __init__(self, size: str | dict = "tiny", stage_a: str = "checkpoints/tiny/stage_a.safetensors",
                 compressor: str = "checkpoints/tiny/compressor.safetensors", text_encoder: str | dict = "minilm",
                 init_from: str | None = None, cache_latents: bool = False, loss_weight: str = "adaptive",
                 pyramid_noise: bool = True, semantic_noise_prob: float = 0.3, semantic_noise_max_t: float = 0.3,
                 semantic_drop_prob: float = 0.1, text_drop_prob: float = 0.1, ema_decay: float | None = 0.999,
                 sample_steps: int = 10, guidance: float = 1.1, grid_images: int = 8, metric_net: str = "alex",
                 val_fid: bool = True, lora: dict | None = None, prior_samples: str | list[str] | None = None,
                 prior_samples_prob: float = 0.5):
        super().__init__()
        self.save_hyperparameters()
        config = stage_b3_config(size)
        self.setup_process(loss_weight)
        self.use_stage_a(stage_a, config.c_latent, "Stage B")
        if not isinstance(compressor, str):
            raise ValueError("Stable Cascade's Stage B trains on a frozen compressor: set compressor to a trained "
                             "compressor.safetensors or Stage B run folder")
        self.compressor = compressor_for(compressor, config.c_semantic, "Stage B")
        self.text_encoder = self.pooled_text_encoder(text_encoder, {config.c_pooled}, f"Stage B size {size!r}")
        self.setup_decoder(StageB3(config), stage_b3_config, init_from, semantic_noise_prob, semantic_noise_max_t,
                           semantic_drop_prob, text_drop_prob, prior_samples, prior_samples_prob)
        self.setup_parts(ema_decay, metric_net, val_fid, lora)

    def inputs(self, batch: dict, train: bool):
        x0, (semantic, packed) = super().inputs(batch, train)
        return x0, [semantic, split(packed)[1]]

    def training_noise(self, x0: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        return pyramid_noise(noise) if self.hparams.pyramid_noise else noise

    def validation_images(self, batch: dict, batch_idx: int, gen: torch.Generator):
        images, h = batch["image"], self.hparams
        decoder = CascadeDecoder(self.eval_model, self.stage_a, self.text_encoder)
        return images, decoder(self.compressor(images), images.shape[-2:], batch["caption"], h.sample_steps,
                               h.guidance, gen)

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), **self.init_cost, "stage_a_path": self.stage_a_path,
                "stage_a_config": self.stage_a.config.to_dict(), "text_encoder": self.hparams.text_encoder,
                "compressor_fingerprint": fingerprint(self.compressor)}
