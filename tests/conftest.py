import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # hub look-ups fail in milliseconds offline

import shutil

import pytest
import torch
from imagedata.embedded import build_openmoji

from tests.tiny_stages import BUNDLE_FILES, save_tiny_bundle


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def openmoji_dir(tmp_path_factory):
    """The embedded OpenMoji set, built once per test session."""
    return build_openmoji(tmp_path_factory.mktemp("data") / "openmoji")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Tiny random Stage A, compressor, Stage B and Stage C exports that fit together (``save_tiny_bundle``),
    built once per session. Read only: a test that adds or changes files works on ``tiny_bundle_copy``."""
    return save_tiny_bundle(tmp_path_factory.mktemp("tiny_bundle"))


@pytest.fixture(scope="session")
def tiny_bundle_copy(tiny_bundle, tmp_path_factory):
    """``tiny_bundle_copy(name)``: a new folder holding a copy of the tiny bundle's four exports."""
    def copy(name):
        out = tmp_path_factory.mktemp(name)
        for file in BUNDLE_FILES:
            shutil.copy2(tiny_bundle / file, out / file)
        return out
    return copy
