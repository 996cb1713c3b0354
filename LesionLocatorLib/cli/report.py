"""``lesionlocator report``: the longitudinal report (volumes, RECIST diameters, changes) from label maps."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..core.image_io import read_image
from ..measure.report import ReportError, build_report_from_label_maps


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("labels", nargs="+", help="instance label maps, baseline first (same ids = same lesion)")
    parser.add_argument("--names", nargs="+", default=None, help="timepoint names; omit to use the file names")
    parser.add_argument("-o", "--output", required=True,
                        help="report file: .json or .csv (both are written when the name has no suffix)")


def run(args: argparse.Namespace) -> int:
    try:
        names = args.names or [Path(p).name.split(".")[0] for p in args.labels]
        if len(names) != len(args.labels):
            raise ReportError(f"got {len(names)} names for {len(args.labels)} label maps")
        report = build_report_from_label_maps([(n, read_image(p)) for n, p in zip(names, args.labels)])
        out = Path(args.output)
        suffix = out.suffix.lower()
        written = []
        if suffix in (".json", ""):
            written.append(report.to_json(out if suffix else out.with_suffix(".json")))
        if suffix in (".csv", ""):
            written.append(report.to_csv(out if suffix else out.with_suffix(".csv")))
        if not written:
            raise ReportError(f"output must end in .json or .csv (or have no suffix), got {out.name}")
    except (ReportError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for s in report.summaries:
        print(f"{s.timepoint}: SLD {s.sld_mm:.1f} mm, {s.n_target_found}/{s.n_target} target lesions found"
              + (f", {s.category}" if s.category else ""))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
