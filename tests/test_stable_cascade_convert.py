"""Stable Cascade (v3) weights through the commands: ``weights.convert`` recognises the version in both
layouts and writes them back bit-exact, ``weights.export_diffusers`` writes ``StableCascadeUNet`` folders,
and a v2 checkpoint where v3 is expected (and back) is a one-line error naming both."""
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from weights.checkpoint import save_safetensors
from weights.convert import main as convert
from weights.convert_cascade import diffusers_config, to_release
from weights.export_diffusers import main as export, save_diffusers
from stages.stable_cascade import StageB3, StageC3
from weights.loaders import load_stage_b3, load_stage_c3, load_stage_c
from stages.stage_c import StageC
from tests.bad_input.conftest import assert_error, run_main
from tests.test_stable_cascade import B_CONFIG, C_CONFIG, randomised

# width // 64 heads and the release's dropout: converts without a config.json
C_RELEASE_HEADS = replace(C_CONFIG, widths=(64, 64), heads=(1, 1), dropout=(0.1, 0.1))

diffusers = pytest.importorskip("diffusers", minversion="0.27")
from diffusers.models.unets.unet_stable_cascade import StableCascadeUNet  # noqa: E402


def same_state(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_repository_checkpoint_converts_and_goes_back_bit_exact(tmp_path):
    model = randomised(StageC3(C_RELEASE_HEADS))
    release = to_release(model, "stablecascade")
    save_file(release, str(tmp_path / "stage_c.safetensors"))
    convert(["stage_c", "--src", str(tmp_path / "stage_c.safetensors"), "--out", str(tmp_path / "ours.safetensors")])
    ours = load_stage_c3(str(tmp_path / "ours.safetensors"))
    assert ours.config == C_RELEASE_HEADS and same_state(ours.state_dict(), model.state_dict())
    for layout in ("stablecascade", "diffusers"):
        convert(["stage_c", "--src", str(tmp_path / "ours.safetensors"), "--to", layout,
                 "--out", str(tmp_path / f"back_{layout}.safetensors")])
        assert same_state(load_file(str(tmp_path / f"back_{layout}.safetensors")), to_release(model, layout))


def test_diffusers_folder_converts_and_exports_as_stable_cascade_unet(tmp_path):
    model = randomised(StageB3(B_CONFIG))
    save_diffusers(diffusers_config(model.config), to_release(model, "diffusers"), tmp_path / "decoder")
    convert(["stage_b", "--src", str(tmp_path / "decoder"), "--out", str(tmp_path / "b.safetensors")])
    ours = load_stage_b3(str(tmp_path / "b.safetensors"))
    assert ours.config == B_CONFIG and same_state(ours.state_dict(), model.state_dict())
    export(["--stage-b", str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "exported")])
    unet = StableCascadeUNet.from_pretrained(tmp_path / "exported" / "decoder").eval()
    x, r, semantic, pooled = torch.randn(2, 4, 16, 24), torch.rand(2), torch.randn(2, 16, 3, 4), torch.randn(2, 1, 12)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, r, clip_text_pooled=pooled, effnet=semantic).sample,
                                   ours(x, r, semantic, pooled), rtol=1e-4, atol=1e-5)


def test_versions_and_stages_are_told_apart_in_one_line(tmp_path, capsys):
    v2 = StageC("tiny")
    save_safetensors(v2, tmp_path / "v2.safetensors", "stage_c", v2.config.to_dict())
    v3 = StageC3("tiny")
    save_safetensors(v3, tmp_path / "v3.safetensors", "stage_c3", v3.config.to_dict())
    with pytest.raises(ValueError, match=r"Würstchen v2 Stage C \(stage_c\).*Stable Cascade \(v3\) Stage C"):
        load_stage_c3(str(tmp_path / "v2.safetensors"))
    with pytest.raises(ValueError, match="stage_c3.*stage_c"):
        load_stage_c(str(tmp_path / "v3.safetensors"))
    with pytest.raises(ValueError, match=r"Stable Cascade \(v3\) Stage C \(stage_c3\).*v3\) Stage B"):
        load_stage_b3(str(tmp_path / "v3.safetensors"))
    save_file(to_release(randomised(StageB3(B_CONFIG)), "stablecascade"), str(tmp_path / "stage_b.safetensors"))
    code, err = run_main(convert, ["stage_c", "--src", str(tmp_path / "stage_b.safetensors"),
                                   "--out", str(tmp_path / "x.safetensors")], capsys)
    assert_error(code, err, "Stable Cascade Stage B", "not a Stage C")
    code, err = run_main(convert, ["stage_c", "--src", str(tmp_path / "v2.safetensors"), "--to", "diffusers",
                                   "--out", str(tmp_path / "y.safetensors")], capsys)
    assert_error(code, err, "Würstchen v2 Stage C", "Stable Cascade (v3) Stage C")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
