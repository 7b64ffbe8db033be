"""Helpers for the bad-input matrix: every case asserts the exit status, the one-line message and
that nothing was written or changed."""
from __future__ import annotations

import errno
import hashlib
import io
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import pytest

from common import files
from common.errors import run_command

ROOT = Path(__file__).resolve().parents[2]


def run_cli(module: str, *args: str, cwd: Path, env: dict | None = None, timeout: float = 300
            ) -> subprocess.CompletedProcess:
    """``python -m module args`` in a subprocess, with this checkout importable and tracebacks off."""
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    for switch in ("WUERSTCHEN_TRACEBACK", "TRAIN_TRACEBACK"):
        if not env or switch not in env:
            full.pop(switch, None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=timeout)


def error_line(stderr: str) -> str:
    """The last non-empty line of standard error: where the one-line message must be."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_error(returncode: int, stderr: str, *fragments: str) -> str:
    """A non-zero exit, no traceback, and every fragment (case-insensitive) in the last stderr line."""
    line = error_line(stderr)
    assert returncode not in (0, None), f"expected failure, got exit 0; stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, f"traceback shown:\n{stderr[-3000:]}"
    for fragment in fragments:
        assert fragment.lower() in line.lower(), f"{fragment!r} not in the error line {line!r}"
    return line


def assert_cli_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    return assert_error(proc.returncode, proc.stderr, *fragments)


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    """Run a command's ``main`` in-process through ``common.errors.run_command``: (exit status, stderr)."""
    try:
        run_command(main, argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    return code, capsys.readouterr().err


class FullDisk(io.RawIOBase):
    """A file on a disk with ``room`` bytes left: writes beyond it fail with ENOSPC, as the kernel's do."""

    def __init__(self, path: Path, room: int):
        self.file, self.room = open(path, "wb"), room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) > self.room:
            self.file.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.file.tell()

    def fileno(self) -> int:
        return self.file.fileno()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
        super().close()


def full_disk(monkeypatch, room: int = 100, when=lambda partial: True) -> None:
    """From now on, files written through ``common.files`` (those ``when(partial path)`` picks) hit a full disk."""
    create = files._create
    monkeypatch.setattr(files, "_create", lambda partial: FullDisk(partial, room) if when(partial) else create(partial))


def bomb_png(side: int = 100_000) -> bytes:
    """A 60-byte PNG declaring side x side pixels (10^10 by default): a decompression bomb, beyond PIL's limit."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (empty folders as '<dir>')."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def unchanged():
    """``with unchanged(folder): ...`` asserts that nothing under ``folder`` was added, removed or changed."""
    from contextlib import contextmanager

    @contextmanager
    def watch(folder: Path):
        before = snapshot(folder)
        yield
        after = snapshot(folder)
        assert after == before, (f"files changed under {folder}: added {sorted(set(after) - set(before))}, "
                                 f"removed {sorted(set(before) - set(after))}, modified "
                                 f"{sorted(k for k in before if k in after and before[k] != after[k])}")
    return watch


class SignalAtStep(L.Callback):
    """Sends its own process the signal ``SIGNAL_AT_STEP`` names (``KILL:3``, ``TERM:4``) at the start of that
    step, as a scheduler or the kernel would from outside (``--trainer.callbacks+=`` this class)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        name, step = os.environ["SIGNAL_AT_STEP"].split(":")
        if trainer.global_step == int(step):
            os.kill(os.getpid(), getattr(signal, f"SIG{name}"))


class Restored(L.Callback):
    """The step, weights and optimizer state a resumed run starts from."""

    def on_train_start(self, trainer, module):
        self.step = trainer.global_step
        self.optimizer = {i: {name: t.clone() for name, t in state.items()}
                          for i, state in trainer.optimizers[0].state_dict()["state"].items()}
        self.weights = {k: v.clone() for k, v in module.state_dict().items()}
