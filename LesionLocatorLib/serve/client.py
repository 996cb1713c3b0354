"""LesionLocatorClient: the in-process segmentation API, executed by a LesionLocator server.

    client = LesionLocatorClient("http://127.0.0.1:8765", token=None)
    client.set_image(volume)                       # uploaded once (skipped if the server has it)
    result = client.segment(points={1: (z, y, x)}) # SegmentationResult, like LesionSegmenter
    client.undo()

The client keeps the pasted state of the session (``client.lesions``): each reply holds only
the lesions that changed, as crops, and is pasted over the previous state.  A failed request
leaves that state (and the caller's arrays) untouched.  Every failure is a :class:`ServerError`.
"""
from __future__ import annotations

import argparse
import secrets
import time
from typing import Any, Mapping, Sequence

import numpy as np

from ..core.geometry import Volume
from ..core.results import LesionMask, SegmentationResult
from .wire import (
    MASKS_MEDIA_TYPE,
    PROTOCOL_VERSION,
    VOLUME_MEDIA_TYPE,
    WireError,
    content_hash,
    decode_masks,
    encode_mask_prompt,
    iter_encode_volume,
    unpack_bundles,
)

API = "/v1"
CLIENT_KEY_HEADER = "X-LesionLocator-Client"


class ServerError(IOError):
    """Base class of every client-side failure talking to a LesionLocator server."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, url: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.url = message, status, code, url

    def __str__(self) -> str:
        return self.message


class ServerUnreachable(ServerError):
    """No connection (server not running, wrong address, or it died during the request)."""


class AuthenticationError(ServerError):
    """The server refused the token (HTTP 401)."""


class ProtocolMismatch(ServerError):
    """The server speaks another protocol version, or lacks a needed capability."""


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
        code, message = str(body.get("error", "")), str(body.get("message", resp.text[:500]))
    except ValueError:
        code, message = "", resp.text[:500] or resp.reason
    status = resp.status_code
    text = f"server {url} answered {status}: {message}"
    if status == 401:
        return AuthenticationError(f"{text} (check the token given to LesionLocatorClient)", status, code, url)
    if status == 404 and code == "unknown_session":
        return SessionLost(text, status, code, url)
    if 400 <= status < 500:
        return RequestRejected(text, status, code, url)
    return ServerInternalError(text, status, code, url)


class _UploadTooLarge(Exception):
    """Internal: the upload stream passed the server's advertised limit."""


class LesionLocatorClient:
    """Remote twin of :class:`LesionLocatorLib.segment.segmenter.LesionSegmenter` (one server session per client)."""

    def __init__(
        self,
        url: str = "http://127.0.0.1:8765",
        token: str | None = None,
        timeout: float | tuple[float, float] = (5.0, 600.0),
        check_version: bool = True,
        upload_threads: int | None = None,
        compression_level: int = 1,
        verify: bool | str = True,
    ) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self._http = requests.Session()  # keep-alive: one TCP connection for all clicks
        self._http.headers[CLIENT_KEY_HEADER] = secrets.token_hex(16)
        if token:
            self._http.headers["Authorization"] = f"Bearer {token}"
        self._http.trust_env = False  # never route loopback traffic through an HTTP proxy from the environment
        self._http.verify = verify  # https: True, or a CA bundle path for a self-signed server certificate
        self.upload_threads = upload_threads or max(1, min(4, (_cpu_count() or 2) - 1))
        self.compression_level = compression_level
        self.session_id: str | None = None
        self.capabilities: dict[str, Any] | None = None
        self.image: Volume | None = None
        self.image_hash: str | None = None
        self.lesions: dict[int, LesionMask] = {}
        self.baseline_result: SegmentationResult | None = None
        self.last_request_bytes = 0
        self.last_response_bytes = 0
        self.last_server_ms: float | None = None  # the model job's time as the server measured it
        self.last_changed: dict[int, list[int] | None] = {}  # per lesion: the region to repaint
        self.uploads = 0
        if check_version:
            self.check_server()

    # -- plumbing ------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, expect: str = "json", **kw: Any) -> Any:
        import requests

        url = f"{self.url}{path}"
        kw.setdefault("timeout", self.timeout)
        try:
            resp = self._http.request(method, url, **kw)
        except requests.exceptions.Timeout as exc:
            raise ServerTimeout(f"no answer from {url} within {self.timeout} s ({type(exc).__name__}); "
                                "the server may be busy with a long request", url=url) from None
        except requests.exceptions.ConnectionError as exc:
            raise ServerUnreachable(
                f"cannot reach the LesionLocator server at {self.url} ({_short(exc)}); is it running? "
                f"start it with 'lesionlocator serve -m CHECKPOINT' or check the URL", url=url) from None
        except requests.exceptions.RequestException as exc:
            raise ServerError(f"request to {url} failed: {_short(exc)}", url=url) from None
        req = resp.request
        body = req.body if isinstance(req.body, (bytes, bytearray)) else (req.body.encode() if isinstance(req.body, str)
                                                                          else b"")
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
        if resp.headers.get("content-type", "").split(";")[0] != MASKS_MEDIA_TYPE and expect == "masks":
            raise ProtocolMismatch(f"server {self.url} answered {resp.headers.get('content-type')} on {path}",
                                   url=url)
        return resp.content

    def check_server(self) -> dict[str, Any]:
        """Ask the server for its version and capabilities; refuse a mismatched protocol."""
        info = self._request("GET", f"{API}/version")
        if not isinstance(info, dict) or info.get("server") != "lesionlocator":
            raise ProtocolMismatch(f"{self.url} is not a LesionLocator server", url=self.url)
        if info.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"server {self.url} speaks protocol {info.get('protocol')} (version {info.get('version')}), this "
                f"client speaks {PROTOCOL_VERSION}: update the older side", url=self.url)
        self.capabilities = info
        return info

    def _session(self) -> str:
        if self.session_id is None:
            self.session_id = self._request("POST", f"{API}/sessions")["session_id"]
        return self.session_id

    def close(self) -> None:
        """Delete the server session (best effort) and close the connection."""
        if self.session_id is not None:
            try:
                self._request("DELETE", f"{API}/sessions/{self.session_id}", timeout=5)
            except ServerError:
                pass
            self.session_id = None
        self._http.close()

    def __enter__(self) -> "LesionLocatorClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- image ----------------------------------------------------------------------------
    def set_image(self, volume: Volume) -> str:
        """Make ``volume`` the session image; uploads it only if the server does not already hold it.

        Returns its content hash.  The caller's array is only read.
        """
        if not isinstance(volume, Volume):
            raise TypeError(f"set_image needs a Volume, got {type(volume).__name__}")
        digest = content_hash(volume)
        held = self._select_image(volume, digest)
        changed = digest != self.image_hash
        if changed:
            self.lesions = {}
        self.image, self.image_hash = volume, digest
        if held and (changed or set(held) != set(self.lesions)):
            self.fetch_results()  # the session has masks on this image (earlier clicks, tracking): paste them
        return digest

    def _select_image(self, volume: Volume, digest: str, retry: bool = True) -> list[int]:
        """Make the image current on the server (upload only if needed); returns the lesion ids it holds."""
        sid = self._session()
        try:
            info = self._request("POST", f"{API}/sessions/{sid}/image/reuse", json={"hash": digest})
            return list(info.get("lesions") or [])
        except SessionLost:
            if not retry:
                raise
            self.session_id = None
            self.lesions = {}  # the server's state of that session is gone
            return self._select_image(volume, digest, retry=False)
        except RequestRejected as exc:
            if exc.code != "image_not_cached":
                raise
        caps = self.capabilities or {}
        raw_cap, upload_cap = caps.get("max_cache_bytes"), caps.get("max_upload_bytes")
        if isinstance(raw_cap, int) and volume.array.nbytes > raw_cap:
            raise RequestRejected(f"the image ({volume.array.nbytes / 2**20:.0f} MiB) is larger than the server's "
                                  f"image cache ({raw_cap / 2**20:.0f} MiB): start it with a larger --max-cache-mb",
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

        try:
            info = self._request("PUT", f"{API}/sessions/{sid}/image", data=counted(),
                                 headers={"Content-Type": VOLUME_MEDIA_TYPE})
        except _UploadTooLarge:
            cap_mib = float(upload_cap) / 2**20  # type: ignore[arg-type]
            raise RequestRejected(f"the compressed image exceeds the server's upload limit of {cap_mib:.0f} MiB: "
                                  "start it with a larger --max-upload-mb", code="payload_too_large",
                                  url=self.url) from None
        self.last_request_bytes = sent[0]
        if info.get("image") != digest:
            raise ProtocolMismatch(f"server stored the image under hash {info.get('image')}, expected {digest}")
        self.uploads += 1
        return []

    def _ensure_session_image(self) -> None:
        if self.image is None or self.image_hash is None:
            raise RequestRejected("no image: call set_image(volume) first")

    # -- segmentation ------------------------------------------------------------------
    def segment(
        self,
        points: Mapping[int, Sequence[float]] | None = None,
        boxes: Mapping[int, Sequence[float]] | None = None,
        masks: Mapping[int, np.ndarray | LesionMask] | None = None,
        space: str = "voxel",
        return_probabilities: bool = False,
        progress: Any = None,
    ) -> SegmentationResult:
        """Segment lesions from prompts on the current image (same arguments as LesionSegmenter.segment).

        points: {id: (z, y, x)} voxels, or (x, y, z) mm when ``space`` is "lps"/"ras".
        boxes: {id: (z0, z1, y0, y1, x0, x1)} half-open voxels, or ((x, y, z), (x, y, z)) corners in mm.
        masks: {id: full-size mask array or LesionMask} on the image grid.
        """
        self._ensure_session_image()
        prompts = build_prompts(points, boxes, masks, space)
        body: dict[str, Any] = {"prompts": prompts, "image": self.image_hash}
        if return_probabilities:
            body["probabilities"] = True
        if progress:
            progress(0.0, f"{len(prompts)} lesion(s) on {self.url}")
        data = self._with_session(lambda sid: self._request(
            "POST", f"{API}/sessions/{sid}/segment", json=body, expect="masks"))
        result = self._paste(data)
        if progress:
            progress(1.0, "done")
        return result

    def segment_prompts(self, prompts: Mapping[int, Any], return_probabilities: bool = False,
                        progress: Any = None) -> SegmentationResult:
        """Library prompt objects (prompts.Point / Box / Mask) in input voxels."""
        from ..core.prompts import Box, Mask, Point

        pts = {k: p.zyx for k, p in prompts.items() if isinstance(p, Point)}
        bxs = {k: p.bounds for k, p in prompts.items() if isinstance(p, Box)}
        msk = {k: p.mask for k, p in prompts.items() if isinstance(p, Mask)}
        if len(pts) + len(bxs) + len(msk) != len(prompts):
            raise TypeError("prompts must be prompts.Point, prompts.Box or prompts.Mask")
        return self.segment(points=pts or None, boxes=bxs or None, masks=msk or None,
                            return_probabilities=return_probabilities, progress=progress)

    def undo(self) -> SegmentationResult:
        """Revert the last result; returns the lesions it changed (status 'removed' for lesions that vanish)."""
        self._ensure_session_image()
        data = self._with_session(lambda sid: self._request("POST", f"{API}/sessions/{sid}/undo",
                                                            expect="masks"), reupload=False)
        return self._paste(data)

    def fetch_results(self) -> SegmentationResult:
        """All current masks of the image as the server holds them (e.g. to resynchronise)."""
        self._ensure_session_image()
        data = self._with_session(lambda sid: self._request(
            "GET", f"{API}/sessions/{sid}/results", params={"image": self.image_hash}, expect="masks"),
            reupload=False)
        bundle = _decode(data, self.url)
        self.lesions = dict(bundle.lesions)
        return SegmentationResult(self.image, dict(bundle.lesions))  # type: ignore[arg-type]

    def track(
        self,
        baseline: Volume,
        followups: Sequence[Volume],
        points: Mapping[int, Sequence[float]] | None = None,
        boxes: Mapping[int, Sequence[float]] | None = None,
        masks: Mapping[int, np.ndarray | LesionMask] | None = None,
        space: str = "voxel",
        from_baseline: bool = False,
    ) -> list[SegmentationResult]:
        """Track baseline lesions into follow-ups; returns one result per follow-up (like LesionTracker.track).

        Prompts are on the baseline; without prompts, the masks this client holds for the baseline (its
        current image) are tracked.  The baseline's masks (segmented first from points/boxes) are left in
        ``baseline_result``.
        """
        if self.capabilities is not None and not self.capabilities.get("tracking", False):
            raise ProtocolMismatch(f"server {self.url} cannot track: "
                                   f"{self.capabilities.get('unavailable', {}).get('track', 'no tracking model')}")
        hashes = []
        for vol in [baseline, *followups]:
            d = content_hash(vol)
            self._select_image(vol, d)
            hashes.append(d)
        body: dict[str, Any] = {"baseline": hashes[0], "followups": hashes[1:], "from_baseline": from_baseline}
        prompts = build_prompts(points, boxes, masks, space) if (points or boxes or masks) else None
        if prompts:
            body["prompts"] = prompts
        else:
            if hashes[0] != self.image_hash or not self.lesions:
                raise RequestRejected("track without prompts uses the baseline's current masks: segment the "
                                      "baseline with this client first, or pass prompts")
            body["use_results"] = True
        data = self._with_session(lambda sid: self._request("POST", f"{API}/sessions/{sid}/track", json=body,
                                                            expect="bundles"), reupload=False)
        parts = [_decode(p, self.url) for p in unpack_bundles(data)]
        if len(parts) != len(followups) + 1:
            raise ProtocolMismatch(f"server sent {len(parts)} results for 1 baseline + {len(followups)} follow-ups")
        self.baseline_result = SegmentationResult(baseline, dict(parts[0].lesions))
        # the tracked images were selected on the server in turn; this client's current image is the last
        self.image, self.image_hash = followups[-1], hashes[-1]
        self.lesions = dict(parts[-1].lesions)
        return [SegmentationResult(vol, dict(b.lesions)) for vol, b in zip(followups, parts[1:])]

    # -- helpers -------------------------------------------------------------------------
    def _with_session(self, call: Any, reupload: bool = True) -> Any:
        """Run ``call(session_id)``; if the server lost the session, re-create it (re-uploading the image) once."""
        try:
            return call(self._session())
        except SessionLost:
            if not reupload or self.image is None or self.image_hash is None:
                raise
            self.session_id = None
            self.lesions = {}
            self._select_image(self.image, self.image_hash)
            return call(self._session())

    def _paste(self, data: bytes) -> SegmentationResult:
        bundle = _decode(data, self.url)
        if bundle.header.get("image") not in (None, self.image_hash):
            raise ProtocolMismatch("the server answered for another image than the client's current one")
        # decode fully before touching state: a bad reply leaves the pasted state as it was.
        lesions = dict(self.lesions)
        for lid, les in bundle.lesions.items():
            if les.status == "removed":
                lesions.pop(lid, None)
            else:
                lesions[lid] = les
        self.lesions = lesions
        self.last_changed = {lid: e.get("changed_bbox") for lid, e in bundle.entries.items()}
        ms = bundle.header.get("elapsed_ms")
        self.last_server_ms = float(ms) if isinstance(ms, (int, float)) else None
        return SegmentationResult(self.image, dict(bundle.lesions))  # type: ignore[arg-type]

    def result(self) -> SegmentationResult:
        """Every lesion of the current image as pasted so far."""
        self._ensure_session_image()
        return SegmentationResult(self.image, dict(self.lesions))  # type: ignore[arg-type]

    def label_map(self) -> np.ndarray:
        return self.result().label_map()


def build_prompts(points: Mapping[int, Sequence[float]] | None, boxes: Mapping[int, Sequence[float]] | None,
                  masks: Mapping[int, Any] | None, space: str) -> dict[str, Any]:
    """Client arguments -> the JSON ``prompts`` object of a segment request."""
    if space not in ("voxel", "lps", "ras"):
        raise ValueError(f"space must be 'voxel', 'lps' or 'ras', got {space!r}")
    out: dict[str, Any] = {}

    def key(lid: Any) -> str:
        if isinstance(lid, bool) or not isinstance(lid, (int, np.integer)) or int(lid) < 1:
            raise ValueError(f"lesion ids must be positive integers, got {lid!r}")
        k = str(int(lid))
        if k in out:
            raise ValueError(f"lesion id {k} has more than one prompt")
        return k

    for lid, p in (points or {}).items():
        vals = [float(v) for v in np.asarray(p, dtype=float).ravel()]
        out[key(lid)] = {"point" if space == "voxel" else f"point_{space}": vals}
    for lid, b in (boxes or {}).items():
        arr = np.asarray(b, dtype=float)
        if space == "voxel":
            out[key(lid)] = {"box": [int(v) for v in arr.ravel()]}
        else:
            out[key(lid)] = {f"box_{space}": arr.reshape(2, 3).tolist()}
    for lid, m in (masks or {}).items():
        try:
            out[key(lid)] = {"mask": encode_mask_prompt(m)}
        except WireError as exc:
            raise ValueError(f"lesion {lid}: {exc}") from None
    if not out:
        raise ValueError("give at least one prompt (points, boxes or masks)")
    return out


def _decode(data: bytes, url: str) -> Any:
    try:
        return decode_masks(data)
    except WireError as exc:
        raise ProtocolMismatch(f"unreadable reply from {url}: {exc}", url=url) from None


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


def _cpu_count() -> int | None:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count()


# -- CLI helper --------------------------------------------------------------------------
def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server URL`` / ``--token`` / ``--token-file`` for ``lesionlocator segment`` and ``track``."""
    parser.add_argument("--server", metavar="URL", help="run on a LesionLocator server (lesionlocator serve)")
    parser.add_argument("--server-token", metavar="TOKEN", help="bearer token for --server")
    parser.add_argument("--server-token-file", metavar="FILE", help="file whose first line is the token for --server")
    parser.add_argument("--server-timeout", type=float, default=600.0, help="seconds to wait for a reply")


def client_from_args(args: argparse.Namespace) -> LesionLocatorClient:
    """A connected client from the options of :func:`add_server_arguments` (raises ServerError if unusable)."""
    token = getattr(args, "server_token", None)
    tf = getattr(args, "server_token_file", None)
    if tf and not token:
        try:
            lines = [ln.strip() for ln in open(tf, encoding="utf-8") if ln.strip() and not ln.startswith("#")]
        except OSError as exc:
            raise ServerError(f"cannot read token file {tf}: {exc}") from None
        if not lines:
            raise ServerError(f"token file {tf} is empty")
        token = lines[0]
    return LesionLocatorClient(args.server, token=token,
                               timeout=(5.0, float(getattr(args, "server_timeout", 600.0))))


def wait_for_server(url: str, timeout_s: float = 60.0, token: str | None = None) -> dict[str, Any]:
    """Poll /v1/health until the server is ready (bounded by ``timeout_s``)."""
    import requests

    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    last: str = ""
    with requests.Session() as s:
        s.trust_env = False
        while time.monotonic() < deadline:
            try:
                r = s.get(f"{url.rstrip('/')}{API}/health", headers=headers, timeout=2)
                if r.status_code == 200 and r.json().get("status") == "ok":
                    return r.json()
                last = f"HTTP {r.status_code}"
            except requests.exceptions.RequestException as exc:
                last = _short(exc)
            time.sleep(0.1)
    raise ServerUnreachable(f"server at {url} not ready after {timeout_s} s ({last})", url=url)
