"""Parameter counts of every stage preset, built on the meta device (no memory): ``python -m stages``."""
import argparse
import json

import torch
from torch import nn

from common.errors import run_command
from stages.baseline_ldm import PRESETS as BASELINE_PRESETS, BaselineLDM
from stages.stage_a import PRESETS as STAGE_A_PRESETS, StageA
from stages.stage_b import PRESETS as STAGE_B_PRESETS, StageB
from stages.stage_c import PRESETS as STAGE_C_PRESETS, StageC
from stages.stable_cascade import (STAGE_B_PRESETS as STAGE_B3_PRESETS, STAGE_C_PRESETS as STAGE_C3_PRESETS, StageB3,
                                   StageC3)
from semantic_compressor import SemanticCompressor


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameter_counts() -> dict:
    counts = {}
    with torch.device("meta"):
        for name in STAGE_A_PRESETS:
            counts[f"stage_a/{name}"] = _count(StageA(name))
        for name in STAGE_B_PRESETS:
            counts[f"stage_b/{name}"] = _count(StageB(name))
        for name in STAGE_C_PRESETS:
            counts[f"stage_c/{name}"] = _count(StageC(name))
        for name in STAGE_B3_PRESETS:  # Stable Cascade (v3)
            counts[f"stage_b3/{name}"] = _count(StageB3(name))
        for name in STAGE_C3_PRESETS:
            counts[f"stage_c3/{name}"] = _count(StageC3(name))
        for name in BASELINE_PRESETS:  # the single-stage baseline LDM (paper Sec. 4)
            counts[f"baseline_ldm/{name}"] = _count(BaselineLDM(name))
        for backbone in ("efficientnet_v2_s", "efficientnet_lite0"):
            counts[f"semantic_compressor/{backbone}"] = _count(SemanticCompressor(backbone, pretrained=False))
    return counts


def main(argv: list[str] | None = None) -> dict:
    argparse.ArgumentParser(prog="python -m stages", description=__doc__).parse_args(argv)
    counts = parameter_counts()
    print(json.dumps({k: f"{v / 1e6:.2f} M" for k, v in counts.items()}, indent=2))
    return counts


if __name__ == "__main__":
    run_command(main)
