"""``lesionlocator evaluate``: score predicted label maps against ground truth (Dice, NSD, CPM, MED)."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..measure.evaluate import MODES, SEG_METRICS, TRACK_METRICS, EvaluationError, evaluate_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pred", required=True, help="folder of predicted instance label maps")
    parser.add_argument("--gt", required=True, help="folder of ground-truth instance label maps (same file names)")
    parser.add_argument("--mode", choices=MODES, default="seg",
                        help="seg: Dice + NSD per lesion; track: CPM@25, Dice@25, MED, total Dice")
    parser.add_argument("--patients-json", default=None,
                        help='{"scan": "patient"} or {"patient": ["scan", ...]}; omit for one patient per scan')
    parser.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance in mm")
    parser.add_argument("--match-mm", type=float, default=25.0, help="tracking hit distance in mm")
    parser.add_argument("-o", "--output", default=None,
                        help="folder for lesions.csv, scans.csv, summary.json; omit to print only")


def run(args: argparse.Namespace) -> int:
    try:
        table = evaluate_folder(args.pred, args.gt, mode=args.mode, patients=args.patients_json,
                                tolerance_mm=args.tolerance_mm, match_mm=args.match_mm, output_dir=args.output)
    except (EvaluationError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = table.summary
    metrics = SEG_METRICS if table.mode == "seg" else TRACK_METRICS
    print(f"{s['n_scans']} scans, {s['n_patients']} patients, {s['n_lesions']} lesions "
          f"({table.mode}, patient-weighted):")
    for m in metrics:
        print(f"  {m:13s} {s[m]:.4f}" if math.isfinite(s[m]) else f"  {m:13s} n/a")
    if args.output:
        print(f"wrote {Path(args.output) / 'lesions.csv'}, scans.csv, summary.json")
    return 0
