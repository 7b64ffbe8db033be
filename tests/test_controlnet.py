"""ControlNets on Stage C: zero-initialised projections leave Stage C unchanged bit for bit (v2, v3), the
filters, export and loading, the refusals (another Stage C, a mask that is not binary), the control image
resize note, the released layout round trip, CLI training and the sampler flags."""
import json
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from safetensors.torch import load_file, save_file

from benchmarks.controlnet_probe import main as controlnet_probe
from imagedata.filters import canny, check_mask, downscale, inpaint_control, random_masks
from pipeline.controlnet import Control, as_edge_map, control_of, load_control
from pipeline.text_to_image import load_text_to_image
from sample.__main__ import main as sample_main
from sample.evaluate_controlnet import edge_scores, masked_region_top5, masked_view, paired_sign_test
from sample.evaluate_controlnet import main as evaluate_controlnet
from semantic_compressor import SemanticCompressor
from stages.controlnet import ControlledStageC, ControlNet, controlnet_config
from stages.stable_cascade import StageC3
from stages.stage_c import StageC
from tests.bad_input.conftest import assert_error, run_main
from tests.tiny_stages import TINY_C, randomised
from train.cli import main as cli_main
from train.controlnet import ControlNetTraining
from weights.checkpoint import fingerprint, read_metadata, save_safetensors, save_tensors
from weights.convert import main as convert_main
from weights.convert_controlnet import config_from_release, to_release
from weights.loaders import load_compressor, load_controlnet, load_stage_c

# a ControlNet for tests/tiny_stages.py's Stage C (width 32, one block): random Lite0, small projections
TINY_CN = {"preset": "tiny", "c_out": 32, "c_hidden": 16, "blocks": [0]}
TINY_SC3 = {"widths": [32, 32], "heads": [2, 2], "blocks_down": [1, 1], "blocks_up": [1, 1], "c_cond": 32,
            "c_text": 384, "c_pooled": 384, "c_image": None, "dropout": [0.0, 0.0]}


def _nonzero(controlnet):
    with torch.no_grad():
        for p in controlnet.projections.parameters():
            p.normal_(0, 0.5)
    return controlnet


def test_untrained_controlnet_leaves_v2_stage_c_unchanged_bit_for_bit():
    torch.manual_seed(0)
    stage_c = randomised(StageC(TINY_C)).eval()
    controlnet = ControlNet(TINY_CN, pretrained=False).eval()
    x, r, text = torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 5, 384)
    control = torch.rand(2, 1, 96, 96)
    plain = stage_c(x, r, text)
    steered = ControlledStageC(stage_c, controlnet)(x, r, text, control)
    assert all(torch.equal(a, b) for a, b in zip(plain, steered))
    # trained (non-zero) projections do change it: the equality above is not vacuous
    changed = ControlledStageC(stage_c, _nonzero(controlnet))(x, r, text, control)
    assert not torch.equal(plain[0], changed[0])


def test_untrained_controlnet_leaves_v3_stage_c_unchanged_bit_for_bit():
    torch.manual_seed(0)
    stage_c = randomised(StageC3(TINY_SC3)).eval()
    assert stage_c.convnext_calls == 4
    controlnet = ControlNet({**TINY_CN, "stage": "stage_c3", "blocks": [0, 3]}, pretrained=False).eval()
    x, r, text, pooled = torch.randn(2, 16, 3, 3), torch.rand(2), torch.randn(2, 5, 384), torch.randn(2, 384)
    control = torch.rand(1, 1, 64, 64)  # one control for the whole batch
    plain = stage_c(x, r, text, pooled)
    assert torch.equal(plain, ControlledStageC(stage_c, controlnet)(x, r, text, pooled, control))
    assert not torch.equal(plain, ControlledStageC(stage_c, _nonzero(controlnet))(x, r, text, pooled, control))


def test_controlnet_for_another_stage_c_is_refused_naming_both():
    v2, v3 = StageC(TINY_C), StageC3(TINY_SC3)
    with pytest.raises(ValueError, match="made for a Würstchen v2 Stage C, but this Stage C is a Stable Cascade"):
        ControlledStageC(v3, ControlNet(TINY_CN, pretrained=False))
    with pytest.raises(ValueError, match=r"width 64 vs 32"):
        ControlledStageC(v2, ControlNet({**TINY_CN, "c_out": 64}, pretrained=False))
    with pytest.raises(ValueError, match="injects before ConvNeXt block 3, this Stage C has 1"):
        ControlledStageC(v2, ControlNet({**TINY_CN, "blocks": [3]}, pretrained=False))


def test_canny_draws_the_outline_of_a_square():
    image = torch.zeros(1, 3, 64, 64)
    image[..., 20:44, 20:44] = 1.0
    edges = canny(image)[0, 0]
    assert edges.shape == (64, 64) and set(edges.unique().tolist()) <= {0.0, 1.0}
    ys, xs = torch.nonzero(edges, as_tuple=True)
    near_outline = ((ys - 19.5).abs() <= 2) | ((ys - 43.5).abs() <= 2) | ((xs - 19.5).abs() <= 2) | \
        ((xs - 43.5).abs() <= 2)
    assert near_outline.all() and ys.min() >= 17 and ys.max() <= 46  # nothing inside or far outside
    for side in (edges[18:22, 24:40], edges[42:46, 24:40], edges[24:40, 18:22], edges[24:40, 42:46]):
        assert side.sum(dim=0 if side.shape[0] < side.shape[1] else 1).min() >= 1  # every side drawn throughout
    assert canny(torch.full((1, 3, 32, 32), 0.5)).sum() == 0


def test_inpaint_control_and_masks():
    images = torch.rand(3, 3, 32, 32)
    masks = random_masks(3, 32, 32, torch.Generator().manual_seed(0))
    control = inpaint_control(images, masks)
    assert control.shape == (3, 4, 32, 32)
    assert torch.equal(control[:, 3:], masks)
    keep = masks.expand(-1, 3, -1, -1) == 0
    assert torch.equal(control[:, :3][keep], images[keep]) and (control[:, :3][~keep] == 1).all()
    many = random_masks(600, 32, 32, torch.Generator().manual_seed(1), outpaint_prob=0.4)
    assert set(many.unique().tolist()) == {0.0, 1.0}
    share = many.mean(dim=(1, 2, 3))
    assert 0.33 < (share > 0.5).float().mean() < 0.47  # outpainting masks cover the rest of a kept region
    assert (random_masks(50, 32, 32, outpaint_prob=0.0).mean(dim=(1, 2, 3)) <= 0.55).all()


def test_a_mask_that_is_not_binary_is_refused():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:4, 2:4] = 0.5
    with pytest.raises(ValueError, match="the mask is not binary .*0.5.*pure black"):
        check_mask(mask)
    with pytest.raises(ValueError, match="not binary"):
        inpaint_control(torch.rand(1, 3, 8, 8), mask)


def test_edge_maps_are_used_as_they_are_and_photos_get_their_edges():
    edges = torch.zeros(1, 3, 16, 16)
    edges[..., 4, :] = 1.0
    assert torch.equal(as_edge_map(edges), edges[:, :1])
    assert as_edge_map(torch.rand(1, 3, 16, 16)) is None


def test_a_control_image_of_another_size_is_resized_with_a_note():
    control = Control(ControlNet(TINY_CN, pretrained=False).eval(), "cn")
    with pytest.warns(UserWarning, match=r"control image \(50x70\) was resized to 64x64"):
        features = control.features(torch.rand(1, 3, 50, 70), None, (64, 64))
    assert features[0].shape[:2] == (1, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        control.features(torch.rand(1, 3, 64, 64), None, (64, 64))


def _export(controlnet, path, **extra):
    return save_tensors(controlnet.trained_state_dict(), path, "controlnet", controlnet.config.to_dict(), extra=extra)


def test_export_and_load_round_trip(tmp_path):
    """A frozen-encoder ControlNet exports without the encoder and loads back with the packaged one."""
    torch.manual_seed(0)
    controlnet = _nonzero(ControlNet(TINY_CN)).eval()  # the packaged ImageNet Lite0, frozen
    path = _export(controlnet, tmp_path / "cn.safetensors")
    assert not any(k.startswith("backbone.") for k in load_file(path))
    loaded = load_controlnet(path)
    control = torch.rand(1, 1, 64, 64)
    assert torch.equal(controlnet(control)[0], loaded(control)[0])
    trained = ControlNet(controlnet_config(TINY_CN, "sr"), pretrained=False).eval()  # sr: its encoder trains, saved
    assert trained.config.train_encoder and trained.config.encoder == "bottleneck"
    assert torch.equal(load_controlnet(_export(trained, tmp_path / "sr.safetensors")).backbone[0].weight,
                       trained.backbone[0].weight)


def test_load_control_refuses_a_controlnet_trained_for_another_stage_c(tmp_path):
    stage_c, other = randomised(StageC(TINY_C)), randomised(StageC(TINY_C))
    path = _export(ControlNet(TINY_CN, pretrained=False), tmp_path / "cn.safetensors",
                   stage_c_fingerprint=fingerprint(other), stage_c_path="/runs/other_stage_c/model.safetensors")
    with pytest.raises(ValueError, match=r"trained for another Würstchen v2 Stage C \(/runs/other_stage_c/model"
                                         r"\.safetensors\) than Stage C mine\.safetensors \(fingerprint"):
        load_control(path, stage_c, "mine.safetensors")
    assert load_control(path, other, "other.safetensors").kind == "canny"
    not_controlnet = save_safetensors(stage_c, tmp_path / "c.safetensors", "stage_c", stage_c.config.to_dict())
    with pytest.raises(ValueError, match="is not a ControlNet export"):
        load_control(not_controlnet, stage_c, "mine.safetensors")


def _release_effnet_keys(c_in: int, c_out: int, hidden: int, n: int) -> dict[str, tuple]:
    """The released layout written out independently: StableCascade's ControlNet is torchvision's
    efficientnet_v2_s().features as ``backbone`` (first conv widened) plus bias-free projections."""
    features = torchvision.models.efficientnet_v2_s().features
    keys = {f"backbone.{k}": tuple(v.shape) for k, v in features.state_dict().items()}
    keys["backbone.0.0.weight"] = (24, c_in, 3, 3)
    for i in range(n):
        keys[f"projections.{i}.0.weight"] = (hidden, 1280, 1, 1)
        keys[f"projections.{i}.2.weight"] = (c_out, hidden, 1, 1)
    return keys


def test_release_layout_round_trip(tmp_path):
    """Random weights in the released inpainting layout -> our export -> the released layout, unchanged; and
    the keys and shapes are those of StableCascade's modules/controlnet.py."""
    torch.manual_seed(0)
    config = {"control": "inpaint", "encoder": "efficientnet_v2_s", "stage": "stage_c3", "c_out": 64,
              "c_hidden": 32, "blocks": [0, 3]}
    ours = ControlNet(config, pretrained=False)
    expected = _release_effnet_keys(4, 64, 32, 2)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    release = {k: torch.randn(v.shape) if v.is_floating_point() else v for k, v in ours.state_dict().items()}
    src = tmp_path / "inpainting.safetensors"
    save_file(release, str(src))
    assert config_from_release(release, (0, 3)).to_dict() == ControlNet(config, pretrained=False).config.to_dict()
    convert_main(["controlnet", "--src", str(src), "--out", str(tmp_path / "ours.safetensors"), "--blocks", "0,3"])
    assert read_metadata(tmp_path / "ours.safetensors")["stage"] == "controlnet"
    convert_main(["controlnet", "--src", str(tmp_path / "ours.safetensors"),
                  "--out", str(tmp_path / "back.safetensors"), "--to", "stablecascade"])
    back = load_file(tmp_path / "back.safetensors")
    assert back.keys() == release.keys() and all(torch.equal(back[k], release[k]) for k in release)
    with pytest.raises(ValueError, match="has 2 projections but 8 blocks"):
        config_from_release(release)


def test_release_sr_bottleneck_layout():
    """The super-resolution ControlNet's ``large`` bottleneck, keys as in StableCascade's modules/controlnet.py."""
    config = controlnet_config({"preset": "sc_big", "c_hidden": 8, "c_out": 16, "blocks": [0]}, "sr")
    model = ControlNet({**config.to_dict(), "expand": 32, "width": 8, "res_blocks": 2, "c_features": 12},
                       pretrained=False)
    expected = {"backbone.0.weight": (32, 16, 1, 1), "backbone.0.bias": (32,), "backbone.2.weight": (8, 32, 1, 1),
                "backbone.2.bias": (8,), "backbone.5.weight": (12, 8, 1, 1), "backbone.5.bias": (12,),
                "projections.0.0.weight": (8, 12, 1, 1), "projections.0.2.weight": (16, 8, 1, 1)}
    for block in (3, 4):
        for layer, shape in ((0, (8,)), (2, (8, 8, 3, 3)), (3, (8,)), (5, (8, 8, 3, 3))):
            expected[f"backbone.{block}.blocks.{layer}.weight"] = shape
            expected[f"backbone.{block}.blocks.{layer}.bias"] = (shape[0],)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected
    assert config_from_release(to_release(model), (0,)) == model.config


def _canny_controlnet_for(bundle, out):
    """A random (non-zero) canny ControlNet export for the bundle's Stage C."""
    torch.manual_seed(0)
    path = bundle / "stage_c.safetensors"
    return _export(_nonzero(ControlNet(TINY_CN, pretrained=False)), out,
                   stage_c_fingerprint=fingerprint(load_stage_c(str(path))), stage_c_path=str(path))


def test_sampler_control_flags(tiny_bundle, tmp_path):
    cn = _canny_controlnet_for(tiny_bundle, tmp_path / "cn.safetensors")
    edges = tmp_path / "edges.png"
    pixels = torch.zeros(64, 64, 3, dtype=torch.uint8)
    pixels[16:48, 16] = pixels[16:48, 47] = pixels[16, 16:48] = pixels[47, 16:48] = 255
    Image.fromarray(pixels.numpy()).save(edges)
    common = ["--stage-c", str(tiny_bundle / "stage_c.safetensors"),
              "--stage-b", str(tiny_bundle / "stage_b.safetensors"), "--prior-steps", "2", "--decoder-steps", "2", "--quiet", "--control", "canny", "--control-image",
              str(edges), "--controlnet", str(cn)]
    out = tmp_path / "steered.png"
    sample_main(["a square", *common, "--out", str(out)])
    with Image.open(out) as im:
        assert im.size == (64, 64)  # the control image's size
        assert "--control canny" in im.text["command"]
    zero = tmp_path / "zero.png"
    sample_main(["a square", *common, "--control-scale", "0", "--out", str(zero)])
    plain = tmp_path / "plain.png"
    sample_main(["a square", *common[:9], "--height", "64", "--width", "64", "--out", str(plain)])
    as_array = lambda p: torch.from_numpy(np.array(Image.open(p)))  # noqa: E731
    assert torch.equal(as_array(zero), as_array(plain))  # scale 0 is Stage C alone
    assert not torch.equal(as_array(out), as_array(plain))
    composed = tmp_path / "img2img.png"  # with img2img: the photo's latents noised to t = 0.5, then steered
    sample_main(["a square", *common, "--image", str(edges), "--strength", "0.5", "--out", str(composed)])
    with Image.open(composed) as im:
        assert im.size == (64, 64) and "--strength 0.5" in im.text["command"]


def test_sampler_control_refusals(tiny_bundle, tmp_path, capsys):
    cn = _canny_controlnet_for(tiny_bundle, tmp_path / "cn.safetensors")
    image = tmp_path / "photo.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(image)
    grey = tmp_path / "grey.png"
    Image.fromarray(torch.full((64, 64), 128, dtype=torch.uint8).numpy()).save(grey)
    base = ["a cat", "--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--out", str(tmp_path / "o.png")]
    with pytest.raises(SystemExit):
        sample_main([*base, "--control", "canny"])
    assert "--control and --control-image go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_main([*base, "--control", "inpaint", "--control-image", str(image)])
    assert "--control inpaint takes --mask" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample_main([*base, "--control", "canny", "--control-image", str(image), "--keep-unmasked"])
    assert "--keep-unmasked applies with --control inpaint" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--mask .*grey.png is not binary"):
        sample_main([*base, "--control", "inpaint", "--control-image", str(image), "--mask", str(grey),
                     "--controlnet", str(cn)])
    mask = tmp_path / "mask.png"
    Image.fromarray(torch.zeros(64, 64, dtype=torch.uint8).numpy()).save(mask)
    with pytest.raises(ValueError, match="is a canny ControlNet, but --control asks for inpaint"):
        sample_main([*base, "--control", "inpaint", "--control-image", str(image), "--mask", str(mask),
                     "--controlnet", str(cn), "--quiet"])


@pytest.mark.slow
def test_cli_training_few_steps(tiny_bundle, openmoji_dir, tmp_path):
    root = tmp_path / "runs"
    cli_main(["fit", "--config", "configs/controlnet/tiny_canny.yaml", "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
              "--model.init_args.stage_c", str(tiny_bundle / "stage_c.safetensors"),
              "--model.init_args.compressor", str(tiny_bundle / "compressor.safetensors"),
              "--model.init_args.stage_b", "null",
              "--model.init_args.size", json.dumps(TINY_CN), "--model.init_args.pretrained", "false",
              "--model.init_args.sample_steps", "2", "--model.init_args.decoder_steps", "2",
              "--model.init_args.grid_images", "2",
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "64",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--data.init_args.val_batch_size", "4"])
    run = root / "tiny_canny" / "version_0"
    meta = read_metadata(run / "model.safetensors")
    assert meta["stage"] == "controlnet" and meta["control"] == "canny"
    assert meta["stage_c_path"] == str((tiny_bundle / "stage_c.safetensors").resolve())
    assert "val/loss" in (run / "metrics.csv").read_text()
    controlnet = load_controlnet(run)
    assert controlnet.config.c_out == 32 and not controlnet.training
    # continuing from the export: its frozen encoder, left out of the file, comes from the new run's own
    module = ControlNetTraining(stage_c=str(tiny_bundle / "stage_c.safetensors"),
                                compressor=str(tiny_bundle / "compressor.safetensors"), size=TINY_CN,
                                pretrained=False, init_from=str(run))
    exported = load_file(run / "model.safetensors")
    assert exported and not any(k.startswith("backbone.") for k in exported)
    assert all(torch.equal(module.model.state_dict()[k], v) for k, v in exported.items())


def test_cli_training_refuses_a_stage_b_of_another_compressor(tiny_bundle, tmp_path):
    state = load_file(tiny_bundle / "stage_b.safetensors")
    meta = read_metadata(tiny_bundle / "stage_b.safetensors")
    extra = {k: v for k, v in meta.items() if k not in ("stage", "config", "checksum", "path")}
    save_tensors(state, tmp_path / "other_b.safetensors", "stage_b", meta["config"],
                 extra={**extra, "compressor_fingerprint": "0123456789abcdef"})
    with pytest.raises(ValueError, match="Stage B .*other_b.safetensors was trained on another semantic compressor"):
        cli_main(["fit", "--config", "configs/controlnet/tiny_canny.yaml", "--trainer.default_root_dir",
                  str(tmp_path / "runs"), "--model.init_args.stage_c", str(tiny_bundle / "stage_c.safetensors"),
                  "--model.init_args.compressor", str(tiny_bundle / "compressor.safetensors"),
                  "--model.init_args.stage_b", str(tmp_path / "other_b.safetensors"),
                  "--model.init_args.size", json.dumps(TINY_CN), "--model.init_args.pretrained", "false"])
    assert not (tmp_path / "runs").exists()


def test_sr_control_is_the_compressors_latents_of_the_half_size_image_upsampled():
    compressor = SemanticCompressor(pretrained=False, trainable="none").eval()
    images = torch.rand(2, 3, 128, 128)
    control = control_of("sr", images, compressor=compressor)
    half = compressor(downscale(images))
    assert control.shape == (2, 16, 2 * half.shape[-2], 2 * half.shape[-1])
    assert torch.allclose(control[..., ::2, ::2], half)
    features = ControlNet(controlnet_config(TINY_CN, "sr"), pretrained=False)(control)
    assert features[0].shape[:2] == (2, 32)


def test_edge_scores_and_the_paired_sign_test():
    control = torch.zeros(1, 1, 16, 16)
    control[..., 8, 2:14] = 1
    shifted = torch.roll(control, 1, dims=-2)  # the same line one pixel lower
    assert edge_scores(control, control, 0)["f1"] == 1.0
    assert edge_scores(shifted, control, 0)["f1"] == 0.0 and edge_scores(shifted, control, 1)["f1"] == 1.0
    report = paired_sign_test(torch.tensor([0.9] * 9 + [0.5]), torch.tensor([0.5] * 9 + [0.5]))
    assert report == {"images_higher_with": 9, "images_lower_with": 0, "images_tied": 1, "sign_test_p": 0.0039}
    assert paired_sign_test(torch.tensor([0.6, 0.4]), torch.tensor([0.5, 0.5]))["sign_test_p"] == 1.0


def test_masked_region_top5_compares_only_the_masked_region():
    candidates = torch.rand(12, 3, 8, 8)
    candidates[7], candidates[9] = 1 - candidates[3], 1 - candidates[5]  # the farthest (centred features: cosine -1)
    masks = torch.zeros(2, 1, 8, 8)
    masks[:, :, 2:6, 2:6] = 1
    generated = torch.rand(2, 3, 8, 8)  # outside the mask: noise, which must not count
    generated[0] = torch.where(masks[0].bool(), candidates[3], generated[0])
    generated[1] = torch.where(masks[1].bool(), candidates[5], generated[1])
    assert torch.equal(masked_view(generated, masks)[:, :, 0], torch.ones(2, 3, 8))
    centred = lambda views: views.flatten(1) - 0.5  # noqa: E731  (stands in for Inception)
    scores = masked_region_top5(centred, {"with": generated}, candidates, masks,
                                {"prompt": [3, 5], "unrelated": [7, 9]}, batch_size=5)
    assert {t: h.tolist() for t, h in scores["with"].items()} == {"prompt": [True, True], "unrelated": [False, False]}


def test_evaluate_controlnet_scores_with_and_without_per_image(tiny_bundle, openmoji_dir, tmp_path):
    cn = _canny_controlnet_for(tiny_bundle, tmp_path / "cn.safetensors")
    out = tmp_path / "eval.json"
    report = evaluate_controlnet(["--controlnet", str(cn), "--stage-c", str(tiny_bundle / "stage_c.safetensors"),
                                  "--stage-b", str(tiny_bundle / "stage_b.safetensors"),
                                  "--stage-a", str(tiny_bundle / "stage_a.safetensors"), "--data-dir", str(openmoji_dir),
                                  "--limit", "2", "--prior-steps", "2", "--decoder-steps", "2", "--gallery-limit", "8",
                                  "--tolerances", "0,2", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["val_images"] == [0, 184]
    for name in ("with_controlnet", "without_controlnet"):
        assert set(report[name]) == {"edges_tolerance_0px", "edges_tolerance_2px", "top5_retrieval_own_caption"}
    paired = report["edge_f1_per_image"]["tolerance_2px"]
    assert paired["images_higher_with"] + paired["images_lower_with"] + paired["images_tied"] == 2


def test_loss_weight_replaces_stage_cs_own_weight_only(tiny_bundle):
    kwargs = dict(stage_c=str(tiny_bundle / "stage_c.safetensors"), compressor=str(tiny_bundle / "compressor.safetensors"),
                  size=TINY_CN, pretrained=False)
    default = ControlNetTraining(**kwargs)
    own = default.denoiser(default.model)
    module = ControlNetTraining(**kwargs, loss_weight="v_mse")
    weighted = module.denoiser(module.model)
    assert own.loss_weight == default.prior.denoiser.loss_weight != "v_mse" and weighted.loss_weight == "v_mse"
    assert weighted.parameterisation.name == own.parameterisation.name
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(weighted.weight(t), 1 / weighted.schedule.alpha_bar(t))
    with pytest.raises(ValueError, match="loss_weight null .* got 'adaptive'"):
        ControlNetTraining(**kwargs, loss_weight="adaptive")


def test_input_scale_resizes_the_control_before_the_encoder():
    plain = ControlNet(TINY_CN, pretrained=False).eval()
    scaled = ControlNet({**TINY_CN, "input_scale": 2}, pretrained=False).eval()
    scaled.load_state_dict(plain.state_dict())
    control = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        assert plain.encode(control).shape[-2:] == (2, 2) and scaled.encode(control).shape[-2:] == (4, 4)
        big = torch.nn.functional.interpolate(control, scale_factor=2, mode="bilinear", align_corners=False)
        assert torch.equal(scaled.encode(control), plain.encode(big))
    assert controlnet_config(scaled.config.to_dict()).input_scale == 2.0
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="input_scale must be a positive number"):
            controlnet_config({**TINY_CN, "input_scale": bad})


# an inpaint ControlNet on compressor latents: the bottleneck encoder (tiny sizes) for the tiny bundle's Stage C
TINY_LATENT_INPAINT = {**TINY_CN, "control": "inpaint", "encoder": "bottleneck", "expand": 32, "width": 16,
                       "res_blocks": 1, "c_features": 16, "train_encoder": True}


def test_inpaint_control_as_latents_is_the_compressors_latents_of_the_masked_image_and_the_masks_share():
    torch.manual_seed(0)
    compressor = SemanticCompressor(pretrained=False, trainable="none").eval()
    images = torch.rand(2, 3, 128, 128)
    masks = torch.zeros(2, 1, 128, 128)
    masks[0, :, :64] = 1  # the top half of the first image
    control = control_of("inpaint", images, masks, compressor, latents=True)
    with torch.no_grad():
        expected = compressor(inpaint_control(images, masks)[:, :3])
    assert control.shape == (2, 17, *expected.shape[-2:])
    assert torch.equal(control[:, :16], expected)
    h = expected.shape[-2]
    assert control[0, 16, : h // 2].eq(1).all() and control[0, 16, h // 2 + 1:].eq(0).all()
    assert control[1, 16].eq(0).all()
    assert torch.equal(control_of("inpaint", images, masks), inpaint_control(images, masks))  # the image control
    with pytest.raises(ValueError, match="needs the semantic compressor"):
        control_of("inpaint", images, masks, latents=True)
    config = controlnet_config(TINY_LATENT_INPAINT)
    assert config.takes_latents and config.c_in == 17 and not controlnet_config(TINY_CN, "inpaint").takes_latents
    assert ControlNet(config, pretrained=False)(control)[0].shape == (2, 32, *expected.shape[-2:])
    with pytest.raises(ValueError, match="the bottleneck encoder takes compressor latents: control sr or inpaint, "
                                         "not canny"):
        controlnet_config({**TINY_LATENT_INPAINT, "control": "canny"})


def _latent_inpaint_controlnet_for(bundle, out):
    """A random (non-zero) inpaint ControlNet on compressor latents for the bundle's Stage C."""
    torch.manual_seed(0)
    stage_c = bundle / "stage_c.safetensors"
    return _export(_nonzero(ControlNet(TINY_LATENT_INPAINT, pretrained=False)), out,
                   stage_c_fingerprint=fingerprint(load_stage_c(str(stage_c))), stage_c_path=str(stage_c),
                   compressor_fingerprint=fingerprint(load_compressor(bundle / "compressor.safetensors")))


def test_sampling_and_evaluating_with_an_inpaint_controlnet_on_latents(tiny_bundle, openmoji_dir, tmp_path):
    stage_c = tiny_bundle / "stage_c.safetensors"
    compressor = tiny_bundle / "compressor.safetensors"
    cn = _latent_inpaint_controlnet_for(tiny_bundle, tmp_path / "cn.safetensors")
    image, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.fromarray((torch.rand(64, 64, 3) * 255).byte().numpy()).save(image)
    pixels = torch.zeros(64, 64, dtype=torch.uint8)
    pixels[:32] = 255
    Image.fromarray(pixels.numpy()).save(mask)
    common = ["a cat", "--stage-c", str(stage_c), "--stage-b", str(tiny_bundle / "stage_b.safetensors"),
              "--prior-steps", "2", "--decoder-steps", "2", "--quiet", "--control", "inpaint", "--control-image",
              str(image), "--mask", str(mask), "--controlnet", str(cn)]
    out = tmp_path / "steered.png"
    sample_main([*common, "--out", str(out)])  # the compressor is found beside Stage C
    zero = tmp_path / "zero.png"
    sample_main([*common, "--control-scale", "0", "--out", str(zero)])
    as_array = lambda p: torch.from_numpy(np.array(Image.open(p)))  # noqa: E731
    assert not torch.equal(as_array(out), as_array(zero))
    report = evaluate_controlnet(["--controlnet", str(cn), "--stage-c", str(stage_c), "--stage-b",
                                  str(tiny_bundle / "stage_b.safetensors"), "--data-dir", str(openmoji_dir),
                                  "--limit", "2",
                                  "--stage-a", str(tiny_bundle / "stage_a.safetensors"), "--prior-steps", "2",
                                  "--decoder-steps", "2", "--gallery-limit", "8"])
    assert set(report["with_controlnet"]) >= {"psnr_outside_mask_db", "psnr_inside_mask_db"}
    regions = report["with_controlnet"]["masked_region_top5"]
    assert set(regions) == {"prompt", "source", "unrelated", "prompt_vs_unrelated"}
    assert sum(regions["prompt_vs_unrelated"][k] for k in ("images_higher_with", "images_lower_with", "images_tied")) == 2
    kept = tmp_path / "kept.png"  # the CLI flag: the compressor is found beside Stage C
    sample_main([*common, "--keep-unmasked", "--out", str(kept)])
    assert "--keep-unmasked" in Image.open(kept).text["command"]
    # held latents: where the mask leaves a latent cell whole, Stage C's latents are the photo's
    pipe = load_text_to_image(stage_c, tiny_bundle / "stage_b.safetensors", tiny_bundle / "stage_a.safetensors",
                              compressor=compressor)
    pipe.attach_control(load_control(cn, pipe.prior.model, stage_c, pipe.compressor))
    photo, repaint = torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64)
    repaint[..., :32, :] = 1
    request = dict(height=64, width=64, prior_steps=4, decoder_steps=2, progress=False, control_image=photo,
                   mask=repaint, return_latents=True)
    _, held = pipe("a cat", keep_unmasked=True, **request)
    _, free = pipe("a cat", **request)
    photo_latents = pipe.encode(photo)
    grid = photo_latents.shape[-2]
    whole = slice(grid // 2 + (grid % 2), None)  # rows below the mask's edge (64 px: 2x2 grid, row 1)
    error = lambda latents, rows: float((latents[..., rows, :] - photo_latents[..., rows, :]).abs().max())  # noqa: E731
    assert error(held, whole) < 0.01 * error(free, whole)  # up to the noise a sampler leaves at t = 0
    assert not torch.equal(held[..., :grid // 2, :], photo_latents[..., :grid // 2, :])  # the masked rows: sampled
    with pytest.raises(ValueError, match="keep_unmasked holds what the mask keeps"):
        load_text_to_image(stage_c, tiny_bundle / "stage_b.safetensors", tiny_bundle / "stage_a.safetensors")(
            "a cat", keep_unmasked=True, height=64, width=64, prior_steps=2, decoder_steps=2, progress=False)
    control = load_control(cn, load_stage_c(str(stage_c)), stage_c)  # no compressor given: refused when used
    with pytest.raises(ValueError, match="takes compressor latents: it needs the semantic compressor"):
        control.features(torch.rand(1, 3, 64, 64), torch.zeros(1, 1, 64, 64), (64, 64))


def test_controlnet_probe_scores_the_kept_and_masked_cells_with_both_controls(tiny_bundle, openmoji_dir, tmp_path,
                                                                              capsys):
    cn = _latent_inpaint_controlnet_for(tiny_bundle, tmp_path / "cn.safetensors")
    common = ["--controlnet", str(cn), "--stage-c", str(tiny_bundle / "stage_c.safetensors"), "--compressor",
              str(tiny_bundle / "compressor.safetensors"), "--data-dir", str(openmoji_dir), "--size", "64"]
    out = tmp_path / "probe.json"
    report = controlnet_probe([*common, "--images", "3", "--times", "0.5,0.9", "--out", str(out)])
    assert json.loads(out.read_text()) == report and report["images"] == 3 and 0 < report["kept_cell_share"] < 1
    assert set(report["x0_mse"]) == {"t=0.5", "t=0.9"}
    scores = report["x0_mse"]["t=0.9"]
    assert set(scores) == {"image_control", "fully_masked_control"}
    assert all(v >= 0 for c in scores.values() for v in c.values())
    assert scores["image_control"] != scores["fully_masked_control"]  # the (random) ControlNet sees the image
    code, err = run_main(controlnet_probe, [*common, "--times", "0.5,1"], capsys)
    assert_error(code, err, "--times must lie in (0, 1)")
    canny = _canny_controlnet_for(tiny_bundle, tmp_path / "canny.safetensors")
    code, err = run_main(controlnet_probe, [*common[2:], "--controlnet", str(canny)], capsys)
    assert_error(code, err, "is a canny ControlNet; this probe scores inpaint ControlNets")
