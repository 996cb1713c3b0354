"""Voxel <-> world mapping against SimpleITK, with non-identity directions and anisotropic spacing."""
import numpy as np
import pytest
import SimpleITK as sitk

from LesionLocatorLib.core.geometry import GeometryError, Volume
from LesionLocatorLib.core.image_io import volume_to_sitk


def rotation(deg_z: float, deg_x: float) -> np.ndarray:
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


@pytest.fixture
def oblique() -> Volume:
    return Volume(np.zeros((7, 11, 13), np.int16), spacing=(3.0, 0.7, 0.9), origin=(-12.5, 40.0, 7.25),
                  direction=rotation(30, 20) @ np.diag([-1, 1, 1]))


def test_voxel_to_world_matches_simpleitk(oblique):
    img = volume_to_sitk(oblique)
    for zyx in [(0, 0, 0), (6, 10, 12), (2.5, 3.25, 7.75)]:
        expect = img.TransformContinuousIndexToPhysicalPoint([float(v) for v in zyx[::-1]])
        np.testing.assert_allclose(oblique.voxel_to_world(zyx), expect, atol=1e-9)


def test_world_round_trip_and_ras(oblique):
    pts = np.array([[1.0, 2.0, 3.0], [6.0, 0.5, 12.0]])
    world = oblique.voxel_to_world(pts)
    np.testing.assert_allclose(oblique.world_to_voxel(world), pts, atol=1e-9)
    ras = oblique.voxel_to_world(pts, ras=True)
    np.testing.assert_allclose(ras[:, :2], -world[:, :2])
    np.testing.assert_allclose(ras[:, 2], world[:, 2])
    np.testing.assert_allclose(oblique.world_to_voxel(ras, ras=True), pts, atol=1e-9)


def test_anisotropic_spacing_is_in_zyx_order():
    v = Volume(np.zeros((4, 5, 6)), spacing=(5.0, 0.5, 0.25))
    np.testing.assert_allclose(v.voxel_to_world((1, 0, 0)), (0, 0, 5.0))
    np.testing.assert_allclose(v.voxel_to_world((0, 1, 0)), (0, 0.5, 0))
    np.testing.assert_allclose(v.voxel_to_world((0, 0, 1)), (0.25, 0, 0))


@pytest.mark.parametrize("kwargs, msg", [
    (dict(array=np.zeros((3, 3))), "3D"),
    (dict(array=np.zeros((3, 3, 3)), spacing=(1, 0, 1)), "positive"),
    (dict(array=np.zeros((3, 3, 3)), direction=np.ones((3, 3))), "orthonormal"),
])
def test_invalid_geometry_is_rejected(kwargs, msg):
    with pytest.raises(GeometryError, match=msg):
        Volume(**kwargs)


def test_contains_and_same_grid(oblique):
    assert oblique.contains_voxel((0, 0, 0)) and not oblique.contains_voxel((7, 0, 0))
    other = oblique.with_array(np.ones(oblique.shape))
    assert oblique.same_grid(other)
    moved = Volume(other.array, other.spacing, (0, 0, 0), other.direction)
    assert not oblique.same_grid(moved)
    with pytest.raises(GeometryError):
        oblique.with_array(np.zeros((2, 2, 2)))


def test_sitk_direction_round_trip(oblique):
    img = volume_to_sitk(oblique)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), oblique.direction)
    assert img.GetSpacing() == pytest.approx(oblique.spacing[::-1])
    assert sitk.GetArrayViewFromImage(img).shape == oblique.shape
