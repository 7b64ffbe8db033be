"""Training Stage B (Würstchen paper Sec. 3.2 and App. E.2).

A frozen Stage A encodes each image to its unquantised latents x_0; the semantic compressor
(trainable head, frozen backbone by default) gives the 16-channel condition. Stage B learns to
predict the noise of x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps with a p2-weighted MSE. As in the
paper, the semantic latents are noised at a small random t 30% of the time (so B accepts
imperfect Stage C output) and zeroed 10% of the time (classifier-free guidance); text, when
used, is replaced by the empty prompt 10% of the time.

Refinement (``configs/stage_b/tiny_refine.yaml``): ``init_from`` starts from a trained Stage B and
``compressor`` names the compressor trained with it, which then stays frozen, so a Stage C trained
on that compressor keeps working. With a frozen compressor and whole images (no random crops),
``cache_latents`` computes each image's Stage A and semantic latents once and trains on the cache.

Validation performs semantic reconstruction: image -> compressor latents -> Stage B sampling
(12 DDPM steps) -> Stage A decode, scored by PSNR, LPIPS and FID against the validation images.
"""
from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torchmetrics
from torchvision.utils import save_image

from stages.decoders import SemanticDecoder, stage_b_metadata
from semantic_compressor import SemanticCompressor, load_compressor
from stages.checkpoint import fingerprint, load_into, read_weights, resolve_checkpoint, save_safetensors
from diffusion import CosineSchedule
from stages.denoisers import denoiser_for
from stages.stage_a import load_stage_a
from stages.stage_b import StageB, stage_b_config
from stages.text_encoder import build_text_encoder
from train.ema import make_ema, update_ema, warmup_decay
from stages.metrics import fid_metric
from stages.metrics import Perceptual
from train.export import ExportsWeights
from train.optim import with_schedule


class StageBTraining(ExportsWeights, L.LightningModule):
    """LightningModule for Stage B; ``size`` names a preset (``tiny``, ``paper``) or gives its fields.

    ``stage_a``: a trained Stage A (``model.safetensors``, a ``.ckpt``, or its run folder: the
    newest export under it). ``compressor``: ``SemanticCompressor`` arguments (trained with Stage B),
    or a trained ``compressor.safetensors`` / Stage B run folder (kept frozen). ``text_encoder``:
    ``minilm``, ``open_clip`` or ``null`` (must agree with the preset's ``c_text``). ``init_from``:
    a Stage B export or run folder to continue from (same config, Stage A and compressor).
    ``cache_latents``: keep each training image's latents in memory by sample key (frozen
    compressor and whole images only).
    """

    stage = "stage_b"
    frozen = ("stage_a.", "text_encoder.", "perceptual.", "val_fid.")  # rebuilt on load, never saved

    def __init__(self, size: str | dict = "tiny", stage_a: str = "runs/stage_a/tiny",
                 compressor: dict | str | None = None, text_encoder: str | None = None,
                 init_from: str | None = None, cache_latents: bool = False,
                 lr: float = 1e-4, weight_decay: float = 0.01, warmup_steps: int = 0,
                 lr_schedule: str = "constant", loss_weight: str = "paper_p2",
                 semantic_noise_prob: float = 0.3, semantic_noise_max_t: float = 0.3,
                 semantic_drop_prob: float = 0.1, text_drop_prob: float = 0.1,
                 ema_decay: float | None = 0.999, sample_steps: int = 12, guidance: float = 1.0,
                 grid_images: int = 8, metric_net: str = "alex", val_fid: bool = True):
        super().__init__()
        self.save_hyperparameters()
        config = stage_b_config(size)
        stage_a_path = resolve_checkpoint(stage_a)
        self.stage_a_path = str(stage_a_path.resolve())  # recorded absolute: loads from any working directory
        self.stage_a = load_stage_a(str(stage_a_path)).requires_grad_(False)
        self.stage_a_fingerprint = fingerprint(self.stage_a)
        if self.stage_a.config.latent_channels != config.c_latent:
            raise ValueError(f"Stage A at {stage_a_path} has {self.stage_a.config.latent_channels} latent channels; "
                             f"this Stage B expects {config.c_latent}")
        self.text_encoder = build_text_encoder(text_encoder)
        want_text = config.c_text is not None
        if want_text != (self.text_encoder is not None) or (want_text and self.text_encoder.dim != config.c_text):
            raise ValueError(f"Stage B size {size!r} expects text states of width {config.c_text}, but text_encoder "
                             f"is {text_encoder!r}" + (f" (width {self.text_encoder.dim})" if self.text_encoder else "")
                             + "; pick a matching text_encoder or set c_text in the size")
        if isinstance(compressor, str):
            self.compressor = load_compressor(compressor).requires_grad_(False)
        else:
            self.compressor = SemanticCompressor(**(compressor or {}))
        if self.compressor.config.latent_channels != config.c_semantic:
            raise ValueError(f"the compressor gives {self.compressor.config.latent_channels} channels; "
                             f"Stage B expects {config.c_semantic}")
        if cache_latents and self.compressor.trainable != "none":
            raise ValueError("cache_latents needs a frozen compressor: set compressor to a trained "
                             "compressor.safetensors or Stage B run folder")
        self.init_cost: dict = {}
        self.model = self.initial_model(config, init_from)
        self.latent_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.ema = make_ema(self.model) if ema_decay else None
        self.compressor_ema = make_ema(self.compressor) if ema_decay and self.compressor.trainable != "none" else None
        self.perceptual = Perceptual(metric_net)
        self.val_psnr = torchmetrics.image.PeakSignalNoiseRatio(data_range=1.0)
        self.val_lpips = torchmetrics.MeanMetric()
        self.val_fid = fid_metric() if val_fid else None

    def initial_model(self, config, init_from: str | None) -> StageB:
        """A fresh Stage B, or the weights of ``init_from`` after checking they fit this run."""
        if not init_from:
            return StageB(config)
        path = resolve_checkpoint(init_from)
        state, stored = read_weights(path, "stage_b")
        if stored is not None and stage_b_config(stored) != config:
            raise ValueError(f"{path} is a Stage B of another size ({stored}); set size to match it")
        meta = stage_b_metadata(path)
        for key, ours, what in (("stage_a_fingerprint", self.stage_a_fingerprint, "Stage A"),
                                ("compressor_fingerprint", fingerprint(self.compressor), "semantic compressor")):
            if meta.get(key) not in (None, ours):
                raise ValueError(f"{path} was trained with another {what} than this run's; pass the "
                                 f"{what} it was trained with (stage_a / compressor: its run folder)")
        # the whole chain's cost: the init's own run plus whatever it started from
        self.init_cost = {f"init_{k}": meta[k] + meta.get(f"init_{k}", 0) for k in ("global_step", "wall_time_s")
                          if k in meta}
        return load_into(StageB(config), state, str(path))

    def train(self, mode: bool = True) -> "StageBTraining":
        super().train(mode)
        self.stage_a.eval()  # frozen: BatchNorm statistics never move
        if self.ema is not None:
            self.ema.eval()
        if self.compressor_ema is not None:
            self.compressor_ema.eval()
        return self

    # -- training ---------------------------------------------------------------------------
    @torch.no_grad()
    def cached_latents(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage A latents and semantic latents of the batch's images, computed once per sample key."""
        missing = [i for i, k in enumerate(batch["key"]) if k not in self.latent_cache]
        if missing:
            images = batch["image"][missing]
            fresh = zip(self.stage_a.encode(images).cpu(), self.compressor(images).cpu())
            self.latent_cache.update({batch["key"][i]: pair for i, pair in zip(missing, fresh)})
        x0, semantic = zip(*(self.latent_cache[k] for k in batch["key"]))
        return torch.stack(x0).to(self.device), torch.stack(semantic).to(self.device)

    def condition(self, semantic: torch.Tensor, captions: list[str], train: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Semantic latents (noised / dropped in training) and text states (dropped in training)."""
        h = self.hparams
        text = None
        if self.text_encoder is not None:
            text = self.text_encoder(captions)
        if not train:
            return semantic, text
        b = semantic.shape[0]
        noised = torch.rand(b, device=self.device) < h.semantic_noise_prob
        if noised.any():
            t = torch.rand(b, device=self.device) * h.semantic_noise_max_t
            semantic = torch.where(noised[:, None, None, None], CosineSchedule().add_noise(semantic, t, torch.randn_like(semantic)), semantic)
        keep = (torch.rand(b, device=self.device) >= h.semantic_drop_prob)[:, None, None, None]
        semantic = semantic * keep
        if text is not None:
            drop_text = (torch.rand(b, device=self.device) < h.text_drop_prob)[:, None, None]
            text = torch.where(drop_text, self.text_encoder.empty(b).to(text), text)
        return semantic, text

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hparams.cache_latents:
            x0, semantic = self.cached_latents(batch)
        else:
            with torch.no_grad():
                x0 = self.stage_a.encode(batch["image"])
            semantic = self.compressor(batch["image"])
        semantic, text = self.condition(semantic, batch["caption"], train=True)
        t = torch.rand(x0.shape[0], device=self.device)
        noise = torch.randn_like(x0)
        return self.log_training_loss(self.denoiser(self.model).loss(x0, t, noise, semantic, text))

    def denoiser(self, network: StageB):
        return denoiser_for(network, loss_weight=self.hparams.loss_weight)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.global_step
        decay = warmup_decay(self.hparams.ema_decay or 0.0, step)
        if self.ema is not None:
            update_ema(self.ema, self.model, decay)
        if self.compressor_ema is not None:
            update_ema(self.compressor_ema, self.compressor, decay)

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in [*self.model.parameters(), *self.compressor.parameters()] if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=h.lr, weight_decay=h.weight_decay, betas=(0.9, 0.95))
        return with_schedule(opt, h.warmup_steps, h.lr_schedule, self.trainer.max_steps if self.trainer else -1)

    # -- checkpoints ------------------------------------------------------------------------
    def trained_on(self) -> dict[str, tuple[str, str]]:
        return {"stage_a_fingerprint": (self.stage_a_fingerprint, "Stage A")}

    # -- validation: semantic reconstruction --------------------------------------------------
    @property
    def eval_compressor(self) -> SemanticCompressor:
        return self.compressor_ema if self.compressor_ema is not None else self.compressor

    def decoder(self) -> SemanticDecoder:
        return SemanticDecoder(self.eval_model, self.stage_a, self.text_encoder)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        h = self.hparams
        images = batch["image"]
        semantic, _ = self.condition(self.eval_compressor(images), batch["caption"], train=False)
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)
        recon = self.decoder()(semantic, images.shape[-2:], batch["caption"], h.sample_steps, h.guidance, gen)
        self.val_psnr(recon, images)
        self.val_lpips.update(self.perceptual(recon, images))
        self.log_dict({"val/psnr": self.val_psnr, "val/lpips": self.val_lpips}, prog_bar=True)
        if self.val_fid is not None:
            self.val_fid.update(images, real=True)
            self.val_fid.update(recon, real=False)
        if batch_idx == 0 and h.grid_images:
            out = self.run_dir / "samples" / f"semantic_recon_step{self.global_step:07d}.png"
            if self.trainer.is_global_zero:
                n = min(h.grid_images, images.shape[0])
                out.parent.mkdir(parents=True, exist_ok=True)
                save_image(torch.cat([images[:n], recon[:n]]), out, nrow=n, padding=2, pad_value=1.0)

    def on_validation_epoch_end(self) -> None:
        if self.val_fid is not None:
            self.log("val/fid", self.val_fid.compute(), prog_bar=True)
            self.val_fid.reset()
        super().on_validation_epoch_end()

    def export(self) -> Path | None:
        """``<run>/model.safetensors`` (Stage B, EMA) and ``<run>/compressor.safetensors`` (rank 0)."""
        path = self.run_dir / "model.safetensors"
        if not self.trainer.is_global_zero:
            return None
        extra = {**self.export_metadata(), **self.init_cost, "stage_a_fingerprint": self.stage_a_fingerprint,
                 "stage_a_path": self.stage_a_path,
                 "stage_a_config": self.stage_a.config.to_dict(), "text_encoder": self.hparams.text_encoder,
                 "compressor_config": self.compressor.config.to_dict(),
                 "compressor_fingerprint": fingerprint(self.eval_compressor),
                 "diffusion": self.denoiser(self.eval_model).describe()}
        save_safetensors(self.eval_compressor, self.run_dir / "compressor.safetensors", "semantic_compressor",
                         self.compressor.config.to_dict(), overwrite=True, extra=self.export_metadata())
        return save_safetensors(self.eval_model, path, "stage_b", self.model.config.to_dict(), overwrite=True,
                                extra=extra)
