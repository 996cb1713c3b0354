"""SegmentSession: set an image once, then segment lesions from prompts as often as the user clicks.

A session holds only the current image's state; the weights, device, folds and TTA live in the shared
``LesionLocatorModel``. The CLI, the server (one session per client image) and the Slicer module all
segment through this class; the remote twin is ``serve.client.RemoteSession``.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from ..core.geometry import Volume
from ..core.jobs import Cancelled, Progress, check_cancel  # noqa: F401 (Cancelled: what segment() raises)
from ..core.prompts import Box, Mask, Point, Prompt, PromptsArg, effective, encode_prompt, resolve_prompts
from ..core.results import LesionMask, LesionStatus, SegmentationResult, bbox_slices, tight_bbox
from ..model.engine import Folds, LesionLocatorModel
from ..core.image_io import load_volume
from .predict import LesionDebug, PreparedImage, predict_lesion



class SegmentSession:
    """Promptable lesion segmentation on one image at a time (SAM-predictor style)."""

    RECENT_IMAGES = 3  # prepared images kept, so switching back and forth costs nothing

    def __init__(self, model: LesionLocatorModel, tta: Optional[bool] = None, folds: Folds = None,
                 grow: Optional[bool] = None):
        self.model = model
        self.grow = grow  # None: the model's setting (on by default); False: the published single patch
        self.tta = tta  # None: the model's setting
        self.folds = folds
        self._prepared: Optional[PreparedImage] = None
        self._recent: List[PreparedImage] = []
        self.last_debug: Dict[int, LesionDebug] = {}

    # -- image ------------------------------------------------------------------------------
    def set_image(self, image: Union[Volume, str, os.PathLike]) -> None:
        """Use ``image`` for the next prompts. Setting the same ``Volume`` object again (or one of the last
        few) reuses its crop box and grids: do not change its voxels in place between calls."""
        self.last_debug = {}
        for p in self._recent:
            if image is p.image:
                self._prepared = p
                self._recent = [p] + [q for q in self._recent if q is not p]
                return
        self._prepared = PreparedImage(load_volume(image), self.model)
        self._recent = [self._prepared] + self._recent[: self.RECENT_IMAGES - 1]
        for kind in self.model.kinds:  # crop box and resampling grid now, not on the first click
            if kind != "track":
                self._prepared.grid(kind)

    @property
    def image(self) -> Volume:
        return self.prepared.image

    @property
    def prepared(self) -> PreparedImage:
        if self._prepared is None:
            raise RuntimeError("call set_image() before segment()")
        return self._prepared

    def close(self) -> None:
        self._prepared, self._recent = None, []

    # -- prompts -> masks ---------------------------------------------------------------------
    def segment(self, prompts: PromptsArg = None, *, points: Any = None, boxes: Any = None, masks: Any = None,
                space: str = "voxel", return_probabilities: bool = False, progress: Optional[Progress] = None,
                cancel: Optional[threading.Event] = None) -> SegmentationResult:
        """Segment one lesion per id.

        prompts: ``LesionPrompts`` ({id: Point | Box | Mask or a list of them}) or an instance label map;
        or keyword arguments: points {id: (z, y, x) or [(z, y, x), ...]} voxels, or (x, y, z) mm with
        space='lps'/'ras'; boxes {id: (z0, z1, y0, y1, x0, x1)} half-open voxels, or two world corners;
        masks: an instance label map on the image grid, or {id: bool mask}.
        Several prompts of one lesion: see ``core.prompts.effective``. Lesion ids are kept as given.
        """
        img = self.image
        todo = resolve_prompts(img, prompts, points, boxes, masks, space)
        result = SegmentationResult(img)
        self.last_debug = {}
        n = len(todo)
        for i, (lid, items) in enumerate(todo.items()):
            check_cancel(cancel)
            if progress:
                progress(i / n, f"lesion {lid} ({i + 1}/{n})")
            result.lesions[lid] = self._segment_lesion(lid, items, return_probabilities, cancel)
        if progress:
            progress(1.0, "done")
        return result

    def _segment_lesion(self, lid: int, items: List[Prompt], return_probabilities: bool,
                        cancel: Optional[threading.Event] = None) -> LesionMask:
        parts = []
        for prompt in effective(items):
            kind = self.kind_for(prompt)
            enc = encode_prompt(prompt, self.prepared.grid(kind), kind)
            les, self.last_debug[lid] = predict_lesion(self.prepared, lid, kind, enc, None, return_probabilities,
                                                       prompt_center(prompt), self.tta, self.folds, self.grow,
                                                       cancel=cancel)
            parts.append(les)
        return unite(parts)

    def kind_for(self, prompt: Prompt) -> str:
        """Points go to the point model, boxes to the box model; a mask (tracking refinement, label maps)
        is reduced to its bounding box for the box model, or to its centroid when only a point model exists."""
        if isinstance(prompt, Point):
            return "point"
        if isinstance(prompt, Box):
            return "box"
        return "box" if self.model.has("box") else "point"


def unite(parts: Sequence[LesionMask]) -> LesionMask:
    """The union of several masks of one lesion (one per point prompt); probabilities take the maximum."""
    found = [p for p in parts if not p.empty]
    if len(found) <= 1:
        return found[0] if found else parts[-1]
    lo = np.min([p.bbox[0::2] for p in found], axis=0)
    hi = np.max([p.bbox[1::2] for p in found], axis=0)
    bbox = (int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2]))
    shape = tuple(int(h - l) for l, h in zip(lo, hi))
    mask = np.zeros(shape, bool)
    prob = np.zeros(shape, np.float32) if all(p.probability is not None for p in found) else None
    for p in found:
        sl = tuple(slice(int(a - l), int(b - l)) for (a, b), l in zip(zip(p.bbox[0::2], p.bbox[1::2]), lo))
        mask[sl] |= p.mask
        if prob is not None:
            prob[sl] = np.maximum(prob[sl], p.probability)
    return LesionMask(found[0].lesion_id, bbox, mask, prob, LesionStatus.FOUND, found[-1].center_voxel)


def prompt_center(p: Prompt) -> Optional[tuple]:
    """Where a prompt points (z, y, x), reported for lesions that are not found."""
    if isinstance(p, Point):
        return tuple(float(v) for v in p.zyx)
    if isinstance(p, Box):
        b = p.bounds
        return ((b[0] + b[1] - 1) / 2, (b[2] + b[3] - 1) / 2, (b[4] + b[5] - 1) / 2)
    if isinstance(p, Mask):
        bb = tight_bbox(p.mask)
        if bb is None:
            return None
        nz = np.argwhere(p.mask[bbox_slices(bb)])
        return tuple(float(v) for v in nz.mean(0) + [bb[0], bb[2], bb[4]])
    return None
