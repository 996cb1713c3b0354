"""A simple non-learned baseline for promptable lesion segmentation: region growing from the click.

Used by ``train/make_default_model.py`` to put the bundled model's numbers next to something trivial,
measured in the same run on the same lesions and prompts.

Method (``region_grow``): smooth the CT slightly (Gaussian, 1 mm), estimate the lesion intensity from a
small sphere (radius 3 mm) around the seed (median and a robust spread from the MAD), keep voxels within
``median +- max(k x spread, min_tolerance_hu)``, take the connected component that holds the seed, limited
to ``max_radius_mm`` around the seed (point) or to the box (box prompt; seed = box centre), then fill holes
and open by one voxel to cut thin leaks.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from LesionLocatorLib.core.geometry import Volume


class BaselineError(ValueError):
    """The seed or box lies outside the image, or the image is not 3D."""


def _sphere_mask(shape: Sequence[int], center: np.ndarray, radius_mm: float, spacing: Sequence[float],
                 box: tuple[slice, ...]) -> np.ndarray:
    grids = np.ogrid[tuple(slice(s.start, s.stop) for s in box)]
    d2 = sum(((g - c) * sp) ** 2 for g, c, sp in zip(grids, center, spacing))
    return d2 <= radius_mm ** 2


def region_grow(image: Volume, seed_zyx: Sequence[float] | None = None,
                box: Sequence[int] | None = None, k: float = 2.5, min_tolerance_hu: float = 40.0,
                max_radius_mm: float = 60.0, smooth_mm: float = 1.0) -> np.ndarray:
    """Boolean lesion mask on the image grid grown from a click (``seed_zyx``) or a box
    ``(z0, z1, y0, y1, x0, x1)`` half-open (seed = box centre, growth limited to the box)."""
    arr = np.asarray(image.array, dtype=np.float32)
    if arr.ndim != 3:
        raise BaselineError(f"expected a 3D image, got shape {arr.shape}")
    shape = np.asarray(arr.shape)
    sp = np.asarray(image.spacing, float)
    if box is not None:
        b = np.asarray(box, int).reshape(3, 2)
        if np.any(b[:, 0] < 0) or np.any(b[:, 1] > shape) or np.any(b[:, 1] <= b[:, 0]):
            raise BaselineError(f"box {list(box)} does not fit the image of shape {tuple(shape)}")
        if seed_zyx is None:
            seed_zyx = (b[:, 0] + b[:, 1] - 1) / 2.0
        region = tuple(slice(int(lo), int(hi)) for lo, hi in b)
    else:
        if seed_zyx is None:
            raise BaselineError("give a seed point or a box")
        s = np.asarray(seed_zyx, float)
        r = np.ceil(max_radius_mm / sp).astype(int)
        region = tuple(slice(max(int(round(c)) - rr, 0), min(int(round(c)) + rr + 1, n))
                       for c, rr, n in zip(s, r, shape))
    seed = np.round(np.asarray(seed_zyx, float)).astype(int)
    if np.any(seed < 0) or np.any(seed >= shape):
        raise BaselineError(f"seed {tuple(seed)} lies outside the image of shape {tuple(shape)}")
    # smooth a margin larger than the region so the filter sees real context at its border
    pad = np.ceil(3 * smooth_mm / sp).astype(int) + 1
    outer = tuple(slice(max(s.start - p, 0), min(s.stop + p, n)) for s, p, n in zip(region, pad, shape))
    sub = ndimage.gaussian_filter(arr[outer], smooth_mm / sp)
    inner = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(region, outer))
    sub = sub[inner]
    local_seed = seed - np.array([s.start for s in region])
    ball = _sphere_mask(sub.shape, local_seed, 3.0, sp, tuple(slice(0, n) for n in sub.shape))
    vals = sub[ball] if ball.any() else sub[tuple(local_seed)][None]
    med = float(np.median(vals))
    spread = 1.4826 * float(np.median(np.abs(vals - med)))
    tol = max(k * spread, min_tolerance_hu)
    inside = np.abs(sub - med) <= tol
    if box is None:
        inside &= _sphere_mask(sub.shape, local_seed, max_radius_mm, sp, tuple(slice(0, n) for n in sub.shape))
    inside = ndimage.binary_opening(inside, iterations=1) | (inside & ball)
    lab, _ = ndimage.label(inside)
    sid = lab[tuple(local_seed)]
    if sid == 0:  # the seed itself was removed: fall back to the component nearest to it
        if lab.max() == 0:
            comp = np.zeros_like(inside)
            comp[tuple(local_seed)] = True
        else:
            dist, (iz, iy, ix) = ndimage.distance_transform_edt(lab == 0, return_indices=True)
            sid = lab[iz[tuple(local_seed)], iy[tuple(local_seed)], ix[tuple(local_seed)]]
            comp = lab == sid
    else:
        comp = lab == sid
    comp = ndimage.binary_fill_holes(comp)
    out = np.zeros(arr.shape, dtype=bool)
    out[region] = comp
    return out
