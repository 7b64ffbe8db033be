"""How every evaluation command reports: JSON on stdout, and optionally a file that is never overwritten."""
from __future__ import annotations

import json
from pathlib import Path


def refuse_existing(out: str | None) -> None:
    """Call before any work: an existing ``--out`` file is never replaced."""
    if out and Path(out).exists():
        raise SystemExit(f"error: {out} exists; choose another --out")


def emit(report: dict, out: str | None) -> dict:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return report
