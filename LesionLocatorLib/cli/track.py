"""``lesionlocator track``: baseline + follow-ups -> masks per timepoint and the longitudinal report."""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from .common import add_backend_arguments, backend_from_args, load_prompts, make_progress, unique_names, write_result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Track lesions from a baseline scan into one or more follow-ups. Prompts on the baseline: a JSON file "
        "of points or boxes (segmented first with the segmentation model) or an instance label map (masks). "
        "Writes, per timepoint, <case>_lesion_<id>.nii.gz and <case>_lesions.nii.gz, plus report.json / "
        "report.csv (volumes, RECIST diameters, changes, response category). Lesions lost in a follow-up are "
        "reported as 'not found', never dropped."
    )
    p.add_argument("-bl", "--baseline", required=True, help="baseline CT")
    p.add_argument("-fu", "--followups", required=True, nargs="+", help="follow-up CTs in time order")
    p.add_argument("-p", "--prompts", required=True, help="prompt JSON (points/boxes) or label map (masks)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--prompt-type", choices=["point", "box", "mask"], default=None,
                   help="check that the file holds only these prompts (default: any)")
    p.add_argument("--propagation", choices=["learned", "classical"], default=None,
                   help="learned (LesionLocatorTrack uniGradICON) or classical (SimpleITK affine + demons) "
                        "(default: learned when the checkpoint has a Track model)")
    p.add_argument("--refine", choices=["unet", "segment", "none"], default=None,
                   help="unet: Track UNet on the warped prompt (published); segment: segmentation model prompted "
                        "with the warped mask; none: the warped previous mask itself (default: unet with a Track "
                        "model, else segment)")
    p.add_argument("--from-baseline", action="store_true",
                   help="prompt every follow-up from the baseline instead of the previous follow-up")
    add_backend_arguments(p)


def run(args: argparse.Namespace) -> int:
    from ..core.image_io import read_image

    # read and check everything before any computation: a bad follow-up fails before work starts
    baseline = read_image(args.baseline)
    followups = [read_image(f) for f in args.followups]
    prompts = load_prompts(args.prompts, baseline, args.prompt_type)
    names = unique_names([args.baseline, *args.followups])
    with backend_from_args(args) as backend:
        tracker = backend.tracker(propagation=args.propagation, refine=args.refine)
        try:
            tracker.set_images(baseline, followups)
            tracked = tracker.track(prompts, from_baseline=args.from_baseline, progress=make_progress("track"))
        finally:
            tracker.close()
    report = tracked.report(names)
    # write into a temporary folder first, then move: no half-written output folder
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".track_", dir=out))
    try:
        for name, res in zip(names, tracked.timepoints):
            write_result(res, tmp, name)
        report.to_json(tmp / "report.json")
        report.to_csv(tmp / "report.csv")
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name, res in zip(names[1:], tracked.followups):
        lost = [lid for lid, les in res.lesions.items() if not les.found]
        print(f"{name}: {len(res.lesions) - len(lost)} of {len(res.lesions)} lesions found"
              + (f"; not found: {lost}" if lost else ""))
    for s in report.summaries:
        change = "" if s.sld_change_vs_baseline_pct is None else f" ({s.sld_change_vs_baseline_pct:+.0f} % vs baseline)"
        print(f"{s.timepoint}: sum of longest diameters {s.sld_mm:.1f} mm{change}, RECIST {s.category or '-'}")
    print(f"wrote results to {out}")
    return 0
