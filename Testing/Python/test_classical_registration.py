"""Tests for the classical (SimpleITK) registration backend: synthetic phantoms and a real CT with known warps."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DATA, require
from LesionLocatorLib.track.classical_registration import (
    ClassicalPropagator,
    RegistrationError,
    register_classical,
    transform_to_deformation,
)
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import read_image, volume_from_sitk, volume_to_sitk
from LesionLocatorLib.track.propagation import warp_points


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


def centre_mm(mask: np.ndarray, volume: Volume) -> np.ndarray:
    return volume.voxel_to_world(np.argwhere(mask > 0).mean(axis=0))


def known_transform(reference: sitk.Image, shift_mm, amplitude_mm: float, seed: int) -> sitk.Transform:
    """Follow-up -> baseline physical map: a smooth random B-spline displacement, then a translation."""
    bspline = sitk.BSplineTransformInitializer(reference, [3, 3, 3], 3)
    rng = np.random.default_rng(seed)
    bspline.SetParameters(tuple(rng.uniform(-amplitude_mm, amplitude_mm, len(bspline.GetParameters()))))
    return sitk.CompositeTransform([sitk.TranslationTransform(3, tuple(float(v) for v in shift_mm)), bspline])


def make_followup(image: Volume, mask: Volume, transform: sitk.Transform, grid: sitk.Image | None = None):
    """Resample the baseline image and mask through the known pull-back transform onto the follow-up grid."""
    img = volume_to_sitk(image.with_array(image.array.astype(np.float32)))
    msk = volume_to_sitk(mask.with_array(mask.array.astype(np.uint8)))
    ref = grid if grid is not None else img
    fu = sitk.Resample(img, ref, transform, sitk.sitkLinear, -1000.0, sitk.sitkFloat32)
    fu_mask = sitk.Resample(msk, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return volume_from_sitk(fu), sitk.GetArrayFromImage(fu_mask)


def oblique_grid(around: Volume, size_xyz, spacing_xyz, angle_deg: float) -> sitk.Image:
    """A follow-up grid centred on ``around`` with other spacing, flipped x/y axes and an in-plane rotation."""
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([-1, -1, 1])
    grid = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    grid.SetDirection(tuple(rot.ravel()))
    grid.SetSpacing(tuple(float(s) for s in spacing_xyz))
    centre = around.voxel_to_world((np.array(around.shape) - 1) / 2.0)
    extent = (np.array(size_xyz) - 1) * np.array(spacing_xyz)
    grid.SetOrigin(tuple(centre - rot @ (extent / 2)))
    return grid


def phantom(seed: int = 0) -> tuple[Volume, Volume]:
    """A body-like box of soft tissue in air, with a lung, a bone, an organ and a lesion; 2 x 1.5 x 1.5 mm."""
    shape = (56, 96, 100)
    spacing = (2.0, 1.5, 1.5)
    z, y, x = np.indices(shape).astype(np.float32)
    zc, yc, xc = z * spacing[0], y * spacing[1], x * spacing[2]

    def ellipsoid(c, r):
        return ((zc - c[0]) / r[0]) ** 2 + ((yc - c[1]) / r[1]) ** 2 + ((xc - c[2]) / r[2]) ** 2 <= 1

    img = np.full(shape, -1000.0, np.float32)
    img[ellipsoid((56, 72, 75), (48, 55, 66))] = 40.0  # body
    img[ellipsoid((50, 60, 45), (25, 25, 18))] = -820.0  # lung
    img[ellipsoid((60, 100, 95), (30, 9, 9))] = 700.0  # bone
    img[ellipsoid((62, 55, 105), (18, 14, 20))] = 120.0  # organ
    lesion = ellipsoid((48, 88, 70), (9, 8, 10))
    img[lesion] = 180.0
    img += np.random.default_rng(seed).normal(0, 15, shape).astype(np.float32)
    geom = dict(spacing=spacing, origin=(-80.0, 20.0, 300.0))
    return Volume(img, **geom), Volume(lesion.astype(np.uint8), **geom)


# -- geometry of the map, without registration -------------------------------------------------------------------

def test_transform_to_deformation_maps_physical_points():
    baseline = Volume(np.zeros((20, 30, 40), np.float32), spacing=(2.5, 0.9, 0.8), origin=(10, -5, 3))
    grid = oblique_grid(baseline, (35, 28, 18), (1.1, 1.2, 3.0), 20)
    followup = volume_from_sitk(grid)
    t = sitk.TranslationTransform(3, (4.0, -2.0, 7.0))
    d = transform_to_deformation(t, baseline, followup, resolution_mm=3.0)
    assert d.grid_shape[0] < followup.shape[0] + 1 and d.interpolation == "linear"
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, np.array(followup.shape) - 1, (50, 3))
    expected = baseline.world_to_voxel(followup.voxel_to_world(pts) + np.array([4.0, -2.0, 7.0]))
    np.testing.assert_allclose(d.sample(pts), expected, atol=1e-3)
    back = warp_points(d, expected[:5])
    np.testing.assert_allclose(back, pts[:5], atol=1e-2)


# -- synthetic phantom --------------------------------------------------------------------------------------------

def test_phantom_shift_and_deformation():
    image, mask = phantom()
    t = known_transform(volume_to_sitk(image), (10.0, 0.0, 0.0), 3.0, seed=1)
    followup, truth = make_followup(image, mask, t)
    d = register_classical(image, followup)
    warped = d.warp(mask.array)
    assert dice(warped, truth) >= 0.8
    assert np.linalg.norm(centre_mm(warped, followup) - centre_mm(truth, followup)) < 3.0
    # deterministic: the same pair gives the same map
    np.testing.assert_array_equal(register_classical(image, followup).coords, d.coords)


def test_unrelated_images_are_rejected():
    image, _ = phantom()
    noise = image.with_array(np.random.default_rng(3).normal(0, 300, image.shape).astype(np.float32))
    with pytest.raises(RegistrationError, match="correlation"):
        register_classical(image, noise)
    flat = image.with_array(np.zeros(image.shape, np.float32))
    with pytest.raises(RegistrationError, match="follow-up image has no contrast"):
        register_classical(image, flat)


def test_partial_field_of_view_followup():
    """A follow-up showing only a 60 mm slab of the baseline."""
    image, mask = phantom()
    t = known_transform(volume_to_sitk(image), (0.0, 4.0, 0.0), 2.0, seed=4)
    followup, truth = make_followup(image, mask, t)
    x0 = 25
    slab = Volume(followup.array[:, :, x0:x0 + 40].copy(), followup.spacing,
                  followup.voxel_to_world((0, 0, x0)), followup.direction)
    prop = ClassicalPropagator()
    warped = prop.register(image, slab).warp(mask.array)
    assert dice(warped, truth[:, :, x0:x0 + 40]) >= 0.8
    assert prop.last_report.overlap > 0.9
    # the overlap check: demanding more overlap than the slab has fails with a clear message
    with pytest.raises(RegistrationError, match="overlap"):
        ClassicalPropagator(deformable=False, min_overlap=1.01).register(image, slab)


# -- real CT --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sts002():
    ct = read_image(require(DATA / "sts" / "STS_002_ct.nii.gz"))
    lesions = read_image(require(DATA / "sts" / "STS_002_lesions.nii.gz"))
    return ct, lesions.with_array((lesions.array > 0).astype(np.uint8))


def test_real_ct_shift_and_deformation(sts002):
    ct, mask = sts002
    t = known_transform(volume_to_sitk(ct), (10.0, 0.0, 0.0), 4.0, seed=0)
    followup, truth = make_followup(ct, mask, t)
    prop = ClassicalPropagator()
    d = prop.register(ct, followup)
    warped = d.warp(mask.array)
    assert dice(warped, truth) >= 0.8
    assert np.linalg.norm(centre_mm(warped, followup) - centre_mm(truth, followup)) < 25.0
    assert prop.last_report is not None and prop.last_report.correlation > prop.last_report.correlation_before


def test_real_ct_oblique_anisotropic_followup_grid(sts002):
    ct, mask = sts002
    t = known_transform(volume_to_sitk(ct), (6.0, 8.0, 0.0), 3.0, seed=2)
    grid = oblique_grid(ct, (120, 110, 60), (1.3, 1.4, 2.5), 8.0)
    followup, truth = make_followup(ct, mask, t, grid)
    assert not np.allclose(followup.direction, np.eye(3))
    d = register_classical(ct, followup)
    assert d.followup_shape == followup.shape and d.baseline_shape == ct.shape
    warped = d.warp(mask.array)
    assert dice(warped, truth) >= 0.8
    assert np.linalg.norm(centre_mm(warped, followup) - centre_mm(truth, followup)) < 25.0
    # the lesion centre pushed forward as a point lands near the warped mask's centre
    p = warp_points(d, np.argwhere(mask.array > 0).mean(axis=0)[None])[0]
    assert np.linalg.norm(followup.voxel_to_world(p) - centre_mm(truth, followup)) < 5.0


def test_command_line_register(tmp_path):
    import argparse

    from LesionLocatorLib.cli import register
    from LesionLocatorLib.core.geometry import GeometryError
    from LesionLocatorLib.core.image_io import write_image

    image, mask = phantom()
    t = known_transform(volume_to_sitk(image), (8.0, 0.0, 0.0), 2.0, seed=5)
    followup, truth = make_followup(image, mask, t)
    write_image(image, tmp_path / "b.nii.gz")
    write_image(followup, tmp_path / "f.nii.gz")
    write_image(mask.with_array(mask.array * 7), tmp_path / "m.nii.gz")
    parser = argparse.ArgumentParser()
    register.add_arguments(parser)
    args = parser.parse_args(["--baseline", str(tmp_path / "b.nii.gz"), "--followup", str(tmp_path / "f.nii.gz"),
                              "--mask", str(tmp_path / "m.nii.gz"), "-o", str(tmp_path / "out.nii.gz"),
                              "--affine-only"])
    assert register.run(args) == 0
    out = read_image(tmp_path / "out.nii.gz")
    assert out.same_grid(followup) and set(np.unique(out.array)) == {0, 7}
    assert dice(out.array, truth) >= 0.8
    # a mask that is not on the baseline's grid is refused
    write_image(Volume(truth[:, :, :50].copy(), followup.spacing, followup.origin), tmp_path / "wrong.nii.gz")
    args.mask = str(tmp_path / "wrong.nii.gz")
    with pytest.raises(GeometryError, match="not on the baseline"):
        register.run(args)
