"""Result containers shared by sessions, the tracker, the server and the Slicer module.

Masks are kept as crops (bounding box + boolean block) so that a click on a whole-body
scan costs memory in proportion to the lesion, not the scan; ``full()`` expands on demand.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Iterable, Optional, Sequence

import numpy as np

from .boxes import EMPTY_BOX, VoxelBox, bbox_slices, tight_bbox
from .geometry import Volume


class LesionStatus(str, Enum):
    """What became of a lesion at one timepoint. A ``str`` enum: JSON, CSV and wire carry the plain text."""

    FOUND = "found"
    NOT_FOUND = "not found"

    def __str__(self) -> str:
        return self.value


@dataclass
class LesionMask:
    """One lesion's mask on an image grid, stored as a crop."""

    lesion_id: int
    bbox: VoxelBox
    mask: np.ndarray  # bool, shape of the bbox
    probability: np.ndarray | None = None  # float32 foreground probability on the same crop
    status: LesionStatus = LesionStatus.FOUND
    center_voxel: Optional[tuple[float, float, float]] = None  # where the prompt pointed (z, y, x)

    def __post_init__(self) -> None:
        self.bbox = VoxelBox(*(int(v) for v in self.bbox))
        self.status = LesionStatus(self.status)

    @classmethod
    def not_found(cls, lesion_id: int, center_voxel: Optional[Sequence[float]] = None) -> "LesionMask":
        """The one way to say "this lesion is not there" (empty crop, ids never change)."""
        center = None if center_voxel is None else tuple(float(v) for v in center_voxel)
        return cls(int(lesion_id), EMPTY_BOX, np.zeros((0, 0, 0), bool), None, LesionStatus.NOT_FOUND,
                   center)  # type: ignore[arg-type]

    @property
    def found(self) -> bool:
        return self.status is LesionStatus.FOUND and not self.empty

    @property
    def voxels(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def empty(self) -> bool:
        return self.voxels == 0

    def full(self, shape: Iterable[int]) -> np.ndarray:
        out = np.zeros(tuple(shape), dtype=np.uint8)
        out[bbox_slices(self.bbox)] = self.mask
        return out

    def full_probability(self, shape: Iterable[int]) -> np.ndarray:
        out = np.zeros(tuple(shape), dtype=np.float32)
        if self.probability is not None:
            out[bbox_slices(self.bbox)] = self.probability
        return out

    def shrink(self) -> "LesionMask":
        """Crop to the tight bounding box of the mask (an empty mask becomes :meth:`not_found`)."""
        tb = tight_bbox(self.mask)
        if tb is None:
            return LesionMask.not_found(self.lesion_id, self.center_voxel)
        sl = bbox_slices(tb)
        z0, _, y0, _, x0, _ = self.bbox
        bbox = (tb[0] + z0, tb[1] + z0, tb[2] + y0, tb[3] + y0, tb[4] + x0, tb[5] + x0)
        prob = None if self.probability is None else self.probability[sl]
        return LesionMask(self.lesion_id, bbox, self.mask[sl].copy(), prob, self.status, self.center_voxel)


@dataclass
class SegmentationResult:
    """Masks of several lesions on one image (the grid of ``image``)."""

    image: Volume
    lesions: dict[int, LesionMask] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image.shape

    def mask(self, lesion_id: int) -> np.ndarray:
        return self.lesions[lesion_id].full(self.shape)

    def label_map(self) -> np.ndarray:
        """Merged instance map: lesion k -> label k; overlaps go to the most probable lesion.

        Label ids above 255 are kept (uint16/uint32 as needed), never wrapped.
        """
        max_id = max(self.lesions, default=0)
        dtype = np.uint8 if max_id <= 255 else (np.uint16 if max_id <= 65535 else np.uint32)
        labels = np.zeros(self.shape, dtype=dtype)
        best = np.zeros(self.shape, dtype=np.float32)
        for lid in sorted(self.lesions):
            les = self.lesions[lid]
            if les.empty:
                continue
            sl = bbox_slices(les.bbox)
            prob = les.probability if les.probability is not None else les.mask.astype(np.float32)
            take = les.mask & (prob > best[sl])
            labels[sl][take] = lid
            best[sl][take] = prob[take]
        return labels

    def label_volume(self) -> Volume:
        return self.image.with_array(self.label_map())


@dataclass
class TrackingResult:
    """What tracking returns, locally and through the server: the baseline's masks (segmented first from
    points / boxes, or the mask prompts themselves) and one result per follow-up, every lesion id in each."""

    baseline: SegmentationResult
    followups: list[SegmentationResult]

    @property
    def timepoints(self) -> list[SegmentationResult]:
        return [self.baseline, *self.followups]

    def report(self, names: Optional[Sequence[str]] = None):
        """The longitudinal report: volumes, RECIST diameters, changes against baseline and nadir, category."""
        from ..measure.report import build_report_from_results

        names = list(names) if names else ["baseline"] + [f"follow-up {k}" for k in range(1, len(self.followups) + 1)]
        return build_report_from_results(names, self.timepoints)
