"""Train, evaluate and package the small bundled default model (``LesionLocatorLib/default_model``).

    python -m train default-model --work /tmp/ll_default --data ../shared/data        # all stages
    python -m train default-model --work /tmp/ll_default --stage evaluate              # re-evaluate only
    python -m train default-model --work /tmp/ll_default --final-phase 2               # + the 16 cm phase

Phase 1 (the default, the shipped model): a 80 x 72 x 72 mm patch at 2.5 x 1.5 x 1.5 mm, lesions of 6-80 mm.
Phase 2 (``--final-phase 2``, experimental, not shipped: see the model card for what it measured): every
phase-1 weight fine-tuned at a 96 x 160 x 160 mm field of view (32 x 80 x 80 at 3 x 2 x 2 mm) on lesions up
to 15 cm with heterogeneous densities.

Stages:
1. ``train``: one small promptable ResEnc UNet trained with this project's segmentation trainer
   (``train.trainer_segment``) on lesions pasted into the real CTs of ``<data>`` (``train/lesion_paste.py``),
   phantoms (``LesionLocatorLib.synthetic.phantom``) and the real DeepLesion lesions of ``<data>/cases.json``, prompts
   mixed (point or box per sample). The held-out STS images are never used, not even as backgrounds.
2. ``export``: the final weights (stored as float16) into the published layout
   ``<output>/LesionLocatorCheckpoint/LesionLocatorSeg/{point_optimized,bbox_optimized}/`` - the same
   network in both folders (one model trained with both prompt types).
3. ``evaluate``: ``LesionLocatorModel`` sessions on the exported package, on held-out real lesions
   (STS) and held-out phantoms, with point prompts (the centroid point of cases.json and random interior
   points) and box prompts, against the region-growing baseline of ``train/baseline.py`` on the same
   prompts; Dice and NSD (2 mm); written to ``<output>/evaluation.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from LesionLocatorLib.model.checkpoint import write_checkpoint
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import read_image
from LesionLocatorLib.measure.metrics import dice, normalized_surface_dice
from LesionLocatorLib.synthetic.phantom import make_phantom
from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans

from . import data as D
from .baseline import region_grow
from .trainer_segment import SegmentConfig, SegmentTrainer, half_weights

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "LesionLocatorLib" / "default_model"
TRAIN_DATASETS = ("deeplesion",)  # real cases used for training
EVAL_DATASETS = ("sts",)  # real cases held out for evaluation

# Phase 2's plans: a 96 x 160 x 160 mm field of view (lesions up to ~15 cm fit in-plane) on a coarse grid, so
# one click costs about half a second on a CPU. Phase 2 is initialised with every phase-1 weight (the network
# does not depend on the patch) and trained on lesions up to 15 cm, which phase 1 never saw filling its patch.
PATCH = (32, 80, 80)
SPACING = (3.0, 2.0, 2.0)
FEATURES = (8, 16, 32, 64, 64)
BLOCKS = (1, 1, 2, 2, 2)
# Phase 1 (the shipped model): a fine grid and a small patch.
PHASE1_PATCH = (32, 48, 48)
PHASE1_SPACING = (2.5, 1.5, 1.5)
PHASE1_DIAMETER_MM = (6.0, 80.0)
PHASE1_CROP_MM = (200.0, 260.0, 260.0)
PHASE1_EPOCHS = 85
DIAMETER_MM = (6.0, 150.0)
CROP_MM = (240.0, 330.0, 330.0)
HETEROGENEITY_HU = 35.0  # phase 2: heterogeneous masses (lesion_paste.paste_lesions); phase 1 had none
# Training data: lesions pasted into the real CTs of <data> (train/lesion_paste.py, log-uniform diameters, so
# lesions of every size appear at their true scale), phantoms, and the real DeepLesion lesions.
N_PASTED = 48
PASTE_BACKGROUNDS = ("lidc0314/LIDC-IDRI-0314_ct.nii.gz", "totalseg_example/example_ct.nii.gz")
WEIGHTS = {"paste": 0.7, "phantom": 0.15, "deeplesion": 0.15}
# Zoom augmentation (reading patch x s voxels; s < 1 magnifies) around the true scale.
SCALE_RANGE = (0.75, 1.3)
MIN_LESION_VOXELS = 20  # ~6 mm lesions and up on the phase-1 grid
LR = 1e-2
PHASE2_LR = 5e-3  # fine-tuning from phase 1
AUGMENT_PROB = 0.2


def default_plans(patch: Sequence[int] = PATCH, spacing: Sequence[float] = SPACING) -> dict:
    return make_plans(patch, spacing, FEATURES, BLOCKS, "torch", dataset_name="LesionLocatorSegDefaultSmall")


def _dataset_of(case_id: str, image: str) -> str:
    return "sts" if case_id.startswith("STS") else "deeplesion" if "_" in case_id and case_id[0].isdigit() else "other"


def real_cases(data_root: Path) -> list[dict]:
    """Labelled real cases of ``cases.json`` as {dataset, name, image, labels, lesions}; none without it."""
    if not (data_root / "cases.json").is_file():
        return []
    meta = json.loads((data_root / "cases.json").read_text(encoding="utf-8"))
    folders = {"sts": "sts", "deeplesion": "deeplesion"}
    out = []
    for cid, m in meta.items():
        ds = _dataset_of(cid, m["image"])
        if ds not in folders:
            continue
        d = data_root / folders[ds]
        out.append({"dataset": ds, "name": cid, "image": d / m["image"], "labels": d / m["lesions"],
                    "lesions": m.get("lesions_detail", {})})
    return out


# ----------------------------------------------------------------------------------------------------------
def paste_backgrounds(data_root: Path) -> list[tuple[Path, Path | None]]:
    """Real CTs to paste lesions into: the lesion-free ones plus the DeepLesion training cases (their real
    lesions kept). Held-out (STS) images are never used."""
    out: list[tuple[Path, Path | None]] = [(data_root / p, None) for p in PASTE_BACKGROUNDS
                                           if (data_root / p).is_file()]
    out += [(Path(c["image"]), Path(c["labels"])) for c in real_cases(data_root) if c["dataset"] in TRAIN_DATASETS]
    return out


def training_cases(work: Path, data_root: Path, config, phantoms: int, pasted: int, seed: int,
                   diameter_mm: tuple[float, float] = DIAMETER_MM, crop_mm: Sequence[float] = CROP_MM,
                   heterogeneity_hu: float = HETEROGENEITY_HU) -> tuple[list[D.Case], list[D.Case]]:
    """(training cases, validation cases): pasted lesions, phantoms and the real DeepLesion lesions; the
    validation cases are pasted and phantom cases from other seeds."""
    from .lesion_paste import pasted_cases

    cache = work / "preprocessed"
    reals = [c for c in real_cases(data_root) if c["dataset"] in TRAIN_DATASETS]
    backgrounds = paste_backgrounds(data_root)
    train_cases = D.load_case_files(reals, config, cache)
    train_cases += D.phantom_cases(phantoms, config, cache, seed=seed)
    paste_kw = {"crop_mm": crop_mm, "diameter_mm": diameter_mm, "heterogeneity_hu": heterogeneity_hu}
    if pasted and backgrounds:
        train_cases += pasted_cases(backgrounds, pasted, config, cache, seed=seed, **paste_kw)
    val_cases = D.phantom_cases(2, config, cache, seed=seed + 100003, dataset="phantom_val")
    if backgrounds:
        val_cases += pasted_cases(backgrounds, 4, config, cache, seed=seed + 100003, dataset="paste_val", **paste_kw)
    return train_cases, val_cases


def _train_phase(folder: Path, plans: dict, data_root: Path, epochs: int, iters: int, phantoms: int, seed: int,
                 batch_size: int, resume: bool, pasted: int, lr: float, diameter_mm: tuple[float, float],
                 crop_mm: Sequence[float], heterogeneity_hu: float, init: Path | None) -> Path:
    config = config_from_dicts(plans, make_dataset_json())
    train_cases, val_cases = training_cases(folder.parent, data_root, config, phantoms, pasted, seed, diameter_mm,
                                            crop_mm, heterogeneity_hu)
    present = {c.dataset for c in train_cases}
    weights = {k: v for k, v in WEIGHTS.items() if k in present}
    cfg = SegmentConfig(output=folder, plans=plans, prompt="mixed", epochs=epochs, iters_per_epoch=iters,
                        val_samples=16, batch_size=batch_size, lr=lr, seed=seed, device="cpu", max_offset=0.15,
                        scale_range=SCALE_RANGE, augment_prob=AUGMENT_PROB, weighting=weights,
                        min_lesion_voxels=MIN_LESION_VOXELS, fp16_weights=True,
                        init=None if init is None else str(init), init_whole=True)
    trainer = SegmentTrainer(cfg, train_cases, val_cases)
    print(f"{folder.name}: {len(train_cases)} training cases, {trainer.sampler.n_lesions} lesions; weights {weights}",
          flush=True)
    if resume and trainer.try_resume():
        print(f"resumed at epoch {trainer.start_epoch}", flush=True)
    final = trainer.run()
    assert final is not None
    return final


def model_dir(work: Path, final_phase: int) -> Path:
    return work / ("phase1" if final_phase == 1 else "model")


def train(work: Path, data_root: Path, epochs: int, iters: int, phantoms: int, seed: int, batch_size: int,
          resume: bool, pasted: int = N_PASTED, phase1_epochs: int = PHASE1_EPOCHS, final_phase: int = 1) -> Path:
    """Phase 1 into ``work/phase1`` (skipped when its ``fold_0/checkpoint_final.pth`` exists); with
    ``final_phase=2``, phase 2 into ``work/model`` initialised with every phase-1 weight."""
    phase1 = model_dir(work, 1)
    final1 = phase1 / "fold_0" / "checkpoint_final.pth"
    if not final1.is_file():
        final1 = _train_phase(phase1, default_plans(PHASE1_PATCH, PHASE1_SPACING), data_root, phase1_epochs, iters,
                              phantoms, seed, batch_size, resume, pasted, LR, PHASE1_DIAMETER_MM, PHASE1_CROP_MM, 0.0,
                              None)
    if final_phase == 1:
        return final1
    init = None if (resume and (work / "model" / "fold_0" / "checkpoint_latest.pth").is_file()) else phase1
    return _train_phase(work / "model", default_plans(), data_root, epochs, iters, phantoms, seed, batch_size, resume,
                        pasted, PHASE2_LR, DIAMETER_MM, CROP_MM, HETEROGENEITY_HU, init)


def export(work: Path, output: Path, final_phase: int = 1) -> list[Path]:
    """Copy the trained model into the package layout (float16 weights, no optimizer state)."""
    model = model_dir(work, final_phase)
    src = model / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    plans = json.loads((model / "plans.json").read_text())
    weights = half_weights(ckpt["network_weights"])
    root = output / "LesionLocatorCheckpoint" / "LesionLocatorSeg"
    paths = []
    for sub in ("point_optimized", "bbox_optimized"):
        if (root / sub).exists():
            shutil.rmtree(root / sub)
        paths.append(write_checkpoint(root / sub, plans, make_dataset_json(), 0, weights,
                                      "LesionLocatorTrainerSegment", (0, 1, 2),
                                      extra={"current_epoch": ckpt.get("current_epoch"),
                                             "train_config": ckpt.get("train_config", {})}))
    for name in ("training_log_phase2.jsonl", "training_progress_phase2.png", "evaluation_phase1.json"):
        (output / name).unlink(missing_ok=True)  # files of the previous two-phase model
    if (model / "fold_0" / "training_log.jsonl").is_file():
        shutil.copy(model / "fold_0" / "training_log.jsonl", output / "training_log.jsonl")
    if (model / "fold_0" / "progress.png").is_file():
        shutil.copy(model / "fold_0" / "progress.png", output / "training_progress.png")
    return paths


# ----------------------------------------------------------------------------------------------------------
def _interior_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> list[list[int]]:
    """Random lesion voxels at least 2 voxels from the boundary (a user clicks inside, not on the edge)."""
    from scipy import ndimage

    inner = ndimage.binary_erosion(mask, iterations=2)
    pts = np.argwhere(inner if inner.any() else mask)
    return [[int(v) for v in pts[int(i)]] for i in rng.choice(len(pts), size=min(n, len(pts)), replace=False)]


def _score(pred: np.ndarray, gt: np.ndarray, spacing) -> dict[str, float]:
    return {"dice": dice(pred, gt), "nsd2mm": normalized_surface_dice(pred, gt, spacing, 2.0)}


def evaluate(package: Path, data_root: Path, seed: int = 0, n_random_points: int = 4, n_phantoms: int = 3,
             include_training_cases: bool = True, scaled: bool = True) -> dict[str, Any]:
    """Dice / NSD of the packaged model and the region-growing baseline on the same prompts."""
    from LesionLocatorLib.model.engine import LesionLocatorModel

    model = LesionLocatorModel(package, device="cpu", tta=False)
    seg = model.session()
    # mirroring TTA (8 passes; off by default in the CLI) reported alongside, on the same prompts and weights
    seg_tta = model.session(tta=True)
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    items: list[tuple[str, str, Any, np.ndarray, dict]] = []  # (group, name, image Volume, labels, details)
    for c in real_cases(data_root):
        held_out = c["dataset"] in EVAL_DATASETS
        if not held_out and not include_training_cases:
            continue
        group = f"real_{c['dataset']}_" + ("heldout" if held_out else "seen_in_training")
        img = read_image(c["image"])
        lab = read_image(c["labels"]).array
        items.append((group, c["name"], img, lab, c["lesions"]))
        if held_out and scaled:
            # the same real lesion at twice its size (every spacing doubled: 8x the volume), for lesions larger
            # than the small patches and fields of view; same voxels, same prompts
            big = Volume(img.array, tuple(2.0 * s for s in img.spacing), img.origin, img.direction)
            items.append((group + "_x2", c["name"] + "_x2", big, lab, c["lesions"]))
    for i in range(n_phantoms):
        # seeds disjoint from the training (seed, i, 4242) and validation phantoms
        ct, lab = make_phantom((64, 128, 128), (2.0, 1.5, 1.5), n_lesions=3, seed=900000 + seed * 100 + i)
        items.append(("phantom_heldout", f"phantom_eval_{i}", ct, lab.array, {}))
    for group, name, img, lab, details in items:
        seg.set_image(img)
        seg_tta.set_image(img)
        for lid in [int(v) for v in np.unique(lab) if v != 0]:
            gt = lab == lid
            idx = np.argwhere(gt)
            det = details.get(str(lid), {})
            centre = det.get("point") or [int(v) for v in idx[np.argmin(((idx - idx.mean(0)) ** 2).sum(1))]]
            box = det.get("box") or [int(v) for a in range(3) for v in (idx[:, a].min(), idx[:, a].max() + 1)]
            prompts = [("point_centroid", {"point": centre})]
            prompts += [(f"point_random{k}", {"point": p}) for k, p in enumerate(_interior_points(gt, n_random_points,
                                                                                               rng))]
            prompts.append(("box", {"box": box}))
            for pname, pr in prompts:
                kw = {"points": {1: pr["point"]}} if "point" in pr else {"boxes": {1: pr["box"]}}
                t0 = time.perf_counter()
                res = seg.segment(**kw)
                dt = time.perf_counter() - t0
                dbg = seg.last_debug.get(1)
                pred = res.lesions[1].full(img.shape).astype(bool)
                pred_tta = seg_tta.segment(**kw).lesions[1].full(img.shape).astype(bool)
                base = region_grow(img, seed_zyx=pr.get("point"), box=pr.get("box"))
                rec = {"group": group, "case": name, "lesion": lid, "prompt": pname,
                       "gt_voxels": int(gt.sum()), "gt_ml": round(float(gt.sum() * np.prod(img.spacing)) / 1000, 2),
                       "seconds": round(dt, 3), "grown": bool(dbg and dbg.grown), "tiles": dbg.tiles if dbg else 0,
                       "model": _score(pred, gt, img.spacing), "model_tta": _score(pred_tta, gt, img.spacing),
                       "baseline": _score(base, gt, img.spacing)}
                records.append(rec)
                print(json.dumps(rec), flush=True)
    summary: dict[str, Any] = {}
    for group in sorted({r["group"] for r in records}):
        for kind in ("point", "box"):
            rs = [r for r in records if r["group"] == group and r["prompt"].startswith(kind)]
            if not rs:
                continue
            summary[f"{group}/{kind}"] = {
                "n_prompts": len(rs), "n_lesions": len({(r["case"], r["lesion"]) for r in rs}),
                **{f"{who}_{m}": float(np.mean([r[who][m] for r in rs]))
                   for who in ("model", "model_tta", "baseline") for m in ("dice", "nsd2mm")},
                "seconds_per_prompt": float(np.mean([r["seconds"] for r in rs])),
            }
    return {"summary": summary, "per_lesion": per_lesion(records), "by_size": by_size(records),
            "records": records, "torch_threads": torch.get_num_threads()}


SIZE_BINS_ML = ((0.0, 5.0), (5.0, 30.0), (30.0, 100.0), (100.0, float("inf")))


def _means(rs: Sequence[dict], kind: str) -> dict[str, float]:
    rs = [r for r in rs if r["prompt"].startswith(kind)]
    return {f"{kind}_{who}_dice": round(float(np.mean([r[who]["dice"] for r in rs])), 3)
            for who in ("model", "baseline")} if rs else {}


def per_lesion(records: Sequence[dict]) -> list[dict]:
    """One row per lesion: its volume, mean point / box Dice of the model and the baseline, growth."""
    rows = []
    for key in sorted({(r["group"], r["case"], r["lesion"]) for r in records}):
        rs = [r for r in records if (r["group"], r["case"], r["lesion"]) == key]
        rows.append({"group": key[0], "case": key[1], "lesion": key[2], "gt_ml": rs[0]["gt_ml"],
                     **_means(rs, "point"), **_means(rs, "box"),
                     "grown_prompts": sum(r["grown"] for r in rs), "max_tiles": max(r["tiles"] for r in rs)})
    return rows


def by_size(records: Sequence[dict]) -> list[dict]:
    """Mean Dice per (group, lesion-volume bin) over every prompt of that bin."""
    rows = []
    for group in sorted({r["group"] for r in records}):
        for lo, hi in SIZE_BINS_ML:
            rs = [r for r in records if r["group"] == group and lo <= r["gt_ml"] < hi]
            if rs:
                rows.append({"group": group, "ml": f"{lo:g}-{hi:g}", "n_lesions": len({(r["case"], r["lesion"])
                                                                                       for r in rs}),
                             **_means(rs, "point"), **_means(rs, "box")})
    return rows


def evaluation_tables(result: dict[str, Any]) -> str:
    """Markdown tables of an ``evaluate`` result (for the model card): by group, per lesion, by size."""
    lines = ["| lesions | prompt | n prompts | model Dice | model NSD | model + TTA Dice | baseline Dice "
             "| baseline NSD |", "|---|---|---|---|---|---|---|---|"]
    for key, v in result["summary"].items():
        group, kind = key.split("/")
        lines.append(f"| {group} ({v['n_lesions']}) | {kind} | {v['n_prompts']} | {v['model_dice']:.3f} | "
                     f"{v['model_nsd2mm']:.3f} | {v['model_tta_dice']:.3f} | {v['baseline_dice']:.3f} | "
                     f"{v['baseline_nsd2mm']:.3f} |")
    lines += ["", "| lesion | group | ml | point: model | point: baseline | box: model | box: baseline | prompts grown "
                  "(max tiles) |", "|---|---|---|---|---|---|---|---|"]
    for r in result["per_lesion"]:
        lines.append(f"| {r['case']} #{r['lesion']} | {r['group']} | {r['gt_ml']:.1f} | "
                     f"{r.get('point_model_dice', '')} | {r.get('point_baseline_dice', '')} | "
                     f"{r.get('box_model_dice', '')} | {r.get('box_baseline_dice', '')} | "
                     f"{r['grown_prompts']} ({r['max_tiles']}) |")
    lines += ["", "| group | ml | lesions | point: model | point: baseline | box: model | box: baseline |",
              "|---|---|---|---|---|---|---|"]
    for r in result["by_size"]:
        lines.append(f"| {r['group']} | {r['ml']} | {r['n_lesions']} | {r.get('point_model_dice', '')} | "
                     f"{r.get('point_baseline_dice', '')} | {r.get('box_model_dice', '')} | "
                     f"{r.get('box_baseline_dice', '')} |")
    return "\n".join(lines) + "\n"


def evaluate_tracking(package: Path, data_root: Path, seed: int = 0, n_phantoms: int = 2) -> dict[str, Any]:
    """Tracking with the packaged model (classical propagation) into synthetic follow-ups of the held-out
    real cases and of held-out phantoms (``LesionLocatorLib.synthetic.longitudinal.make_followup``: lesion growth or
    shrinkage, a 6 mm shift, a smooth 2 mm deformation). The baseline mask given is the ground truth, so the
    figures isolate tracking. Compared in the same run: ``refine="segment"`` (the model re-segments each
    lesion from its propagated mask; the shipped default) against ``refine="none"`` (the warped mask)."""
    from LesionLocatorLib.synthetic.longitudinal import make_followup
    from LesionLocatorLib.model.engine import LesionLocatorModel

    items = []
    for c in real_cases(data_root):
        if c["dataset"] in EVAL_DATASETS:
            items.append(("real_" + c["dataset"] + "_heldout", c["name"], read_image(c["image"]),
                          read_image(c["labels"])))
    for i in range(n_phantoms):
        ct, lab = make_phantom((64, 128, 128), (2.0, 1.5, 1.5), n_lesions=3, seed=910000 + seed * 100 + i)
        items.append(("phantom_heldout", f"phantom_track_{i}", ct, lab))
    model = LesionLocatorModel(package, device="cpu")
    trackers = {r: model.tracker(propagation="classical", refine=r) for r in ("segment", "none")}
    rng = np.random.default_rng(seed + 17)
    records = []
    for group, name, img, lab in items:
        ids = [int(v) for v in np.unique(lab.array) if v]
        growth = {lid: float(rng.choice([-22.0, -18.0, 15.0, 25.0])) for lid in ids}
        fu, fu_lab, _ = make_followup(img, lab.with_array(lab.array.astype(np.uint16)), seed=int(rng.integers(1e6)),
                                      shift_mm=(6.0, -4.0, 3.0), smooth_deformation_mm=2.0, growth=growth)
        for refine, tracker in trackers.items():
            t0 = time.perf_counter()
            tracker.set_images(img, [fu])
            res = tracker.track(lab.array.astype(np.uint16)).followups[0]
            dt = time.perf_counter() - t0
            for lid in ids:
                gt = fu_lab.array == lid
                pred = res.lesions[lid].full(fu.shape).astype(bool) if lid in res.lesions else np.zeros_like(gt)
                rec = {"group": group, "case": name, "lesion": lid, "refine": refine, "growth": growth[lid],
                       "status": res.lesions[lid].status if lid in res.lesions else "missing",
                       "gt_voxels": int(gt.sum()), "seconds_per_case": round(dt, 2),
                       **_score(pred, gt, fu.spacing)}
                records.append(rec)
                print(json.dumps(rec), flush=True)
    summary: dict[str, Any] = {}
    for group in sorted({r["group"] for r in records}):
        for refine in trackers:
            rs = [r for r in records if r["group"] == group and r["refine"] == refine and r["gt_voxels"] > 0]
            if rs:
                summary[f"{group}/refine_{refine}"] = {
                    "n_lesions": len(rs), "dice": float(np.mean([r["dice"] for r in rs])),
                    "nsd2mm": float(np.mean([r["nsd2mm"] for r in rs]))}
    return {"summary": summary, "records": records}


# ----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (cache, full checkpoints, logs)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data",
                        help="folder with cases.json (real CTs)")
    parser.add_argument("--output", type=Path, default=PACKAGE_DIR, help="package folder to write")
    parser.add_argument("--stage", choices=("all", "train", "export", "evaluate"), default="all")
    parser.add_argument("--phase1-epochs", type=int, default=PHASE1_EPOCHS)
    parser.add_argument("--final-phase", type=int, choices=(1, 2), default=1,
                        help="1: the shipped model; 2: also the experimental 16 cm phase, exported instead")
    parser.add_argument("--epochs", type=int, default=36, help="phase-2 epochs")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--phantoms", type=int, default=20)
    parser.add_argument("--pasted", type=int, default=N_PASTED, help="cases with lesions pasted into real CTs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume", action="store_true")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    if not (args.data / "cases.json").is_file():
        print(f"default-model: error: {args.data / 'cases.json'} not found", file=sys.stderr)
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if args.stage in ("all", "train"):
        train(args.work, args.data, args.epochs, args.iters, args.phantoms, args.seed, args.batch_size, args.resume,
              args.pasted, args.phase1_epochs, args.final_phase)
        print(f"training took {time.time() - t0:.0f} s", flush=True)
    if args.stage in ("all", "export"):
        args.output.mkdir(parents=True, exist_ok=True)
        for p in export(args.work, args.output, args.final_phase):
            print(f"exported {p} ({p.stat().st_size / 1e6:.2f} MB)")
    if args.stage in ("all", "evaluate"):
        result = evaluate(args.output / "LesionLocatorCheckpoint", args.data, args.seed)
        result["tracking"] = evaluate_tracking(args.output / "LesionLocatorCheckpoint", args.data, args.seed)
        result["command"] = "python -m train default-model " + " ".join(sys.argv[2:])
        (args.output / "evaluation.json").write_text(json.dumps(result, indent=1))
        (args.output / "evaluation.md").write_text(evaluation_tables(result), encoding="utf-8")
        print(json.dumps({"segmentation": result["summary"], "tracking": result["tracking"]["summary"]}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train default-model", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
