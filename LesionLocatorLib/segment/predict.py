"""One image prepared for a model, and one lesion predicted on it from an encoded prompt.

Processing is limited to the tiles around each prompt: the image region they need is normalised and
resampled on the fly with the whole scan's sampling grid (see model/resampling.py), so a click costs the
same on a small crop and on a whole-body CT, and gives what whole-scan processing would give inside the
patch. Used by segmentation sessions and by the tracker's refinement UNet (same code path).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core.geometry import Volume
from ..core.jobs import check_cancel
from ..core.prompts import EncodedPrompt
from ..core.results import LesionMask
from ..model.engine import Folds, LesionLocatorModel
from ..model.preprocessing import PreprocessedGrid, clip_ranges, plan_grid
from ..core.boxes import Spans
from ..model.sliding_window import gaussian_importance, tiles_for_prompt, union_box
from .growth import (DEFAULT_LIMITS, MAX_EXTENT, MAX_TILES, NOT_NEEDED, OFF, COMPLETE, Canvas, GrowthLimits,
                     GrowthOutcome, bbox_of, extent_window, lesion_of, next_tiles, open_faces, order_tiles)

log = logging.getLogger(__name__)
Tiles = List[Spans]


@dataclass
class LesionDebug:
    """The published pipeline's intermediate values for one lesion (for parity checks and logs)."""

    sparse_prompt_resampled_grid: List[int]
    dense_prompt_voxels: int
    dense_prompt_bbox_incl_zyx: List[List[int]]
    padded_shape_zyx: List[int]
    tiles_start_stop_zyx: List[List[List[int]]]  # every tile run: the published ones first, then growth's
    seconds: float = 0.0
    grown: bool = False  # the prediction continued past the published tiles (segment/growth.py)
    tiles: int = 0  # number of tiles run
    growth_stop: str = OFF  # growth.NOT_NEEDED / COMPLETE / MAX_TILES / MAX_EXTENT, or OFF


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
                   tta: Optional[bool] = None, folds: Folds = None, grow: Optional[bool] = None,
                   limits: Optional[GrowthLimits] = None, cancel: Any = None) -> Tuple[LesionMask, LesionDebug]:
    """Run the ``kind`` model on an encoded prompt (default tiles: the published placement) and export the
    result to the image's grid.

    grow (None: the model's ``grow`` setting, on by default): when the lesion touches a face of its tiles
    that is not the image border, add sliding-window tiles until it does not or ``limits`` stop it
    (segment/growth.py). False reproduces the published single-patch behaviour exactly; with True and no
    growth needed the result is the same bit for bit.
    cancel: a ``threading.Event`` (or anything with ``is_set``) checked before every tile, so a big box or a
    long growth stops within one forward pass (``core.jobs.Cancelled``).
    """
    t0 = time.perf_counter()
    model = prepared.model
    grid = prepared.grid(kind)
    cfg = model.config(kind)
    lo, hi = enc.bbox_incl
    pad = np.asarray(grid.pad_below)
    if tiles is None:
        tiles = tiles_for_prompt(grid.padded_shape, cfg.patch_size, np.asarray(lo) + pad, np.asarray(hi) + pad)
    grow = bool(getattr(model, "grow", True)) if grow is None else bool(grow)
    center_t = None if center is None else tuple(float(v) for v in center)
    logits, values_box, outcome = _predict_region(prepared, kind, enc, tiles, tta, folds, grow,
                                                  limits or DEFAULT_LIMITS, cancel)
    debug = LesionDebug(enc.sparse, enc.voxels(), [lo, hi], list(grid.padded_shape),
                        [[list(ax) for ax in t] for t in outcome.tiles], grown=outcome.grown,
                        tiles=len(outcome.tiles), growth_stop=outcome.stop)
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
    log.info("lesion %d: %d voxels, %d tile(s)%s, %.2f s", lid, les.voxels, debug.tiles,
             f" (grown, {outcome.stop})" if outcome.grown else "", debug.seconds)
    return les, debug


def _region_input(prepared: PreparedImage, kind: str, enc: EncodedPrompt,
                  region_p: Spans) -> Tuple[torch.Tensor, Spans]:
    """Network input [normalised image, prompt] on a box of the padded grid (on the model's device), and
    the part of the resampled image inside it. Preprocessing runs on the device too (GPU clicks do not wait
    for CPU resampling)."""
    model = prepared.model
    grid = prepared.grid(kind)
    stats = model.config(kind).ct_stats
    region_r = _to_resampled(region_p, grid.pad_below)
    values_box = tuple((max(a, 0), min(b, n)) for (a, b), n in zip(region_r, grid.resampled_shape))
    dev = model.device
    src = prepared.image.array[tuple(slice(a, b) for a, b in grid.crop)]

    def normalize(t: torch.Tensor) -> torch.Tensor:  # nnU-Net CTNormalization, float32 as in numpy
        return (t.float().clamp(stats.lower, stats.upper) - stats.mean) / max(stats.std, 1e-8)

    with torch.inference_mode():
        values = grid.forward.image_region(src, values_box, normalize, prepared.clip(kind), device=dev)
        # zero outside the scan = nnU-Net's constant padding
        x_region = torch.zeros((2, *[b - a for a, b in region_r]), dtype=torch.float32, device=dev)
        x_region[(0,) + tuple(slice(va - ra, vb - ra) for (va, vb), (ra, _) in zip(values_box, region_r))] = values
        x_region[1] = torch.from_numpy(enc.on_box(region_r)).to(dev)
    return x_region, values_box  # type: ignore[return-value]


def _to_resampled(box_p: Spans, pad: Sequence[int]) -> Spans:
    return tuple((a - p, b - p) for (a, b), p in zip(box_p, pad))  # type: ignore[return-value]


def _run_tiles(model: LesionLocatorModel, kind: str, x_region: torch.Tensor, region_p: Spans, tiles: Tiles,
               canvas: Canvas, gauss: torch.Tensor, tta: Optional[bool], folds: Folds, cancel: Any) -> None:
    for t in tiles:
        check_cancel(cancel)
        sl = tuple(slice(a - ra, b - ra) for (a, b), (ra, _) in zip(t, region_p))
        canvas.add(t, model.forward(kind, x_region[(slice(None),) + sl], tta=tta, folds=folds), gauss)


def _predict_region(prepared: PreparedImage, kind: str, enc: EncodedPrompt, tiles: Tiles, tta: Optional[bool],
                    folds: Folds, grow: bool, limits: GrowthLimits, cancel: Any = None
                    ) -> Tuple[torch.Tensor, Spans, GrowthOutcome]:
    """Logits (float32 tensor on the model's device) on the predicted part of the resampled grid, that
    part's box, and what growth did."""
    model = prepared.model
    grid = prepared.grid(kind)
    cfg = model.config(kind)
    region_p = union_box(tiles)
    x_region, values_box = _region_input(prepared, kind, enc, region_p)
    gauss = torch.from_numpy(np.array(gaussian_importance(tuple(cfg.patch_size)))).to(model.device)
    outcome = GrowthOutcome(tiles=list(tiles), stop=OFF)
    canvas: Optional[Canvas] = None
    with torch.inference_mode():
        if len(tiles) == 1:  # published: the patch's logits as they are, no weighting
            check_cancel(cancel)
            logits = model.forward(kind, x_region, tta=tta, folds=folds)
        else:  # published sliding window: Gaussian-weighted mean over the tiles
            canvas = Canvas(region_p, cfg.num_classes, model.device)
            _run_tiles(model, kind, x_region, region_p, tiles, canvas, gauss, tta, folds, cancel)
            logits = canvas.logits()
        if grow:
            grown = _grow(prepared, kind, enc, tiles, logits, canvas, gauss, tta, folds, limits, outcome, cancel)
            if grown is not None:
                logits, region_p = grown.logits(), grown.box
                values_box = tuple((max(a - p, 0), min(b - p, n)) for (a, b), p, n
                                   in zip(region_p, grid.pad_below, grid.resampled_shape))
        region_r = _to_resampled(region_p, grid.pad_below)
        crop = tuple(slice(va - ra, vb - ra) for (va, vb), (ra, _) in zip(values_box, region_r))
        return logits[(slice(None),) + crop].contiguous(), values_box, outcome  # type: ignore[return-value]


def _grow(prepared: PreparedImage, kind: str, enc: EncodedPrompt, tiles: Tiles, logits: torch.Tensor,
          canvas: Optional[Canvas], gauss: torch.Tensor, tta: Optional[bool], folds: Folds, limits: GrowthLimits,
          outcome: GrowthOutcome, cancel: Any = None) -> Optional[Canvas]:
    """Continue the prediction while the lesion touches an open face (see segment/growth.py). Returns the
    grown canvas, or None when the published tiles already hold the whole lesion (or no tile may be added)."""
    model = prepared.model
    grid = prepared.grid(kind)
    patch = tuple(model.config(kind).patch_size)
    pad = grid.pad_below
    image_box = tuple((p, p + n) for p, n in zip(pad, grid.resampled_shape))
    region_p = union_box(tiles)
    fg = (logits[1] > logits[0]).cpu().numpy()  # the first tiles' union is a box: every voxel predicted
    lesion = lesion_of(fg, enc.on_box(_to_resampled(region_p, pad)) > 0)
    faces = open_faces(lesion, np.ones(fg.shape, bool), region_p, image_box)
    outcome.stop = NOT_NEEDED
    if not any(faces.values()):
        return None
    if len(tiles) >= limits.max_tiles:
        outcome.stop = MAX_TILES
        return None
    if canvas is None:
        canvas = Canvas(region_p, logits.shape[0], logits.device)
        canvas.add(tiles[0], logits, gauss)
    done = set(tiles)
    prompt_p = tuple((a + p, b + p) for (a, b), p in zip(enc.box, pad))
    centre = [(a + b - 1) / 2 for a, b in prompt_p]
    window = extent_window(tiles, prompt_p, patch, grid.padded_shape, limits)
    lesion_box = bbox_of(lesion, [a for a, _ in region_p])
    while True:
        if len(done) >= limits.max_tiles:
            outcome.stop = MAX_TILES
            break
        new = next_tiles(lesion_box, faces, done, grid.padded_shape, patch, window)
        if not new:
            outcome.stop = MAX_EXTENT
            break
        new = order_tiles(new, centre)[: limits.max_tiles - len(done)]
        u = union_box(new)
        canvas.expand(u)  # once per round, not per tile
        x_new, _ = _region_input(prepared, kind, enc, u)
        _run_tiles(model, kind, x_new, u, new, canvas, gauss, tta, folds, cancel)
        done.update(new)
        outcome.tiles += new
        outcome.rounds += 1
        outcome.grown = True
        lesion = lesion_of(canvas.foreground(), enc.on_box(_to_resampled(canvas.box, pad)) > 0)
        if not lesion.any():  # the blend dropped the prompt's component: nothing left to follow
            outcome.stop = COMPLETE
            break
        faces = open_faces(lesion, canvas.covered().cpu().numpy(), canvas.box, image_box)
        if not any(faces.values()):
            outcome.stop = COMPLETE
            break
        lesion_box = bbox_of(lesion, [a for a, _ in canvas.box])
    if lesion.any():
        canvas.keep_only(lesion)  # the clicked lesion, not what else the added tiles saw
    return canvas
