"""Per-click latency and peak memory of a SegmentSession, against the published whole-scan preprocessing;
and, with --real-lesions, growth past the patch on the real lesions of ../shared/data.

    python benchmarks/segment_latency.py [--device cpu|cuda] [--clicks 3] [--arch published|small]
    python benchmarks/segment_latency.py --real-lesions [--scales 1 2] [--checkpoint PATH] [--json OUT]

Uses the full thin-slice chest CT ../shared/data/lidc0314 (275 x 512 x 512, point on its nodule) when
present, else a synthetic CT of the same size; the published ResEnc-L architecture with random weights
(timing does not depend on the weights). Prints:
- first click and warm clicks (end to end: region preprocessing, network, export);
- the network forward alone at the patch size;
- the published pipeline's whole-scan preprocessing (normalise + resample the whole scan), measured in
  the same run, and the ratio;
- peak memory of a click beyond the network's own forward pass, on the full scan and on a 96^3 crop
  (each measured in a fresh process), to show it does not grow with the scan size.

--real-lesions: the bundled model (or --checkpoint), one click at the lesion's point and one box per real
lesion of ../shared/data/cases.json, growth off (the published single patch) and on: Dice against the real
mask, voxels, tiles, why growth stopped, seconds. ``--scales 2`` also runs each CT with its voxel spacing
doubled: the same anatomy and mask, 8x the volume, so that lesions outgrow the bundled model's 80 x 72 x 72 mm
patch (the real data holds no lesion that large).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
LIDC = REPO.parent / "shared" / "data" / "lidc0314" / "LIDC-IDRI-0314_ct.nii.gz"
NODULE = (159, 243, 184)

ARCH = {
    "published": dict(patch_size=(160, 224, 224), features_per_stage=(32, 64, 128, 256, 320, 320),
                      n_blocks_per_stage=(1, 3, 4, 6, 6, 6)),
    "small": dict(patch_size=(64, 96, 96), features_per_stage=(8, 16, 32, 64), n_blocks_per_stage=(1, 1, 2, 2)),
}


def load_image(crop: bool = False):
    from LesionLocatorLib.core.geometry import Volume
    from LesionLocatorLib.core.image_io import read_image

    if LIDC.exists():
        img = read_image(LIDC)
        source = str(LIDC)
    else:
        rng = np.random.default_rng(0)
        arr = (rng.normal(-700, 200, (275, 512, 512))).astype(np.int16)
        img = Volume(arr, spacing=(1.0, 0.78, 0.78))
        source = "synthetic 275x512x512"
    if crop:
        z, y, x = NODULE
        sub = img.array[z - 48:z + 48, y - 48:y + 48, x - 48:x + 48].copy()
        origin = img.voxel_to_world((z - 48, y - 48, x - 48))
        img = Volume(sub, img.spacing, origin, img.direction)
        source += " (96^3 crop)"
    return img, source


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(mode: str, ckpt: str, device: str) -> dict:
    """Run one measured action in this (fresh) process; peak RSS above the state just before it."""
    import torch

    from LesionLocatorLib.model.engine import LesionLocatorModel

    torch.set_grad_enabled(False)
    model = LesionLocatorModel(ckpt, device=device)
    seg = model.session()
    img, _ = load_image(crop=(mode == "click_crop"))
    point = (48, 48, 48) if mode == "click_crop" else NODULE
    if mode == "forward":
        cfg = model.config("point")
        x = torch.zeros((1, 2, *cfg.patch_size), device=model.device)
        before = rss_mb()
        model.prompt_model("point").networks[0](x)
    else:
        seg.set_image(img)
        before = rss_mb()
        seg.segment(points={1: point})
    return {"peak_above_mb": peak_mb() - before}


def measure_memory(ckpt: str, device: str) -> dict:
    out = {}
    for mode in ("forward", "click_full", "click_crop"):
        r = subprocess.run([sys.executable, __file__, "--child", mode, "--ckpt", ckpt, "--device", device],
                           capture_output=True, text=True, timeout=3000)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-2000:])
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])["peak_above_mb"]
    return out


def whole_scan_preprocessing(img, config) -> tuple[float, float]:
    """What the published pipeline does before every prompt: normalise and resample the whole scan."""
    import torch
    import torch.nn.functional as F

    from LesionLocatorLib.model.preprocessing import nonzero_bbox, normalize_ct
    from LesionLocatorLib.model.resampling import resampled_shape

    t0 = time.perf_counter()
    crop = nonzero_bbox(img.array)
    data = normalize_ct(img.array[tuple(slice(a, b) for a, b in crop)], config.ct_stats)
    shape = resampled_shape(data.shape, img.spacing, config.spacing)
    out = F.interpolate(torch.from_numpy(data)[None, None], shape, mode="trilinear", align_corners=False)
    return time.perf_counter() - t0, out.numel() * 4 / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clicks", type=int, default=3, help="warm clicks after the first")
    ap.add_argument("--arch", choices=sorted(ARCH), default="published")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-process memory measurements")
    ap.add_argument("--child")
    ap.add_argument("--ckpt")
    ap.add_argument("--real-lesions", action="store_true", help="growth on/off on ../shared/data's real lesions")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 2.0],
                    help="with --real-lesions: voxel-spacing factors (2: lesions 8x the volume)")
    ap.add_argument("--checkpoint", default=None, help="with --real-lesions: model (default: the bundled one)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="with --real-lesions: write the rows here")
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.ckpt, args.device)))
        return
    if args.real_lesions:
        real_lesions(args)
        return
    import torch

    from LesionLocatorLib.model.engine import LesionLocatorModel
    from LesionLocatorLib.model.tiny_model import write_random_checkpoint

    tmp = tempfile.mkdtemp(prefix="ll_bench_")
    ckpt = str(write_random_checkpoint(tmp, kinds=("point",), **ARCH[args.arch]))
    model = LesionLocatorModel(ckpt, device=args.device)
    seg = model.session()
    if model.device.type == "cuda":
        model.warmup("point")
    img, source = load_image()
    print(f"image: {source}, shape {img.shape}, spacing {tuple(round(s, 3) for s in img.spacing)}")
    print(f"device: {model.device} ({torch.cuda.get_device_name() if model.device.type == 'cuda' else os.cpu_count()} "
          f"{'' if model.device.type == 'cuda' else 'CPU cores'}), torch {torch.__version__}, arch {args.arch}, "
          f"patch {model.config('point').patch_size}")

    def sync():
        if model.device.type == "cuda":
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    seg.set_image(img)
    t_set = time.perf_counter() - t0
    clicks = []
    points = [NODULE] + [(NODULE[0] + 3 * k, NODULE[1] - 4 * k, NODULE[2] + 5 * k) for k in range(1, args.clicks + 1)]
    for p in points:
        t0 = time.perf_counter()
        seg.segment(points={1: p})
        sync()
        clicks.append(time.perf_counter() - t0)
    cfg = model.config("point")
    x = torch.zeros((1, 2, *cfg.patch_size), device=model.device)
    net = model.prompt_model("point").networks[0]
    from LesionLocatorLib.model import devices

    with torch.inference_mode(), devices.autocast(model.device):
        net(x)
        sync()
        t0 = time.perf_counter()
        net(x)
        sync()
    t_net = time.perf_counter() - t0
    t_whole, whole_mb = whole_scan_preprocessing(img, cfg)
    warm = float(np.median(clicks[1:])) if len(clicks) > 1 else float("nan")
    print(f"set_image:                         {1000 * t_set:9.1f} ms")
    print(f"first click (end to end):          {1000 * clicks[0]:9.1f} ms")
    print(f"warm click, median of {len(clicks) - 1} (end to end): {1000 * warm:9.1f} ms")
    print(f"network forward alone:             {1000 * t_net:9.1f} ms  -> click overhead {1000 * (warm - t_net):.1f} ms")
    print(f"published whole-scan preprocessing: {1000 * t_whole:9.1f} ms ({whole_mb:.0f} MB array) per prompt")
    print(f"ratio whole-scan preprocessing / our warm click: {t_whole / warm:.2f}x "
          f"(published per-prompt cost = preprocessing + network = {(t_whole + t_net) / warm:.2f}x our click)")
    if not args.no_memory:
        mem = measure_memory(ckpt, args.device)
        print(f"peak memory of the forward pass alone:       {mem['forward']:8.0f} MB")
        print(f"peak memory of a click on the full scan:     {mem['click_full']:8.0f} MB "
              f"(beyond the forward: {mem['click_full'] - mem['forward']:.0f} MB)")
        print(f"peak memory of a click on a 96^3 crop:       {mem['click_crop']:8.0f} MB "
              f"(beyond the forward: {mem['click_crop'] - mem['forward']:.0f} MB)")


def real_lesions(args) -> None:
    """One click and one box per real lesion, growth off and on (see the module docstring)."""
    import torch

    from LesionLocatorLib.core.geometry import Volume
    from LesionLocatorLib.core.image_io import read_image
    from LesionLocatorLib.model.engine import LesionLocatorModel

    torch.set_num_threads(args.threads)
    data = REPO.parent / "shared" / "data"
    cases = json.loads((data / "cases.json").read_text(encoding="utf-8"))
    model = LesionLocatorModel(args.checkpoint, device=args.device)
    print(f"model: {args.checkpoint or 'bundled'}, patch {model.config('point').patch_size} at "
          f"{model.config('point').spacing} mm, device {model.device}, {args.threads} thread(s)")
    print(f"{'lesion':<24} {'x':>3} {'ml':>5} {'prompt':<6} {'Dice off':>8} {'Dice on':>8} {'tiles':>5} "
          f"{'stop':<11} {'s off':>6} {'s on':>6}")
    rows = []
    for scale in args.scales:
        for name, case in cases.items():
            folder = next(p for p in data.iterdir() if (p / case["image"]).exists())
            img = read_image(folder / case["image"])
            img = Volume(img.array, tuple(s * scale for s in img.spacing), img.origin, img.direction)
            labels = read_image(folder / case["lesions"]).array
            for lid, det in case["lesions_detail"].items():
                truth = labels == int(lid)
                ml = float(truth.sum() * np.prod(img.spacing) / 1000)
                for kind in ("point", "box"):
                    row = {"lesion": f"{name}#{lid}", "scale": scale, "ml": round(ml, 1), "prompt": kind}
                    for grow in (False, True):
                        s = model.session(grow=grow)
                        s.set_image(img)
                        t0 = time.perf_counter()
                        r = s.segment(points={1: det["point"]}) if kind == "point" else s.segment(boxes={1: det["box"]})
                        dt = time.perf_counter() - t0
                        mask = r.mask(1).astype(bool)
                        d = s.last_debug[1]
                        key = "on" if grow else "off"
                        overlap = 2 * (mask & truth).sum() / max(mask.sum() + truth.sum(), 1)
                        row[f"dice_{key}"] = round(float(overlap), 3)
                        row[f"seconds_{key}"] = round(dt, 2)
                        row[f"tiles_{key}"] = d.tiles
                        row[f"ml_{key}"] = round(float(mask.sum() * np.prod(img.spacing) / 1000), 1)
                        row["stop"] = d.growth_stop
                    rows.append(row)
                    print(f"{row['lesion']:<24} {scale:>3g} {ml:>5.0f} {kind:<6} {row['dice_off']:>8.3f} "
                          f"{row['dice_on']:>8.3f} {row['tiles_on']:>5} {row['stop']:<11} {row['seconds_off']:>6.2f} "
                          f"{row['seconds_on']:>6.2f}", flush=True)
    for scale in args.scales:
        for kind in ("point", "box"):
            sel = [r for r in rows if r["scale"] == scale and r["prompt"] == kind]
            if sel:
                grew = sum(r["tiles_on"] > r["tiles_off"] for r in sel)
                print(f"mean Dice x{scale:g} {kind}: off {np.mean([r['dice_off'] for r in sel]):.3f}, "
                      f"on {np.mean([r['dice_on'] for r in sel]):.3f} ({grew}/{len(sel)} grew)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
