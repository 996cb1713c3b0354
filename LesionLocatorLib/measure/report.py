"""Longitudinal lesion report: volumes, RECIST diameters and response per timepoint.

The same data serves the Slicer module (as a table, :meth:`LongitudinalReport.rows`), the
server (as JSON, :meth:`LongitudinalReport.to_dict`) and the command line (CSV / JSON files,
``lesionlocator report BASELINE_LABELS FOLLOWUP_LABELS... -o report.json``).

Entry points: :func:`build_report` (masks per timepoint), :func:`build_report_from_results`
(the tracker's ``SegmentationResult`` list), :func:`build_report_from_label_maps`.

Measurement conventions
-----------------------
* Volume: number of mask voxels x voxel volume, in ml.
* Centre: centre of mass of the mask voxels, world LPS (x, y, z) mm.
* Axial slices: the slices of constant index along the array axis whose direction is closest
  to the patient's superior (S) axis. For the usual axis-aligned CT that is the array z axis;
  for an image stored sagittally it is another array axis, so the "axial" diameter is still
  measured in an axial plane. For oblique directions (gantry tilt, rotated acquisitions) we
  measure in the acquisition slice closest to axial, i.e. in the plane the reader scrolls
  through, not in a resampled true-axial plane; the tilt is not corrected.
* Diameters are measured in physical space on each axial slice. Because the direction matrix
  is orthonormal, in-slice distances are exactly ``sqrt((di * s_i)^2 + (dj * s_j)^2)`` for the
  two in-plane array axes, whatever the rotation; the direction only picks the slicing axis and
  maps end points to world coordinates.
* Voxel extents, not centres: a voxel covers its index +/- 0.5 along each axis, so the points
  measured are the corners of the mask's voxels on that slice (a rectangle of voxels measures
  the diagonal of its physical extent, a single voxel its own diagonal). This is where a caliper
  on the visible edge of the lesion lands; on a rasterised disc of radius R the long axis lies
  within one in-plane voxel diagonal of 2R (corners reach at most half a diagonal beyond R).
* Long axis: the largest distance between two corner points of the slice = the diameter of their
  convex hull (brute force over the hull vertices). The reported long axis is the largest over
  all axial slices (first slice on ties).
* Short axis: on the same slice, the longest chord of that convex hull perpendicular to the long
  axis (exact: the chord length is concave along the long axis, so its maximum is at a hull
  vertex). For a convex lesion this is the RECIST short axis; for a concave one it measures the
  hull, as calipers placed across the lesion would.

RECIST 1.1 (per timepoint, on the sum of long diameters, SLD, of the target lesions = lesions
with a non-empty baseline mask); see :func:`recist_category`. Lymph-node short-axis rules and
non-target lesions are out of scope: the report cannot tell a node from another lesion.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np
from scipy.spatial import ConvexHull

from ..core.files import atomic_write_text
from ..core.geometry import Volume
from .metrics import MetricError, lesion_crops
from ..core.results import LesionMask, LesionStatus, SegmentationResult, bbox_slices, tight_bbox

Point3 = tuple[float, float, float]

STATUS_BASELINE = "baseline"
STATUS_TRACKED = "tracked"
STATUS_NOT_FOUND = LesionStatus.NOT_FOUND.value
STATUS_NEW = "new"  # found at a follow-up although empty at baseline: not a target lesion


class ReportError(ValueError):
    """Inputs of the report are inconsistent (mask shape, names, statuses)."""


# ------------------------------------------------------------------------- slice geometry
def axial_axis(direction: np.ndarray) -> int:
    """Array axis (0 = z, 1 = y, 2 = x) whose physical direction is closest to superior (LPS z)."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    # ITK column c is the direction of index axis c (x, y, z) = array axis 2 - c.
    s_component = [abs(d[2, 2 - a]) for a in range(3)]
    return int(np.argmax(s_component))  # argmax keeps the first (array z) on ties


def _corner_points(mask2d: np.ndarray) -> np.ndarray:
    """Continuous (row, col) index coordinates of the boundary corners of the mask's voxels."""
    m = np.pad(mask2d.astype(bool), 1)
    # corner (i, j) touches the padded voxels (i..i+1, j..j+1) = slice voxels (i-1..i, j-1..j),
    # so it sits at continuous index (i - 0.5, j - 0.5) of the slice
    a, b, c, d = m[:-1, :-1], m[:-1, 1:], m[1:, :-1], m[1:, 1:]
    used = a | b | c | d
    interior = a & b & c & d  # corners inside the mask cannot be on the convex hull
    i, j = np.nonzero(used & ~interior)
    return np.stack([i - 0.5, j - 0.5], axis=1).astype(np.float64)


@dataclass
class SliceDiameters:
    long_mm: float
    short_mm: float
    long_ends: np.ndarray  # (2, 2) continuous (row, col) indices
    short_ends: np.ndarray  # (2, 2)


def _long_axis(mask2d: np.ndarray, spacing_rc: Sequence[float]
               ) -> tuple[float, np.ndarray, np.ndarray, int, int] | None:
    """(long axis mm, hull in mm, hull in index coordinates, end vertex i, end vertex j) or None."""
    pts_idx = _corner_points(mask2d)
    if len(pts_idx) == 0:
        return None
    pts = pts_idx * np.asarray(spacing_rc, dtype=np.float64)
    # A non-empty voxel set always has non-collinear corners, so the hull exists.
    vertices = ConvexHull(pts).vertices  # counter-clockwise polygon
    hull, hull_idx = pts[vertices], pts_idx[vertices]
    diff = hull[:, None, :] - hull[None, :, :]
    dist2 = np.einsum("ijk,ijk->ij", diff, diff)
    i, j = np.unravel_index(int(np.argmax(dist2)), dist2.shape)
    return float(math.sqrt(dist2[i, j])), hull, hull_idx, int(i), int(j)


def slice_diameters(mask2d: np.ndarray, spacing_rc: Sequence[float]) -> SliceDiameters | None:
    """Long and short axis (mm) of one slice's mask, or None when the slice is empty.

    ``spacing_rc`` is the physical spacing of the slice's (row, col) array axes.
    """
    got = _long_axis(mask2d, spacing_rc)
    if got is None:
        return None
    long_mm, hull, hull_idx, i, j = got
    scale = np.asarray(spacing_rc, dtype=np.float64)
    u = (hull[j] - hull[i]) / long_mm
    n = np.array([-u[1], u[0]])
    along = hull @ u
    best = (-1.0, hull[i], hull[i])
    nxt = np.roll(np.arange(len(hull)), -1)
    for t in along:
        # intersections of the line {p : u.p = t} with the polygon's edges
        da = along - t
        db = da[nxt]
        cuts = [hull[da == 0]]
        cross = da * db < 0
        if np.any(cross):
            w = (da[cross] / (da[cross] - db[cross]))[:, None]
            cuts.append(hull[cross] + w * (hull[nxt][cross] - hull[cross]))
        cut = np.concatenate(cuts)
        if len(cut) < 2:
            continue
        proj = cut @ n
        lo, hi = int(np.argmin(proj)), int(np.argmax(proj))
        if proj[hi] - proj[lo] > best[0] + 1e-12:
            best = (float(proj[hi] - proj[lo]), cut[lo], cut[hi])
    short_mm = max(best[0], 0.0)
    return SliceDiameters(long_mm, short_mm, np.stack([hull_idx[i], hull_idx[j]]),
                          np.stack([best[1], best[2]]) / scale)


# --------------------------------------------------------------------------- measurements
@dataclass
class LesionMeasurement:
    """One lesion at one timepoint. Percent changes are None where the reference is 0 or absent."""

    lesion_id: int
    timepoint: str
    timepoint_index: int
    status: str  # "baseline", "tracked", "not found" or "new"
    volume_ml: float = 0.0
    long_axis_mm: float = 0.0
    short_axis_mm: float = 0.0
    center_lps: Point3 | None = None
    slice_index: int | None = None  # index along the axial array axis of the measured slice
    axial_axis: int | None = None  # 0 = array z, 1 = y, 2 = x
    long_axis_lps: tuple[Point3, Point3] | None = None
    short_axis_lps: tuple[Point3, Point3] | None = None
    volume_change_vs_baseline_pct: float | None = None
    volume_change_vs_nadir_pct: float | None = None
    long_axis_change_vs_baseline_pct: float | None = None
    long_axis_change_vs_nadir_pct: float | None = None

    @property
    def found(self) -> bool:
        return self.status != STATUS_NOT_FOUND

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LesionMeasurement":
        kw = {f.name: d.get(f.name, f.default) for f in fields(cls)}
        if kw["center_lps"] is not None:
            kw["center_lps"] = tuple(float(v) for v in kw["center_lps"])
        for key in ("long_axis_lps", "short_axis_lps"):
            if kw[key] is not None:
                kw[key] = tuple(tuple(float(v) for v in p) for p in kw[key])
        return cls(**kw)


@dataclass
class TimepointSummary:
    """Sum of long diameters (SLD) of the target lesions and the RECIST 1.1 response."""

    timepoint: str
    timepoint_index: int
    sld_mm: float
    total_volume_ml: float
    n_target: int
    n_target_found: int
    nadir_sld_mm: float | None = None  # smallest SLD of the earlier timepoints
    sld_change_vs_baseline_pct: float | None = None
    sld_change_vs_nadir_pct: float | None = None
    category: str | None = None  # "CR", "PR", "SD", "PD"; None at baseline or without targets
    new_lesion_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TimepointSummary":
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        kw["new_lesion_ids"] = [int(v) for v in kw.get("new_lesion_ids", [])]
        return cls(**kw)


def _pct(value: float, ref: float | None) -> float | None:
    if ref is None or ref <= 0:
        return None
    return 100.0 * (value - ref) / ref


ROW_COLUMNS = (
    "timepoint", "timepoint_index", "lesion_id", "status", "volume_ml", "long_axis_mm", "short_axis_mm",
    "center_x_lps", "center_y_lps", "center_z_lps", "slice_index",
    "volume_change_vs_baseline_pct", "volume_change_vs_nadir_pct",
    "long_axis_change_vs_baseline_pct", "long_axis_change_vs_nadir_pct",
    "timepoint_sld_mm", "timepoint_category",
)


@dataclass
class LongitudinalReport:
    """Every lesion at every timepoint (never dropped) plus one summary per timepoint."""

    timepoints: list[str]
    lesions: list[LesionMeasurement]  # sorted by (lesion_id, timepoint_index)
    summaries: list[TimepointSummary]

    @property
    def lesion_ids(self) -> list[int]:
        return sorted({m.lesion_id for m in self.lesions})

    def measurement(self, lesion_id: int, timepoint: str | int) -> LesionMeasurement:
        idx = timepoint if isinstance(timepoint, int) else self.timepoints.index(timepoint)
        for m in self.lesions:
            if m.lesion_id == lesion_id and m.timepoint_index == idx:
                return m
        raise KeyError(f"no measurement of lesion {lesion_id} at timepoint {timepoint!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"timepoints": list(self.timepoints), "lesions": [m.to_dict() for m in self.lesions],
                "summaries": [s.to_dict() for s in self.summaries]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LongitudinalReport":
        try:
            return cls([str(t) for t in d["timepoints"]], [LesionMeasurement.from_dict(m) for m in d["lesions"]],
                       [TimepointSummary.from_dict(s) for s in d["summaries"]])
        except (KeyError, TypeError) as exc:
            raise ReportError(f"not a longitudinal report: {exc}") from exc

    def to_json(self, path: str | os.PathLike) -> Path:
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "LongitudinalReport":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def rows(self) -> list[dict[str, Any]]:
        """One flat dict per lesion and timepoint (columns :data:`ROW_COLUMNS`), for a table."""
        summary = {s.timepoint_index: s for s in self.summaries}
        out = []
        for m in sorted(self.lesions, key=lambda m: (m.timepoint_index, m.lesion_id)):
            c = m.center_lps or (None, None, None)
            s = summary.get(m.timepoint_index)
            out.append({
                "timepoint": m.timepoint, "timepoint_index": m.timepoint_index, "lesion_id": m.lesion_id,
                "status": m.status, "volume_ml": m.volume_ml, "long_axis_mm": m.long_axis_mm,
                "short_axis_mm": m.short_axis_mm, "center_x_lps": c[0], "center_y_lps": c[1], "center_z_lps": c[2],
                "slice_index": m.slice_index,
                "volume_change_vs_baseline_pct": m.volume_change_vs_baseline_pct,
                "volume_change_vs_nadir_pct": m.volume_change_vs_nadir_pct,
                "long_axis_change_vs_baseline_pct": m.long_axis_change_vs_baseline_pct,
                "long_axis_change_vs_nadir_pct": m.long_axis_change_vs_nadir_pct,
                "timepoint_sld_mm": s.sld_mm if s else None, "timepoint_category": s.category if s else None,
            })
        return out

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`rows` as CSV (None -> empty cell; floats with full precision)."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(ROW_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in self.rows():
            writer.writerow({k: "" if v is None else repr(v) if isinstance(v, float) else v for k, v in row.items()})
        return atomic_write_text(path, buf.getvalue())


# ------------------------------------------------------------------------------- RECIST
def recist_category(sld_mm: float, baseline_sld_mm: float, nadir_sld_mm: float, all_targets_gone: bool,
                    new_lesions: bool = False) -> str:
    """RECIST 1.1 response of one follow-up from target-lesion SLDs.

    * PD: a new lesion, or SLD >= 1.2 x nadir SLD with an absolute increase >= 5 mm (nadir = the
      smallest SLD of the earlier timepoints, baseline included). Checked first: progression
      vs nadir wins over a decrease vs baseline.
    * CR: every target lesion gone.
    * PR: SLD <= 0.7 x baseline SLD (a decrease of at least 30 %).
    * SD: otherwise.
    """
    eps = 1e-9  # boundaries (exactly 20 %, 30 %, 5 mm) belong to PD / PR
    if new_lesions:
        return "PD"
    if sld_mm - nadir_sld_mm >= 0.2 * nadir_sld_mm - eps and sld_mm - nadir_sld_mm >= 5.0 - eps:
        return "PD"
    if all_targets_gone:
        return "CR"
    if baseline_sld_mm > 0 and sld_mm <= 0.7 * baseline_sld_mm + eps:
        return "PR"
    return "SD"


# ------------------------------------------------------------------------------ building
MaskLike = Union[np.ndarray, LesionMask]  # typing.Union: Slicer 5.8 runs Python 3.9, where `type | type` raises


def _crop(mask: MaskLike, shape: tuple[int, int, int], where: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(offset zyx, bool crop) of the non-zero part of a mask on a grid of ``shape``; None when empty."""
    if isinstance(mask, LesionMask):
        z0, z1, y0, y1, x0, x1 = mask.bbox
        if z0 < 0 or y0 < 0 or x0 < 0 or z1 > shape[0] or y1 > shape[1] or x1 > shape[2]:
            raise ReportError(f"{where}: bbox {mask.bbox} lies outside the image of shape {shape}")
        arr = np.asarray(mask.mask).astype(bool)
        if arr.shape != (z1 - z0, y1 - y0, x1 - x0):
            raise ReportError(f"{where}: mask shape {arr.shape} does not match its bbox {mask.bbox}")
        offset = np.array([z0, y0, x0])
    else:
        arr = np.asarray(mask)
        if arr.shape != tuple(shape):
            raise ReportError(f"{where}: mask shape {arr.shape} does not match the image shape {tuple(shape)}")
        arr = arr.astype(bool)
        offset = np.zeros(3, int)
    tb = tight_bbox(arr)
    if tb is None:
        return None
    return offset + np.array(tb[::2]), arr[bbox_slices(tb)]


def measure_lesion(geometry: Volume, mask: MaskLike) -> dict[str, Any] | None:
    """Volume, centre and RECIST long/short axes of one mask on ``geometry``'s grid (None if empty)."""
    got = _crop(mask, geometry.shape, "mask")
    if got is None:
        return None
    offset, crop = got
    idx = np.argwhere(crop).astype(np.float64)
    center = geometry.voxel_to_world(idx.mean(axis=0) + offset)
    ax = axial_axis(geometry.direction)
    in_plane = [a for a in range(3) if a != ax]
    spacing_rc = [geometry.spacing[a] for a in in_plane]
    stack = np.moveaxis(crop, ax, 0)
    longest, k = -1.0, 0
    for z in range(stack.shape[0]):  # the short axis is only needed on the chosen slice
        got = _long_axis(stack[z], spacing_rc)
        if got is not None and got[0] > longest + 1e-9:
            longest, k = got[0], z
    d = slice_diameters(stack[k], spacing_rc)
    assert d is not None  # slice k is non-empty

    def to_world(ends_rc: np.ndarray) -> tuple[Point3, Point3]:
        pts = np.zeros((2, 3))
        pts[:, ax] = k
        pts[:, in_plane[0]] = ends_rc[:, 0]
        pts[:, in_plane[1]] = ends_rc[:, 1]
        w = geometry.voxel_to_world(pts + offset)
        return tuple(float(v) for v in w[0]), tuple(float(v) for v in w[1])  # type: ignore[return-value]

    return {
        "volume_ml": float(len(idx)) * geometry.voxel_volume_ml(),
        "center_lps": tuple(float(v) for v in center),
        "long_axis_mm": d.long_mm, "short_axis_mm": d.short_mm,
        "slice_index": int(k + offset[ax]), "axial_axis": ax,
        "long_axis_lps": to_world(d.long_ends), "short_axis_lps": to_world(d.short_ends),
    }


def build_report(timepoints: Sequence[tuple[str, Volume, Mapping[int, MaskLike]]],
                 statuses: Sequence[Mapping[int, str] | None] | None = None) -> LongitudinalReport:
    """Measure every lesion at every timepoint; the first timepoint is the baseline.

    ``timepoints``: (name, geometry, {lesion_id: mask}) per timepoint; the geometry is a
    :class:`Volume` of that scan (only its grid is used), a mask is a full-grid array or a
    :class:`LesionMask` crop. Lesion ids are the same lesion across timepoints. ``statuses``
    (optional, per timepoint) may mark a lesion "not found" (the tracker's verdict): it is then
    reported as not found even if its mask has voxels. A lesion missing from a timepoint's dict,
    with an empty mask or marked "not found" gets volume 0, diameters 0, status "not found".
    Target lesions (counted in the SLD) are those found at baseline; a lesion found only later
    has status "new" and makes that timepoint PD (RECIST 1.1).
    """
    if not timepoints:
        raise ReportError("build_report needs at least one timepoint")
    names = [str(t[0]) for t in timepoints]
    if len(set(names)) != len(names):
        raise ReportError(f"timepoint names must be unique, got {names}")
    if statuses is not None and len(statuses) != len(timepoints):
        raise ReportError(f"got {len(statuses)} status dicts for {len(timepoints)} timepoints")
    ids = sorted({int(k) for _, _, masks in timepoints for k in masks})

    measured: dict[int, list[dict[str, Any] | None]] = {lid: [] for lid in ids}
    for t, (name, geometry, masks) in enumerate(timepoints):
        if not isinstance(geometry, Volume):
            raise ReportError(f"timepoint {name!r}: geometry must be a Volume, got {type(geometry).__name__}")
        st = (statuses[t] if statuses is not None else None) or {}
        unknown = set(st.values()) - {*(s.value for s in LesionStatus), STATUS_TRACKED, STATUS_BASELINE}
        if unknown:
            raise ReportError(f"timepoint {name!r}: unknown lesion status {sorted(unknown)}")
        for lid in ids:
            mask = masks.get(lid)
            if isinstance(mask, LesionMask) and mask.status == STATUS_NOT_FOUND:
                mask = None
            if mask is None or st.get(lid) == STATUS_NOT_FOUND:
                measured[lid].append(None)
                continue
            try:
                measured[lid].append(measure_lesion(geometry, mask))
            except ReportError as exc:
                raise ReportError(f"timepoint {name!r}, lesion {lid}: {exc}") from exc

    targets = [lid for lid in ids if measured[lid][0] is not None]
    lesions: list[LesionMeasurement] = []
    for lid in ids:
        vols: list[float] = []
        longs: list[float] = []
        for t, name in enumerate(names):
            m = measured[lid][t]
            if m is None:
                status = STATUS_NOT_FOUND
                rec = LesionMeasurement(lid, name, t, status)
            else:
                status = STATUS_BASELINE if t == 0 else (STATUS_TRACKED if lid in targets else STATUS_NEW)
                rec = LesionMeasurement(lid, name, t, status, **m)
            if t > 0:
                base_v = vols[0] if lid in targets else None
                base_l = longs[0] if lid in targets else None
                rec.volume_change_vs_baseline_pct = _pct(rec.volume_ml, base_v)
                rec.long_axis_change_vs_baseline_pct = _pct(rec.long_axis_mm, base_l)
                rec.volume_change_vs_nadir_pct = _pct(rec.volume_ml, min(vols))
                rec.long_axis_change_vs_nadir_pct = _pct(rec.long_axis_mm, min(longs))
            vols.append(rec.volume_ml)
            longs.append(rec.long_axis_mm)
            lesions.append(rec)

    summaries: list[TimepointSummary] = []
    for t, name in enumerate(names):
        at_t = [m for m in lesions if m.timepoint_index == t]
        tgt = [m for m in at_t if m.lesion_id in targets]
        sld = float(sum(m.long_axis_mm for m in tgt))
        s = TimepointSummary(name, t, sld, float(sum(m.volume_ml for m in at_t)), len(tgt),
                             sum(m.found for m in tgt),
                             new_lesion_ids=[m.lesion_id for m in at_t if m.status == STATUS_NEW])
        if t > 0:
            base = summaries[0].sld_mm
            nadir = min(x.sld_mm for x in summaries)
            s.nadir_sld_mm = nadir
            s.sld_change_vs_baseline_pct = _pct(sld, base)
            s.sld_change_vs_nadir_pct = _pct(sld, nadir)
            if targets:
                s.category = recist_category(sld, base, nadir, s.n_target_found == 0, bool(s.new_lesion_ids))
            elif s.new_lesion_ids:
                s.category = "PD"
        summaries.append(s)
    return LongitudinalReport(names, lesions, summaries)


def build_report_from_results(names: Sequence[str], results: Sequence[SegmentationResult]) -> LongitudinalReport:
    """Report from the tracker's per-timepoint results (``LesionMask.status`` "found"/"not found")."""
    if len(names) != len(results):
        raise ReportError(f"got {len(names)} names for {len(results)} results")
    return build_report([(n, r.image, r.lesions) for n, r in zip(names, results)],
                        [{k: les.status for k, les in r.lesions.items()} for r in results])


def build_report_from_label_maps(timepoints: Sequence[tuple[str, Volume]]) -> LongitudinalReport:
    """Report from one instance label map per timepoint (label k = lesion k at every timepoint)."""
    items = []
    for name, labels in timepoints:
        if not isinstance(labels, Volume):
            raise ReportError(f"timepoint {name!r}: expected a label-map Volume, got {type(labels).__name__}")
        try:
            _, crops = lesion_crops(labels.array, f"label map of {name!r}")
        except MetricError as exc:
            raise ReportError(str(exc)) from exc
        masks = {lid: LesionMask(lid, (b[0].start, b[0].stop, b[1].start, b[1].stop, b[2].start, b[2].stop), m)
                 for lid, (b, m) in crops.items()}
        items.append((name, labels, masks))
    return build_report(items)


# ------------------------------------------------------------------------------------ CLI
