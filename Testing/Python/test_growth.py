"""Growing a lesion's prediction past its patch (segment/growth.py through predict_lesion and SegmentSession).

Two networks run through the real engine (LesionLocatorModel: checkpoint layout, forward, tiles, blending):
- the tiny random-weight ResEnc UNet (context-dependent: tile seams would show if the blend were wrong);
- a thresholding network whose foreground logit is 4 x the normalised intensity, so the *right* answer is
  known: the bright ellipsoid, whatever the tiles. Its weights replace the random UNet's in the loaded model.
The images are on the models' own spacing (1.0, 0.8, 0.8 mm), so the resampling is the identity.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.prompts import Box, EncodedPrompt, Point, encode_prompt
from LesionLocatorLib.model.engine import LesionLocatorModel
from LesionLocatorLib.model.sliding_window import gaussian_importance, sliding_window_steps, window_tiles
from LesionLocatorLib.model.tiny_model import write_random_checkpoint, write_random_track_checkpoint
from LesionLocatorLib.segment import growth
from LesionLocatorLib.segment.growth import Canvas, GrowthLimits, lesion_of, next_tiles, open_faces
from LesionLocatorLib.segment.predict import PreparedImage, predict_lesion

PATCH = (32, 48, 48)  # tiny_model's default patch
BIG = GrowthLimits(max_tiles=400, max_extent=6.0)


class Threshold(torch.nn.Module):
    """Logits (0, 4 x normalised CT): foreground where the CT is above the normalisation mean (-63 HU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fg = 4.0 * x[:, :1]
        return torch.cat([torch.zeros_like(fg), fg], 1)


class ThresholdPlusUNet(torch.nn.Module):
    """The thresholding logits plus the random UNet's: context-dependent (a tile's edge sees zero padding),
    so a wrong blend would show at the seams, while the foreground still follows the bright lesion."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet
        self.threshold = Threshold()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.threshold(x) + self.unet(x)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("grow_ckpt")
    write_random_checkpoint(root)
    write_random_track_checkpoint(root)
    return root / "LesionLocatorCheckpoint"


def threshold_model(ckpt, **kw) -> LesionLocatorModel:
    m = LesionLocatorModel(ckpt, device="cpu", **kw)
    for kind in m.kinds:
        m.prompt_model(kind).networks = [Threshold()]
    return m


def ellipsoid(shape, centre, radii, inside=200, outside=-500) -> np.ndarray:
    zz, yy, xx = np.indices(shape)
    r = sum(((g - c) / r) ** 2 for g, c, r in zip((zz, yy, xx), centre, radii))
    return np.where(r < 1, inside, outside).astype(np.int16)


# a lesion 2.9 patches long in x, 1.5 in y, 1.2 in z, well inside the image
SHAPE, CENTRE, RADII = (64, 110, 180), (32, 55, 90), (19, 36, 70)


@pytest.fixture(scope="module")
def big_lesion():
    arr = ellipsoid(SHAPE, CENTRE, RADII)
    return Volume(arr, spacing=(1.0, 0.8, 0.8)), arr > 0


def segment(model, image, grow=None, limits=None, **prompts):
    """(mask, probability, debug) of lesion 1 from one prompt: through a session, or through predict_lesion
    when ``limits`` are given (they are a predict_lesion argument)."""
    s = model.session()
    s.grow = grow
    s.set_image(image)
    if limits is None:
        r = s.segment(return_probabilities=True, **prompts)
        return r.mask(1).astype(bool), r.lesions[1].full_probability(image.shape), s.last_debug[1]
    key, value = next(iter(prompts.items()))
    kind = "point" if key == "points" else "box"
    prompt = Point(value[1]) if kind == "point" else Box(value[1])
    enc = encode_prompt(prompt, s.prepared.grid(kind), kind)
    les, dbg = predict_lesion(s.prepared, 1, kind, enc, return_probabilities=True, grow=grow, limits=limits)
    return les.full(image.shape).astype(bool), les.full_probability(image.shape), dbg


def dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


# -- the whole lesion, smooth across seams ----------------------------------------------------------

def test_click_grows_to_the_whole_lesion(ckpt, big_lesion):
    image, truth = big_lesion
    m = threshold_model(ckpt)
    cut, _, dbg0 = segment(m, image, grow=False, points={1: CENTRE})
    assert dbg0.tiles == 1 and not dbg0.grown and dbg0.growth_stop == growth.OFF
    assert cut.sum() < 0.5 * truth.sum()  # the published single patch cuts the lesion
    mask, prob, dbg = segment(m, image, grow=True, limits=BIG, points={1: CENTRE})
    assert dbg.grown and dbg.growth_stop == growth.COMPLETE and dbg.tiles > 8
    assert len(dbg.tiles_start_stop_zyx) == dbg.tiles and dbg.tiles_start_stop_zyx[0] == dbg0.tiles_start_stop_zyx[0]
    np.testing.assert_array_equal(mask, truth)
    # no seam: the blend of many tiles gives what one pass over the whole image gives (pointwise model)
    expected = 1 / (1 + np.exp(-4 * (np.clip(image.array, -918, 723) + 63.00682013436269) / 282.3602283405916))
    covered = prob > 0
    assert covered[truth].all()
    np.testing.assert_allclose(prob[covered], expected[covered], atol=2e-6)


def test_published_plans_click_covers_a_lesion_longer_than_the_patch(tmp_path):
    """The published plans (patch 160 x 224 x 224 at 1 x 0.8 x 0.8 mm; random weights, replaced by the
    thresholding net): a click on a lesion 1.8 patches long gives the whole lesion, default limits."""
    write_random_checkpoint(tmp_path, kinds=("point",), patch_size=(160, 224, 224), features_per_stage=(2, 2, 2, 2))
    m = threshold_model(tmp_path / "LesionLocatorCheckpoint")
    shape, centre = (160, 224, 480), (80, 112, 240)
    arr = ellipsoid(shape, centre, (40, 60, 200))
    image = Volume(arr, spacing=(1.0, 0.8, 0.8))
    masks, debugs = [], []
    for grow in (False, True):
        s = m.session(grow=grow)
        s.set_image(image)
        masks.append(s.segment(points={1: centre}).mask(1).astype(bool))
        debugs.append(s.last_debug[1])
    assert debugs[0].tiles == 1 and masks[0].sum() < 0.8 * (arr > 0).sum()
    dbg = debugs[1]
    assert dbg.grown and dbg.growth_stop == growth.COMPLETE
    assert dbg.tiles_start_stop_zyx[0] == [[0, 160], [0, 224], [128, 352]]  # the published centred patch
    assert sorted(t[2][0] for t in dbg.tiles_start_stop_zyx[1:]) == sliding_window_steps(shape, (160, 224, 224))[2]
    np.testing.assert_array_equal(masks[1], arr > 0)


def test_published_blend_of_every_tile_and_stop_at_max_tiles(ckpt, big_lesion):
    """With a context-dependent network, the grown logits are exactly the published Gaussian blend of the tiles
    listed in the debug record (which stops at the tile limit)."""
    image, _ = big_lesion
    m = LesionLocatorModel(ckpt, device="cpu")
    pm = m.prompt_model("point")
    pm.networks = [ThresholdPlusUNet(pm.networks[0])]
    limits = GrowthLimits(max_tiles=7, max_extent=6.0)
    _, prob, dbg = segment(m, image, grow=True, limits=limits, points={1: CENTRE})
    assert dbg.grown and dbg.tiles == 7 and dbg.growth_stop == growth.MAX_TILES
    tiles = [tuple(tuple(ax) for ax in t) for t in dbg.tiles_start_stop_zyx]
    assert len(set(tiles)) == 7
    # reference: the published formula sum(g * pred) / sum(g), computed here from scratch
    prepared = PreparedImage(image, m)
    grid = prepared.grid("point")
    assert grid.padded_shape == SHAPE and grid.pad_below == (0, 0, 0)
    stats = m.config("point").ct_stats
    x = torch.zeros((2, *SHAPE))
    x[0] = (torch.from_numpy(image.array.astype(np.float32)).clamp(stats.lower, stats.upper) - stats.mean) / stats.std
    enc = encode_prompt(Point(CENTRE), grid, "point")
    x[1] = torch.from_numpy(enc.on_box(tuple((0, n) for n in SHAPE)))
    g = torch.from_numpy(np.array(gaussian_importance(PATCH)))
    acc, w = torch.zeros((2, *SHAPE)), torch.zeros(SHAPE)
    for t in tiles:
        sl = tuple(slice(a, b) for a, b in t)
        acc[(slice(None),) + sl] += m.forward("point", x[(slice(None),) + sl]) * g
        w[sl] += g
    covered = (w > 0).numpy()
    ref = torch.softmax(acc / w.clamp_min(1e-30), 0)[1].numpy()
    # a grown result keeps the prompt's foreground component; other foreground becomes background (1 - p)
    labels, _ = ndimage.label((ref > 0.5) & covered, np.ones((3, 3, 3)))
    ids = np.unique(labels[x[1].numpy() > 0])
    lesion = np.isin(labels, ids[ids > 0])
    other = (ref > 0.5) & covered & ~lesion
    ref = np.where(other, 1 - ref, ref)
    # the export (identity resampling here) keeps a voxel when its interpolation neighbours, the next voxel
    # on each axis (clamped at the image end), were predicted: the published NaN rule
    ok = covered.copy()
    for ax in range(3):
        ok &= np.concatenate([np.take(covered, range(1, SHAPE[ax]), ax), np.take(covered, [-1], ax)], ax)
    assert ok.sum() > 0.9 * covered.sum()
    np.testing.assert_allclose(prob[ok], ref[ok], atol=1e-5)
    assert not prob[~covered].any()


def test_other_foreground_in_added_tiles_is_dropped(ckpt, big_lesion):
    image, truth = big_lesion
    arr = image.array.copy()
    arr[20:30, 5:12, 150:165] = 200  # a separate bright structure that only the added tiles see
    other = Volume(arr, spacing=image.spacing)
    mask, prob, dbg = segment(threshold_model(ckpt), other, grow=True, limits=BIG, points={1: CENTRE})
    assert dbg.grown and any(t[1][0] <= 5 and t[2][1] >= 165 for t in dbg.tiles_start_stop_zyx)
    np.testing.assert_array_equal(mask, truth)
    assert (prob[20:30, 5:12, 150:165] < 0.5).all()


def test_deterministic(ckpt, big_lesion):
    image, _ = big_lesion
    m = LesionLocatorModel(ckpt, device="cpu")
    limits = GrowthLimits(max_tiles=9, max_extent=6.0)
    a = segment(m, image, grow=True, limits=limits, points={1: CENTRE})
    b = segment(LesionLocatorModel(ckpt, device="cpu"), image, grow=True, limits=limits, points={1: CENTRE})
    assert a[2].tiles_start_stop_zyx == b[2].tiles_start_stop_zyx
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


# -- limits ---------------------------------------------------------------------------------------------

def test_stops_at_the_extent_window(ckpt, big_lesion):
    image, truth = big_lesion
    m = threshold_model(ckpt)
    limits = GrowthLimits(max_tiles=400, max_extent=1.5)
    mask, _, dbg = segment(m, image, grow=True, limits=limits, points={1: CENTRE})
    assert dbg.grown and dbg.growth_stop == growth.MAX_EXTENT
    cut, _, _ = segment(m, image, grow=False, points={1: CENTRE})
    assert cut.sum() < mask.sum() < truth.sum() and not (mask & ~truth).any()
    # every tile overlaps the 1.5-patch window around the click (72 voxels along x: 54..126)
    for t in dbg.tiles_start_stop_zyx:
        assert t[2][0] < 126 and t[2][1] > 54


def test_default_limit_is_applied(ckpt, big_lesion):
    image, truth = big_lesion
    mask, _, dbg = segment(threshold_model(ckpt), image, points={1: CENTRE})  # grow: the model's default, on
    assert dbg.grown and dbg.growth_stop in (growth.COMPLETE, growth.MAX_TILES)
    assert dbg.tiles <= growth.DEFAULT_LIMITS.max_tiles
    assert dice(mask, truth) > 0.9


# -- published behaviour when nothing needs to grow -------------------------------------------------------

def test_equal_to_published_when_the_lesion_fits(ckpt):
    arr = ellipsoid((48, 80, 80), (24, 40, 40), (8, 12, 14))
    image = Volume(arr, spacing=(1.0, 0.8, 0.8))
    m = threshold_model(ckpt)
    for prompts in ({"points": {1: (24, 40, 40)}}, {"boxes": {1: (4, 44, 2, 78, 3, 77)}}):  # box > patch
        off = segment(m, image, grow=False, **prompts)
        on = segment(m, image, grow=True, **prompts)
        assert on[2].growth_stop == growth.NOT_NEEDED and not on[2].grown
        assert on[2].tiles_start_stop_zyx == off[2].tiles_start_stop_zyx
        np.testing.assert_array_equal(on[0], off[0])
        np.testing.assert_array_equal(on[1], off[1])
        np.testing.assert_array_equal(on[0], arr > 0)
    assert off[2].tiles > 1  # the box took the published multi-tile path


def test_model_setting_turns_growth_off(ckpt, big_lesion):
    image, _ = big_lesion
    m = threshold_model(ckpt, grow=False)
    assert m.settings()["grow"] is False and threshold_model(ckpt).settings()["grow"] is True
    s = m.session()
    s.set_image(image)
    s.segment(points={1: CENTRE})
    assert s.last_debug[1].tiles == 1 and s.last_debug[1].growth_stop == growth.OFF
    assert growth.summary(s.last_debug) == {"grown": [], "tiles": {1: 1}, "stopped": {}}


def test_image_border_is_not_an_open_face(ckpt):
    # the lesion leaves the image on both z faces (the image is smaller than the patch in z: padded there) and
    # on the low x face: growth may not go past the scan, and the click grows only in y and high x
    arr = ellipsoid((20, 100, 120), (10, 50, 10), (30, 40, 60))
    image = Volume(arr, spacing=(1.0, 0.8, 0.8))
    mask, _, dbg = segment(threshold_model(ckpt), image, grow=True, limits=BIG, points={1: (10, 50, 10)})
    assert dbg.grown and dbg.growth_stop == growth.COMPLETE
    np.testing.assert_array_equal(mask, arr > 0)


# -- boxes, masks and the track model ---------------------------------------------------------------------

def test_box_larger_than_a_patch_grows_past_the_box(ckpt, big_lesion):
    image, truth = big_lesion
    box = (28, 36, 50, 60, 60, 120)  # inside the lesion, larger than a patch in x: published multi-tile path
    cut, _, dbg0 = segment(threshold_model(ckpt), image, grow=False, boxes={1: box})
    assert dbg0.tiles > 1 and cut.sum() < truth.sum()
    mask, _, dbg = segment(threshold_model(ckpt), image, grow=True, limits=BIG, boxes={1: box})
    assert dbg.grown and dbg.growth_stop == growth.COMPLETE
    assert dbg.tiles_start_stop_zyx[:dbg0.tiles] == dbg0.tiles_start_stop_zyx
    np.testing.assert_array_equal(mask, truth)


def test_mask_prompt_grows(ckpt, big_lesion):
    image, truth = big_lesion
    part = np.zeros(SHAPE, bool)
    part[26:38, 45:65, 70:110] = True
    s = threshold_model(ckpt).session()
    s.set_image(image)
    r = s.segment(masks={1: part})
    assert s.last_debug[1].grown
    assert dice(r.mask(1).astype(bool), truth) > 0.9


def test_track_kind_grows_from_a_warped_mask(ckpt, big_lesion):
    """The tracker's refinement path: kind 'track', a mask prompt, the published single patch on its centre."""
    image, truth = big_lesion
    m = threshold_model(ckpt)
    prepared = PreparedImage(image, m)
    grid = prepared.grid("track")
    warped = np.zeros(SHAPE, np.uint8)
    warped[28:36, 50:60, 80:100] = 1
    box = ((28, 36), (50, 60), (80, 100))
    enc = EncodedPrompt("mask", box, warped[28:36, 50:60, 80:100], [28, 36, 50, 60, 80, 100])
    tile = [((16, 48), (31, 79), (66, 114))]  # centred on the mask, as the tracker places it
    les0, d0 = predict_lesion(prepared, 1, "track", enc, tile, grow=False)
    les, d = predict_lesion(prepared, 1, "track", enc, tile, grow=True, limits=BIG)
    assert d0.tiles == 1 and les0.voxels < 0.5 * truth.sum()
    assert d.grown and d.growth_stop == growth.COMPLETE
    np.testing.assert_array_equal(les.full(SHAPE), truth)
    assert grid.padded_shape == SHAPE


# -- the pieces --------------------------------------------------------------------------------------------

def test_open_faces_ignore_padding_and_predicted_neighbours():
    lesion = np.zeros((6, 6, 6), bool)
    lesion[0:3, 2:4, 5] = True  # touches the low z face and the high x face of the canvas
    covered = np.ones((6, 6, 6), bool)
    canvas = ((10, 16), (10, 16), (10, 16))
    faces = open_faces(lesion, covered, canvas, ((0, 100),) * 3)
    assert {k for k, v in faces.items() if v} == {(0, -1), (2, 1)}
    # the image ends where the canvas ends in x, and below z = 10: nothing is open
    faces = open_faces(lesion, covered, canvas, ((10, 100), (0, 100), (0, 16)))
    assert not any(faces.values())
    # a neighbour inside the canvas that no tile predicted is open too
    covered[:, :, 4] = False
    lesion2 = np.zeros_like(lesion)
    lesion2[3, 3, 3] = True
    assert {k for k, v in open_faces(lesion2, covered, canvas, ((0, 100),) * 3).items() if v} == {(2, 1)}


def test_lesion_is_what_touches_the_prompt():
    fg = np.zeros((10, 10, 10), bool)
    fg[1:4, 1:4, 1:4] = True
    fg[6:9, 6:9, 6:9] = True
    fg[4, 4, 4] = True  # diagonal neighbour of the first block: same lesion (26-connected)
    prompt = np.zeros_like(fg)
    prompt[2, 2, 2] = True
    les = lesion_of(fg, prompt)
    assert les[1:4, 1:4, 1:4].all() and les[4, 4, 4] and not les[6:9, 6:9, 6:9].any()
    assert not lesion_of(fg, np.zeros_like(fg)).any()


def test_next_tiles_reach_the_touched_neighbour():
    padded, patch = (64, 96, 200), (32, 48, 48)
    first = ((16, 48), (24, 72), (76, 124))  # a centred patch, off the sliding-window grid
    lesion = ((20, 40), (30, 60), (80, 124))  # touches the patch's high x face: neighbour x = 124 is open
    faces = {(a, s): False for a in range(3) for s in (-1, 1)}
    faces[(2, 1)] = True
    window = ((0, 64), (0, 96), (0, 200))
    new = next_tiles(lesion, faces, {first}, padded, patch, window)
    assert first not in new and len(set(new)) == len(new)
    assert any(t[2][0] <= 124 < t[2][1] for t in new)
    assert all(t in window_tiles(padded, patch, (20, 30, 80), (39, 59, 124)) for t in new)
    # a window ending at the face: only the tiles over the lesion's own box
    clipped = next_tiles(lesion, faces, {first}, padded, patch, ((0, 64), (0, 96), (0, 124)))
    assert clipped == [t for t in window_tiles(padded, patch, (20, 30, 80), (39, 59, 123), min_overlap=(8, 12, 12))
                       if t != first]


def test_canvas_blend_and_growth():
    g = torch.from_numpy(np.array(gaussian_importance((4, 4, 4))))
    c = Canvas(((0, 4), (0, 4), (0, 4)), 2, torch.device("cpu"))
    c.add(((0, 4), (0, 4), (0, 4)), torch.ones((2, 4, 4, 4)), g)
    c.add(((2, 6), (0, 4), (0, 4)), 3 * torch.ones((2, 4, 4, 4)), g)
    assert c.box == ((0, 6), (0, 4), (0, 4))
    lg = c.logits()
    w0, w1 = g[2:4], g[0:2]
    torch.testing.assert_close(lg[0, 2:4], (w0 + 3 * w1) / (w0 + w1))
    torch.testing.assert_close(lg[0, :2], torch.ones((2, 4, 4)))
    c.add(((0, 4), (4, 8), (0, 4)), torch.ones((2, 4, 4, 4)), g)  # leaves a hole at z 4..6, y 4..8
    assert not c.covered()[4:, 4:].any()
    assert (c.logits()[1, 4:, 4:] == growth.UNCOVERED_LOGITS[1]).all()


def test_cancel_stops_growth_between_tiles(ckpt, big_lesion):
    """A cancel event is checked before every tile: a long growth stops within one forward pass."""
    from LesionLocatorLib.core.jobs import Cancelled

    image, _ = big_lesion
    model = threshold_model(ckpt)
    s = model.session()
    s.set_image(image)

    class SetAfter:  # an Event that becomes set after n checks
        def __init__(self, n):
            self.n, self.calls = n, 0

        def is_set(self):
            self.calls += 1
            return self.calls > self.n

    before = model.network_passes
    s.segment(points={1: CENTRE})
    full = model.network_passes - before
    assert full > 6, full  # the click grew over many tiles
    before = model.network_passes
    with pytest.raises(Cancelled):
        s.segment(points={1: CENTRE}, cancel=SetAfter(4))
    assert model.network_passes - before == 3  # one check before the lesion, then one per tile
