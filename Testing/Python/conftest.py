"""Shared pytest fixtures: where the real data lives, and skipping cleanly without it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LESIONLOCATOR_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
PARITY = SHARED / "parity"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def require(path: Path) -> Path:
    """Skip the calling test when an optional real-data file is not present."""
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture
def shared_data() -> Path:
    return require(DATA)


@pytest.fixture
def parity_dir() -> Path:
    return require(PARITY)
