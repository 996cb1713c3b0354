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
import math
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from ..core.geometry import Volume
from ..core.results import SegmentationResult, TrackingResult
from .config import ServerConfig, ServerConfigError
from .errors import ApiError

log = logging.getLogger("lesionlocator.server")

SEGMENTATION_KINDS = ("point", "box")


class Abandoned(Exception):
    """The job's client went away or its deadline passed before / while it ran (nothing is recorded)."""


@dataclass
class Job:
    fn: Callable[..., Any]
    args: tuple
    future: "Future[Any]"
    owner: str = ""
    cancel: threading.Event = field(default_factory=threading.Event)
    deadline: Optional[float] = None  # time.monotonic()

    def check(self) -> None:
        """Raises :class:`Abandoned` when the client is gone or the deadline passed (checked before the job
        starts, between lesions and before every tile)."""
        if self.cancel.is_set():
            raise Abandoned("the client disconnected")
        if self.deadline is not None and time.monotonic() > self.deadline:
            self.cancel.set()
            raise Abandoned("the request's deadline passed")


class _CheckAsEvent:
    """A cancel event for sessions and the tracker whose ``is_set`` runs the request's checks (they raise)."""

    def __init__(self, check: Callable[[], None]) -> None:
        self._check = check

    def is_set(self) -> bool:
        self._check()
        return False


class ModelWorker:
    """One persistent thread that runs model jobs (CUDA state is per thread), fairly across owners.

    Each owner has its own queue of at most ``max_per_owner`` jobs; the thread takes one job from each owner
    in turn (round-robin), so a client that floods the queue delays another client's click by at most the job
    in progress plus one job of each other waiting owner, never by its whole backlog."""

    def __init__(self, max_queue: int = 64, max_per_owner: int = 4) -> None:
        self.max_queue = max_queue
        self.max_per_owner = max_per_owner
        self.thread_ids: Set[int] = set()
        self._queues: "OrderedDict[str, Deque[Job]]" = OrderedDict()  # owners in round-robin order
        self._cv = threading.Condition()
        self._running: Optional[Job] = None
        self._stopping = False
        self.abandoned = 0
        self._thread = threading.Thread(target=self._loop, name="lesionlocator-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cv:
            return sum(len(q) for q in self._queues.values()) + (self._running is not None)

    def _loop(self) -> None:
        self.thread_ids.add(threading.get_ident())
        while True:
            with self._cv:
                while not self._queues and not self._stopping:
                    self._cv.wait()
                if not self._queues:
                    return  # stopping and nothing left
                owner, q = next(iter(self._queues.items()))
                job = q.popleft()
                del self._queues[owner]
                if q:
                    self._queues[owner] = q  # to the back of the round
                self._running = job
            try:
                if not job.future.set_running_or_notify_cancel():
                    self.abandoned += 1  # its client left while it waited: it never runs
                    continue
                try:
                    job.check()
                    result = job.fn(*job.args)
                except BaseException as exc:  # noqa: BLE001 - delivered to the waiting request
                    if isinstance(exc, Abandoned):
                        self.abandoned += 1
                    job.future.set_exception(exc)
                else:
                    job.future.set_result(result)
            finally:
                with self._cv:
                    self._running = None
                job = None  # type: ignore[assignment]  # its arguments (images) go now

    def submit(self, fn: Callable[..., Any], *args: Any, owner: str = "", deadline: Optional[float] = None,
               force: bool = False) -> Job:
        with self._cv:
            if self._stopping:
                raise ApiError(503, "shutting_down", "the server is shutting down", headers={"Retry-After": "10"})
            q = self._queues.get(owner)
            n_own = len(q) if q else 0
            if not force:
                if n_own >= self.max_per_owner:
                    raise ApiError(429, "too_many_requests",
                                   f"you have {n_own} model requests waiting (the limit per client is "
                                   f"{self.max_per_owner}); wait for them", headers={"Retry-After": "2"})
                if sum(len(x) for x in self._queues.values()) >= self.max_queue:
                    raise ApiError(503, "busy", f"the model queue is full ({self.max_queue} requests); retry later",
                                   headers={"Retry-After": "5"})
            job = Job(fn, args, Future(), owner, deadline=deadline)
            self._queues.setdefault(owner, deque()).append(job)
            self._cv.notify()
            return job

    def submit_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.submit(fn, *args, force=True).future.result()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Queue housekeeping without waiting for it (skipped when the queue is full: the next job redoes it)."""
        try:
            self.submit(fn, *args, owner="\0housekeeping", force=self.pending < self.max_queue)
        except ApiError:
            pass

    async def run(self, fn: Callable[..., Any], *args: Any, owner: str = "", deadline: Optional[float] = None,
                  disconnected: Optional[Callable[[], Awaitable[bool]]] = None) -> Any:
        """Run ``fn`` on the worker; while waiting, poll ``disconnected`` so that a job whose client left is
        dropped before it starts (or before its next tile, through ``Job.check``)."""
        job = self.submit(fn, *args, owner=owner, deadline=deadline)
        fut = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({fut}, timeout=0.25)
                if done:
                    return fut.result()
                if disconnected is not None and await disconnected():
                    job.cancel.set()  # not started: never starts; running: stops before its next tile
                    job.future.cancel()
                    raise ApiError(499, "client_closed_request", "the client disconnected")
        except asyncio.CancelledError:
            job.cancel.set()
            job.future.cancel()
            raise

    def check_current(self) -> None:
        """For the running job (on the worker thread): raise :class:`Abandoned` if its client left."""
        job = self._running
        if job is not None:
            job.check()

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Bounded: queued jobs are cancelled (503 to their clients), the running one gets ``timeout_s``."""
        with self._cv:
            self._stopping = True
            for q in self._queues.values():
                for job in q:
                    job.cancel.set()
                    job.future.cancel()
            self._queues.clear()
            self._cv.notify_all()  # the running job finishes and delivers its reply (SIGTERM mid-request)
        self._thread.join(timeout=timeout_s)


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

    # -- work bound ------------------------------------------------------------------------
    def passes(self, folds: Any, tta: bool) -> int:
        """Forward passes per tile: one per fold, times the mirrored copies under TTA."""
        kind = next((k for k in SEGMENTATION_KINDS if self.model.has(k)), None)
        if kind is None:
            return 1
        n_folds = len(self.model.fold_ids(kind, folds))
        mirrors = len(tuple(getattr(self.model.config(kind), "mirror_axes", ()) or ()))
        return n_folds * (2 ** mirrors if tta else 1)

    def tiles_of(self, volume: Volume, prompt: Any) -> int:
        """Sliding-window tiles (half-patch steps) over a prompt's extent at the model's spacing; a point is one."""
        from ..core.prompts import Box, Mask

        kind = "box" if self.model.has("box") else "point"
        cfg = self.model.config(kind)
        if isinstance(prompt, Box):
            b = prompt.bounds
            extent = [b[1] - b[0], b[3] - b[2], b[5] - b[4]]
        elif isinstance(prompt, Mask):
            extent = []
            for ax in range(3):
                hit = np.flatnonzero(np.any(prompt.mask, axis=tuple(a for a in range(3) if a != ax)))
                extent.append(int(hit[-1] - hit[0] + 1) if hit.size else 1)
        else:
            return 1
        tiles = 1
        for n_vox, sp_img, sp_model, p in zip(extent, volume.spacing, cfg.spacing, cfg.patch_size):
            n = n_vox * float(sp_img) / float(sp_model)
            tiles *= 1 if n <= p else int(math.ceil((n - p) / (p * 0.5))) + 1
        return tiles

    def check_work(self, tile_passes: int, mask_voxels: int, n_lesions: int) -> None:
        cfg = self.cfg
        if tile_passes > cfg.max_work:
            raise ApiError(413, "too_much_work",
                           f"this request needs about {tile_passes} tile passes (tiles x lesions x folds x TTA "
                           f"mirrors); this server accepts at most {cfg.max_work} per request: send fewer lesions or "
                           f"smaller boxes per request, or fewer folds / no TTA",
                           {"estimated": tile_passes, "limit": cfg.max_work})
        if mask_voxels > cfg.max_mask_voxels:
            raise ApiError(413, "too_much_work",
                           f"the mask prompts of this request hold {mask_voxels} voxels; the limit is "
                           f"{cfg.max_mask_voxels} per request: send them in several requests",
                           {"estimated": mask_voxels, "limit": cfg.max_mask_voxels})

    def _between_lesions(self, check: Optional[Callable[[], None]]) -> Callable[[], None]:
        """What runs between two lesions, and before every tile, of a request: the client's presence and deadline
        (``check``), and the network passes actually run against ``max_work``. The estimate cannot know how far
        growth will carry a lesion, so a request may overrun the cap by one tile's passes before it is stopped."""
        start = self.model.network_passes

        def between() -> None:
            if check is not None:
                check()  # the client left or the deadline passed: stop, record nothing
            ran = self.model.network_passes - start
            if ran > self.cfg.max_work:
                raise ApiError(413, "too_much_work",
                               f"this request ran {ran} network passes (growth carried its lesions past their "
                               f"patches) and this server accepts at most {self.cfg.max_work} per request: send "
                               f"fewer lesions per request, or fewer folds / no TTA", {"ran": ran,
                                                                                       "limit": self.cfg.max_work})
        return between

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
                folds: Any, tta: bool, grow: Optional[bool], probabilities: bool,
                check: Optional[Callable[[], None]] = None) -> SegmentationResult:
        from ..core.prompts import Mask, effective, parse_prompts
        from ..segment.session import resolve_prompts

        if "segment" in self.unavailable:
            raise ApiError(501, "segmentation_unavailable", self.unavailable["segment"])
        self._check_folds(SEGMENTATION_KINDS, folds)
        # parse and validate every lesion first (a bad one is a 422 before any work), one lesion at a time so
        # that at most one full-size mask prompt exists at once; estimate the work and refuse it above the cap
        work, mask_voxels = 0, 0
        for lid, entry in prompts.items():
            todo = resolve_prompts(volume, parse_prompts({lid: entry}, volume, arrays), None, None, None, "voxel")
            for items in todo.values():
                for prompt in effective(items):
                    work += self.tiles_of(volume, prompt)
                    if isinstance(prompt, Mask):
                        mask_voxels += int(np.count_nonzero(prompt.mask))
            del todo
        self.check_work(work * self.passes(folds, tta), mask_voxels, len(prompts))
        session = self.session_for(key, volume)
        session.tta, session.folds, session.grow = tta, folds, grow
        out = SegmentationResult(volume)
        between = self._between_lesions(check)
        for lid, entry in prompts.items():
            between()
            res = session.segment(parse_prompts({lid: entry}, volume, arrays), return_probabilities=probabilities,
                                  cancel=_CheckAsEvent(between))  # checked before every tile too
            out.lesions.update(res.lesions)
        out.lesions = dict(sorted(out.lesions.items()))
        return out

    def track(self, baseline: Volume, followups: List[Volume], prompts: Mapping[str, Any],
              arrays: Sequence[np.ndarray], from_baseline: bool, propagation: Optional[str], refine: Optional[str],
              folds: Any, tta: bool, grow: Optional[bool], check: Optional[Callable[[], None]] = None,
              progress: Optional[Callable[[float, str], None]] = None) -> TrackingResult:
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
        # tracking segments each lesion at the baseline and in every follow-up: about one patch per lesion each
        n_lesions = len(parsed)
        self.check_work(n_lesions * (1 + len(followups)) * self.passes(folds, tta), sum(
            int(np.count_nonzero(p.mask)) for items in parsed.values() for p in items if hasattr(p, "mask")), n_lesions)
        between = self._between_lesions(check)
        between()
        tracker = self.model.tracker(propagation=propagation, refine=refine, tta=tta, folds=folds)
        try:
            tracker.set_images(baseline, followups)
            # the tracker checks its cancel event between lesions and follow-ups, its sessions before every tile
            return tracker.track(parsed, from_baseline=from_baseline, cancel=_CheckAsEvent(between), progress=progress)
        finally:
            tracker.close()  # its images and cached preprocessing go now, not with the next request
