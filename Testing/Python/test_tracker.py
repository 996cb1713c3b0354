"""LesionTracker: learned (published Track layout) and classical propagation, refinement modes,
autoregressive follow-ups, z alignment, lost lesions and bad input."""
import shutil

import numpy as np
import pytest
import torch

from LesionLocatorLib.model.checkpoint import CheckpointError, write_checkpoint
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import ImageReadError, read_image, write_image
from LesionLocatorLib.synthetic.longitudinal import make_followup
from LesionLocatorLib.measure.metrics import tracking_metrics
from LesionLocatorLib.synthetic.phantom import make_phantom
from LesionLocatorLib.core.prompts import Mask, PromptError
from LesionLocatorLib.model.tiny_model import write_random_checkpoint, write_random_track_checkpoint
from LesionLocatorLib.model.engine import LesionLocatorModel
from LesionLocatorLib.core.results import LesionStatus, TrackingResult
from LesionLocatorLib.track.tracker import LesionTracker, TrackingError

from conftest import DATA, require


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    root = write_random_checkpoint(tmp_path_factory.mktemp("ck"), patch_size=(32, 48, 48))
    write_random_track_checkpoint(root, patch_size=(32, 48, 48))
    return root


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(shape=(48, 96, 96), spacing=(2.5, 1.5, 1.5), n_lesions=3, seed=4)


def centres_mm(labels: np.ndarray, vol: Volume) -> dict:
    return {int(i): vol.voxel_to_world(np.argwhere(labels == i).mean(0)) for i in np.unique(labels) if i}


@pytest.fixture(scope="module")
def model(package):
    # random weights segment noise everywhere: keep the published single patch (no growth past it)
    return LesionLocatorModel(package, device="cpu", grow=False)


def test_learned_published_layout_runs_and_keeps_ids(model, phantom):
    ct, lab = phantom
    fu, _, _ = make_followup(ct, lab, seed=1, shift_mm=(3, 0, 0))
    tr = model.tracker()
    assert isinstance(tr, LesionTracker)
    assert (tr.propagation, tr.refine) == ("learned", "unet")
    tr.set_images(ct, [fu, fu])
    out = tr.track(lab.array)
    assert isinstance(out, TrackingResult)
    res = out.followups
    ids = sorted(int(i) for i in np.unique(lab.array) if i)
    assert sorted(out.baseline.lesions) == ids
    assert [sorted(r.lesions) for r in res] == [ids, ids]
    assert all(r.shape == fu.shape for r in res)
    assert [r.pair for r in tr.registrations] == [(0, 1), (1, 2)]  # autoregressive
    again = tr.track(lab.array, from_baseline=True).followups
    assert [r.pair for r in tr.registrations] == [(0, 1), (0, 2)]
    # same pair, same prompts: identical result (deterministic)
    np.testing.assert_array_equal(res[0].label_map(), again[0].label_map())
    assert {r["lesion_id"] for r in out.report().rows()} == set(ids)


def test_z_alignment_puts_the_prompt_on_the_right_slices(model, phantom):
    """Random registration weights give the identity map, so only the published z alignment can
    bring the warped masks onto the lesions of a follow-up that lost 16 slices at the top."""
    ct, lab = phantom
    fu, fu_lab, meta = make_followup(ct, lab, seed=2, z_extent=(0, 32), noise_hu=0)
    tr = model.tracker(refine="none")
    tr.set_images(ct, [fu])
    res = tr.track({i: Mask(lab.array == i) for i in np.unique(fu_lab.array) if i}).followups[0]
    truth = centres_mm(fu_lab.array, fu)
    for lid, c in truth.items():
        got = res.lesions[lid]
        assert got.status is LesionStatus.FOUND
        pred_c = fu.voxel_to_world(np.argwhere(got.full(fu.shape)).mean(0))
        assert np.linalg.norm(pred_c - c) < 8.0, (lid, pred_c, c)


def test_classical_without_track_model_and_lost_lesions(tmp_path, phantom):
    seg_only = write_random_checkpoint(tmp_path / "seg", patch_size=(32, 48, 48))
    ct, lab = phantom
    ids = [int(i) for i in np.unique(lab.array) if i]
    # a lesion outside the follow-up's field of view is "not found", with no id lost
    zs = {i: np.argwhere(lab.array == i)[:, 0].mean() for i in ids}
    top = max(ids, key=lambda i: zs[i])
    cut = int(np.argwhere(lab.array == top)[:, 0].min()) - 1
    fu, fu_lab, _ = make_followup(ct, lab, seed=3, z_extent=(0, cut), noise_hu=0)
    seg_model = LesionLocatorModel(seg_only, device="cpu", grow=False)
    tr = seg_model.tracker()
    assert (tr.propagation, tr.refine) == ("classical", "segment")
    tr_none = seg_model.tracker(refine="none")
    tr_none.set_images(ct, [fu, fu])
    out = tr_none.track(lab.array)
    res = out.followups[0]
    assert sorted(res.lesions) == ids
    assert res.lesions[top].status is LesionStatus.NOT_FOUND and not res.lesions[top].found
    for i in ids:
        if i != top and (fu_lab.array == i).sum() > 20:
            assert res.lesions[i].status is LesionStatus.FOUND
    # the lost lesion keeps its id in the next follow-up too
    assert sorted(out.followups[1].lesions) == ids
    with pytest.raises(CheckpointError, match="LesionLocatorTrack"):
        seg_model.tracker(propagation="learned")


def test_point_prompts_are_segmented_on_the_baseline_first(model, phantom):
    from LesionLocatorLib.synthetic.phantom import lesion_prompts

    ct, lab = phantom
    pts = {int(k): tuple(v["point"]) for k, v in lesion_prompts(lab.array).items()}
    tr = model.tracker(propagation="classical", refine="none")
    tr.set_images(ct, [ct])
    out = tr.track(points=pts)
    assert sorted(out.baseline.lesions) == sorted(pts)
    assert sorted(out.followups[0].lesions) == sorted(pts)
    # the baseline masks are what the segmentation session gives for the same points
    session = model.session()
    session.set_image(ct)
    seg = session.segment(points=pts)
    for lid in pts:
        np.testing.assert_array_equal(out.baseline.mask(lid), seg.mask(lid))
    report = out.report()
    assert {r["lesion_id"] for r in report.rows()} == set(pts)


def test_real_ct_shift_and_deformation_classical(tmp_path):
    """Classical propagation on a real CT: a 10 mm shifted, smoothly deformed follow-up."""
    ct = read_image(require(DATA / "sts" / "STS_002_ct.nii.gz"))
    lab = read_image(require(DATA / "sts" / "STS_002_lesions.nii.gz"))
    fu, fu_lab, _ = make_followup(ct, lab, seed=5, shift_mm=(10.0, 0.0, 0.0), smooth_deformation_mm=3.0,
                                  noise_hu=5.0)
    seg_only = write_random_checkpoint(tmp_path / "seg", patch_size=(32, 48, 48))
    tr = LesionLocatorModel(seg_only, device="cpu").tracker(propagation="classical", refine="none")
    tr.set_images(ct, [fu])
    res = tr.track(masks=lab.array).followups[0]
    m = tracking_metrics(res.label_map(), fu_lab.array, fu.spacing, fu)
    assert m.cpm == 1.0
    assert m.dice_matched >= 0.8


def test_bad_inputs(model, phantom, tmp_path):
    import threading

    from LesionLocatorLib.core.prompts import Point
    from LesionLocatorLib.segment.session import Cancelled

    ct, lab = phantom
    tr = model.tracker(propagation="classical", refine="none")
    with pytest.raises(RuntimeError, match="set_images"):
        tr.track(lab.array)
    bad = tmp_path / "fu.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageReadError):
        tr.set_images(ct, [ct, bad])
    tr.set_images(ct, [ct])
    with pytest.raises(PromptError, match="empty"):
        tr.track({1: Mask(np.zeros(ct.shape, bool))})
    with pytest.raises(PromptError, match="outside"):
        tr.track({1: Point((500, 1, 1))})
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled):
        tr.track(lab.array, cancel=cancel)
    tiny = Volume(np.full((4, 4, 4), 40, np.int16), spacing=(1, 1, 1))
    with pytest.raises(TrackingError, match="field of view"):
        tr.set_images(ct, [tiny])
    mr = Volume(np.abs(ct.array.astype(np.float32)) + 100, ct.spacing, ct.origin, ct.direction)
    with pytest.raises(TrackingError, match="modality"):
        tr.set_images(ct, [mr])
    with pytest.raises(TrackingError, match="tta"):
        model.tracker(tta="flip-everything")


def test_track_checkpoint_with_missing_or_foreign_keys(package, tmp_path):
    src = package / "LesionLocatorCheckpoint" / "LesionLocatorTrack"
    for name, edit in (("missing", lambda w: w.pop(next(k for k in w if k.startswith("reg_net.")))),
                       ("foreign", lambda w: w.__setitem__("decoder.extra.weight", torch.zeros(1)))):
        d = tmp_path / name / "LesionLocatorTrack"
        shutil.copytree(src, d)
        ck = torch.load(d / "fold_0" / "checkpoint_final.pth", weights_only=False)
        edit(ck["network_weights"])
        torch.save(ck, d / "fold_0" / "checkpoint_final.pth")
        with pytest.raises(CheckpointError):  # a broken checkpoint fails when the tracker is built
            LesionLocatorModel(d, device="cpu").tracker()


def test_bundled_model_tracks_out_of_the_box(phantom):
    """The bundled default model has no Track folder: classical propagation + segmentation refinement."""
    ct, lab = phantom
    fu, fu_lab, _ = make_followup(ct, lab, seed=6, shift_mm=(2.5, 3.0, 0.0), noise_hu=0)
    tr = LesionLocatorModel(None, device="cpu").tracker()
    assert (tr.propagation, tr.refine) == ("classical", "segment")
    tr.set_images(ct, [fu])
    out = tr.track(lab.array)
    ids = sorted(int(i) for i in np.unique(lab.array) if i)
    assert sorted(out.followups[0].lesions) == ids
    m = tracking_metrics(out.followups[0].label_map(), fu_lab.array, fu.spacing, fu)
    assert m.cpm >= 2 / 3


@pytest.fixture(scope="module")
def two_fold_model(tmp_path_factory):
    root = write_random_track_checkpoint(tmp_path_factory.mktemp("ck2"), patch_size=(32, 48, 48), folds=(0, 1))
    # fold 1 registers with its own weights: a constant z displacement (fold 0 is the identity)
    path = root / "LesionLocatorCheckpoint" / "LesionLocatorTrack" / "fold_1" / "checkpoint_final.pth"
    ck = torch.load(path, weights_only=False)
    ck["network_weights"]["reg_net.regis_net.netPsi.net.lastConv.bias"][0] = 0.3
    torch.save(ck, path)
    return LesionLocatorModel(root, device="cpu", folds="all")


def test_published_tta_and_folds_register_per_fold_and_flip(two_fold_model, phantom):
    ct, lab = phantom
    fu, _, _ = make_followup(ct, lab, seed=1, shift_mm=(3, 0, 0))
    ids = sorted(int(i) for i in np.unique(lab.array) if i)
    tr = two_fold_model.tracker(tta=True)
    tr.set_images(ct, [fu])
    out = tr.track(lab.array)
    # 2 folds x 8 flips registrations for the pair, shared by the three lesions
    assert [(r.fold, r.flips) for r in tr.registrations] == [(f, c) for f in (0, 1) for c in
                                                            [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]]
    assert all(len(tr.last_debug[1][lid]) == 16 for lid in ids if lid in tr.last_debug[1])
    # each fold registers with its own network: different warped prompts for the unflipped passes
    lid = ids[0]
    d0, d1 = tr.last_debug[1][lid][0], tr.last_debug[1][lid][8]
    assert (d0.fold, d1.fold) == (0, 1) and d0.warped_bbox != d1.warped_bbox
    assert sorted(out.followups[0].lesions) == ids
    # the approximation has its own name: one registration per fold, UNet mirroring only
    approx = two_fold_model.tracker(tta="unet")
    approx.set_images(ct, [fu])
    approx.track(lab.array)
    assert [(r.fold, r.flips) for r in approx.registrations] == [(0, ()), (1, ())]


def test_region_export_equals_whole_map_export_at_the_patch_border():
    """Pass logits are background (1, 0) outside the patch; the published export resamples the whole map, so
    foreground touching the patch border survives the trilinear resampling. The region export must agree."""
    from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans
    from LesionLocatorLib.model.preprocessing import plan_grid
    from LesionLocatorLib.model.resampling import whole_box
    from LesionLocatorLib.track.refinement import LogitAccumulator

    config = config_from_dicts(make_plans((32, 48, 48), (1.0, 0.8, 0.8), (2, 4, 8)), make_dataset_json())
    arr = np.full((30, 70, 64), 40, np.int16)
    grid = plan_grid(arr, (2.5, 1.5, 1.5), config)
    rng = np.random.default_rng(0)
    acc = LogitAccumulator(grid.resampled_shape)
    whole = np.zeros((2, *grid.resampled_shape), np.float32)
    whole[0] = 2.0
    for box in (((10, 42), (20, 68), (30, 78)), ((25, 57), (40, 88), (10, 58))):  # two overlapping passes
        logits = rng.normal(0, 2, (2, *[b - a for a, b in box])).astype(np.float32)
        logits[1, :, :, -1] += 6  # strong foreground on the patch border
        acc.add(torch.from_numpy(logits), box)
        sl = tuple(slice(a, b) for a, b in box)
        whole[(slice(None), *sl)] += logits - np.array([1, 0], np.float32)[:, None, None, None]
    whole[:, :] /= 2
    vals, _ = grid.backward.prob_region(whole, whole_box(grid.resampled_shape), whole_box(grid.cropped_shape))
    want = vals[1] > vals[0]
    got = acc.export(grid, 1).full(arr.shape).astype(bool)
    assert want.sum() > 100
    assert (got != want).sum() <= 2, (got.sum(), want.sum())  # float rounding of the mean at most
