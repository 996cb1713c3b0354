"""The FastAPI application of ``lesionlocator serve``: each endpoint forwards to the library in a few lines.

Endpoints (all under /v1; OpenAPI at /openapi.json and /docs; every one needs the token when the server has
tokens):
  GET  health | version                     liveness; version, protocol, the model's settings, limits
  POST sessions -> {session_id}             GET / DELETE sessions/{id}
  POST sessions/{id}/image/reuse {hash}     select an image the server holds (404 image_not_cached)
  PUT  sessions/{id}/image  <volume>        upload a scan (wire "volume" container, streamed)
  POST sessions/{id}/segment                {prompts, image, folds, tta, probabilities} as JSON, or a wire
                                            "request" container when mask prompts travel -> "masks" container
  POST sessions/{id}/track                  {baseline, followups, prompts, from_baseline, propagation, refine,
                                            folds, tta} -> "masks" container: baseline, then each follow-up
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Set, Tuple, Type, TypeVar

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .auth import Authenticate, BodyLimit
from .config import ServerConfig, check_config
from .errors import ApiError, error_for
from .schemas import ReuseRequest, SegmentRequest, TrackRequest
from .service import ModelService, ModelWorker, available_devices
from .sessions import Session, SessionNotFound, SessionStore
from .wire import (MEDIA_TYPE, PROTOCOL_VERSION, StreamDecoder, WireError, decode, encode_results, parse_json,
                   request_of, volume_of)

log = logging.getLogger("lesionlocator.server")

API = "/v1"
M = TypeVar("M", bound=BaseModel)


@dataclass
class AppState:
    cfg: ServerConfig
    store: SessionStore
    worker: ModelWorker
    service: ModelService
    decode_pool: ThreadPoolExecutor
    started: float = field(default_factory=time.time)
    ready: bool = False


def _container_reply(data: bytes) -> Response:
    return Response(data, media_type=MEDIA_TYPE)


def _body_doc(schema: Type[BaseModel]) -> dict:
    """OpenAPI for a body read by hand (after authentication): JSON, or the wire container."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": schema.model_json_schema()},
        MEDIA_TYPE: {"schema": {"type": "string", "format": "binary",
                                "description": f"wire 'request' container: header.request = {schema.__name__}, "
                                               "arrays = mask-prompt crops"}}}}}


BINARY_REPLY = {200: {"content": {MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
                      "description": "wire 'masks' container (serve.wire.decode_results)"}}


def create_app(cfg: ServerConfig, service: Optional[ModelService] = None) -> FastAPI:
    """The application; the model loads (on the worker thread) during start-up unless already loaded."""
    check_config(cfg)
    state = AppState(cfg=cfg,
                     store=SessionStore(max_sessions=cfg.max_sessions, idle_timeout_s=cfg.session_ttl_s,
                                        max_bytes=cfg.max_cache_bytes,
                                        max_sessions_per_owner=cfg.max_sessions_per_client,
                                        max_bytes_per_owner=cfg.max_cache_bytes_per_client),
                     worker=ModelWorker(max_queue=cfg.max_queue, max_per_owner=cfg.max_queue_per_client),
                     service=service or ModelService(cfg),
                     decode_pool=ThreadPoolExecutor(max_workers=2, thread_name_prefix="lesionlocator-decode"))

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        t0 = time.perf_counter()
        if state.service.model is None:
            await state.worker.run(state.service.load)
        if cfg.warmup and not state.service.warmed:
            await state.worker.run(state.service.warmup)
        state.ready = True
        log.info("model ready in %.1f s: %s", time.perf_counter() - t0, state.service.model.settings())
        sweeper = asyncio.create_task(_sweep(state))
        try:
            yield
        finally:
            sweeper.cancel()
            state.worker.shutdown(timeout_s=cfg.shutdown_timeout_s)
            state.decode_pool.shutdown(wait=False, cancel_futures=True)

    authenticate = Authenticate(cfg.tokens)
    app = FastAPI(title="LesionLocator server", version=__version__, lifespan=lifespan,
                  openapi_url=None, docs_url=None, redoc_url=None,  # served below, behind the token
                  description="Promptable 3D lesion segmentation and longitudinal tracking for "
                              f"serve.client.RemoteBackend. Protocol {PROTOCOL_VERSION}; binary bodies are the "
                              f"wire container {MEDIA_TYPE} (LesionLocatorLib/serve/wire.py).")
    app.state.ll = state
    app.add_middleware(BodyLimit, max_upload=cfg.max_upload_bytes, max_request=cfg.max_request_bytes)
    router = APIRouter(dependencies=[Depends(authenticate)])

    # -- error bodies: always {"error", "message"} ------------------------------------------
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        body = {"error": exc.code, "message": exc.message}
        if exc.detail is not None:
            body["detail"] = exc.detail
        return JSONResponse(body, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(WireError)  # e.g. the body guard tripping while a handler reads the body
    async def _wire_error(request: Request, exc: WireError) -> JSONResponse:
        return await _api_error(request, error_for(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": "http_error", "message": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return JSONResponse({"error": "internal_error", "message": f"{type(exc).__name__}: {exc}"}, status_code=500)

    # -- helpers ------------------------------------------------------------------------------
    def session_of(owner: str, session_id: str) -> Session:
        try:
            return state.store.get(session_id, owner)
        except SessionNotFound as exc:
            raise error_for(exc) from None

    async def on_worker(request: Request, owner: str, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await state.worker.run(fn, *args, owner=owner, deadline=time.monotonic() + cfg.request_deadline_s,
                                          disconnected=request.is_disconnected)
        except ApiError:
            raise
        except Exception as exc:  # noqa: BLE001 - a crashed request must not take the server down
            err = error_for(exc)
            if err.status >= 500:
                log.exception("request failed on the model worker")
                _free_gpu_cache()
            raise err from None

    async def read_body(request: Request, schema: Type[M]) -> Tuple[M, List[np.ndarray]]:
        """A JSON body, or a wire request container (JSON header + mask-prompt crops), validated."""
        raw = await request.body()  # bounded by BodyLimit
        arrays: List[np.ndarray] = []
        if request.headers.get("content-type", "").split(";")[0].strip() == MEDIA_TYPE:
            loop = asyncio.get_running_loop()
            try:
                c = await loop.run_in_executor(state.decode_pool, lambda: decode(
                    raw, max_raw_bytes=int(cfg.max_request_raw_mb * 2**20), kinds=("request",)))
                data, arrays = request_of(c)
            except WireError as exc:
                raise error_for(exc) from None
        else:
            try:
                data = parse_json(raw, "request body")
            except WireError as exc:
                raise ApiError(422, "invalid_request", str(exc)) from None
        try:
            return schema.model_validate(data), arrays
        except ValidationError as exc:
            errs = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
            first = errs[0] if errs else {"loc": [], "msg": "invalid request"}
            raise ApiError(422, "invalid_request", f"{'.'.join(first['loc'])}: {first['msg']}", errs[:20]) from None

    def image_of(s: Session, image_hash: Optional[str]) -> Tuple[str, Any]:
        try:
            return state.store.image(s, image_hash)
        except Exception as exc:  # noqa: BLE001 - ImageNotFound -> 409
            raise error_for(exc) from None

    upload_slots = asyncio.Semaphore(cfg.upload_slots)
    uploading: Set[str] = set()  # owners with an upload in progress (one each)

    # -- endpoints ------------------------------------------------------------------------------
    @router.get(f"{API}/health", summary="Liveness and readiness")
    async def health() -> dict:
        return {"status": "ok" if state.ready else "starting", "queue": state.worker.pending,
                "sessions": len(state.store), "abandoned": state.worker.abandoned, "refused": state.store.refused}

    @router.get(f"{API}/version", summary="Version, protocol, the model's settings and the limits")
    async def version() -> dict:
        return {"server": "lesionlocator", "version": __version__, "protocol": PROTOCOL_VERSION,
                **state.service.describe(), "devices": available_devices(),
                "max_upload_bytes": cfg.max_upload_bytes, "max_request_bytes": cfg.max_request_bytes,
                "max_cache_bytes": cfg.max_cache_bytes, "session_ttl_s": cfg.session_ttl_s,
                "limits": {"max_sessions": state.store.max_sessions,
                           "max_sessions_per_client": state.store.max_sessions_per_owner,
                           "max_cache_bytes_per_client": state.store.max_bytes_per_owner,
                           "max_queue": cfg.max_queue, "max_queue_per_client": cfg.max_queue_per_client,
                           "max_work": cfg.max_work, "max_mask_voxels": cfg.max_mask_voxels,
                           "request_deadline_s": cfg.request_deadline_s, "upload_slots": cfg.upload_slots,
                           "upload_min_rate_kbps": cfg.upload_min_rate_kbps},
                "auth": bool(cfg.tokens), "media_type": MEDIA_TYPE}

    @router.post(f"{API}/sessions", status_code=201, summary="Create a session (bound to your credentials)")
    async def create_session(owner: str = Depends(authenticate.owner)) -> dict:
        try:
            sid = state.store.create(owner).id
        except Exception as exc:  # noqa: BLE001 - ServerFull -> 503 + Retry-After
            raise error_for(exc) from None
        return {"session_id": sid, "idle_timeout_s": cfg.session_ttl_s}

    @router.get(f"{API}/sessions/{{session_id}}", summary="Session state")
    async def get_session(session_id: str, owner: str = Depends(authenticate.owner)) -> dict:
        return session_of(owner, session_id).info()

    @router.delete(f"{API}/sessions/{{session_id}}", summary="Delete a session and its images")
    async def delete_session(session_id: str, owner: str = Depends(authenticate.owner)) -> dict:
        try:
            state.store.delete(session_id, owner)
        except SessionNotFound as exc:
            raise error_for(exc) from None
        # the model-side state of its images (grids, crops) goes now, not with the next model job
        state.worker.post(lambda: state.service.prune(state.store.live_keys()))
        return {"deleted": session_id}

    @router.put(f"{API}/sessions/{{session_id}}/image", summary="Upload a scan (wire volume container, streamed)",
                openapi_extra={"requestBody": {"required": True, "content": {
                    MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}}}})
    async def upload_image(request: Request, session_id: str, owner: str = Depends(authenticate.owner)) -> dict:
        s = session_of(owner, session_id)
        if owner in uploading:  # one upload per client: a trickling client cannot take every slot
            raise ApiError(429, "upload_in_progress", "you already have an upload in progress; wait for it",
                           headers={"Retry-After": "5"})
        uploading.add(owner)
        evicted_before = state.store.evicted
        try:
            try:  # a slot, or 503 soon: never an unbounded wait behind slow uploads
                await asyncio.wait_for(upload_slots.acquire(), timeout=cfg.upload_slot_timeout_s)
            except asyncio.TimeoutError:
                raise ApiError(503, "uploads_busy", f"every upload slot ({cfg.upload_slots}) stayed busy for "
                               f"{cfg.upload_slot_timeout_s:.0f} s; retry later", headers={"Retry-After": "10"}) from None
            try:
                t0 = time.perf_counter()
                dec = _ReservingDecoder(max_stream_bytes=cfg.max_upload_bytes, max_raw_bytes=cfg.max_cache_bytes,
                                        kinds=("volume",))
                dec.reserve = lambda n: state.store.reserve(s, n)
                try:
                    volume, digest = await _decode_stream(request, dec, state)
                    state.store.add_image(s, digest, volume, reservation=dec.reservation)
                    dec.reservation = None
                except Exception as exc:  # noqa: BLE001 - WireError / CacheFull / ServerFull / SessionNotFound
                    raise error_for(exc) from None
                finally:
                    state.store.release(dec.reservation)
                    dec.release()  # its buffer goes now (no reference cycle keeps a raw image alive)
            finally:
                upload_slots.release()
        finally:
            uploading.discard(owner)
        s.uploads += 1
        if state.store.evicted != evicted_before:  # this client's own older data made room: drop its model state
            state.worker.post(lambda: state.service.prune(state.store.live_keys()))
        return {"image": digest, "shape": list(volume.shape), "dtype": str(volume.array.dtype), "uploaded": True,
                "received_bytes": dec.received_bytes, "decode_ms": round((time.perf_counter() - t0) * 1000, 2)}

    @router.post(f"{API}/sessions/{{session_id}}/image/reuse",
                 summary="Select a scan already on the server by its content hash (skips the upload)",
                 openapi_extra=_body_doc(ReuseRequest))
    async def reuse_image(request: Request, session_id: str, owner: str = Depends(authenticate.owner)) -> dict:
        s = session_of(owner, session_id)
        body, _ = await read_body(request, ReuseRequest)
        vol = s.images.get(body.hash) or state.store.find_image(owner, body.hash)
        if vol is None:
            raise ApiError(404, "image_not_cached", "the server does not hold this image; upload it")
        try:
            state.store.add_image(s, body.hash, vol)
        except Exception as exc:  # noqa: BLE001
            raise error_for(exc) from None
        s.reuses += 1
        return {"image": body.hash, "shape": list(vol.shape), "dtype": str(vol.array.dtype), "uploaded": False}

    @router.post(f"{API}/sessions/{{session_id}}/segment", summary="Segment lesions from prompts",
                 response_class=Response, responses=BINARY_REPLY, openapi_extra=_body_doc(SegmentRequest))
    async def segment(request: Request, session_id: str, owner: str = Depends(authenticate.owner)) -> Response:
        s = session_of(owner, session_id)
        body, arrays = await read_body(request, SegmentRequest)
        image_hash, volume = image_of(s, body.image)
        t0 = time.perf_counter()

        def job() -> bytes:
            state.service.prune(state.store.live_keys() | {(s.id, image_hash)})
            res = state.service.segment((s.id, image_hash), volume, body.prompts, arrays, body.folds, body.tta,
                                        body.grow, body.probabilities, check=state.worker.check_current)
            s.requests += 1
            return encode_results([(image_hash, volume.shape, res.lesions.values())],
                                  {"elapsed_ms": round((time.perf_counter() - t0) * 1000, 3)})

        return _container_reply(await on_worker(request, owner, job))

    @router.post(f"{API}/sessions/{{session_id}}/track",
                 summary="Track lesions from the baseline into follow-ups (baseline, then one result each)",
                 response_class=Response, responses=BINARY_REPLY, openapi_extra=_body_doc(TrackRequest))
    async def track(request: Request, session_id: str, owner: str = Depends(authenticate.owner)) -> Response:
        s = session_of(owner, session_id)
        body, arrays = await read_body(request, TrackRequest)
        images = [image_of(s, h) for h in [body.baseline, *body.followups]]
        t0 = time.perf_counter()
        s.cancel.clear()  # here, not when the job starts: a cancel sent while it waits in the queue counts

        def check() -> None:
            state.worker.check_current()
            if s.cancel.is_set():
                raise ApiError(409, "cancelled", "the client cancelled the tracking request")

        def report(fraction: float, message: str) -> None:
            s.progress = (float(fraction), str(message))

        def job() -> bytes:
            state.service.prune(state.store.live_keys())
            s.progress = (0.0, "started")
            try:
                res = state.service.track(images[0][1], [v for _, v in images[1:]], body.prompts, arrays,
                                          body.from_baseline, body.propagation, body.refine, body.folds, body.tta,
                                          body.grow, check=check, progress=report)
            finally:
                s.progress = None
            s.requests += 1
            return encode_results([(h, v.shape, r.lesions.values()) for (h, v), r in zip(images, res.timepoints)],
                                  {"elapsed_ms": round((time.perf_counter() - t0) * 1000, 3)})

        return _container_reply(await on_worker(request, owner, job))

    @router.get(f"{API}/sessions/{{session_id}}/progress", summary="Progress of the session's running tracking job")
    async def progress(session_id: str, owner: str = Depends(authenticate.owner)) -> dict:
        s = session_of(owner, session_id)
        p = s.progress
        return {"running": p is not None, "fraction": None if p is None else p[0],
                "message": None if p is None else p[1]}

    @router.post(f"{API}/sessions/{{session_id}}/cancel",
                 summary="Stop the session's tracking job before its next tile (it answers 409 cancelled)")
    async def cancel(session_id: str, owner: str = Depends(authenticate.owner)) -> dict:
        s = session_of(owner, session_id)
        s.cancel.set()
        return {"cancelled": True, "running": s.progress is not None}

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(_openapi(app, cfg))

    @router.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        from fastapi.openapi.docs import get_swagger_ui_html

        return get_swagger_ui_html(openapi_url="/openapi.json", title=app.title)

    app.include_router(router)
    return app


class _ReservingDecoder(StreamDecoder):
    """A StreamDecoder that reserves the declared size from the session store's budgets *before* allocating it,
    so that a decompression bomb or uploads in flight cannot overrun the cache (a refused reservation is a 503 /
    413 before any voxel exists)."""

    reserve: Optional[Callable[[int], str]] = None
    reservation: Optional[str] = None

    def _start(self, h: Any) -> None:
        if isinstance(h, dict) and self.reserve is not None and self.reservation is None:
            n = h.get("raw_nbytes")
            if isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= self.max_raw_bytes:
                self.reservation = self.reserve(n)
        super()._start(h)

    def release(self) -> None:
        self._out, self._buf, self._dctx = None, bytearray(), None


async def _decode_stream(request: Request, dec: StreamDecoder, state: AppState) -> Tuple[Any, str]:
    """Decode an upload in a side thread while the next bytes arrive (decompression overlaps the transfer).

    Bounded in time: no data for ``upload_idle_timeout_s``, an average rate under ``upload_min_rate_kbps``
    after the first ``upload_rate_grace_s``, or more than ``upload_deadline_s`` in all is a 408 (the slot and memory are freed)."""
    cfg = state.cfg
    loop = asyncio.get_running_loop()
    buf = bytearray()
    receive = request.receive  # plain receive(): no async-generator frames kept alive by a timeout's traceback
    t0 = time.monotonic()
    received = 0
    while True:
        remaining = cfg.upload_deadline_s - (time.monotonic() - t0)
        timeout = min(cfg.upload_idle_timeout_s, max(0.0, remaining))
        try:
            msg = await asyncio.wait_for(receive(), timeout=timeout)
        except asyncio.TimeoutError:
            msg = None
        if msg is None:  # the wait ended at the idle timeout or at the overall deadline, whichever came first
            if time.monotonic() - t0 >= cfg.upload_deadline_s:
                raise ApiError(408, "upload_too_slow", f"the upload took longer than {cfg.upload_deadline_s:.0f} s; "
                                                       "it was dropped")
            raise ApiError(408, "upload_stalled", f"no upload data for {cfg.upload_idle_timeout_s:.0f} s; the "
                                                  "upload was dropped")
        if msg["type"] == "http.disconnect":
            log.info("upload aborted by the client after %d bytes", received)  # one line, no traceback
            raise ApiError(400, "upload_aborted", "the client closed the connection during the upload")
        chunk = msg.get("body", b"")
        received += len(chunk)
        elapsed = time.monotonic() - t0
        if elapsed > cfg.upload_rate_grace_s and received / elapsed < cfg.upload_min_rate_kbps * 1024:
            raise ApiError(408, "upload_too_slow", f"the upload averaged {received / elapsed / 1024:.1f} KiB/s, under "
                                                   f"the minimum of {cfg.upload_min_rate_kbps:.0f} KiB/s; dropped")
        buf += chunk
        if len(buf) >= 1 << 20:
            data, buf = bytes(buf), bytearray()
            await loop.run_in_executor(state.decode_pool, dec.feed, data)
        if not msg.get("more_body", False):
            break
    if buf:
        await loop.run_in_executor(state.decode_pool, dec.feed, bytes(buf))
    container = await loop.run_in_executor(state.decode_pool, dec.finish)
    return volume_of(container)


def _openapi(app: FastAPI, cfg: ServerConfig) -> dict:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema.setdefault("components", {})["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer",
                       "description": "required on every request when the server has tokens (always off loopback)"}}
        schema["security"] = [{"bearer": []}] if cfg.tokens else []
        app.openapi_schema = schema
    return app.openapi_schema


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
        # the model-side state (prepared images) of expired / evicted sessions goes now, not with the next job
        state.worker.post(lambda: state.service.prune(state.store.live_keys()))


def header_timeout_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for each request's headers: uvicorn times out idle keep-alive
    connections but not a request line / headers that trickle in (slowloris), which would otherwise hold one of
    the ``limit_concurrency`` connections forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutH11(H11Protocol):
        _header_timer: Optional[asyncio.TimerHandle] = None

        def _arm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_due)

        def _headers_due(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # headers still incomplete
                log.info("closed a connection whose request headers took longer than %.0f s", timeout_s)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request on this keep-alive connection gets its own deadline

        def connection_lost(self, exc: Optional[Exception]) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

    return HeaderTimeoutH11


def serve(cfg: ServerConfig, log_level: str = "info") -> int:
    """Load and warm up the model, then serve until stopped; returns a process exit code.

    The model loads on its worker thread *before* the port opens: a bad checkpoint or device is a clean
    message here, and the first client never waits for a model."""
    import sys

    import uvicorn

    from .config import ServerConfigError, is_loopback

    try:
        app = create_app(cfg)
        state: AppState = app.state.ll
        t0 = time.perf_counter()
        state.worker.submit_sync(state.service.load)
        if cfg.warmup:
            state.worker.submit_sync(state.service.warmup)
        log.info("model loaded and warmed up in %.1f s", time.perf_counter() - t0)
    except (ServerConfigError, ValueError, OSError) as exc:
        print(f"lesionlocator serve: {exc}", file=sys.stderr)
        return 2
    if not is_loopback(cfg.host) and not cfg.tls_cert:
        log.warning("serving plain HTTP on %s: the bearer token and the images travel unencrypted; use "
                    "--tls-cert/--tls-key, a TLS reverse proxy or an SSH tunnel on untrusted networks", cfg.host)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level,
                                           http=header_timeout_protocol(cfg.header_timeout_s),
                                           access_log=log_level == "debug", lifespan="on",
                                           ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key,
                                           # bounded: open connections (503 beyond), idle keep-alive, and the
                                           # time SIGTERM waits for requests in flight
                                           limit_concurrency=cfg.limit_concurrency, timeout_keep_alive=5,
                                           timeout_graceful_shutdown=cfg.shutdown_timeout_s))
    server.run()
    return 0 if server.started else 1  # uvicorn returns without raising when start-up fails
