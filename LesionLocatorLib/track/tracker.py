"""LesionTracker: carry lesion masks from a baseline scan into follow-up scans.

Per scan pair there is ONE registration (learned uniGradICON on the preprocessed scans, or classical
SimpleITK affine + demons on the original scans); every lesion's prompt is then warped with it and
refined: by the LesionLocatorTrack UNet on [follow-up, warped prompt] (``refine='unet'``, the published
method), by the segmentation model prompted with the warped mask (``refine='segment'``, the paper's
"registration + LesionLocator" baseline) or not at all (``refine='none'``, the warped mask itself).

Several follow-ups are tracked autoregressively: follow-up k's masks prompt follow-up k+1 (or every
follow-up is prompted from the baseline with ``from_baseline=True``). A lesion whose mask comes out
empty is kept with status "not found" and its propagated centre; ids never change.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from ..model.checkpoint import CheckpointError, load_checkpoint, resolve_model_dir, select_folds
from ..core.geometry import GeometryError, Volume
from ..core.image_io import read_image
from ..model.preprocessing import normalize_ct
from ..core.prompts import Box, EncodedPrompt, Mask, Point, Prompt, PromptError, mask_to_resampled, validate
from ..model.resampling import whole_box
from ..core.results import LesionMask, SegmentationResult, bbox_slices, tight_bbox
from ..segment.segmenter import LesionSegmenter, PromptModel
from ..model.sliding_window import tiles_for_prompt

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]

UNET_PREFIX = "unet."
REG_PREFIX = "reg_net."
REGISTRATION_SIZE_KEY = "registration_input_size"


class TrackingError(ValueError):
    """Tracking cannot be done as asked (incompatible scans, missing models, bad prompts)."""


@dataclass
class _Registration:
    deformation: Any
    space: str  # 'preprocessed' (learned) or 'original' (classical)
    seconds: float
    pair: tuple[int, int] = (0, 1)  # (moving scan index, fixed scan index); 0 = baseline


class LesionTracker:
    """Track prompted lesions from a baseline into follow-ups (set images once, then track)."""

    def __init__(self, track_dir: Path | None = None, segmenter: LesionSegmenter | None = None,
                 device: str | torch.device = "auto", folds=None, tta: bool = False,
                 propagation: str | None = None, refine: str | None = None, classical_options: dict | None = None):
        from ..model import devices

        self.device = devices.resolve_device(device)
        self.folds, self.tta = folds, tta
        self.segmenter = segmenter
        self.track_dir = Path(track_dir) if track_dir else None
        propagation = propagation or ("learned" if self.track_dir else "classical")
        refine = refine or ("unet" if self.track_dir else ("segment" if segmenter else "none"))
        if propagation not in ("learned", "classical"):
            raise TrackingError(f"propagation must be 'learned' or 'classical', got {propagation!r}")
        if refine not in ("unet", "segment", "none"):
            raise TrackingError(f"refine must be 'unet', 'segment' or 'none', got {refine!r}")
        if (propagation == "learned" or refine == "unet") and self.track_dir is None:
            raise TrackingError(f"propagation={propagation!r} / refine={refine!r} need the LesionLocatorTrack "
                                "model; use --propagation classical with --refine segment or none without it")
        if refine == "segment" and segmenter is None:
            raise TrackingError("refine='segment' needs the segmentation model (LesionLocatorSeg)")
        self.propagation, self.refine = propagation, refine
        self.classical_options = dict(classical_options or {})
        self._engine: LesionSegmenter | None = None
        self._reg_net = None
        if self.track_dir is not None and (propagation == "learned" or refine == "unet"):
            self._load_track_model()
        self._images: list[Volume] = []
        self._pp_cache: dict[int, np.ndarray] = {}
        self.registrations: list[_Registration] = []
        self.baseline_result: SegmentationResult | None = None

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device = "auto", folds=None,
                        tta: bool = False, propagation: str | None = None, refine: str | None = None,
                        **kwargs: Any) -> "LesionTracker":
        """From a published package (zip / folder), a LesionLocatorTrack folder, or a segmentation-only package
        (then classical propagation is used)."""
        track_dir = None
        try:
            track_dir = resolve_model_dir(path, "track")
        except CheckpointError:
            if propagation == "learned" or refine == "unet":
                raise
        segmenter = None
        try:
            segmenter = LesionSegmenter.from_checkpoint(path, [], device=device, folds=folds, tta=tta)
        except CheckpointError:
            if refine == "segment":
                raise
        if track_dir is None and segmenter is None and refine != "none":
            raise CheckpointError(f"{path} holds neither a LesionLocatorTrack nor a LesionLocatorSeg model")
        return cls(track_dir, segmenter, device, folds, tta, propagation, refine, **kwargs)

    def _load_track_model(self) -> None:
        from ..model.registration_net import build_registration_network, load_registration_weights

        assert self.track_dir is not None
        engine = LesionSegmenter({"track": self.track_dir}, device=self.device, folds=self.folds, tta=self.tta)
        model = PromptModel.load(self.track_dir, "track", self.folds, self.device, UNET_PREFIX,
                                 (REG_PREFIX, "unet_patch_size"))
        engine.add_model(model)
        self._engine = engine
        if self.propagation == "learned":
            conf = model.config.plans["configurations"]["3d_fullres"]
            size = tuple(int(s) for s in conf.get(REGISTRATION_SIZE_KEY, (175, 175, 175)))
            net = build_registration_network((1, 1, *size))
            # one registration per scan pair: the first selected fold's registration weights serve every fold's
            # UNet (the published code registers once per fold)
            selected = select_folds(self.track_dir, self.folds)
            if len(selected) > 1:
                log.warning("tracking with %d folds: the registration of fold %d serves all of them",
                            len(selected), selected[0])
            fold = selected[0]
            ckpt = load_checkpoint(self.track_dir, fold)
            try:
                load_registration_weights(net, ckpt["network_weights"], REG_PREFIX)
            except ValueError as exc:
                raise CheckpointError(f"{ckpt['_path']}: {exc}") from exc
            self._reg_net = net.to(self.device).eval()

    # -- images -------------------------------------------------------------------------------
    def set_images(self, baseline: Volume | str | os.PathLike, followups: Sequence[Volume | str | os.PathLike]) -> None:
        """Read/validate every scan before any work, so a bad follow-up fails before anything is computed."""
        if not followups:
            raise TrackingError("give at least one follow-up scan")
        images = []
        for i, im in enumerate([baseline, *followups]):
            v = im if isinstance(im, Volume) else read_image(im)
            if not (np.issubdtype(v.array.dtype, np.number)):
                raise GeometryError(f"scan {i} has non-numeric voxels ({v.array.dtype})")
            if np.issubdtype(v.array.dtype, np.floating) and not np.isfinite(v.array).all():
                raise GeometryError(f"scan {i} contains NaN or infinite values")
            images.append(v)
        self._check_compatible(images)
        self._images = images
        self._pp_cache = {}
        self.registrations = []
        self.baseline_result = None

    @staticmethod
    def _check_compatible(images: list[Volume]) -> None:
        """Refuse pairs that cannot be the same patient's CT region: other modality or disjoint fields of view."""
        ref = images[0]
        extent0 = np.array(ref.shape) * np.array(ref.spacing)
        for i, im in enumerate(images[1:], start=1):
            extent = np.array(im.shape) * np.array(im.spacing)
            ratio = np.max(np.maximum(extent, extent0) / np.maximum(np.minimum(extent, extent0), 1e-6))
            if ratio > 8:
                raise TrackingError(f"follow-up {i} covers a field of view {extent.round()} mm vs the baseline's "
                                    f"{extent0.round()} mm: too different to track between")
            lo = np.percentile(im.array[::4, ::4, ::4], 1)
            if lo > -20 and np.percentile(ref.array[::4, ::4, ::4], 1) < -500:
                raise TrackingError(f"follow-up {i} does not look like a CT in HU (1st percentile {lo:.0f}) while "
                                    "the baseline does: baseline and follow-up must be the same modality")

    # -- public API -----------------------------------------------------------------------------
    def track(self, baseline: Volume | str | os.PathLike, followups: Sequence[Volume | str | os.PathLike],
              prompts: Mapping[int, Prompt] | np.ndarray, progress: Progress | None = None,
              from_baseline: bool = False) -> list[SegmentationResult]:
        """Convenience: ``set_images`` then ``track_prompts``."""
        self.set_images(baseline, followups)
        return self.track_prompts(prompts, progress=progress, from_baseline=from_baseline)

    def track_prompts(self, prompts: Mapping[int, Prompt] | np.ndarray, progress: Progress | None = None,
                      from_baseline: bool = False) -> list[SegmentationResult]:
        """Prompts on the baseline (points/boxes -> segmented first; masks / a label map used as they are).
        Returns one result per follow-up, every lesion id in each (status 'found' / 'not found')."""
        if not self._images:
            raise RuntimeError("call set_images() before track_prompts()")
        if isinstance(prompts, np.ndarray):
            from ..core.prompts import prompts_from_label_map

            prompts = prompts_from_label_map(prompts)
        if not prompts:
            raise PromptError("no lesion prompt given")
        base = self._images[0]
        for p in prompts.values():
            validate(p, base.shape)
        report = progress or (lambda f, m: None)
        report(0.0, "baseline")
        self.baseline_result = self._baseline_masks(base, prompts)
        current = {lid: les.full(base.shape).astype(bool) for lid, les in self.baseline_result.lesions.items()}
        source = 0
        results = []
        n_fu = len(self._images) - 1
        for k in range(1, n_fu + 1):
            report((k - 1) / n_fu, f"follow-up {k}/{n_fu}: registration")
            prev = 0 if from_baseline else source
            prompts_k = ({lid: les.full(base.shape).astype(bool) for lid, les in self.baseline_result.lesions.items()}
                         if from_baseline else current)
            res = self._track_pair(prev, k, prompts_k, lambda f, m: report((k - 1 + f) / n_fu, m))
            results.append(res)
            if not from_baseline:
                # found lesions prompt the next follow-up with their mask, lost ones with their propagated mask
                current = {lid: res.lesions[lid].full(res.shape).astype(bool) for lid in res.lesions}
                for lid, les in res.lesions.items():
                    if les.status != "found" and getattr(les, "_propagated", None) is not None:
                        current[lid] = les._propagated  # type: ignore[attr-defined]
                source = k
        report(1.0, "done")
        for res in results:
            for les in res.lesions.values():
                les.__dict__.pop("_propagated", None)
        return results

    def report(self, names: Sequence[str] | None = None, results: Sequence[SegmentationResult] | None = None):
        """The longitudinal report (volumes, diameters, changes, RECIST) of the last tracking."""
        from ..measure.report import build_report_from_results

        if self.baseline_result is None:
            raise RuntimeError("track first")
        results = list(results) if results is not None else []
        names = list(names) if names else ["baseline"] + [f"follow-up {k}" for k in range(1, len(results) + 1)]
        return build_report_from_results(names, [self.baseline_result, *results])

    # -- steps ----------------------------------------------------------------------------------
    def _baseline_masks(self, base: Volume, prompts: Mapping[int, Prompt]) -> SegmentationResult:
        result = SegmentationResult(base)
        need_seg = {lid: p for lid, p in prompts.items() if isinstance(p, (Point, Box))}
        if need_seg:
            if self.segmenter is None:
                raise TrackingError("point/box prompts are segmented on the baseline first, which needs the "
                                    "segmentation model (LesionLocatorSeg); give mask prompts instead")
            self.segmenter.set_image(base)
            result.lesions.update(self.segmenter.segment_prompts(need_seg).lesions)
        for lid, p in prompts.items():
            if isinstance(p, Mask):
                bb = tight_bbox(p.mask)
                if bb is None:
                    raise PromptError(f"lesion {lid}: the mask prompt is empty")
                result.lesions[lid] = LesionMask(lid, bb, p.mask[bbox_slices(bb)].copy(), None, "found")
        for lid, les in result.lesions.items():
            if les.empty:
                log.warning("lesion %d: the baseline segmentation is empty; it cannot be tracked", lid)
        return SegmentationResult(base, dict(sorted(result.lesions.items())))

    def _preprocessed(self, idx: int) -> np.ndarray:
        """Whole scan, normalised and resampled to the Track spacing (registration input), cached per scan."""
        if idx not in self._pp_cache:
            assert self._engine is not None
            self._engine.set_image(self._images[idx])
            grid = self._engine.grid("track")
            stats = self._engine.model("track").config.ct_stats
            src = self._images[idx].array[bbox_slices(_box6(grid.crop))]
            self._pp_cache[idx] = grid.forward.image_region(src, whole_box(grid.resampled_shape),
                                                            lambda a: normalize_ct(a, stats),
                                                            self._engine._state.clip["track"])  # type: ignore[union-attr]
        return self._pp_cache[idx]

    def _register(self, a: int, b: int) -> _Registration:
        t0 = time.perf_counter()
        if self.propagation == "learned":
            from .propagation import LearnedPropagator

            prop = LearnedPropagator(self._reg_net, self.device)
            d = prop.register(self._preprocessed(a), self._preprocessed(b))
            reg = _Registration(d, "preprocessed", time.perf_counter() - t0, (a, b))
        else:
            from .classical_registration import ClassicalPropagator

            try:
                d = ClassicalPropagator(**self.classical_options).register(self._images[a], self._images[b])
            except ValueError as exc:
                raise TrackingError(f"registration of scan {a} to scan {b} failed: {exc}") from exc
            reg = _Registration(d, "original", time.perf_counter() - t0, (a, b))
        log.info("registration %d -> %d (%s): %.2f s", a, b, self.propagation, reg.seconds)
        self.registrations.append(reg)
        return reg

    def _track_pair(self, a: int, b: int, masks: Mapping[int, np.ndarray], report: Progress) -> SegmentationResult:
        fu = self._images[b]
        reg = self._register(a, b)
        result = SegmentationResult(fu)
        n = max(len(masks), 1)
        for i, (lid, mask) in enumerate(sorted(masks.items())):
            report(0.2 + 0.8 * i / n, f"lesion {lid}")
            if not mask.any():
                result.lesions[lid] = _not_found(lid, None)
                continue
            result.lesions[lid] = self._track_lesion(lid, mask, a, b, reg)
        return result

    def _track_lesion(self, lid: int, mask: np.ndarray, a: int, b: int, reg: _Registration) -> LesionMask:
        fu = self._images[b]
        if reg.space == "preprocessed":
            assert self._engine is not None
            self._engine.set_image(self._images[a])
            grid_a = self._engine.grid("track")
            res, box = mask_to_resampled(mask, grid_a)
            pp_mask = np.zeros(grid_a.resampled_shape, np.uint8)
            pp_mask[bbox_slices(_box6(box))] = res > 0
            warped_pp = reg.deformation.warp(pp_mask).astype(bool)
            self._engine.set_image(fu)
            grid_b = self._engine.grid("track")
            warped_orig = _pp_to_original(warped_pp, grid_b, fu.shape)
        else:
            warped_orig = reg.deformation.warp(mask.astype(np.uint8)).astype(bool)
            warped_pp = None
        center = _centre(warped_orig)
        if not warped_orig.any() and (warped_pp is None or not warped_pp.any()):
            return _not_found(lid, center, warped_orig)
        if self.refine == "none":
            bb = tight_bbox(warped_orig)
            if bb is None:
                return _not_found(lid, center, warped_orig)
            return LesionMask(lid, bb, warped_orig[bbox_slices(bb)].copy(), None, "found", center)
        if self.refine == "segment":
            assert self.segmenter is not None
            self.segmenter.set_image(fu)
            les = self.segmenter.segment_prompts({lid: Mask(warped_orig)}).lesions[lid]
        else:
            les = self._refine_unet(lid, fu, warped_pp, warped_orig, center)
        if les.empty:
            return _not_found(lid, center, warped_orig)
        les.center_voxel = center
        return les

    def _refine_unet(self, lid: int, fu: Volume, warped_pp: np.ndarray | None, warped_orig: np.ndarray,
                     center) -> LesionMask:
        assert self._engine is not None
        engine = self._engine
        engine.set_image(fu)
        grid = engine.grid("track")
        if warped_pp is None:  # classical propagation: bring the warped mask into the preprocessed grid
            res, box = mask_to_resampled(warped_orig, grid)
            warped_pp = np.zeros(grid.resampled_shape, bool)
            warped_pp[bbox_slices(_box6(box))] = res > 0
        bb = tight_bbox(warped_pp)
        if bb is None:
            return _not_found(lid, center)
        box = ((bb[0], bb[1]), (bb[2], bb[3]), (bb[4], bb[5]))
        enc = EncodedPrompt("mask", box, warped_pp[bbox_slices(bb)].astype(np.uint8), [int(v) for v in bb])
        patch = engine.model("track").config.patch_size
        pad = np.asarray(grid.pad_below)
        size = np.array([bb[1] - bb[0], bb[3] - bb[2], bb[5] - bb[4]])
        if np.all(size < np.asarray(patch)):
            # published: one patch centred on the warped mask's centre of mass (rounded), clamped into the image
            com = np.round(np.argwhere(warped_pp[bbox_slices(bb)]).mean(0) + [bb[0], bb[2], bb[4]]).astype(int)
            tile = []
            for c, p, n, pd in zip(com + pad, patch, grid.padded_shape, pad):
                start = int(min(max(c - p // 2, 0), n - p))
                tile.append((start, start + p))
            tiles = [tuple(tile)]
        else:  # lesions larger than a patch: every sliding-window tile that overlaps them
            lo = np.array([bb[0], bb[2], bb[4]]) + pad
            hi = np.array([bb[1], bb[3], bb[5]]) - 1 + pad
            tiles = tiles_for_prompt(grid.padded_shape, patch, lo, hi)
        return engine.predict_encoded(lid, "track", enc, tiles, False, center)


def _box6(box) -> tuple[int, int, int, int, int, int]:
    return (box[0][0], box[0][1], box[1][0], box[1][1], box[2][0], box[2][1])


def _centre(mask: np.ndarray) -> tuple[float, float, float] | None:
    nz = np.argwhere(mask)
    return tuple(float(v) for v in nz.mean(0)) if nz.size else None  # type: ignore[return-value]


def _not_found(lid: int, center, propagated: np.ndarray | None = None) -> LesionMask:
    les = LesionMask(lid, (0, 0, 0, 0, 0, 0), np.zeros((0, 0, 0), bool), None, "not found", center)
    if propagated is not None and propagated.any():
        les._propagated = propagated  # type: ignore[attr-defined]  # prompt for the next follow-up
    return les


def _pp_to_original(mask_pp: np.ndarray, grid, shape) -> np.ndarray:
    """A mask on the preprocessed grid -> the original grid (linear indicator resampling, > 0.5)."""
    out = np.zeros(shape, bool)
    bb = tight_bbox(mask_pp)
    if bb is None:
        return out
    values_box = tuple((max(bb[2 * i] - 2, 0), min(bb[2 * i + 1] + 2, grid.resampled_shape[i])) for i in range(3))
    out_box = grid.backward.valid_output_box(values_box)
    if out_box is None:
        return out
    vals = mask_pp[bbox_slices(_box6(values_box))].astype(np.float32)[None]
    res, _ = grid.backward.prob_region(vals, values_box, out_box)
    c = grid.crop_start
    sl = tuple(slice(a + o, b + o) for (a, b), o in zip(out_box, c))
    out[sl] = res[0] > 0.5
    return out
