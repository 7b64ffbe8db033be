import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups fail in milliseconds offline

import pytest
import torch
from imagedata.embedded import build_openmoji


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def openmoji_dir(tmp_path_factory):
    """The embedded OpenMoji set, built once per test session."""
    return build_openmoji(tmp_path_factory.mktemp("data") / "openmoji")
