"""Image variations and img2img through the semantic compressor (API and CLI, both decoders), and
negative prompts reaching text-conditional decoders."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from common.errors import run_command
from imagedata.embedded import openmoji_split
from pipeline.decoders import PixelDecoder, SemanticDecoder
from pipeline.text_encoder import TextEncoder
from pipeline.text_to_image import (
    Prior,
    TextToImage,
    load_pixel_text_to_image,
    load_text_to_image,
)
from sample.__main__ import main
from semantic_compressor import normalize_latents
from stages.pixel_decoder import ShallowUViT, grow, growth_plan
from stages.stage_a import StageA
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig
from tests.tiny_stages import randomised
from weights.checkpoint import read_metadata, save_safetensors

GRID3 = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny_grid3"
FAST = dict(prior_steps=4, decoder_steps=2, progress=False)


@pytest.fixture(scope="module")
def bundle(tiny_bundle_copy):
    """The tiny random stages (``tiny_bundle``) and a grown pixel decoder that records their compressor."""

    out = tiny_bundle_copy("variations_bundle")
    torch.manual_seed(0)
    small = dict(resolution=32, core_grid=8, entry_channels=16, width=32, depth=1, heads=2, c_t=32,
                 **{k: list(v) for k, v in growth_plan((8, 16, 16), blocks=(0, 1, 1)).items()})
    grown = randomised(grow(ShallowUViT(small), 64))
    fp = read_metadata(out / "stage_c.safetensors")["compressor_fingerprint"]
    save_safetensors(grown, out / "pixel.safetensors", "pixel_decoder", grown.config.to_dict(),
                     extra={"compressor_fingerprint": fp, "semantic_size": 64, "logsnr_shift": -1.39})
    return out


@pytest.fixture(scope="module")
def pipes(bundle):
    kw = dict(compressor=bundle / "compressor.safetensors")
    return {"stage_b": load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                                          bundle / "stage_a.safetensors", **kw),
            "pixel": load_pixel_text_to_image(bundle / "stage_c.safetensors", bundle / "pixel.safetensors", **kw)}


@pytest.mark.parametrize("decoder", ["stage_b", "pixel"])
def test_variations_decode_the_images_own_latents(pipes, decoder):
    pipe = pipes[decoder]
    images = torch.rand(2, 3, 64, 96)
    out, latents = pipe.variations(images, 3, decoder_steps=2, seed=1, progress=False, return_latents=True)
    assert out.shape == (6, 3, 64, 96)  # the images' size, three per image, image-major
    with torch.no_grad():
        own = pipe.compressor(images)
    assert torch.allclose(latents, own.repeat_interleave(3, 0), atol=1e-6)
    again = pipe.variations(images, 3, decoder_steps=2, seed=1, progress=False)
    assert torch.equal(out, again) and not torch.equal(out[0], out[1])  # seeded; variations differ
    assert pipe.variations(images, 1, height=48, width=48, decoder_steps=2, progress=False).shape == (2, 3, 48, 48)


@pytest.mark.parametrize("decoder", ["stage_b", "pixel"])
def test_img2img_starts_stage_c_from_the_noised_image_latents(pipes, decoder):
    pipe = pipes[decoder]
    image = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        target = normalize_latents(pipe.compressor(image), pipe.prior.latent_shift, pipe.prior.latent_scale)

    def distance(strength):
        _, latents = pipe(["a cat", "a dog"], image=image, strength=strength, seed=2, return_latents=True,
                          prior_steps=10, decoder_steps=2, progress=False)
        normalized = normalize_latents(latents, pipe.prior.latent_shift, pipe.prior.latent_scale)
        return (normalized - target).pow(2).mean().sqrt().item()

    near, mid, far = distance(0.05), distance(0.5), distance(1.0)
    assert near < mid < far and near < 0.2 * far
    images = pipe("a cat", image=image, strength=0.5, **FAST)
    assert images.shape == (1, 3, 64, 64)
    assert torch.equal(images, pipe("a cat", image=image, strength=0.5, **FAST))


def test_img2img_runs_the_stage_c_steps_below_the_strength(pipes, monkeypatch):
    """``prior_steps`` n at strength s runs round(n s) steps from t = s; the decoder runs all of its own."""
    pipe, seen = pipes["stage_b"], []
    original = pipe.prior.denoiser.network.forward

    def spy(x, r, text):
        seen.append(float(r[0]))
        return original(x, r, text)

    monkeypatch.setattr(pipe.prior.denoiser.network, "forward", spy)
    pipe("a cat", image=torch.rand(1, 3, 64, 64), strength=0.6, prior_steps=10, prior_guidance=1.0,
         decoder_steps=2, progress=False)
    assert seen == pytest.approx([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])


def test_shipped_variations_resemble_their_image(openmoji_dir):
    """With the shipped checkpoints, each variation's compressor latents are nearer its own emoji's than
    any other image's of the batch (cosine)."""
    pipe = load_text_to_image(GRID3 / "stage_c.safetensors", GRID3 / "stage_b.safetensors",
                              GRID3 / "stage_a.safetensors", compressor=GRID3 / "compressor.safetensors")
    samples = openmoji_split(openmoji_dir, "val", 128, 40)[::10]  # 4 different emoji
    images = torch.stack([s["image"] for s in samples])
    out = pipe.variations(images, progress=False)
    with torch.no_grad():
        source, back = pipe.compressor(images).flatten(1), pipe.compressor(out).flatten(1)
    similarity = torch.nn.functional.normalize(back, dim=1) @ torch.nn.functional.normalize(source, dim=1).T
    assert torch.equal(similarity.argmax(1), torch.arange(len(images)))


def test_cli_variations_and_img2img(bundle, tmp_path, capsys):
    source = tmp_path / "in.png"
    Image.fromarray((torch.rand(64, 80, 3) * 255).byte().numpy()).save(source)
    common = ["--stage-c", str(bundle / "stage_c.safetensors"), "--stage-b", str(bundle / "stage_b.safetensors"),
              "--decoder-steps", "2", "--prior-steps", "4", "--quiet"]  # compressor found beside Stage C
    paths = run_command(main, ["--image", str(source), "--n", "2", "--out", str(tmp_path / "v.png"), *common])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["mode"] == "variations" and len(paths) == 3 and printed["size"] == [64, 80]
    run_command(main, ["a cat", "--image", str(source), "--strength", "0.4", "--out", str(tmp_path / "i.png"),
                       "--decoder", "pixel", "--pixel-decoder", str(bundle / "pixel.safetensors"), *common])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["mode"] == "img2img" and (tmp_path / "i.png").exists()


# -- negative prompts ---------------------------------------------------------------------------------
class HashEncoder(TextEncoder):
    """A tiny deterministic text encoder (states from a seeded generator per prompt) that records its prompts."""

    dim, max_tokens = 8, 4

    def __init__(self):
        super().__init__(cache_size=0)
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # gives the module a device
        self.seen: list[str] = []
        self.freeze()

    def encode_uncached(self, prompts):
        self.seen += prompts
        return torch.stack([torch.randn(self.max_tokens, self.dim, generator=torch.Generator().manual_seed(
            sum(map(ord, p)) + 1)) for p in prompts])


def _text_pipe(decoder_kind: str):
    torch.manual_seed(0)
    encoder = HashEncoder()
    prior = Prior(randomised(StageC(StageCConfig(width=32, depth=1, heads=2, c_text=8, dropout=0.0))), encoder,
                  0.0, 1.0)
    if decoder_kind == "stage_b":
        b = StageB(StageBConfig(widths=(16, 32), blocks=(1, 1), heads=(0, 2), inject_semantic=(False, True),
                                c_cond=16, c_text=8, dropout=0.0))
        decoder = SemanticDecoder(randomised(b), StageA(dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=8)),
                                  encoder)
    else:
        model = ShallowUViT(dict(resolution=32, core_grid=8, entry_channels=16, width=32, depth=1, heads=2, c_t=32,
                                 c_text=8))
        decoder = PixelDecoder(randomised(model), text_encoder=encoder, semantic_size=64)
    return TextToImage(prior, decoder).eval(), encoder


@pytest.mark.parametrize("decoder", ["stage_b", "pixel"])
def test_negative_prompt_reaches_a_text_conditional_decoder(decoder):
    pipe, encoder = _text_pipe(decoder)
    common = dict(height=64, width=64, prior_steps=2, decoder_steps=2, seed=3, progress=False)
    plain = pipe("a red apple", **common)
    encoder.seen.clear()
    negative = pipe("a red apple", negative_prompt="green leaves", **common)
    assert encoder.seen.count("green leaves") == 2  # Stage C's unconditional branch and the decoder's
    assert not torch.equal(plain, negative)


def test_decoder_uses_the_negative_prompt_as_its_unconditional_text():
    pipe, _ = _text_pipe("stage_b")
    semantic, generator = torch.randn(1, 16, 2, 2), lambda: torch.Generator().manual_seed(0)
    run = lambda negatives, guidance=3.0: pipe.decoder(semantic, (64, 64), ["sun"], 2, guidance, generator(),  # noqa: E731
                                                       negative_prompts=negatives)
    assert torch.equal(run(None), run([""]))  # no negative prompt: the empty prompt, as before
    assert not torch.equal(run(None), run(["moon"]))
    assert torch.equal(run(None, 1.0), run(["moon"], 1.0))  # no guidance: no unconditional branch
