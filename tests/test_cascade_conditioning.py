"""Stable Cascade's conditioning encoders: MiniLM with its masked-mean pooled text (the tiny presets), and
transformers' CLIP text model with projection and CLIP vision model with projection read from local folders
(random tiny weights standing in for the released bigG and ViT-L)."""
import json

import pytest
import torch
import transformers
from transformers.convert_slow_tokenizer import bytes_to_unicode

from pipeline.cascade_conditioning import (CLIPImageEmbedder, PooledCLIP, PooledMiniLM, build_pooled_text_encoder,
                                           split)


def test_minilm_pooled_is_the_masked_mean_of_its_states():
    encoder = build_pooled_text_encoder("minilm")
    assert isinstance(encoder, PooledMiniLM) and encoder.dim == 384
    states, pooled = split(encoder(["a red apple", ""]))
    assert states.shape == (2, 77, 384) and pooled.shape == (2, 1, 384)
    n = len(encoder.tokenizer("a red apple")["input_ids"])  # [CLS] a red apple [SEP]
    assert torch.allclose(pooled[0, 0], states[0, :n].mean(0), atol=1e-5)
    assert not torch.allclose(pooled[0, 0], states[0].mean(0), atol=1e-3)  # padding positions left out
    with pytest.raises(ValueError, match="unknown Stable Cascade text encoder"):
        build_pooled_text_encoder("open_clip")


def clip_tokenizer(folder):
    """A CLIPTokenizer over single byte-characters (no merges): enough to tokenise any prompt offline."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)


def test_clip_text_encoder_gives_the_last_hidden_layer_before_the_norm_and_text_embeds(tmp_path):
    config = transformers.CLIPTextConfig(vocab_size=514, hidden_size=32, projection_dim=32, intermediate_size=37,
                                         num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
                                         bos_token_id=512, eos_token_id=513, pad_token_id=513)
    torch.manual_seed(0)
    model = transformers.CLIPTextModelWithProjection(config).eval()
    model.save_pretrained(tmp_path / "prior" / "text_encoder")
    clip_tokenizer(tmp_path / "prior" / "tokenizer")
    encoder = build_pooled_text_encoder({"name": "clip", "path": str(tmp_path / "prior")})
    assert isinstance(encoder, PooledCLIP) and (encoder.dim, encoder.max_tokens) == (32, 77)
    prompts = ["a red apple", ""]
    states, pooled = split(encoder(prompts))
    tokens = encoder.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(**tokens, output_hidden_states=True)
    torch.testing.assert_close(states, out.hidden_states[-1])
    torch.testing.assert_close(pooled[:, 0], out.text_embeds)
    assert not torch.allclose(states, out.last_hidden_state, atol=1e-3)  # before the final LayerNorm
    with pytest.raises(FileNotFoundError, match="no CLIP text encoder folder"):
        PooledCLIP(tmp_path / "missing")


def test_clip_image_embedder(tmp_path):
    config = transformers.CLIPVisionConfig(hidden_size=32, projection_dim=24, intermediate_size=37,
                                           num_attention_heads=4, num_hidden_layers=1, image_size=224, patch_size=32)
    model = transformers.CLIPVisionModelWithProjection(config).eval()
    model.save_pretrained(tmp_path / "prior" / "image_encoder")
    transformers.CLIPImageProcessor().save_pretrained(tmp_path / "prior" / "feature_extractor")
    embedder = CLIPImageEmbedder(tmp_path / "prior")
    images = torch.rand(2, 3, 96, 128)
    embeds = embedder(images)
    assert embeds.shape == (2, 1, 24) and embedder.dim == 24
    assert not torch.allclose(embeds[0], embeds[1])
