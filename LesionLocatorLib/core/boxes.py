"""The one box value type: a half-open voxel box (z0, z1, y0, y1, x0, x1).

It is the spelling of the published prompt JSON, the wire format and ``LesionMask.bbox``. Grid code that
works axis by axis (resampling regions, sliding-window tiles, registration windows) uses the same box as
``spans`` ((z0, z1), (y0, y1), (x0, x1)); ``VoxelBox.from_spans`` converts back.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

Span = Tuple[int, int]
Spans = Tuple[Span, Span, Span]  # a VoxelBox axis by axis: what grid and tile code iterates over


class VoxelBox(NamedTuple):
    z0: int
    z1: int
    y0: int
    y1: int
    x0: int
    x1: int

    @classmethod
    def from_spans(cls, spans: Sequence[Sequence[int]]) -> "VoxelBox":
        (z0, z1), (y0, y1), (x0, x1) = spans
        return cls(int(z0), int(z1), int(y0), int(y1), int(x0), int(x1))

    @property
    def spans(self) -> Spans:
        return (self.z0, self.z1), (self.y0, self.y1), (self.x0, self.x1)

    @property
    def shape(self) -> Tuple[int, int, int]:
        return self.z1 - self.z0, self.y1 - self.y0, self.x1 - self.x0

    @property
    def slices(self) -> Tuple[slice, slice, slice]:
        return slice(self.z0, self.z1), slice(self.y0, self.y1), slice(self.x0, self.x1)

    def is_empty(self) -> bool:
        return min(self.shape) <= 0

    def union(self, other: "VoxelBox") -> "VoxelBox":
        return VoxelBox(min(self.z0, other.z0), max(self.z1, other.z1), min(self.y0, other.y0),
                        max(self.y1, other.y1), min(self.x0, other.x0), max(self.x1, other.x1))


EMPTY_BOX = VoxelBox(0, 0, 0, 0, 0, 0)


def bbox_slices(bbox: Sequence[int]) -> Tuple[slice, slice, slice]:
    return VoxelBox(*bbox).slices


def tight_bbox(mask: np.ndarray) -> Optional[VoxelBox]:
    """Half-open bounding box of the non-zero voxels, or None when empty."""
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        nz = np.flatnonzero(np.any(mask, axis=other))
        if nz.size == 0:
            return None
        out += [int(nz[0]), int(nz[-1]) + 1]
    return VoxelBox(*out)
