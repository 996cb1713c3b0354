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


def test_learned_published_layout_runs_and_keeps_ids(package, phantom):
    ct, lab = phantom
    fu, _, _ = make_followup(ct, lab, seed=1, shift_mm=(3, 0, 0))
    tr = LesionTracker.from_checkpoint(package, device="cpu")
    assert (tr.propagation, tr.refine) == ("learned", "unet")
    res = tr.track(ct, [fu, fu], lab.array)
    ids = sorted(int(i) for i in np.unique(lab.array) if i)
    assert [sorted(r.lesions) for r in res] == [ids, ids]
    assert all(r.shape == fu.shape for r in res)
    assert [r.pair for r in tr.registrations] == [(0, 1), (1, 2)]  # autoregressive
    again = tr.track(ct, [fu, fu], lab.array, from_baseline=True)
    assert [r.pair for r in tr.registrations] == [(0, 1), (0, 2)]
    # same pair, same prompts: identical result (deterministic)
    np.testing.assert_array_equal(res[0].label_map(), again[0].label_map())


def test_z_alignment_puts_the_prompt_on_the_right_slices(package, phantom):
    """Random registration weights give the identity map, so only the published z alignment can
    bring the warped masks onto the lesions of a follow-up that lost 16 slices at the top."""
    ct, lab = phantom
    fu, fu_lab, meta = make_followup(ct, lab, seed=2, z_extent=(0, 32), noise_hu=0)
    tr = LesionTracker.from_checkpoint(package, device="cpu", refine="none")
    res = tr.track(ct, [fu], {i: Mask(lab.array == i) for i in np.unique(fu_lab.array) if i})[0]
    truth = centres_mm(fu_lab.array, fu)
    for lid, c in truth.items():
        got = res.lesions[lid]
        assert got.status == "found"
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
    tr = LesionTracker.from_checkpoint(seg_only, device="cpu")
    assert (tr.propagation, tr.refine) == ("classical", "segment")
    tr_none = LesionTracker.from_checkpoint(seg_only, device="cpu", refine="none")
    res = tr_none.track(ct, [fu], lab.array)[0]
    assert sorted(res.lesions) == ids
    assert res.lesions[top].status == "not found"
    for i in ids:
        if i != top and (fu_lab.array == i).sum() > 20:
            assert res.lesions[i].status == "found"
    with pytest.raises(CheckpointError, match="LesionLocatorTrack"):
        LesionTracker.from_checkpoint(seg_only, device="cpu", propagation="learned")


def test_point_prompts_are_segmented_on_the_baseline_first(package, phantom):
    from LesionLocatorLib.synthetic.phantom import lesion_prompts
    from LesionLocatorLib.core.prompts import Point

    ct, lab = phantom
    pts = {int(k): Point(tuple(v["point"])) for k, v in lesion_prompts(lab.array).items()}
    tr = LesionTracker.from_checkpoint(package, device="cpu", propagation="classical", refine="none")
    res = tr.track(ct, [ct], pts)
    assert sorted(tr.baseline_result.lesions) == sorted(pts)
    assert sorted(res[0].lesions) == sorted(pts)
    report = tr.report(results=res)
    assert {r["lesion_id"] for r in report.rows()} == set(pts)


def test_real_ct_shift_and_deformation_classical(tmp_path):
    """Classical propagation on a real CT: a 10 mm shifted, smoothly deformed follow-up."""
    ct = read_image(require(DATA / "sts" / "STS_002_ct.nii.gz"))
    lab = read_image(require(DATA / "sts" / "STS_002_lesions.nii.gz"))
    fu, fu_lab, _ = make_followup(ct, lab, seed=5, shift_mm=(10.0, 0.0, 0.0), smooth_deformation_mm=3.0,
                                  noise_hu=5.0)
    seg_only = write_random_checkpoint(tmp_path / "seg", patch_size=(32, 48, 48))
    tr = LesionTracker.from_checkpoint(seg_only, device="cpu", propagation="classical", refine="none")
    res = tr.track(ct, [fu], lab.array)[0]
    m = tracking_metrics(res.label_map(), fu_lab.array, fu.spacing, fu)
    assert m.cpm == 1.0
    assert m.dice_matched >= 0.8


def test_bad_inputs(package, phantom, tmp_path):
    ct, lab = phantom
    tr = LesionTracker.from_checkpoint(package, device="cpu", propagation="classical", refine="none")
    bad = tmp_path / "fu.nii.gz"
    bad.write_bytes(b"garbage")
    with pytest.raises(ImageReadError):
        tr.track(ct, [ct, bad], lab.array)
    with pytest.raises(PromptError, match="empty"):
        tr.track(ct, [ct], {1: Mask(np.zeros(ct.shape, bool))})
    with pytest.raises(PromptError, match="outside"):
        from LesionLocatorLib.core.prompts import Point

        tr.track(ct, [ct], {1: Point((500, 1, 1))})
    tiny = Volume(np.full((4, 4, 4), 40, np.int16), spacing=(1, 1, 1))
    with pytest.raises(TrackingError, match="field of view"):
        tr.track(ct, [tiny], lab.array)
    mr = Volume(np.abs(ct.array.astype(np.float32)) + 100, ct.spacing, ct.origin, ct.direction)
    with pytest.raises(TrackingError, match="modality"):
        tr.track(ct, [mr], lab.array)


def test_track_checkpoint_with_missing_or_foreign_keys(package, tmp_path):
    src = package / "LesionLocatorCheckpoint" / "LesionLocatorTrack"
    for name, edit in (("missing", lambda w: w.pop(next(k for k in w if k.startswith("reg_net.")))),
                       ("foreign", lambda w: w.__setitem__("decoder.extra.weight", torch.zeros(1)))):
        d = tmp_path / name / "LesionLocatorTrack"
        shutil.copytree(src, d)
        ck = torch.load(d / "fold_0" / "checkpoint_final.pth", weights_only=False)
        edit(ck["network_weights"])
        torch.save(ck, d / "fold_0" / "checkpoint_final.pth")
        with pytest.raises(CheckpointError):
            LesionTracker.from_checkpoint(d, device="cpu")
