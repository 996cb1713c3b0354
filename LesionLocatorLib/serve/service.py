"""The model side of the server: one shared ``LesionLocatorModel``, one model worker thread.

Every model job runs in arrival order on one persistent thread, because CUDA / cuDNN caches are per thread
and one GPU gains nothing from concurrent forward passes. Each client image gets a ``SegmentSession`` over
the shared model (its crop box and grids are computed once), kept for the most recently used images;
tracking builds its tracker with ``model.tracker(...)``, the one place a tracker is built, and closes it
after the request (its cached preprocessing is not kept).
"""
from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from ..core.geometry import Volume
from ..core.results import SegmentationResult, TrackingResult
from .config import ServerConfig, ServerConfigError
from .errors import ApiError

log = logging.getLogger("lesionlocator.server")

SEGMENTATION_KINDS = ("point", "box")


class ModelWorker:
    """One persistent thread that runs model jobs in arrival order (CUDA state is per thread)."""

    def __init__(self, max_queue: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lesionlocator-model")
        self._pending = 0
        self._lock = threading.Lock()
        self.max_queue = max_queue
        self.thread_ids: Set[int] = set()

    @property
    def pending(self) -> int:
        return self._pending

    def _wrap(self, fn: Callable[..., Any], args: tuple) -> Any:
        self.thread_ids.add(threading.get_ident())
        try:
            return fn(*args)
        finally:
            with self._lock:
                self._pending -= 1

    def submit_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            self._pending += 1
        return self._pool.submit(self._wrap, fn, args).result()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue housekeeping without waiting for it (skipped when the queue is full: the next job redoes it)."""
        with self._lock:
            if self._pending >= self.max_queue:
                return
            self._pending += 1
        self._pool.submit(self._wrap, fn, args)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._pending >= self.max_queue:
                raise ApiError(503, "busy", f"the model queue is full ({self.max_queue} requests); retry later",
                               headers={"Retry-After": "5"})
            self._pending += 1
        return await asyncio.wrap_future(self._pool.submit(self._wrap, fn, args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def available_devices() -> List[str]:
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


class ModelService:
    """The shared model, the per-image sessions over it, and tracking. Every method except ``describe``
    runs on the worker thread only."""

    def __init__(self, cfg: ServerConfig, max_prepared: int = 8) -> None:
        self.cfg = cfg
        self.model: Any = None
        self.max_prepared = max_prepared
        self.tracking: Optional[Dict[str, str]] = None  # the default propagation / refinement
        self.unavailable: Dict[str, str] = {}
        self.warmed = False
        self._sessions: "OrderedDict[Tuple[str, str], Any]" = OrderedDict()

    # -- start-up --------------------------------------------------------------------------
    def load(self) -> None:
        from ..model.checkpoint import CheckpointError
        from ..model.devices import DeviceError
        from ..model.engine import LesionLocatorModel

        try:
            self.model = LesionLocatorModel(self.cfg.checkpoint, device=self.cfg.device, folds=self.cfg.folds,
                                            tta=self.cfg.tta, compile=self.cfg.compile, grow=self.cfg.grow)
            for kind in self.model.kinds:  # every fold of every model now: a broken file fails at start
                self.model.prompt_model(kind)
        except (CheckpointError, DeviceError) as exc:
            raise ServerConfigError(str(exc)) from None
        if not any(self.model.has(k) for k in SEGMENTATION_KINDS):
            self.unavailable["segment"] = "the checkpoint has no point or box model"
        try:
            tracker = self.model.tracker()
            self.tracking = {"propagation": str(getattr(tracker, "propagation", "")),
                             "refine": str(getattr(tracker, "refine", ""))}
            tracker.close()
        except Exception as exc:  # noqa: BLE001 - tracking is optional; segmentation still serves
            self.unavailable["track"] = f"{type(exc).__name__}: {exc}"

    def warmup(self) -> None:
        """One forward pass per segmentation model (cuDNN autotuning, lazy init) so click 1 is not slow."""
        for kind in SEGMENTATION_KINDS:
            if self.model.has(kind):
                self.model.warmup(kind)
        self.warmed = True

    def describe(self) -> Dict[str, Any]:
        return {"settings": self.model.settings() if self.model is not None else None,
                "prompt_types": ([k for k in SEGMENTATION_KINDS if self.model.has(k)] + ["mask"]
                                 if self.model is not None and "segment" not in self.unavailable else []),
                "tracking": self.tracking, "unavailable": dict(self.unavailable)}

    # -- requests ----------------------------------------------------------------------------
    def _check_folds(self, kinds: Sequence[str], folds: Any) -> None:
        """A fold the checkpoint lacks, or one this server did not load, is the client's error (422)."""
        if folds is None:
            return
        for kind in kinds:
            if not self.model.has(kind):
                continue
            wanted = self.model.fold_ids(kind, folds)
            loaded = self.model.prompt_model(kind).folds
            missing = [f for f in wanted if f not in loaded]
            if missing:
                raise ApiError(422, "unsupported_setting",
                               f"the {kind} model of this server has fold(s) {loaded} loaded, not {missing}; start "
                               f"it with --folds covering them (e.g. --folds all), or ask for fewer folds")

    def session_for(self, key: Tuple[str, str], volume: Volume) -> Any:
        """The SegmentSession of one client image (set_image once; kept for the most recent images)."""
        s = self._sessions.get(key)
        if s is None:
            s = self.model.session()
            s.set_image(volume)
            self._sessions[key] = s
            while len(self._sessions) > self.max_prepared:
                self._sessions.popitem(last=False)[1].close()
        self._sessions.move_to_end(key)
        return s

    def prune(self, live: Set[Tuple[str, str]]) -> None:
        """Drop the sessions of images no client session holds any more."""
        for key in [k for k in self._sessions if k not in live]:
            self._sessions.pop(key).close()

    def segment(self, key: Tuple[str, str], volume: Volume, prompts: Mapping[str, Any], arrays: Sequence[np.ndarray],
                folds: Any, tta: bool, grow: Optional[bool], probabilities: bool) -> SegmentationResult:
        from ..core.prompts import parse_prompts
        from ..segment.session import resolve_prompts

        if "segment" in self.unavailable:
            raise ApiError(501, "segmentation_unavailable", self.unavailable["segment"])
        self._check_folds(SEGMENTATION_KINDS, folds)
        # parse and validate every lesion first (a bad one is a 422 before any work), one lesion at a time so
        # that at most one full-size mask prompt exists at once
        for lid, entry in prompts.items():
            resolve_prompts(volume, parse_prompts({lid: entry}, volume, arrays), None, None, None, "voxel")
        session = self.session_for(key, volume)
        session.tta, session.folds, session.grow = tta, folds, grow
        out = SegmentationResult(volume)
        for lid, entry in prompts.items():
            res = session.segment(parse_prompts({lid: entry}, volume, arrays), return_probabilities=probabilities)
            out.lesions.update(res.lesions)
        out.lesions = dict(sorted(out.lesions.items()))
        return out

    def track(self, baseline: Volume, followups: List[Volume], prompts: Mapping[str, Any],
              arrays: Sequence[np.ndarray], from_baseline: bool, propagation: Optional[str], refine: Optional[str],
              folds: Any, tta: bool, grow: Optional[bool]) -> TrackingResult:
        from ..core.prompts import parse_prompts
        from ..model.engine import KINDS

        if "track" in self.unavailable:
            raise ApiError(501, "tracking_unavailable", f"tracking is not available on this server "
                                                        f"({self.unavailable['track']})")
        self._check_folds(KINDS, folds)
        if grow is not None and grow != self.model.grow:
            # the tracker segments with the model's growth setting; it has no per-request choice
            raise ApiError(422, "unsupported_setting", f"this server tracks with grow={self.model.grow}; start it "
                                                       f"{'without' if self.model.grow else 'with'} --no-grow, or "
                                                       f"ask for grow={self.model.grow}")
        parsed = parse_prompts(dict(prompts), baseline, arrays)
        tracker = self.model.tracker(propagation=propagation, refine=refine, tta=tta, folds=folds)
        try:
            tracker.set_images(baseline, followups)
            return tracker.track(parsed, from_baseline=from_baseline)
        finally:
            tracker.close()  # its images and cached preprocessing go now, not with the next request
