"""Stage B: shapes, parameter counts, bad input, and equality with the released decoder's layout."""
import pytest
import torch

from pipeline.denoisers import denoiser_for
from weights.convert import load_stage_b_release, stage_b_config_from_release, stage_b_from_release
from stages.stage_b import PRESETS, StageB, StageBConfig, stage_b_config


def test_paper_parameter_count():
    with torch.device("meta"):
        model = StageB("paper")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 1055.4e6) / 1055.4e6 < 0.02, n


def test_tiny_shapes_and_zero_init_output():
    model = StageB("tiny").eval()
    x, sem = torch.randn(2, 4, 32, 24), torch.randn(2, 16, 3, 2)
    a, b = model(x, torch.rand(2), sem)
    assert a.shape == b.shape == x.shape
    assert a.abs().max() == 0  # zero-initialised output conv
    eps = denoiser_for(model)(x, torch.rand(2), sem)
    assert torch.allclose(eps, x / 0.5)  # sigmoid(0) = 0.5


def test_a_v_head_is_one_map_read_as_v():
    """``prediction: v`` (the tiny decoders): one map of Stage A's channels, read through the v parameterisation;
    a size dict may start from a preset."""
    model = StageB({"preset": "tiny", "prediction": "v"}).eval()
    assert model.config == stage_b_config("tiny").__class__(**{**vars(stage_b_config("tiny")), "prediction": "v"})
    x, sem, t = torch.randn(2, 4, 32, 32), torch.randn(2, 16, 3, 3), torch.rand(2)
    v = model(x, t, sem)
    assert torch.is_tensor(v) and v.shape == x.shape
    denoiser = denoiser_for(model)
    assert denoiser.describe()["parameterisation"] == "v"
    ab = denoiser.schedule.alpha_bar(t).view(-1, 1, 1, 1)
    assert torch.allclose(denoiser(x, t, sem), (1 - ab).sqrt() * x + ab.sqrt() * v)  # zero head: eps = sqrt(1-ab) x
    with pytest.raises(ValueError, match="prediction must be 'sigmoid_ab' or 'v'"):
        stage_b_config({"preset": "tiny", "prediction": "x0"})
    with pytest.raises(ValueError, match="unknown Stage B size 'small'"):
        stage_b_config({"preset": "small"})


def test_semantic_latents_change_the_output():
    model = StageB("tiny").eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.1)
    x = torch.randn(1, 4, 32, 32)
    r = torch.full((1,), 0.5)
    out1 = denoiser_for(model)(x, r, torch.randn(1, 16, 3, 3))
    out2 = denoiser_for(model)(x, r, torch.randn(1, 16, 3, 3))
    assert (out1 - out2).abs().max() > 1e-4


def test_bad_input_is_named():
    model = StageB("tiny")
    with pytest.raises(ValueError, match="multiple of 8"):
        model(torch.randn(1, 4, 30, 32), torch.rand(1), torch.randn(1, 16, 3, 3))
    with pytest.raises(ValueError, match="semantic latents"):
        model(torch.randn(1, 4, 32, 32), torch.rand(1), torch.randn(1, 8, 3, 3))
    text_model = StageB(StageBConfig(widths=(16, 32), blocks=(1, 1), heads=(0, 2), inject_semantic=(False, True),
                                     c_cond=16, c_text=8))
    with pytest.raises(ValueError, match="text-conditional"):
        text_model(torch.randn(1, 4, 8, 8), torch.rand(1), torch.randn(1, 16, 2, 2))


diffnext = pytest.importorskip("diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_diffnext")

SMALL = dict(c_cond=32, c_hidden=[16, 32, 64], nhead=[-1, 2, 4], blocks=[1, 2, 1], level_config=["CT", "CTA", "CTA"],
             inject_effnet=[False, True, True], clip_embd=24, dropout=0.0)


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def test_converted_release_matches_diffnext(tmp_path):
    ref = _randomised(diffnext.WuerstchenDiffNeXt(**SMALL))
    ref.save_pretrained(tmp_path / "decoder")
    ours = load_stage_b_release(tmp_path / "decoder")
    x, sem, text = torch.randn(2, 4, 16, 24), torch.randn(2, 16, 3, 4), torch.randn(2, 7, 24)
    r = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        expected = ref(x, r, sem, text)
        got = denoiser_for(ours)(x, r, sem, text)
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_paper_keys_map_one_to_one():
    with torch.device("meta"):
        ref = diffnext.WuerstchenDiffNeXt()
        ours = StageB("paper")
    state = ref.state_dict()
    config = stage_b_config_from_release(state, dict(ref.config))
    assert config == PRESETS["paper"]
    mapped = stage_b_from_release(state)
    own = ours.state_dict()
    assert set(mapped) == set(own)
    assert all(mapped[k].shape == own[k].shape for k in own)


def test_converter_rejects_other_models():
    with pytest.raises(ValueError, match="WuerstchenDiffNeXt"):
        stage_b_from_release({"foo.weight": torch.zeros(1)})
