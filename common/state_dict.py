"""Loading a state dict into a module strictly, with an error that says what does not match."""
from __future__ import annotations

import torch
from torch import nn


def load_into(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """``load_state_dict(strict=True)`` with an error that names the missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        def few(xs: list[str]) -> str:
            return ", ".join(xs[:4]) + (f" (+{len(xs) - 4} more)" if len(xs) > 4 else "")
        parts = [f"missing keys: {few(missing)}" if missing else "",
                 f"unexpected keys: {few(unexpected)}" if unexpected else "",
                 f"shape mismatches (checkpoint vs model): {few(shapes)}" if shapes else ""]
        raise ValueError(f"{source} does not match this model's configuration; "
                         + "; ".join(p for p in parts if p)
                         + ". Build the model with the config the checkpoint was trained with.")
    model.load_state_dict(state)
    return model
