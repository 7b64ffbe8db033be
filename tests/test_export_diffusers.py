"""Exported stages load into the diffusers Würstchen modules and compute what ours compute."""
import json

import pytest
import torch

from weights.checkpoint import save_safetensors
from weights.convert import load_stage_a_release, load_stage_b_release, load_stage_c_release
from weights.export_diffusers import main as export
from stages.stage_a import StageA
from stages.stage_b import StageB, StageBConfig
from stages.stage_c import StageC, StageCConfig
from tests.bad_input.conftest import assert_error, run_main, snapshot

wuerstchen = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen")

TINY_A = dict(widths=[8, 16], bottleneck_blocks=2, codebook_size=32)
TINY_B = StageBConfig(widths=(16, 32, 32), blocks=(1, 2, 1), heads=(0, 2, 4), inject_semantic=(False, True, True),
                      c_cond=16, c_text=24, dropout=0.0)
TINY_C = StageCConfig(width=32, depth=2, heads=4, c_text=24, dropout=0.0)


def _randomised(model, std=0.1):
    """Every parameter and floating buffer N(0, std) (BatchNorm variances positive), in eval mode."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point():
                t.normal_(0, std)
                if name.endswith("running_var"):
                    t.abs_().add_(0.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    models = {"stage_a": _randomised(StageA(TINY_A)), "stage_b": _randomised(StageB(TINY_B)),
              "stage_c": _randomised(StageC(TINY_C))}
    for stage, model in models.items():
        save_safetensors(model, root / f"{stage}.safetensors", stage, model.config.to_dict(),
                         extra={"text_encoder": "minilm", "latent_shift": 0.0, "latent_scale": 1.0}
                         if stage == "stage_c" else None)
    out = root / "diffusers"
    report = export(["--stage-a", str(root / "stage_a.safetensors"), "--stage-b", str(root / "stage_b.safetensors"),
                     "--stage-c", str(root / "stage_c.safetensors"), "--out", str(out)])
    return models, out, report, root


def _close(got, expected, tol=1e-5):
    scale = max(1.0, expected.abs().max().item())
    assert (got - expected).abs().max().item() <= tol * scale


def test_stage_a_loads_as_paella_vq_model(exported):
    models, out, report, _ = exported
    ours = models["stage_a"]
    ref = wuerstchen.PaellaVQModel.from_pretrained(out / "vqgan").eval()
    assert json.loads((out / "vqgan" / "config.json").read_text())["_class_name"] == "PaellaVQModel"
    images = torch.rand(2, 3, 32, 48)
    with torch.no_grad():
        latents = ours.encode(images)
        _close(latents * ours.config.scale_factor, ref.encode(images).latents)
        _close(ours.decode(latents), ref.decode(latents * ours.config.scale_factor).sample)
        _close(ours.decode(latents, quantize=True),
               ref.decode(latents * ours.config.scale_factor, force_not_quantize=False).sample)
    assert report["stages"]["stage_a"]["class"] == "PaellaVQModel"


def test_stage_b_loads_as_diffnext(exported):
    models, out, _, _ = exported
    ours = models["stage_b"]
    ref = wuerstchen.WuerstchenDiffNeXt.from_pretrained(out / "decoder").eval()
    x, sem, text, r = torch.randn(2, 4, 16, 24), torch.randn(2, 16, 3, 4), torch.randn(2, 7, 24), torch.tensor([.3, .9])
    with torch.no_grad():
        a, b = ours(x, r, sem, text)
        ref_a, ref_b = ref(x, r, sem, text, return_noise=False)
    _close(a, ref_a)
    _close(b.sigmoid() * (1 - 2e-3) + 1e-3, ref_b)  # diffusers returns the mapped B of the same head


def test_stage_c_loads_as_prior(exported):
    models, out, report, _ = exported
    ours = models["stage_c"]
    ref = wuerstchen.WuerstchenPrior.from_pretrained(out / "prior").eval()
    captured = {}
    ref.out.register_forward_hook(lambda m, i, o: captured.update(ab=o))
    x, text, r = torch.randn(2, 16, 3, 4), torch.randn(2, 7, 24), torch.tensor([0.2, 0.8])
    with torch.no_grad():
        eps = ref(x, r, text)
        a, b = ours(x, r, text)
    _close(torch.cat([a, b], 1), captured["ab"])
    _close((x - a) / ((1 - b).abs() + 1e-5), eps, 1e-4)  # eps amplifies rounding where B ~ 1
    entry = report["stages"]["stage_c"]
    assert entry["text_encoder"] == "minilm" and entry["prior_pipeline"] == {"latent_mean": 1.0, "latent_std": 0.0}


def test_export_is_the_inverse_of_convert(exported):
    """The converter reads the exported folders back into the same weights."""
    models, out, _, _ = exported
    for stage, load in (("stage_a", load_stage_a_release), ("stage_b", load_stage_b_release),
                        ("stage_c", load_stage_c_release)):
        folder = {"stage_a": "vqgan", "stage_b": "decoder", "stage_c": "prior"}[stage]
        back = load(out / folder).state_dict()
        own = models[stage].state_dict()
        assert set(back) == set(own) and all(torch.equal(back[k], own[k]) for k in own), stage


def test_what_diffusers_cannot_express_is_named_before_anything_is_written(exported, tmp_path, capsys):
    _, _, _, root = exported
    text_free = StageB(StageBConfig(widths=(16, 32), blocks=(1, 1), heads=(0, 2), inject_semantic=(False, True),
                                    c_cond=16, c_text=None))
    save_safetensors(text_free, tmp_path / "b.safetensors", "stage_b", text_free.config.to_dict())
    odd_a = StageA(dict(widths=[8, 24], bottleneck_blocks=1, codebook_size=16))
    save_safetensors(odd_a, tmp_path / "a.safetensors", "stage_a", odd_a.config.to_dict())
    before = snapshot(tmp_path)
    code, err = run_main(export, ["--stage-a", str(root / "stage_a.safetensors"), "--stage-b",
                                  str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "out")], capsys)
    assert_error(code, err, "Stage B", "c_text=None", "text-conditional")
    code, err = run_main(export, ["--stage-a", str(tmp_path / "a.safetensors"), "--out", str(tmp_path / "out")],
                         capsys)
    assert_error(code, err, "widths (8, 24)", "twice")
    code, err = run_main(export, ["--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "at least one of --stage-a" in err
    assert snapshot(tmp_path) == before  # the Stage A that could be exported was not written either


def test_never_overwrites_without_the_flag(exported, capsys):
    _, out, _, root = exported
    before = (out / "prior" / "diffusion_pytorch_model.safetensors").read_bytes()
    code, err = run_main(export, ["--stage-c", str(root / "stage_c.safetensors"), "--out", str(out)], capsys)
    assert_error(code, err, "prior exists", "--overwrite")
    assert (out / "prior" / "diffusion_pytorch_model.safetensors").read_bytes() == before
    code, _ = run_main(export, ["--stage-c", str(root / "stage_c.safetensors"), "--out", str(out), "--overwrite"],
                       capsys)
    assert code == 0 and (out / "prior" / "diffusion_pytorch_model.safetensors").read_bytes() == before
