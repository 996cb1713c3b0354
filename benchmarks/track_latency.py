"""Time to track N lesions from a baseline into one follow-up: LesionTracker vs the published per-lesion scheme.

    python benchmarks/track_latency.py [--device cpu|cuda] [--arch published|small] [--lesions 1 5 20]

LesionTracker costs one registration per scan pair plus one UNet pass per lesion. The published code
re-preprocesses both scans and runs the full two-way GradICON forward (with its losses) for every
lesion. Both are measured in the same run on the same scans (the LIDC chest CT of ../shared/data and a
shifted copy as follow-up, or a synthetic CT of the same size), with random weights (timing does not
depend on them). ``--arch published`` uses ResEnc-L (patch 160x224x224) and a 175^3 uniGradICON;
``--arch small`` (default on CPU) a reduced UNet and a 65^3 registration grid so a CPU run ends in minutes.
The published scheme is measured per lesion for the first ``--published-measured`` lesions and its
per-lesion time multiplied up for larger N (it does the same work for every lesion); that is printed.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

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


def lesion_masks(img, n: int, seed: int = 0) -> dict:
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


def published_per_lesion(tracker, base, fu, mask) -> float:
    """The published per-lesion cost: preprocess both scans, full two-way GradICON forward, UNet pass."""
    import torch

    from LesionLocatorLib.track.propagation import resize_trilinear, z_align

    t0 = time.perf_counter()
    tracker._pp_cache.clear()
    tracker._engine._state, tracker._engine._recent = None, []
    tracker.set_images(base, [fu])
    bpp, fpp = tracker._preprocessed(0), tracker._preprocessed(1)
    za = z_align(bpp, fpp)
    shape = tuple(tracker._reg_net.identity_map.shape[2:])
    a = resize_trilinear(bpp[za.baseline_z[0]:za.baseline_z[1]], shape, tracker.device)
    b = resize_trilinear(fpp[za.followup_z[0]:za.followup_z[1]], shape, tracker.device)
    with torch.no_grad():
        tracker._reg_net(a, b)  # both directions and the GradICON losses, as published
    reg = tracker.registrations
    tracker.registrations = []
    tracker._register(0, 1)  # the warp + UNet of the lesion below need a deformation object
    deformation = tracker.registrations[-1]
    tracker.registrations = reg
    tracker._track_lesion(1, mask, 0, 1, deformation)
    if tracker.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--arch", choices=sorted(ARCH), default=None)
    ap.add_argument("--lesions", type=int, nargs="+", default=[1, 5, 20])
    ap.add_argument("--published-measured", type=int, default=1, help="lesions of the published scheme timed")
    args = ap.parse_args()
    import torch

    from segment_latency import load_image

    from LesionLocatorLib.core.geometry import Volume
    from LesionLocatorLib.core.prompts import Mask
    from LesionLocatorLib.model.tiny_model import write_random_checkpoint, write_random_track_checkpoint
    from LesionLocatorLib.track.tracker import LesionTracker

    arch_name = args.arch or ("published" if args.device.startswith("cuda") else "small")
    arch = dict(ARCH[arch_name])
    reg_size = arch.pop("registration_size")
    tmp = tempfile.mkdtemp(prefix="ll_track_bench_")
    root = write_random_checkpoint(tmp, kinds=("point",), **arch)
    write_random_track_checkpoint(root, registration_size=reg_size, **arch)
    base, source = load_image()
    fu = Volume(np.roll(base.array, (3, -5, 4), axis=(0, 1, 2)), base.spacing, base.origin, base.direction)
    tracker = LesionTracker.from_checkpoint(root, device=args.device)
    print(f"scans: {source} {base.shape} and a shifted copy; device {tracker.device}; arch {arch_name} "
          f"(UNet patch {arch['patch_size']}, registration {reg_size}); torch {torch.__version__}")
    masks_all = lesion_masks(base, max(args.lesions))
    # warm-up (first-use costs: allocations, cuDNN autotune)
    tracker.track(base, [fu], {1: Mask(masks_all[1])})
    per_lesion = [published_per_lesion(tracker, base, fu, masks_all[k + 1]) for k in range(args.published_measured)]
    pub = float(np.mean(per_lesion))
    print(f"published scheme, per lesion (measured on {len(per_lesion)}): {pub:.2f} s")
    print(f"{'lesions':>8} {'ours (s)':>10} {'registration (s)':>17} {'published (s)':>14} {'speed-up':>9}")
    for n in args.lesions:
        prompts = {k: Mask(masks_all[k]) for k in range(1, n + 1)}
        t0 = time.perf_counter()
        tracker.track(base, [fu], prompts)
        if tracker.device.type == "cuda":
            torch.cuda.synchronize()
        ours = time.perf_counter() - t0
        reg = sum(r.seconds for r in tracker.registrations)
        note = "" if n <= len(per_lesion) else " (per-lesion time x N)"
        print(f"{n:>8} {ours:>10.2f} {reg:>17.2f} {pub * n:>14.2f} {pub * n / ours:>8.1f}x{note}")


if __name__ == "__main__":
    main()
