"""The modules under test: every stage preset, the semantic compressor, the text encoders and the
greedy-grown pixel decoder.

A ``Target`` knows how to build its module (random weights: timing does not depend on them), make
inputs for a batch at an image size, run one inference forward and one training loss. Sizes map
to each module's configs (paper Sec. 4.1, App. E):

| size | Stage A | Stage B | Stage C | compressor | text encoder | pixel decoder |
|---|---|---|---|---|---|---|
| tiny | tiny | tiny | tiny | EfficientNet-Lite0 | MiniLM-L6 (packaged weights) | tiny, grown to 128 px |
| paper | paper | paper | paper (347 M) | EfficientNetV2-S | OpenCLIP ViT-H-14 | paper, grown to 512 px |
| release | = paper | = paper | release (994 M) | = paper | OpenCLIP ViT-bigG-14 | = paper |

The "forward" of Stage A is ``decode`` (what the sampler runs); its training loss runs encoder,
quantiser and decoder. Image size ``px`` sets every shape: Stage A/B latents are px/4, the
semantic grid is ``latent_grid(px, px)`` (24x24 at 1024 px), text is 77 tokens. The pixel decoder
is its grown (phase 2) architecture; it renders at any multiple of its grid, so it is timed at ``px`` too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from semantic_compressor import SemanticCompressor, latent_grid
from pipeline.denoisers import denoiser_for
from stages.pixel_decoder import GrownUViT, pixel_decoder_config
from stages.stage_a import StageA
from stages.stage_b import StageB, stage_b_config
from stages.stage_c import StageC, stage_c_config
from pipeline import text_encoder

SIZES = ("tiny", "paper", "release")
KINDS = ("stage_a", "stage_b", "stage_c", "compressor", "text_encoder", "pixel_decoder")
TEXT_TOKENS = 77

# size -> the config each module uses; a size missing here uses the paper's (the release kept it)
CONFIGS: dict[str, dict[str, str]] = {
    "stage_a": {"tiny": "tiny", "paper": "paper"},
    "stage_b": {"tiny": "tiny", "paper": "paper"},
    "stage_c": {"tiny": "tiny", "paper": "paper", "release": "release"},
    "compressor": {"tiny": "efficientnet_lite0", "paper": "efficientnet_v2_s"},
    "text_encoder": {"tiny": "minilm", "paper": "ViT-H-14", "release": "ViT-bigG-14"},
    "pixel_decoder": {"tiny": "tiny", "paper": "paper"},
}
PIXEL_TARGET = {"tiny": 128, "paper": 512}  # the side each pixel decoder preset grows to
# the paper's training resolutions (App. E): Stage A 128 px crops; B and C 512 px, then 1024 px
TRAIN_PX = {"stage_a": (128,), "stage_b": (512, 1024), "stage_c": (512, 1024), "compressor": (512, 1024),
            "pixel_decoder": (512,)}  # the pixel decoder: phase 2 at its target resolution
# image sizes for CPU runs of the paper-size models (a 1024 px forward of Stage B takes minutes on 2 cores)
CPU_PX = {"tiny": 128, "stage_a": 128, "stage_b": 128, "stage_c": 256, "compressor": 256, "pixel_decoder": 128}


@dataclass
class Target:
    kind: str
    size: str
    config: str  # the config name of the module (preset, backbone or text model)
    build: Callable[[str], nn.Module]  # device -> module ("meta": shapes only, for counting)
    inputs: Callable[[int, int, torch.device], tuple]  # (batch, px, device) -> forward arguments
    forward: Callable[[nn.Module, tuple], object]
    loss: Callable[[nn.Module, tuple], torch.Tensor] | None  # None: frozen during training (text encoders)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.size}"

    def cpu_px(self) -> int:
        return CPU_PX["tiny"] if self.size == "tiny" else CPU_PX.get(self.kind, 128)


def _on(cls: Callable[..., nn.Module], *args, **kwargs) -> Callable[[str], nn.Module]:
    def build(device: str) -> nn.Module:
        with torch.device(device):
            return cls(*args, **kwargs)
    return build


def _stage_a(preset: str) -> Target:
    def inputs(b: int, px: int, device: torch.device) -> tuple:
        return torch.rand(b, 3, px, px, device=device), torch.randn(b, 4, px // 4, px // 4, device=device)

    def loss(m: StageA, args: tuple) -> torch.Tensor:
        recon, vq = m(args[0])
        return F.mse_loss(recon, args[0]) + vq

    return Target("stage_a", "", preset, _on(StageA, preset), inputs, lambda m, a: m.decode(a[1]), loss)


def _noise_loss(predict: Callable[..., torch.Tensor], x: torch.Tensor, *cond) -> torch.Tensor:
    return F.mse_loss(predict(x, torch.rand(x.shape[0], device=x.device), *cond).float(), torch.randn_like(x).float())


def _stage_b(preset: str) -> Target:
    def inputs(b: int, px: int, device: torch.device) -> tuple:
        c_text = stage_b_config(preset).c_text
        text = torch.randn(b, TEXT_TOKENS, c_text, device=device) if c_text else None
        return (torch.randn(b, 4, px // 4, px // 4, device=device), torch.rand(b, device=device),
                torch.randn(b, 16, *latent_grid(px, px), device=device), text)

    return Target("stage_b", "", preset, _on(StageB, preset), inputs, lambda m, a: m(*a),
                  lambda m, a: _noise_loss(denoiser_for(m), a[0], a[2], a[3]))


def _stage_c(preset: str) -> Target:
    def inputs(b: int, px: int, device: torch.device) -> tuple:
        return (torch.randn(b, 16, *latent_grid(px, px), device=device), torch.rand(b, device=device),
                torch.randn(b, TEXT_TOKENS, stage_c_config(preset).c_text, device=device))

    return Target("stage_c", "", preset, _on(StageC, preset), inputs, lambda m, a: m(*a),
                  lambda m, a: _noise_loss(denoiser_for(m), a[0], a[2]))


def _compressor(backbone: str) -> Target:
    def inputs(b: int, px: int, device: torch.device) -> tuple:
        return (torch.rand(b, 3, px, px, device=device),)

    # the paper fine-tunes the whole compressor with Stage B (trainable="all")
    return Target("compressor", "", backbone, _on(SemanticCompressor, backbone, pretrained=False, trainable="all"),
                  inputs, lambda m, a: m(a[0]), lambda m, a: m(a[0]).float().square().mean())


def grown_pixel_decoder(preset: str) -> GrownUViT:
    """The pixel decoder preset's grown architecture (random weights) at its target resolution."""
    from dataclasses import replace

    return GrownUViT(replace(pixel_decoder_config(preset), target_resolution=PIXEL_TARGET[preset]))


def _pixel_decoder(preset: str) -> Target:
    def inputs(b: int, px: int, device: torch.device) -> tuple:
        c_text = pixel_decoder_config(preset).c_text
        text = torch.randn(b, TEXT_TOKENS, c_text, device=device) if c_text else None
        return (torch.randn(b, 3, px, px, device=device), torch.rand(b, device=device),
                torch.randn(b, 16, *latent_grid(px, px), device=device), text)

    return Target("pixel_decoder", "", preset, _on(grown_pixel_decoder, preset), inputs, lambda m, a: m(*a),
                  lambda m, a: _noise_loss(denoiser_for(m), a[0], a[2], a[3]))


def build_text_encoder(config: str, device: str = "cpu") -> nn.Module:
    """MiniLM with its packaged weights (always built on the CPU: 22 M parameters, cheap to count there);
    OpenCLIP text towers with random weights N(0, 0.02) (no model hub here), built without the image tower."""
    if config == "minilm":
        return text_encoder.build_text_encoder("minilm").to("cpu" if device == "meta" else device)
    with torch.device("meta"):  # only the text tower is kept: never allocate the image tower
        model = text_encoder.OpenCLIPTextEncoder(config, pretrained=None, device="meta")
    if device == "meta":
        return model
    model = model.to_empty(device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
        n = model.max_tokens
        model.attn_mask = torch.full((n, n), float("-inf"), device=device).triu_(1)  # causal, as open_clip builds it
    return model


def _text_encoder(config: str) -> Target:
    def inputs(b: int, px: int, device: torch.device) -> tuple:
        return ([f"a photograph of object number {i} on a wooden table" for i in range(b)],)

    # encode_uncached: the encoders cache prompts, a benchmark must not hit the cache
    return Target("text_encoder", "", config, lambda device: build_text_encoder(config, device), inputs,
                  lambda m, a: m.encode_uncached(a[0]), None)


FACTORIES: dict[str, Callable[[str], Target]] = {
    "stage_a": _stage_a, "stage_b": _stage_b, "stage_c": _stage_c,
    "compressor": _compressor, "text_encoder": _text_encoder, "pixel_decoder": _pixel_decoder,
}


def targets(sizes: list[str], kinds: tuple[str, ...] = KINDS) -> list[Target]:
    """One target per (module, distinct config) among ``sizes``; the release's shared configs appear once."""
    out = []
    for kind in kinds:
        seen = set()
        for size in sizes:
            if size not in SIZES:
                raise ValueError(f"unknown size {size!r}; choose from {list(SIZES)}")
            config = CONFIGS[kind].get(size)
            if config is None or config in seen:
                continue
            seen.add(config)
            target = FACTORIES[kind](config)
            target.size = size
            out.append(target)
    return out
