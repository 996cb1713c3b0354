"""Region-wise resampling equals whole-scan nnU-Net resampling, cut to the region."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.transform import resize

from LesionLocatorLib.model.plans import ResamplingSpec
from LesionLocatorLib.model.resampling import GridResampler, resampled_shape, separate_z_axis, whole_box

TORCH = ResamplingSpec("torch", force_separate_z=False)
SCIPY = ResamplingSpec("scipy", force_separate_z=None, order_data=3, order_seg=1, order_z=0)


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def scipy_reference(data, new_shape, current_spacing, new_spacing, order):
    """nnU-Net's resample_data_or_seg for one channel, written from its documented behaviour."""
    axis = separate_z_axis(SCIPY, current_spacing, new_spacing)
    data = data.astype(float)
    if axis is None:
        return resize(data, new_shape, order, mode="edge", anti_aliasing=False).astype(np.float32)
    assert axis == 0
    tmp = np.stack([resize(s, new_shape[1:], order, mode="edge", anti_aliasing=False) for s in data])
    z = (tmp.shape[0] / new_shape[0]) * (np.arange(new_shape[0]) + 0.5) - 0.5
    idx = np.clip(np.floor(z + 0.5), 0, tmp.shape[0] - 1).astype(int)
    return tmp[idx].astype(np.float32)


REGIONS = [((0, 9), (0, 31), (0, 17)), ((3, 21), (5, 40), (2, 11)), ((20, 31), (44, 50), (16, 17))]


@pytest.mark.parametrize("box", REGIONS)
def test_torch_region_equals_whole_interpolate(box):
    src = rand((13, 37, 29))
    dst = (31, 50, 17)
    whole = F.interpolate(torch.from_numpy(src)[None, None], dst, mode="trilinear", align_corners=False)[0, 0].numpy()
    r = GridResampler(src.shape, dst, (1, 1, 1), (1, 1, 1), TORCH)
    got = r.image_region(src, box)
    np.testing.assert_allclose(got, whole[tuple(slice(a, b) for a, b in box)], atol=2e-6)


@pytest.mark.parametrize("spacing, new_spacing", [((3.27, 0.97, 0.97), (1.0, 0.8, 0.8)),  # separate z
                                                  ((1.2, 0.9, 0.7), (1.0, 0.8, 0.8))])  # 3-D cubic
def test_scipy_region_equals_whole_resize(spacing, new_spacing):
    src = rand((12, 40, 36), 1)
    dst = resampled_shape(src.shape, spacing, new_spacing)
    whole = scipy_reference(src, dst, spacing, new_spacing, 3)
    r = GridResampler(src.shape, dst, spacing, new_spacing, SCIPY)
    if r.sep_axis is None:
        ranges = (float(src.min()), float(src.max()))
    else:
        ranges = [(float(s.min()), float(s.max())) for s in src]
    for box in [whole_box(dst), tuple((d // 4, d // 4 + max(3, d // 3)) for d in dst)]:
        got = r.image_region(src, box, slice_ranges=ranges)
        np.testing.assert_allclose(got, whole[tuple(slice(a, b) for a, b in box)], atol=1e-5)


def test_probability_region_marks_uncovered_voxels():
    # values known only on part of the source: outputs touching the unknown part are invalid
    src_shape, dst = (20, 30, 30), (10, 40, 40)
    vals = rand((2, *src_shape), 2)
    r = GridResampler(src_shape, dst, (1, 1, 1), (1, 1, 1), TORCH)
    vbox = ((5, 15), (0, 30), (10, 25))
    whole = F.interpolate(torch.from_numpy(vals)[None], dst, mode="trilinear", align_corners=False)[0].numpy()
    out_box = r.valid_output_box(vbox)
    got, valid = r.prob_region(vals[(slice(None),) + tuple(slice(a, b) for a, b in vbox)], vbox, out_box)
    assert valid.all()
    np.testing.assert_allclose(got, whole[(slice(None),) + tuple(slice(a, b) for a, b in out_box)], atol=2e-6)
    # one voxel further would touch an unknown source voxel
    wider = tuple((a - 1 if a > 0 else a, b + 1 if b < n else b) for (a, b), n in zip(out_box, dst))
    _, valid2 = r.prob_region(vals[(slice(None),) + tuple(slice(a, b) for a, b in vbox)], vbox, wider)
    assert not valid2.all()


def test_segmentation_resampling_torch_threshold():
    seg = np.zeros((10, 10, 10), np.uint16)
    seg[2:6, 2:6, 2:6] = 300
    seg[7:9, 7:9, 7:9] = 2
    r = GridResampler(seg.shape, (20, 20, 20), (1, 1, 1), (0.5, 0.5, 0.5), TORCH)
    out = r.seg_region(seg, whole_box((20, 20, 20)))
    ref = np.zeros((20, 20, 20), np.uint16)
    for lab in (300, 2):
        ind = F.interpolate(torch.from_numpy((seg == lab).astype(np.float32))[None, None], (20, 20, 20),
                            mode="trilinear", align_corners=False)[0, 0].numpy()
        ref[ind > 0.5] = lab
    np.testing.assert_array_equal(out, ref)
    assert set(np.unique(out)) == {0, 2, 300}


def test_separate_z_choice():
    assert separate_z_axis(SCIPY, (3.27, 0.97, 0.97), (1, 0.8, 0.8)) == 0
    assert separate_z_axis(SCIPY, (1, 0.8, 0.8), (5.0, 0.9, 0.9)) == 0
    assert separate_z_axis(SCIPY, (1.2, 0.9, 0.7), (1, 0.8, 0.8)) is None
    assert separate_z_axis(TORCH, (5.0, 0.9, 0.9), (1, 0.8, 0.8)) is None
