"""Reading and writing volumes with SimpleITK (NIfTI, NRRD, MHA, DICOM series folders)."""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .files import IMAGE_SUFFIXES, atomic_write
from .geometry import GeometryError, Volume


class ImageReadError(IOError):
    """An image file could not be read (missing, corrupt or unsupported)."""


def _has_supported_suffix(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(s) for s in IMAGE_SUFFIXES)


def volume_from_sitk(image: sitk.Image) -> Volume:
    if image.GetDimension() != 3:
        raise ImageReadError(f"expected a 3D image, got {image.GetDimension()}D")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError("multi-component (vector/RGB) images are not supported; give a scalar CT volume")
    array = sitk.GetArrayFromImage(image)
    return Volume(
        array=array,
        spacing=tuple(image.GetSpacing()[::-1]),
        origin=tuple(image.GetOrigin()),
        direction=np.array(image.GetDirection()).reshape(3, 3),
    )


def volume_to_sitk(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in np.asarray(volume.direction).ravel()))
    return image


def read_image(path: str | os.PathLike) -> Volume:
    """Read a 3D image file or a DICOM series folder into a :class:`Volume`."""
    path = Path(path)
    if not path.exists():
        raise ImageReadError(f"image not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise ImageReadError(f"no DICOM series found in folder {path}")
            if len(series) > 1:
                raise ImageReadError(
                    f"folder {path} holds {len(series)} DICOM series; point to a folder with exactly one"
                )
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series[0]))
            image = reader.Execute()
        else:
            if not _has_supported_suffix(path) and path.suffix.lower() != ".dcm":
                raise ImageReadError(
                    f"unsupported image format: {path.name} (supported: {', '.join(IMAGE_SUFFIXES)}, DICOM folder)"
                )
            _check_nifti_complete(path)
            image = sitk.ReadImage(str(path))
    except ImageReadError:
        raise
    except RuntimeError as exc:  # SimpleITK reports corrupt files as RuntimeError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unknown error"
        raise ImageReadError(f"could not read image {path}: {first}") from exc
    return volume_from_sitk(image)


def _check_nifti_complete(path: Path) -> None:
    """ITK zero-fills a truncated NIfTI without complaint; check the byte count ourselves."""
    name = path.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        return
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    n_vox = int(np.prod(reader.GetSize())) * reader.GetNumberOfComponents()
    bytes_per = np.dtype(sitk.GetArrayFromImage(sitk.Image([1] * reader.GetDimension(), reader.GetPixelID())).dtype).itemsize
    needed = n_vox * bytes_per + 348
    if name.endswith(".gz"):
        total = 0
        try:
            with gzip.open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    total += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise ImageReadError(f"could not read image {path}: the compressed file is truncated or corrupt") from exc
    else:
        total = path.stat().st_size
    if total < needed:
        raise ImageReadError(f"could not read image {path}: file is truncated ({total} of at least {needed} bytes)")


def write_image(volume: Volume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves a half-written output."""
    path = Path(path)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    return atomic_write(path, lambda tmp: sitk.WriteImage(volume_to_sitk(volume), tmp, compress), suffix)


def load_volume(image: Volume | str | os.PathLike) -> Volume:
    """A Volume (read from a path when needed) with finite numeric voxels, or a GeometryError."""
    if not isinstance(image, Volume):
        image = read_image(image)
    arr = image.array
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise GeometryError(f"image voxels must be numbers, got dtype {arr.dtype}")
    if min(arr.shape) < 1:
        raise GeometryError(f"image is empty: shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise GeometryError("image contains NaN or infinite values")
    return image
