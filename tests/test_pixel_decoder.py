"""The greedy-grown pixel decoder: shapes, growth, freezing, shifted schedule, sigmoid weight, KV compression,
phase checks, and CLI runs of phase 1 -> phase 2 -> sampling."""
import json
import math
from pathlib import Path

import pytest
import torch

from diffusion import CosineSchedule, Denoiser
from pipeline.denoisers import denoiser_for
from weights.checkpoint import fingerprint, read_metadata, read_weights, save_safetensors
from stages.pixel_decoder import (
    GrownUViT,
    KVCompressedAttention,
    ShallowUViT,
    build_pixel_model,
    freeze_plan,
    grow,
    growth_plan,
)
from weights.loaders import load_compressor
from train.pixel_decoder import PixelDecoderTraining
from train.cli import main as cli_main
from sample.__main__ import main as sample_main, main
from common.errors import run_command

ROOT = Path(__file__).resolve().parent.parent
GRID3_COMPRESSOR = ROOT / "checkpoints" / "tiny_grid3" / "compressor.safetensors"
GRID3_STAGE_C = ROOT / "checkpoints" / "tiny_grid3" / "stage_c.safetensors"
# phase 1 at 32 px on an 8x8 grid; grows to 64 px (three levels: 64, 32, 16 px)
SMALL = dict(resolution=32, core_grid=8, entry_channels=16, width=32, depth=1, heads=2, c_t=32,
             **{k: list(v) for k, v in growth_plan((8, 16, 16), blocks=(0, 1, 1)).items()})


def _inputs(b=2, side=32, grid=(2, 2)):
    return torch.randn(b, 3, side, side), torch.rand(b), torch.randn(b, 16, *grid)


def _randomised(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_forward_shapes_phase1_and_grown():
    model = ShallowUViT(SMALL)
    x, r, sem = _inputs()
    assert model(x, r, sem).shape == (2, 3, 32, 32)
    grown = grow(model, 64)
    assert isinstance(grown, GrownUViT) and grown.config.target_resolution == 64 and grown.size_multiple == 8
    x64, r, sem3 = _inputs(side=64, grid=(3, 3))
    assert grown(x64, r, sem3).shape == (2, 3, 64, 64)  # the target resolution
    wide = torch.randn(1, 3, 64, 128)
    assert grown(wide, r[:1], torch.randn(1, 16, 2, 3)).shape == (1, 3, 64, 128)
    with pytest.raises(ValueError, match="multiples of 8"):
        grown(torch.randn(1, 3, 60, 64), r[:1], sem3[:1])
    with pytest.raises(ValueError, match="semantic latents"):
        grown(x64, r, torch.randn(2, 4, 3, 3))
    tiny = build_pixel_model("tiny")
    assert tiny(torch.randn(1, 3, 32, 32), r[:1], sem3[:1]).shape == (1, 3, 32, 32)
    tiny_grown = grow(tiny, 128)
    assert tiny_grown(torch.randn(1, 3, 128, 128), r[:1], sem3[:1]).shape == (1, 3, 128, 128)


def test_growth_keeps_the_core_weights_and_modules():
    model = _randomised(ShallowUViT(SMALL))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("core.", "condition.", "time_embed."))}
    grown = grow(model, 64)
    assert grown.core is model.core and grown.condition is model.condition and grown.time_embed is model.time_embed
    after = grown.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    assert not any(k.startswith(("encoder.", "decoder.")) for k in after)  # the shallow blocks are gone
    rebuilt = build_pixel_model(grown.config)  # the config alone rebuilds the same architecture (for loading)
    assert set(rebuilt.state_dict()) == set(after)


def test_greedy_freezes_core_and_condition_during_phase2_steps():
    grown = grow(_randomised(ShallowUViT(SMALL)), 64)
    plan = freeze_plan(grown, "greedy")
    assert plan["frozen"] and all(n.startswith(("core.", "condition.")) for n in plan["frozen"])
    assert any(n.startswith("time_embed.") for n in plan["trained"])  # the time encoding is tuned
    before = {n: p.detach().clone() for n, p in grown.named_parameters()}
    opt = torch.optim.AdamW([p for p in grown.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        x0, r, sem = _inputs(side=64)
        noise = torch.randn_like(x0)
        loss = Denoiser(grown, "eps", CosineSchedule(shift=-1.4)).loss(x0, r, noise, sem)
        opt.zero_grad()
        loss.backward()
        opt.step()
    now = dict(grown.named_parameters())
    assert all(torch.equal(before[n], now[n]) for n in plan["frozen"])
    changed = [n for n in plan["trained"] if not torch.equal(before[n], now[n])]
    assert any(n.startswith("time_embed.") for n in changed) and any(n.startswith("down.") for n in changed)
    assert set(freeze_plan(grown, "finetune")["trained"]) == set(before)
    assert freeze_plan(grown, "freeze_unfreeze")["frozen"] == plan["frozen"]
    assert freeze_plan(grown, "freeze_unfreeze", unfrozen=True)["frozen"] == []
    with pytest.raises(ValueError, match="unknown training mode"):
        freeze_plan(grown, "melt")


def test_pixel_models_are_read_through_their_prediction():
    model = _randomised(ShallowUViT(SMALL))
    x, r, semantic = _inputs()
    schedule = CosineSchedule(shift=-1.0)
    denoiser = denoiser_for(model, logsnr_shift=-1.0)
    assert denoiser.schedule == schedule and denoiser.parameterisation.name == "v"
    ab = schedule.alpha_bar(r).view(-1, 1, 1, 1)
    assert torch.allclose(denoiser(x, r, semantic), (1 - ab).sqrt() * x + ab.sqrt() * model(x, r, semantic))
    eps_model = ShallowUViT({**SMALL, "prediction": "eps"})
    assert torch.equal(denoiser_for(eps_model)(x, r, semantic), eps_model(x, r, semantic))
    with pytest.raises(ValueError, match="prediction"):
        ShallowUViT({**SMALL, "prediction": "x0"})


def test_kv_compression_shapes_and_average_init():
    attn = KVCompressedAttention(16, None, 2, kv_stride=2)  # self-attention only
    assert attn.kv_compress.weight.shape == (16, 1, 2, 2)
    assert torch.all(attn.kv_compress.weight == 0.25)
    plain = KVCompressedAttention(16, None, 2)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("kv_compress")})
    const = torch.randn(2, 16, 1, 1).expand(2, 16, 8, 8).contiguous()  # a constant image: identical tokens
    assert torch.allclose(attn(const), plain(const), atol=1e-5)
    smooth = torch.randn(2, 16, 1, 1) + 0.01 * torch.randn(2, 16, 8, 8)
    assert torch.allclose(attn(smooth), plain(smooth), atol=0.05)
    odd = torch.randn(1, 16, 5, 7)  # sides not multiples of R are padded
    assert attn(odd).shape == odd.shape
    cross = KVCompressedAttention(16, 8, 2, kv_stride=4)
    assert cross(torch.randn(2, 16, 8, 8), torch.randn(2, 3, 8)).shape == (2, 16, 8, 8)
    with pytest.raises(ValueError, match="self-attention"):
        KVCompressedAttention(16, 8, 2, self_attn=False, kv_stride=2)


def test_kv_compression_switched_on_at_growth_is_a_new_trained_layer():
    model = _randomised(ShallowUViT(SMALL))
    grown = grow(model, 64, dict(kv_stride=2, level_heads=[0, 2, 2], level_kv_strides=[1, 2, 1]))
    assert grown.core.kv_stride == 2 and grown.added_to_core
    assert all(n.startswith("core.") and "kv_compress" in n for n in grown.added_to_core)
    plan = freeze_plan(grown, "greedy")
    assert set(grown.added_to_core) <= set(plan["trained"])
    x, r, sem = _inputs(side=64)
    assert grown(x, r, sem).shape == (2, 3, 64, 64)
    assert set(build_pixel_model(grown.config).state_dict()) == set(grown.state_dict())


@pytest.fixture(scope="module")
def phase1_export(tmp_path_factory):
    """A phase-1 export as the training module writes it, on the shipped compressor."""
    out = tmp_path_factory.mktemp("phase1") / "model.safetensors"
    model = _randomised(ShallowUViT(SMALL))
    fp = fingerprint(load_compressor(GRID3_COMPRESSOR))
    save_safetensors(model, out, "pixel_decoder", model.config.to_dict(),
                     extra={"phase": 1, "compressor_fingerprint": fp, "logsnr_shift": 0.0, "semantic_size": 64})
    return out


def test_phase2_core_mismatch_and_bad_phase_settings_are_clear_errors(phase1_export):
    kw = dict(phase=2, init_from=str(phase1_export), resolution=64, compressor=str(GRID3_COMPRESSOR))
    with pytest.raises(ValueError, match=r"does not match the phase 1 checkpoint .*width: 48 vs 32"):
        PixelDecoderTraining(size=dict(SMALL, width=48), **kw)
    with pytest.raises(ValueError, match=r"depth: 2 vs 1.*core_grid: 4 vs 8|core_grid: 4 vs 8.*depth: 2 vs 1"):
        PixelDecoderTraining(size=dict(SMALL, depth=2, core_grid=4), **kw)
    with pytest.raises(ValueError, match="drop init_from"):
        PixelDecoderTraining(size=SMALL, **{**kw, "phase": 2}, mode="scratch")
    with pytest.raises(ValueError, match="unfreeze_step"):
        PixelDecoderTraining(size=SMALL, **kw, mode="freeze_unfreeze")
    with pytest.raises(ValueError, match="target image side"):
        PixelDecoderTraining(size=SMALL, **{**kw, "resolution": None})
    with pytest.raises(ValueError, match="phase 3 continues a grown"):
        PixelDecoderTraining(size=SMALL, **{**kw, "phase": 3, "resolution": None})
    module = PixelDecoderTraining(size=SMALL, **kw)  # a matching core grows
    state, _ = read_weights(phase1_export, "pixel_decoder")
    own = module.model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in state.items() if k.startswith(("core.", "condition.")))
    assert module.logsnr_shift == pytest.approx(2 * math.log(32 / 64))
    assert not any(p.requires_grad for n, p in module.model.named_parameters() if n.startswith("core."))


def test_phase2_command_with_a_mismatched_core_ends_with_the_message_alone(phase1_export, tmp_path):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "train", "fit", "--config", "configs/pixel_decoder/tiny_phase2.yaml",
           "--model.init_args.size", json.dumps(dict(SMALL, width=48)), "--model.init_args.init_from",
           str(phase1_export), "--model.init_args.resolution", "64", "--model.init_args.compressor", str(GRID3_COMPRESSOR),
           "--trainer.default_root_dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2  # common.errors.run_command: bad input exits with 2
    assert "error: the phase 2 config's core does not match the phase 1 checkpoint" in done.stderr
    assert "width: 48 vs 32" in done.stderr and "Traceback" not in done.stderr
    assert not any(tmp_path.iterdir())  # nothing written


def _fit(config, root, openmoji_dir, *extra):
    cli_main(["fit", "--config", config, "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1",
              "--trainer.log_every_n_steps", "1", "--model.init_args.size", json.dumps(SMALL),
              "--model.init_args.compressor", str(GRID3_COMPRESSOR), "--model.init_args.sample_steps", "2",
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "64",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4",
              "--data.init_args.val_batch_size", "4", *extra])


def test_cli_phase1_then_phase2_then_sampling(openmoji_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    _fit("configs/pixel_decoder/tiny_phase1.yaml", runs, openmoji_dir)
    p1 = runs / "tiny_phase1" / "version_0"
    assert "val/psnr" in (p1 / "metrics.csv").read_text()
    assert sorted((p1 / "samples").glob("semantic_recon_step*.png"))
    ckpt = torch.load(p1 / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["stage"] == "pixel_decoder" and ckpt["phase"] == 1
    assert not any(k.startswith(("compressor.", "text_encoder.")) for k in ckpt["state_dict"])

    _fit("configs/pixel_decoder/tiny_phase2.yaml", runs, openmoji_dir, "--model.init_args.init_from", str(p1),
         "--model.init_args.resolution", "64", "--data.init_args.min_size", "64")
    p2 = runs / "tiny_phase2_greedy" / "version_0"
    meta = read_metadata(p2 / "model.safetensors")
    assert (meta["phase"], meta["mode"], meta["resolution"]) == (2, "greedy", 64)
    assert meta["logsnr_shift"] == pytest.approx(2 * math.log(32 / 64))
    p1_meta = read_metadata(p1 / "model.safetensors")  # phase 1's cost travels with phase 2
    assert (meta["init_global_step"], meta["init_wall_time_s"]) == (p1_meta["global_step"], p1_meta["wall_time_s"])
    assert meta["compressor_fingerprint"] == fingerprint(load_compressor(GRID3_COMPRESSOR))
    one, _ = read_weights(p1 / "model.safetensors", "pixel_decoder")
    two, config = read_weights(p2 / "model.safetensors", "pixel_decoder")
    assert config["target_resolution"] == 64
    frozen = [k for k in one if k.startswith(("core.", "condition."))]
    assert frozen and all(torch.equal(one[k], two[k]) for k in frozen)  # frozen through phase-2 steps

    out = tmp_path / "apple.png"
    sample_main(["a red apple", "--decoder", "pixel", "--pixel-decoder", str(p2), "--stage-c", str(GRID3_STAGE_C),
                 "--height", "64", "--width", "64", "--prior-steps", "2", "--decoder-steps", "2", "--quiet",
                 "--out", str(out)])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    from PIL import Image
    assert printed["image"] == str(out) and Image.open(out).size == (64, 64)
    # a phase-1 export renders at its own scale (32 px from 64 px latents here), resized to the request
    out1 = tmp_path / "apple1.png"
    sample_main(["a red apple", "--decoder", "pixel", "--pixel-decoder", str(p1), "--stage-c", str(GRID3_STAGE_C),
                 "--height", "64", "--width", "64", "--prior-steps", "2", "--decoder-steps", "2", "--quiet",
                 "--out", str(out1)])
    assert Image.open(out1).size == (64, 64)


def test_sampler_errors_for_pixel_decoders(tmp_path, capsys):
    def sample_main(argv):  # as `python -m sample` runs it: one-line errors, exit status 2
        return run_command(main, argv)

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(SystemExit):
        sample_main(["sun", "--decoder", "pixel", "--pixel-decoder", str(missing), "--quiet",
                     "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "configs/pixel_decoder/tiny_phase1.yaml" in err[0] and str(missing) in err[0]
    grown = grow(ShallowUViT(SMALL), 64)
    other = tmp_path / "other.safetensors"
    save_safetensors(grown, other, "pixel_decoder", grown.config.to_dict(),
                     extra={"compressor_fingerprint": "0123456789abcdef", "semantic_size": 64})
    with pytest.raises(SystemExit):
        sample_main(["sun", "--decoder", "pixel", "--pixel-decoder", str(other), "--stage-c", str(GRID3_STAGE_C),
                     "--quiet", "--out", str(tmp_path / "y.png")])
    assert "different semantic compressor" in capsys.readouterr().err


def test_shipped_pixel_decoder_is_the_greedy_grown_one_and_samples_by_default(tmp_path, capsys):
    from PIL import Image

    for shipped in ("tiny", "tiny_grid3"):  # the shipped set's and the paper-grid set's, each on its compressor
        meta = read_metadata(ROOT / "checkpoints" / shipped / "pixel_decoder.safetensors")
        assert (meta["phase"], meta["mode"], meta["resolution"]) == (2, "greedy", 128)
        assert meta["compressor_fingerprint"] == fingerprint(load_compressor(ROOT / "checkpoints" / shipped /
                                                                              "compressor.safetensors"))
    out = tmp_path / "apple.png"
    sample_main(["a red apple", "--decoder", "pixel", "--prior-steps", "2", "--decoder-steps", "2", "--quiet",
                 "--out", str(out)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["image"] == str(out)
    assert Image.open(out).size == (128, 128)
