"""Our open_clip token states equal what the released Würstchen pipelines feed Stages B and C:
transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` ``last_hidden_state`` with the
tokenizer's attention mask, at every position (padding included), on the same weights."""
import pytest
import torch

import json

from pipeline.text_encoder import CLIPTextEncoder, OpenCLIPTextEncoder, build_text_encoder

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

WIDTH, HEADS, LAYERS, CONTEXT = 64, 2, 2, 77
TINY_CLIP = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=1, width=32, patch_size=16, head_width=16),
                 text_cfg=dict(context_length=CONTEXT, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS))
PROMPTS = ["a red apple", "", "hi! a cat with 3 hats!!", "café ☕ 寿司"]


def transformers_state(clip) -> dict[str, torch.Tensor]:
    """open_clip's text tower in transformers' ``CLIPTextModelWithProjection`` names (same values)."""
    s = clip.state_dict()
    out = {"text_model.embeddings.token_embedding.weight": s["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": s["positional_embedding"],
           "text_model.final_layer_norm.weight": s["ln_final.weight"],
           "text_model.final_layer_norm.bias": s["ln_final.bias"],
           "text_projection.weight": s["text_projection"].T.contiguous()}
    for i in range(LAYERS):
        src, dst = f"transformer.resblocks.{i}.", f"text_model.encoder.layers.{i}."
        for name, value in zip(("q", "k", "v"), s[src + "attn.in_proj_weight"].chunk(3)):
            out[dst + f"self_attn.{name}_proj.weight"] = value
        for name, value in zip(("q", "k", "v"), s[src + "attn.in_proj_bias"].chunk(3)):
            out[dst + f"self_attn.{name}_proj.bias"] = value
        for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            for p in ("weight", "bias"):
                out[dst + f"{theirs}.{p}"] = s[src + f"{ours}.{p}"]
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Our encoder and transformers' models built from one random open_clip state dict."""
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None, **TINY_CLIP).eval()
    with torch.no_grad():  # weights large enough that masked and unmasked attention differ clearly
        for p in clip.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("clip") / "tiny_clip.pt"
    torch.save(clip.state_dict(), path)
    ours = OpenCLIPTextEncoder("ViT-B-32", pretrained=str(path), **TINY_CLIP)
    config = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=WIDTH, intermediate_size=4 * WIDTH,
                                         projection_dim=32, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                         max_position_embeddings=CONTEXT, hidden_act="gelu", layer_norm_eps=1e-5,
                                         bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    state = transformers_state(clip)
    with_projection = _loaded(transformers.CLIPTextModelWithProjection(config), state)
    plain = _loaded(transformers.CLIPTextModel(config), {k: v for k, v in state.items() if k != "text_projection.weight"})
    return ours, plain, with_projection, clip


def _loaded(model, state):
    """``state`` loaded strictly, its ``text_model.`` prefix dropped where this transformers version has none."""
    own = model.state_dict()
    model.load_state_dict({k if k in own else k.removeprefix("text_model."): v for k, v in state.items()})
    return model.eval()


def tokens_and_mask(prompts):
    """The ids our encoder uses and the attention mask a CLIP tokenizer gives them (1 up to <eot>)."""
    ids = open_clip.get_tokenizer("ViT-B-32", context_length=CONTEXT)(prompts)
    length = (ids == 49407).int().argmax(1) + 1
    return ids, (torch.arange(CONTEXT)[None] < length[:, None]).long()


@pytest.mark.parametrize("model", ["CLIPTextModel", "CLIPTextModelWithProjection"])
def test_states_equal_transformers_last_hidden_state_with_the_attention_mask(pair, model):
    ours, plain, with_projection, _ = pair
    reference = plain if model == "CLIPTextModel" else with_projection
    ids, mask = tokens_and_mask(PROMPTS)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    got = ours(PROMPTS)
    assert got.shape == expected.shape == (len(PROMPTS), CONTEXT, WIDTH)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # padding positions included
    assert bool((mask == 0).any())  # the comparison covers padding positions


def test_the_mask_matters_at_padding_positions(pair):
    """Without the attention mask (what this encoder computed before) padding states differ; prompt states do not."""
    ours, plain, _, _ = pair
    ids, mask = tokens_and_mask(PROMPTS)
    with torch.no_grad():
        unmasked = plain(input_ids=ids).last_hidden_state
    got = ours(PROMPTS)
    real = mask.bool()
    torch.testing.assert_close(got[real], unmasked[real], atol=1e-5, rtol=1e-5)  # causal: prompts see no padding
    assert (got[~real] - unmasked[~real]).abs().max() > 1e-2


def test_pooled_and_projected_states_match_text_embeds(pair):
    """Pooled at <eot> and projected, our states give transformers' ``text_embeds`` and open_clip's ``encode_text``."""
    ours, _, with_projection, clip = pair
    ids, mask = tokens_and_mask(PROMPTS)
    states = ours(PROMPTS)
    pooled = states[torch.arange(len(PROMPTS)), ids.argmax(-1)] @ clip.text_projection
    with torch.no_grad():
        torch.testing.assert_close(pooled, with_projection(input_ids=ids, attention_mask=mask).text_embeds,
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled, clip.encode_text(ids), atol=1e-5, rtol=1e-5)


def test_a_prompt_state_does_not_depend_on_its_batch(pair):
    ours, _, _, _ = pair
    ours.cache.clear()
    together = ours(PROMPTS)
    ours.cache.clear()
    alone = torch.cat([ours([p]) for p in PROMPTS])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-6)


def clip_tokenizer_files(folder):
    """A transformers ``CLIPTokenizer`` with open_clip's BPE vocabulary and merges, padding with id 0 ("!")
    as open_clip does, saved to ``folder``."""
    bpe = open_clip.SimpleTokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # CLIPTokenizer's names
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                                           model_max_length=CONTEXT)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_transformers_clip_encoder_from_a_pipeline_folder_equals_ours(pair, tmp_path):
    """``build_text_encoder("clip", path=...)`` on a pipeline folder (text_encoder/ + tokenizer/) gives the
    open_clip encoder's states: same tokens, same masked attention, every position."""
    ours, plain, _, _ = pair
    plain.save_pretrained(tmp_path / "pipeline" / "text_encoder")
    tokenizer = clip_tokenizer_files(tmp_path / "pipeline" / "tokenizer")
    # no "!": with "!" as its pad token, transformers splits a literal "!" off as that special token
    prompts = ["a red apple", "", "a cat with 3 hats", "café ☕ 寿司"]
    ids, mask = tokens_and_mask(prompts)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=CONTEXT, return_tensors="pt")
    assert torch.equal(tokens.input_ids, ids) and torch.equal(tokens.attention_mask, mask)  # one tokenisation
    clip = build_text_encoder("clip", path=tmp_path / "pipeline")
    assert isinstance(clip, CLIPTextEncoder) and (clip.max_tokens, clip.dim) == (CONTEXT, WIDTH)
    torch.testing.assert_close(clip(prompts), ours(prompts), atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="no CLIP text encoder folder"):
        CLIPTextEncoder(tmp_path / "missing")
