"""LoRA adapters (weights.lora): training only the adapters, small files that name their base, loading with
scales, merging, refusing adapters of another base, and the training and sampling command lines."""
import json

import pytest
import torch

from common.errors import run_command
from pipeline.text_to_image import load_prior, load_text_to_image
from sample.__main__ import main as sample_main
from stages.stage_b import StageB
from stages.stage_c import StageC
from tests.tiny_stages import TINY_B, TINY_C, randomised
from train.cli import main as cli_main
from train.stage_b import StageBTraining
from train.stage_c import StageCTraining
from weights.checkpoint import fingerprint, read_metadata
from weights.loaders import load_stage_c
from weights.lora import (
    add_lora,
    base_state,
    load_loras,
    merged_state,
    parse_lora,
    save_adapter,
)
from weights.lora import main as lora_main


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 16, 4, 4, generator=g), torch.rand(2, generator=g), torch.randn(2, 5, 384, generator=g)


def _out(model):
    return torch.cat([o.flatten() for o in model(*_inputs())])


@pytest.fixture(scope="module")
def bundle(tiny_bundle_copy):
    """The tiny random stages (``tiny_bundle``) and a trained-looking adapter on their Stage C."""
    out = tiny_bundle_copy("lora_bundle")
    torch.manual_seed(0)
    c = _base(out)
    settings = add_lora(c, rank=2, alpha=4.0)
    with torch.no_grad():  # B starts at zero: give the adapter an effect
        for name, p in c.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_adapter(c, out / "adapter.safetensors", "stage_c", settings)
    return out


def _base(bundle):
    return load_stage_c(str(bundle / "stage_c.safetensors")).eval()


def test_adapters_train_and_the_base_does_not():
    model = randomised(StageC(TINY_C), 0.05).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    settings = add_lora(model, rank=2, alpha=2.0)
    assert settings["base_fingerprint"] == fingerprint(_load_plain(before))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = _out(model).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(torch.equal(before[k], v) for k, v in base_state(model).items())
    assert set(base_state(model)) == set(before)
    assert any(not torch.equal(adapters[n], p) for n, p in model.named_parameters() if n in adapters)


def _load_plain(state):
    model = StageC(TINY_C)
    model.load_state_dict(state)
    return model


def test_adapter_file_is_small_and_names_its_base(bundle):
    path = bundle / "adapter.safetensors"
    meta = read_metadata(path)
    assert meta["stage"] == "lora" and meta["base_stage"] == "stage_c"
    assert meta["base_fingerprint"] == fingerprint(_base(bundle))
    assert meta["config"]["rank"] == 2 and meta["config"]["alpha"] == 4.0
    assert "to_q" in meta["config"]["target_modules"]
    assert path.stat().st_size < (bundle / "stage_c.safetensors").stat().st_size / 4


def test_scale_zero_gives_the_base_and_scales_are_linear(bundle):
    reference = _out(_base(bundle))
    zero = load_loras(_base(bundle), [(bundle / "adapter.safetensors", 0.0)], "stage_c")
    assert torch.equal(_out(zero), reference)
    one = _out(load_loras(_base(bundle), [(bundle / "adapter.safetensors", 1.0)], "stage_c"))
    assert not torch.allclose(one, reference, atol=1e-4)
    # two copies at 0.5 each give the same update as one at 1 (LoRA's update is linear in its scale)
    halves = load_loras(_base(bundle), [(bundle / "adapter.safetensors", 0.5)] * 2, "stage_c")
    assert torch.allclose(_out(halves), one, atol=1e-5)


def test_merge_round_trip_and_merged_export_loads(bundle, tmp_path, capsys):
    with_adapter = _out(load_loras(_base(bundle), [(bundle / "adapter.safetensors", 0.7)], "stage_c"))
    merged = _load_plain(merged_state(load_loras(_base(bundle), [(bundle / "adapter.safetensors", 0.7)], "stage_c")))
    assert torch.allclose(_out(merged.eval()), with_adapter, atol=1e-5)
    out = tmp_path / "merged.safetensors"
    lora_main(["merge", "--base", str(bundle / "stage_c.safetensors"), "--lora",
               f"{bundle / 'adapter.safetensors'}:0.7", "--out", str(out)])
    prior = load_prior(out)
    assert torch.allclose(_out(prior.model), with_adapter, atol=1e-5)
    meta = read_metadata(out)
    assert meta["text_encoder"] == "minilm" and meta["merged_loras"][0]["scale"] == 0.7
    with pytest.raises(SystemExit):  # never overwritten without --overwrite
        run_command(lora_main, ["merge", "--base", str(bundle / "stage_c.safetensors"), "--lora",
                                str(bundle / "adapter.safetensors"), "--out", str(out)])
    assert "exists" in capsys.readouterr().err


def test_adapter_for_another_base_is_refused(bundle):
    other = randomised(StageC(TINY_C), 0.05).eval()
    with pytest.raises(ValueError, match="another stage_c") as e:
        load_loras(other, [(bundle / "adapter.safetensors", 1.0)], "stage_c")
    assert fingerprint(other) in str(e.value) and read_metadata(bundle / "adapter.safetensors")["base_fingerprint"] \
        in str(e.value)
    with pytest.raises(ValueError, match="for stage_c, not stage_b"):
        load_loras(StageB(TINY_B), [(bundle / "adapter.safetensors", 1.0)], "stage_b")


def test_bad_lora_arguments_are_one_line_errors(bundle, tmp_path, capsys):
    assert parse_lora("a.safetensors:0.5") == (parse_lora("a.safetensors")[0], 0.5)
    base = ["--stage-c", str(bundle / "stage_c.safetensors"), "--stage-b", str(bundle / "stage_b.safetensors"),
            "--prior-steps", "2", "--decoder-steps", "2", "--quiet", "--out", str(tmp_path / "x.png"), "a cat"]
    for lora, message in ((str(tmp_path / "missing.safetensors"), "not found"),
                          (f"{bundle / 'adapter.safetensors'}:big", "must be a number"),
                          (str(bundle / "stage_c.safetensors"), "is not a LoRA adapter")):
        with pytest.raises(SystemExit) as e:
            run_command(sample_main, [*base, "--lora", lora])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_sample_with_lora_and_scale_zero_matches_the_base(bundle, tmp_path, capsys):
    from torchvision.io import read_image
    args = ["--stage-c", str(bundle / "stage_c.safetensors"), "--stage-b", str(bundle / "stage_b.safetensors"),
            "--prior-steps", "2", "--decoder-steps", "2", "--quiet", "a red apple"]
    sample_main([*args, "--out", str(tmp_path / "base.png")])
    sample_main([*args, "--out", str(tmp_path / "zero.png"), "--lora", f"{bundle / 'adapter.safetensors'}:0"])
    sample_main([*args, "--out", str(tmp_path / "lora.png"), "--lora", f"{bundle / 'adapter.safetensors'}:3"])
    base, zero, lora = (read_image(str(tmp_path / f"{n}.png")) for n in ("base", "zero", "lora"))
    assert torch.equal(base, zero) and not torch.equal(base, lora)
    pipe = load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                              bundle / "stage_a.safetensors", loras=[(bundle / "adapter.safetensors", 1.0)])
    assert any(".lora_A." in n for n, _ in pipe.prior.model.named_parameters())


def test_cli_fit_with_lora_writes_the_adapter_and_resumes(bundle, openmoji_dir, tmp_path):
    def fit(steps, *extra):
        cli_main(["fit", "--config", "configs/stage_c/tiny.yaml", "--config", "configs/stage_c/tiny_lora.yaml",
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.max_steps", str(steps),
                  "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
                  "--trainer.log_every_n_steps", "1",
                  "--model.init_args.size", json.dumps(TINY_C.to_dict()),
                  "--model.init_args.init_from", str(bundle / "stage_c.safetensors"),
                  "--model.init_args.compressor", str(bundle / "compressor.safetensors"),
                  "--model.init_args.stage_b", "null",
                  "--model.init_args.lora", json.dumps({"rank": 2, "alpha": 2.0, "target_modules": ["to_q", "to_v"],
                                                        "dropout": 0.0}),
                  "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "64",
                  "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
                  "--data.init_args.val_batch_size", "4", *extra])

    fit(2)
    run = tmp_path / "tiny" / "version_0"
    adapter = run / "adapter.safetensors"
    assert adapter.exists() and not (run / "model.safetensors").exists()
    meta = read_metadata(adapter)
    assert meta["base_fingerprint"] == fingerprint(_base(bundle)) and meta["global_step"] == 2
    assert meta["config"]["target_modules"] == ["to_q", "to_v"]
    assert adapter.stat().st_size < 64 * 1024
    prior = load_loras(_base(bundle), [(adapter, 1.0)], "stage_c")  # loads onto the base it started from
    assert not torch.equal(_out(prior), _out(_base(bundle)))
    fit(4, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert read_metadata(tmp_path / "tiny" / "version_1" / "adapter.safetensors")["global_step"] == 4


def test_stage_b_lora_trains_only_adapters_and_loads_into_the_decoder(bundle, tmp_path):
    module = StageBTraining(size=TINY_B.to_dict(), stage_a=str(bundle / "stage_a.safetensors"),
                            compressor=str(bundle / "compressor.safetensors"),
                            init_from=str(bundle / "stage_b.safetensors"), val_fid=False, metric_net=None,
                            lora={"rank": 2, "alpha": 2.0, "target_modules": ["to_q", "to_v"], "dropout": 0.0})
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():
        for name, p in module.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    path = save_adapter(module.model, tmp_path / "b_adapter.safetensors", "stage_b", module.lora_settings)
    pipe = load_text_to_image(bundle / "stage_c.safetensors", bundle / "stage_b.safetensors",
                              bundle / "stage_a.safetensors",
                              loras=[(path, 1.0), (bundle / "adapter.safetensors", 0.5)])
    assert any(".lora_A." in n for n, _ in pipe.decoder.stage_b.named_parameters())
    assert any(".lora_A." in n for n, _ in pipe.prior.model.named_parameters())
    with pytest.raises(ValueError, match="unknown keys"):
        StageBTraining(size=TINY_B.to_dict(), stage_a=str(bundle / "stage_a.safetensors"),
                       compressor=str(bundle / "compressor.safetensors"), val_fid=False, metric_net=None,
                       lora={"rank": 2, "alhpa": 2.0})


def test_init_from_into_a_head_of_other_shapes_names_them(bundle):
    with pytest.raises(ValueError, match="shape mismatches"):  # the A/B pair's two maps against the v head's one
        StageBTraining(size=dict(TINY_B.to_dict(), prediction="v"), stage_a=str(bundle / "stage_a.safetensors"),
                       compressor=str(bundle / "compressor.safetensors"), init_from=str(bundle / "stage_b.safetensors"),
                       val_fid=False, metric_net=None)


def test_stage_c_init_from_is_checked_against_the_run(bundle):
    common = dict(size=TINY_C.to_dict(), compressor=str(bundle / "compressor.safetensors"),
                  init_from=str(bundle / "stage_c.safetensors"))
    module = StageCTraining(**common, latent_shift=0.0, latent_scale=1.0)
    assert all(torch.equal(p, q) for p, q in zip(module.model.state_dict().values(),
                                                 _base(bundle).state_dict().values()))
    with pytest.raises(ValueError, match="latent_scale"):
        StageCTraining(**common, latent_shift=0.0, latent_scale=42.0)
    with pytest.raises(ValueError, match="another size"):
        StageCTraining(**dict(common, size=dict(TINY_C.to_dict(), width=64)), latent_shift=0.0, latent_scale=1.0)
