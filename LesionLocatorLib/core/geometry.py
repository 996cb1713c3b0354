"""Image geometry: a volume array in (z, y, x) plus its physical placement.

Conventions (the same as SimpleITK / ITK and the published LesionLocator code):
- ``array`` is indexed (z, y, x), as ``sitk.GetArrayFromImage`` returns it.
- ``spacing`` is given in the array's order (z, y, x), in mm.
- ``origin`` is the LPS position (x, y, z) of voxel (0, 0, 0), in mm.
- ``direction`` is the 3x3 ITK direction matrix: column ``i`` is the LPS unit
  vector of the ITK index axis ``i`` (i = x, j = y, k = z).

World coordinates are LPS unless a function says otherwise; RAS is accepted only
through an explicit flag because silently guessing the convention is how masks
end up mirrored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class GeometryError(ValueError):
    """Raised when an image geometry is invalid or two geometries do not match."""


@dataclass
class Volume:
    """A 3D image (or label map) with its physical geometry."""

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise GeometryError(f"expected a 3D volume, got an array of shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)  # type: ignore[assignment]
        self.origin = tuple(float(o) for o in self.origin)  # type: ignore[assignment]
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        if len(self.spacing) != 3 or len(self.origin) != 3:
            raise GeometryError("spacing and origin need three values each")
        if not all(np.isfinite(self.spacing)) or min(self.spacing) <= 0:
            raise GeometryError(f"spacing must be positive and finite, got {self.spacing}")
        if not np.all(np.isfinite(self.origin)):
            raise GeometryError(f"origin must be finite, got {self.origin}")
        if abs(abs(np.linalg.det(self.direction)) - 1.0) > 1e-3:
            raise GeometryError(f"direction matrix is not orthonormal: {self.direction.tolist()}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> "Volume":
        """Same geometry, other voxels (e.g. a mask for this image)."""
        if tuple(array.shape) != self.shape:
            raise GeometryError(f"array shape {array.shape} does not match the image shape {self.shape}")
        return Volume(array, self.spacing, self.origin, self.direction.copy())

    # -- index <-> world --------------------------------------------------------------
    def _index_to_world_matrix(self) -> np.ndarray:
        """4x4 matrix mapping homogeneous (z, y, x, 1) voxel coordinates to LPS (x, y, z, 1)."""
        spacing_xyz = np.array(self.spacing[::-1])
        m = np.eye(4)
        # column order of the input is (z, y, x): reverse the ITK (i, j, k) columns.
        m[:3, :3] = (self.direction * spacing_xyz[None, :])[:, ::-1]
        m[:3, 3] = self.origin
        return m

    def voxel_to_world(self, zyx: Sequence[float] | np.ndarray, ras: bool = False) -> np.ndarray:
        """Voxel coordinates (z, y, x) -> physical (x, y, z) in LPS mm (RAS if ``ras``). Accepts (..., 3)."""
        p = np.asarray(zyx, dtype=np.float64)
        world = p @ self._index_to_world_matrix()[:3, :3].T + np.asarray(self.origin)
        return world @ LPS_TO_RAS.T if ras else world

    def world_to_voxel(self, xyz: Sequence[float] | np.ndarray, ras: bool = False) -> np.ndarray:
        """Physical (x, y, z) in LPS mm (RAS if ``ras``) -> continuous voxel coordinates (z, y, x)."""
        w = np.asarray(xyz, dtype=np.float64)
        if ras:
            w = w @ LPS_TO_RAS.T
        m = self._index_to_world_matrix()[:3, :3]
        return (w - np.asarray(self.origin)) @ np.linalg.inv(m).T

    def contains_voxel(self, zyx: Sequence[float]) -> bool:
        """Whether a continuous voxel coordinate lies inside the image (voxel centres -0.5..n-0.5)."""
        p = np.asarray(zyx, dtype=np.float64)
        return bool(np.all(p >= -0.5) and np.all(p < np.asarray(self.shape) - 0.5))

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        return (
            self.shape == other.shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0
