"""One image prepared for a model, and one lesion predicted on it from an encoded prompt.

Processing is limited to the tiles around each prompt: the image region they need is normalised and
resampled on the fly with the whole scan's sampling grid (see model/resampling.py), so a click costs the
same on a small crop and on a whole-body CT, and gives what whole-scan processing would give inside the
patch. Used by segmentation sessions and by the tracker's refinement UNet (same code path).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core.geometry import GeometryError, Volume
from ..core.image_io import read_image
from ..core.prompts import EncodedPrompt
from ..core.results import LesionMask
from ..model.engine import Folds, LesionLocatorModel
from ..model.preprocessing import PreprocessedGrid, clip_ranges, plan_grid
from ..model.resampling import Box as GridBox
from ..model.sliding_window import gaussian_importance, tiles_for_prompt, union_box

log = logging.getLogger(__name__)
Tiles = List[Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]]


@dataclass
class LesionDebug:
    """The published pipeline's intermediate values for one lesion (for parity checks and logs)."""

    sparse_prompt_resampled_grid: List[int]
    dense_prompt_voxels: int
    dense_prompt_bbox_incl_zyx: List[List[int]]
    padded_shape_zyx: List[int]
    tiles_start_stop_zyx: List[List[List[int]]]
    seconds: float = 0.0


def load_volume(image: Union[Volume, str, os.PathLike]) -> Volume:
    """A Volume (read from a path when needed) with finite numeric voxels, or a GeometryError."""
    if not isinstance(image, Volume):
        image = read_image(image)
    arr = image.array
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise GeometryError(f"image voxels must be numbers, got dtype {arr.dtype}")
    if min(arr.shape) < 1:
        raise GeometryError(f"image is empty: shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise GeometryError("image contains NaN or infinite values")
    return image


class PreparedImage:
    """One image and, per model kind, its crop box, resampling grid and clip ranges (computed once)."""

    def __init__(self, image: Volume, model: LesionLocatorModel):
        self.image = image
        self.model = model
        self._grids: Dict[str, PreprocessedGrid] = {}
        self._clip: Dict[str, Any] = {}

    def grid(self, kind: str) -> PreprocessedGrid:
        if kind not in self._grids:
            cfg = self.model.config(kind)
            self._grids[kind] = plan_grid(self.image.array, self.image.spacing, cfg)
            self._clip[kind] = clip_ranges(self.image.array, self._grids[kind], cfg.ct_stats)
        return self._grids[kind]

    def clip(self, kind: str) -> Any:
        self.grid(kind)
        return self._clip[kind]


def predict_lesion(prepared: PreparedImage, lid: int, kind: str, enc: EncodedPrompt, tiles: Optional[Tiles] = None,
                   return_probabilities: bool = False, center: Optional[Sequence[float]] = None,
                   tta: Optional[bool] = None, folds: Folds = None) -> Tuple[LesionMask, LesionDebug]:
    """Run the ``kind`` model on an encoded prompt (default tiles: the published placement) and export the
    result to the image's grid."""
    t0 = time.perf_counter()
    model = prepared.model
    grid = prepared.grid(kind)
    cfg = model.config(kind)
    lo, hi = enc.bbox_incl
    pad = np.asarray(grid.pad_below)
    if tiles is None:
        tiles = tiles_for_prompt(grid.padded_shape, cfg.patch_size, np.asarray(lo) + pad, np.asarray(hi) + pad)
    debug = LesionDebug(enc.sparse, enc.voxels(), [lo, hi], list(grid.padded_shape),
                        [[list(ax) for ax in t] for t in tiles])
    center_t = None if center is None else tuple(float(v) for v in center)
    logits, values_box = _predict_region(prepared, kind, enc, tiles, tta, folds)
    out_box = grid.backward.valid_output_box(values_box)
    if out_box is None:
        return LesionMask.not_found(lid, center_t), debug
    vals, _ = grid.backward.prob_region(logits, values_box, out_box)
    fg = vals[1] > vals[0]
    prob = None
    if return_probabilities:
        m = np.maximum(vals[0], vals[1])
        e0, e1 = np.exp(vals[0] - m), np.exp(vals[1] - m)
        prob = (e1 / (e0 + e1)).astype(np.float32)
    c = grid.crop_start
    bbox = (int(out_box[0][0] + c[0]), int(out_box[0][1] + c[0]), int(out_box[1][0] + c[1]),
            int(out_box[1][1] + c[1]), int(out_box[2][0] + c[2]), int(out_box[2][1] + c[2]))
    les = LesionMask(lid, bbox, fg, prob, center_voxel=center_t)  # type: ignore[arg-type]
    if not return_probabilities or les.empty:
        les = les.shrink()
    debug.seconds = time.perf_counter() - t0
    log.info("lesion %d: %d voxels, %d tile(s), %.2f s", lid, les.voxels, len(tiles), debug.seconds)
    return les, debug


def _predict_region(prepared: PreparedImage, kind: str, enc: EncodedPrompt, tiles: Tiles, tta: Optional[bool],
                    folds: Folds) -> Tuple[torch.Tensor, GridBox]:
    """Logits (float32 tensor on the model's device) on the covered part of the resampled grid, and that
    part's box. Region preprocessing and tile blending run on the device too (GPU clicks do not wait for
    CPU resampling)."""
    model = prepared.model
    grid = prepared.grid(kind)
    cfg = model.config(kind)
    pad = grid.pad_below
    region_p = union_box(tiles)
    region_r = tuple((a - p, b - p) for (a, b), p in zip(region_p, pad))
    values_box = tuple((max(a, 0), min(b, n)) for (a, b), n in zip(region_r, grid.resampled_shape))
    dev = model.device
    src = prepared.image.array[tuple(slice(a, b) for a, b in grid.crop)]
    stats = cfg.ct_stats

    def normalize(t: torch.Tensor) -> torch.Tensor:  # nnU-Net CTNormalization, float32 as in numpy
        return (t.float().clamp(stats.lower, stats.upper) - stats.mean) / max(stats.std, 1e-8)

    with torch.inference_mode():
        values = grid.forward.image_region(src, values_box, normalize, prepared.clip(kind), device=dev)
        # network input on the union of tiles (zero outside the scan = nnU-Net's constant padding)
        x_region = torch.zeros((2, *[b - a for a, b in region_r]), dtype=torch.float32, device=dev)
        x_region[(0,) + tuple(slice(va - ra, vb - ra) for (va, vb), (ra, _) in zip(values_box, region_r))] = values
        x_region[1] = torch.from_numpy(enc.on_box(region_r)).to(dev)
        if len(tiles) == 1:
            logits = model.forward(kind, x_region, tta=tta, folds=folds)
        else:
            gauss = torch.from_numpy(np.array(gaussian_importance(tuple(cfg.patch_size))))
            acc = weight = None
            for t in tiles:
                sl = tuple(slice(a - ra, b - ra) for (a, b), (ra, _) in zip(t, region_p))
                pred = model.forward(kind, x_region[(slice(None),) + sl], tta=tta, folds=folds)
                if acc is None:  # allocated after the first tile: a CPU fallback may have moved the device
                    acc = torch.zeros((cfg.num_classes, *x_region.shape[1:]), dtype=torch.float32,
                                      device=pred.device)
                    weight = torch.zeros(x_region.shape[1:], dtype=torch.float32, device=pred.device)
                g = gauss.to(pred.device)
                acc[(slice(None),) + sl] += pred.to(acc.device) * g
                weight[sl] += g
            logits = acc / weight
        crop = tuple(slice(va - ra, vb - ra) for (va, vb), (ra, _) in zip(values_box, region_r))
        return logits[(slice(None),) + crop].contiguous(), values_box  # type: ignore[return-value]
