"""Stage A training: the CLI run writes what a person looks at, resumes exactly, fails clearly."""
import json
from pathlib import Path

import lightning as L
import pytest
import torch

from train.cli import main as cli_main
from train.data import ImageTextData
from train.stage_a import StageATraining
from weights.loaders import load_stage_a
from weights.checkpoint import save_safetensors
from stages.stage_a import StageA
from sample.evaluate_stage_a import main as evaluate

TINY = dict(size=dict(widths=[8, 16], bottleneck_blocks=1, codebook_size=64), disc_widths=[8, 16],
            adv_start_step=2, ema_decay=0.9)


def _data(openmoji_dir, **kw):
    return ImageTextData(embedded_dir=str(openmoji_dir), image_size=32, resize=64, val_size=32, batch_size=4,
                         num_workers=0, **kw)


def test_cli_fit_writes_checkpoints_grids_metrics_and_safetensors(openmoji_dir, tmp_path):
    root = tmp_path / "runs"
    cli_main(["fit", "--config", "configs/stage_a/tiny.yaml",
              "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4",
              "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1", "--trainer.log_every_n_steps", "1",
             
              "--model.init_args.size", json.dumps(TINY["size"]), "--model.init_args.adv_start_step", "2",
              "--model.init_args.disc_widths", "[8, 16]",
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "32",
              "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4"])
    run = root / "tiny" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "config.yaml").exists()
    assert list((run / "samples").glob("recon_step*.png"))
    metrics = (run / "metrics.csv").read_text()
    assert "val/psnr" in metrics and "train/g_adv" in metrics  # adversarial term on after step 2
    assert list(run.glob("events.out.tfevents*"))  # TensorBoard in the same run folder
    model = load_stage_a(str(run / "model.safetensors"))
    assert model.config.widths == (8, 16)
    # the Lightning checkpoint loads safely (weights_only) as well
    assert load_stage_a(str(run / "checkpoints" / "last.ckpt")).config.widths == (8, 16)
    # a second run goes to a new folder: nothing written before is overwritten
    before = (run / "model.safetensors").stat().st_mtime_ns
    cli_main(["fit", "--config", "configs/stage_a/tiny.yaml", "--trainer.default_root_dir", str(root),
              "--trainer.max_steps", "1", "--trainer.limit_val_batches", "0",
              "--model.init_args.size", json.dumps(TINY["size"]), "--model.init_args.disc_widths", "[8, 16]",
              "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.num_workers", "0",
              "--data.init_args.image_size", "32"])
    assert (root / "tiny" / "version_1" / "model.safetensors").exists()
    assert (run / "model.safetensors").stat().st_mtime_ns == before


class _Capture(L.Callback):
    def on_train_start(self, trainer, module):
        self.step = trainer.global_step
        self.opt_state = {k: {n: t.clone() for n, t in v.items() if torch.is_tensor(t)}
                          for k, v in trainer.optimizers[0].state_dict()["state"].items()}
        self.ema = {k: v.clone() for k, v in module.ema.state_dict().items()}
        self.model = {k: v.clone() for k, v in module.model.state_dict().items()}


def _trainer(tmp_path, max_steps, callbacks=()):
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=2,
                                               save_top_k=-1)
    return L.Trainer(max_steps=max_steps, limit_val_batches=0, logger=False, enable_progress_bar=False,
                     default_root_dir=tmp_path, callbacks=[ckpt, *callbacks], accelerator="cpu", devices=1)


def test_resume_continues_at_same_step_with_same_optimizer_and_ema(openmoji_dir, tmp_path):
    L.seed_everything(0)
    _trainer(tmp_path, 4).fit(StageATraining(**TINY), _data(openmoji_dir, val=None))
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == 4 and not any(k.startswith("perceptual.") for k in saved["state_dict"])

    capture = _Capture()
    _trainer(tmp_path / "resumed", 6, [capture]).fit(StageATraining(**TINY), _data(openmoji_dir, val=None),
                                                     ckpt_path=str(last))
    assert capture.step == 4
    for k, v in capture.ema.items():
        assert torch.equal(v, saved["state_dict"][f"ema.{k}"]), k
    for k, v in capture.model.items():
        assert torch.equal(v, saved["state_dict"][f"model.{k}"]), k
    saved_opt = saved["optimizer_states"][0]["state"]
    assert capture.opt_state.keys() == saved_opt.keys()
    for i, st in capture.opt_state.items():
        for name, t in st.items():
            assert torch.equal(t, saved_opt[i][name]), (i, name)


def test_nan_loss_stops_with_clear_message(openmoji_dir, tmp_path, monkeypatch):
    module = StageATraining(**TINY)
    monkeypatch.setattr(module.model, "forward",
                        lambda images, quantize=True: (images * float("nan"), images.new_zeros(())))
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        _trainer(tmp_path, 2).fit(module, _data(openmoji_dir, val=None))


def test_wrong_stage_checkpoint_is_refused_on_resume(openmoji_dir, tmp_path):
    ckpt = tmp_path / "b.ckpt"
    torch.save({"stage": "stage_b", "state_dict": {}, "global_step": 0}, ckpt)
    module = StageATraining(**TINY)
    with pytest.raises(ValueError, match="stage_b checkpoint, not a Stage A"):
        module.on_load_checkpoint(torch.load(ckpt, weights_only=True))


def test_evaluate_command_prints_json_and_never_overwrites(openmoji_dir, tmp_path, capsys):
    model = StageA(TINY["size"])
    path = save_safetensors(model, tmp_path / "run" / "model.safetensors", "stage_a", model.config.to_dict())
    out = tmp_path / "eval.json"
    report = evaluate(["--checkpoint", str(tmp_path / "run"), "--data-dir", str(openmoji_dir), "--limit", "8",
                       "--photo-size", "64", "--out", str(out)])
    assert json.loads(out.read_text()) == report == json.loads(capsys.readouterr().out)
    for split in ("openmoji_val", "heldout_photos"):
        for k in ("stage_a_quantized", "stage_a_unquantized", "bicubic_f4"):
            assert set(report[split][k]) >= {"psnr", "ssim", "lpips"}
    assert report["openmoji_val"]["n_images"] == 8 and report["heldout_photos"]["n_images"] == 9
    # an untrained model is far worse than the bicubic baseline: the comparison is real
    assert report["openmoji_val"]["bicubic_f4"]["psnr"] > report["openmoji_val"]["stage_a_unquantized"]["psnr"]
    with pytest.raises(FileExistsError, match="exists"):
        evaluate(["--checkpoint", str(path), "--data-dir", str(openmoji_dir), "--out", str(out)])


@pytest.mark.slow
def test_cli_runs_under_two_process_ddp_on_cpu(openmoji_dir, tmp_path):
    """The documented command with --trainer.strategy=ddp --trainer.devices=2 (gloo on CPU)."""
    import os
    import subprocess
    import sys

    root = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "train", "fit", "--config", "configs/stage_a/tiny.yaml",
           "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu",
           "--trainer.default_root_dir", str(root), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
           "--trainer.limit_val_batches", "1",
           "--model.init_args.size", json.dumps(TINY["size"]), "--model.init_args.disc_widths", "[8, 16]",
           "--model.init_args.adv_start_step", "2",
           "--data.init_args.embedded_dir", str(openmoji_dir), "--data.init_args.image_size", "32",
           "--data.init_args.num_workers", "0", "--data.init_args.batch_size", "4"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = root / "tiny" / "version_0"
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert (run / "model.safetensors").exists()
