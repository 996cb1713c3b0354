"""RemoteBackend: the local backend's objects, executed by a LesionLocator server (``lesionlocator serve``).

    backend = RemoteBackend("http://gpu-box:8765", token=None, folds=None, tta=False, grow=True)
    session = backend.session()                      # RemoteSession: SegmentSession's set_image / segment
    session.set_image(volume)                        # uploaded once per content hash (skipped if held)
    result = session.segment(points={1: (z, y, x)})  # SegmentationResult, lesion ids unchanged
    tracker = backend.tracker()                      # RemoteTracker: LesionTracker's set_images / track / close
    tracker.set_images(baseline, [followup])
    tracked = tracker.track(masks=label_map)         # TrackingResult
    backend.close()                                  # deletes this client's server sessions

Prompts are resolved exactly as in-process (``core.prompts.resolve_prompts``), written with
``core.prompts.prompts_to_json`` and parsed on the server by ``core.prompts.parse_prompts``; mask prompts travel
as crops inside the wire container. Every request carries ``folds`` and ``tta``, so equal settings give equal
masks (``grow`` too). Every failure talking to the server is a :class:`ServerError`.
"""
from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.geometry import Volume
from ..core.jobs import Cancelled, check_cancel
from ..core.results import SegmentationResult, TrackingResult
from .wire import (MEDIA_TYPE, PROTOCOL_VERSION, WireError, content_hash, decode_results, encode_request,
                   iter_encode_volume)

API = "/v1"
PROGRESS_POLL_S = 0.3  # how often a long request in flight asks the server for its progress
CLIENT_KEY_HEADER = "X-LesionLocator-Client"
Progress = Callable[[float, str], None]


class ServerError(IOError):
    """Base class of every client-side failure talking to a LesionLocator server."""

    def __init__(self, message: str, status: Optional[int] = None, code: Optional[str] = None,
                 url: Optional[str] = None):
        super().__init__(message)
        self.message, self.status, self.code, self.url = message, status, code, url
        self.retry_after: Optional[float] = None  # seconds, from a 429 / 503 answer's Retry-After

    def __str__(self) -> str:
        return self.message


class ServerUnreachable(ServerError):
    """No connection (server not running, wrong address, or it died during the request)."""


class AuthenticationError(ServerError):
    """The server refused the token (HTTP 401)."""


class ProtocolMismatch(ServerError):
    """The server speaks another protocol version, is not a LesionLocator server, or sent an unreadable reply."""


class ServerTimeout(ServerError):
    """The server did not answer in time."""


class RequestRejected(ServerError, ValueError):
    """The server rejected the request as invalid (HTTP 4xx other than 401); the message says why."""


class SessionLost(RequestRejected):
    """The server no longer knows this client's session (expired, evicted, or the server restarted)."""


class ServerInternalError(ServerError):
    """The server failed while executing the request (HTTP 5xx); it keeps serving."""


def _error_from_response(resp: Any, url: str) -> ServerError:
    try:
        body = resp.json()
        code, message = str(body.get("error", "")), str(body.get("message", ""))
    except (ValueError, AttributeError):
        body = None
    if body is None or not message:
        kind = resp.headers.get("content-type", "?").split(";")[0]
        code, message = "", f"{resp.reason or 'error'} (a {kind} answer, not from a LesionLocator server?)"
    status = resp.status_code
    text = f"server {url} answered {status}: {message}"
    err = _error_class(status, code, text, url)
    try:  # 429 / 503 (quotas, a full server, a busy queue) say when to retry
        err.retry_after = float(resp.headers.get("Retry-After", "")) if resp.headers.get("Retry-After") else None
    except (TypeError, ValueError, AttributeError):
        err.retry_after = None
    return err


def _error_class(status: int, code: str, text: str, url: str) -> ServerError:
    if status == 401:
        return AuthenticationError(f"{text} (check the token given to the backend)", status, code, url)
    if status == 404 and code == "unknown_session":
        return SessionLost(text, status, code, url)
    if 400 <= status < 500:
        return RequestRejected(text, status, code, url)
    return ServerInternalError(text, status, code, url)


class _UploadTooLarge(Exception):
    """Internal: the upload stream passed the server's advertised limit."""


def _folds_json(folds: Any) -> Any:
    """The engine's ``folds`` values (None, 'all', 3, '0,1', [0, 1]) as JSON (None, 'all' or a list)."""
    if folds is None or folds == "all":
        return folds
    if isinstance(folds, str):
        try:
            return [int(f) for f in folds.split(",") if f.strip()]
        except ValueError:
            raise ValueError(f"folds must be 'all', an integer or integers, got {folds!r}") from None
    if isinstance(folds, (int, np.integer)) and not isinstance(folds, bool):
        return [int(folds)]
    return [int(f) for f in folds]


class RemoteBackend:
    """A LesionLocator server as a backend: the twin of ``backend.LocalBackend``."""

    remote = True

    def __init__(self, url: str, token: Optional[str] = None, folds: Any = None, tta: bool = False,
                 grow: bool = True, timeout: Union[float, Tuple[float, float]] = (5.0, 600.0),
                 check_version: bool = True,
                 upload_threads: Optional[int] = None, compression_level: int = 1,
                 verify: Union[bool, str] = True) -> None:
        import requests

        if not str(url).strip():
            raise ValueError("the server URL is empty")
        self.url = str(url).rstrip("/")
        self.folds = _folds_json(folds)
        self.tta = bool(tta)
        self.grow = bool(grow)
        self.timeout = timeout
        self._http = requests.Session()  # keep-alive: one TCP connection for all clicks
        self._http.headers[CLIENT_KEY_HEADER] = secrets.token_hex(16)
        if token:
            self._http.headers["Authorization"] = f"Bearer {token}"
        self._http.trust_env = False  # never route loopback traffic through an HTTP proxy from the environment
        self._http.verify = verify  # https: True, or a CA bundle path for a self-signed server certificate
        self._lock = threading.Lock()  # one request at a time on the shared connection
        self._side: Optional[Any] = None  # a second connection for progress / cancel while a request runs
        self._side_lock = threading.Lock()
        self.upload_threads = upload_threads or max(1, min(4, (_cpu_count() or 2) - 1))
        self.compression_level = compression_level
        self.capabilities: Optional[Dict[str, Any]] = None
        self.last_request_bytes = 0
        self.last_response_bytes = 0
        self.last_server_ms: Optional[float] = None  # the model job's time as the server measured it
        self.last_upload: Optional[Dict[str, float]] = None  # bytes sent, seconds, MB/s of the last upload
        self.uploads = 0
        self._open: List["_ServerSession"] = []
        if check_version:
            self.check_server()

    # -- the backend contract ---------------------------------------------------------------
    def session(self) -> "RemoteSession":
        """A new per-image segmentation session (the twin of ``SegmentSession``)."""
        return self._track_open(RemoteSession(self))

    def tracker(self, propagation: Optional[str] = None, refine: Optional[str] = None) -> "RemoteTracker":
        """A new tracker (the twin of ``LesionTracker``); None: the server's default method."""
        return self._track_open(RemoteTracker(self, propagation, refine))

    def describe(self) -> Dict[str, Any]:
        """The server model's settings as ``LocalBackend.describe`` gives them, with the folds and TTA this
        backend's requests run (equal settings on both backends describe alike); the server's own defaults
        under ``server_defaults``."""
        info = self.capabilities or self.check_server()
        settings = dict(info.get("settings") or {})
        server_defaults = {k: settings.get(k) for k in ("default_folds", "tta", "grow")}
        settings.update(backend="remote", url=self.url, server_version=info.get("version"),
                        default_folds=self.folds if self.folds is not None else server_defaults["default_folds"],
                        tta=self.tta, grow=self.grow, server_defaults=server_defaults, tracking=info.get("tracking"))
        return settings

    def close(self) -> None:
        """Delete this client's server sessions (best effort) and close the connection."""
        for s in list(self._open):
            s.close()
        self._http.close()
        if self._side is not None:
            self._side.close()

    def __enter__(self) -> "RemoteBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _track_open(self, s: Any) -> Any:
        self._open.append(s)
        return s

    # -- plumbing ---------------------------------------------------------------------------
    def settings_json(self) -> Dict[str, Any]:
        return {"folds": self.folds, "tta": self.tta, "grow": self.grow}

    def request(self, method: str, path: str, *, expect: str = "json", side: bool = False, **kw: Any) -> Any:
        """One request on the shared connection, or (``side``) on a second one that a long request in flight
        does not block (progress polls, cancel)."""
        import requests

        url = f"{self.url}{path}"
        kw.setdefault("timeout", self.timeout)
        if side and self._side is None:
            self._side = requests.Session()
            self._side.headers.update(self._http.headers)  # the same token and client key
            self._side.trust_env, self._side.verify = False, self._http.verify
        http, lock = (self._side, self._side_lock) if side else (self._http, self._lock)
        try:
            with lock:
                resp = http.request(method, url, **kw)
        except requests.exceptions.Timeout as exc:
            raise ServerTimeout(f"no answer from {url} within {self.timeout} s ({type(exc).__name__}); "
                                "the server may be busy with a long request", url=url) from None
        except requests.exceptions.ConnectionError as exc:
            raise ServerUnreachable(
                f"cannot reach the LesionLocator server at {self.url} ({_short(exc)}); is it running? "
                "start it with 'lesionlocator serve -m CHECKPOINT' or check the URL", url=url) from None
        except requests.exceptions.RequestException as exc:
            raise ServerError(f"request to {url} failed: {_short(exc)}", url=url) from None
        req = resp.request
        body = req.body if isinstance(req.body, (bytes, bytearray)) else (
            req.body.encode() if isinstance(req.body, str) else b"")
        if not side:
            self.last_request_bytes = _head_bytes(req) + len(body)
            self.last_response_bytes = len(resp.content) + sum(len(k) + len(v) + 4 for k, v in resp.headers.items())
        if resp.status_code >= 400:
            raise _error_from_response(resp, self.url)
        if expect == "json":
            try:
                return resp.json()
            except ValueError:
                raise ProtocolMismatch(f"server {self.url} did not answer JSON on {path}: is it a LesionLocator "
                                       "server?", url=url) from None
        if resp.headers.get("content-type", "").split(";")[0] != MEDIA_TYPE:
            raise ProtocolMismatch(f"server {self.url} answered {resp.headers.get('content-type')} on {path}",
                                   url=url)
        return resp.content

    def check_server(self) -> Dict[str, Any]:
        """Ask the server for its version, settings and limits; refuse a mismatched protocol."""
        info = self.request("GET", f"{API}/version")
        if not isinstance(info, dict) or info.get("server") != "lesionlocator":
            raise ProtocolMismatch(f"{self.url} is not a LesionLocator server", url=self.url)
        if info.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"server {self.url} speaks protocol {info.get('protocol')} (version {info.get('version')}), this "
                f"client speaks {PROTOCOL_VERSION}: update the older side", url=self.url)
        self.capabilities = info
        return info

    def new_session(self) -> str:
        return str(self.request("POST", f"{API}/sessions")["session_id"])

    def delete_session(self, sid: str) -> None:
        try:
            self.request("DELETE", f"{API}/sessions/{sid}", timeout=5)
        except ServerError:
            pass

    def select(self, sid: str, volume: Volume, digest: str) -> bool:
        """Make ``volume`` a current image of server session ``sid``; uploads it only when the server does not
        already hold it for this client. Returns whether it was uploaded."""
        try:
            self.request("POST", f"{API}/sessions/{sid}/image/reuse", json={"hash": digest})
            return False
        except RequestRejected as exc:
            if exc.code != "image_not_cached":
                raise
        caps = self.capabilities or {}
        raw_cap, upload_cap = caps.get("max_cache_bytes"), caps.get("max_upload_bytes")
        per_client = (caps.get("limits") or {}).get("max_cache_bytes_per_client")
        if isinstance(per_client, int) and (not isinstance(raw_cap, int) or per_client < raw_cap):
            raw_cap = per_client  # the server's budget for one client
        if isinstance(raw_cap, int) and volume.array.nbytes > raw_cap:
            raise RequestRejected(f"the image ({volume.array.nbytes / 2**20:.0f} MiB) is larger than the server's "
                                  f"image cache for one client ({raw_cap / 2**20:.0f} MiB): start it with a larger "
                                  f"--max-cache-mb / --max-cache-mb-per-client",
                                  code="image_too_large", url=self.url)
        stream = iter_encode_volume(volume, level=self.compression_level, volume_hash=digest,
                                    threads=self.upload_threads)
        sent = [0]

        def counted():  # noqa: ANN202 - generator: streamed with chunked transfer encoding
            for piece in stream:
                sent[0] += len(piece)
                if isinstance(upload_cap, int) and sent[0] > upload_cap:
                    # stop here: the server would refuse it, and a refused stream can end as a reset connection
                    raise _UploadTooLarge()
                yield piece

        t0 = time.perf_counter()
        try:
            info = self.request("PUT", f"{API}/sessions/{sid}/image", data=counted(),
                                headers={"Content-Type": MEDIA_TYPE})
        except _UploadTooLarge:
            raise RequestRejected(f"the compressed image exceeds the server's upload limit of "
                                  f"{float(upload_cap) / 2**20:.0f} MiB: start it with a larger --max-upload-mb",
                                  code="payload_too_large", url=self.url) from None
        seconds = time.perf_counter() - t0
        self.last_request_bytes = sent[0]
        self.last_upload = {"sent_bytes": sent[0], "raw_bytes": int(volume.array.nbytes), "seconds": seconds,
                            "raw_mb_per_s": volume.array.nbytes / 1e6 / max(seconds, 1e-9)}
        if info.get("image") != digest:
            raise ProtocolMismatch(f"server stored the image under hash {info.get('image')}, expected {digest}")
        self.uploads += 1
        return True

    def post(self, path: str, body: Dict[str, Any], arrays: Sequence[np.ndarray], max_reply_bytes: int) -> Any:
        """A JSON request, or the wire request container when mask-prompt crops travel with it. The reply may
        declare at most ``max_reply_bytes`` of masks (checked before anything is allocated)."""
        if arrays:
            data = self.request("POST", path, data=encode_request(body, arrays), headers={"Content-Type": MEDIA_TYPE},
                                expect="container")
        else:
            data = self.request("POST", path, json=body, expect="container")
        try:
            reply = decode_results(data, max_raw_bytes=max_reply_bytes)
        except WireError as exc:
            raise ProtocolMismatch(f"unreadable reply from {self.url}: {exc}", url=self.url) from None
        ms = reply.header.get("elapsed_ms")
        self.last_server_ms = float(ms) if isinstance(ms, (int, float)) else None
        return reply


class _ServerSession:
    """A server session holding this object's images; re-created (images re-uploaded) if the server lost it."""

    def __init__(self, backend: RemoteBackend):
        self.backend = backend
        self.session_id: Optional[str] = None
        self._held: Dict[str, Volume] = {}  # content hash -> image this object has set

    def _sid(self) -> str:
        if self.session_id is None:
            self.session_id = self.backend.new_session()
        return self.session_id

    def _put(self, volume: Volume) -> str:
        digest = content_hash(volume)
        self._call(lambda sid: self.backend.select(sid, volume, digest), reselect=False)
        self._held[digest] = volume
        return digest

    def _call(self, fn: Callable[[str], Any], reselect: bool = True) -> Any:
        """Run ``fn(session_id)``; if the server lost the session, re-create it (re-uploading the images) once."""
        try:
            return fn(self._sid())
        except SessionLost:
            self.session_id = None
            sid = self._sid()
            if reselect:
                for digest, vol in self._held.items():
                    self.backend.select(sid, vol, digest)
            return fn(sid)

    def _watched(self, fn: Callable[[str], Any], progress: Optional[Progress],
                 cancel: Optional[threading.Event]) -> Any:
        """``_call(fn)`` in a helper thread while this thread polls the server's progress of the session's job
        (every ``PROGRESS_POLL_S``) and passes a cancel on; the server then stops before its next tile and the
        request ends with 409 ``cancelled``. If ``progress`` raises (the caller stops), the server is told too."""
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures import TimeoutError as FutureTimeout

        asked = [False]

        def ask_cancel() -> None:
            if not asked[0] and self.session_id is not None:
                asked[0] = True
                try:
                    self.backend.request("POST", f"{API}/sessions/{self.session_id}/cancel", side=True, timeout=10)
                except ServerError:
                    pass  # the request itself reports what happened

        with ThreadPoolExecutor(1, thread_name_prefix="lesionlocator-request") as pool:
            fut = pool.submit(self._call, fn)
            try:
                while True:
                    try:
                        return fut.result(timeout=PROGRESS_POLL_S)
                    except FutureTimeout:
                        pass
                    if cancel is not None and cancel.is_set():
                        ask_cancel()
                    elif progress is not None and self.session_id is not None:
                        try:
                            p = self.backend.request("GET", f"{API}/sessions/{self.session_id}/progress",
                                                     side=True, timeout=10)
                        except ServerError:
                            continue  # best effort: the request itself reports real failures
                        if isinstance(p, dict) and p.get("running") and isinstance(p.get("fraction"), (int, float)):
                            progress(float(p["fraction"]), str(p.get("message") or ""))
            except BaseException:
                ask_cancel()  # the caller is leaving: the server stops too (the pool waits for the request)
                raise

    def close(self) -> None:
        """Delete the server session (best effort); the backend stays usable."""
        if self.session_id is not None:
            self.backend.delete_session(self.session_id)
            self.session_id = None
        self._held = {}
        if self in self.backend._open:
            self.backend._open.remove(self)


def _load(image: Union[Volume, str, os.PathLike]) -> Volume:
    # read and checked exactly as in-process (finite numeric voxels, a 3D image): the same error, at the same call
    from ..core.image_io import load_volume

    return load_volume(image)


def _resolve(image: Volume, prompts: Any, points: Any, boxes: Any, masks: Any, space: str) -> Dict[int, list]:
    # the same resolution and validation as in-process: a bad prompt fails here, with the same message
    from ..core.prompts import resolve_prompts

    return resolve_prompts(image, prompts, points, boxes, masks, space)


class RemoteSession(_ServerSession):
    """The twin of ``segment.session.SegmentSession`` on a server: same methods, arguments and results."""

    def __init__(self, backend: RemoteBackend):
        super().__init__(backend)
        self._image: Optional[Volume] = None
        self._hash: Optional[str] = None

    def set_image(self, image: Union[Volume, str, os.PathLike]) -> None:
        """Use ``image`` for the next prompts; it is uploaded only if the server does not hold it already."""
        vol = _load(image)
        self._hash = self._put(vol)
        self._image = vol
        self._held = {self._hash: vol}  # only the current image is re-sent if the server loses the session

    @property
    def image(self) -> Volume:
        if self._image is None:
            raise RuntimeError("call set_image() before segment()")
        return self._image

    @property
    def image_hash(self) -> Optional[str]:
        return self._hash

    def segment(self, prompts: Any = None, *, points: Any = None, boxes: Any = None, masks: Any = None,
                space: str = "voxel", return_probabilities: bool = False, progress: Optional[Progress] = None,
                cancel: Optional[threading.Event] = None) -> SegmentationResult:
        """Segment one lesion per id (see ``SegmentSession.segment``). One request per lesion, so progress and
        cancel behave as in-process: cancel is checked between lesions and raises ``Cancelled``."""
        from ..core.prompts import prompts_to_json

        img = self.image
        todo = _resolve(img, prompts, points, boxes, masks, space)
        result = SegmentationResult(img)
        n = len(todo)
        for i, (lid, items) in enumerate(todo.items()):
            check_cancel(cancel)
            if progress:
                progress(i / n, f"lesion {lid} ({i + 1}/{n})")
            arrays: List[np.ndarray] = []
            body = {"prompts": prompts_to_json({lid: items}, arrays), "image": self._hash,
                    "probabilities": bool(return_probabilities), **self.backend.settings_json()}
            reply = self._call(lambda sid, body=body, arrays=arrays: self.backend.post(
                f"{API}/sessions/{sid}/segment", body, arrays, _reply_limit([img])))
            if len(reply.results) != 1 or reply.images[0] != self._hash or set(reply.results[0]) != {lid}:
                raise ProtocolMismatch(f"server {self.backend.url} answered for other lesions or another image",
                                       url=self.backend.url)
            result.lesions.update(reply.results[0])
        if progress:
            progress(1.0, "done")
        return result


class RemoteTracker(_ServerSession):
    """The twin of ``track.tracker.LesionTracker`` on a server: same methods, arguments and results."""

    def __init__(self, backend: RemoteBackend, propagation: Optional[str] = None, refine: Optional[str] = None):
        from ..track.checks import PROPAGATIONS, REFINES, TrackingError

        super().__init__(backend)
        if propagation is not None and propagation not in PROPAGATIONS:
            raise TrackingError(f"propagation must be one of {PROPAGATIONS}, got {propagation!r}")
        if refine is not None and refine not in REFINES:
            raise TrackingError(f"refine must be one of {REFINES}, got {refine!r}")
        default = (backend.capabilities or {}).get("tracking") or {}
        # as the local tracker: None resolves to the default method (learned with a Track model, else classical)
        self.propagation = propagation or default.get("propagation")
        self.refine = refine or default.get("refine")
        self._asked = (propagation, refine)  # what travels: None lets the server resolve it the same way
        self._images: List[Volume] = []
        self._hashes: List[str] = []

    def set_images(self, baseline: Union[Volume, str, os.PathLike],
                   followups: Sequence[Union[Volume, str, os.PathLike]]) -> None:
        """The baseline and its follow-ups (Volumes or paths, all read first); each is uploaded once."""
        from ..track.checks import load_scans

        vols = load_scans(baseline, followups)  # the local tracker's own reading and checks
        self._held = {}
        self._hashes = [self._put(v) for v in vols]
        self._images = vols

    def track(self, prompts: Any = None, *, points: Any = None, boxes: Any = None, masks: Any = None,
              space: str = "voxel", from_baseline: bool = False, progress: Optional[Progress] = None,
              cancel: Optional[threading.Event] = None) -> TrackingResult:
        """Track lesions prompted on the baseline into every follow-up (see ``LesionTracker.track``). One request;
        with ``progress`` or ``cancel`` the server's progress is polled while it runs and a cancel stops it before
        its next tile, raising ``Cancelled`` as in-process."""
        from ..core.prompts import prompts_to_json

        if not self._images:
            raise RuntimeError("call set_images() before track()")
        base = self._images[0]
        todo = _resolve(base, prompts, points, boxes, masks, space)
        check_cancel(cancel)
        if progress:
            progress(0.0, "baseline")
        arrays: List[np.ndarray] = []
        body = {"baseline": self._hashes[0], "followups": self._hashes[1:], "prompts": prompts_to_json(todo, arrays),
                "from_baseline": bool(from_baseline), "propagation": self._asked[0], "refine": self._asked[1],
                **self.backend.settings_json()}

        def post(sid: str) -> Any:
            return self.backend.post(f"{API}/sessions/{sid}/track", body, arrays,
                                     len(todo) * _reply_limit(self._images))

        try:
            reply = self._watched(post, progress, cancel) if (progress or cancel) else self._call(post)
        except RequestRejected as exc:
            if exc.code == "cancelled":
                raise Cancelled("cancelled") from None
            raise
        if reply.images != self._hashes:
            raise ProtocolMismatch(f"server {self.backend.url} answered for other images", url=self.backend.url)
        check_cancel(cancel)  # set after the server's last check: as in-process, the work is dropped
        if progress:
            progress(1.0, "done")
        res = [SegmentationResult(v, lesions) for v, lesions in zip(self._images, reply.results)]
        return TrackingResult(res[0], res[1:])

    def close(self) -> None:
        """Drop the images (and delete the server session)."""
        super().close()
        self._images, self._hashes = [], []


# -- helpers ---------------------------------------------------------------------------------
def _reply_limit(images: Sequence[Volume]) -> int:
    """The most a reply of one lesion per image can hold: a bit per voxel and float32 probabilities."""
    return sum(int(np.prod(v.shape)) for v in images) * 5 + (1 << 20)


def _head_bytes(req: Any) -> int:
    """Bytes of the request line and headers as sent on the wire (HTTP/1.1)."""
    from urllib.parse import urlsplit

    path = urlsplit(req.url)
    target = path.path + (f"?{path.query}" if path.query else "")
    line = len(f"{req.method} {target} HTTP/1.1\r\n")
    return line + sum(len(k) + len(str(v)) + 4 for k, v in req.headers.items()) + 2


def _short(exc: BaseException) -> str:
    text = str(exc)
    # urllib3 nests the cause deep inside "Max retries exceeded ..."; name the cause itself.
    for needle, said in (("Connection refused", "connection refused"),
                         ("Name or service not known", "unknown host name"),
                         ("nodename nor servname", "unknown host name"),
                         ("RemoteDisconnected", "the server closed the connection mid-request"),
                         ("Connection reset", "the connection was reset mid-request"),
                         ("Connection aborted", "the connection was aborted mid-request"),
                         ("No route to host", "no route to host"),
                         ("CERTIFICATE_VERIFY_FAILED", "TLS certificate not trusted")):
        if needle in text:
            return said
    return text if len(text) < 200 else text[:200] + "..."


def _cpu_count() -> Optional[int]:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


def wait_for_server(url: str, timeout_s: float = 60.0, token: Optional[str] = None) -> Dict[str, Any]:
    """Poll /v1/health until the server is ready (bounded by ``timeout_s``)."""
    import requests

    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last = ""
    with requests.Session() as s:
        s.trust_env = False
        while time.monotonic() < deadline:
            try:
                r = s.get(f"{url.rstrip('/')}{API}/health", headers=headers, timeout=2)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return r.json()
                last = f"HTTP {r.status_code}"
            except (requests.exceptions.RequestException, ValueError) as exc:
                last = _short(exc)
            time.sleep(0.1)
    raise ServerUnreachable(f"server at {url} not ready after {timeout_s} s ({last})", url=url)
