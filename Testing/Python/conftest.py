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


def lung_ct(seed: int, shift: int = 0):
    """Lung-like background (-700 HU) with one soft-tissue nodule, moved by ``shift`` voxels in y."""
    import numpy as np

    from LesionLocatorLib.core.geometry import Volume

    r = np.random.default_rng(seed)
    a = r.normal(-700, 50, (30, 48, 44))
    zz, yy, xx = np.indices(a.shape)
    a[((zz - 15) ** 2 / 36 + (yy - 24 - shift) ** 2 / 64 + (xx - 22) ** 2 / 49) < 1] = 40
    return Volume(a.astype(np.int16), spacing=(2.0, 1.0, 1.0))
