"""Tests for LesionLocatorLib.synthetic.longitudinal: growth field sign, vanishing, physical-space motion, z extent."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from LesionLocatorLib.core.geometry import GeometryError, Volume
from LesionLocatorLib.synthetic.longitudinal import (
    GROWTH_AMPLITUDES,
    FollowupError,
    apply_lesion_growth,
    grow_shrink_field,
    lesion_sigma,
    make_followup,
    random_growth,
    rotation_matrix,
)
from LesionLocatorLib.synthetic.phantom import make_phantom


def _blob_case(radius: float = 8.0, shape=(40, 48, 48)) -> tuple[Volume, Volume]:
    """Noisy soft tissue with one irregular lesion (id 3) and one small round lesion (id 9)."""
    rng = np.random.default_rng(0)
    z, y, x = np.indices(shape)
    r = np.sqrt((z - 20) ** 2 + (y - 22) ** 2 + ((x - 20) * 1.2) ** 2)
    lab = np.zeros(shape, np.uint16)
    lab[r < radius] = 3
    lab[(z - 20) ** 2 + (y - 24) ** 2 + (x - 40) ** 2 < 9] = 9
    img = np.full(shape, 40.0) + rng.normal(0, 10, shape)
    img[lab == 3] = 120
    img[lab == 9] = -20
    ct = Volume(img.astype(np.int16), (1.5, 1.0, 1.0))
    return ct, ct.with_array(lab)


def test_lesion_sigma_range():
    assert lesion_sigma(10) == 4.0
    assert lesion_sigma(10 ** 6) == 5.5
    assert 4.0 < lesion_sigma(4000) < 5.5


def test_field_sign_points_into_lesion_for_growth():
    _, lab = _blob_case()
    v = grow_shrink_field(lab.array, 3, 25.0, None, np.random.default_rng(0))
    assert v.shape == (3, *lab.shape) and v.dtype == np.float32
    # just outside the lesion on the +x side the pull-back displacement points back (-x) into it
    xs = np.flatnonzero(lab.array[20, 22] == 3)
    assert v[2, 20, 22, xs[-1] + 1] < 0 and v[2, 20, 22, xs[0] - 1] > 0
    vs = grow_shrink_field(lab.array, 3, -22.0, None, np.random.default_rng(0))
    assert vs[2, 20, 22, xs[-1] + 1] > 0
    # zero far from the lesion, zero for an absent id
    assert not v[:, :, :, 46:].any() and np.abs(v[:, :, :, :2]).max() < 0.05 * np.abs(v).max()
    assert not grow_shrink_field(lab.array, 5, 25.0, 4.0, 0).any()
    assert np.abs(v).max() > 0.3


@pytest.mark.parametrize("seed", [0, 1])
def test_growth_and_shrinkage_change_volume(seed):
    ct, lab = _blob_case()
    n0 = int((lab.array == 3).sum())
    sizes = {}
    for a in GROWTH_AMPLITUDES:
        _, l1, info = apply_lesion_growth(ct.array.astype(np.float32), lab.array, {3: a}, seed=seed)
        sizes[a] = int((l1 == 3).sum())
        assert info[3]["stages"] == 3 and info[3]["stage_amplitude"] == pytest.approx(a / 3)
        # other lesions are untouched and ids are kept
        np.testing.assert_array_equal(l1 == 9, lab.array == 9)
        assert set(np.unique(l1)) == {0, 3, 9}
    assert sizes[25.0] > sizes[15.0] > 1.1 * n0
    assert sizes[-22.0] < sizes[-18.0] < 0.9 * n0
    # one connected lesion remains
    for a in (25.0, -22.0):
        _, l1, _ = apply_lesion_growth(ct.array.astype(np.float32), lab.array, {3: a}, seed=seed)
        assert ndimage.label(l1 == 3)[1] == 1


def test_growth_moves_image_with_labels():
    ct, lab = _blob_case()
    f, fl, meta = make_followup(ct, lab, seed=0, growth={3: 25.0}, noise_hu=0.0)
    les = meta["lesions"]["3"]
    assert les["volume_ratio"] > 1.1 and les["status"] == "present"
    # the bright lesion intensity follows the grown label
    assert float(np.mean(f.array[fl.array == 3])) > 90
    grown_ring = (fl.array == 3) & (lab.array != 3)
    assert grown_ring.sum() > 0 and float(np.mean(f.array[grown_ring])) > 70


def test_followup_on_phantom_deterministic_and_json():
    ct, lab = make_phantom((32, 64, 64), (4.0, 3.0, 3.0), n_lesions=3, seed=4)
    kw = dict(shift_mm=(4.0, -3.0, 6.0), smooth_deformation_mm=2.0, rotation_deg=(1.0, -2.0, 3.0),
              growth=random_growth([1, 2], 0), vanish=[3], noise_hu=5.0)
    a = make_followup(ct, lab, seed=7, **kw)
    b = make_followup(ct, lab, seed=7, **kw)
    c = make_followup(ct, lab, seed=8, **kw)
    np.testing.assert_array_equal(a[0].array, b[0].array)
    np.testing.assert_array_equal(a[1].array, b[1].array)
    assert a[2] == b[2]
    assert not np.array_equal(a[0].array, c[0].array)
    assert a[0].array.dtype == np.int16 and a[1].array.dtype == np.uint16
    json.dumps(a[2])  # metadata is JSON-serialisable
    assert a[2]["lesions"]["3"]["status"] == "vanished"
    assert set(a[2]["growth"]) == {"1", "2"}


def _shift_check(direction: np.ndarray, spacing, shift):
    ct, lab = make_phantom((40, 72, 64), spacing, n_lesions=3, seed=2, direction=direction,
                           origin=(12.0, -30.0, 100.0))
    f, fl, meta = make_followup(ct, lab, seed=0, shift_mm=shift, noise_hu=0.0)
    assert f.same_grid(ct)
    tol = 0.5 * max(spacing)
    for lid in (1, 2, 3):
        les = meta["lesions"][str(lid)]
        pts0 = np.argwhere(lab.array == lid).mean(0)
        pts1 = np.argwhere(fl.array == lid).mean(0)
        c0, c1 = ct.voxel_to_world(pts0), f.voxel_to_world(pts1)
        np.testing.assert_allclose(c1 - c0, shift, atol=tol)
        np.testing.assert_allclose(les["followup_center_lps"], c1, atol=1e-6)
        np.testing.assert_allclose(les["expected_followup_center_lps"], c0 + np.asarray(shift), atol=1e-6)
    # the image moved with the labels: the follow-up sampled at (baseline position + shift) is the baseline
    idx = np.argwhere(lab.array > 0)
    idx = np.concatenate([idx, np.argwhere(np.ones(ct.shape, bool))[::97]])
    q = f.world_to_voxel(ct.voxel_to_world(idx) + np.asarray(shift))
    ok = np.all((q > 1) & (q < np.array(f.shape) - 2), axis=1)
    sampled = ndimage.map_coordinates(f.array.astype(np.float32), q[ok].T, order=1)
    base = ct.array[tuple(idx[ok].T)].astype(np.float32)
    assert np.corrcoef(sampled, base)[0, 1] > 0.97


def test_shift_in_world_space_identity_direction():
    _shift_check(np.eye(3), (2.0, 1.5, 1.5), (6.0, -4.5, 5.0))


def test_shift_in_world_space_oblique_direction_anisotropic():
    direction = rotation_matrix((20.0, -10.0, 35.0)) @ np.diag([-1.0, 1.0, 1.0])  # oblique, left-handed
    _shift_check(direction, (3.0, 1.25, 1.75), (-7.0, 3.0, 9.0))


def test_rotation_maps_centres_as_documented():
    ct, lab = make_phantom((40, 64, 64), (2.5, 2.0, 2.0), n_lesions=3, seed=6)
    f, fl, meta = make_followup(ct, lab, seed=0, rotation_deg=(0.0, 0.0, 8.0), shift_mm=(2.0, 0.0, 0.0),
                                noise_hu=0.0)
    for lid in ("1", "2", "3"):
        les = meta["lesions"][lid]
        if les["status"] == "present":
            np.testing.assert_allclose(les["followup_center_lps"], les["expected_followup_center_lps"], atol=1.5)


def test_smooth_deformation_is_bounded():
    ct, lab = make_phantom((32, 64, 64), (4.0, 3.0, 3.0), n_lesions=3, seed=1)
    f, fl, meta = make_followup(ct, lab, seed=3, smooth_deformation_mm=4.0, noise_hu=0.0)
    assert not np.array_equal(f.array, ct.array)
    for les in meta["lesions"].values():
        d = np.linalg.norm(np.subtract(les["followup_center_lps"], les["baseline_center_lps"]))
        assert d <= 4.0 + 3.0  # deformation bound + label quantisation


def test_vanish_replaces_with_surroundings():
    ct, lab = _blob_case()
    f, fl, meta = make_followup(ct, lab, seed=0, vanish=[3], noise_hu=0.0)
    m = lab.array == 3
    assert not (fl.array == 3).any() and (fl.array == 9).sum() == (lab.array == 9).sum()
    assert meta["lesions"]["3"]["status"] == "vanished" and meta["lesions"]["3"]["followup_voxels"] == 0
    filled = f.array[m].astype(float)
    assert abs(filled.mean() - 40.0) < 8  # surrounding tissue, not the 120 HU lesion
    assert 3 < filled.std() < 25  # textured like the surroundings, not a flat patch
    np.testing.assert_array_equal(f.array[~m], ct.array[~m])  # nothing else changed


def test_vanish_on_phantom_matches_ring():
    ct, lab = make_phantom((40, 80, 80), (3.0, 2.0, 2.0), n_lesions=3, seed=9)
    for lid in (1, 2, 3):
        m = lab.array == lid
        ring = ndimage.binary_dilation(m, iterations=2) & ~m & (lab.array == 0)
        before = abs(float(ct.array[m].mean()) - float(np.median(ct.array[ring])))
        f, fl, _ = make_followup(ct, lab, seed=0, vanish=[lid], noise_hu=0.0)
        after = abs(float(f.array[m].mean()) - float(np.median(ct.array[ring])))
        assert after < 0.35 * before + 10, (lid, before, after)
        assert not (fl.array == lid).any()


def test_z_extent_crops_and_pads_keeping_world_positions():
    ct, lab = make_phantom((40, 64, 64), (2.5, 2.0, 2.0), n_lesions=3, seed=5)
    f, fl, meta = make_followup(ct, lab, seed=0, z_extent=(-5, 30), noise_hu=0.0)
    assert f.shape == (35, 64, 64) and fl.shape == (35, 64, 64)
    np.testing.assert_allclose(f.origin, ct.voxel_to_world((-5, 0, 0)))
    assert np.all(f.array[:5] == -1000) and not fl.array[:5].any()  # padded slices: air, no lesion
    np.testing.assert_array_equal(f.array[5:], ct.array[:30])  # kept slices are unchanged
    for lid, les in meta["lesions"].items():
        zs = np.flatnonzero((lab.array == int(lid)).any(axis=(1, 2)))
        if zs[0] >= 30:
            assert les["status"] == "out_of_view"
        elif zs[-1] < 30:
            assert les["status"] == "present"
            np.testing.assert_allclose(les["followup_center_lps"], les["baseline_center_lps"], atol=1e-6)
    f2, _, _ = make_followup(ct, lab, seed=0, z_extent=(10, 20))
    assert f2.shape == (10, 64, 64)


def test_bad_arguments():
    ct, lab = _blob_case()
    with pytest.raises(FollowupError, match="not in the label map"):
        make_followup(ct, lab, growth={4: 25.0})
    with pytest.raises(FollowupError, match="not in the label map"):
        make_followup(ct, lab, vanish=[4])
    with pytest.raises(FollowupError, match="both"):
        make_followup(ct, lab, growth={3: 25.0}, vanish=[3])
    with pytest.raises(FollowupError, match="z_extent"):
        make_followup(ct, lab, z_extent=(10, 5))
    with pytest.raises(FollowupError, match="overlap"):
        make_followup(ct, lab, z_extent=(100, 120))
    with pytest.raises(FollowupError, match="shift_mm"):
        make_followup(ct, lab, shift_mm=(1.0, 2.0))
    other = Volume(lab.array, (1.0, 1.0, 1.0))
    with pytest.raises(GeometryError):
        make_followup(ct, other)
    with pytest.raises(FollowupError, match="integer"):
        make_followup(ct, lab.with_array(lab.array.astype(np.float32)))
