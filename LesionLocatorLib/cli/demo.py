"""``lesionlocator demo``: the whole workflow on generated data, with nothing to download.

A phantom baseline CT with lesions and a synthetic follow-up (lesions grown/shrunk, patient shifted
and deformed) are generated; lesions are segmented from point prompts on the baseline, tracked into
the follow-up, and masks, the longitudinal report and a PNG overview are written.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from .common import add_backend_arguments, backend_from_args, write_result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__.splitlines()[0].split(": ", 1)[1] if __doc__ else ""
    p.add_argument("-o", "--output", default="lesionlocator_demo", help="output folder (default: lesionlocator_demo)")
    p.add_argument("--seed", type=int, default=0, help="phantom / follow-up seed (default: 0)")
    p.add_argument("--propagation", choices=["learned", "classical"], default=None,
                   help="default: learned when the checkpoint has a Track model, else classical")
    add_backend_arguments(p, device_default="cpu")


def _overview_png(path: Path, base, fu, base_res, fu_res, base_truth, fu_truth, report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..core.results import LesionStatus

    ids = sorted(base_res.lesions)
    fig, axes = plt.subplots(len(ids), 2, figsize=(8, 3.6 * len(ids)), squeeze=False)
    for row, lid in enumerate(ids):
        for col, (img, res, truth, title) in enumerate(((base, base_res, base_truth, "baseline"),
                                                         (fu, fu_res, fu_truth, "follow-up"))):
            ax = axes[row][col]
            mask = res.lesions[lid].full(img.shape) if lid in res.lesions else np.zeros(img.shape, np.uint8)
            ref = mask if mask.any() else (truth.array == lid)
            z = int(np.round(np.argwhere(ref).mean(0)[0])) if ref.any() else img.shape[0] // 2
            ax.imshow(img.array[z], cmap="gray", vmin=-400, vmax=400)
            if (truth.array[z] == lid).any():
                ax.contour(truth.array[z] == lid, levels=[0.5], colors="yellow", linewidths=1, linestyles="--")
            if mask[z].any():
                ax.contour(mask[z], levels=[0.5], colors="red", linewidths=1.2)
            status = res.lesions[lid].status if lid in res.lesions else LesionStatus.NOT_FOUND
            m = report.measurement(lid, col) if report is not None else None
            extra = f", {m.volume_ml:.2f} ml" if m is not None and m.volume_ml is not None else ""
            ax.set_title(f"Lesion {lid} - {title} (z={z}): {status}{extra}", fontsize=9)
            ax.axis("off")
    fig.suptitle("LesionLocator demo: red = prediction, yellow dashed = phantom ground truth", fontsize=10)
    fig.tight_layout()
    from ..core.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from ..core.files import atomic_write_text
    from ..core.image_io import write_image
    from ..synthetic.longitudinal import make_followup
    from ..measure.metrics import dice
    from ..synthetic.phantom import lesion_prompts, make_phantom
    from ..core.prompts import Point

    t0 = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    base, base_lab = make_phantom(shape=(64, 128, 128), spacing=(2.0, 1.5, 1.5), n_lesions=3, seed=args.seed)
    ids = sorted(int(i) for i in np.unique(base_lab.array) if i)
    growth = {lid: float(a) for lid, a in zip(ids, rng.permutation([25.0, -22.0, 15.0, -18.0])[: len(ids)])}
    fu, fu_lab, meta = make_followup(base, base_lab, seed=args.seed + 1, shift_mm=(6.0, -4.0, 3.0),
                                     smooth_deformation_mm=2.0, growth=growth)
    write_image(base, out / "baseline_ct.nii.gz")
    write_image(fu, out / "followup_ct.nii.gz")
    write_image(base_lab, out / "baseline_truth.nii.gz")
    write_image(fu_lab, out / "followup_truth.nii.gz")
    prompts_json = lesion_prompts(base_lab.array)
    atomic_write_text(out / "baseline_points.json",
                      json.dumps({k: {"point": v["point"]} for k, v in prompts_json.items()}))
    prompts = {int(k): Point(tuple(v["point"])) for k, v in prompts_json.items()}
    print(f"generated a phantom baseline {base.shape} with {len(ids)} lesions and a synthetic follow-up "
          f"(growth amplitudes {growth}, shift 6/-4/3 mm)")

    with backend_from_args(args) as backend:
        tracker = backend.tracker(propagation=args.propagation)
        tracker.set_images(base, [fu])
        tracked = tracker.track(prompts)
        how = f"{tracker.propagation} propagation, refinement '{tracker.refine}'"
        tracker.close()
    base_res, results = tracked.baseline, tracked.followups
    report = tracked.report(["baseline", "followup"])
    write_result(base_res, out, "baseline")
    write_result(results[0], out, "followup")
    report.to_json(out / "report.json")
    report.to_csv(out / "report.csv")
    _overview_png(out / "overview.png", base, fu, base_res, results[0], base_lab, fu_lab, report)

    print(f"tracking: {how}")
    for lid in ids:
        d0 = dice(base_res.mask(lid) > 0, base_lab.array == lid)
        les = results[0].lesions[lid]
        d1 = dice(les.full(fu.shape) > 0, fu_lab.array == lid)
        m0, m1 = report.measurement(lid, 0), report.measurement(lid, 1)
        v0 = m0.volume_ml if m0 else float("nan")
        v1 = m1.volume_ml if m1 else float("nan")
        print(f"lesion {lid}: baseline Dice {d0:.2f}, {v0:.2f} ml -> follow-up {les.status}, Dice {d1:.2f}, "
              f"{v1:.2f} ml")
    for s in report.summaries:
        print(f"{s.timepoint}: sum of longest diameters {s.sld_mm:.1f} mm, RECIST {s.category or '-'}")
    print(f"wrote masks, report.json/report.csv and overview.png to {out.resolve()} "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0
