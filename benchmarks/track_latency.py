"""What tracking costs: LesionTracker vs the published per-lesion scheme, and the price of TTA and of folds.

    python benchmarks/track_latency.py [--device cpu|cuda] [--arch published|small] [--lesions 1 5 20]
                                       [--folds 5] [--skip-folds-tta]

LesionTracker costs one registration per scan pair (per fold, and per flip with the published TTA) plus one
UNet pass per lesion and pass. The published code re-preprocesses both scans and runs the full two-way GradICON
forward (with its losses) for every lesion. Printed, all measured in the same run on the same scans (the LIDC
chest CT of ../shared/data and a shifted copy as follow-up, or a synthetic CT of that size), random weights
(timing does not depend on them):
1. N lesions, one fold, no TTA: ours vs the published per-lesion scheme (measured for ``--published-measured``
   lesions, multiplied up for more: it does the same work for every lesion);
2. per scan pair and per lesion, the cost of each setting against setting 1 (one fold, no TTA) as the baseline:
   ``tta="unet"`` (UNet mirroring only, one registration), the published TTA (``tta=True``: 8 registrations per
   fold and pair, 8 UNet passes per lesion), ``--folds all`` and ``--folds all --tta`` (5 x 8 registrations).
``--arch published`` uses ResEnc-L (patch 160x224x224) and a 175^3 uniGradICON; ``--arch small`` (default on
CPU) a reduced UNet and an 80^3 registration grid so a CPU run ends in minutes.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

ARCH = {
    "published": dict(patch_size=(160, 224, 224), features_per_stage=(32, 64, 128, 256, 320, 320),
                      n_blocks_per_stage=(1, 3, 4, 6, 6, 6), registration_size=(175, 175, 175)),
    "small": dict(patch_size=(64, 96, 96), features_per_stage=(8, 16, 32, 64), n_blocks_per_stage=(1, 1, 2, 2),
                  registration_size=(80, 80, 80)),
}


def lesion_masks(img, n: int, seed: int = 0) -> Dict[int, np.ndarray]:
    """n small spheres at body voxels (HU > -300), away from each other."""
    rng = np.random.default_rng(seed)
    arr = img.array
    body = np.argwhere(arr[::8, ::8, ::8] > -300) * 8
    out = {}
    zz, yy, xx = np.ogrid[-4:5, -6:7, -6:7]
    ball = (zz / 4.0) ** 2 + (yy / 6.0) ** 2 + (xx / 6.0) ** 2 <= 1
    for lid in range(1, n + 1):
        c = body[rng.integers(len(body))]
        c = np.clip(c, [4, 6, 6], np.array(arr.shape) - [5, 7, 7])
        m = np.zeros(arr.shape, bool)
        m[c[0] - 4:c[0] + 5, c[1] - 6:c[1] + 7, c[2] - 6:c[2] + 7] = ball
        out[lid] = m
    return out


def _sync(model) -> None:
    import torch

    if model.device.type == "cuda":
        torch.cuda.synchronize()


def published_per_lesion(model, base, fu, mask) -> float:
    """The published per-lesion cost: preprocess both scans, z alignment, the full two-way GradICON forward
    with its losses, then the warp and UNet pass of one lesion."""
    import torch

    from LesionLocatorLib.track.propagation import resize_trilinear, z_align

    t0 = time.perf_counter()
    tracker = model.tracker(tta=False, folds=None)
    tracker.set_images(base, [fu])  # fresh preprocessing, as the published code does per lesion
    bpp, fpp = tracker._preprocessed(0), tracker._preprocessed(1)
    za = z_align(bpp, fpp)
    net = model.registration_net(tracker.track_folds()[0])
    shape = tuple(net.identity_map.shape[2:])
    a = resize_trilinear(bpp[za.baseline_z[0]:za.baseline_z[1]], shape, model.device)
    b = resize_trilinear(fpp[za.followup_z[0]:za.followup_z[1]], shape, model.device)
    with torch.no_grad():
        net(a, b)  # both directions and the GradICON losses, as published
    tracker.track({1: mask})  # one-way registration + warp + UNet of the lesion
    _sync(model)
    tracker.close()
    return time.perf_counter() - t0


def timed_track(model, base, fu, prompts, tta, folds: Optional[str] = None):
    """(seconds, registration seconds, registrations) of one tracking job on a fresh tracker."""
    tracker = model.tracker(tta=tta, folds=folds)
    tracker.set_images(base, [fu])
    tracker._preprocessed(0), tracker._preprocessed(1)  # preprocessing is the same for every setting
    t0 = time.perf_counter()
    tracker.track(prompts)
    _sync(model)
    out = (time.perf_counter() - t0, sum(r.seconds for r in tracker.registrations), len(tracker.registrations))
    tracker.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", choices=sorted(ARCH), default=None)
    ap.add_argument("--lesions", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--published-measured", type=int, default=1, help="lesions of the published scheme timed")
    ap.add_argument("--folds", type=int, default=5, help="folds written for the '--folds all' rows")
    ap.add_argument("--skip-folds-tta", action="store_true", help="skip the folds-all + TTA row (the slowest)")
    args = ap.parse_args()
    import torch

    from segment_latency import load_image

    from LesionLocatorLib.core.geometry import Volume
    from LesionLocatorLib.core.prompts import Mask
    from LesionLocatorLib.model.engine import LesionLocatorModel
    from LesionLocatorLib.model.tiny_model import write_random_checkpoint, write_random_track_checkpoint

    arch_name = args.arch or ("published" if args.device.startswith("cuda") else "small")
    arch = dict(ARCH[arch_name])
    reg_size = arch.pop("registration_size")
    tmp = tempfile.mkdtemp(prefix="ll_track_bench_")
    root = write_random_checkpoint(tmp, kinds=("point",), **arch)
    write_random_track_checkpoint(root, registration_size=reg_size, folds=tuple(range(args.folds)), **arch)
    base, source = load_image()
    fu = Volume(np.roll(base.array, (3, -5, 4), axis=(0, 1, 2)), base.spacing, base.origin, base.direction)
    model = LesionLocatorModel(root, device=args.device, folds="all")
    print(f"scans: {source} {base.shape} and a shifted copy; device {model.device}; arch {arch_name} "
          f"(UNet patch {arch['patch_size']}, registration {reg_size}); torch {torch.__version__}")
    masks_all = lesion_masks(base, max(args.lesions))
    first = str(model.fold_ids("track")[0])
    timed_track(model, base, fu, {1: Mask(masks_all[1])}, False, first)  # warm-up (allocations, autotune)

    # 1. ours vs the published per-lesion scheme (one fold, no TTA)
    per_lesion = [published_per_lesion(model, base, fu, Mask(masks_all[k + 1]))
                  for k in range(args.published_measured)]
    pub = float(np.mean(per_lesion))
    print(f"\npublished scheme, per lesion (measured on {len(per_lesion)}): {pub:.2f} s")
    print(f"{'lesions':>8} {'ours (s)':>10} {'registration (s)':>17} {'published (s)':>14} {'speed-up':>9}")
    for n in args.lesions:
        prompts = {k: Mask(masks_all[k]) for k in range(1, n + 1)}
        ours, reg, _ = timed_track(model, base, fu, prompts, False, first)
        note = "" if n <= len(per_lesion) else " (per-lesion time x N)"
        print(f"{n:>8} {ours:>10.2f} {reg:>17.2f} {pub * n:>14.2f} {pub * n / ours:>8.1f}x{note}")

    # 2. what TTA and folds cost, per scan pair and per lesion, against one fold without TTA (same run)
    n = min(5, max(args.lesions))
    prompts = {k: Mask(masks_all[k]) for k in range(1, n + 1)}
    settings = [("1 fold, no TTA (baseline)", False, first), ("1 fold, tta='unet' (approximation)", "unet", first),
                ("1 fold, published TTA", True, first), (f"folds all ({args.folds}), no TTA", False, "all")]
    if not args.skip_folds_tta:
        settings.append((f"folds all ({args.folds}) + published TTA", True, "all"))
    print(f"\n{n} lesions, one scan pair; ratios against the first row")
    print(f"{'setting':>38} {'registrations':>14} {'registration (s)':>17} {'UNet etc. (s)':>14} {'total (s)':>10} "
          f"{'ratio':>7}")
    ref_total = None
    for name, tta, folds in settings:
        total, reg, n_reg = timed_track(model, base, fu, prompts, tta, folds)
        ref_total = ref_total or total
        print(f"{name:>38} {n_reg:>14} {reg:>17.2f} {total - reg:>14.2f} {total:>10.2f} {total / ref_total:>6.1f}x")
    print("published TTA = the whole tracker per flip: 8 registrations per fold and scan pair (shared by all "
          "lesions of the pair) and 8 UNet passes per lesion; the published code also repeats the registrations "
          "for every lesion.")


if __name__ == "__main__":
    main()
