"""Stable Cascade's conditioning: text states plus a pooled text embedding, and an optional CLIP image
embedding (StableCascade ``train/train_c.py``; diffusers' ``StableCascadePriorPipeline``).

The released encoders are transformers' ``CLIPTextModelWithProjection`` (ViT-bigG/14: the states are
``hidden_states[-1]``, the last layer before the final LayerNorm, 77 x 1280; the pooled embedding is
its ``text_embeds``, 1280) and ``CLIPVisionModelWithProjection`` (ViT-L/14: ``image_embeds``, 768),
both read from local folders. The offline default (``minilm``, for the tiny presets) is MiniLM's
states with their attention-masked mean as the pooled embedding (sentence-transformers' pooling of
all-MiniLM-L6-v2, without its final normalisation).

A pooled encoder returns states and pooled embedding packed in one tensor (B, tokens + 1, dim), the
pooled embedding as the last row: the per-prompt cache and the classifier-free-guidance drop of
``TextEncoder`` then treat the two as one; ``split`` unpacks them.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from pipeline.text_encoder import MiniLMTextEncoder, TextEncoder, padded_tokens


def split(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(states (B, tokens, dim), pooled (B, 1, dim)) of a pooled encoder's output."""
    return packed[:, :-1], packed[:, -1:]


class PooledMiniLM(MiniLMTextEncoder):
    """MiniLM states (77 x 384) and their attention-masked mean (384): the tiny presets' text."""

    def encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        tokens = padded_tokens(self.tokenizer, prompts, self.max_tokens, self.device)
        states = self.model(**tokens).last_hidden_state
        mask = tokens.attention_mask[..., None].to(states.dtype)
        pooled = (states * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        return torch.cat([states, pooled], dim=1)


def _folders(path: str | os.PathLike, model: str, tokenizer: str, what: str) -> tuple[Path, Path]:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"no {what} folder at {root}; pass a local folder with the model (or a pipeline "
                                f"folder with {model}/ and {tokenizer}/)")
    return (root / model if (root / model).is_dir() else root), (root / tokenizer if (root / tokenizer).is_dir()
                                                                 else root)


class PooledCLIP(TextEncoder):
    """transformers' ``CLIPTextModelWithProjection`` as Stable Cascade runs it: ``hidden_states[-1]`` at every
    position (tokenizer padding to 77 and its attention mask) and ``text_embeds``. ``path``: a local folder
    with the model and its tokenizer, or a pipeline folder with ``text_encoder/`` and ``tokenizer/``."""

    def __init__(self, path: str | os.PathLike, cache_size: int = 4096):
        super().__init__(cache_size)
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer  # heavy; only this encoder needs it

        model_dir, tokenizer_dir = _folders(path, "text_encoder", "tokenizer", "CLIP text encoder")
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.model = CLIPTextModelWithProjection.from_pretrained(model_dir, local_files_only=True)
        config = self.model.config
        if config.hidden_size != config.projection_dim:
            raise ValueError(f"{model_dir}: states ({config.hidden_size}) and pooled embedding "
                             f"({config.projection_dim}) "
                             "differ in width; Stable Cascade's text encoder gives both at one width (bigG: 1280)")
        self.max_tokens = min(self.tokenizer.model_max_length, config.max_position_embeddings)
        self.dim = config.hidden_size
        self.freeze()

    def encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        tokens = padded_tokens(self.tokenizer, prompts, self.max_tokens, self.device)
        out = self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True)
        return torch.cat([out.hidden_states[-1], out.text_embeds[:, None]], dim=1)


class CLIPImageEmbedder(torch.nn.Module):
    """transformers' ``CLIPVisionModelWithProjection`` (the release's ViT-L/14): images in [0, 1] -> ``image_embeds``
    (B, 1, 768), preprocessed by its ``CLIPImageProcessor`` (resize, center crop 224, normalise). ``path``: a
    local folder with both, or a pipeline folder with ``image_encoder/`` and ``feature_extractor/``."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection  # heavy; only image prompts need it

        model_dir, processor_dir = _folders(path, "image_encoder", "feature_extractor", "CLIP image encoder")
        self.processor = CLIPImageProcessor.from_pretrained(processor_dir, local_files_only=True)
        self.model = CLIPVisionModelWithProjection.from_pretrained(model_dir, local_files_only=True).eval()
        self.model.requires_grad_(False)
        self.dim = self.model.config.projection_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = self.processor(images=list(images.float().cpu()), do_rescale=False, return_tensors="pt").pixel_values
        param = next(self.model.parameters())
        return self.model(pixel_values=pixels.to(param.device, param.dtype)).image_embeds[:, None].float()


POOLED_ENCODERS = {"minilm": PooledMiniLM, "clip": PooledCLIP}


def build_pooled_text_encoder(name: str | dict) -> TextEncoder:
    """``minilm`` (offline default) or ``{"name": "clip", "path": ...}`` (the release's bigG from a local folder)."""
    kwargs: dict = {}
    if isinstance(name, dict):
        kwargs = dict(name)
        name = kwargs.pop("name", None)
    if name not in POOLED_ENCODERS:
        raise ValueError(f"unknown Stable Cascade text encoder {name!r}; choose one of {sorted(POOLED_ENCODERS)}")
    return POOLED_ENCODERS[name](**kwargs)
