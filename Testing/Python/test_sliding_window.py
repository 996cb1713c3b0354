"""Patch placement and sliding-window tiles (nnU-Net semantics)."""
import numpy as np

from LesionLocatorLib.model.sliding_window import gaussian_importance, sliding_window_steps, tiles_for_prompt, union_box


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
