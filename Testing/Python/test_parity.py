"""Parity with the published LesionLocator pipeline (../shared/parity, random-weight checkpoint).

Exact: resampled-grid prompt, stamped prompt size and bbox, padded shape, tile list; preprocessed
image to float rounding; masks Dice >= 0.995 per lesion and mean |prob diff| <= 1e-3 on covered voxels
(the published code accumulates logits in fp16, see the parity README).
"""
import json

import numpy as np
import pytest
import SimpleITK as sitk

from LesionLocatorLib.core.image_io import read_image
from LesionLocatorLib.model.preprocessing import normalize_ct
from LesionLocatorLib.core.prompts import load_prompt_json
from LesionLocatorLib.model.resampling import whole_box
from LesionLocatorLib.model.engine import LesionLocatorModel
from LesionLocatorLib.segment.session import SegmentSession

from conftest import DATA, PARITY, require

IMAGES = {
    "STS_002": DATA / "sts" / "STS_002_ct.nii.gz",
    "STS_003": DATA / "sts" / "STS_003_ct.nii.gz",
    "DL_000015_01_01_103-115": DATA / "deeplesion" / "000015_01_01_103-115_ct.nii.gz",
    "STS_002_zeropad": PARITY / "inputs" / "STS_002_zeropad.nii.gz",
}


def ref_dirs():
    if not (PARITY / "refs").is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason="../shared/parity not available"))]
    return sorted(p for p in (PARITY / "refs").glob("*/*/*") if (p / "meta.json").is_file())


_MODELS: dict = {}


def segmenter(ckpt_dir: str, kind: str, tta: bool) -> SegmentSession:
    """A session with the published single-patch behaviour (``grow=False``: no growth past the patch)."""
    if ckpt_dir not in _MODELS:
        _MODELS[ckpt_dir] = LesionLocatorModel(PARITY / ckpt_dir, device="cpu", grow=False)
    return _MODELS[ckpt_dir].session(tta=tta)


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def run_case(ref):
    meta = json.loads((ref / "meta.json").read_text())
    case, kind, mode = ref.parts[-3], ref.parts[-2], ref.parts[-1]
    image = read_image(require(IMAGES[case]))
    seg = segmenter("ckpt_scipy" if "scipy" in mode else "ckpt", kind, meta["tta"])
    seg.set_image(image)
    result = seg.segment(load_prompt_json(ref / "prompt.json"), return_probabilities=True)
    return meta, image, seg, result


@pytest.mark.parametrize("ref", ref_dirs(), ids=lambda p: "/".join(p.parts[-3:]) if p else "none")
def test_matches_published_pipeline(ref):
    meta, image, seg, result = run_case(ref)
    kind = ref.parts[-2]
    grid = seg.prepared.grid(kind)
    props = meta["properties"]
    assert [list(b) for b in grid.crop] == props["bbox_used_for_cropping"]
    assert list(grid.resampled_shape) == meta["preprocessed_shape_czyx"][1:]
    nan_path = ref / "prob_fg_nanmask.nii.gz"
    uncovered = sitk.GetArrayFromImage(sitk.ReadImage(str(nan_path))).astype(bool) if nan_path.exists() else None
    for lesion in meta["lesions"]:
        lid = lesion["id"]
        dbg = seg.last_debug[lid]
        assert dbg.sparse_prompt_resampled_grid == lesion["sparse_prompt_resampled_grid"]
        assert dbg.dense_prompt_voxels == lesion["dense_prompt_voxels"]
        assert dbg.dense_prompt_bbox_incl_zyx == lesion["dense_prompt_bbox_incl_zyx"]
        assert dbg.padded_shape_zyx == lesion["padded_shape_zyx"]
        assert dbg.tiles_start_stop_zyx == lesion["tiles_start_stop_zyx"]
        ref_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / "mask.nii.gz"))).astype(bool)
        mask = result.mask(lid).astype(bool)
        assert dice(mask, ref_mask) >= 0.995, f"Dice {dice(mask, ref_mask):.4f}"
        ref_prob = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / "prob_fg.nii.gz")))
        prob = result.lesions[lid].full_probability(image.shape)
        covered = ~uncovered if uncovered is not None else np.ones(image.shape, bool)
        assert np.abs(prob[covered] - ref_prob[covered]).mean() <= 1e-3
        if uncovered is not None:  # never-predicted voxels are background (NaN in the published code)
            assert not mask[uncovered].any()


def test_preprocessed_image_matches():
    ref = require(PARITY / "refs" / "STS_002" / "point" / "notta" / "preprocessed.npz")
    expected = np.load(ref)["data"]
    expected = expected.reshape(expected.shape[-3:])
    seg = segmenter("ckpt", "point", False)
    image = read_image(require(IMAGES["STS_002"]))
    seg.set_image(image)
    grid = seg.prepared.grid("point")
    stats = seg.model.config("point").ct_stats
    src = image.array[tuple(slice(a, b) for a, b in grid.crop)]
    got = grid.forward.image_region(src, whole_box(grid.resampled_shape), lambda a: normalize_ct(a, stats))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)
    # a region gives the same values as the whole scan cut to it
    box = ((40, 100), (30, 120), (50, 160))
    part = grid.forward.image_region(src, box, lambda a: normalize_ct(a, stats))
    np.testing.assert_allclose(part, got[40:100, 30:120, 50:160], atol=1e-6)


def test_zero_padded_point_lands_where_the_unpadded_one_does():
    """The published code subtracted the crop origin twice; the same lesion must give the same mask."""
    ref = require(PARITY / "refs" / "STS_002" / "point" / "notta")
    padded = read_image(require(IMAGES["STS_002_zeropad"]))
    seg = segmenter("ckpt", "point", False)
    seg.set_image(padded)
    point = json.loads((ref / "prompt.json").read_text())["1"]["point"]
    result = seg.segment(points={1: (point[0] + 6, point[1], point[2] + 20)})
    mask = result.mask(1)[6:54, 0:143, 20:181].astype(bool)
    ref_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(ref / "mask.nii.gz"))).astype(bool)
    assert seg.last_debug[1].sparse_prompt_resampled_grid == [78, 87, 99]
    assert dice(mask, ref_mask) >= 0.995
    assert not result.mask(1)[:6].any() and not result.mask(1)[:, :, :20].any()
