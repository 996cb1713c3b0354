"""Local GPU backend: ``lesionlocator serve`` (FastAPI + uvicorn) for LesionLocatorClient.

Design, in short:
- One model worker: every model request (set image, segment, track, undo) runs in arrival
  order on one persistent thread, because CUDA / cuDNN caches are per thread and one GPU
  gains nothing from concurrent forward passes.  Models are loaded and warmed up on that
  thread before the port opens.
- Images travel once per session as a chunked zstd stream (``wire``), identified by a
  content hash; a re-upload of the same scan is answered from the cache.  Replies carry only
  the changed lesion crops (bbox + bit-packed, compressed mask).
- Loopback by default; any other address needs a bearer token (constant-time comparison).
  Sessions are bound to the creator's credentials, expire when idle, and the cached images
  stay under a memory budget (least recently used sessions are evicted first).
- Every error is a JSON body ``{"error": code, "message": text}`` with a 4xx/5xx status;
  a crash inside inference is a 500 and the server keeps serving.

Endpoints (all under /v1, OpenAPI at /openapi.json and /docs):
  GET  health | version                      liveness; version, protocol, models, prompt types, devices
  POST sessions -> {session_id}             DELETE / GET sessions/{id}
  POST sessions/{id}/image/reuse {hash}      select an image the server holds (404 image_not_cached)
  PUT  sessions/{id}/image  <volume stream>  upload (wire.iter_encode_volume)
  POST sessions/{id}/segment {prompts}       -> mask bundle of the changed lesions
  POST sessions/{id}/track {baseline, followups, prompts | use_results}
                                             -> bundles: baseline, then one per follow-up
  POST sessions/{id}/undo                    -> mask bundle of what the undo changed
  GET  sessions/{id}/results?image=HASH      -> every current mask of an image
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import numpy as np
from contextlib import asynccontextmanager
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..core.geometry import GeometryError, Volume
from ..core.results import LesionMask, SegmentationResult
from .sessions import CacheFull, ImageNotFound, Session, SessionNotFound, SessionStore
from .wire import (
    BUNDLES_MEDIA_TYPE,
    MASKS_MEDIA_TYPE,
    PROTOCOL_VERSION,
    VOLUME_MEDIA_TYPE,
    PayloadTooLarge,
    VolumeDecoder,
    WireError,
    decode_mask_prompt,
    encode_masks,
    pack_bundles,
)

log = logging.getLogger("lesionlocator.server")

API = "/v1"
CLIENT_KEY_HEADER = "x-lesionlocator-client"
MAX_LESIONS_PER_REQUEST = 512
UPLOAD_SLOTS = 2  # uploads decoded at once (each holds one raw image in memory)
HASH_PATTERN = r"^[0-9a-f]{64}$"


class ServerConfigError(ValueError):
    """The server cannot start with the given options (e.g. a public address without a token)."""


# ======================================================================================
# configuration
@dataclass
class ServerConfig:
    checkpoint: Optional[str] = None
    device: str = "auto"
    folds: Any = (0,)
    tta: bool = False
    host: str = "127.0.0.1"
    port: int = 8765
    tokens: tuple[str, ...] = ()
    max_sessions: int = 16
    max_upload_mb: float = 1024.0
    max_cache_mb: float = 8192.0
    session_ttl_s: float = 3600.0
    max_queue: int = 64
    upload_idle_timeout_s: float = 60.0
    max_json_mb: float = 64.0  # JSON requests (prompts, masks as packed crops) are small; uploads have their own cap
    warmup: bool = True
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_cache_bytes(self) -> int:
        return int(self.max_cache_mb * 2**20)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token_file(path: str | os.PathLike) -> tuple[str, ...]:
    """Tokens, one a line (blank lines and '#' comments ignored); each token is one client identity."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ServerConfigError(f"cannot read token file {p}: {exc}") from None
    tokens = tuple(t.strip() for t in lines if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise ServerConfigError(f"token file {p} holds no token")
    try:
        if os.name == "posix" and p.stat().st_mode & 0o077:
            log.warning("token file %s is readable by other users; restrict it with chmod 600", p)
    except OSError:
        pass
    return tokens


def check_config(cfg: ServerConfig) -> None:
    if not is_loopback(cfg.host) and not cfg.tokens:
        raise ServerConfigError(
            f"refusing to listen on {cfg.host} without a token: anyone on the network could use the server; "
            "pass --token or --token-file (or bind 127.0.0.1)"
        )
    for t in cfg.tokens:
        if len(t) < 16 or any(c.isspace() for c in t):
            raise ServerConfigError("tokens must be at least 16 characters without whitespace "
                                    "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ServerConfigError("--tls-cert and --tls-key go together")
    for f in (cfg.tls_cert, cfg.tls_key):
        if f and not Path(f).is_file():
            raise ServerConfigError(f"TLS file not found: {f}")
    if cfg.max_sessions < 1 or cfg.max_upload_mb <= 0 or cfg.max_cache_mb <= 0 or cfg.session_ttl_s <= 0:
        raise ServerConfigError("--max-sessions, --max-upload-mb, --max-cache-mb and --session-ttl must be positive")


# ======================================================================================
# request schemas (pydantic: validated before anything reaches the model)
# strict: a coordinate is a JSON number (never "12" or true); a box bound is a JSON integer.
Coord3 = Annotated[list[Annotated[float, Field(strict=True, allow_inf_nan=False)]], Field(min_length=3, max_length=3)]
Box6 = Annotated[list[Annotated[int, Field(strict=True, ge=0, le=2**31)]], Field(min_length=6, max_length=6)]
Corners = Annotated[list[Coord3], Field(min_length=2, max_length=2)]
# JSON object keys are strings: a lesion id is a positive decimal integer without leading zeros.
LesionId = Annotated[str, Field(pattern=r"^[1-9][0-9]{0,9}$")]


class MaskPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bbox: Box6
    data: str = Field(max_length=64 * 2**20)


class PromptSpec(BaseModel):
    """Exactly one prompt per lesion, in the published JSON vocabulary plus world variants and masks."""

    model_config = ConfigDict(extra="forbid")
    point: Optional[Coord3] = None
    box: Optional[Box6] = None
    point_lps: Optional[Coord3] = None
    point_ras: Optional[Coord3] = None
    box_lps: Optional[Corners] = None
    box_ras: Optional[Corners] = None
    mask: Optional[MaskPrompt] = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "PromptSpec":
        given = [k for k in type(self).model_fields if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of point, box, point_lps, point_ras, box_lps, box_ras, mask "
                             f"(got {given or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in type(self).model_fields if getattr(self, k) is not None)


class SegmentRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: dict[LesionId, PromptSpec] = Field(min_length=1, max_length=MAX_LESIONS_PER_REQUEST)
    image: Optional[str] = Field(default=None, pattern=HASH_PATTERN,
                                 description="content hash of a session image; default: the last uploaded")
    probabilities: bool = Field(default=False, strict=True,
                                description="also return float32 foreground probabilities on each lesion's box")


class TrackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    baseline: str = Field(pattern=HASH_PATTERN)
    followups: list[Annotated[str, Field(pattern=HASH_PATTERN)]] = Field(min_length=1, max_length=16)
    prompts: Optional[dict[LesionId, PromptSpec]] = Field(default=None, max_length=MAX_LESIONS_PER_REQUEST)
    use_results: bool = Field(default=False, strict=True,
                              description="track the session's current masks on the baseline")
    from_baseline: bool = Field(default=False, strict=True,
                                description="prompt every follow-up from the baseline (default: autoregressive)")

    @model_validator(mode="after")
    def _one_source(self) -> "TrackRequest":
        if bool(self.prompts) == bool(self.use_results):
            raise ValueError("give either prompts or use_results=true (exactly one)")
        return self


class ReuseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hash: str = Field(pattern=HASH_PATTERN)


# ======================================================================================
# errors
class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail = status, code, message, detail


def _error_for(exc: BaseException) -> ApiError:
    """Map library exceptions to HTTP answers; anything unknown is an inference failure (500)."""
    from ..core.prompts import PromptError

    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, PayloadTooLarge):
        return ApiError(413, "payload_too_large", str(exc))
    if isinstance(exc, WireError):
        return ApiError(400, "bad_payload", str(exc))
    if isinstance(exc, SessionNotFound):
        return ApiError(404, "unknown_session", str(exc))
    if isinstance(exc, ImageNotFound):
        return ApiError(409, "no_image", str(exc))
    if isinstance(exc, CacheFull):
        return ApiError(413, "image_too_large", str(exc))
    if isinstance(exc, (PromptError, GeometryError)):
        return ApiError(422, "invalid_prompt", str(exc))
    try:
        from ..track.tracker import TrackingError
    except ImportError:  # an installation without the tracker
        TrackingError = ()  # type: ignore[assignment,misc]  # noqa: N806
    if TrackingError and isinstance(exc, TrackingError):
        return ApiError(422, "cannot_track", str(exc))
    return ApiError(500, "inference_failed", f"{type(exc).__name__}: {exc}")


# ======================================================================================
# the model side: everything here runs on the single worker thread
class ModelWorker:
    """One persistent thread that runs model jobs in arrival order (CUDA state is per thread)."""

    def __init__(self, max_queue: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lesionlocator-model")
        self._pending = 0
        self._lock = threading.Lock()
        self.max_queue = max_queue
        self.thread_ids: set[int] = set()

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

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        with self._lock:
            if self._pending >= self.max_queue:
                raise ApiError(503, "busy", f"the model queue is full ({self.max_queue} requests); retry later")
            self._pending += 1
        return await asyncio.wrap_future(self._pool.submit(self._wrap, fn, args))

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def available_devices() -> list[str]:
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return out


class ModelService:
    """The segmentation models and the tracker; every method runs on the worker thread only.

    One LesionSegmenter holds the networks.  Each session image gets a shallow view of it
    (``copy.copy`` + ``set_image``): the views share the loaded networks but keep their own
    per-image cache (crop box, resampling grid), so alternating between two clients' scans
    does not recompute either.  Views are kept for the most recently used images only.
    """

    def __init__(self, cfg: ServerConfig, max_views: int = 8) -> None:
        self.cfg = cfg
        self.segmenter: Any = None
        self.tracker: Any = None
        self.device = "cpu"
        self.model_ids: dict[str, str] = {}
        self.load_errors: dict[str, str] = {}
        self.max_views = max_views
        self.tracking_method: dict[str, str] = {}
        self._views: "OrderedDict[str, Any]" = OrderedDict()

    @property
    def prompt_types(self) -> list[str]:
        return [] if self.segmenter is None else sorted(self.model_ids.keys() & {"point", "box"})

    # -- start-up --------------------------------------------------------------------
    def load(self) -> None:
        from ..model.checkpoint import CheckpointError, resolve_model_dir
        from ..model.devices import DeviceError
        from ..segment.segmenter import LesionSegmenter

        if not self.cfg.checkpoint:
            raise ServerConfigError("no checkpoint given: pass -m/--model CHECKPOINT (zip, folder or model folder)")
        kinds = []
        for kind in ("point", "box"):
            try:
                model_dir = resolve_model_dir(self.cfg.checkpoint, kind)
            except CheckpointError as exc:
                self.load_errors[kind] = str(exc)
                continue
            kinds.append(kind)
            self.model_ids[kind] = _model_id(model_dir)
        if not kinds:
            raise ServerConfigError(f"no segmentation model found in {self.cfg.checkpoint}: "
                                    + "; ".join(self.load_errors.values()))
        try:
            self.segmenter = LesionSegmenter.from_checkpoint(
                self.cfg.checkpoint, prompt_type=kinds, device=self.cfg.device, folds=self.cfg.folds,
                tta=self.cfg.tta)
        except DeviceError as exc:
            raise ServerConfigError(str(exc)) from None
        self.device = str(self.segmenter.device)
        self._load_tracker()

    def _load_tracker(self) -> None:
        """Tracking is optional: with a LesionLocatorTrack model the published learned method, without one
        classical registration refined by the segmentation model; any failure leaves segmentation serving."""
        from ..model.checkpoint import CheckpointError, resolve_model_dir

        try:
            from ..track.tracker import LesionTracker
        except ImportError as exc:
            self.load_errors["track"] = f"this installation has no tracker ({exc})"
            return
        track_dir = None
        try:
            track_dir = resolve_model_dir(self.cfg.checkpoint, "track")  # type: ignore[arg-type]
            seg_dirs = {resolve_model_dir(self.cfg.checkpoint, k) for k in self.prompt_types}  # type: ignore[arg-type]
            if track_dir in seg_dirs:  # a single segmentation model folder resolves to itself for every kind
                track_dir = None
        except CheckpointError:
            track_dir = None
        try:
            # the tracker gets its own view of the segmenter: shared networks, its own image state
            self.tracker = LesionTracker(track_dir, segmenter=copy.copy(self.segmenter), device=self.device,
                                         folds=self.cfg.folds, tta=self.cfg.tta)
        except Exception as exc:  # noqa: BLE001 - tracking is optional; segmentation still serves
            self.load_errors["track"] = f"{type(exc).__name__}: {exc}"
            return
        self.model_ids["track"] = _model_id(track_dir) if track_dir else "classical-registration"
        self.tracking_method = {"propagation": self.tracker.propagation, "refine": self.tracker.refine}

    warmed = False

    def warmup(self) -> None:
        """One forward pass per model (cuDNN autotuning, lazy init) so the first click is not slow."""
        for kind in self.prompt_types:
            self.segmenter.warmup(kind)
        self.warmed = True

    # -- requests ----------------------------------------------------------------------
    def view(self, image_hash: str, volume: Volume) -> Any:
        v = self._views.get(image_hash)
        if v is None:
            v = copy.copy(self.segmenter)
            v.set_image(volume)
            self._views[image_hash] = v
            while len(self._views) > self.max_views:
                self._views.popitem(last=False)
        self._views.move_to_end(image_hash)
        return v

    def prune(self, live: set[str]) -> None:
        """Drop views of images no session holds any more (their memory belongs to the cache budget)."""
        for h in [h for h in self._views if h not in live]:
            del self._views[h]

    def segment(self, image_hash: str, volume: Volume, prompts: dict[int, Any], probabilities: bool = False
                ) -> SegmentationResult:
        from ..core.prompts import Box, Point

        for lid, p in prompts.items():
            kind = "point" if isinstance(p, Point) else "box" if isinstance(p, Box) else None
            if kind is not None and kind not in self.model_ids:
                raise ApiError(422, "model_not_loaded",
                               f"lesion {lid}: {kind} prompts need the {kind} model, which this server does not "
                               f"have ({self.load_errors.get(kind, 'not in the checkpoint')})")
        return self.view(image_hash, volume).segment_prompts(prompts, return_probabilities=probabilities)

    def track(self, baseline: tuple[str, Volume], followups: list[tuple[str, Volume]],
              prompts: dict[int, Any], from_baseline: bool = False
              ) -> tuple[SegmentationResult, list[SegmentationResult]]:
        """(baseline masks, one result per follow-up), as LesionTracker.track computes them."""
        if self.tracker is None:
            raise ApiError(501, "tracking_unavailable",
                           f"tracking is not available on this server ({self.load_errors.get('track', 'no model')})")
        results = list(self.tracker.track(baseline[1], [f for _, f in followups], prompts,
                                          from_baseline=from_baseline))
        base = self.tracker.baseline_result or SegmentationResult(baseline[1])
        return base, results


def _model_id(model_dir: Path) -> str:
    """A short, stable identifier of a model folder: its name plus a hash of its plans."""
    try:
        digest = hashlib.sha256((Path(model_dir) / "plans.json").read_bytes()).hexdigest()[:12]
    except OSError:
        digest = "unknown"
    return f"{Path(model_dir).name}@{digest}"


# ======================================================================================
# ASGI guard: authentication and body size, before any routing or parsing
class GuardMiddleware:
    """Checks the bearer token on every request and caps request bodies.

    Pure ASGI (no BaseHTTPMiddleware) to keep per-click overhead low.  JSON bodies are
    buffered here up to the cap; the image upload streams through and the volume decoder
    enforces the same cap while reading.
    """

    def __init__(self, app: Any, tokens: tuple[str, ...], max_body: int, max_json: int,
                 stream_paths_suffix: str = "/image"):
        self.app = app
        self.tokens = [t.encode() for t in tokens]
        self.max_body = max_body
        self.max_json = min(max_json, max_body)
        self.stream_suffix = stream_paths_suffix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        token = b""
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            token = auth[7:].strip()
        if self.tokens:
            # compare against every token (no early exit) so timing does not tell which prefix matched.
            ok = False
            for t in self.tokens:
                ok |= hmac.compare_digest(token, t)
            if not ok:
                msg = "missing bearer token" if not auth else "wrong token"
                return await _send_json(send, 401, {"error": "unauthorized", "message":
                                                    f"{msg}: send 'Authorization: Bearer <token>'"},
                                        extra_headers=[(b"www-authenticate", b"Bearer")])
        client_key = headers.get(CLIENT_KEY_HEADER.encode(), b"")[:128]
        scope.setdefault("state", {})["owner"] = hashlib.sha256(
            b"lesionlocator-owner\0" + token + b"\0" + client_key).hexdigest()
        try:
            length = int(headers.get(b"content-length", b"0") or 0)
        except ValueError:
            return await _send_json(send, 400, {"error": "bad_request", "message": "invalid Content-Length"})
        if length > self.max_body:
            return await _send_json(send, 413, {"error": "payload_too_large", "message":
                                                f"request body of {length} bytes exceeds the limit of "
                                                f"{self.max_body} bytes"})
        if scope["method"] in ("PUT",) and scope["path"].endswith(self.stream_suffix):
            return await self.app(scope, receive, send)
        if length > self.max_json:
            return await _send_json(send, 413, {"error": "payload_too_large", "message":
                                                f"request body of {length} bytes exceeds the limit of "
                                                f"{self.max_json} bytes for JSON requests"})
        # buffer small bodies, refusing to read past the cap even without a Content-Length.
        body = bytearray()
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.max_json:
                return await _send_json(send, 413, {"error": "payload_too_large", "message":
                                                    f"request body exceeds the limit of {self.max_json} bytes"})
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def _send_json(send: Callable, status: int, obj: dict, extra_headers: list | None = None) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
                + (extra_headers or [])})
    await send({"type": "http.response.body", "body": data})


# ======================================================================================
# the application
@dataclass
class AppState:
    cfg: ServerConfig
    store: SessionStore
    worker: ModelWorker
    service: ModelService
    decode_pool: ThreadPoolExecutor
    started: float = field(default_factory=time.time)
    ready: bool = False


def _prompts_from_specs(specs: dict[str, PromptSpec], volume: Volume) -> dict[int, Any]:
    """Request prompts -> library prompts in input voxels, each checked against the uploaded geometry."""
    from ..core.prompts import Mask, PromptError, box_from_world, point_from_world, validate, Point, Box

    out: dict[int, Any] = {}
    for key, spec in specs.items():
        lid = int(key)
        if lid > 2**31 - 1:
            raise ApiError(422, "invalid_prompt", f"lesion id {key} is larger than 2^31 - 1")
        kind = spec.kind
        try:
            if kind == "point":
                p: Any = Point(tuple(float(v) for v in spec.point))  # type: ignore[union-attr]
            elif kind == "box":
                p = Box(tuple(int(v) for v in spec.box))  # type: ignore[union-attr]
            elif kind in ("point_lps", "point_ras"):
                p = point_from_world(getattr(spec, kind), volume, ras=kind.endswith("ras"))
            elif kind in ("box_lps", "box_ras"):
                a, b = getattr(spec, kind)
                p = box_from_world(a, b, volume, ras=kind.endswith("ras"))
            else:
                assert spec.mask is not None
                p = Mask(decode_mask_prompt(spec.mask.model_dump(), volume.shape).astype(bool))
            out[lid] = validate(p, volume.shape)
        except (PromptError, WireError) as exc:
            raise ApiError(422, "invalid_prompt", f"lesion {lid}: {exc}") from None
    return out


def _union_bbox(a: tuple | None, b: tuple | None) -> list[int] | None:
    boxes = [x for x in (a, b) if x is not None and all(x[2 * i + 1] > x[2 * i] for i in range(3))]
    if not boxes:
        return None
    return [min(x[i] for x in boxes) if i % 2 == 0 else max(x[i] for x in boxes) for i in range(6)]


def _shrunk(les: LesionMask) -> LesionMask:
    """The mask as the reply carries it: no probabilities; cropped to its tight box unless it already is."""
    if les.probability is None:
        return les  # the segmenter crops masks it returns without probabilities (saves a pass over the crop)
    s = les.shrink()
    s.probability = None
    return s


def create_app(cfg: ServerConfig, service: ModelService | None = None) -> Any:
    """The FastAPI application; models load (on the worker thread) during start-up."""
    check_config(cfg)
    state = AppState(
        cfg=cfg,
        store=SessionStore(max_sessions=cfg.max_sessions, idle_timeout_s=cfg.session_ttl_s,
                           max_bytes=cfg.max_cache_bytes),
        worker=ModelWorker(max_queue=cfg.max_queue),
        service=service or ModelService(cfg),
        decode_pool=ThreadPoolExecutor(max_workers=2, thread_name_prefix="lesionlocator-decode"),
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        t0 = time.perf_counter()
        if state.service.segmenter is None:
            await state.worker.run(state.service.load)
        if cfg.warmup and not state.service.warmed:
            await state.worker.run(state.service.warmup)
        state.ready = True
        log.info("models ready in %.1f s on %s: %s", time.perf_counter() - t0, state.service.device,
                 state.service.model_ids)
        sweeper = asyncio.create_task(_sweep(state))
        try:
            yield
        finally:
            sweeper.cancel()
            state.worker.shutdown()
            state.decode_pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(
        title="LesionLocator server",
        version=__version__,
        description="Promptable 3D lesion segmentation and longitudinal tracking for LesionLocatorClient. "
                    f"Protocol version {PROTOCOL_VERSION}. Binary formats: {VOLUME_MEDIA_TYPE} (upload) and "
                    f"{MASKS_MEDIA_TYPE} (replies), see LesionLocatorLib/wire.py.",
        lifespan=lifespan,
    )
    app.state.ll = state

    # -- error bodies: always {"error", "message"} ------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = {"error": exc.code, "message": exc.message}
        if exc.detail is not None:
            body["detail"] = exc.detail
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        first = errs[0] if errs else {"loc": [], "msg": "invalid request"}
        return JSONResponse({"error": "invalid_request",
                             "message": f"{'.'.join(first['loc'])}: {first['msg']}", "detail": errs[:20]},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http_error", "message": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"error": "internal_error", "message": f"{type(exc).__name__}: {exc}"}, status_code=500)

    def owner(request: Request) -> str:
        return request.scope.get("state", {}).get("owner", "")

    def session_of(request: Request, session_id: str) -> Session:
        try:
            return state.store.get(session_id, owner(request))
        except SessionNotFound as exc:
            raise _error_for(exc) from None

    async def on_worker(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await state.worker.run(fn, *args)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - a crashed request must not take the server down
            err = _error_for(exc)
            if err.status >= 500:
                log.exception("request failed on the model worker")
                _free_gpu_cache()
            raise err from None

    upload_slots = asyncio.Semaphore(UPLOAD_SLOTS)
    binary_reply = {200: {"content": {MASKS_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                          "description": "mask bundle (wire.decode_masks)"}}

    # -- endpoints ---------------------------------------------------------------------
    @app.get(f"{API}/health", summary="Liveness and readiness")
    async def health() -> dict:
        return {"status": "ok" if state.ready else "starting", "queue": state.worker.pending,
                "sessions": len(state.store)}

    @app.get(f"{API}/version", summary="Version and capabilities")
    async def version() -> dict:
        svc = state.service
        return {
            "server": "lesionlocator",
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "models": svc.model_ids,
            "prompt_types": svc.prompt_types + (["mask"] if svc.prompt_types else []),
            "tracking": svc.tracker is not None,
            "tracking_method": svc.tracking_method,
            "device": svc.device,
            "devices": available_devices(),
            "max_upload_bytes": cfg.max_upload_bytes,
            "max_cache_bytes": cfg.max_cache_bytes,
            "session_ttl_s": cfg.session_ttl_s,
            "auth": bool(cfg.tokens),
            "formats": {"upload": VOLUME_MEDIA_TYPE, "reply": MASKS_MEDIA_TYPE},
            "unavailable": svc.load_errors,
        }

    @app.post(f"{API}/sessions", status_code=201, summary="Create a session (bound to your credentials)")
    async def create_session(request: Request) -> dict:
        s = state.store.create(owner(request))
        return {"session_id": s.id, "idle_timeout_s": cfg.session_ttl_s}

    @app.get(f"{API}/sessions/{{session_id}}", summary="Session state")
    async def get_session(request: Request, session_id: str) -> dict:
        return session_of(request, session_id).info()

    @app.delete(f"{API}/sessions/{{session_id}}", summary="Delete a session and its images")
    async def delete_session(request: Request, session_id: str) -> dict:
        try:
            state.store.delete(session_id, owner(request))
        except SessionNotFound as exc:
            raise _error_for(exc) from None
        return {"deleted": session_id}

    @app.put(
        f"{API}/sessions/{{session_id}}/image", summary="Upload an image (chunked zstd volume stream)",
        openapi_extra={"requestBody": {"required": True, "content": {
            VOLUME_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}},
    )
    async def upload_image(request: Request, session_id: str) -> dict:
        s = session_of(request, session_id)
        if upload_slots.locked():
            log.info("upload waits for a free slot (%d at once)", UPLOAD_SLOTS)
        async with upload_slots:  # each decoding upload holds a whole raw image in memory: bound them
            return await _upload(request, s)

    async def _upload(request: Request, s: Session) -> dict:
        t0 = time.perf_counter()
        dec = VolumeDecoder(max_stream_bytes=cfg.max_upload_bytes, max_raw_bytes=cfg.max_cache_bytes)
        loop = asyncio.get_running_loop()
        buf = bytearray()
        try:
            # decode in a side thread while the next bytes arrive (decompression overlaps the transfer).
            chunks = request.stream().__aiter__()
            while True:
                try:
                    # a stalled upload must not hold its slot (and a raw image of memory) forever
                    chunk = await asyncio.wait_for(chunks.__anext__(), timeout=cfg.upload_idle_timeout_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise ApiError(408, "upload_stalled", f"no upload data for {cfg.upload_idle_timeout_s:.0f} s; "
                                   "the upload was dropped") from None
                buf += chunk
                if len(buf) >= 1 << 20:
                    data, buf = bytes(buf), bytearray()
                    await loop.run_in_executor(state.decode_pool, dec.feed, data)
            if buf:
                await loop.run_in_executor(state.decode_pool, dec.feed, bytes(buf))
            volume, digest = await loop.run_in_executor(state.decode_pool, dec.finish)
        except WireError as exc:
            raise _error_for(exc) from None
        try:
            state.store.add_image(s, digest, volume)
        except (CacheFull, SessionNotFound) as exc:
            raise _error_for(exc) from None
        s.uploads += 1
        return {"image": digest, "shape": list(volume.shape), "dtype": str(volume.array.dtype),
                "uploaded": True, "received_bytes": dec.received_bytes,
                "decode_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @app.post(f"{API}/sessions/{{session_id}}/image/reuse",
              summary="Select an image already on the server by its content hash (skips the upload)")
    async def reuse_image(request: Request, session_id: str, body: ReuseRequest) -> dict:
        s = session_of(request, session_id)
        vol = s.images.get(body.hash) or state.store.find_image(owner(request), body.hash)
        if vol is None:
            raise ApiError(404, "image_not_cached", "the server does not hold this image; upload it")
        try:
            state.store.add_image(s, body.hash, vol)
        except (CacheFull, SessionNotFound) as exc:
            raise _error_for(exc) from None
        s.reuses += 1
        return {"image": body.hash, "shape": list(vol.shape), "dtype": str(vol.array.dtype), "uploaded": False,
                "lesions": sorted(s.lesions(body.hash))}

    @app.post(f"{API}/sessions/{{session_id}}/segment", summary="Segment lesions from prompts",
              response_class=Response, responses=binary_reply)
    async def segment(request: Request, session_id: str, body: SegmentRequest) -> Response:
        s = session_of(request, session_id)
        try:
            image_hash, volume = state.store.image(s, body.image)
        except ImageNotFound as exc:
            raise _error_for(exc) from None
        prompts = _prompts_from_specs(body.prompts, volume)
        t0 = time.perf_counter()

        def job() -> bytes:
            state.service.prune(state.store.live_images() | {image_hash})
            result = state.service.segment(image_hash, volume, prompts, body.probabilities)
            new = {lid: _shrunk(les) for lid, les in result.lesions.items()}  # what the session keeps
            previous = state.store.record(s, image_hash, new)
            s.requests += 1
            changed = {lid: {"changed_bbox": _union_bbox(previous[lid].bbox if previous.get(lid) else None,
                                                         new[lid].bbox)} for lid in new}
            reply = result.lesions.values() if body.probabilities else new.values()
            return encode_masks(reply, shape=volume.shape, per_lesion=changed,
                                extra={"image": image_hash, "history": len(s.history),
                                       "elapsed_ms": round((time.perf_counter() - t0) * 1000, 3)})

        return Response(await on_worker(job), media_type=MASKS_MEDIA_TYPE)

    @app.post(f"{API}/sessions/{{session_id}}/undo", summary="Undo the last result of the session",
              response_class=Response, responses=binary_reply)
    async def undo(request: Request, session_id: str) -> Response:
        s = session_of(request, session_id)

        def job() -> bytes:
            try:
                image_hash, restored, undone = state.store.undo(s)
            except IndexError as exc:
                raise ApiError(409, "nothing_to_undo", str(exc)) from None
            vol = s.images[image_hash]
            out, meta = [], {}
            for lid, prev in restored.items():
                gone = undone.get(lid)
                if prev is None:  # the undone result created this lesion: it disappears
                    z0, y0, x0 = (gone.bbox[0], gone.bbox[2], gone.bbox[4]) if gone else (0, 0, 0)
                    out.append(LesionMask(lid, (z0, z0, y0, y0, x0, x0), np.zeros((0, 0, 0), bool), status="removed"))
                else:
                    out.append(prev)
                meta[lid] = {"changed_bbox": _union_bbox(gone.bbox if gone else None,
                                                         prev.bbox if prev else None)}
            return encode_masks(out, shape=vol.shape, per_lesion=meta,
                                extra={"image": image_hash, "history": len(s.history)})

        return Response(await on_worker(job), media_type=MASKS_MEDIA_TYPE)

    @app.get(f"{API}/sessions/{{session_id}}/results", summary="All current masks of a session image",
             response_class=Response, responses=binary_reply)
    async def results(request: Request, session_id: str, image: Optional[str] = None) -> Response:
        s = session_of(request, session_id)
        try:
            image_hash, vol = state.store.image(s, image)
        except ImageNotFound as exc:
            raise _error_for(exc) from None
        return Response(encode_masks(list(s.lesions(image_hash).values()), shape=vol.shape,
                                     extra={"image": image_hash, "history": len(s.history)}),
                        media_type=MASKS_MEDIA_TYPE)

    @app.post(f"{API}/sessions/{{session_id}}/track",
              summary="Track baseline lesions into follow-up images (one mask bundle per follow-up)",
              response_class=Response,
              responses={200: {"content": {BUNDLES_MEDIA_TYPE: {
                  "schema": {"type": "string", "format": "binary"}}}}})
    async def track(request: Request, session_id: str, body: TrackRequest) -> Response:
        s = session_of(request, session_id)
        try:
            base = state.store.image(s, body.baseline)
            fus = [state.store.image(s, h) for h in body.followups]
        except ImageNotFound as exc:
            raise _error_for(exc) from None
        if body.use_results:
            from ..core.prompts import Mask

            current = s.lesions(base[0])
            if not current:
                raise ApiError(409, "no_results", "use_results=true but the baseline has no masks in this session")
            prompts = {lid: Mask(les.full(base[1].shape).astype(bool)) for lid, les in current.items()
                       if not les.empty}
        else:
            prompts = _prompts_from_specs(body.prompts or {}, base[1])

        def job() -> bytes:
            state.service.prune(state.store.live_images() | {base[0]} | {h for h, _ in fus})
            base_res, results_ = state.service.track(base, fus, prompts, body.from_baseline)
            parts = []
            # first bundle: the baseline masks (segmented from point/box prompts); then one per follow-up.
            # Tracking results are stored per image but are not undo steps (undo is for clicks).
            for (h, vol), res in zip([base, *fus], [base_res, *results_]):
                new = {lid: _shrunk(les) for lid, les in res.lesions.items()}
                state.store.record(s, h, new, undoable=False)
                parts.append(encode_masks(new.values(), shape=vol.shape, extra={"image": h}))
            s.requests += 1
            return pack_bundles(parts)

        return Response(await on_worker(job), media_type=BUNDLES_MEDIA_TYPE)

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "required on every request when the server has tokens "
                                          "(always off loopback)"}}
            schema["security"] = [{"bearer": []}] if cfg.tokens else []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    wrapped = GuardMiddleware(app, cfg.tokens, max_body=cfg.max_upload_bytes, max_json=int(cfg.max_json_mb * 2**20))
    wrapped.state = state  # type: ignore[attr-defined]
    wrapped.fastapi = app  # type: ignore[attr-defined]
    return wrapped


def _free_gpu_cache() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


async def _sweep(state: AppState) -> None:
    """Expire idle sessions in the background too (not only when a request arrives)."""
    period = max(1.0, min(60.0, state.cfg.session_ttl_s / 4))
    while True:
        await asyncio.sleep(period)
        state.store.expire()


# ======================================================================================
# command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lesionlocator serve``."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other needs --token/--token-file)")
    parser.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)")
    parser.add_argument("-m", "--model", "--checkpoint", dest="checkpoint", metavar="CHECKPOINT",
                        help="LesionLocatorModel.zip, its extracted folder, LesionLocatorCheckpoint or one model "
                             "folder (default: the bundled demo model, if installed)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default)")
    parser.add_argument("--folds", default="0", help="folds to ensemble: 'all' or e.g. '0' or '0,1,2' (default 0)")
    parser.add_argument("--tta", action="store_true", help="mirror test-time augmentation (8x slower)")
    tok = parser.add_mutually_exclusive_group()
    tok.add_argument("--token", help="bearer token clients must send (prefer --token-file: argv is visible to others)")
    tok.add_argument("--token-file", help="file with one token per line (one per client identity)")
    parser.add_argument("--max-sessions", type=int, default=16, help="sessions alive at once (default 16)")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0,
                        help="compressed upload cap in MiB (default 1024)")
    parser.add_argument("--max-cache-mb", type=float, default=8192.0,
                        help="memory for cached images of all sessions in MiB (default 8192)")
    parser.add_argument("--session-ttl", type=float, default=3600.0, help="idle seconds before a session expires")
    parser.add_argument("--tls-cert", help="PEM certificate: serve HTTPS (tokens otherwise travel in clear text)")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up inference at start")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _parse_folds(text: str) -> Any:
    if text == "all":
        return "all"
    try:
        return tuple(int(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise ServerConfigError(f"--folds must be 'all' or comma-separated integers, got {text!r}") from None


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    tokens: tuple[str, ...] = ()
    if getattr(args, "token", None):
        tokens = (args.token,)
    elif getattr(args, "token_file", None):
        tokens = read_token_file(args.token_file)
    checkpoint = args.checkpoint
    if not checkpoint:
        try:
            from ..model.bundled import default_checkpoint

            checkpoint = str(default_checkpoint())
        except (ImportError, OSError, ValueError) as exc:
            raise ServerConfigError(f"no checkpoint given (-m CHECKPOINT) and no bundled model: {exc}") from None
        log.warning("no -m given: serving the bundled DEMO model %s; for clinical-quality results pass the "
                    "published LesionLocatorModel.zip with -m", checkpoint)
    return ServerConfig(
        checkpoint=checkpoint, device=args.device, folds=_parse_folds(args.folds), tta=args.tta,
        host=args.host, port=args.port, tokens=tokens, max_sessions=args.max_sessions,
        max_upload_mb=args.max_upload_mb, max_cache_mb=args.max_cache_mb, session_ttl_s=args.session_ttl,
        warmup=not args.no_warmup, tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None),
    )


def run(args: argparse.Namespace) -> int:
    """``lesionlocator serve``: returns a process exit code."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = config_from_args(args)
        app = create_app(cfg)
        # load and warm up on the model thread before the port opens: a bad checkpoint or device is a
        # clean message here, and the first client never waits for a model.
        state = app.state
        t0 = time.perf_counter()
        state.worker.submit_sync(state.service.load)
        if cfg.warmup:
            state.worker.submit_sync(state.service.warmup)
        log.info("models loaded and warmed up in %.1f s", time.perf_counter() - t0)
    except (ServerConfigError, ValueError, OSError) as exc:  # CheckpointError / DeviceError / missing files
        print(f"lesionlocator serve: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(cfg.host) and not cfg.tls_cert:
        log.warning("serving plain HTTP on %s: the bearer token and the images travel unencrypted; use "
                    "--tls-cert/--tls-key, a TLS reverse proxy or an SSH tunnel on untrusted networks", cfg.host)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=args.log_level,
                                           access_log=args.log_level == "debug", lifespan="on",
                                           ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key))
    server.run()
    # uvicorn exits without raising when start-up fails (e.g. the checkpoint does not load).
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m LesionLocatorLib.serve.server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
