"""Parameter counts of every stage preset, built on the meta device (no memory): ``python -m stages``."""
import json

import torch

from stages.stage_a import PRESETS as STAGE_A_PRESETS, StageA


def parameter_counts() -> dict:
    counts = {}
    with torch.device("meta"):
        for name in STAGE_A_PRESETS:
            model = StageA(name)
            counts[f"stage_a/{name}"] = sum(p.numel() for p in model.parameters())
    return counts


if __name__ == "__main__":
    print(json.dumps({k: f"{v / 1e6:.2f} M" for k, v in parameter_counts().items()}, indent=2))
