"""RemoteBackend against a real ``lesionlocator serve`` process on loopback: masks identical to the in-process
backend (``open_backend(model=...)``) for every prompt kind and for tracking, learned and classical; plus the
client's error hierarchy against small loopback HTTP servers that misbehave on purpose."""
from __future__ import annotations

import http.server
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib.backend import open_backend
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.prompts import Box, Mask, Point
from LesionLocatorLib.model.tiny_model import write_random_checkpoint, write_random_track_checkpoint
from LesionLocatorLib.serve.auth import read_token_file
from LesionLocatorLib.serve.client import (
    AuthenticationError,
    ProtocolMismatch,
    RemoteBackend,
    RequestRejected,
    ServerError,
    ServerInternalError,
    ServerTimeout,
    ServerUnreachable,
)

from conftest import TOKEN, ServerProcess, free_port, lung_ct

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight package in the published layout with all three models: point, box and Track
    (uniGradICON at its smallest input, 65^3, + a tiny 2-channel UNet), so tracking is the published method."""
    root = tmp_path_factory.mktemp("ckpt")
    write_random_checkpoint(root, patch_size=(32, 32, 32), spacing=(1.0, 1.0, 1.0), features_per_stage=(2, 4, 8),
                            n_blocks_per_stage=(1, 1, 1), seed=1)
    write_random_track_checkpoint(root, patch_size=(32, 32, 32), spacing=(1.0, 1.0, 1.0),
                                  features_per_stage=(2, 4, 8), n_blocks_per_stage=(1, 1, 1),
                                  registration_size=(65, 65, 65), seed=1)
    return root


def ct(shape=(30, 40, 36), seed=0) -> Volume:
    rng = np.random.default_rng(seed)
    return Volume(rng.normal(-50, 150, size=shape).astype(np.int16), spacing=(2.0, 0.8, 0.8))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("srv"), checkpoint)
    yield s
    s.stop()


def assert_same(remote, local):
    assert list(remote.lesions) == list(local.lesions)
    for lid, les in local.lesions.items():
        assert remote.lesions[lid].status is les.status
        np.testing.assert_array_equal(remote.lesions[lid].full(local.shape), les.full(local.shape))


def test_real_server_segments_exactly_as_in_process(server, checkpoint):
    vol = ct(seed=1)
    m = np.zeros(vol.shape, bool)
    m[10:20, 12:26, 10:24] = True
    here = open_backend(model=str(checkpoint), device="cpu").session()
    here.set_image(vol)
    with open_backend(server=server.url, token=TOKEN) as backend:
        assert backend.describe()["tracking"] == {"propagation": "learned", "refine": "unet"}
        s = backend.session()
        s.set_image(vol)
        s.set_image(vol)
        assert backend.uploads == 1  # the second set_image only named the hash
        for click in [dict(points={1: (15, 20, 18)}), dict(boxes={2: (2, 10, 5, 30, 5, 30)}), dict(masks={3: m}),
                      dict(points={4: [(15, 20, 18), (5, 8, 9)]}),
                      dict(points={5: (15, 20, 18)}, boxes={5: (2, 10, 5, 30, 5, 30)}),
                      dict(prompts={6: Point((20.0, 20.0, 20.0)), 900: [Box((2, 10, 5, 30, 5, 30)), Mask(m)]})]:
            got, exp = s.segment(**click), here.segment(**click)
            assert_same(got, exp)
            assert any(les.found for les in got.lesions.values())


def test_real_server_tracks_exactly_as_in_process(server, checkpoint):
    """With a LesionLocatorTrack model: registration net + Track UNet, autoregressive and from the baseline."""
    base, fu1, fu2 = lung_ct(1), lung_ct(2, 2), lung_ct(3, 3)
    local = open_backend(model=str(checkpoint), device="cpu").tracker()
    local.set_images(base, [fu1, fu2])
    with open_backend(server=server.url, token=TOKEN) as backend:
        remote = backend.tracker()
        remote.set_images(base, [fu1, fu2])
        for kw in (dict(points={1: (15, 24, 22)}, boxes={2: (10, 20, 16, 32, 14, 30)}),
                   dict(points={1: (15, 24, 22)}, from_baseline=True)):
            got, exp = remote.track(**kw), local.track(**kw)
            for g, e in zip(got.timepoints, exp.timepoints):
                assert_same(g, e)
            assert got.report().to_dict() == exp.report().to_dict()
        assert any(les.found for les in got.followups[-1].lesions.values())


def test_remote_tracking_progress_and_cancel(server):
    """Tracking through a server reports the server's steps while the request runs, and a cancel stops the job
    before its next tile (``Cancelled``, as in-process); the session stays usable and gives the same result."""
    from LesionLocatorLib.core.jobs import Cancelled

    base, fu1, fu2 = lung_ct(1), lung_ct(2, 2), lung_ct(3, 3)
    prompts = dict(points={1: (15, 24, 22), 2: (15, 30, 30)})
    with open_backend(server=server.url, token=TOKEN) as backend:
        tr = backend.tracker()
        tr.set_images(base, [fu1, fu2])
        seen = []
        t0 = time.perf_counter()
        full = tr.track(progress=lambda f, m: seen.append((f, m)), **prompts)
        full_s = time.perf_counter() - t0
        inner = [(f, m) for f, m in seen if 0 < f < 1]
        assert seen[0] == (0.0, "baseline") and seen[-1] == (1.0, "done") and inner, (full_s, seen)
        assert any("lesion" in m or "registration" in m for _, m in inner), inner  # the tracker's own messages
        cancel = threading.Event()

        def stop_at_first_step(f, m):
            if 0 < f < 1:
                cancel.set()

        with pytest.raises(Cancelled):
            tr.track(progress=stop_at_first_step, cancel=cancel, **prompts)
        assert cancel.is_set()
        info = backend.request("GET", f"/v1/sessions/{tr.session_id}/progress")
        assert info == {"running": False, "fraction": None, "message": None}
        again = tr.track(**prompts)
        for g, e in zip(again.timepoints, full.timepoints):
            assert_same(g, e)


def test_bundled_model_classical_tracking_and_default_settings(tmp_path):
    """``lesionlocator serve`` without -m serves the bundled model; tracking is classical propagation refined by
    the segmentation model, and default settings on both sides give the same masks."""
    srv = ServerProcess(tmp_path, None)
    try:
        base, fu = lung_ct(6), lung_ct(7, 2)
        local = open_backend(device="cpu")
        with open_backend(server=srv.url, token=TOKEN) as backend:
            d = backend.describe()
            assert d["tracking"] == {"propagation": "classical", "refine": "segment"}
            assert d["kinds"] == local.describe()["kinds"]
            s, ls = backend.session(), local.session()
            s.set_image(base)
            ls.set_image(base)
            assert_same(s.segment(points={3: (15, 24, 22)}), ls.segment(points={3: (15, 24, 22)}))
            t, lt = backend.tracker(), local.tracker()
            t.set_images(base, [fu])
            lt.set_images(base, [fu])
            got, exp = t.track(points={3: (15, 24, 22)}), lt.track(points={3: (15, 24, 22)})
            for g, e in zip(got.timepoints, exp.timepoints):
                assert_same(g, e)
            assert got.report().to_dict() == exp.report().to_dict()
    finally:
        srv.stop()


def test_server_killed_mid_request(checkpoint, tmp_path):
    """Freeze the server (SIGSTOP) so the request is surely in flight, then kill it."""
    srv = ServerProcess(tmp_path, checkpoint, ["--no-warmup"])
    try:
        vol = ct(seed=2)
        original = vol.array.copy()
        b = RemoteBackend(srv.url, token=TOKEN, timeout=(5, 60))
        s = b.session()
        s.set_image(vol)
        s.segment(points={1: (10, 10, 10)})
        srv.proc.send_signal(signal.SIGSTOP)
        box: dict = {}

        def click() -> None:
            try:
                s.segment(points={1: (12, 12, 12)}, boxes={2: (0, 5, 0, 5, 0, 5)})
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                box["exc"] = exc

        t = threading.Thread(target=click)
        t.start()
        time.sleep(0.5)
        assert t.is_alive(), "the request should be waiting on the frozen server"
        srv.proc.kill()
        t.join(timeout=30)
        assert not t.is_alive()
        exc = box.get("exc")
        assert isinstance(exc, ServerUnreachable), repr(exc)
        assert srv.url in str(exc) and "lesionlocator serve" in str(exc)
        np.testing.assert_array_equal(vol.array, original)  # the caller's image is only read
        with pytest.raises(ServerUnreachable, match="is it running"):
            s.segment(points={1: (12, 12, 12)})
    finally:
        srv.stop()


def test_client_token_file(server, tmp_path):
    tf = tmp_path / "tok"
    tf.write_text(f"\ufeff# my token\n{TOKEN}\nsecond-token-ignored-by-a-client\n", encoding="utf-8")
    (token,) = read_token_file(tf, first_only=True)
    assert token == TOKEN
    RemoteBackend(server.url, token=token).close()
    with pytest.raises(AuthenticationError, match="token"):
        RemoteBackend(server.url, token="nope-nope-nope-nope")
    with pytest.raises(ValueError, match="empty"):
        RemoteBackend("  ")


# ----------------------------------------------------------------------------------------
# error hierarchy against misbehaving loopback servers
class FakeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (the timeout test): expected

    def do_GET(self) -> None:  # noqa: N802
        mode = self.server.mode  # type: ignore[attr-defined]
        if mode == "old_protocol":
            self._send(200, json.dumps({"server": "lesionlocator", "protocol": 1, "version": "0.1"}).encode())
        elif mode == "html":
            self._send(200, b"<html>hello</html>", "text/html")
        elif mode == "html_error":
            self._send(502, b"<html><body>\n" * 13 + b"</html>", "text/html")
        elif mode == "other_json":
            self._send(200, b'{"name": "some other service"}')
        elif mode == "slow":
            time.sleep(3)
            self._send(200, b"{}")
        elif mode == "error":
            self._send(503, json.dumps({"error": "busy", "message": "GPU on fire"}).encode())


@pytest.fixture
def fake():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHandler)
    httpd.daemon_threads = True
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def test_error_hierarchy(fake):
    url = f"http://127.0.0.1:{fake.server_address[1]}"
    for cls in (ServerUnreachable, AuthenticationError, ProtocolMismatch, ServerTimeout, RequestRejected,
                ServerInternalError):
        assert issubclass(cls, ServerError) and issubclass(cls, IOError)
    fake.mode = "old_protocol"
    with pytest.raises(ProtocolMismatch, match="protocol 1.*speaks 2"):
        RemoteBackend(url)
    for mode in ("html", "other_json"):
        fake.mode = mode
        with pytest.raises(ProtocolMismatch, match="LesionLocator server"):
            RemoteBackend(url)
    fake.mode = "html_error"  # one line, not the page
    with pytest.raises(ServerInternalError) as ei:
        RemoteBackend(url)
    assert "\n" not in str(ei.value) and "text/html" in str(ei.value)
    fake.mode = "slow"
    t0 = time.monotonic()
    with pytest.raises(ServerTimeout, match="within"):
        RemoteBackend(url, timeout=(2, 0.5))
    assert time.monotonic() - t0 < 2.5
    fake.mode = "error"
    with pytest.raises(ServerInternalError, match="503: GPU on fire") as ei:
        RemoteBackend(url)
    assert ei.value.status == 503 and ei.value.code == "busy"
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable, match=f"{dead}.*is it running"):
        RemoteBackend(dead, timeout=(2, 2))
