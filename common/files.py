"""Writing files so that a kill, a crash or a full disk never leaves half a file in place of a good one.

Every checkpoint, export, manifest, report, image and shard is written to ``<name>.partial`` in the
same folder, flushed, ``fsync``-ed and renamed over ``<name>`` (a rename within one file system is
atomic on POSIX), then the folder is synced so that the rename itself survives a power loss. A
reader sees the old file or the new one, never a mix; a process killed mid-write leaves at most a
``.partial`` file beside the intact old one, replaced by the next write.

A full disk (``ENOSPC``, or ``EDQUOT`` for a quota) ends with a one-line ``OSError`` naming the
folder, the space needed and the space free; the ``.partial`` file is removed.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

PARTIAL = ".partial"
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def size_text(n: float) -> str:
    """Bytes as a short text: ``812 B``, ``3.4 MB``, ``1.2 GB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def free_space(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full(path: Path, needed: int, at_least: bool = False) -> OSError:
    """The one-line error of a full disk while writing ``path``: its folder, the space needed and free."""
    free = free_space(path.parent)
    need = f"{'at least ' if at_least else ''}{size_text(needed)} needed"
    have = f", {size_text(free)} free" if free is not None else ""
    return OSError(errno.ENOSPC, f"no space left in {path.parent} to write {path.name} ({need}{have}); free space "
                                 "there or write elsewhere (files written before are intact)")


def _create(partial: Path) -> BinaryIO:
    """The temporary file a write goes to (the single place one is opened; tests replace it to inject faults)."""
    return open(partial, "wb")


def _sync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system lets a folder be opened and synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + PARTIAL)


@contextlib.contextmanager
def _partial(path: Path, size: int | None) -> Iterator[BinaryIO]:
    """The ``.partial`` file of ``path``, flushed, synced and closed when the block ends; removed on any error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if size is not None and (free := free_space(path.parent)) is not None and size > free:
        raise disk_full(path, size)
    partial = partial_path(path)
    file = _create(partial)
    try:
        yield file
        file.flush()
        os.fsync(file.fileno())
        file.close()
    except BaseException as error:
        written = 0
        with contextlib.suppress(Exception):
            written = file.tell()
        with contextlib.suppress(Exception):
            file.close()
        with contextlib.suppress(OSError):
            partial.unlink()
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            raise disk_full(path, size if size is not None else written, at_least=size is None) from None
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, size: int | None = None) -> Iterator[BinaryIO]:
    """``with atomic_file(path) as f: f.write(...)``: ``path`` appears complete when the block ends, or not at
    all (an earlier ``path`` stays as it was). ``size``: the bytes to be written, when known, checked against
    the free space first."""
    path = Path(path)
    with _partial(path, size) as file:
        yield file
    os.replace(partial_path(path), path)
    _sync_folder(path.parent)


def write_together(contents: dict[Path, bytes]) -> list[Path]:
    """Several files (an image grid and its single images): every one is written to its ``.partial`` file
    before any is renamed, so a full disk or a crash while writing replaces none of them."""
    contents = {Path(p): data for p, data in contents.items()}
    first = next(iter(contents))
    total, free = sum(map(len, contents.values())), free_space(first.parent)
    if free is not None and total > free:
        raise disk_full(first, total)
    staged: list[Path] = []
    try:
        for path, data in contents.items():
            with _partial(path, len(data)) as file:
                file.write(data)
            staged.append(path)
    except BaseException:
        for path in staged:
            partial_path(path).unlink(missing_ok=True)
        raise
    for path in contents:
        os.replace(partial_path(path), path)
    for folder in {p.parent for p in contents}:
        _sync_folder(folder)
    return list(contents)


def write_atomic(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """``data`` written to ``path`` atomically (see ``atomic_file``)."""
    with atomic_file(path, len(data)) as f:
        f.write(data)
    return Path(path)


def write_json(path: str | os.PathLike, data: object, indent: int | None = 2) -> Path:
    """``data`` as JSON (one trailing newline), written atomically: a reader never sees half a manifest."""
    return write_atomic(path, (json.dumps(data, indent=indent, default=str) + "\n").encode())


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_atomic(path, text.encode())
