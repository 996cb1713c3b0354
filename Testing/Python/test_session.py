"""SegmentSession over LesionLocatorModel: region processing equals whole-scan processing, tiling, TTA/folds,
several prompts per lesion, geometry, the shared out-of-memory fallback, errors."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LesionLocatorLib.model.checkpoint import CheckpointError
from LesionLocatorLib.core.geometry import GeometryError, Volume
from LesionLocatorLib.model.preprocessing import normalize_ct
from LesionLocatorLib.core.prompts import Box, Point, PromptError, encode_prompt
from LesionLocatorLib.model.engine import LesionLocatorModel
from LesionLocatorLib.segment.session import SegmentSession
from LesionLocatorLib.model.sliding_window import gaussian_importance, tiles_for_prompt
from LesionLocatorLib.model.tiny_model import write_random_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ck"), folds=(0, 1), patch_size=(24, 32, 32))


def ct_like(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(0, 60, shape)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    a += np.where(zz ** 2 + yy ** 2 + xx ** 2 < 0.5, 300, -700)
    return a.astype(np.int16)


def session(ckpt, **kw) -> SegmentSession:
    return LesionLocatorModel(ckpt, device="cpu", **kw).session()


def whole_scan_reference(seg: SegmentSession, prompt, kind: str, tta: bool, folds):
    """The published algorithm on the whole scan (torch resampling), for comparison."""
    model = seg.model.prompt_model(kind)
    grid = seg.prepared.grid(kind)
    img = seg.image
    data = normalize_ct(img.array[tuple(slice(a, b) for a, b in grid.crop)], model.config.ct_stats)
    S = grid.resampled_shape
    data = F.interpolate(torch.from_numpy(data)[None, None], S, mode="trilinear", align_corners=False)[0, 0]
    enc = encode_prompt(prompt, grid, kind)
    dense = torch.zeros(S)
    dense[tuple(slice(a, b) for a, b in enc.box)] = torch.from_numpy(enc.stamp).float()
    P, pad = grid.padded_shape, grid.pad_below
    x = torch.zeros((2, *P))
    inner = tuple(slice(p, p + s) for p, s in zip(pad, S))
    x[(0,) + inner] = data
    x[(1,) + inner] = dense
    lo, hi = enc.bbox_incl
    tiles = tiles_for_prompt(P, model.config.patch_size, np.add(lo, pad), np.add(hi, pad))
    g = torch.from_numpy(np.array(gaussian_importance(tuple(model.config.patch_size))))
    acc = torch.zeros((2, *P))
    n = torch.zeros(P)
    axes = [a + 2 for a in model.mirror_axes] if tta else []
    combos = [c for k in range(1, len(axes) + 1) for c in itertools.combinations(axes, k)]
    with torch.no_grad():
        for t in tiles:
            sl = tuple(slice(a, b) for a, b in t)
            xt = x[(slice(None),) + sl][None]
            pred = 0
            for net in model.networks:
                p = net(xt)
                for c in combos:
                    p = p + torch.flip(net(torch.flip(xt, c)), c)
                pred = pred + p / (len(combos) + 1)
            pred = pred[0] / len(model.networks)
            acc[(slice(None),) + sl] += pred * g
            n[sl] += g
    logits = (acc / n)[(slice(None),) + inner]  # NaN where no tile
    back = F.interpolate(logits[None], grid.cropped_shape, mode="trilinear", align_corners=False)[0]
    fg = ((back[1] > back[0]) & ~torch.isnan(back).any(0)).numpy()
    out = np.zeros(img.shape, np.uint8)
    out[tuple(slice(a, b) for a, b in grid.crop)] = fg
    return out, len(tiles)


def dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize("kind, prompt", [
    ("point", Point((30, 40, 60))),  # one patch in a scan much larger than the patch
    ("box", Box((12, 28, 20, 30, 30, 40))),  # larger than the patch: sliding window
])
def test_region_processing_equals_whole_scan(ckpt, kind, prompt):
    seg = session(ckpt, grow=False)  # the published tiles
    image = Volume(ct_like((60, 110, 130)), spacing=(2.0, 1.1, 0.9))
    seg.set_image(image)
    got = seg.segment({1: prompt}).mask(1)
    ref, n_tiles = whole_scan_reference(seg, prompt, kind, False, None)
    assert (n_tiles > 1) == (kind == "box")
    assert ref.sum() > 50
    assert dice(got, ref) > 0.999
    assert np.abs(got.astype(int) - ref).sum() <= max(3, 0.001 * ref.sum())


def test_tta_and_fold_averaging(ckpt):
    seg = session(ckpt, folds="all", tta=True, grow=False)
    assert len(seg.model.prompt_model("point").networks) == 2
    seg.set_image(Volume(ct_like((30, 40, 40), 3), spacing=(1.5, 1.0, 1.0)))
    got = seg.segment(points={1: (15, 20, 20)}).mask(1)
    ref, _ = whole_scan_reference(seg, Point((15, 20, 20)), "point", True, "all")
    assert ref.sum() > 50 and dice(got, ref) > 0.999
    single = session(ckpt, grow=False)
    single.set_image(seg.image)
    assert dice(single.segment(points={1: (15, 20, 20)}).mask(1), got) < 0.999  # averaging changes the result
    # per-session settings over the same weights: fold 0 without TTA equals a one-fold model
    narrow = seg.model.session(tta=False, folds=[0])
    narrow.set_image(seg.image)
    np.testing.assert_array_equal(narrow.segment(points={1: (15, 20, 20)}).mask(1),
                                  single.segment(points={1: (15, 20, 20)}).mask(1))


def test_sliding_window_leaves_uncovered_voxels_background(ckpt):
    seg = session(ckpt)
    image = Volume(ct_like((40, 120, 120), 5), spacing=(1.0, 0.8, 0.8))
    seg.set_image(image)
    res = seg.segment(boxes={1: (5, 35, 10, 20, 10, 20)}, return_probabilities=True)
    les = res.lesions[1]
    assert len(seg.last_debug[1].tiles_start_stop_zyx) > 1
    assert np.isfinite(les.probability).all()
    full = res.mask(1)
    # tiles cover the prompt; voxels far away from every tile stay background
    assert full[:, 100:, 100:].sum() == 0
    assert les.bbox[3] <= 120 and les.bbox[1] <= 40


def test_determinism_and_world_prompts(ckpt):
    rot = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], float) @ np.diag([-1, 1, 1])
    image = Volume(ct_like((30, 50, 45), 7), spacing=(2.5, 0.7, 0.9), origin=(12.0, -40.0, 5.0), direction=rot)
    seg = session(ckpt)
    seg.set_image(image)
    vox = (14, 22, 19)
    a = seg.segment(points={1: vox}).mask(1)
    b = seg.segment(points={1: vox}).mask(1)
    np.testing.assert_array_equal(a, b)
    assert a.sum() > 0
    lps = seg.segment(points={1: image.voxel_to_world(vox)}, space="lps").mask(1)
    ras = seg.segment(points={1: image.voxel_to_world(vox, ras=True)}, space="ras").mask(1)
    np.testing.assert_array_equal(a, lps)
    np.testing.assert_array_equal(a, ras)


def test_label_map_ids_above_255_and_overlaps(ckpt):
    seg = session(ckpt)
    seg.set_image(Volume(ct_like((30, 40, 40), 9), spacing=(1.0, 1.0, 1.0)))
    res = seg.segment(points={7: (15, 20, 20), 300: (16, 21, 21)}, return_probabilities=True)
    lab = res.label_map()
    assert lab.dtype == np.uint16
    assert set(np.unique(lab)) <= {0, 7, 300}
    overlap = (res.mask(7) > 0) & (res.mask(300) > 0)
    assert overlap.any()
    p7 = res.lesions[7].full_probability(res.shape)
    p300 = res.lesions[300].full_probability(res.shape)
    np.testing.assert_array_equal(lab[overlap], np.where(p300[overlap] > p7[overlap], 300, 7))


def test_mask_prompts(ckpt):
    seg = session(ckpt)
    seg.set_image(Volume(ct_like((30, 40, 40), 11), spacing=(1.0, 1.0, 1.0)))
    labels = np.zeros((30, 40, 40), np.int32)
    labels[10:16, 10:18, 12:20] = 1000
    res = seg.segment(masks=labels)
    assert list(res.lesions) == [1000] and res.lesions[1000].voxels > 0


def test_bad_inputs(ckpt, tmp_path):
    seg = session(ckpt)
    with pytest.raises(RuntimeError, match="set_image"):
        seg.segment(points={1: (1, 1, 1)})
    seg.set_image(Volume(ct_like((20, 30, 30)), spacing=(1.0, 1.0, 1.0)))
    with pytest.raises(PromptError, match="outside"):
        seg.segment(points={1: (25, 3, 3)})
    with pytest.raises(PromptError, match="outside"):
        seg.segment(points={1: (500.0, 0, 0)}, space="lps")
    with pytest.raises(PromptError, match="no prompt"):
        seg.segment()
    with pytest.raises(PromptError, match="space"):
        seg.segment(points={1: (1, 1, 1)}, space="ijk")
    bad = Volume(np.full((5, 5, 5), np.nan, np.float32))
    with pytest.raises(GeometryError, match="NaN"):
        seg.set_image(bad)
    point_only = write_random_checkpoint(tmp_path / "p", kinds=("point",), patch_size=(16, 16, 16))
    s2 = session(point_only)
    s2.set_image(Volume(ct_like((20, 30, 30)), spacing=(1.0, 1.0, 1.0)))
    with pytest.raises(CheckpointError, match="no box model"):
        s2.segment(boxes={1: (2, 8, 2, 8, 2, 8)})
    with pytest.raises(PromptError, match="either"):
        s2.segment({1: Point((3, 3, 3))}, points={2: (4, 4, 4)})
    with pytest.raises(CheckpointError, match="fold"):
        LesionLocatorModel(point_only, device="cpu", folds=[3])


def test_several_prompts_of_one_lesion(ckpt):
    """Points of a lesion: each segmented, masks united; a box replaces its points; ids are kept."""
    seg = session(ckpt)
    seg.set_image(Volume(ct_like((40, 60, 60), 13), spacing=(1.0, 1.0, 1.0)))
    p1, p2 = (12, 20, 20), (28, 40, 42)
    one = seg.segment(points={5: p1}).mask(5)
    two = seg.segment(points={5: p2}).mask(5)
    both = seg.segment(points={5: [p1, p2]})
    assert list(both.lesions) == [5]
    np.testing.assert_array_equal(both.mask(5), (one | two).astype(np.uint8))
    assert one.any() and two.any() and (one != two).any()
    box = (8, 20, 14, 30, 14, 30)
    boxed = seg.segment({5: [Point(p1), Box(box), Point(p2)]}).mask(5)
    np.testing.assert_array_equal(boxed, seg.segment(boxes={5: box}).mask(5))


def test_out_of_memory_fallback_is_seen_by_every_session(ckpt, monkeypatch):
    """A CUDA out-of-memory error moves the shared networks to the CPU and every session and tracker of the
    model runs on the CPU from then on (simulated: the first tile raises the error as if on CUDA)."""
    model = LesionLocatorModel(ckpt, device="cpu", grow=False)  # one tile per click: two forward calls below
    a, b = model.session(), model.session()
    image = Volume(ct_like((30, 40, 40), 3), spacing=(1.5, 1.0, 1.0))
    a.set_image(image)
    b.set_image(image)
    expected = b.segment(points={1: (15, 20, 20)}).mask(1)
    real = model._forward
    calls = []

    def flaky(kind, x, tta, folds):
        calls.append(str(model.device))
        if len(calls) == 1:
            model._device = torch.device("cuda")  # as if the networks lived on the GPU
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(kind, x, tta, folds)

    monkeypatch.setattr(model, "_forward", flaky)
    got = a.segment(points={1: (15, 20, 20)}).mask(1)
    assert calls == ["cpu", "cpu"] and model.device.type == "cpu"
    np.testing.assert_array_equal(got, expected)
    assert all(p.device.type == "cpu" for n in model.prompt_model("point").networks for p in n.parameters())
    np.testing.assert_array_equal(b.segment(points={1: (15, 20, 20)}).mask(1), expected)
    # without the fallback the user gets one clear error
    model.cpu_fallback = False
    calls.clear()
    from LesionLocatorLib.model.engine import InferenceError

    with pytest.raises(InferenceError, match="out of memory"):
        a.segment(points={1: (15, 20, 20)})
