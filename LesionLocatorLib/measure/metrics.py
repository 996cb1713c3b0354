"""Evaluation metrics of the LesionLocator paper (section 9): segmentation and tracking.

Everything is measured in millimetres on the image grid given by ``spacing_zyx`` (array
order z, y, x), so anisotropic CT (e.g. 0.8 x 0.8 x 5 mm) is scored physically, not in voxels.

Segmentation
    :func:`dice`, :func:`normalized_surface_dice` (2 mm tolerance by default).
Tracking (prompt the previous timepoint, score the follow-up; lesions are matched by id
because the tracker keeps ids)
    :func:`tracking_metrics` -> per-lesion centre distance, hit within 25 mm, Dice, plus the
    scan's total Dice.
Averaging
    :func:`aggregate`: first over the lesions of a scan, then over scans with weight
    1 / (number of scans of that patient) so that every patient counts equally.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..core.geometry import Volume
from ..core.results import bbox_slices, tight_bbox

# 6-connectivity: a voxel is inside when its 6 face neighbours are foreground; so every voxel
# with a background face neighbour (or touching the image border) is a surface voxel.
_FACE_STRUCTURE = ndimage.generate_binary_structure(3, 1)
_EPS = 1e-6  # distances equal to the tolerance count as inside it, despite float round-off


class MetricError(ValueError):
    """Inputs of a metric are inconsistent (shape or spacing mismatch, wrong dimension)."""


def _as_bool(mask: np.ndarray, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise MetricError(f"{name} must be a 3D array, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _check_pair(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = _as_bool(pred, "pred"), _as_bool(gt, "gt")
    if p.shape != g.shape:
        raise MetricError(f"pred shape {p.shape} and gt shape {g.shape} differ")
    return p, g


def _check_spacing(spacing_zyx: Sequence[float]) -> tuple[float, float, float]:
    sp = tuple(float(s) for s in spacing_zyx)
    if len(sp) != 3 or not all(math.isfinite(s) and s > 0 for s in sp):
        raise MetricError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing_zyx}")
    return sp  # type: ignore[return-value]


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|P and G| / (|P| + |G|) of two binary masks (non-zero = foreground).

    Both empty -> 1.0 (nothing to find, nothing predicted: a perfect answer); exactly one
    empty -> 0.0.
    """
    p, g = _check_pair(pred, gt)
    n_p, n_g = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    if n_p + n_g == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(p & g)) / (n_p + n_g)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with at least one background face neighbour (outside the array = background)."""
    m = _as_bool(mask, "mask")
    return m & ~ndimage.binary_erosion(m, structure=_FACE_STRUCTURE, border_value=0)


def normalized_surface_dice(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float],
                            tolerance_mm: float = 2.0) -> float:
    """Normalised surface Dice (NSD) at ``tolerance_mm``, measured in mm.

    Surfaces are the voxel sets of :func:`surface_voxels` (6-connectivity). With S_P, S_G the
    surface voxels and d(x, S) the Euclidean distance in mm between voxel centres
    (``distance_transform_edt(sampling=spacing)``)::

        NSD = (#{p in S_P : d(p, S_G) <= tau} + #{g in S_G : d(g, S_P) <= tau}) / (|S_P| + |S_G|)

    Every surface voxel has weight one (a voxel-count approximation of the surface-area
    weighting of the DeepMind implementation). Empty cases: both masks empty -> 1.0; exactly
    one empty -> 0.0 (the other surface has no counterpart within any tolerance).
    """
    p, g = _check_pair(pred, gt)
    sp = _check_spacing(spacing_zyx)
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise MetricError(f"tolerance_mm must be a non-negative number, got {tolerance_mm}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 1.0
    if not (has_p and has_g):
        return 0.0
    # Work on the union's bounding box plus a one-voxel background margin: every surface voxel
    # (and hence every nearest surface point) lies inside it, and erosion sees the same
    # neighbourhood as on the full array (the array border also counts as background there).
    crop = bbox_slices(tight_bbox(p | g))  # type: ignore[arg-type]  # not None: both are non-empty
    p_c = np.pad(p[crop], 1)
    g_c = np.pad(g[crop], 1)
    s_p, s_g = surface_voxels(p_c), surface_voxels(g_c)
    dist_to_g = ndimage.distance_transform_edt(~s_g, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~s_p, sampling=sp)
    tau = tolerance_mm + _EPS
    hits = np.count_nonzero(dist_to_g[s_p] <= tau) + np.count_nonzero(dist_to_p[s_g] <= tau)
    return float(hits) / float(np.count_nonzero(s_p) + np.count_nonzero(s_g))


# --------------------------------------------------------------------------------- tracking
Box = tuple[slice, slice, slice]
Crops = dict[int, tuple[Box, np.ndarray]]  # lesion id -> (bounding box, bool mask inside it)


def lesion_crops(labels: np.ndarray | Mapping[int, np.ndarray], name: str = "labels"
                 ) -> tuple[tuple[int, ...] | None, Crops]:
    """(grid shape, {id: (bbox, bool crop)}) of the non-empty lesions of an instance label map
    (0 = background) or of ``{id: full-grid mask}``. Crops keep per-lesion work proportional to
    the lesion instead of the scan (a full CT is 70 M voxels). Shape is None for an empty dict."""
    if isinstance(labels, Mapping):
        out: Crops = {}
        shapes = set()
        for k, v in labels.items():
            m = _as_bool(v, f"{name}[{k}]")
            shapes.add(m.shape)
            box = ndimage.find_objects(m.view(np.uint8), max_label=1)[0]
            if box is not None:
                out[int(k)] = (box, m[box])
        if len(shapes) > 1:
            raise MetricError(f"the masks of {name} have different shapes: {sorted(shapes)}")
        return (shapes.pop() if shapes else None), out
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise MetricError(f"{name} must be a 3D instance label map, got shape {arr.shape}")
    if arr.dtype == bool:
        arr = arr.view(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(arr == np.round(arr)):
            raise MetricError(f"{name} holds non-integer labels; expected an instance label map")
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise MetricError(f"{name} has dtype {arr.dtype}; expected an integer instance label map")
    if arr.size and arr.min() < 0:
        raise MetricError(f"{name} holds negative labels")
    n = int(arr.max(initial=0))
    boxes = ndimage.find_objects(arr, max_label=n)
    return arr.shape, {i + 1: (b, arr[b] == i + 1) for i, b in enumerate(boxes) if b is not None}


def union_box(a: Box, b: Box) -> Box:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))  # type: ignore[return-value]


def in_box(item: tuple[Box, np.ndarray] | None, box: Box) -> np.ndarray:
    """A cropped mask pasted into the enclosing box ``box`` (all False when ``item`` is None)."""
    out = np.zeros(tuple(b.stop - b.start for b in box), bool)
    if item is not None:
        sub, m = item
        out[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sub, box))] = m
    return out


def _crop_center(item: tuple[Box, np.ndarray], sp: Sequence[float], volume: Volume | None) -> np.ndarray:
    box, m = item
    com = np.array(ndimage.center_of_mass(m), dtype=np.float64) + [b.start for b in box]
    return volume.voxel_to_world(com) if volume is not None else com * np.asarray(sp)


def center_mm(mask: np.ndarray, spacing_zyx: Sequence[float], volume: Volume | None = None) -> np.ndarray | None:
    """Centre of mass of a mask in mm, or None when empty.

    With ``volume`` the centre is in world LPS (x, y, z) mm; without, it is
    ``index_zyx * spacing`` in array order. Distances between two centres are the same either
    way because the direction matrix is orthonormal.
    """
    m = _as_bool(mask, "mask")
    if not m.any():
        return None
    com = np.array(ndimage.center_of_mass(m), dtype=np.float64)
    if volume is not None:
        return volume.voxel_to_world(com)
    return com * np.asarray(_check_spacing(spacing_zyx))


@dataclass
class LesionTracking:
    """Tracking result of one ground-truth lesion on one follow-up scan."""

    lesion_id: int
    gt_center_mm: tuple[float, float, float]
    pred_center_mm: tuple[float, float, float] | None  # None: the tracker returned nothing
    distance_mm: float  # NaN when there is no prediction
    hit: bool  # prediction centre within match_mm of the gt centre
    dice: float  # Dice of this lesion's prediction vs its gt (0 when missing)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScanTracking:
    """Tracking metrics of one follow-up scan (values of this scan, before any averaging)."""

    lesions: list[LesionTracking]
    total_dice: float
    match_mm: float

    @property
    def cpm(self) -> float:
        """CPM@match_mm: share of gt lesions hit (NaN without gt lesions)."""
        return float(np.mean([les.hit for les in self.lesions])) if self.lesions else math.nan

    @property
    def dice_matched(self) -> float:
        """Dice@match_mm: mean Dice over the hit lesions (NaN when none is hit)."""
        vals = [les.dice for les in self.lesions if les.hit]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def med(self) -> float:
        """MED: mean centre distance (mm) over the hit lesions (NaN when none is hit)."""
        vals = [les.distance_mm for les in self.lesions if les.hit]
        return float(np.mean(vals)) if vals else math.nan

    def lesion_rows(self) -> list[dict[str, Any]]:
        """Per-lesion values in the form :func:`aggregate` averages.

        ``cpm`` is 1/0 per lesion, ``dice_matched`` and ``med`` are NaN for missed lesions, so the
        scan means of these rows equal :attr:`cpm`, :attr:`dice_matched` and :attr:`med`.
        """
        return [
            {"lesion_id": les.lesion_id, "cpm": float(les.hit), "dice_matched": les.dice if les.hit else math.nan,
             "med": les.distance_mm if les.hit else math.nan, "distance_mm": les.distance_mm, "dice": les.dice,
             "total_dice": self.total_dice}
            for les in self.lesions
        ]


def tracking_metrics(pred: np.ndarray | Mapping[int, np.ndarray], gt: np.ndarray | Mapping[int, np.ndarray],
                     spacing_zyx: Sequence[float], volume: Volume | None = None,
                     match_mm: float = 25.0) -> ScanTracking:
    """Tracking metrics of one follow-up: CPM@25, Dice@25, MED and total Dice.

    ``pred`` and ``gt`` are instance label maps on the same grid (or ``{id: mask}``); lesion k
    of ``pred`` is the tracker's answer for gt lesion k. Only lesions present in ``gt`` are
    scored. Per gt lesion: centre = centre of mass in mm; distance = Euclidean distance of the
    two centres; hit = distance <= match_mm; a missing (empty) prediction is a miss with
    distance NaN and Dice 0.

    Total Dice is the Dice of the union of all lesions' voxels: ``dice(pred > 0, gt > 0)`` over
    every label in either map. Missed lesions (false negatives), predictions far from their lesion
    and predictions for ids without gt (false positives) all lower it, which is why it is
    reported next to Dice@25.
    """
    sp = _check_spacing(spacing_zyx)
    p_shape, p_les = lesion_crops(pred, "pred")
    g_shape, g_les = lesion_crops(gt, "gt")
    shapes = {sh for sh in (p_shape, g_shape, volume.shape if volume is not None else None) if sh is not None}
    if len(shapes) > 1:
        raise MetricError(f"pred, gt (and volume) have different shapes: {sorted(shapes)}")
    if volume is not None and not np.allclose(volume.spacing, sp, atol=1e-4):
        raise MetricError(f"volume spacing {volume.spacing} differs from spacing_zyx {sp}")
    rows: list[LesionTracking] = []
    for lid in sorted(g_les):
        gc = _crop_center(g_les[lid], sp, volume)
        if lid not in p_les:
            rows.append(LesionTracking(lid, tuple(gc.tolist()), None, math.nan, False, 0.0))
            continue
        pc = _crop_center(p_les[lid], sp, volume)
        dist = float(np.linalg.norm(pc - gc))
        box = union_box(p_les[lid][0], g_les[lid][0])
        rows.append(LesionTracking(lid, tuple(gc.tolist()), tuple(pc.tolist()), dist, dist <= match_mm + _EPS,
                                   dice(in_box(p_les[lid], box), in_box(g_les[lid], box))))
    # total Dice on the union box of everything (lesions of a dict may overlap: paint, don't count)
    items = list(p_les.values()) + list(g_les.values())
    if not items:
        return ScanTracking(rows, 1.0, float(match_mm))
    box = items[0][0]
    for b, _ in items[1:]:
        box = union_box(box, b)
    p_union = np.zeros(tuple(b.stop - b.start for b in box), bool)
    g_union = np.zeros_like(p_union)
    for les, union in ((p_les, p_union), (g_les, g_union)):
        for sub, m in les.values():
            union[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sub, box))] |= m
    return ScanTracking(rows, dice(p_union, g_union), float(match_mm))


# -------------------------------------------------------------------------------- averaging
def aggregate(records: Iterable[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, float]:
    """Patient-balanced mean of per-lesion (or per-scan) values.

    Each record is a mapping with ``patient``, ``scan`` and metric values (one record per
    lesion; a per-scan value may be given once or repeated on every lesion of the scan).
    For every metric:

    1. scan value = mean over that scan's records, ignoring NaN/None (a scan with no finite
       value, e.g. Dice@25 when no lesion was hit, does not take part);
    2. result = weighted mean of the scan values, weight 1 / n_p where n_p is the number of
       that patient's scans taking part, so each patient has total weight one.

    Returns NaN for a metric no scan has a value for. Scans are keyed by (patient, scan).
    """
    per_scan: dict[str, dict[tuple[str, str], list[float]]] = {m: defaultdict(list) for m in metrics}
    for i, rec in enumerate(records):
        if "patient" not in rec or "scan" not in rec:
            raise MetricError(f"record {i} lacks 'patient' or 'scan': {dict(rec)}")
        key = (str(rec["patient"]), str(rec["scan"]))
        for m in metrics:
            v = rec.get(m)
            if v is None:
                continue
            v = float(v)
            if math.isfinite(v):
                per_scan[m][key].append(v)
    out: dict[str, float] = {}
    for m in metrics:
        scans = {k: float(np.mean(v)) for k, v in per_scan[m].items()}
        if not scans:
            out[m] = math.nan
            continue
        n_scans: dict[str, int] = defaultdict(int)
        for patient, _ in scans:
            n_scans[patient] += 1
        weights = np.array([1.0 / n_scans[patient] for patient, _ in scans])
        values = np.array(list(scans.values()))
        out[m] = float(np.sum(weights * values) / np.sum(weights))
    return out
