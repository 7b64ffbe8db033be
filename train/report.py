"""How every evaluation command reports: JSON on stdout, and optionally a file (``--out``, checked by
``stages.cli.check_output`` before any work, so never an existing one)."""
from __future__ import annotations

import json
from pathlib import Path


def emit(report: dict, out: str | None) -> dict:
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
    return report
