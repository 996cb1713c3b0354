"""Patch placement around a prompt and nnU-Net's sliding-window tiles and Gaussian weighting."""
from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

from ..core.boxes import Spans



def sliding_window_steps(image_size: Sequence[int], patch: Sequence[int], step: float = 0.5) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``: evenly spread starts, step <= step * patch."""
    steps = []
    for n, p in zip(image_size, patch):
        num = int(np.ceil((n - p) / (p * step))) + 1
        if num > 1:
            actual = (n - p) / (num - 1)
            steps.append([int(np.round(actual * i)) for i in range(num)])
        else:
            steps.append([0])
    return steps


def tiles_for_prompt(padded_shape: Sequence[int], patch: Sequence[int], bbox_lo: Sequence[int],
                     bbox_hi: Sequence[int], step: float = 0.5) -> list[Spans]:
    """Tiles (padded-grid coordinates) that cover a prompt with inclusive bbox [lo, hi].

    One centred patch when the prompt is smaller than the patch on every axis; otherwise the
    sliding-window tiles that overlap the prompt.
    """
    size = [h - l + 1 for l, h in zip(bbox_lo, bbox_hi)]
    if all(s < p for s, p in zip(size, patch)):
        tile = []
        for l, h, p, n in zip(bbox_lo, bbox_hi, patch, padded_shape):
            start = int((l + h - p) / 2)  # int() truncates toward zero, as published
            start = min(max(start, 0), n - p)
            tile.append((start, start + p))
        return [tuple(tile)]  # type: ignore[list-item]
    return window_tiles(padded_shape, patch, bbox_lo, bbox_hi, step)


def window_tiles(padded_shape: Sequence[int], patch: Sequence[int], lo: Sequence[int], hi: Sequence[int],
                 step: float = 0.5, min_overlap: Sequence[int] | None = None) -> list[Spans]:
    """The nnU-Net sliding-window tiles (steps over the whole padded image) that overlap the inclusive
    box [lo, hi]; also where a lesion's prediction grows past its patch (segment/growth.py).

    ``min_overlap`` (per axis): keep only tiles that overlap the box by at least that many voxels (or by the
    whole box where it is shorter). Up to half a patch this still covers every voxel of the box: on each
    axis the tile with the last start at or before a voxel reaches at least half a patch past it.
    """
    steps = sliding_window_steps(padded_shape, patch, step)
    keep = []
    for ax in range(3):
        need = 1 if min_overlap is None else max(1, min(int(min_overlap[ax]), hi[ax] - lo[ax] + 1))
        keep.append([s for s in steps[ax] if min(s + patch[ax], hi[ax] + 1) - max(s, lo[ax]) >= need])
    return [((z, z + patch[0]), (y, y + patch[1]), (x, x + patch[2]))
            for z in keep[0] for y in keep[1] for x in keep[2]]


@lru_cache(maxsize=8)
def gaussian_importance(patch: tuple[int, int, int], sigma_scale: float = 1.0 / 8, value_scale: float = 10.0) -> np.ndarray:
    """nnU-Net's Gaussian importance map: sigma = patch/8, peak 10, zeros -> smallest non-zero."""
    tmp = np.zeros(patch)
    tmp[tuple(p // 2 for p in patch)] = 1
    g = gaussian_filter(tmp, [p * sigma_scale for p in patch], 0, mode="constant", cval=0)
    g = g / (g.max() / value_scale)
    g = g.astype(np.float32)
    g[g == 0] = g[g > 0].min()
    g.setflags(write=False)
    return g


def union_box(tiles: Sequence[Spans]) -> Spans:
    return tuple((min(t[ax][0] for t in tiles), max(t[ax][1] for t in tiles)) for ax in range(3))  # type: ignore[return-value]
