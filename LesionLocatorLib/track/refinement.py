"""The LesionLocatorTrack UNet step: patch placement, one pass of the UNet, averaging passes, export.

Geometry of one pass (the published TrackNet, section 3 of the reference): the follow-up's preprocessed scan,
flipped for a TTA pass and cut to its z window, is the *pass frame*. The patch centre is the rounded centre of
mass of the warped prompt in that frame; the slicer is [c - p//2, c + p//2) per axis shifted into the frame, or
the whole axis when the frame is smaller than the patch (then zero padding, (p - n) // 2 before, on z, y and x:
the published code pads the wrong axes). Everything outside the patch is background, logits (1, 0); a pass's
logits go back to the unflipped follow-up grid at the window offset, and passes (TTA flips, then folds) are
averaged. Lesions larger than a patch get every sliding-window tile that overlaps them (the published code cuts
them off).

Passes are accumulated as the difference to the background logits on a box that grows with the patches, so
the memory is that of the patches, not of the scan. The export resamples that box plus a margin: what
resampling the whole logit map (background outside the patches) gives, including foreground that reaches past
the patch border through the trilinear interpolation.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.results import LesionMask
from ..model.engine import LesionLocatorModel
from ..model.preprocessing import PreprocessedGrid
from ..model.sliding_window import gaussian_importance, tiles_for_prompt, union_box

Box3 = Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]
BACKGROUND = (1.0, 0.0)  # the published logits outside the patch


def centre_of_mass(mask: np.ndarray) -> Optional[Tuple[int, int, int]]:
    """round(mean of the voxel indices) as the published code computes it: float32 mean, round half to even."""
    idx = torch.nonzero(torch.from_numpy(np.ascontiguousarray(mask)))
    if idx.shape[0] == 0:
        return None
    c = torch.round(idx.float().mean(0))
    return tuple(int(v) for v in c)  # type: ignore[return-value]


def published_slicer(centre: Sequence[int], shape: Sequence[int], patch: Sequence[int]) -> Box3:
    """The published patch around ``centre``: [c - p//2, c - p//2 + p) shifted into [0, n), or [0, n) when the
    frame is smaller than the patch (that axis is zero-padded to the patch)."""
    out = []
    for c, n, p in zip(centre, shape, patch):
        if n <= p:
            out.append((0, int(n)))
        else:
            start = min(max(int(c) - p // 2, 0), n - p)
            out.append((start, start + p))
    return tuple(out)  # type: ignore[return-value]


@dataclass
class PassPlacement:
    """Where one pass runs the UNet, in the pass frame (flipped follow-up cut to its z window)."""

    centre: Optional[Tuple[int, int, int]]
    slicer: Box3  # the published patch (or the union of tiles for a lesion larger than a patch), frame voxels
    tiles: List[Box3]  # tiles in the padded frame (padding (p - n) // 2 before where the frame is smaller)
    pad_below: Tuple[int, int, int]


def place_patch(warped: np.ndarray, patch: Sequence[int]) -> Optional[PassPlacement]:
    """Patch(es) for a warped prompt on the pass frame; None when the prompt is empty (nothing to refine)."""
    shape = warped.shape
    centre = centre_of_mass(warped)
    if centre is None:
        return None
    pad = tuple(max(p - n, 0) // 2 for n, p in zip(shape, patch))
    padded = tuple(max(n, p) for n, p in zip(shape, patch))
    nz = np.nonzero(np.any(warped, axis=(1, 2))), np.nonzero(np.any(warped, axis=(0, 2))), \
        np.nonzero(np.any(warped, axis=(0, 1)))
    lo = np.array([int(a[0][0]) for a in nz])
    hi = np.array([int(a[0][-1]) for a in nz])
    slicer = published_slicer(centre, shape, patch)
    if np.all(hi - lo + 1 < np.asarray(patch)):
        # padded frame: a smaller axis is padded to exactly the patch, so its tile is [0, p)
        tiles = [tuple((a if n > p else 0, (a if n > p else 0) + p) for (a, _), n, p in zip(slicer, shape, patch))]
    else:  # larger than a patch on some axis: cover it with the overlapping sliding-window tiles
        tiles = tiles_for_prompt(padded, patch, lo + np.asarray(pad), hi + np.asarray(pad))
        u = union_box(tiles)
        slicer = tuple((max(a - d, 0), min(b - d, n)) for (a, b), d, n in zip(u, pad, shape))  # type: ignore
    return PassPlacement(centre, slicer, [tuple(t) for t in tiles], pad)  # type: ignore[misc]


def run_pass(model: LesionLocatorModel, image: np.ndarray, prompt: np.ndarray, place: PassPlacement,
             fold: Optional[int], unet_tta: bool = False) -> Tuple[torch.Tensor, Box3]:
    """Track UNet logits (2, ...) on ``place.slicer`` of the pass frame ``image`` / ``prompt`` (same shape),
    zero outside the frame. ``unet_tta`` mirrors the UNet input only (the fast approximation of TTA)."""
    cfg = model.config("track")
    patch = tuple(cfg.patch_size)
    region = union_box(place.tiles)  # padded frame
    shape = image.shape
    pad = place.pad_below
    x = torch.zeros((2, *[b - a for a, b in region]), dtype=torch.float32)
    src, dst = [], []
    for (ra, rb), d, n in zip(region, pad, shape):
        a, b = max(ra - d, 0), min(rb - d, n)  # frame voxels inside the region
        src.append(slice(a, b))
        dst.append(slice(a + d - ra, b + d - ra))
    x[(0, *dst)] = torch.from_numpy(np.ascontiguousarray(image[tuple(src)], dtype=np.float32))
    x[(1, *dst)] = torch.from_numpy(np.ascontiguousarray(prompt[tuple(src)], dtype=np.float32))
    folds = None if fold is None else [fold]
    if len(place.tiles) == 1:
        logits = model.forward("track", x, tta=unet_tta, folds=folds)
    else:
        gauss = torch.from_numpy(np.array(gaussian_importance(patch)))
        acc = weight = None
        for t in place.tiles:
            sl = tuple(slice(a - ra, b - ra) for (a, b), (ra, _) in zip(t, region))
            pred = model.forward("track", x[(slice(None), *sl)], tta=unet_tta, folds=folds).float().cpu()
            if acc is None:
                acc = torch.zeros((pred.shape[0], *x.shape[1:]), dtype=torch.float32)
                weight = torch.zeros(x.shape[1:], dtype=torch.float32)
            acc[(slice(None), *sl)] += pred * gauss
            weight[sl] += gauss
        logits = acc / weight  # type: ignore[operator]
    logits = logits.float().cpu()
    # undo the padding: keep the frame voxels of the slicer
    keep = tuple(slice(a + d - ra, b + d - ra) for (a, b), d, (ra, _) in zip(place.slicer, pad, region))
    return logits[(slice(None), *keep)], place.slicer


def to_followup_grid(logits: torch.Tensor, box: Box3, z_offset: int, flips: Sequence[int],
                     shape: Sequence[int]) -> Tuple[torch.Tensor, Box3]:
    """Pass-frame logits on ``box`` -> the unflipped follow-up grid: add the z window offset, undo the flips."""
    full = [(box[0][0] + z_offset, box[0][1] + z_offset), box[1], box[2]]
    for ax in flips:
        a, b = full[ax]
        full[ax] = (int(shape[ax]) - b, int(shape[ax]) - a)
    if flips:
        logits = torch.flip(logits, [ax + 1 for ax in flips])
    return logits, tuple(full)  # type: ignore[return-value]


class LogitAccumulator:
    """Sum over passes of (pass logits - background) on a box of the follow-up's preprocessed grid that grows
    with the patches (zero outside: each pass is background outside its patch)."""

    def __init__(self, shape: Sequence[int]):
        self.shape = tuple(int(s) for s in shape)
        self.box: Optional[Box3] = None
        self.delta: Optional[torch.Tensor] = None
        self.passes = 0

    def add_background(self) -> None:
        """A pass that contributes nothing but background (e.g. its warped prompt was empty)."""
        self.passes += 1

    def add(self, logits: torch.Tensor, box: Box3) -> None:
        bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(2, 1, 1, 1)
        d = logits - bg
        if self.box is None:
            self.box, self.delta = box, d.clone()
        else:
            new = tuple((min(a, c), max(b, e)) for (a, b), (c, e) in zip(self.box, box))
            if new != self.box:
                grown = torch.zeros((2, *[b - a for a, b in new]), dtype=torch.float32)
                grown[(slice(None), *[slice(a - n, b - n) for (a, b), (n, _) in zip(self.box, new)])] = self.delta
                self.box, self.delta = new, grown  # type: ignore[assignment]
            sl = tuple(slice(a - n, b - n) for (a, b), (n, _) in zip(box, self.box))
            self.delta[(slice(None), *sl)] += d  # type: ignore[index]
        self.passes += 1

    def export(self, grid: PreprocessedGrid, lid: int, center=None) -> LesionMask:
        """Mean logits (background outside the box) resampled to the original grid as the published export
        resamples the whole map: the box plus one voxel of background on every side is resampled, so voxels
        that interpolate between the patch and the background keep their foreground."""
        if self.box is None or self.passes == 0:
            return LesionMask.not_found(lid, center)
        margin = 2  # trilinear taps are adjacent voxels: one background voxel per side suffices, two are safe
        values_box = tuple((max(a - margin, 0), min(b + margin, n)) for (a, b), n in zip(self.box, self.shape))
        bg = torch.tensor(BACKGROUND, dtype=torch.float32).view(2, 1, 1, 1)
        logits = bg.expand(2, *[b - a for a, b in values_box]).clone()
        sl = tuple(slice(a - v, b - v) for (a, b), (v, _) in zip(self.box, values_box))
        logits[(slice(None), *sl)] += self.delta / self.passes  # type: ignore[operator]
        out_box = grid.backward.valid_output_box(values_box)  # type: ignore[arg-type]
        if out_box is None:
            return LesionMask.not_found(lid, center)
        vals, _ = grid.backward.prob_region(logits, values_box, out_box)  # type: ignore[arg-type]
        fg = vals[1] > vals[0]
        c = grid.crop_start
        bbox = (int(out_box[0][0] + c[0]), int(out_box[0][1] + c[0]), int(out_box[1][0] + c[1]),
                int(out_box[1][1] + c[1]), int(out_box[2][0] + c[2]), int(out_box[2][1] + c[2]))
        return LesionMask(lid, bbox, fg, None, center_voxel=center).shrink()  # type: ignore[arg-type]
