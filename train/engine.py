"""The training engine, composed of parts as generative-models' ``DiffusionEngine`` is.

``StageTraining`` (every stage, Stage A's GAN included): the run folder, checkpoints that name their
stage and leave out frozen networks, EMA weights (``torch.optim.swa_utils.AveragedModel``) used by
validation and exports, the CLI's ``optimizer:`` / ``lr_scheduler:``, NaN checks, grids, exports.

``DiffusionTraining`` (Stages B, C and the pixel decoder): the network and its ``diffusion.Denoiser``;
a ``target`` to noise (``Latents`` of a frozen encoder, or ``Pixels``); ``conditions``, each with its
own augmentation (``SemanticCondition``: noised and dropped, paper Sec. 3.1; ``TextCondition``:
dropped for classifier-free guidance); frozen encoders by name (``stage_a``, ``semantic``, ``text``),
or the same names read from precomputed shards; validation loss at fixed noise and the stage's
``validation_images``. A stage is a thin subclass that builds these from its configuration.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn
from torch.optim.swa_utils import AveragedModel

from diffusion import CosineSchedule
from semantic_compressor import SemanticCompressor, normalize_latents
from weights.loaders import load_compressor, load_stage_a
from weights.checkpoint import fingerprint, read_metadata, read_weights, resolve_checkpoint, save_safetensors
from common.state_dict import load_into
from pipeline.denoisers import denoiser_for
from common.files import write_atomic, write_text
from imagedata.images import image_bytes
from weights.lora import add_lora_from_config, save_adapter
from common.metrics import Perceptual, fid_metric
from imagedata.shards import FINGERPRINTS, FLIPPED, check_made_with
from pipeline.text_encoder import TextEncoder, build_text_encoder
from train.prior_samples import load_prior_samples


def ema_of(module: nn.Module, decay: float) -> AveragedModel:
    """A frozen exponential moving average of ``module``; the decay warms up as min(decay, (1 + n) / (10 + n))
    after n updates (a short memory early, while the weights move fast). Integer buffers are copied."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - min(decay, (1.0 + n.item()) / (10.0 + n.item())))
        else:
            torch._foreach_copy_(averaged, current)

    return AveragedModel(module, multi_avg_fn=update, use_buffers=True).requires_grad_(False).eval()


def text_encoder_for(name: str | dict | None, width: int | None, what: str) -> TextEncoder | None:
    """The named text encoder, checked against the width ``what`` expects (None: no text)."""
    encoder = build_text_encoder(name)
    if bool(width) != (encoder is not None) or (encoder is not None and encoder.dim != width):
        raise ValueError(f"{what} expects text states of width {width}, but text_encoder is {name!r}"
                         + (f" (width {encoder.dim})" if encoder else "")
                         + "; pick a matching text_encoder or set c_text in the size")
    return encoder


def initial_weights(init_from: str, stage: str, checks: dict[str, tuple[str, str]]) -> tuple[dict, dict | None, dict]:
    """``(state, config, metadata)`` of the export or run to start from, refused when it was trained on
    other frozen inputs (``checks``: ``{metadata key: (our fingerprint, what)}``)."""
    path = resolve_checkpoint(init_from)
    state, config = read_weights(path, stage)
    meta = read_metadata(path)
    for key, (ours, what) in checks.items():
        if meta.get(key) not in (None, ours):
            raise ValueError(f"{path} was trained with another {what} ({meta[key]}) than this run's ({ours}); "
                             f"pass the {what} it was trained with")
    return state, config, {**meta, "path": str(path)}


# config fields an init_from export may differ in: they change no weight's shape (another head relearns)
WEIGHTLESS_FIELDS = ("prediction", "dropout", "activation_checkpointing")


def with_weightless_fields(stored, config):
    """``stored`` with ``config``'s values of ``WEIGHTLESS_FIELDS`` (those both configs have)."""
    shared = [f for f in WEIGHTLESS_FIELDS if hasattr(stored, f) and hasattr(config, f)]
    return replace(stored, **{f: getattr(config, f) for f in shared})


def training_cost(meta: dict) -> dict:
    """The whole chain's cost so far: the starting export's own steps and wall time plus what it started from."""
    return {f"init_{k}": meta[k] + meta.get(f"init_{k}", 0) for k in ("global_step", "wall_time_s") if k in meta}


# the fingerprints of frozen inputs a stage records when it uses them (``use_stage_a`` sets Stage A's)
FROZEN_INPUTS = {"stage_a_fingerprint": "Stage A", "compressor_fingerprint": "semantic compressor",
                 "stage_c_fingerprint": "Stage C"}


class StageTraining(L.LightningModule):
    """What every stage's LightningModule shares. Subclasses set ``stage``, ``frozen`` (prefixes of networks
    rebuilt on load, never saved), ``self.model`` and ``self.ema`` (``ema_of(model)`` or None), and
    implement ``export_metadata()``; ``trained_on()`` names the fingerprints of the frozen inputs the stage
    depends on (``{key: (fingerprint, what)}``, from the ``FROZEN_INPUTS`` attributes it set); resuming with other
    ones is refused."""

    stage: str = ""
    frozen: tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.latent_cache: dict[tuple[str, str], torch.Tensor] = {}  # frozen encodings by (encoder, sample key)

    @property
    def title(self) -> str:
        return "Stage " + self.stage.removeprefix("stage_").upper() if self.stage.startswith("stage_") else "pixel decoder"

    def trained_on(self) -> dict[str, tuple[str, str]]:
        return {key: (getattr(self, key), what) for key, what in FROZEN_INPUTS.items() if hasattr(self, key)}

    # -- weights --------------------------------------------------------------------------------
    def averaged(self) -> list[tuple[AveragedModel, nn.Module]]:
        """(EMA, network) pairs updated after every optimizer step."""
        return [(self.ema, self.model)] if self.ema is not None else []

    @property
    def eval_model(self) -> nn.Module:
        """The weights validation and exports use: the EMA copy when there is one."""
        return self.ema.module if self.ema is not None else self.model

    def train(self, mode: bool = True):
        super().train(mode)
        for name, module in self.named_children():  # frozen networks and EMA copies never leave eval mode
            if name + "." in self.frozen or isinstance(module, AveragedModel):
                module.eval()
        return self

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        for ema, model in self.averaged():
            ema.update_parameters(model)

    def configure_optimizers(self):
        """Used when the config names no ``optimizer`` (the CLI's own then replaces this)."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    def on_train_start(self) -> None:
        """The optimizer settings given now take effect, also on resume, where Lightning has restored the saved
        optimizer and schedule: each group's lr is rescaled to the given base rate (keeping the schedule's
        current factor) and its weight decay set to the given one."""
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                base = group.get("initial_lr", group["lr"])
                group["lr"] *= optimizer.defaults["lr"] / base if base else 1.0
                group["initial_lr"] = optimizer.defaults["lr"]
                if "weight_decay" in optimizer.defaults:
                    group["weight_decay"] = optimizer.defaults["weight_decay"]
        for config in self.trainer.lr_scheduler_configs:
            config.scheduler.base_lrs = [g["initial_lr"] for g in config.scheduler.optimizer.param_groups]
        self._fit_started = time.time()

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["stage"] = self.stage
        checkpoint.update(wall_time_s=self.run_metadata().get("wall_time_s", 0.0))  # a resumed run keeps counting
        checkpoint["model_config"] = self.model.config.to_dict()
        checkpoint.update({key: fp for key, (fp, _) in self.trained_on().items()})
        for k in [k for k in checkpoint["state_dict"] if k.startswith(self.frozen)]:
            del checkpoint["state_dict"][k]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if checkpoint.get("stage", self.stage) != self.stage:
            raise ValueError(f"this is a {checkpoint['stage']} checkpoint, not a {self.title} one")
        self._wall_time_before = float(checkpoint.get("wall_time_s", 0.0))
        for key, (fp, what) in self.trained_on().items():
            saved = checkpoint.get(key)
            if saved is not None and saved != fp:
                raise ValueError(f"this {self.title} checkpoint was trained on a different {what} (fingerprint {saved}, "
                                 f"the given one is {fp}); pass the {what} it was trained with")
        for k, v in self.state_dict().items():  # frozen networks come from the module, not the file
            if k.startswith(self.frozen):
                checkpoint["state_dict"][k] = v

    @torch.no_grad()
    def frozen_encoding(self, key: str, batch: dict, encode, train: bool) -> torch.Tensor:
        """``encode(images)`` of a batch by a frozen encoder; in training with ``cache_latents``, computed once
        per sample key and kept on the CPU in ``latent_cache`` (valid for whole images, no random crops)."""
        if not (train and self.hparams.cache_latents):
            return encode(batch["image"])
        missing = [i for i, k in enumerate(batch["key"]) if (key, k) not in self.latent_cache]
        if missing:
            fresh = encode(batch["image"][missing]).cpu()
            self.latent_cache.update({(key, batch["key"][i]): z for i, z in zip(missing, fresh)})
        return torch.stack([self.latent_cache[key, k] for k in batch["key"]]).to(self.device)

    # -- losses ---------------------------------------------------------------------------------
    def nan_advice(self) -> str:
        """What to change after a NaN or infinite loss; resuming is advised only from a checkpoint that exists."""
        advice = "lower the learning rate (--optimizer.init_args.lr) or enable gradient clipping (--trainer.gradient_clip_val)"
        callback = self.trainer.checkpoint_callback
        candidates = [Path(callback.dirpath) / "last.ckpt"] if callback and callback.dirpath else []
        candidates += [Path(self.trainer.ckpt_path)] if self.trainer.ckpt_path else []
        last = next((p for p in candidates if p.is_file()), None)
        if last is None:
            return f"{advice} and start again (no checkpoint was saved before this step)"
        return f"{advice} and resume with --ckpt_path {last}"

    def log_training_loss(self, loss: torch.Tensor, parts: dict | None = None) -> torch.Tensor:
        """Log the step's loss (and its ``parts``); a NaN or infinite loss stops training with what to change."""
        if not loss.isfinite():
            detail = ", ".join(f"{k} {v.item():.4g}" for k, v in (parts or {}).items())
            raise FloatingPointError(f"{self.title} loss is {loss.item()} at step {self.global_step}"
                                     f"{f' ({detail})' if detail else ''}; {self.nan_advice()}")
        self.log_dict({"train/loss": loss, **{f"train/{k}": v for k, v in (parts or {}).items()}})
        self.log("loss", loss, prog_bar=True, logger=False)
        return loss

    # -- outputs --------------------------------------------------------------------------------
    @property
    def run_dir(self) -> Path:
        """The run's folder; under DDP every rank must ask (``trainer.log_dir`` is a collective call)."""
        return Path(self.trainer.log_dir or ".")

    def write_grid(self, name: str, real: torch.Tensor, generated: torch.Tensor, captions: list[str] | None = None,
                   extra: tuple[torch.Tensor, ...] = ()):
        """``<run>/samples/<name>_step<N>.png``: real images on top, generated below, then any ``extra`` rows
        (rank 0; every rank calls)."""
        out = self.run_dir / "samples" / f"{name}_step{self.global_step:07d}.png"
        if not self.trainer.is_global_zero:
            return
        n = min(self.hparams.grid_images, real.shape[0])
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = [real[:n], generated[:n], *(row[:n] for row in extra)]
        write_atomic(out, image_bytes(torch.cat(rows).float(), out.suffix, nrow=n))
        if captions:
            write_text(out.with_suffix(".txt"), "\n".join(captions[:n]) + "\n")

    def run_metadata(self) -> dict:
        """Step and wall time of this fit (a resumed fit's includes the time before its ``--ckpt_path``)."""
        started = getattr(self, "_fit_started", None)
        if started is None:
            return {"global_step": self.global_step}
        before = getattr(self, "_wall_time_before", 0.0)
        return {"global_step": self.global_step, "wall_time_s": round(before + time.time() - started, 1)}

    def export_metadata(self) -> dict:
        """What the export records besides the weights and config (subclasses add theirs)."""
        return self.run_metadata()

    def export(self) -> Path | None:
        """``<run>/model.safetensors``: the EMA weights with config and ``export_metadata()`` (rank 0)."""
        path = self.run_dir / "model.safetensors"
        if not self.trainer.is_global_zero:
            return None
        return save_safetensors(self.eval_model, path, self.stage, self.eval_model.config.to_dict(), overwrite=True,
                                extra=self.export_metadata())

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.export()

    def on_train_end(self) -> None:
        self.export()


@dataclass
class Latents:
    """Target: a frozen encoder's latents (``stage_a``: Stage A's, ``semantic``: the compressor's), as
    (x + shift) / scale."""
    key: str
    shift: float = 0.0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"latent_scale must be a positive number (the latents' standard deviation), got "
                             f"{self.scale}: set it in the config's model.init_args")

    def __call__(self, engine: "DiffusionTraining", batch: dict, train: bool) -> torch.Tensor:
        return normalize_latents(engine.encode(self.key, batch, train), self.shift, self.scale)


@dataclass
class Pixels:
    """Target: the images at side ``resolution`` (aspect kept), in [-1, 1] (the pixel decoder)."""
    resolution: int

    def __call__(self, engine: "DiffusionTraining", batch: dict, train: bool) -> torch.Tensor:
        images = batch["image"]
        size = (self.resolution, round(images.shape[-1] * self.resolution / images.shape[-2]))
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
        return images.clamp(0, 1) * 2 - 1


@dataclass
class SemanticCondition:
    """The compressor's latents, (x + shift) / scale; in training noised at a random t < ``noise_max_t``
    with probability ``noise_prob`` (so the decoder accepts imperfect Stage C output) and zeroed with
    probability ``drop_prob`` (classifier-free guidance), paper Sec. 3.2. ``prior_samples`` (``{sample key:
    (K, C, h, w)}``, ``train.prior_samples``): in training each sample's latents are replaced with probability
    ``prior_samples_prob`` by one of a Stage C's samples for its caption, before the noise and the drop (never a
    flipped image's: the prior drew the caption's emoji unflipped)."""
    shift: float = 0.0
    scale: float = 1.0
    noise_prob: float = 0.0
    noise_max_t: float = 0.0
    drop_prob: float = 0.0
    prior_samples: dict[str, torch.Tensor] | None = None
    prior_samples_prob: float = 0.0

    def __call__(self, engine: "DiffusionTraining", batch: dict, train: bool) -> torch.Tensor:
        latents = engine.encode("semantic", batch, train)
        if train and self.prior_samples is not None:
            latents = self.drawn_by_prior(latents, batch["key"])
        latents = normalize_latents(latents, self.shift, self.scale)
        if not train:
            return latents
        b, device = latents.shape[0], latents.device
        noised = torch.rand(b, device=device) < self.noise_prob
        if noised.any():
            t = torch.rand(b, device=device) * self.noise_max_t
            noisy = CosineSchedule().add_noise(latents, t, torch.randn_like(latents))
            latents = torch.where(noised[:, None, None, None], noisy, latents)
        return latents * (torch.rand(b, device=device) >= self.drop_prob)[:, None, None, None]

    def drawn_by_prior(self, latents: torch.Tensor, keys: list[str]) -> torch.Tensor:
        missing = [k for k in keys if k not in self.prior_samples and not k.endswith(FLIPPED)]
        if missing:
            raise ValueError(f"training sample {missing[0]!r} has no Stage C sample in prior_samples; make the file "
                             "from this run's training data (python -m train.prior_samples --train ...)")
        shape = next(iter(self.prior_samples.values())).shape[1:]
        if shape != latents.shape[1:]:
            raise ValueError(f"prior_samples hold latents of shape {tuple(shape)}, this run's compressor gives "
                             f"{tuple(latents.shape[1:])}; sample at this run's image size (--image-size)")
        rows = list(latents)
        for i in (torch.rand(len(keys)) < self.prior_samples_prob).nonzero().flatten().tolist():
            if keys[i].endswith(FLIPPED):
                continue
            drawn = self.prior_samples[keys[i]]
            rows[i] = drawn[torch.randint(len(drawn), ())].to(latents)
        return torch.stack(rows)


@dataclass
class TextCondition:
    """The text encoder's token states; in training replaced by the empty prompt's with probability
    ``drop_prob`` (classifier-free guidance). Without a text encoder the condition is None."""
    drop_prob: float = 0.0

    def __call__(self, engine: "DiffusionTraining", batch: dict, train: bool) -> torch.Tensor | None:
        if engine.text_encoder is None:
            return None
        text = engine.encode("text", batch, train)
        if not train:
            return text
        drop = (torch.rand(text.shape[0], device=text.device) < self.drop_prob)[:, None, None]
        return torch.where(drop, engine.text_encoder.empty(text.shape[0]).to(text), text)


class DiffusionTraining(StageTraining):
    """A diffusion stage: ``target`` noised and denoised by ``model`` given ``conditions`` (see the module
    docstring). Subclasses build ``model``, the encoders (``compressor`` and ``text_encoder``, None where
    unused; ``stage_a`` where the target needs it), ``target`` and ``conditions``, then call ``setup_parts()``."""

    logsnr_shift: float = 0.0
    paired_metrics: bool = False  # validation images are reconstructions of the real ones (PSNR, LPIPS, FID)

    def setup_parts(self, ema_decay: float | None, metric_net: str | None = None, val_fid: bool = False,
                    lora: dict | None = None) -> None:
        """EMA, frozen-compressor bookkeeping and metrics. ``lora``: train LoRA adapters on the frozen ``model``
        (``weights.lora``); the EMA then averages the adapters and exports write ``adapter.safetensors``."""
        self.lora_settings = add_lora_from_config(self.model, lora)
        self.ema = ema_of(self.model, ema_decay) if ema_decay else None
        self.trains_compressor = self.compressor is not None and any(p.requires_grad for p in self.compressor.parameters())
        self.compressor_ema = ema_of(self.compressor, ema_decay) if ema_decay and self.trains_compressor else None
        if self.paired_metrics:
            self.val_psnr = torchmetrics.image.PeakSignalNoiseRatio(data_range=1.0)
            self.perceptual = Perceptual(metric_net) if metric_net else None
            self.val_lpips = torchmetrics.MeanMetric()
            self.val_fid = fid_metric() if val_fid else None

    def setup_decoder(self, model: nn.Module, config_of, init_from: str | None, semantic_noise_prob: float,
                      semantic_noise_max_t: float, semantic_drop_prob: float, text_drop_prob: float,
                      prior_samples: str | list[str] | None = None, prior_samples_prob: float = 0.5) -> None:
        """A Stage B's parts (v2 and v3; paper Sec. 3.1): ``model`` (continued from ``init_from``, which must share
        this run's Stage A and compressor) generates Stage A's latents from the compressor's latents (noised at a
        random t < ``semantic_noise_max_t`` with probability ``semantic_noise_prob``, zeroed with
        ``semantic_drop_prob``) and the text (dropped with ``text_drop_prob``). ``prior_samples``: a file of
        ``python -m train.prior_samples`` or a list of them, pooled (of a Stage C trained on this run's frozen
        compressor): with probability ``prior_samples_prob`` a sample's latents are that Stage C's sample for its
        caption instead."""
        self.model = model
        self.start_from(init_from, config_of, {**self.trained_on(), "compressor_fingerprint": (
            fingerprint(self.compressor), "semantic compressor")})
        self.target = Latents("stage_a")
        drawn = None
        if prior_samples:
            if not 0 < prior_samples_prob <= 1:
                raise ValueError(f"prior_samples_prob must be in (0, 1], got {prior_samples_prob}")
            if any(p.requires_grad for p in self.compressor.parameters()):
                raise ValueError("prior_samples are latents of a frozen compressor, but this run trains it; set "
                                 "compressor to the trained compressor.safetensors the Stage C was trained on")
            drawn = load_prior_samples(prior_samples, fingerprint(self.compressor))
        self.conditions = [SemanticCondition(noise_prob=semantic_noise_prob, noise_max_t=semantic_noise_max_t,
                                             drop_prob=semantic_drop_prob, prior_samples=drawn,
                                             prior_samples_prob=prior_samples_prob), TextCondition(text_drop_prob)]

    def start_from(self, init_from: str | None, config_of, checks: dict, settings: dict | None = None) -> None:
        """Load ``init_from`` (an export or run of this stage) into ``model``; refused when it was trained on other
        frozen inputs (``checks``, as for ``initial_weights``), at another size (``config_of(stored) != config``)
        or with other ``settings`` (``{metadata key: this run's value}``). Another head (``prediction``, e.g.
        eps -> v) is allowed where its weights have the same shapes: the network carries over, the head relearns;
        so are another dropout and activation checkpointing (``WEIGHTLESS_FIELDS``)."""
        self.init_cost: dict = {}
        if not init_from:
            return
        state, stored, meta = initial_weights(init_from, self.stage, checks)
        if stored is not None and with_weightless_fields(config_of(stored), self.model.config) != self.model.config:
            raise ValueError(f"{meta['path']} is a {self.title} of another size ({stored}); set size to match it")
        for key, ours in (settings or {}).items():
            if key in meta and meta[key] != ours:
                raise ValueError(f"{meta['path']} was trained with {key} {meta[key]!r}, this run gives {ours!r}; "
                                 f"set {key} to the export's")
        self.init_cost = training_cost(meta)
        full_state = getattr(self.model, "full_state", None)  # a network whose exports leave frozen parts out
        load_into(self.model, full_state(state) if full_state else state, meta["path"])

    def averaged(self):
        return super().averaged() + ([(self.compressor_ema, self.compressor)] if self.compressor_ema else [])

    @property
    def eval_compressor(self):
        return self.compressor_ema.module if self.compressor_ema is not None else self.compressor

    def denoiser(self, network: nn.Module):
        return denoiser_for(network, logsnr_shift=self.logsnr_shift, loss_weight=self.hparams.loss_weight,
                            sigmoid_bias=self.hparams.get("sigmoid_bias", 0.0))

    # -- encoders -------------------------------------------------------------------------------
    def use_stage_a(self, stage_a: str, c_latent: int, what: str) -> None:
        """The frozen Stage A whose latents this stage generates (export, ``.ckpt`` or run folder), checked for
        ``c_latent`` channels; its path is recorded absolute (the export loads from any working directory)."""
        path = resolve_checkpoint(stage_a)
        self.stage_a_path = str(path.resolve())
        self.stage_a = load_stage_a(str(path)).requires_grad_(False)
        self.stage_a_fingerprint = fingerprint(self.stage_a)
        if self.stage_a.config.latent_channels != c_latent:
            raise ValueError(f"Stage A at {path} has {self.stage_a.config.latent_channels} latent channels; "
                             f"this {what} expects {c_latent} (c_latent)")

    def encoder_fingerprints(self) -> dict[str, str]:
        """What a precomputed shard set must have been made with (its manifest's keys)."""
        encoders = (getattr(self, "stage_a", None), self.compressor, self.text_encoder)  # as FINGERPRINTS names them
        return {k: fingerprint(m) for k, m in zip(FINGERPRINTS, encoders) if m is not None}

    def setup(self, stage: str) -> None:
        """Refuse precomputed shards made by other encoder weights before any step."""
        manifest = getattr(self.trainer.datamodule, "precomputed", None) if self.trainer else None
        if not manifest:
            return
        if self.trains_compressor:
            raise ValueError("precomputed shards hold fixed compressor latents, but this run trains the compressor; "
                             "set compressor to a trained one (frozen) or train from images")
        check_made_with(manifest, self.encoder_fingerprints())

    def encode(self, key: str, batch: dict, train: bool) -> torch.Tensor:
        """``stage_a``, ``semantic`` or ``text`` of a batch: from precomputed shards when the batch holds it,
        else from the frozen encoder (the trained compressor with gradients, or its EMA in validation),
        cached per sample key when ``cache_latents`` is set (for a compressor whose head alone trains, the
        backbone's features are cached and the head runs each step)."""
        if key in batch:
            return batch[key].float()
        if key == "text":
            return self.text_encoder(batch["caption"])
        if key == "semantic" and self.trains_compressor:
            if not train:
                return self.eval_compressor(batch["image"])
            if self.hparams.cache_latents:  # only the head trains (checked at init): the backbone's features are fixed
                return self.compressor.mapper(self.frozen_encoding("backbone", batch, self.compressor.features, train))
            return self.compressor(batch["image"])
        encode = self.stage_a.encode if key == "stage_a" else self.compressor
        return self.frozen_encoding(key, batch, encode, train)

    # -- training -------------------------------------------------------------------------------
    def inputs(self, batch: dict, train: bool) -> tuple[torch.Tensor, list]:
        return self.target(self, batch, train), [condition(self, batch, train) for condition in self.conditions]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0, conditions = self.inputs(batch, train=True)
        t = torch.rand(x0.shape[0], device=x0.device)
        return self.log_training_loss(self.denoiser(self.model).loss(x0, t, torch.randn_like(x0), *conditions))

    # -- validation -----------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x0, conditions = self.inputs(batch, train=False)
        gen = torch.Generator(device=self.device).manual_seed(batch_idx)  # the same noise at every validation
        t = torch.rand(x0.shape[0], generator=gen, device=self.device)
        noise = torch.randn(x0.shape, generator=gen, device=self.device)
        self.log("val/loss", self.denoiser(self.eval_model).loss(x0, t, noise, *conditions), prog_bar=True)
        if not self.hparams.sample_steps:
            return
        images = self.validation_images(batch, batch_idx, gen)
        if images is None:
            return
        real, generated, *extra = images
        if self.paired_metrics:
            self.val_psnr(generated, real)
            self.log("val/psnr", self.val_psnr, prog_bar=True)
            if self.perceptual is not None:
                self.val_lpips.update(self.perceptual(generated, real))
                self.log("val/lpips", self.val_lpips, prog_bar=True)
            if self.val_fid is not None:
                self.val_fid.update(real, real=True)
                self.val_fid.update(generated, real=False)
        if batch_idx == 0 and self.hparams.grid_images:
            self.write_grid(self.grid_name, real, generated, None if self.paired_metrics else batch["caption"],
                            tuple(extra))

    def validation_images(self, batch: dict, batch_idx: int, gen: torch.Generator):
        """``(real, generated, *extra rows)`` images in [0, 1] for the grid (real and generated also for paired
        metrics), or None."""
        return None

    def on_validation_epoch_end(self) -> None:
        if self.paired_metrics and self.val_fid is not None:
            self.log("val/fid", self.val_fid.compute(), prog_bar=True)
            self.val_fid.reset()
        super().on_validation_epoch_end()

    def export_metadata(self) -> dict:
        return {**super().export_metadata(), "diffusion": self.denoiser(self.eval_model).describe(),
                **{key: fp for key, (fp, _) in self.trained_on().items()}}

    def export(self) -> Path | None:
        """With LoRA: ``<run>/adapter.safetensors`` (the EMA adapters, recording the base's fingerprint)
        instead of the full network (rank 0); else the full export."""
        if self.lora_settings is None:
            return super().export()
        if not self.trainer.is_global_zero:
            return None
        return save_adapter(self.eval_model, self.run_dir / "adapter.safetensors", self.stage, self.lora_settings,
                            overwrite=True, extra=self.export_metadata())


def compressor_for(spec: str | dict | None, channels: int, what: str) -> SemanticCompressor:
    """A trained compressor (``compressor.safetensors`` or a Stage B run folder; frozen), or a new one from
    ``SemanticCompressor`` arguments (a dict, or None for the defaults), with the channels ``what`` expects."""
    compressor = load_compressor(spec).requires_grad_(False) if isinstance(spec, str) else \
        SemanticCompressor(**(spec or {}))
    if compressor.config.latent_channels != channels:
        raise ValueError(f"the compressor gives {compressor.config.latent_channels} latent channels; {what} expects "
                         f"{channels} (c_semantic)")
    return compressor
