"""What every command shares: argument types that reject nonsense when parsed (naming the flag), and
the check of an output path before any expensive work (nothing already written is overwritten unasked).
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from common.files import write_text

MAX_SEED = 2**63  # seeds must fit torch.Generator.manual_seed as a non-negative int64


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "integer"  # argparse's "invalid <name> value" wording
    return parse


positive_int = at_least(1)


def seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**63)."""
    value = at_least(0)(text)
    if value >= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def comma_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: a comma-separated, non-empty subset of ``choices``."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [s for s in items if s not in allowed]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"unknown {unknown or 'empty list'}; choose from {','.join(allowed)}")
        return items
    return parse


def positive_ints(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1 (``1,2,4``)."""
    items = [s.strip() for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("needs at least one number, e.g. 1,2,4")
    return [positive_int(s) for s in items]


def diffusion_times(text: str) -> list[float]:
    """An argparse type: comma-separated diffusion times in (0, 1) (``0.2,0.5``)."""
    try:
        times = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        times = []
    if not times or not all(0 < t < 1 for t in times):
        raise argparse.ArgumentTypeError(f"expected comma-separated times in (0, 1), got {text!r}")
    return times


def shown(path: str | os.PathLike) -> str:
    """A path as a report shows it: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def check_output(path: str | os.PathLike, suffixes: tuple[str, ...] | None = None, overwrite: bool | None = None,
                 flag: str = "--out") -> Path:
    """``path`` if a command may write it; else a one-line error, raised before any expensive work.

    ``suffixes``: a file with one of these extensions is expected; an existing one is replaced only
    with ``overwrite`` (``False`` points at ``--overwrite``, ``None`` is for commands without that
    flag). ``suffixes=None``: a folder, which must be new or empty. The nearest existing folder on
    the way must be writable (``os.access``; as root every folder counts as writable).
    """
    path = Path(path)
    if suffixes is not None:
        if path.is_dir():
            raise IsADirectoryError(f"{flag} {path} is a folder; give a file path ending in {' or '.join(suffixes)}")
        if path.suffix.lower() not in suffixes:
            raise ValueError(f"{flag} {path} must end in {' or '.join(suffixes)}")
        if path.exists() and not overwrite:
            raise FileExistsError(f"{flag} {path} exists; choose another {flag}"
                                  + (" or pass --overwrite" if overwrite is False else " (nothing is overwritten)"))
    elif path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is a file; give a new or empty folder")
    elif path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"{flag} {path} is not empty; choose another {flag} (nothing is overwritten)")
    folder = path if path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise NotADirectoryError(f"cannot write {flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {flag} {path}: {folder} is read-only; choose another {flag}")
    return path


def emit(report: dict, out: str | None) -> dict:
    """How every evaluation command reports: JSON on stdout, and optionally a file (``--out``, checked by
    ``check_output`` before any work, so never an existing one)."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        write_text(out, text + "\n")
    return report
