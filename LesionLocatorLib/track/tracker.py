"""LesionTracker: carry lesion masks from a baseline scan into follow-up scans.

Built only by ``LesionLocatorModel.tracker(...)``: the tracker uses the model directly (its Track UNet through
``model.forward``, each fold's registration network through ``model.registration_net(fold)``, a segmentation
session for point / box baseline prompts) and holds only the scans of one tracking job.

Propagation: ``learned`` (the published LesionLocatorTrack: uniGradICON on the preprocessed scans) or
``classical`` (SimpleITK affine + demons on the original scans). Refinement: ``unet`` (the Track UNet on
[follow-up, warped prompt], the published method), ``segment`` (the segmentation model prompted with the warped
mask, the paper's "registration + LesionLocator" baseline) or ``none`` (the warped mask itself).

Learned + unet reproduces the published tracker (see ``track/refinement.py`` and ``../shared/parity/track``):
float16-rounded preprocessed scans, z alignment over the published offset range, registration with *each
fold's own* weights, and with ``tta=True`` the published TTA: the whole tracker (z alignment, registration,
warping, patch placement, UNet) runs on each of the 8 flips of both scans and the prompt, and the flipped-back
logits are averaged. Registrations are per scan pair, fold and flip, shared by every lesion of the pair (the
published code repeats them per lesion). ``tta="unet"`` is the faster approximation: one registration per fold,
mirroring of the UNet input only. Published defects stay fixed: zero padding on z, y and x, no random patch for
an empty warped prompt (that pass is background), lesions larger than a patch covered by several tiles.

Several follow-ups are tracked autoregressively: follow-up k's masks prompt follow-up k+1 (or each follow-up is
prompted from the baseline with ``from_baseline=True``). A lesion that is lost keeps its id with status
``LesionStatus.NOT_FOUND``; its propagated mask prompts the next follow-up.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..core.geometry import Volume
from ..core.prompts import Mask, Prompt, PromptError, effective, mask_to_resampled
from ..core.boxes import VoxelBox
from ..core.results import LesionMask, LesionStatus, SegmentationResult, TrackingResult, bbox_slices, tight_bbox
from ..model.checkpoint import CheckpointError
from ..model.engine import Folds, LesionLocatorModel
from ..model.preprocessing import normalize_ct
from ..model.resampling import whole_box
from ..segment.predict import PreparedImage
from .checks import PROPAGATIONS, REFINES, TrackingError, load_scans  # noqa: F401 (TrackingError: what track() raises)
from ..segment.session import PromptsArg, check_cancel, prompt_center, resolve_prompts
from .propagation import Deformation, LearnedPropagator
from .refinement import LogitAccumulator, place_patch, run_pass, to_followup_grid

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]
Flips = Tuple[int, ...]
ALL_FLIPS: List[Flips] = [c for k in range(4) for c in itertools.combinations((0, 1, 2), k)]  # published order
TTA_MODES = (False, True, "unet")


@dataclass
class Registration:
    """One registration of scan ``pair`` = (moving, fixed) (0 = baseline), for one fold and TTA flip."""

    pair: Tuple[int, int]
    deformation: Deformation
    space: str  # 'preprocessed' (learned) or 'original' (classical)
    seconds: float
    fold: Optional[int] = None
    flips: Flips = ()

    @property
    def input_shapes(self) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
        """(baseline, follow-up) shapes that entered the registration before its resize (after the z crop)."""
        d = self.deformation
        return (tuple(b - a for a, b in d.source_window), tuple(b - a for a, b in d.followup_window))  # type: ignore


@dataclass
class PassDebug:
    """What one pass (fold, flip) did for one lesion; frames as in ``track/refinement.py``."""

    fold: Optional[int]
    flips: Flips
    baseline_z: Tuple[int, int]
    followup_z: Tuple[int, int]
    registration_input_shapes: Tuple[Tuple[int, ...], Tuple[int, ...]]
    warped_voxels: int
    warped_bbox: Optional[VoxelBox]  # on the unflipped preprocessed follow-up grid
    warped_crop: Optional[np.ndarray] = field(default=None, repr=False)
    centre: Optional[Tuple[int, int, int]] = None  # pass frame (flipped, z-cropped)
    slicer: Optional[Tuple[int, int, int, int, int, int]] = None  # pass frame
    patch_in_followup: Optional[Tuple[int, int, int, int, int, int]] = None  # unflipped follow-up grid
    tiles: int = 0

    def warped_full(self, shape: Sequence[int]) -> np.ndarray:
        out = np.zeros(tuple(shape), bool)
        if self.warped_bbox is not None:
            out[bbox_slices(self.warped_bbox)] = self.warped_crop
        return out


class LesionTracker:
    """Track prompted lesions from a baseline into follow-ups (``set_images`` once, then ``track``)."""

    REGISTRATION_CACHE = 8  # registrations kept for reuse (175^3 maps: 64 MB each)

    def __init__(self, model: LesionLocatorModel, propagation: Optional[str] = None, refine: Optional[str] = None,
                 tta: Union[None, bool, str] = None, folds: Folds = None, classical_options: Optional[dict] = None):
        has_track = model.has("track")
        has_seg = model.has("point") or model.has("box")
        propagation = propagation or ("learned" if has_track else "classical")
        refine = refine or ("unet" if has_track else ("segment" if has_seg else "none"))
        if propagation not in PROPAGATIONS:
            raise TrackingError(f"propagation must be 'learned' or 'classical', got {propagation!r}")
        if refine not in REFINES:
            raise TrackingError(f"refine must be 'unet', 'segment' or 'none', got {refine!r}")
        if (propagation == "learned" or refine == "unet") and not has_track:
            raise CheckpointError(f"propagation={propagation!r} / refine={refine!r} need the LesionLocatorTrack "
                                  "model; use propagation='classical' with refine='segment' or 'none' without it")
        if refine == "segment" and not has_seg:
            raise CheckpointError("refine='segment' needs the segmentation model (LesionLocatorSeg)")
        if tta not in (None, *TTA_MODES):
            raise TrackingError(f"tta must be False, True (the published TTA) or 'unet' (UNet mirroring only), "
                                f"got {tta!r}")
        self.model = model
        self.propagation, self.refine = propagation, refine
        self.tta = tta  # None: the model's setting (True = the published TTA)
        self.folds = folds
        self.classical_options = dict(classical_options or {})
        if has_track and (propagation == "learned" or refine == "unet"):
            # load now (cached in the model): a missing fold or a broken checkpoint fails here, not mid-job
            model.prompt_model("track")
            if propagation == "learned":
                for f in model.fold_ids("track", folds):
                    model.registration_net(f)
        self._images: List[Volume] = []
        self._prepared: List[PreparedImage] = []
        self._pp: Dict[int, np.ndarray] = {}
        self._reg_cache: "OrderedDict[tuple, Registration]" = OrderedDict()
        self._session = None
        self.registrations: List[Registration] = []  # those used by the last track()
        self.last_debug: Dict[int, Dict[int, List[PassDebug]]] = {}  # follow-up index -> lesion -> passes

    # -- settings ----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    def tta_mode(self) -> Union[bool, str]:
        t = self.model.tta if self.tta is None else self.tta
        return t if t == "unet" else bool(t)

    def track_folds(self) -> List[int]:
        return self.model.fold_ids("track", self.folds)

    def _passes(self) -> List[Tuple[int, Flips]]:
        """(fold, flips) of every registration a learned pair needs."""
        flips = ALL_FLIPS if self.tta_mode() is True and self.refine == "unet" else [()]
        folds = self.track_folds() if self.refine == "unet" else self.track_folds()[:1]
        return [(f, c) for f in folds for c in flips]

    # -- images -------------------------------------------------------------------------------
    def set_images(self, baseline: Union[Volume, str, os.PathLike],
                   followups: Sequence[Union[Volume, str, os.PathLike]]) -> None:
        """Read and validate every scan before any work, so a bad follow-up fails before anything runs."""
        images = load_scans(baseline, followups)
        self.close()
        self._images = images
        self._prepared = [PreparedImage(v, self.model) for v in images]

    def close(self) -> None:
        """Drop the scans, their preprocessing and the cached registrations."""
        self._images, self._prepared, self._pp = [], [], {}
        self._reg_cache.clear()
        self.registrations, self.last_debug = [], {}
        if self._session is not None:
            self._session.close()

    # -- public API -----------------------------------------------------------------------------
    def track(self, prompts: PromptsArg = None, *, points: Any = None, boxes: Any = None, masks: Any = None,
              space: str = "voxel", from_baseline: bool = False, progress: Optional[Progress] = None,
              cancel: Optional[threading.Event] = None) -> TrackingResult:
        """Prompts on the baseline (every form ``SegmentSession.segment`` accepts; points / boxes are segmented
        on the baseline first, masks are used as they are). Returns the baseline masks and one result per
        follow-up with every lesion id (status found / not found)."""
        if not self._images:
            raise RuntimeError("call set_images() before track()")
        base = self._images[0]
        todo = resolve_prompts(base, prompts, points, boxes, masks, space)
        report = progress or (lambda f, m: None)
        report(0.0, "baseline")
        self.registrations, self.last_debug = [], {}
        baseline = self._baseline_masks(todo, cancel)
        base_masks = {lid: les.full(base.shape).astype(bool) for lid, les in baseline.lesions.items()}
        current = base_masks
        followups: List[SegmentationResult] = []
        n_fu = len(self._images) - 1
        for k in range(1, n_fu + 1):
            check_cancel(cancel)
            source = 0 if from_baseline else k - 1
            prompts_k = base_masks if from_baseline else current
            res, next_prompts = self._track_pair(source, k, prompts_k,
                                                 lambda f, m, k=k: report((k - 1 + f) / n_fu, m), cancel)
            followups.append(res)
            current = next_prompts  # explicit: found lesions their mask, lost ones their propagated mask
        report(1.0, "done")
        return TrackingResult(baseline, followups)

    # -- steps ----------------------------------------------------------------------------------
    def _baseline_masks(self, prompts: Dict[int, List[Prompt]], cancel) -> SegmentationResult:
        base = self._images[0]
        result = SegmentationResult(base)
        for lid, items in prompts.items():
            check_cancel(cancel)
            run = effective(items)
            if isinstance(run[0], Mask):
                m = run[0].mask.astype(bool)
                bb = tight_bbox(m)
                if bb is None:
                    raise PromptError(f"lesion {lid}: the mask prompt is empty")
                result.lesions[lid] = LesionMask(lid, bb, m[bbox_slices(bb)].copy(), None, LesionStatus.FOUND,
                                                 prompt_center(run[0]))
                continue
            if not (self.model.has("point") or self.model.has("box")):
                raise TrackingError("point/box prompts are segmented on the baseline first, which needs the "
                                    "segmentation model (LesionLocatorSeg); give mask prompts instead")
            session = self._seg_session()
            session.set_image(base)
            result.lesions[lid] = session.segment({lid: run}, cancel=cancel).lesions[lid]
        for lid, les in result.lesions.items():
            if les.empty:
                log.warning("lesion %d: the baseline segmentation is empty; it cannot be tracked", lid)
        return result

    def _seg_session(self):
        if self._session is None:
            tta = self.tta_mode()
            self._session = self.model.session(tta=bool(tta), folds=self.folds)
        return self._session

    def _preprocessed(self, idx: int) -> np.ndarray:
        """Whole scan, CT-normalised, resampled to the Track spacing and rounded to float16 as the published
        tracker does (its weights saw those values); kept as float16 (exact), cached per scan."""
        if idx not in self._pp:
            prep = self._prepared[idx]
            grid = prep.grid("track")
            stats = self.model.config("track").ct_stats
            src = prep.image.array[tuple(slice(a, b) for a, b in grid.crop)]
            pp = grid.forward.image_region(src, whole_box(grid.resampled_shape), lambda a: normalize_ct(a, stats),
                                           prep.clip("track"))
            self._pp[idx] = np.asarray(pp, dtype=np.float32).astype(np.float16)
        return self._pp[idx]

    def _registration(self, a: int, b: int, fold: Optional[int] = None, flips: Flips = ()) -> Registration:
        key = (a, b, self.propagation, fold, flips)
        reg = self._reg_cache.get(key)
        if reg is None:
            t0 = time.perf_counter()
            if self.propagation == "learned":
                assert fold is not None
                pa, pb = self._preprocessed(a), self._preprocessed(b)
                if flips:
                    pa, pb = np.flip(pa, flips), np.flip(pb, flips)
                d = self._learned(fold, pa, pb)
                reg = Registration((a, b), d, "preprocessed", time.perf_counter() - t0, fold, flips)
            else:
                from .classical_registration import ClassicalPropagator

                try:
                    d = ClassicalPropagator(**self.classical_options).register(self._images[a], self._images[b])
                except ValueError as exc:
                    raise TrackingError(f"registration of scan {a} to scan {b} failed: {exc}") from exc
                reg = Registration((a, b), d, "original", time.perf_counter() - t0)
            log.info("registration %d -> %d (%s, fold %s, flips %s): %.2f s", a, b, self.propagation, fold, flips,
                     reg.seconds)
            self._reg_cache[key] = reg
            while len(self._reg_cache) > self.REGISTRATION_CACHE:
                self._reg_cache.popitem(last=False)
        else:
            self._reg_cache.move_to_end(key)
        self.registrations.append(reg)
        return reg

    def _learned(self, fold: int, pa: np.ndarray, pb: np.ndarray) -> Deformation:
        try:
            return LearnedPropagator(self.model.registration_net(fold), self.model.device).register(pa, pb)
        except RuntimeError as exc:  # CUDA out of memory: the whole model falls back to the CPU
            from ..model import devices

            if self.model.device.type != "cuda" or not devices.is_oom(exc) or not self.model.cpu_fallback:
                raise
            torch.cuda.empty_cache()
            self.model.fall_back_to_cpu()
            return LearnedPropagator(self.model.registration_net(fold), self.model.device).register(pa, pb)

    def _track_pair(self, a: int, b: int, masks: Dict[int, np.ndarray], report: Progress,
                    cancel) -> Tuple[SegmentationResult, Dict[int, np.ndarray]]:
        """One scan pair: returns the follow-up's result and the prompts for the next follow-up."""
        fu = self._images[b]
        result = SegmentationResult(fu)
        next_prompts: Dict[int, np.ndarray] = {}
        live = {lid: m for lid, m in masks.items() if m.any()}
        for lid in masks:
            if lid not in live:
                result.lesions[lid] = LesionMask.not_found(lid)
        if self.propagation == "learned" and self.refine == "unet":
            found = self._track_pair_unet(a, b, live, report, cancel)
        else:
            found = {}
            for i, (lid, mask) in enumerate(live.items()):
                check_cancel(cancel)
                report(0.2 + 0.8 * i / max(len(live), 1), f"lesion {lid}")
                found[lid] = self._track_lesion_simple(lid, mask, a, b, cancel)
        for lid, (les, propagated) in found.items():
            result.lesions[lid] = les
            if les.found:
                next_prompts[lid] = les.full(fu.shape).astype(bool)
            elif propagated is not None and propagated.any():
                next_prompts[lid] = propagated
        result.lesions = dict(sorted(result.lesions.items()))
        for lid in masks:
            next_prompts.setdefault(lid, np.zeros(fu.shape, bool))
        return result, next_prompts

    # -- learned propagation + Track UNet (the published tracker) -------------------------------------------
    def _track_pair_unet(self, a: int, b: int, masks: Dict[int, np.ndarray], report: Progress,
                         cancel) -> Dict[int, Tuple[LesionMask, Optional[np.ndarray]]]:
        grid_a = self._prepared[a].grid("track")
        grid_b = self._prepared[b].grid("track")
        shape_b = grid_b.resampled_shape
        patch = self.model.config("track").patch_size
        pp_b = self._preprocessed(b)
        # baseline prompts on the preprocessed grid (resampled as segmentations), kept as crops
        prompts_pp: Dict[int, Tuple[VoxelBox, np.ndarray]] = {}
        for lid, m in masks.items():
            try:
                res, box = mask_to_resampled(m, grid_a)
            except PromptError:
                continue  # outside the scan's non-zero region: nothing to track
            bb = tight_bbox(res)
            if bb is not None:
                off = (box[0][0], box[0][0], box[1][0], box[1][0], box[2][0], box[2][0])
                prompts_pp[lid] = (tuple(int(v) + o for v, o in zip(bb, off)), res[bbox_slices(bb)] > 0)  # type: ignore
        acc = {lid: LogitAccumulator(shape_b) for lid in prompts_pp}
        debug: Dict[int, List[PassDebug]] = {lid: [] for lid in prompts_pp}
        self.last_debug[b] = debug
        centres: Dict[int, Optional[tuple]] = {}
        unet_tta = self.tta_mode() == "unet"
        passes = self._passes()
        n_steps = len(passes) * max(len(prompts_pp), 1)
        step = 0
        for fold, flips in passes:
            check_cancel(cancel)
            report(step / n_steps, f"registration (fold {fold}, flips {list(flips)})")
            reg = self._registration(a, b, fold, flips)
            d = reg.deformation
            wz = d.followup_window[0]  # type: ignore[index]
            frame_img = (np.flip(pp_b, flips) if flips else pp_b)[wz[0]:wz[1]]
            for lid, (bb, crop) in prompts_pp.items():
                check_cancel(cancel)
                step += 1
                report(step / n_steps, f"lesion {lid}")
                prompt = np.zeros(grid_a.resampled_shape, np.uint8)
                prompt[bbox_slices(bb)] = crop
                if flips:
                    prompt = np.ascontiguousarray(np.flip(prompt, flips))
                warped = d.warp(prompt)  # pass frame, whole follow-up z (zero outside the window)
                frame_prompt = warped[wz[0]:wz[1]]
                unflipped = np.flip(warped, flips) if flips else warped
                wbb = tight_bbox(unflipped)
                dbg = PassDebug(fold, flips, tuple(d.source_window[0]), tuple(d.followup_window[0]),  # type: ignore
                                reg.input_shapes, int(np.count_nonzero(warped)), wbb,
                                None if wbb is None else unflipped[bbox_slices(wbb)].astype(bool))
                debug[lid].append(dbg)
                if not flips and fold == passes[0][0]:
                    centres[lid] = _centre_original(unflipped, grid_b)
                place = place_patch(frame_prompt, patch)
                if place is None:  # empty warped prompt: deterministic, this pass is background
                    acc[lid].add_background()
                    continue
                logits, box = run_pass(self.model, frame_img, frame_prompt, place, fold, unet_tta)
                logits, full_box = to_followup_grid(logits, box, wz[0], flips, shape_b)
                acc[lid].add(logits, full_box)
                dbg.centre, dbg.tiles = place.centre, len(place.tiles)
                dbg.slicer = _flat(place.slicer)
                dbg.patch_in_followup = _flat(full_box)
        out: Dict[int, Tuple[LesionMask, Optional[np.ndarray]]] = {}
        for lid in masks:
            if lid not in prompts_pp:
                out[lid] = (LesionMask.not_found(lid, _centre(masks[lid])), None)
                continue
            centre = centres.get(lid)
            les = acc[lid].export(grid_b, lid, centre)
            if les.found:
                out[lid] = (les, None)
            else:
                propagated = self._warped_unflipped_original(b, lid, grid_b)
                out[lid] = (LesionMask.not_found(lid, centre), propagated)
        return out

    def _warped_unflipped_original(self, b: int, lid: int, grid_b) -> Optional[np.ndarray]:
        """The first unflipped pass's warped prompt on the original grid (the next follow-up's prompt)."""
        for dbg in self.last_debug.get(b, {}).get(lid, []):
            if not dbg.flips and dbg.warped_bbox is not None:
                return _pp_to_original(dbg.warped_full(grid_b.resampled_shape), grid_b,
                                       tuple(int(s) for s in grid_b.input_shape))
        return None

    # -- registration + (segment | none | unet after classical) ---------------------------------------------
    def _track_lesion_simple(self, lid: int, mask: np.ndarray, a: int, b: int,
                             cancel: Optional[threading.Event] = None) -> Tuple[LesionMask, Optional[np.ndarray]]:
        fu = self._images[b]
        if self.propagation == "learned":
            grid_a = self._prepared[a].grid("track")
            grid_b = self._prepared[b].grid("track")
            reg = self._registration(a, b, self.track_folds()[0], ())
            try:
                res, box = mask_to_resampled(mask, grid_a)
            except PromptError:
                return LesionMask.not_found(lid), None
            pp_mask = np.zeros(grid_a.resampled_shape, np.uint8)
            pp_mask[tuple(slice(p, q) for p, q in box)] = res > 0
            warped_orig = _pp_to_original(reg.deformation.warp(pp_mask).astype(bool), grid_b, fu.shape)
        else:
            reg = self._registration(a, b)
            warped_orig = reg.deformation.warp(mask.astype(np.uint8)).astype(bool)
        center = _centre(warped_orig)
        if not warped_orig.any():
            return LesionMask.not_found(lid, center), None
        if self.refine == "none":
            bb = tight_bbox(warped_orig)
            les = LesionMask(lid, bb, warped_orig[bbox_slices(bb)].copy(), None, LesionStatus.FOUND, center)  # type: ignore
        elif self.refine == "segment":
            session = self._seg_session()
            session.set_image(fu)
            les = session.segment({lid: Mask(warped_orig)}, cancel=cancel).lesions[lid]
        else:  # classical propagation + Track UNet: one unflipped pass per fold on the warped mask
            les = self._unet_on_original_mask(lid, warped_orig, b, center)
        if not les.found:
            return LesionMask.not_found(lid, center), warped_orig
        les.center_voxel = center
        return les, warped_orig

    def _unet_on_original_mask(self, lid: int, warped_orig: np.ndarray, b: int, center) -> LesionMask:
        grid = self._prepared[b].grid("track")
        try:
            res, box = mask_to_resampled(warped_orig, grid)
        except PromptError:
            return LesionMask.not_found(lid, center)
        prompt = np.zeros(grid.resampled_shape, np.uint8)
        prompt[tuple(slice(p, q) for p, q in box)] = res > 0
        place = place_patch(prompt, self.model.config("track").patch_size)
        if place is None:
            return LesionMask.not_found(lid, center)
        acc = LogitAccumulator(grid.resampled_shape)
        unet_tta = self.tta_mode() is not False
        for fold in self.track_folds():
            logits, box3 = run_pass(self.model, self._preprocessed(b), prompt, place, fold, unet_tta)
            acc.add(logits, box3)
        return acc.export(grid, lid, center)


def _flat(box) -> Tuple[int, int, int, int, int, int]:
    return (int(box[0][0]), int(box[0][1]), int(box[1][0]), int(box[1][1]), int(box[2][0]), int(box[2][1]))


def _centre(mask: np.ndarray) -> Optional[Tuple[float, float, float]]:
    nz = np.argwhere(mask)
    return tuple(float(v) for v in nz.mean(0)) if nz.size else None  # type: ignore[return-value]


def _centre_original(mask_pp: np.ndarray, grid) -> Optional[Tuple[float, float, float]]:
    """Centre of a preprocessed-grid mask in original voxels (where the propagated prompt points)."""
    c = _centre(mask_pp)
    if c is None:
        return None
    return tuple(float(v) for v in (np.asarray(c) + 0.5) / grid.scale - 0.5 + grid.crop_start)  # type: ignore


def _pp_to_original(mask_pp: np.ndarray, grid, shape) -> np.ndarray:
    """A mask on the preprocessed grid -> the original grid (linear indicator resampling, > 0.5)."""
    out = np.zeros(tuple(shape), bool)
    bb = tight_bbox(mask_pp)
    if bb is None:
        return out
    values_box = tuple((max(bb[2 * i] - 2, 0), min(bb[2 * i + 1] + 2, grid.resampled_shape[i])) for i in range(3))
    out_box = grid.backward.valid_output_box(values_box)
    if out_box is None:
        return out
    vals = mask_pp[tuple(slice(p, q) for p, q in values_box)].astype(np.float32)[None]
    res, _ = grid.backward.prob_region(vals, values_box, out_box)
    c = grid.crop_start
    sl = tuple(slice(p + o, q + o) for (p, q), o in zip(out_box, c))
    out[sl] = res[0] > 0.5
    return out
