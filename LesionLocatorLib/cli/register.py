"""``lesionlocator register``: warp a baseline mask onto a follow-up by classical registration."""
from __future__ import annotations

import argparse

import numpy as np


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..track.classical_registration import DEFAULT_RESOLUTION_MM

    parser.add_argument("--baseline", required=True, help="baseline image (NIfTI/NRRD/MHA or DICOM folder)")
    parser.add_argument("--followup", required=True, help="follow-up image")
    parser.add_argument("--mask", required=True, help="baseline lesion mask or instance label map (baseline grid)")
    parser.add_argument("-o", "--output", required=True, help="warped mask on the follow-up grid")
    parser.add_argument("--affine-only", action="store_true", help="skip the deformable (demons) stage")
    parser.add_argument("--resolution-mm", type=float, default=DEFAULT_RESOLUTION_MM,
                        help=f"registration grid spacing in mm (default: {DEFAULT_RESOLUTION_MM})")
    parser.add_argument("--threads", type=int, default=2, help="threads, fixed for reproducible results (default: 2)")


def run(args: argparse.Namespace) -> int:
    from ..core.geometry import GeometryError
    from ..core.image_io import read_image, write_image
    from ..track.classical_registration import ClassicalPropagator

    baseline = read_image(args.baseline)
    followup = read_image(args.followup)
    mask = read_image(args.mask)
    if not mask.same_grid(baseline, tol=1e-3):
        raise GeometryError(f"mask {args.mask} is not on the baseline image's grid (shape, spacing, origin, direction)")
    prop = ClassicalPropagator(resolution_mm=args.resolution_mm, deformable=not args.affine_only,
                               threads=args.threads)
    warped = prop.register(baseline, followup).warp(mask.array)
    write_image(followup.with_array(warped), args.output)
    rep = prop.last_report
    labels = [int(v) for v in np.unique(warped) if v != 0]
    msg = f"wrote {args.output}: {len(labels)} label(s) on the follow-up"
    if rep is not None:
        msg += f"; overlap {rep.overlap:.0%}, correlation {rep.correlation_before:.3f} -> {rep.correlation:.3f}"
    print(msg)
    return 0
