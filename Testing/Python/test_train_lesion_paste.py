"""train.lesion_paste: synthetic lesions in real-looking backgrounds, exact masks, geometry, cache."""
from __future__ import annotations

import numpy as np
import pytest

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import write_image
from LesionLocatorLib.synthetic.phantom import make_phantom
from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans
from train import lesion_paste as P


@pytest.fixture(scope="module")
def background():
    ct, _ = make_phantom((48, 96, 96), (2.5, 1.5, 1.5), n_lesions=0, seed=3)
    return ct


def test_paste_is_deterministic_and_labels_match_changes(background):
    img1, lab1, placed1 = P.paste_lesions(background, 4, seed=11, diameter_mm=(8.0, 30.0))
    img2, lab2, placed2 = P.paste_lesions(background, 4, seed=11, diameter_mm=(8.0, 30.0))
    assert placed1 == placed2
    np.testing.assert_array_equal(img1.array, img2.array)
    np.testing.assert_array_equal(lab1.array, lab2.array)
    other, _, _ = P.paste_lesions(background, 4, seed=12, diameter_mm=(8.0, 30.0))
    assert not np.array_equal(other.array, img1.array)
    # geometry and dtype are the background's
    assert img1.shape == background.shape and img1.spacing == background.spacing
    assert img1.origin == background.origin and img1.array.dtype == background.array.dtype
    ids = sorted(int(v) for v in np.unique(lab1.array) if v)
    assert ids == [p.lesion_id for p in placed1] and ids == list(range(1, len(ids) + 1))
    # every lesion is one connected blob, sits in its host and differs from it
    from scipy import ndimage

    changed = img1.array != background.array
    for p in placed1:
        m = lab1.array == p.lesion_id
        assert ndimage.label(m)[1] == 1
        assert changed[m].mean() > 0.9
        assert abs(p.contrast_hu) >= 5 or p.kind == "lung"
    # far from every lesion the image is untouched
    near = ndimage.binary_dilation(lab1.array > 0, iterations=int(30 / 1.5))
    assert not changed[~near].any()


def test_existing_labels_are_kept_and_never_overlapped(background):
    lab = np.zeros(background.shape, np.uint16)
    lab[20:30, 40:60, 40:60] = 1
    _, out, placed = P.paste_lesions(background, 5, seed=2, labels=lab, diameter_mm=(8.0, 25.0))
    assert (out.array[lab == 1] == 1).all()
    assert all(p.lesion_id >= 2 for p in placed)
    assert not ((out.array > 1) & (lab == 1)).any()


def test_large_lesions_may_leave_a_thin_scan_but_keep_their_core():
    full, _ = make_phantom((48, 96, 96), (5.0, 1.5, 1.5), n_lesions=0, seed=4)
    ct = Volume(full.array[18:30].copy(), full.spacing, full.origin, full.direction)
    img, lab, placed = P.paste_lesions(ct, 2, seed=5, diameter_mm=(50.0, 70.0))
    assert placed and lab.array.max() >= 1
    for p in placed:
        assert 0 <= p.centre_zyx[0] < 12


def test_bad_inputs(background):
    with pytest.raises(P.PasteError, match="do not match"):
        P.paste_lesions(background, 2, labels=np.zeros((3, 3, 3)))
    air = Volume(np.full((32, 32, 32), -1000, np.int16), (2.0, 2.0, 2.0))
    with pytest.raises(P.PasteError, match="no lesion could be placed"):
        P.paste_lesions(air, 2, seed=0)


def test_random_crop_keeps_world_positions():
    d = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])  # rotated and flipped
    vol = Volume(np.arange(20 * 30 * 40, dtype=np.int16).reshape(20, 30, 40), (3.0, 1.5, 0.8), (10.0, -5.0, 7.0), d)
    sub, lab = P.random_crop(vol, (30.0, 20.0, 16.0), np.random.default_rng(1),
                             labels=np.ones(vol.shape, np.uint8))
    assert sub.shape == (10, 13, 20) and lab.shape == sub.shape
    start = np.argwhere(vol.array == sub.array[0, 0, 0])[0]
    np.testing.assert_allclose(sub.voxel_to_world([0, 0, 0]), vol.voxel_to_world(start))
    np.testing.assert_allclose(sub.voxel_to_world([4, 5, 6]), vol.voxel_to_world(start + [4, 5, 6]))


def test_pasted_cases_are_cached(background, tmp_path):
    p = tmp_path / "bg.nii.gz"
    write_image(background, p)
    config = config_from_dicts(make_plans((32, 32, 32), (2.5, 2.0, 2.0), (2, 4, 8)), make_dataset_json())
    cases = P.pasted_cases([(str(p), None)], 2, config, tmp_path / "cache", seed=1, crop_mm=(100, 120, 120),
                           lesions_per_case=(2, 3))
    assert len(cases) == 2 and all(c.lesions for c in cases)
    again = P.pasted_cases([(str(p), None)], 2, config, tmp_path / "cache", seed=1, crop_mm=(100, 120, 120),
                           lesions_per_case=(2, 3))
    for a, b in zip(cases, again):
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.labels, b.labels)
    with pytest.raises(P.PasteError):
        P.pasted_cases([], 1, config, tmp_path / "cache")


def test_heterogeneous_masses(background):
    """heterogeneity_hu adds compartment-scale density variation to a large lesion (its mask unchanged); 0 (the
    phase-1 data) draws the same random numbers as before the option existed."""
    plain, lab0, placed0 = P.paste_lesions(background, 1, seed=21, diameter_mm=(40.0, 60.0))
    again, _, _ = P.paste_lesions(background, 1, seed=21, diameter_mm=(40.0, 60.0), heterogeneity_hu=0.0)
    np.testing.assert_array_equal(plain.array, again.array)
    het, lab1, placed1 = P.paste_lesions(background, 1, seed=21, diameter_mm=(40.0, 60.0), heterogeneity_hu=60.0)
    np.testing.assert_array_equal(lab0.array, lab1.array)  # the same lesion, drawn first
    m = lab0.array == 1
    diff = het.array.astype(np.float32) - plain.array.astype(np.float32)
    assert diff[m].std() > 8.0  # 0.3-1 x 60 HU of compartments (less at the soft edge and int16 rounding)
    from scipy import ndimage  # compartments, not noise: most of the difference survives a 5-voxel mean

    smooth = ndimage.uniform_filter(diff, 5)
    assert smooth[ndimage.binary_erosion(m, iterations=3)].std() > 0.5 * diff[m].std()
