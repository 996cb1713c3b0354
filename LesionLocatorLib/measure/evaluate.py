"""Score a folder of predicted instance label maps against ground truth.

``lesionlocator evaluate --pred DIR --gt DIR [--mode seg|track] [--patients-json F] -o OUT``

Files are matched by case name (file name without its image suffix, so ``a.nii.gz`` matches
``a.nrrd``); both files must be instance label maps (0 = background, k = lesion k) on the same
grid. Instead of one label map a case may have the published tool's one-file-per-lesion output,
``<case>_lesion_<k>.nii.gz`` (non-zero = lesion k; overlaps between lesions are kept). Every
ground-truth case needs a prediction.

* ``seg``: per gt lesion, Dice and normalised surface Dice (2 mm) of prediction label k vs gt
  label k. Predicted ids without a gt lesion are listed per scan but not scored.
* ``track``: the predictions are the tracker's follow-up masks (ids kept from the baseline);
  per scan CPM@25, Dice@25, MED and total Dice (see :mod:`LesionLocatorLib.measure.metrics`).

Summary values are averaged first over the lesions of a scan, then over scans with each patient
weighted equally (``--patients-json``: ``{"scan": "patient"}`` or ``{"patient": ["scan", ...]}``;
without it every scan is its own patient). Outputs: ``lesions.csv``, ``scans.csv``,
``summary.json`` in the output folder (NaN/None are empty CSV cells and JSON null).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.geometry import Volume
from ..core.files import strip_image_suffix
from ..core.image_io import IMAGE_SUFFIXES, ImageReadError, read_image
from .metrics import (Crops, MetricError, aggregate, dice, in_box, lesion_crops, normalized_surface_dice,
                      tracking_metrics, union_box)
from ..core.files import atomic_write_text

MODES = ("seg", "track")
_LESION_FILE = re.compile(r"^(?P<case>.+)_lesion_(?P<id>\d+)$")
SEG_METRICS = ("dice", "nsd")
TRACK_METRICS = ("cpm", "dice_matched", "med", "total_dice")


class EvaluationError(ValueError):
    """Folders, files or geometries that cannot be scored as asked."""


def case_name(path: Path) -> str | None:
    """File name without its image suffix, or None for files that are not images."""
    return strip_image_suffix(path.name)


def find_cases(folder: str | os.PathLike) -> dict[str, Path]:
    """{case name: path} of the image files directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"not a folder: {folder}")
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        name = case_name(p) if p.is_file() and not p.name.startswith(".") else None
        if name is None:
            continue
        if name in out:
            raise EvaluationError(f"two images for case {name!r} in {folder}: {out[name].name} and {p.name}")
        out[name] = p
    return out


def load_patients(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, str]:
    """{scan: patient} from ``{"scan": "patient"}`` or ``{"patient": ["scan", ...]}`` (a dict or JSON file)."""
    if isinstance(source, Mapping):
        data: Any = source
    else:
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise EvaluationError(f"cannot read patients file {source}: {exc}") from exc
    if not isinstance(data, Mapping):
        raise EvaluationError("patients JSON must be an object")
    out: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, str):
            out[str(key)] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            for scan in value:
                if scan in out and out[scan] != key:
                    raise EvaluationError(f"scan {scan!r} is listed for patients {out[scan]!r} and {key!r}")
                out[scan] = str(key)
        else:
            raise EvaluationError(f"patients JSON entry {key!r}: expected a patient id or a list of scan names")
    return out


def _finite_or_none(v: Any) -> Any:
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if (v := _finite_or_none(row.get(k))) is None else v) for k in columns})
    return buf.getvalue()


@dataclass
class EvaluationTable:
    """Per-lesion rows, per-scan rows and the patient-weighted summary."""

    mode: str
    lesions: list[dict[str, Any]]
    scans: list[dict[str, Any]]
    summary: dict[str, Any]
    lesion_columns: list[str] = field(default_factory=list)
    scan_columns: list[str] = field(default_factory=list)

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        out_dir = Path(out_dir)
        return {
            "lesions": atomic_write_text(out_dir / "lesions.csv", _to_csv(self.lesions, self.lesion_columns)),
            "scans": atomic_write_text(out_dir / "scans.csv", _to_csv(self.scans, self.scan_columns)),
            "summary": atomic_write_text(out_dir / "summary.json", json.dumps(
                {k: _finite_or_none(v) for k, v in self.summary.items()}, indent=2)),
        }


def _read_labels(path: Path, what: str) -> Volume:
    vol = read_image(path)
    arr = vol.array
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(arr == np.round(arr)):
            raise EvaluationError(f"{what} {path.name} holds non-integer values; expected an instance label map")
        arr = arr.astype(np.int64)
    if arr.size and arr.min() < 0:
        raise EvaluationError(f"{what} {path.name} holds negative labels")
    vol.array = arr
    return vol


def _seg_scan(pred: Crops, gt: Crops, spacing: Sequence[float], tolerance_mm: float) -> list[dict[str, Any]]:
    """Dice and NSD per gt lesion, each on the box around both masks (same values as on the full
    arrays: every voxel outside the box is background for both)."""
    rows = []
    for lid in sorted(gt):
        box = union_box(gt[lid][0], pred[lid][0]) if lid in pred else gt[lid][0]
        p, g = in_box(pred.get(lid), box), in_box(gt[lid], box)
        rows.append({"lesion_id": lid, "dice": dice(p, g), "nsd": normalized_surface_dice(p, g, spacing, tolerance_mm),
                     "gt_voxels": int(g.sum()), "pred_voxels": int(p.sum())})
    return rows


def _pred_sources(pred_cases: Mapping[str, Path], gt_cases: Mapping[str, Path]) -> dict[str, Path | dict[int, Path]]:
    """Prediction of each gt case: one label map ``<case>``, or published-style per-lesion files
    ``<case>_lesion_<k>`` (binary masks of lesion k). Raises when a case has neither."""
    out: dict[str, Path | dict[int, Path]] = {}
    missing = []
    for case in gt_cases:
        if case in pred_cases:
            out[case] = pred_cases[case]
            continue
        per_lesion = {}
        for name, path in pred_cases.items():
            m = _LESION_FILE.match(name)
            if m and m.group("case") == case:
                per_lesion[int(m.group("id"))] = path
        if per_lesion:
            out[case] = dict(sorted(per_lesion.items()))
        else:
            missing.append(case)
    if missing:
        missing.sort()
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise EvaluationError(f"{len(missing)} ground-truth case(s) have no prediction "
                              f"(<case> or <case>_lesion_<k>): {shown}")
    return out


def _read_prediction(source: Path | dict[int, Path], gt: Volume, case: str) -> np.ndarray | dict[int, np.ndarray]:
    items = source.items() if isinstance(source, dict) else [(None, source)]
    loaded = {}
    for lid, path in items:
        try:
            vol = _read_labels(path, "prediction")
        except ImageReadError as exc:
            raise EvaluationError(str(exc)) from exc
        if not vol.same_grid(gt, tol=1e-3):
            raise EvaluationError(
                f"case {case!r}: prediction {path.name} grid (shape {vol.shape}, spacing {vol.spacing}, origin "
                f"{vol.origin}) does not match the ground truth (shape {gt.shape}, spacing {gt.spacing}, "
                f"origin {gt.origin})")
        loaded[lid] = vol.array
    if not isinstance(source, dict):
        return loaded[None]
    return {int(lid): arr != 0 for lid, arr in loaded.items()}


def evaluate_folder(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, mode: str = "seg",
                    patients: str | os.PathLike | Mapping[str, Any] | None = None, tolerance_mm: float = 2.0,
                    match_mm: float = 25.0, output_dir: str | os.PathLike | None = None) -> EvaluationTable:
    """Score every gt case of ``gt_dir`` against the prediction of the same name in ``pred_dir``."""
    if mode not in MODES:
        raise EvaluationError(f"mode must be one of {MODES}, got {mode!r}")
    gt_cases, pred_cases = find_cases(gt_dir), find_cases(pred_dir)
    if not gt_cases:
        raise EvaluationError(f"no ground-truth images ({', '.join(IMAGE_SUFFIXES)}) in {gt_dir}")
    sources = _pred_sources(pred_cases, gt_cases)
    scan_patient = {c: c for c in gt_cases}
    if patients is not None:
        mapping = load_patients(patients)
        unlisted = sorted(set(gt_cases) - set(mapping))
        if unlisted:
            raise EvaluationError(f"scans missing from the patients file: {', '.join(unlisted[:10])}")
        scan_patient = {c: mapping[c] for c in gt_cases}

    lesion_rows: list[dict[str, Any]] = []
    scan_rows: list[dict[str, Any]] = []
    for case in sorted(gt_cases):
        try:
            gt = _read_labels(gt_cases[case], "ground truth")
        except ImageReadError as exc:
            raise EvaluationError(str(exc)) from exc
        pred = _read_prediction(sources[case], gt, case)
        base = {"patient": scan_patient[case], "scan": case}
        try:
            _, gt_crops = lesion_crops(gt.array, f"ground truth of {case!r}")
            _, pred_crops = lesion_crops(pred, f"prediction of {case!r}")
            extra = sorted(set(pred_crops) - set(gt_crops))
            if mode == "seg":
                rows = _seg_scan(pred_crops, gt_crops, gt.spacing, tolerance_mm)
                scan = {m: float(np.mean([r[m] for r in rows])) if rows else math.nan for m in SEG_METRICS}
            else:
                res = tracking_metrics(pred, gt.array, gt.spacing, volume=gt, match_mm=match_mm)
                rows = res.lesion_rows()
                for r, les in zip(rows, res.lesions):
                    r["hit"] = les.hit
                scan = {"cpm": res.cpm, "dice_matched": res.dice_matched, "med": res.med, "total_dice": res.total_dice}
        except MetricError as exc:
            raise EvaluationError(f"case {case!r}: {exc}") from exc
        lesion_rows += [{**base, **r} for r in rows]
        scan_rows.append({**base, "n_lesions": len(rows), **scan,
                          "extra_pred_ids": " ".join(map(str, extra))})

    used_names = {case_name(p) for src in sources.values() for p in (src.values() if isinstance(src, dict) else [src])}
    metrics = SEG_METRICS if mode == "seg" else TRACK_METRICS
    summary: dict[str, Any] = {
        "mode": mode, "n_scans": len(scan_rows), "n_patients": len(set(scan_patient.values())),
        "n_lesions": len(lesion_rows),
        "scans_without_lesions": [s["scan"] for s in scan_rows if s["n_lesions"] == 0],
        "unmatched_predictions": sorted(set(pred_cases) - used_names),
    }
    if mode == "seg":
        summary["tolerance_mm"] = float(tolerance_mm)
    else:
        summary["match_mm"] = float(match_mm)
    summary.update(aggregate(lesion_rows, metrics))
    if mode == "seg":
        lesion_cols = ["patient", "scan", "lesion_id", "dice", "nsd", "gt_voxels", "pred_voxels"]
    else:
        lesion_cols = ["patient", "scan", "lesion_id", "hit", "distance_mm", "dice", "cpm", "dice_matched", "med",
                       "total_dice"]
    scan_cols = ["patient", "scan", "n_lesions", *metrics, "extra_pred_ids"]
    table = EvaluationTable(mode, lesion_rows, scan_rows, summary, lesion_cols, scan_cols)
    if output_dir is not None:
        table.write(output_dir)
    return table


# ------------------------------------------------------------------------------------ CLI
