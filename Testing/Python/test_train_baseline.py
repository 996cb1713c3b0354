"""train.baseline: region growing from a click / inside a box."""
from __future__ import annotations

import numpy as np
import pytest

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.measure.metrics import dice
from LesionLocatorLib.synthetic.phantom import lesion_prompts, make_phantom
from train.baseline import BaselineError, region_grow


def _blob():
    rng = np.random.default_rng(0)
    arr = rng.normal(0, 10, (30, 40, 40)).astype(np.float32)
    z, y, x = np.ogrid[:30, :40, :40]
    gt = (z - 15) ** 2 + (y - 20) ** 2 + (x - 18) ** 2 <= 64
    arr[gt] += 150
    return Volume(arr, (1.0, 1.0, 1.0)), gt


def test_grows_a_contrasted_blob_from_point_and_box():
    vol, gt = _blob()
    assert dice(region_grow(vol, seed_zyx=(15, 20, 18)), gt) > 0.75  # the smoothed rim is partly lost
    assert dice(region_grow(vol, box=(6, 25, 11, 30, 9, 28)), gt) > 0.75
    cut = region_grow(vol, box=(15, 25, 11, 30, 9, 28))  # growth stays inside the box
    assert not cut[:15].any()


def test_phantom_lesion_reasonable():
    ct, lab = make_phantom((48, 96, 96), (2.0, 1.5, 1.5), n_lesions=2, seed=4)
    prompts = lesion_prompts(lab)
    scores = [dice(region_grow(ct, seed_zyx=p["point"]), lab.array == lid) for lid, p in prompts.items()]
    assert max(scores) > 0.5


def test_errors():
    vol, _ = _blob()
    with pytest.raises(BaselineError):
        region_grow(vol, seed_zyx=(100, 0, 0))
    with pytest.raises(BaselineError):
        region_grow(vol, box=(0, 50, 0, 5, 0, 5))
    with pytest.raises(BaselineError):
        region_grow(vol)
