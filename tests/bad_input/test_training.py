"""Bad input to ``python -m train``: data that yields nothing, checkpoints that cannot or must not resume,
NaN advice, and exact kill-and-resume. Every case checks the exit status (or exception), the one-line
message and that nothing earlier was written over."""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.bad_input.conftest import ROOT, assert_cli_error, assert_error, bomb_png, run_cli, run_main, snapshot
from weights.checkpoint import save_safetensors
from stages.stage_a import StageA
from train.cli import main as cli_main
from train.precompute import main as precompute
from train.data import ImageTextData
from train.stage_a import StageATraining
from tests.test_data import img_bytes, write_tar
from tests.tiny_stages import TINY_A, stage_a_args



@pytest.fixture(scope="module")
def stage_a_run(openmoji_dir, tmp_path_factory) -> Path:
    """A finished 2-step Stage A run (root/tiny/version_0) with checkpoints; tests must not change it."""
    root = tmp_path_factory.mktemp("runs")
    cli_main(stage_a_args(root, openmoji_dir))
    assert (root / "tiny" / "version_0" / "checkpoints" / "last.ckpt").is_file()
    return root


def first_pass(source: str, **kw):
    """The training loader's first pass, as Lightning runs it."""
    dm = ImageTextData(train=source, val=None, image_size=16, batch_size=2, **{"num_workers": 0, **kw})
    dm.setup("fit")
    return list(dm.train_dataloader())


# ------------------------------------------------------------------ 1. data that cannot yield a sample

def test_missing_train_path_fails_before_anything_is_written(openmoji_dir, tmp_path, capsys, unchanged):
    with unchanged(tmp_path):
        code, err = run_main(cli_main, stage_a_args(tmp_path / "runs", openmoji_dir, "--data.init_args.train",
                                                     str(tmp_path / "no_such_dir")), capsys)
    assert code == 2
    assert_error(code, err, "no_such_dir", "does not exist", "openmoji")
    assert not (tmp_path / "runs").exists()


def test_brace_pattern_with_no_existing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"none of the 3 shards of .*\{0\.\.2\}.*exists"):
        ImageTextData(train=str(tmp_path / "shard-{0..2}.tar"))


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards match"):
        ImageTextData(train=str(tmp_path / "*.tar"))


def test_missing_val_source_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="val_shards.tar.*does not exist"):
        ImageTextData(train="openmoji", val=str(tmp_path / "val_shards.tar"))


def test_every_shard_corrupt_without_count_stops_naming_source_and_counts(tmp_path):
    for name in ("a.tar", "b.tar"):
        (tmp_path / name).write_bytes(b"not a tar at all\n" * 40)
    (tmp_path / "c.tar").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no batch of 2 in a whole pass over 3 shards .*yielded 0, skipped: "
                                         r"corrupt_shard 3 \(first: ReadError: .*a\.tar\)\)"):
        first_pass(str(tmp_path))


def test_shards_that_cannot_be_opened_are_counted_by_cause(tmp_path):
    """A missing file, a refused connection and a failing pipe: command: each counted and named in the message."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError) as e:
        first_pass([str(tmp_path / "gone.tar"), f"http://127.0.0.1:{port}/shard.tar", "pipe:exit 3"])
    message = str(e.value)
    assert "\n" not in message and "yielded 0, skipped: " in message
    assert f"missing_shard 1 (first: file not found: {tmp_path / 'gone.tar'})" in message
    assert f"unreachable_shard 1 (first: connection refused: http://127.0.0.1:{port}/shard.tar)" in message
    assert "failed_command 1 (first: exit status 3 of 'exit 3': pipe:exit 3)" in message


def test_every_sample_undecodable(tmp_path):
    write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": b"garbage"}) for i in range(3)])
    with pytest.raises(ValueError, match=r"s\.tar \(yielded 0, skipped: corrupt_sample 3\)"):
        first_pass(str(tmp_path / "s.tar"))


def test_nothing_passes_min_size(tmp_path):
    write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": img_bytes()}) for i in range(5)])
    with pytest.raises(ValueError, match=r"skipped: too_small 5\).*lower min_size"):
        first_pass(str(tmp_path / "s.tar"), min_size=64)


def test_nothing_passes_min_size_with_a_known_count(tmp_path):
    write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": img_bytes()}) for i in range(5)])
    with pytest.raises(ValueError, match=r"no readable sample for rank 0 worker 0 in .*s\.tar .*too_small 5"):
        first_pass(str(tmp_path / "s.tar"), min_size=64, train_count=5)


@pytest.mark.parametrize("side", [100_000, 10_000], ids=["beyond_the_limit", "warned_by_pil"])
def test_decompression_bombs_are_skipped_and_counted(tmp_path, side):
    write_tar(tmp_path / "s.tar", [("bomb", {"png": bomb_png(side)})] + [(f"k{i}", {"png": img_bytes()})
                                                                          for i in range(4)])
    dm = ImageTextData(train=str(tmp_path / "s.tar"), val=None, image_size=16, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert len(list(dm.train_dataloader())) == 2
    counts = dm.train_set.skipped.as_dict()
    assert counts["yielded"] == 4 and counts["corrupt_sample"] == 1 and sum(counts.values()) == 5


def test_precompute_skips_and_counts_a_decompression_bomb(tmp_path, capsys):
    write_tar(tmp_path / "s.tar", [("bomb", {"png": bomb_png()})] + [(f"k{i}", {"png": img_bytes()})
                                                                     for i in range(3)])
    a = StageA(TINY_A)
    save_safetensors(a, tmp_path / "a.safetensors", "stage_a", a.config.to_dict())
    manifest = precompute(["--shards", str(tmp_path / "s.tar"), "--out", str(tmp_path / "out"), "--stage-a",
                           str(tmp_path / "a.safetensors"), "--image-size", "16"])
    assert manifest["count"] == 3 and manifest["skipped"] == {"corrupt_sample": 1}


def test_fewer_samples_than_a_batch_stops(tmp_path):
    write_tar(tmp_path / "s.tar", [("only", {"png": img_bytes()}), ("bad", {"png": b"x"})])
    with pytest.raises(ValueError, match=r"no batch of 2 .*yielded 1, skipped: corrupt_sample 1\)"):
        first_pass(str(tmp_path / "s.tar"))


def test_counts_from_a_worker_process_reach_the_message(tmp_path):
    write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": img_bytes()}) for i in range(4)])
    with pytest.raises(ValueError, match=r"yielded 0, skipped: too_small 4\)"):
        first_pass(str(tmp_path / "s.tar"), min_size=64, num_workers=1)


def test_an_error_in_a_worker_keeps_its_one_line_message(tmp_path):
    write_tar(tmp_path / "s.tar", [(f"k{i}", {"png": img_bytes()}) for i in range(4)])
    with pytest.raises(ValueError) as e:
        first_pass(str(tmp_path / "s.tar"), min_size=64, num_workers=1, train_count=4)
    assert str(e.value).startswith("no readable sample for rank 0 worker 0") and "\n" not in str(e.value)
    assert "Traceback" not in str(e.value) and "too_small 4" in str(e.value)


def test_image_folder_all_smaller_than_min_size(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(img_bytes())
    with pytest.raises(ValueError, match="none of the 3 images under .* is at least min_size 64 px"):
        first_pass(str(tmp_path), min_size=64)


def test_image_folder_smaller_than_a_batch(tmp_path):
    (tmp_path / "one.png").write_bytes(img_bytes())
    with pytest.raises(ValueError, match=r"1 images in .* make no batch of 2; lower batch_size"):
        first_pass(str(tmp_path))


def test_image_folder_all_undecodable_through_a_worker(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"junk")
    with pytest.raises(ValueError) as e:
        first_pass(str(tmp_path), num_workers=1)
    assert str(e.value).startswith("cannot decode any of the 3 images under") and "\n" not in str(e.value)


def test_cli_fit_on_unreadable_data_stops_and_leaves_earlier_runs(openmoji_dir, stage_a_run, tmp_path, capsys):
    """Stage A (photo crops interleaved) on shards that are all garbage: an error, not endless empty epochs."""
    (tmp_path / "bad.tar").write_bytes(b"\x00junk" * 100)
    before = snapshot(stage_a_run / "tiny" / "version_0")
    code, err = run_main(cli_main, stage_a_args(stage_a_run, openmoji_dir, "--data.init_args.train",
                                                str(tmp_path / "bad.tar")), capsys)
    assert_error(code, err, "no batch of 4", "bad.tar", "corrupt_shard 1")
    assert code == 2
    assert snapshot(stage_a_run / "tiny" / "version_0") == before
    failed = stage_a_run / "tiny" / "version_1"
    assert not list(failed.rglob("*.ckpt")) and not (failed / "model.safetensors").exists()


# ------------------------------------------------------------------ 2./5. checkpoints that cannot resume

def resume(stage_a_run, openmoji_dir, ckpt, capsys, *extra):
    return run_main(cli_main, stage_a_args(stage_a_run, openmoji_dir, "--ckpt_path", str(ckpt), *extra, steps=3),
                    capsys)


@pytest.fixture
def last_ckpt(stage_a_run) -> Path:
    return stage_a_run / "tiny" / "version_0" / "checkpoints" / "last.ckpt"


def test_checkpoint_of_another_stage_is_refused(openmoji_dir, stage_a_run, tmp_path, capsys, unchanged):
    ckpt = tmp_path / "stage_c.ckpt"
    torch.save({"stage": "stage_c", "hyper_parameters": {"_class_path": "train.stage_c.StageCTraining", "size": "tiny"},
                "state_dict": {}, "optimizer_states": [], "global_step": 3}, ckpt)
    with unchanged(stage_a_run):
        code, err = resume(stage_a_run, openmoji_dir, ckpt, capsys)
    assert code == 2
    assert_error(code, err, "stage_c.ckpt is a checkpoint of stage_c", "this config trains stage_a",
                 "train.stage_a.StageATraining", "drop --ckpt_path")


def test_checkpoint_of_another_network_size_is_refused(openmoji_dir, stage_a_run, last_ckpt, capsys, unchanged):
    with unchanged(stage_a_run):
        code, err = resume(stage_a_run, openmoji_dir, last_ckpt, capsys, "--model.init_args.size", "tiny")
    assert code == 2
    assert_error(code, err, "cannot change size when resuming", "given 'tiny'", "start a new run")


def test_settings_that_cannot_change_are_named(openmoji_dir, stage_a_run, last_ckpt, capsys, unchanged):
    with unchanged(stage_a_run):
        code, err = resume(stage_a_run, openmoji_dir, last_ckpt, capsys, "--model.init_args.ema_decay", "0.5",
                           "--model.init_args.disc_widths", "[8, 32]", "--optimizer.init_args.lr", "0.01")
    line = assert_error(code, err, "cannot change disc_widths, ema_decay", "checkpoint 0.995, given 0.5")
    assert code == 2 and "lr" not in line.split("(")[0]


def test_changed_lr_and_weight_decay_take_effect_on_resume(openmoji_dir, stage_a_run, last_ckpt):
    saved = torch.load(last_ckpt, weights_only=True)
    before = snapshot(stage_a_run / "tiny" / "version_0")
    cli = cli_main(stage_a_args(stage_a_run, openmoji_dir, "--ckpt_path", str(last_ckpt),
                                "--optimizer.init_args.lr", "0.25", "--optimizer.init_args.weight_decay", "0.5",
                                "--lr_scheduler.init_args.warmup_steps", "0",
                                "--lr_scheduler.init_args.total_steps", "null", steps=3))
    opt = cli.trainer.optimizers[0]
    assert cli.trainer.global_step == 3 and saved["global_step"] == 2
    assert [g["lr"] for g in opt.param_groups] == [0.25]  # saved: 2e-3 at warm-up factor 2/100
    assert [g["weight_decay"] for g in opt.param_groups] == [0.5]
    assert cli.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [0.25]
    assert all(s["step"].item() == 3 for s in opt.state.values())  # Adam's moments went on from the saved ones
    assert snapshot(stage_a_run / "tiny" / "version_0") == before
    assert cli.trainer.log_dir != str(stage_a_run / "tiny" / "version_0")


def test_safetensors_export_is_refused(openmoji_dir, stage_a_run, capsys, unchanged):
    export = stage_a_run / "tiny" / "version_0" / "model.safetensors"
    with unchanged(stage_a_run):
        code, err = resume(stage_a_run, openmoji_dir, export, capsys)
    assert code == 2
    assert_error(code, err, "model.safetensors is an export", "checkpoints/last.ckpt", "--model.init_args.init_from")


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_checkpoint_is_refused(openmoji_dir, stage_a_run, last_ckpt, tmp_path, capsys, damage, unchanged):
    data = last_ckpt.read_bytes()
    bad = tmp_path / f"{damage}.ckpt"
    bad.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(4096)}[damage])
    with unchanged(stage_a_run):
        code, err = resume(stage_a_run, openmoji_dir, bad, capsys)
    assert code == 2
    assert_error(code, err, f"{bad} is not a readable checkpoint", "resume from another checkpoint")


class Payload:
    """An object whose unpickling would create a file: weights-only loading must refuse to run it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_pickle_that_weights_only_loading_refuses(openmoji_dir, stage_a_run, last_ckpt, tmp_path, capsys):
    ckpt = torch.load(last_ckpt, weights_only=True)
    ckpt["payload"] = Payload(tmp_path / "code_ran")
    torch.save(ckpt, tmp_path / "evil.ckpt")
    code, err = resume(stage_a_run, openmoji_dir, tmp_path / "evil.ckpt", capsys)
    assert code == 2
    assert_error(code, err, "evil.ckpt holds objects that weights-only loading refuses", "resume from another checkpoint")
    assert not (tmp_path / "code_ran").exists()


@pytest.mark.parametrize("case", ["missing", "folder", "plain_state_dict"])
def test_ckpt_path_that_is_no_training_checkpoint(openmoji_dir, stage_a_run, tmp_path, capsys, case, unchanged):
    path = {"missing": tmp_path / "nope.ckpt", "folder": tmp_path, "plain_state_dict": tmp_path / "sd.ckpt"}[case]
    if case == "plain_state_dict":
        torch.save({"weight": torch.zeros(2)}, path)
    fragment = {"missing": "nope.ckpt does not exist", "folder": "is a folder; give a checkpoint file",
                "plain_state_dict": "is not a Lightning training checkpoint"}[case]
    with unchanged(stage_a_run):
        code, err = resume(stage_a_run, openmoji_dir, path, capsys)
    assert code == 2
    assert_error(code, err, fragment)


def test_weights_only_false_is_refused(openmoji_dir, stage_a_run, last_ckpt, capsys, unchanged):
    with unchanged(stage_a_run):
        code, err = resume(stage_a_run, openmoji_dir, last_ckpt, capsys, "--weights_only", "false")
    assert code == 2
    assert_error(code, err, "--weights_only false is not allowed")


@pytest.mark.parametrize("case", ["yaml_syntax", "wrong_type"])
def test_config_parse_errors_are_one_line_with_a_pointer_to_help(tmp_path, case):
    (tmp_path / "bad.yaml").write_text("trainer: [max_steps: 3\n")
    args = {"yaml_syntax": ["--config", str(tmp_path / "bad.yaml")],
            "wrong_type": ["--config", str(ROOT / "configs" / "stage_a" / "tiny.yaml"), "--trainer.max_steps", "many"]}
    proc = run_cli("train", "fit", *args[case], cwd=tmp_path)
    assert proc.returncode == 2 and "usage:" not in proc.stderr
    fragment = {"yaml_syntax": "Problems parsing config", "wrong_type": 'trainer.max_steps": Expected a'}[case]
    assert_cli_error(proc, fragment, "(see python -m train fit --help)")
    assert os.listdir(tmp_path) == ["bad.yaml"]


def test_command_line_prints_one_line(tmp_path):
    proc = run_cli("train", "fit", "--config", str(ROOT / "configs" / "stage_a" / "tiny.yaml"),
                   "--trainer.default_root_dir", str(tmp_path / "runs"), "--ckpt_path", str(tmp_path / "gone.ckpt"),
                   cwd=tmp_path)
    assert proc.returncode == 2
    assert_cli_error(proc, "gone.ckpt does not exist", "WUERSTCHEN_TRACEBACK=1")
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ 4. NaN advice

def _nan_fit(openmoji_dir, tmp_path, monkeypatch, nan_from_step: int) -> str:
    module = StageATraining(size=TINY_A, disc_widths=[8, 16], ema_decay=0.9)
    forward = module.model.forward

    def maybe_nan(images, quantize=True):
        recon, vq = forward(images, quantize)
        return (recon * float("nan"), vq) if module.global_step >= nan_from_step else (recon, vq)
    monkeypatch.setattr(module.model, "forward", maybe_nan)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=1)
    trainer = L.Trainer(max_steps=4, limit_val_batches=0, logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, callbacks=[ckpt], accelerator="cpu")
    data = ImageTextData(embedded_dir=str(openmoji_dir), image_size=32, batch_size=2, num_workers=0, val=None,
                         shuffle_buffer=4)
    with pytest.raises(FloatingPointError) as e:
        trainer.fit(module, data)
    return str(e.value)


def test_nan_before_any_checkpoint_does_not_advise_resuming(openmoji_dir, tmp_path, monkeypatch):
    message = _nan_fit(openmoji_dir, tmp_path, monkeypatch, nan_from_step=0)
    assert "at step 0" in message and "--optimizer.init_args.lr" in message
    assert "start again (no checkpoint was saved" in message and "resume" not in message
    assert not (tmp_path / "ckpt" / "last.ckpt").exists()


def test_nan_after_a_checkpoint_names_it(openmoji_dir, tmp_path, monkeypatch):
    message = _nan_fit(openmoji_dir, tmp_path, monkeypatch, nan_from_step=2)
    assert "at step 2" in message and f"resume with --ckpt_path {tmp_path / 'ckpt' / 'last.ckpt'}" in message
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 2


# ------------------------------------------------------------------ 7./8. kill and resume

@pytest.mark.slow
def test_killed_run_resumes_exactly_and_leaves_the_killed_run(openmoji_dir, tmp_path):
    root = tmp_path / "runs"
    proc = run_cli("train", *stage_a_args(root, openmoji_dir, "--trainer.callbacks+=tests.bad_input.conftest.SignalAtStep",
                                          steps=10), cwd=ROOT, env={"SIGNAL_AT_STEP": "KILL:3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    killed = root / "tiny" / "version_0"
    last = killed / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 3
    before = snapshot(killed)

    cli = cli_main(stage_a_args(root, openmoji_dir, "--ckpt_path", str(last),
                                "--trainer.callbacks+=tests.bad_input.conftest.Restored", steps=5))
    restored = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Restored")
    assert restored.step == 3 and cli.trainer.global_step == 5
    for k, v in saved["state_dict"].items():  # model, EMA, discriminator and codebook state as saved
        assert torch.equal(restored.weights[k], v), k
    assert any(k.startswith("ema.") for k in saved["state_dict"])
    saved_opt = saved["optimizer_states"][0]["state"]
    assert restored.optimizer.keys() == saved_opt.keys()
    for i, state in saved_opt.items():
        for name, t in state.items():
            assert torch.equal(restored.optimizer[i][name], t), (i, name)
    assert snapshot(killed) == before  # the killed run's folder is untouched; the resume wrote version_1
    resumed = root / "tiny" / "version_1"
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert (resumed / "model.safetensors").is_file()
