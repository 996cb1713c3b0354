"""Image I/O keeps geometry exactly; bad files fail with clear messages."""
import numpy as np
import pytest
import SimpleITK as sitk

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import ImageReadError, read_image, write_image

from conftest import DATA, require


def make_volume() -> Volume:
    rng = np.random.default_rng(0)
    direction = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, 1]], float)
    return Volume(rng.integers(-1000, 1000, (5, 6, 7)).astype(np.int16), spacing=(2.5, 0.8, 0.6),
                  origin=(10.0, -20.0, 30.5), direction=direction)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry(tmp_path, suffix):
    v = make_volume()
    path = write_image(v, tmp_path / f"img{suffix}")
    r = read_image(path)
    np.testing.assert_array_equal(r.array, v.array)
    np.testing.assert_allclose(r.spacing, v.spacing, rtol=1e-6)
    np.testing.assert_allclose(r.origin, v.origin, atol=1e-5)
    np.testing.assert_allclose(r.direction, v.direction, atol=1e-6)
    assert not list(tmp_path.glob(".tmp_*")), "atomic write left a temp file"


def test_dicom_series_folder(tmp_path):
    v = make_volume()
    v = Volume(v.array, v.spacing, v.origin, np.eye(3))
    img = sitk.GetImageFromArray(v.array)
    img.SetSpacing(v.spacing[::-1])
    img.SetOrigin(v.origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(img.GetDepth()):
        sl = img[:, :, k]
        sl.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1")  # series instance UID
        sl.SetMetaData("0020|000d", "1.2.826.0.1.3680043.2.1125.1.2")
        sl.SetMetaData("0008|0060", "CT")
        sl.SetMetaData("0020|0032", "\\".join(str(c) for c in img.TransformIndexToPhysicalPoint((0, 0, k))))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|0013", str(k))
        sl.SetMetaData("0028|0030", f"{v.spacing[1]}\\{v.spacing[2]}")
        writer.SetFileName(str(tmp_path / f"slice{k:03d}.dcm"))
        writer.Execute(sl)
    r = read_image(tmp_path)
    np.testing.assert_array_equal(r.array, v.array)
    np.testing.assert_allclose(r.spacing, v.spacing, rtol=1e-4)
    np.testing.assert_allclose(r.origin, v.origin, atol=1e-4)


def test_missing_corrupt_and_unsupported(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    with pytest.raises(ImageReadError, match="could not read"):
        read_image(bad)
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(ImageReadError, match="unsupported"):
        read_image(tmp_path / "x.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageReadError, match="no DICOM"):
        read_image(empty)


def test_truncated_nifti(tmp_path):
    good = write_image(make_volume(), tmp_path / "good.nii.gz")
    data = good.read_bytes()
    trunc = tmp_path / "trunc.nii.gz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError):
        read_image(trunc)


def test_real_ct_with_non_identity_direction():
    path = require(DATA / "totalseg_example" / "example_ct.nii.gz")
    v = read_image(path)
    np.testing.assert_allclose(np.diag(v.direction), [-1, -1, 1])
    ref = sitk.ReadImage(str(path))
    idx = (3, 10, 20)
    np.testing.assert_allclose(v.voxel_to_world(idx[::-1]), ref.TransformIndexToPhysicalPoint(idx), atol=1e-6)
