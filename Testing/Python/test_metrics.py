"""Metrics on hand-made cases whose values are worked out in the comments."""
from __future__ import annotations

import math

import numpy as np
import pytest

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.measure.metrics import (MetricError, aggregate, center_mm, dice, normalized_surface_dice,
                                      surface_voxels, tracking_metrics)


def box(shape, z, y, x):
    m = np.zeros(shape, bool)
    m[z[0]:z[1], y[0]:y[1], x[0]:x[1]] = True
    return m


# ------------------------------------------------------------------------------------ Dice
def test_dice_two_cubes_half_overlap():
    # 4^3 cubes shifted by 2 in x: overlap 4*4*2 = 32 -> 2*32 / (64 + 64) = 0.5
    g = box((8, 8, 10), (0, 4), (0, 4), (0, 4))
    p = box((8, 8, 10), (0, 4), (0, 4), (2, 6))
    assert dice(p, g) == pytest.approx(0.5)
    assert dice(g, g) == 1.0


def test_dice_empty_cases():
    e = np.zeros((3, 3, 3), bool)
    f = box((3, 3, 3), (0, 1), (0, 1), (0, 1))
    assert dice(e, e) == 1.0
    assert dice(f, e) == 0.0 and dice(e, f) == 0.0


def test_dice_rejects_mismatched_shapes():
    with pytest.raises(MetricError, match="shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    with pytest.raises(MetricError, match="3D"):
        dice(np.zeros((2, 2)), np.zeros((2, 2)))


# ------------------------------------------------------------------------------------- NSD
def test_surface_voxels_of_box():
    # a 4 x 5 x 5 box: 6-connected interior is 2 x 3 x 3 = 18 voxels -> 100 - 18 = 82 surface voxels
    m = box((6, 7, 7), (1, 5), (1, 6), (1, 6))
    assert int(surface_voxels(m).sum()) == 82
    # a box touching the array border still has its border layer as surface
    assert int(surface_voxels(np.ones((4, 5, 5), bool)).sum()) == 82


def test_nsd_shifted_box_anisotropic():
    # Box of 4 (z) x 5 (y) x 5 (x) voxels, spacing (3, 1, 1) mm; pred = gt shifted one slice (3 mm) up in z.
    # Each box has 82 surface voxels (25 bottom layer + 16 + 16 ring voxels + 25 top layer).
    # pred surface: its top layer lies 3 mm above every gt surface voxel -> 25 misses at tau = 2 mm;
    #   its bottom layer sits in gt's layer 1, whose ring is gt surface: in-plane distance to the ring
    #   is 0 (ring), 1 mm (8 voxels) or 2 mm (centre) -> all within 2 mm; its ring voxels coincide
    #   with gt surface voxels (distance 0). -> 82 - 25 = 57 hits. By symmetry gt: 57 hits.
    #   NSD(2 mm) = 114 / 164.
    # tau = 1.5 mm: additionally the centre voxel of the bottom layer (2 mm) misses on each side
    #   -> (56 + 56) / 164.  tau = 3 mm: every distance <= 3 mm -> 1.0.
    g = box((8, 7, 7), (1, 5), (1, 6), (1, 6))
    p = box((8, 7, 7), (2, 6), (1, 6), (1, 6))
    sp = (3.0, 1.0, 1.0)
    assert normalized_surface_dice(p, g, sp, 2.0) == pytest.approx(114 / 164)
    assert normalized_surface_dice(g, p, sp, 2.0) == pytest.approx(114 / 164)
    assert normalized_surface_dice(p, g, sp, 1.5) == pytest.approx(112 / 164)
    assert normalized_surface_dice(p, g, sp, 3.0) == pytest.approx(1.0)
    # The same one-voxel shift is harmless where the slices are 1 mm apart: every distance <= 1 mm.
    assert normalized_surface_dice(p, g, (1.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)


def test_nsd_far_apart_and_empty():
    g = box((10, 10, 30), (2, 6), (2, 6), (0, 4))
    p = box((10, 10, 30), (2, 6), (2, 6), (20, 24))  # 16 mm apart (x spacing 1) > 2 mm
    assert normalized_surface_dice(p, g, (1, 1, 1)) == 0.0
    e = np.zeros_like(g)
    assert normalized_surface_dice(e, e, (1, 1, 1)) == 1.0
    assert normalized_surface_dice(g, e, (1, 1, 1)) == 0.0
    with pytest.raises(MetricError, match="spacing"):
        normalized_surface_dice(g, g, (1, 0, 1))
    with pytest.raises(MetricError, match="tolerance"):
        normalized_surface_dice(g, g, (1, 1, 1), -1.0)


def test_nsd_ignores_far_away_array_size():
    # Cropping to the union must not change the answer: the same pair embedded in a larger array.
    g = box((8, 7, 7), (1, 5), (1, 6), (1, 6))
    p = box((8, 7, 7), (2, 6), (1, 6), (1, 6))
    big_g = np.zeros((20, 30, 30), bool)
    big_p = np.zeros((20, 30, 30), bool)
    big_g[5:13, 10:17, 3:10] = g
    big_p[5:13, 10:17, 3:10] = p
    assert normalized_surface_dice(big_p, big_g, (3, 1, 1)) == pytest.approx(114 / 164)


# -------------------------------------------------------------------------------- tracking
def _tracking_case():
    shape = (48, 40, 60)
    gt = np.zeros(shape, np.uint16)
    pred = np.zeros(shape, np.uint16)
    gt[box(shape, (5, 25), (2, 6), (2, 6))] = 1
    pred[box(shape, (15, 35), (2, 6), (2, 6))] = 1  # 10 slices x 2 mm = 20 mm shift, half overlap
    gt[box(shape, (5, 9), (20, 24), (10, 14))] = 2
    pred[box(shape, (5, 9), (20, 24), (40, 44))] = 2  # 30 voxels x 1 mm = 30 mm shift, no overlap
    gt[box(shape, (30, 34), (30, 34), (20, 24))] = 3  # no prediction at all
    return pred, gt


def test_tracking_metrics_20mm_hit_30mm_miss_missing():
    pred, gt = _tracking_case()
    res = tracking_metrics(pred, gt, (2.0, 1.0, 1.0))
    by_id = {les.lesion_id: les for les in res.lesions}
    assert by_id[1].distance_mm == pytest.approx(20.0) and by_id[1].hit
    # lesion 1: 20 x 4 x 4 = 320 voxels each, overlap 10 slices = 160 -> Dice 0.5
    assert by_id[1].dice == pytest.approx(0.5)
    assert by_id[2].distance_mm == pytest.approx(30.0) and not by_id[2].hit and by_id[2].dice == 0.0
    assert math.isnan(by_id[3].distance_mm) and not by_id[3].hit and by_id[3].pred_center_mm is None
    assert res.cpm == pytest.approx(1 / 3)
    assert res.dice_matched == pytest.approx(0.5)
    assert res.med == pytest.approx(20.0)
    # total Dice: gt 320 + 64 + 64 = 448 voxels, pred 320 + 64 = 384, overlap 160 -> 320 / 832
    assert res.total_dice == pytest.approx(320 / 832)
    # a looser threshold turns lesion 2 into a hit
    res35 = tracking_metrics(pred, gt, (2.0, 1.0, 1.0), match_mm=35.0)
    assert res35.cpm == pytest.approx(2 / 3) and res35.med == pytest.approx(25.0)
    assert res35.dice_matched == pytest.approx(0.25)


def test_tracking_metrics_world_centres_with_rotated_volume():
    pred, gt = _tracking_case()
    c, s = math.cos(0.4), math.sin(0.4)
    direction = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]])
    vol = Volume(np.zeros(gt.shape, np.int16), spacing=(2.0, 1.0, 1.0), origin=(10, -5, 3), direction=direction)
    res = tracking_metrics(pred, gt, vol.spacing, volume=vol)
    les1 = res.lesions[0]
    # gt lesion 1 centre: voxel (14.5, 3.5, 3.5) mapped to world LPS
    assert np.allclose(les1.gt_center_mm, vol.voxel_to_world((14.5, 3.5, 3.5)))
    assert les1.distance_mm == pytest.approx(20.0)  # rotation keeps distances
    assert res.cpm == pytest.approx(1 / 3)
    with pytest.raises(MetricError, match="spacing"):
        tracking_metrics(pred, gt, (1.0, 1.0, 1.0), volume=vol)


def test_tracking_accepts_dicts_and_checks_shapes():
    pred, gt = _tracking_case()
    res = tracking_metrics({1: pred == 1}, {1: gt == 1, 2: gt == 2}, (2, 1, 1))
    assert [les.lesion_id for les in res.lesions] == [1, 2] and res.cpm == 0.5
    with pytest.raises(MetricError, match="shape"):
        tracking_metrics({1: pred == 1}, {1: (gt == 1)[:-1]}, (2, 1, 1))
    with pytest.raises(MetricError, match="non-integer"):
        tracking_metrics(pred * 0.5, gt, (2, 1, 1))
    # overlapping lesions of a dict form a union: the same voxels predicted twice are one voxel
    a = gt == 1
    twice = tracking_metrics({1: a, 5: a}, {1: a}, (2, 1, 1))
    assert twice.total_dice == 1.0 and twice.lesions[0].dice == 1.0
    assert tracking_metrics({}, {}, (1, 1, 1)).total_dice == 1.0  # nothing to find, nothing found


def test_center_mm():
    m = box((4, 4, 4), (1, 3), (0, 1), (2, 3))  # centre voxel (1.5, 0, 2)
    assert np.allclose(center_mm(m, (2.0, 1.0, 0.5)), [3.0, 0.0, 1.0])
    assert center_mm(np.zeros((2, 2, 2)), (1, 1, 1)) is None


# ------------------------------------------------------------------------------- averaging
def test_aggregate_weights_patients_equally():
    recs = [
        # patient A, two scans: A1 mean 0.5, A2 mean 1.0 (weight 1/2 each)
        {"patient": "A", "scan": "A1", "cpm": 1.0, "med": 4.0},
        {"patient": "A", "scan": "A1", "cpm": 0.0, "med": math.nan},
        {"patient": "A", "scan": "A2", "cpm": 1.0, "med": 2.0},
        # patient B, one scan: mean 1/3 (weight 1); no finite MED -> B takes no part in MED
        {"patient": "B", "scan": "B1", "cpm": 0.0, "med": math.nan},
        {"patient": "B", "scan": "B1", "cpm": 0.0, "med": None},
        {"patient": "B", "scan": "B1", "cpm": 1.0, "med": math.nan},
    ]
    out = aggregate(recs, ["cpm", "med", "absent"])
    # cpm: (0.5 * 0.5 + 0.5 * 1.0 + 1 * 1/3) / 2
    assert out["cpm"] == pytest.approx((0.25 + 0.5 + 1 / 3) / 2)
    assert out["med"] == pytest.approx((0.5 * 4.0 + 0.5 * 2.0) / 1.0)
    assert math.isnan(out["absent"])
    # a plain lesion mean would differ (3/6 = 0.5): the weighting matters
    assert out["cpm"] != pytest.approx(0.5)


def test_aggregate_requires_keys():
    with pytest.raises(MetricError, match="patient"):
        aggregate([{"scan": "x", "cpm": 1}], ["cpm"])


def test_scan_tracking_rows_reproduce_scan_means():
    pred, gt = _tracking_case()
    res = tracking_metrics(pred, gt, (2.0, 1.0, 1.0))
    rows = [dict(r, patient="P", scan="S") for r in res.lesion_rows()]
    out = aggregate(rows, ["cpm", "dice_matched", "med", "total_dice"])
    assert out["cpm"] == pytest.approx(res.cpm)
    assert out["dice_matched"] == pytest.approx(res.dice_matched)
    assert out["med"] == pytest.approx(res.med)
    assert out["total_dice"] == pytest.approx(res.total_dice)
