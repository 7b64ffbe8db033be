"""Stage A model: sizes, shapes, clear errors, safe checkpoints."""
import pytest
import torch

from weights.checkpoint import save_safetensors
from stages.stage_a import StageA, stage_a_config
from weights.loaders import load_stage_a


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_paper_config_has_18_4M_params_on_meta():
    with torch.device("meta"):
        model = StageA("paper")
    assert abs(n_params(model) - 18.4e6) / 18.4e6 < 0.02, n_params(model)


def test_tiny_encode_decode_shapes_any_multiple_of_4():
    model = StageA("tiny").eval()
    x = torch.rand(2, 3, 20, 36)
    z = model.encode(x)
    assert z.shape == (2, 4, 5, 9)
    assert model.decode(z).shape == x.shape
    zq = model.encode(x, quantize=True)
    # quantised latents are codebook entries (scaled)
    codes = model.quantizer.codebook.weight / model.config.scale_factor
    flat = zq.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(flat, codes).min(1).values.max() < 1e-4


@pytest.mark.parametrize("shape,match", [
    ((1, 3, 30, 32), "divisible by 4"),
    ((1, 1, 32, 32), "RGB"),
    ((1, 4, 32, 32), "RGB"),
    ((3, 32, 32), "RGB"),
])
def test_bad_image_shapes_get_clear_errors(shape, match):
    with pytest.raises(ValueError, match=match):
        StageA("tiny").encode(torch.rand(shape))


def test_bad_latent_shape():
    with pytest.raises(ValueError, match="latents of shape"):
        StageA("tiny").decode(torch.rand(1, 16, 8, 8))


def test_unknown_size():
    with pytest.raises(ValueError, match="choose one of"):
        stage_a_config("huge")


def test_safetensors_round_trip_and_mismatch(tmp_path):
    model = StageA("tiny")
    path = save_safetensors(model, tmp_path / "a.safetensors", "stage_a", model.config.to_dict())
    loaded = load_stage_a(str(path))
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.encode(x), model.eval().encode(x))
    with pytest.raises(FileExistsError):  # never overwrites by accident
        save_safetensors(model, path, "stage_a", model.config.to_dict())
    with pytest.raises(ValueError, match="not the requested"):
        load_stage_a(str(path), "paper")
    # a file whose metadata is absent is checked against the model's keys and shapes
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in StageA(dict(widths=[16, 32], bottleneck_blocks=1)).state_dict().items()},
              str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="does not match this model's configuration"):
        load_stage_a(str(tmp_path / "bare.safetensors"), "tiny")


def test_missing_corrupt_and_foreign_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_stage_a(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_stage_a(str(bad))
    model = StageA("tiny")
    other = save_safetensors(model, tmp_path / "b.safetensors", "stage_b", {})
    with pytest.raises(ValueError, match="stage_b model, not a stage_a"):
        load_stage_a(str(other))
    garbage = tmp_path / "x.ckpt"
    garbage.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        load_stage_a(str(garbage))
