"""Shared fixtures. Tests that need the real datasets in ../shared skip with a reason when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _shared_root() -> Path:
    env = os.environ.get("KARYO_SHARED")
    return Path(env) if env else REPO.parent / "shared"


SHARED = _shared_root()
DATA = SHARED / "data"
GOLDEN = SHARED / "golden"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the shared datasets (``../shared/data``, or ``$KARYO_SHARED/data``)."""
    if not DATA.is_dir():
        pytest.skip(f"shared datasets not found at {DATA} (set KARYO_SHARED to the folder holding data/)")
    return DATA


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not (GOLDEN / "golden.json").is_file():
        pytest.skip(f"golden metric cases not found at {GOLDEN}")
    return GOLDEN


@pytest.fixture
def one_thread():
    """One torch thread: deterministic, and small tensors gain nothing from two on a busy 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
