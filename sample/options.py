"""The options the evaluation commands share (``sample.evaluate``, ``sample.compare``,
``sample.evaluate_stage_a``, ``sample.evaluate_stage_b``): which data, how much of it, batch size, seed and
where the JSON report goes."""
from __future__ import annotations

import argparse
from collections.abc import Sequence

from common.cli import check_output, positive_int, seed


def add_evaluation_arguments(ap: argparse.ArgumentParser, batch_size: int, seeded: bool = True,
                             json_out: bool = True) -> argparse.ArgumentParser:
    """``--data-dir``, ``--limit``, ``--batch-size`` (default ``batch_size``), ``--seed`` (when ``seeded``) and
    ``--out`` (a new JSON file, when ``json_out``)."""
    ap.add_argument("--data-dir", default="data/openmoji", help="embedded OpenMoji shards (built if missing)")
    ap.add_argument("--limit", type=positive_int, default=None, help="evaluate at most this many val images/captions")
    ap.add_argument("--batch-size", type=positive_int, default=batch_size)
    if seeded:
        ap.add_argument("--seed", type=seed, default=0)
    if json_out:
        ap.add_argument("--out", default=None, help="also write the JSON here (never overwrites)")
    return ap


def parse_evaluation_arguments(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed arguments; an ``--out`` that is not a new ``.json`` file is refused before any work."""
    args = ap.parse_args(argv)
    if args.out:
        check_output(args.out, (".json",))
    return args
