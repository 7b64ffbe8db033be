"""Training a ControlNet on a frozen Stage C (v2 or Stable Cascade's), as a configuration of the diffusion
engine (Stable Cascade ``train/train_c_controlnet.py``).

Only the ControlNet trains; Stage C is frozen and its activations are recomputed in the backward pass
(``checkpointing``). Target: the frozen compressor's latents, normalised as Stage C was trained. Conditions:
the text (dropped to the empty prompt with ``text_drop_prob``, for guidance) and the control, computed per
sample from the training image (``imagedata.filters``): canny edges; the inpainting control with a random
mask (a share ``outpaint_prob`` of them outpainting masks, fixed masks in validation); or the
super-resolution control, the compressor's latents of the 2x downscaled image. The process is Stage C's
own: its recorded denoiser (v2), or gdf's with P2 weights (v3); ``loss_weight`` may replace the weight only
(a departure from the release: P2 weights the high-noise steps, where the control tells most about the
image, by their eps error, which is small there). Validation: the loss at fixed noise and,
given a decoder (``stage_b``), a grid: the val images, their controls, images sampled for their captions
with the ControlNet and, same noise, without it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffusion import LOSS_WEIGHTS, CosineSchedule, Denoiser
from imagedata.filters import random_masks
from pipeline.cascade import load_any_decoder, load_any_prior
from pipeline.cascade_conditioning import split
from pipeline.controlnet import control_of
from stages.controlnet import STAGE, ControlledStageC, ControlNet, check_fits, controlnet_config
from weights.checkpoint import fingerprint, read_metadata, resolve_checkpoint, save_tensors
from train.engine import DiffusionTraining, Latents, TextCondition, compressor_for


@dataclass
class ControlCondition:
    """The control of each training image (``pipeline.controlnet.control_of``), or with a frozen encoder
    (``train_encoder: false``) its features. Canny and sr controls (or their features) are cached per sample
    with ``cache_latents`` (they do not change); inpainting masks are drawn anew each step (fixed in validation)."""
    kind: str
    outpaint_prob: float = 0.4

    def control(self, engine: "ControlNetTraining", batch: dict, train: bool = False) -> torch.Tensor:
        images = batch["image"]
        if self.kind != "inpaint":
            return control_of(self.kind, images, compressor=engine.compressor)
        generator = None if train else torch.Generator().manual_seed(0)  # the same val masks every time
        masks = random_masks(images.shape[0], *images.shape[-2:], generator, self.outpaint_prob)
        return control_of("inpaint", images, masks.to(images.device), engine.compressor,
                          engine.model.config.takes_latents)

    def __call__(self, engine: "ControlNetTraining", batch: dict, train: bool) -> torch.Tensor:
        frozen = not engine.model.config.train_encoder
        if self.kind == "inpaint":
            control = self.control(engine, batch, train)
            if not frozen:
                return control
            with torch.no_grad():
                return engine.model.encode(control)

        def encode(images: torch.Tensor) -> torch.Tensor:
            control = control_of(self.kind, images, compressor=engine.compressor)
            return engine.model.encode(control) if frozen else control
        return engine.frozen_encoding(f"{'features' if frozen else 'control'}_{self.kind}", batch, encode, train)


class ControlNetTraining(DiffusionTraining):
    """``stage_c``: the Stage C to steer (an export or run folder, v2 or v3; frozen); ``control``: canny,
    inpaint or sr; ``size``: a ControlNet preset (``tiny`` for the tiny v2 Stage C, ``sc_tiny`` for the tiny
    v3 one, ``paper``, ``sc_big``) or its fields; ``compressor``: the one Stage C was trained on.
    ``pretrained``: the control encoder starts from ImageNet weights (``weights``: a local file for
    EfficientNetV2-S). ``stage_b``: a decoder (v2 or v3, on the same compressor) for validation grids.
    ``loss_weight``: the weight over noise levels (``diffusion.LOSS_WEIGHTS``; ``v_mse`` weighs each step by its
    x_0 error, about); ``None`` keeps Stage C's own."""

    stage = STAGE
    frozen = ("stage_c.", "compressor.", "text_encoder.", "decoder.")
    grid_name = "controlnet"

    def __init__(self, stage_c: str = "checkpoints/tiny/stage_c.safetensors", control: str = "canny",
                 size: str | dict = "tiny", compressor: str = "checkpoints/tiny/compressor.safetensors",
                 stage_b: str | None = None, outpaint_prob: float = 0.4, text_drop_prob: float = 0.05,
                 checkpointing: bool = True, ema_decay: float | None = 0.99, sample_steps: int = 20,
                 guidance: float = 4.0, decoder_steps: int = 12, grid_images: int = 8, cache_latents: bool = False,
                 pretrained: bool = True, weights: str | None = None, init_from: str | None = None,
                 loss_weight: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        if loss_weight is not None and loss_weight not in LOSS_WEIGHTS:
            raise ValueError(f"a ControlNet trains with loss_weight null (Stage C's own) or one of "
                             f"{sorted(LOSS_WEIGHTS)}, got {loss_weight!r}")
        config = controlnet_config(size, control)
        stage_c_path = resolve_checkpoint(stage_c)
        self.version = read_metadata(stage_c_path).get("stage", "stage_c")
        self.prior = load_any_prior(stage_c_path)
        self.stage_c = self.prior.model.requires_grad_(False)
        self.stage_c_path = str(stage_c_path.resolve())
        self.stage_c_fingerprint = fingerprint(self.stage_c)
        check_fits(config, self.stage_c, f"a ControlNet of size {size!r}", f"Stage C {stage_c}")
        self.text_encoder = self.prior.text_encoder
        self.compressor = compressor_for(compressor, self.stage_c.config.c_latent, "Stage C")
        compressor_fp = fingerprint(self.compressor)
        if self.prior.compressor_fingerprint not in (None, compressor_fp):
            raise ValueError(f"Stage C {stage_c} was trained on another semantic compressor than {compressor}; pass "
                             "the compressor Stage C was trained on")
        self.model = ControlNet(config, pretrained=pretrained, weights=weights)
        self.start_from(init_from, controlnet_config, self.trained_on())
        self.decoder = None
        if stage_b:
            if read_metadata(resolve_checkpoint(stage_b)).get("compressor_fingerprint") not in (None, compressor_fp):
                raise ValueError(f"Stage B {stage_b} was trained on another semantic compressor than {compressor}; "
                                 "pass a Stage B trained on Stage C's compressor (or stage_b null)")
            self.decoder = load_any_decoder(stage_b).requires_grad_(False)  # a v2 or v3 Stage B on that compressor
        shift, scale = (0.0, 1.0) if self.version == "stage_c3" else (self.prior.latent_shift, self.prior.latent_scale)
        self.target = Latents("semantic", shift, scale)
        self.conditions = [TextCondition(text_drop_prob), ControlCondition(control, outpaint_prob)]
        self.setup_parts(ema_decay)

    def inputs(self, batch: dict, train: bool):
        x0, (text, control) = super().inputs(batch, train)
        texts = list(split(text)) if self.version == "stage_c3" else [text]
        return x0, [*texts, control]

    def denoiser(self, network: ControlNet) -> Denoiser:
        """Stage C steered by ``network``, read as Stage C is (v3: gdf's training schedule, P2 weights), weighted by
        ``loss_weight`` where given."""
        steered = ControlledStageC(self.stage_c, network, self.hparams.checkpointing,
                                   encoded=not network.config.train_encoder)
        weight = self.hparams.loss_weight
        if self.version == "stage_c3":
            return Denoiser(steered, self.stage_c.config.prediction, CosineSchedule(clamp_shifted=True), weight or "p2",
                            time_input=self.prior.time_input)
        own = self.prior.denoiser
        return Denoiser(steered, own.parameterisation, own.schedule, weight or own.loss_weight, own.sigmoid_bias,
                        own.time_input)

    @torch.no_grad()
    def validation_images(self, batch: dict, batch_idx: int, gen: torch.Generator):
        """Batch 0 only: val images, their controls, sampled with the ControlNet and without (same noise)."""
        if batch_idx or self.decoder is None or not self.hparams.grid_images:
            return None
        h = self.hparams
        n = min(h.grid_images, len(batch["caption"]))
        sub = {k: v[:n] for k, v in batch.items()}
        _, conditions = self.inputs(sub, train=False)
        model = self.eval_model
        features = model(conditions[-1]) if model.config.train_encoder else model.project(conditions[-1])
        control = self.conditions[-1].control(self, sub)
        images, captions, grid = sub["image"], sub["caption"], self.compressor.latent_grid(*sub["image"].shape[-2:])
        rows = []
        for steer in (features, None):
            generator = torch.Generator(device=self.device).manual_seed(0)
            latents = self.prior.sample(captions, [""] * n, grid, h.sample_steps, h.guidance, generator,
                                        progress=False, control=steer)
            rows.append(self.decoder(latents, images.shape[-2:], captions, h.decoder_steps, 1.0, generator))
        if not model.config.takes_latents:
            shown = control[:, :3] if control.shape[1] >= 3 else control.expand(-1, 3, -1, -1)
        else:  # latents: the inpainting mask's share per cell, or sr's first channel
            shown = control[:, -1:] if h.control == "inpaint" else control[:, :1]
            shown = shown.expand(-1, 3, -1, -1)
        shown = F.interpolate(shown.float(), size=images.shape[-2:], mode="nearest")
        return images, rows[0], shown, rows[1]

    def export(self) -> Path | None:
        """``<run>/model.safetensors``: the EMA ControlNet (without a frozen encoder) and what it was trained for."""
        if not self.trainer.is_global_zero:
            return None
        return save_tensors(self.eval_model.trained_state_dict(), self.run_dir / "model.safetensors", self.stage,
                            self.eval_model.config.to_dict(), overwrite=True, extra=self.export_metadata())

    def export_metadata(self) -> dict:
        h = self.hparams
        return {**super().export_metadata(), **self.init_cost, "control": h.control, "stage_c_path": self.stage_c_path,
                "stage_c_stage": self.version, "compressor_fingerprint": fingerprint(self.compressor),
                "text_encoder": read_metadata(Path(self.stage_c_path)).get("text_encoder")}
