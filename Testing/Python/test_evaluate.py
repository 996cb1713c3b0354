"""Folder evaluation on small label maps written to tmp_path (values worked out in the comments)."""
from __future__ import annotations

import argparse
import csv
import json
import math

import numpy as np
import pytest

from LesionLocatorLib.cli.evaluate import add_arguments, run
from LesionLocatorLib.measure.evaluate import EvaluationError, evaluate_folder, load_patients
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import write_image

SP = (3.0, 1.0, 1.0)
NSD_SHIFT = 114 / 164  # 4x5x5 box shifted one 3 mm slice, tau 2 mm (derived in test_metrics)


def write(path, arr, spacing=SP):
    write_image(Volume(arr, spacing=spacing, origin=(1.0, 2.0, 3.0)), path)


@pytest.fixture
def seg_folders(tmp_path):
    gt, pred = tmp_path / "gt", tmp_path / "pred"
    shape = (10, 12, 20)
    # case a: lesion 1 shifted by one slice (Dice 2*75/200 = 0.75, NSD 114/164), lesion 2 exact
    g = np.zeros(shape, np.uint8)
    p = np.zeros(shape, np.uint8)
    g[1:5, 1:6, 1:6] = 1
    p[2:6, 1:6, 1:6] = 1
    g[1:4, 1:4, 10:14] = 2
    p[1:4, 1:4, 10:14] = 2
    write(gt / "a.nii.gz", g)
    write(pred / "a.nii.gz", p)
    # case b: exact, plus a predicted id 7 without ground truth; prediction stored as NRRD
    g = np.zeros(shape, np.uint8)
    g[3:6, 4:8, 4:8] = 1
    p = g.copy()
    p[8, 8, 15] = 7
    write(gt / "b.nii.gz", g)
    write(pred / "b.nrrd", p)
    # case c: nothing predicted -> Dice 0, NSD 0
    g = np.zeros(shape, np.uint8)
    g[3:6, 4:8, 4:8] = 1
    write(gt / "c.nii.gz", g)
    write(pred / "c.nii.gz", np.zeros(shape, np.uint8))
    (pred / "notes.txt").write_text("not an image")
    write(pred / "orphan.nii.gz", np.zeros(shape, np.uint8))
    return pred, gt, tmp_path


def test_seg_mode_values_and_patient_weighting(seg_folders):
    pred, gt, tmp = seg_folders
    patients = tmp / "patients.json"
    patients.write_text(json.dumps({"P": ["a", "b"], "Q": ["c"]}))
    table = evaluate_folder(pred, gt, mode="seg", patients=patients, output_dir=tmp / "out")
    by = {(r["scan"], r["lesion_id"]): r for r in table.lesions}
    assert by[("a", 1)]["dice"] == pytest.approx(0.75) and by[("a", 1)]["nsd"] == pytest.approx(NSD_SHIFT)
    assert by[("a", 2)]["dice"] == 1.0 and by[("b", 1)]["nsd"] == 1.0
    assert by[("c", 1)]["dice"] == 0.0 and by[("c", 1)]["pred_voxels"] == 0
    scans = {s["scan"]: s for s in table.scans}
    assert scans["b"]["extra_pred_ids"] == "7"
    # scan means: a 0.875, b 1, c 0; patient P's two scans weigh 1/2 each: (0.4375 + 0.5 + 0) / 2
    s = table.summary
    assert s["dice"] == pytest.approx((0.5 * 0.875 + 0.5 * 1.0 + 0.0) / 2)
    assert s["nsd"] == pytest.approx((0.5 * (NSD_SHIFT + 1) / 2 + 0.5 * 1.0) / 2)
    assert s["n_patients"] == 2 and s["n_scans"] == 3 and s["n_lesions"] == 4
    assert s["unmatched_predictions"] == ["orphan"]
    # without patients every scan is its own patient: (0.875 + 1 + 0) / 3
    assert evaluate_folder(pred, gt).summary["dice"] == pytest.approx(1.875 / 3)

    summary = json.loads((tmp / "out" / "summary.json").read_text())
    assert summary["dice"] == pytest.approx(s["dice"]) and summary["mode"] == "seg"
    with open(tmp / "out" / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and float(rows[0]["dice"]) == pytest.approx(0.75) and rows[0]["patient"] == "P"
    with open(tmp / "out" / "scans.csv", newline="") as f:
        assert [r["scan"] for r in csv.DictReader(f)] == ["a", "b", "c"]


def test_track_mode(tmp_path):
    shape = (48, 40, 60)
    gt = np.zeros(shape, np.uint16)
    pred = np.zeros(shape, np.uint16)
    gt[5:25, 2:6, 2:6] = 1
    pred[15:35, 2:6, 2:6] = 1  # 10 slices x 2 mm = 20 mm: hit, Dice 0.5
    gt[5:9, 20:24, 10:14] = 2
    pred[5:9, 20:24, 40:44] = 2  # 30 mm: miss
    gt[30:34, 30:34, 20:24] = 3  # not tracked: miss
    write(tmp_path / "gt" / "fu.nii.gz", gt, (2.0, 1.0, 1.0))
    write(tmp_path / "pred" / "fu.nii.gz", pred, (2.0, 1.0, 1.0))
    table = evaluate_folder(tmp_path / "pred", tmp_path / "gt", mode="track", output_dir=tmp_path / "out")
    s = table.summary
    assert s["cpm"] == pytest.approx(1 / 3) and s["dice_matched"] == pytest.approx(0.5)
    assert s["med"] == pytest.approx(20.0) and s["total_dice"] == pytest.approx(320 / 832)
    assert [r["hit"] for r in table.lesions] == [True, False, False]
    with open(tmp_path / "out" / "lesions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[2]["distance_mm"] == "" and rows[2]["med"] == ""  # NaN -> empty cell
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["med"] == pytest.approx(20.0) and summary["match_mm"] == 25.0


def test_clear_errors(seg_folders, tmp_path):
    pred, gt, tmp = seg_folders
    (pred / "c.nii.gz").unlink()
    with pytest.raises(EvaluationError, match="no prediction.*c"):
        evaluate_folder(pred, gt)
    write(pred / "c.nii.gz", np.zeros((10, 12, 20), np.uint8), spacing=(2.0, 1.0, 1.0))
    with pytest.raises(EvaluationError, match="case 'c'.*does not match"):
        evaluate_folder(pred, gt)
    write(pred / "c.nii.gz", np.full((10, 12, 20), 0.5, np.float32))
    with pytest.raises(EvaluationError, match="non-integer"):
        evaluate_folder(pred, gt)
    write(pred / "c.nii.gz", np.zeros((10, 12, 20), np.uint8))
    with pytest.raises(EvaluationError, match="patients file: c"):
        evaluate_folder(pred, gt, patients={"a": "P", "b": "P"})
    with pytest.raises(EvaluationError, match="mode"):
        evaluate_folder(pred, gt, mode="both")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvaluationError, match="no ground-truth"):
        evaluate_folder(pred, tmp_path / "empty")
    with pytest.raises(EvaluationError, match="not a folder"):
        evaluate_folder(tmp_path / "nowhere", gt)
    write(gt / "a.nrrd", np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(EvaluationError, match="two images for case 'a'"):
        evaluate_folder(pred, gt)


def test_load_patients_forms(tmp_path):
    assert load_patients({"s1": "P", "s2": "P"}) == {"s1": "P", "s2": "P"}
    assert load_patients({"P": ["s1", "s2"], "Q": ["s3"]}) == {"s1": "P", "s2": "P", "s3": "Q"}
    with pytest.raises(EvaluationError, match="listed for patients"):
        load_patients({"P": ["s1"], "Q": ["s1"]})
    with pytest.raises(EvaluationError, match="expected"):
        load_patients({"P": 3})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EvaluationError, match="cannot read"):
        load_patients(bad)


def test_cli_run(seg_folders, capsys):
    pred, gt, tmp = seg_folders
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--pred", str(pred), "--gt", str(gt), "-o", str(tmp / "cli")])
    assert args.mode == "seg" and args.tolerance_mm == 2.0
    assert run(args) == 0
    out = capsys.readouterr().out
    assert "3 scans" in out and "dice" in out
    assert (tmp / "cli" / "summary.json").exists()
    args = parser.parse_args(["--pred", str(tmp / "nowhere"), "--gt", str(gt)])
    assert run(args) == 2
    assert "not a folder" in capsys.readouterr().err
    assert math.isfinite(json.loads((tmp / "cli" / "summary.json").read_text())["nsd"])


def test_real_sarcoma_gtv_shifted(shared_data, tmp_path):
    """Real GTV (STS_002, 3.27 mm slices) against itself moved up two slices.

    The centre moves by exactly 2 x 3.27 = 6.54 mm (a hit, MED 6.54); the cropped per-lesion
    Dice / NSD of the folder evaluation must equal the metrics on the full arrays.
    """
    from LesionLocatorLib.core.image_io import read_image
    from LesionLocatorLib.measure.metrics import dice, normalized_surface_dice

    path = shared_data / "sts" / "STS_002_lesions.nii.gz"
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    gt = read_image(path)
    g = (gt.array == 1).astype(np.uint8)
    zs = np.flatnonzero(g.any(axis=(1, 2)))
    assert zs[-1] + 2 < g.shape[0]  # the shift stays inside the image
    p = np.zeros_like(g)
    p[2:] = g[:-2]
    for folder, arr in (("gt", g), ("pred", p)):
        write_image(gt.with_array(arr), tmp_path / folder / "STS_002.nii.gz")
    seg = evaluate_folder(tmp_path / "pred", tmp_path / "gt", mode="seg")
    assert seg.lesions[0]["dice"] == pytest.approx(dice(p, g))
    assert seg.lesions[0]["nsd"] == pytest.approx(normalized_surface_dice(p, g, gt.spacing, 2.0))
    assert 0.5 < seg.summary["dice"] < 1.0 and 0.0 < seg.summary["nsd"] < 1.0
    trk = evaluate_folder(tmp_path / "pred", tmp_path / "gt", mode="track")
    assert trk.summary["cpm"] == 1.0
    assert trk.summary["med"] == pytest.approx(2 * gt.spacing[0], abs=1e-4)
    assert trk.summary["dice_matched"] == pytest.approx(seg.summary["dice"])


def test_published_one_file_per_lesion_layout(seg_folders):
    """<case>_lesion_<k> files (the published tool's output) score like one merged label map."""
    pred, gt, tmp = seg_folders
    from LesionLocatorLib.core.image_io import read_image

    merged = read_image(pred / "a.nii.gz").array
    (pred / "a.nii.gz").unlink()
    for k in (1, 2):
        write(pred / f"a_lesion_{k}.nii.gz", (merged == k).astype(np.uint8))
    write(pred / "a_lesion_3.nii.gz", np.zeros_like(merged))  # an empty extra lesion file
    table = evaluate_folder(pred, gt, mode="seg")
    by = {(r["scan"], r["lesion_id"]): r for r in table.lesions}
    assert by[("a", 1)]["dice"] == pytest.approx(0.75) and by[("a", 1)]["nsd"] == pytest.approx(NSD_SHIFT)
    assert by[("a", 2)]["dice"] == 1.0
    assert table.summary["unmatched_predictions"] == ["orphan"]
    trk = evaluate_folder(pred, gt, mode="track")
    assert {(r["scan"], r["lesion_id"]): r["hit"] for r in trk.lesions}[("a", 1)]
