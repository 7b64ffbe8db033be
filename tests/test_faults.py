"""Faults of long runs, injected: a kill or a full disk while a checkpoint, export, shard or image is written,
and preemption (SIGTERM) mid-training. What was written before must stay intact and usable; a full disk is a
one-line error naming the folder and the space needed."""
from __future__ import annotations

import errno
import io
import json
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from common import files
from weights.checkpoint import read_metadata, read_weights, save_safetensors
from stages.stage_a import StageA
from tests.bad_input.conftest import ROOT, assert_error, full_disk, run_cli, run_main, snapshot
from train.cli import main as train_main
from train.faults import PREEMPTED_EXIT, AtomicCheckpointIO
from train.precompute import main as precompute_main
from tests.test_data import img_bytes, write_tar
from tests.tiny_stages import TINY_A, stage_a_args



def assert_disk_full(message: str, folder: Path) -> None:
    assert "\n" not in message and "no space left in" in message and str(folder) in message, message
    assert "needed" in message and "free space there or write elsewhere" in message, message


# -- the writer --------------------------------------------------------------------------------------

def test_a_full_disk_leaves_the_earlier_file_and_no_partial(tmp_path, monkeypatch):
    path = files.write_json(tmp_path / "report.json", {"good": 1})
    full_disk(monkeypatch)
    with pytest.raises(OSError) as e:
        files.write_json(path, {"x": "y" * 10_000})
    assert e.value.errno == errno.ENOSPC
    assert_disk_full(str(e.value), tmp_path)
    assert json.loads(path.read_text()) == {"good": 1} and os.listdir(tmp_path) == ["report.json"]


def test_known_sizes_are_checked_against_the_free_space_first(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "free_space", lambda folder: 10)
    monkeypatch.setattr(files, "_create", lambda partial: pytest.fail("a write started"))
    with pytest.raises(OSError, match=r"\(1.2 KB needed, 10 B free\)"):
        files.write_atomic(tmp_path / "x.bin", b"0" * 1200)


# -- checkpoints and exports -------------------------------------------------------------------------

def test_a_full_disk_during_a_checkpoint_write_keeps_last_ckpt(tmp_path, monkeypatch):
    io_ = AtomicCheckpointIO()
    last = tmp_path / "checkpoints" / "last.ckpt"
    io_.save_checkpoint({"global_step": 2, "state_dict": {"w": torch.ones(3)}}, last)
    full_disk(monkeypatch, room=64)
    with pytest.raises(OSError) as e:
        io_.save_checkpoint({"global_step": 3, "state_dict": {"w": torch.zeros(10_000)}}, last)
    assert_disk_full(str(e.value), last.parent)
    assert torch.load(last, weights_only=True)["global_step"] == 2
    assert os.listdir(last.parent) == ["last.ckpt"]


def test_a_full_disk_during_an_export_keeps_the_earlier_export(tmp_path, monkeypatch, capsys):
    a = StageA(TINY_A)
    path = save_safetensors(a, tmp_path / "model.safetensors", "stage_a", a.config.to_dict())
    before = snapshot(tmp_path)
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    full_disk(monkeypatch, room=1000)
    with pytest.raises(OSError) as e:
        save_safetensors(a, path, "stage_a", a.config.to_dict(), overwrite=True)
    assert_disk_full(str(e.value), tmp_path)
    assert snapshot(tmp_path) == before
    read_weights(path, "stage_a")  # still loads, checksum and all


# -- a kill while last.ckpt is written ---------------------------------------------------------------

class KilledWrite(io.RawIOBase):
    """A write of ``last.ckpt`` during which the process is SIGKILLed, half-way through its bytes."""

    def __init__(self, path: Path):
        self.file = open(path, "wb")

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        self.file.write(data[: len(data) // 2])
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
        return len(data)


class KillWhileWritingLast(L.Callback):
    """The write of ``last.ckpt`` after step ``KILL_AT_STEP`` (global step KILL_AT_STEP + 1) is killed half-way."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == int(os.environ["KILL_AT_STEP"]):
            create = files._create
            files._create = lambda p: KilledWrite(p) if p.name.startswith("last.ckpt") else create(p)


@pytest.mark.slow
def test_a_kill_while_last_ckpt_is_written_leaves_the_previous_one(openmoji_dir, tmp_path):
    root = tmp_path / "runs"
    proc = run_cli("train", *stage_a_args(root, openmoji_dir, "--trainer.callbacks+=tests.test_faults.KillWhileWritingLast",
                                          steps=6), cwd=ROOT, env={"KILL_AT_STEP": "3"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    folder = root / "tiny" / "version_0" / "checkpoints"
    assert (folder / "last.ckpt.partial").is_file()  # the torn write, beside the intact checkpoint
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 3  # the one before
    cli = train_main(stage_a_args(root, openmoji_dir, "--ckpt_path", str(folder / "last.ckpt"), steps=4))
    assert cli.trainer.global_step == 4


# -- preemption ----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_the_run_resumes_from_it(openmoji_dir, tmp_path):
    """SIGTERM during step 4 (of 8; no checkpoint due before step 50): the step finishes, last.ckpt holds
    step 5, equal to an uninterrupted run's state after 5 steps, and the run resumes from it."""
    root = tmp_path / "runs"
    proc = run_cli("train", *stage_a_args(root, openmoji_dir, "--trainer.callbacks+=tests.bad_input.conftest.SignalAtStep",
                                          steps=8, every=50), cwd=ROOT, env={"SIGNAL_AT_STEP": "TERM:4"})
    last = root / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    assert proc.returncode == PREEMPTED_EXIT, proc.stderr[-2000:]
    line = assert_error(proc.returncode, proc.stderr, "stopped by SIGTERM", "after step 5", f"--ckpt_path {last}")
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 5 and sorted(os.listdir(last.parent)) == ["last.ckpt"], line

    straight = run_cli("train", *stage_a_args(tmp_path / "straight", openmoji_dir, "--lr_scheduler.init_args.total_steps",
                                              "8", steps=5, every=50), cwd=ROOT)  # the same schedule, 5 steps of it
    assert straight.returncode == 0, straight.stderr[-2000:]
    reference = torch.load(tmp_path / "straight" / "tiny" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert reference["global_step"] == 5
    for k, v in reference["state_dict"].items():
        assert torch.equal(saved["state_dict"][k], v), k

    cli = train_main(stage_a_args(root, openmoji_dir, "--ckpt_path", str(last),
                                  "--trainer.callbacks+=tests.bad_input.conftest.Restored", steps=8, every=50))
    restored = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "Restored")
    assert restored.step == 5 and cli.trainer.global_step == 8
    for k, v in saved["state_dict"].items():
        assert torch.equal(restored.weights[k], v), k
    # the export's wall time counts the fit before the SIGTERM as well as after the resume
    assert saved["wall_time_s"] > 0
    assert read_metadata(root / "tiny" / "version_1" / "model.safetensors")["wall_time_s"] > saved["wall_time_s"]


# -- precompute shards ---------------------------------------------------------------------------------

@pytest.fixture
def shards(tmp_path) -> Path:
    folder = tmp_path / "shards"
    folder.mkdir()
    for s in range(2):
        write_tar(folder / f"{s:06d}.tar", [(f"{s}_{i}", {"png": img_bytes((40 * i, 100, 30 * s)), "txt": "a red thing"})
                                            for i in range(3)])
    return folder


@pytest.fixture
def stage_a_export(tmp_path) -> Path:
    a = StageA(TINY_A)
    return save_safetensors(a, tmp_path / "stage_a.safetensors", "stage_a", a.config.to_dict())


def test_a_full_disk_during_a_precompute_shard_keeps_the_finished_ones(shards, stage_a_export, tmp_path, monkeypatch,
                                                                      capsys):
    out = tmp_path / "latents"
    argv = ["--shards", str(shards), "--out", str(out), "--stage-a", str(stage_a_export), "--image-size", "16"]
    full_disk(monkeypatch, room=2000, when=lambda partial: partial.name == "000001.tar.partial")
    code, err = run_main(precompute_main, argv, capsys)
    assert code == 2
    line = assert_error(code, err, "no space left in", str(out), "000001.tar", "at least", "needed")
    assert sorted(os.listdir(out)) == ["000000.tar", "manifest.json"], line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["shards"] == {"000000.tar": 3} and not manifest["complete"]
    monkeypatch.undo()
    code, err = run_main(precompute_main, argv, capsys)  # the same command continues once there is room
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["count"] == 6
