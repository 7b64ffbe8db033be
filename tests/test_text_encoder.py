"""Frozen text encoders: shapes, bad input, cache, frozen state, real MiniLM weights, and that the
open_clip states are exactly what ``encode_text`` pools."""
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from pipeline.text_encoder import MiniLMTextEncoder, OpenCLIPTextEncoder, TextEncoder, build_text_encoder

LONG_PROMPT = " ".join(["apple"] * 1000)


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


@pytest.fixture
def fresh(minilm):
    minilm.cache.clear()
    return minilm


def prompt_mean(encoder, prompt):
    """Mean of the states of the real tokens (MiniLM's sentence embedding is this mean pooling)."""
    n = len(encoder.tokenizer(prompt)["input_ids"])
    return encoder([prompt])[0, :n].mean(0)


def test_minilm_shapes_and_factory(minilm):
    assert isinstance(minilm, TextEncoder) and (minilm.max_tokens, minilm.dim) == (77, 384)
    states = minilm(["a red apple", "a cat", ""])
    assert states.shape == (3, 77, 384) and states.dtype == torch.float32
    assert torch.isfinite(states).all()
    assert build_text_encoder("none") is None and build_text_encoder(None) is None
    assert build_text_encoder("minilm", max_tokens=16)(["a cat"]).shape == (1, 16, 384)
    with pytest.raises(ValueError, match="unknown text encoder"):
        build_text_encoder("t5")


def test_deterministic_and_batch_independent(fresh):
    alone = fresh(["a red apple"])
    fresh.cache.clear()
    batched = fresh(["a much longer prompt about a steam locomotive", "a red apple"])
    torch.testing.assert_close(batched[1:], alone, atol=1e-5, rtol=1e-5)
    assert (fresh(["a red apple"]) - fresh(["a red panda"])).abs().max() > 0.1


def test_empty_prompt_and_empty_states(fresh):
    empty = fresh.empty(4)
    assert empty.shape == (4, 77, 384) and torch.isfinite(empty).all()
    assert torch.equal(empty[3], fresh([""])[0])


def test_long_prompt_truncated_with_one_warning(fresh):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        states = fresh([LONG_PROMPT, "a cat", LONG_PROMPT + " pear"])
    notes = [w for w in caught if "truncated" in str(w.message)]
    assert len(notes) == 1, [str(w.message) for w in caught]
    assert "2 prompt(s)" in str(notes[0].message) and "1851 token(s) dropped (at most 926" in str(notes[0].message)
    assert states.shape == (3, 77, 384) and torch.isfinite(states).all()


def test_non_ascii_prompts(fresh):
    states = fresh(["café ☕ 寿司", "🍎🚂", "naïve Ünïcödé"])
    assert states.shape == (3, 77, 384) and torch.isfinite(states).all()


@pytest.mark.parametrize("bad, error", [
    ([None], TypeError), (["a cat", 3], TypeError), ("a cat", TypeError), (None, TypeError), ([], ValueError),
])
def test_bad_input_is_a_clear_error(minilm, bad, error):
    with pytest.raises(error, match="prompt"):
        minilm(bad)


def test_cache_hits_are_identical_and_bounded():
    encoder = MiniLMTextEncoder(max_tokens=8, cache_size=2)
    first = encoder(["a", "b"])
    assert torch.equal(encoder(["b", "a", "a"]), first[[1, 0, 0]])
    first[:] = 0  # callers' tensors are not the cache's
    assert encoder(["a"]).abs().sum() > 0
    encoder(["c"])
    assert list(encoder.cache) == ["a", "c"]  # "b" was least recently used


def test_frozen_after_train(minilm):
    minilm.train()
    assert not minilm.training and not any(m.training for m in minilm.modules())
    assert not any(p.requires_grad for p in minilm.parameters())
    assert not minilm(["a cat"]).requires_grad


def test_minilm_semantics_with_real_weights(fresh):
    red, green, train = (prompt_mean(fresh, p) for p in ["a red apple", "a green apple", "a steam locomotive"])
    assert F.cosine_similarity(red, green, dim=0) > F.cosine_similarity(red, train, dim=0) + 0.2


TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2),
)


def test_open_clip_states_are_what_encode_text_pools(tmp_path):
    """Our ln_final states, pooled at EOT and projected, equal open_clip's own ``encode_text``."""
    open_clip = pytest.importorskip("open_clip")
    clip = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP).eval()
    torch.save(clip.state_dict(), tmp_path / "tiny_clip.pt")
    encoder = OpenCLIPTextEncoder("ViT-B-32", pretrained=str(tmp_path / "tiny_clip.pt"), **TINY_CLIP)
    assert (encoder.max_tokens, encoder.dim) == (77, 64) and not hasattr(encoder, "visual")

    prompts = ["a red apple", "", "café ☕ 寿司", LONG_PROMPT]
    with pytest.warns(UserWarning, match="truncated"):
        states = encoder(prompts)
    assert states.shape == (4, 77, 64)
    tokens = open_clip.get_tokenizer("ViT-B-32")(prompts)
    pooled = states[torch.arange(4), tokens.argmax(-1)] @ clip.text_projection
    with torch.no_grad():
        torch.testing.assert_close(pooled, clip.encode_text(tokens), atol=1e-5, rtol=1e-5)
    encoder.train()
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())


def test_open_clip_offline_tag_fails_fast_with_the_fix():
    pytest.importorskip("open_clip")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="local checkpoint file.*minilm"):
        OpenCLIPTextEncoder("ViT-H-14", pretrained="laion2b_s32b_b79k")
    assert time.monotonic() - start < 10
    with pytest.raises(FileNotFoundError, match="neither a checkpoint file nor a known tag"):
        OpenCLIPTextEncoder("ViT-H-14", pretrained="/no/such/file.bin")
