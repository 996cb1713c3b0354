"""train.make_default_model + LesionLocatorLib.model.bundled: plans, split, export layout, the bundled package."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import DATA, require
from LesionLocatorLib.model import bundled
from LesionLocatorLib.model.checkpoint import write_checkpoint
from LesionLocatorLib.model.network import build_network
from LesionLocatorLib.synthetic.phantom import lesion_prompts, make_phantom
from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json
from LesionLocatorLib.model.engine import LesionLocatorModel
from train import make_default_model as M


@pytest.mark.parametrize("phase", [1, 2])
def test_default_plans_are_valid_and_small(phase):
    plans = M.default_plans() if phase == 2 else M.default_plans(M.PHASE1_PATCH, M.PHASE1_SPACING)
    cfg = config_from_dicts(plans, make_dataset_json())
    n = len(cfg.arch_kwargs["features_per_stage"])
    assert all(p % 2 ** (n - 1) == 0 for p in cfg.patch_size)
    net = build_network(cfg, 2)
    assert sum(p.numel() for p in net.parameters()) < 3_000_000


def test_real_split_holds_out_sts():
    require(DATA / "cases.json")
    cases = M.real_cases(DATA)
    train = {c["name"] for c in cases if c["dataset"] in M.TRAIN_DATASETS}
    held = {c["name"] for c in cases if c["dataset"] in M.EVAL_DATASETS}
    assert held == {"STS_002", "STS_003"}
    assert train and not (train & held)


def test_export_writes_both_models_fp16(tmp_path):
    work = tmp_path / "work"
    plans = M.default_plans()
    net = build_network(config_from_dicts(plans, make_dataset_json()), 2)
    write_checkpoint(work / "phase1", plans, make_dataset_json(), 0, net.state_dict())
    (work / "phase1" / "fold_0" / "training_log.jsonl").write_text('{"epoch": 0}\n')
    paths = M.export(work, tmp_path / "pkg")
    assert [p.parent.parent.name for p in paths] == ["point_optimized", "bbox_optimized"]
    ck = torch.load(paths[0], map_location="cpu", weights_only=False)
    assert all(v.dtype == torch.float16 for v in ck["network_weights"].values() if v.is_floating_point())
    model = LesionLocatorModel(tmp_path / "pkg" / "LesionLocatorCheckpoint", device="cpu")
    assert model.kinds == ["point", "box"]


def test_missing_bundle_raises_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(bundled, "DEFAULT_MODEL_DIR", tmp_path)
    with pytest.raises(bundled.BundledModelMissing, match="default model is not installed"):
        bundled.default_checkpoint()
    assert issubclass(bundled.BundledModelMissing, OSError)


def test_bundled_model_segments_a_phantom_quickly():
    try:
        root = bundled.default_checkpoint()
    except bundled.BundledModelMissing:
        pytest.skip("bundled default model not built in this checkout")
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 20e6
    seg = LesionLocatorModel(root, device="cpu").session()
    ct, lab = make_phantom((64, 128, 128), (2.0, 1.5, 1.5), n_lesions=2, seed=424242)
    seg.set_image(ct)
    pr = lesion_prompts(lab)
    res = seg.segment(points={1: pr[1]["point"]}, boxes={2: pr[2]["box"]})
    assert set(res.lesions) == {1, 2}
    assert all(les.voxels > 0 for les in res.lesions.values())
    card = bundled.model_card()
    assert card.is_file() and "Dice" in card.read_text(encoding="utf-8")


def test_paste_backgrounds_never_use_held_out_images():
    require(DATA / "cases.json")
    bgs = M.paste_backgrounds(DATA)
    assert bgs, "expected the lesion-free CTs and the DeepLesion cases as backgrounds"
    names = " ".join(str(p) for b in bgs for p in b if p is not None)
    assert "STS" not in names
    assert all(p.is_file() for b in bgs for p in b if p is not None)


def test_evaluate_tracking_scores_refined_and_warped_masks(tmp_path):
    from LesionLocatorLib.model.tiny_model import write_random_checkpoint

    root = write_random_checkpoint(tmp_path / "ck", spacing=(2.0, 1.5, 1.5)) / "LesionLocatorCheckpoint"
    out = M.evaluate_tracking(root, tmp_path / "no_data", seed=0, n_phantoms=1)
    recs = out["records"]
    assert {r["refine"] for r in recs} == {"segment", "none"}
    assert {(r["case"], r["lesion"]) for r in recs} == {("phantom_track_0", i) for i in (1, 2, 3)}
    assert all(0.0 <= r["dice"] <= 1.0 for r in recs)
    # the warped ground-truth mask of a mildly shifted/deformed follow-up overlaps its truth well
    warped = out["summary"]["phantom_heldout/refine_none"]
    assert warped["n_lesions"] == 3 and warped["dice"] > 0.6


def test_evaluate_scores_model_tta_and_baseline_on_the_same_prompts(tmp_path):
    from LesionLocatorLib.model.tiny_model import write_random_checkpoint

    root = write_random_checkpoint(tmp_path / "ck", spacing=(2.0, 1.5, 1.5)) / "LesionLocatorCheckpoint"
    out = M.evaluate(root, tmp_path / "no_data", seed=0, n_random_points=1, n_phantoms=1)
    recs = out["records"]
    assert {r["prompt"] for r in recs} == {"point_centroid", "point_random0", "box"}
    assert all(set(r) >= {"model", "model_tta", "baseline"} for r in recs)
    summ = out["summary"]
    assert set(summ) == {"phantom_heldout/point", "phantom_heldout/box"}
    # one row per lesion (its volume, mean point / box Dice of model and baseline), and rows by volume bin
    rows = out["per_lesion"]
    assert {(r["case"], r["lesion"]) for r in rows} == {(r["case"], r["lesion"]) for r in recs}
    for row in rows:
        mine = [r for r in recs if (r["case"], r["lesion"]) == (row["case"], row["lesion"])]
        assert row["box_model_dice"] == round(next(r["model"]["dice"] for r in mine if r["prompt"] == "box"), 3)
        assert row["gt_ml"] > 0
    assert sum(b["n_lesions"] for b in out["by_size"]) == len(rows)
    md = M.evaluation_tables(out)
    assert md.count("\n| phantom_eval_0 #") == len(rows) and "| phantom_heldout (3) | point | 6 |" in md
    for v in summ.values():
        assert all(0.0 <= v[f"{w}_dice"] <= 1.0 for w in ("model", "model_tta", "baseline"))


def test_two_phase_training_fine_tunes_phase_one(tmp_path, monkeypatch):
    """Phase 1 (small patch, fine grid) then phase 2 (the final plans) initialised with every phase-1 weight;
    an existing phase-1 checkpoint is reused, not retrained."""
    monkeypatch.setattr(M, "PHASE1_PATCH", (16, 32, 32))
    monkeypatch.setattr(M, "PATCH", (16, 48, 48))
    monkeypatch.setattr(M, "default_plans", lambda patch=None, spacing=M.SPACING: M.make_plans(
        patch or M.PATCH, spacing, (4, 8, 8), (1, 1, 1), "torch"))
    torch.set_num_threads(1)
    work = tmp_path / "work"
    M.train(work, tmp_path / "no_data", epochs=1, iters=1, phantoms=2, seed=0, batch_size=1, resume=False, pasted=0,
            phase1_epochs=1, final_phase=2)
    p1 = torch.load(work / "phase1" / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    p2 = torch.load(work / "model" / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    plans1 = json.loads((work / "phase1" / "plans.json").read_text())
    plans2 = json.loads((work / "model" / "plans.json").read_text())
    assert plans1["configurations"]["3d_fullres"]["patch_size"] == [16, 32, 32]
    assert plans2["configurations"]["3d_fullres"]["patch_size"] == [16, 48, 48]
    assert plans2["configurations"]["3d_fullres"]["spacing"] == list(M.SPACING)

    def flat(ck):
        return torch.cat([v.float().flatten() for k, v in sorted(ck["network_weights"].items())
                          if v.is_floating_point()])

    fresh = build_network(config_from_dicts(plans2, make_dataset_json()), 2, deep_supervision=True)
    fresh_flat = torch.cat([v.float().flatten() for k, v in sorted(fresh.state_dict().items())
                            if v.is_floating_point()])
    a, b = flat(p1), flat(p2)
    assert (b - a).norm() < 0.2 * (fresh_flat - a).norm()  # one small step away from phase 1, not a new start
    before = (work / "phase1" / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns
    M.train(work, tmp_path / "no_data", epochs=1, iters=1, phantoms=2, seed=0, batch_size=1, resume=False, pasted=0,
            final_phase=2)
    assert (work / "phase1" / "fold_0" / "checkpoint_final.pth").stat().st_mtime_ns == before
    # the shipped recipe stops after phase 1 and exports it
    assert M.train(work, tmp_path / "no_data", epochs=1, iters=1, phantoms=2, seed=0, batch_size=1, resume=False,
                   pasted=0) == work / "phase1" / "fold_0" / "checkpoint_final.pth"
    ck = torch.load(M.export(work, tmp_path / "pkg")[0], map_location="cpu", weights_only=False)
    assert torch.equal(ck["network_weights"]["decoder.seg_layers.0.weight"],
                       p1["network_weights"]["decoder.seg_layers.0.weight"].half())


def test_evaluate_adds_held_out_lesions_at_twice_their_size(tmp_path):
    """Each held-out real case is also scored with every spacing doubled (the same voxels and prompts: a lesion
    8x the volume), as group ``<group>_x2``; training cases are not."""
    from LesionLocatorLib.core.geometry import Volume
    from LesionLocatorLib.core.image_io import write_image
    from LesionLocatorLib.model.tiny_model import write_random_checkpoint

    root = write_random_checkpoint(tmp_path / "ck", spacing=(2.0, 1.5, 1.5)) / "LesionLocatorCheckpoint"
    ct, lab = make_phantom((24, 48, 48), (2.0, 1.5, 1.5), n_lesions=1, seed=5)
    data = tmp_path / "data"
    write_image(ct, data / "sts" / "STS_900_ct.nii.gz")
    write_image(lab, data / "sts" / "STS_900_lesions.nii.gz")
    (data / "cases.json").write_text(json.dumps({"STS_900": {"image": "STS_900_ct.nii.gz",
                                                             "lesions": "STS_900_lesions.nii.gz"}}))
    out = M.evaluate(root, data, seed=0, n_random_points=0, n_phantoms=0)
    by_case = {r["case"]: r for r in out["records"] if r["prompt"] == "box"}
    assert set(by_case) == {"STS_900", "STS_900_x2"}
    assert by_case["STS_900_x2"]["group"] == "real_sts_heldout_x2"
    assert by_case["STS_900_x2"]["gt_ml"] == pytest.approx(8 * by_case["STS_900"]["gt_ml"], abs=0.05)
    assert by_case["STS_900_x2"]["gt_voxels"] == by_case["STS_900"]["gt_voxels"]
