"""Stable Cascade's previewer: the release's layout (keys ``blocks.<i>.*``) loads from a bare safetensors file
and previews latents at 8x their side; our previewer exports still load through the same function."""
import torch
from safetensors.torch import save_file

from stages.cascade_previewer import CascadePreviewer
from weights.loaders import load_any_previewer
from stages.previewer import Previewer


def test_release_previewer_file_loads_and_previews(tmp_path):
    model = CascadePreviewer(c_hidden=64).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    assert [k for k in model.state_dict() if k.endswith("weight")][:3] == ["blocks.0.weight", "blocks.2.weight",
                                                                              "blocks.3.weight"]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "previewer.safetensors"))
    loaded = load_any_previewer(tmp_path / "previewer.safetensors")
    latents = torch.randn(2, 16, 3, 5)
    with torch.no_grad():
        out = loaded(latents)
        assert out.shape == (2, 3, 24, 40) and out.min() >= 0 and out.max() <= 1
        assert torch.equal(out, model(latents).clamp(0, 1))
    with torch.device("meta"):  # the release's c_hidden = 512
        assert sum(p.numel() for p in CascadePreviewer().parameters()) > 3e6


def test_our_previewer_exports_still_load():
    assert isinstance(load_any_previewer("checkpoints/tiny/previewer.safetensors"), Previewer)
