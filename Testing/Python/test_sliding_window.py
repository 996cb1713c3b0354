"""Patch placement and sliding-window tiles (nnU-Net semantics)."""
import numpy as np

from LesionLocatorLib.model.sliding_window import (gaussian_importance, sliding_window_steps, tiles_for_prompt,
                                                   union_box, window_tiles)


def test_steps_match_nnunet_formula():
    # 600 voxels, patch 224, step 112: ceil((600-224)/112)+1 = 5 tiles evenly spread over 376
    assert sliding_window_steps([600, 160, 224], [224, 160, 224])[0] == [0, 94, 188, 282, 376]
    assert sliding_window_steps([600, 160, 224], [224, 160, 224])[1:] == [[0], [0]]


def test_single_patch_centred_as_published():
    # DeepLesion references: box bbox (padded coords) -> tile starts 0, 250, 189
    tiles = tiles_for_prompt([160, 600, 600], [160, 224, 224], [47, 332, 269], [111, 392, 334])
    assert tiles == [((0, 160), (250, 474), (189, 413))]
    tiles = tiles_for_prompt([160, 600, 600], [160, 224, 224], [72, 355, 299], [82, 365, 309])
    assert tiles == [((0, 160), (248, 472), (192, 416))]


def test_large_prompt_gets_overlapping_tiles_that_cover_it():
    padded, patch = [40, 300, 300], [32, 64, 64]
    lo, hi = [5, 50, 60], [30, 200, 130]
    tiles = tiles_for_prompt(padded, patch, lo, hi)
    assert len(tiles) > 1
    cover = np.zeros(padded, bool)
    for t in tiles:
        cover[tuple(slice(a, b) for a, b in t)] = True
        assert all(a <= h and b > l for (a, b), l, h in zip(t, lo, hi)), "tile does not overlap the prompt"
    assert cover[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].all()
    u = union_box(tiles)
    assert all(a <= l and b > h for (a, b), l, h in zip(u, lo, hi))


def test_gaussian_importance():
    g = gaussian_importance((16, 24, 24))
    assert g.shape == (16, 24, 24) and g.min() > 0
    assert np.isclose(g.max(), 10.0) and g[8, 12, 12] == g.max()
    assert not g.flags.writeable


def test_window_tiles_are_the_grid_tiles_over_a_box():
    padded, patch = [64, 110, 180], [32, 48, 48]
    steps = sliding_window_steps(padded, patch)
    tiles = window_tiles(padded, patch, [20, 30, 80], [39, 59, 124])
    for t in tiles:  # on the published grid, overlapping the box
        assert all(a in s for (a, _), s in zip(t, steps))
        assert all(a <= h and b > l for (a, b), l, h in zip(t, [20, 30, 80], [39, 59, 124]))
    others = [((z, z + 32), (y, y + 48), (x, x + 48)) for z in steps[0] for y in steps[1] for x in steps[2]]
    missing = [t for t in others if t not in tiles
               and all(a <= h and b > l for (a, b), l, h in zip(t, [20, 30, 80], [39, 59, 124]))]
    assert missing == [] and len(set(tiles)) == len(tiles)
    # the published placement of a prompt larger than a patch is exactly this rule
    assert tiles_for_prompt(padded, patch, [20, 30, 20], [39, 59, 124]) == window_tiles(padded, patch, [20, 30, 20],
                                                                                        [39, 59, 124])


def test_window_tiles_with_a_minimum_overlap_still_cover_the_box():
    rng = np.random.default_rng(0)
    for _ in range(200):
        patch = [int(v) for v in rng.integers(8, 40, 3)]
        padded = [p + int(v) for p, v in zip(patch, rng.integers(0, 150, 3))]
        lo = [int(rng.integers(0, n)) for n in padded]
        hi = [int(rng.integers(a, n)) for a, n in zip(lo, padded)]
        for frac in (4, 2):
            need = [p // frac for p in patch]
            tiles = window_tiles(padded, patch, lo, hi, min_overlap=need)
            assert set(tiles) <= set(window_tiles(padded, patch, lo, hi))
            cover = np.zeros(padded, bool)
            for t in tiles:
                cover[tuple(slice(a, b) for a, b in t)] = True
                for (a, b), l, h, q in zip(t, lo, hi, need):
                    assert min(b, h + 1) - max(a, l) >= min(q, h - l + 1)
            assert cover[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1].all()
    # fewer tiles than the published any-overlap rule for a box one patch wide: 3 per axis instead of 4
    box = dict(lo=[40, 60, 60], hi=[71, 107, 107])
    assert len(window_tiles([200, 300, 300], [32, 48, 48], **box)) == 4 ** 3
    assert len(window_tiles([200, 300, 300], [32, 48, 48], min_overlap=[8, 12, 12], **box)) == 3 ** 3
