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

from .geometry import Volume

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
    union = p | g
    lo = [int(np.flatnonzero(np.any(union, axis=tuple(a for a in range(3) if a != ax)))[0]) for ax in range(3)]
    hi = [int(np.flatnonzero(np.any(union, axis=tuple(a for a in range(3) if a != ax)))[-1]) + 1 for ax in range(3)]
    crop = tuple(slice(a, b) for a, b in zip(lo, hi))
    p_c = np.pad(p[crop], 1)
    g_c = np.pad(g[crop], 1)
    s_p, s_g = surface_voxels(p_c), surface_voxels(g_c)
    dist_to_g = ndimage.distance_transform_edt(~s_g, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~s_p, sampling=sp)
    hits = np.count_nonzero(dist_to_g[s_p] <= tolerance_mm + _EPS) + np.count_nonzero(dist_to_p[s_g] <= tolerance_mm + _EPS)
    return float(hits) / float(np.count_nonzero(s_p) + np.count_nonzero(s_g))


# --------------------------------------------------------------------------------- tracking
def _lesion_masks(labels: np.ndarray | Mapping[int, np.ndarray], name: str) -> dict[int, np.ndarray]:
    """Instance label map (0 = background) or {id: mask} -> {id: bool mask} of non-empty lesions."""
    if isinstance(labels, Mapping):
        out = {int(k): _as_bool(v, f"{name}[{k}]") for k, v in labels.items()}
        return {k: v for k, v in out.items() if v.any()}
    arr = np.asarray(labels)
    if arr.ndim != 3:
        raise MetricError(f"{name} must be a 3D instance label map, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.all(arr == np.round(arr)):
        raise MetricError(f"{name} holds non-integer labels; expected an instance label map")
    ids = [int(i) for i in np.unique(arr) if i != 0]
    if any(i < 0 for i in ids):
        raise MetricError(f"{name} holds negative labels {[i for i in ids if i < 0]}")
    return {i: arr == i for i in ids}


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
    p_les, g_les = _lesion_masks(pred, "pred"), _lesion_masks(gt, "gt")
    shapes = {m.shape for m in list(p_les.values()) + list(g_les.values())}
    if len(shapes) > 1:
        raise MetricError(f"pred and gt masks have different shapes: {sorted(shapes)}")
    if volume is not None and shapes and volume.shape not in shapes:
        raise MetricError(f"volume shape {volume.shape} does not match the masks {shapes.pop()}")
    if volume is not None and not np.allclose(volume.spacing, sp, atol=1e-4):
        raise MetricError(f"volume spacing {volume.spacing} differs from spacing_zyx {sp}")
    rows: list[LesionTracking] = []
    for lid in sorted(g_les):
        g = g_les[lid]
        gc = center_mm(g, sp, volume)
        p = p_les.get(lid)
        pc = center_mm(p, sp, volume) if p is not None else None
        if pc is None:
            rows.append(LesionTracking(lid, tuple(gc.tolist()), None, math.nan, False, 0.0))
            continue
        dist = float(np.linalg.norm(pc - gc))
        rows.append(LesionTracking(lid, tuple(gc.tolist()), tuple(pc.tolist()), dist, dist <= match_mm + _EPS,
                                   dice(p, g)))
    shape = shapes.pop() if shapes else (volume.shape if volume is not None else (1, 1, 1))
    p_union = np.zeros(shape, bool)
    g_union = np.zeros(shape, bool)
    for m in p_les.values():
        p_union |= m
    for m in g_les.values():
        g_union |= m
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
