"""LesionLocatorClient against a real server in a separate process (python -m LesionLocatorLib.serve.server),
plus its error hierarchy against small loopback HTTP servers that misbehave on purpose."""
from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from LesionLocatorLib.serve.client import (
    AuthenticationError,
    LesionLocatorClient,
    ProtocolMismatch,
    RequestRejected,
    ServerError,
    ServerInternalError,
    ServerTimeout,
    ServerUnreachable,
    add_server_arguments,
    build_prompts,
    client_from_args,
    wait_for_server,
)
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.prompts import Box, Point
from LesionLocatorLib.segment.segmenter import LesionSegmenter
from LesionLocatorLib.model.tiny_model import write_random_checkpoint, write_random_track_checkpoint

from conftest import lung_ct

REPO = Path(__file__).resolve().parents[2]
TOKEN = "client-test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight package in the published layout with all three models: point, box and Track
    (uniGradICON at its smallest input, 65^3, + a tiny 2-channel UNet), so the server tracks the published way."""
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


class ServerProcess:
    """``python -m LesionLocatorLib.serve.server`` as a child process on a free loopback port."""

    def __init__(self, checkpoint: Path, tmp: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        token_file = tmp / "tokens.txt"
        token_file.write_text(TOKEN + "\n")
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        self.log = open(tmp / "server.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "LesionLocatorLib.serve.server", "-m", str(checkpoint), "--host", "127.0.0.1",
             "--port", str(self.port), "--device", "cpu", "--token-file", str(token_file), "--log-level", "warning"],
            cwd=str(REPO), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_server(self.url, timeout_s=90, token=TOKEN)
        except ServerError:
            self.stop()
            raise AssertionError("server did not start:\n" + (tmp / "server.log").read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = ServerProcess(checkpoint, tmp_path_factory.mktemp("srv"))
    yield s
    s.stop()


def test_separate_process_round_trip(server, checkpoint):
    vol = ct(seed=1)
    ref = LesionSegmenter.from_checkpoint(checkpoint, prompt_type=["point", "box"], device="cpu")
    ref.set_image(vol)
    with LesionLocatorClient(server.url, token=TOKEN) as c:
        assert c.capabilities["protocol"] == 1 and c.capabilities["auth"] is True
        c.set_image(vol)
        c.set_image(vol)
        assert c.uploads == 1  # the second set_image only named the hash
        for click in [{1: (15, 20, 18)}, {1: (14, 21, 17)}, {2: (3, 4, 5)}]:
            r = c.segment(points=click)
            exp = ref.segment(points=click)
            for lid in click:
                np.testing.assert_array_equal(r.lesions[lid].full(vol.shape), exp.lesions[lid].full(vol.shape))
        # the library's prompt objects work too (what the CLI holds after parsing a prompt file)
        r = c.segment_prompts({3: Box((2, 10, 5, 30, 5, 30)), 4: Point((20.0, 20.0, 20.0))})
        exp = ref.segment_prompts({3: Box((2, 10, 5, 30, 5, 30)), 4: Point((20.0, 20.0, 20.0))})
        np.testing.assert_array_equal(r.label_map(), exp.label_map())
        c.undo()
        assert sorted(c.lesions) == [1, 2]
        np.testing.assert_array_equal(c.lesions[1].full(vol.shape),
                                      ref.segment(points={1: (14, 21, 17)}).lesions[1].full(vol.shape))
        with pytest.raises(RequestRejected, match="outside the image"):
            c.segment(points={5: (99, 0, 0)})
        assert sorted(c.lesions) == [1, 2]


def test_separate_process_learned_tracking(server, checkpoint):
    """With a LesionLocatorTrack model the server tracks the published way (registration net + Track UNet),
    and its answer equals the in-process LesionTracker's."""
    from LesionLocatorLib.track.tracker import LesionTracker

    base, fu1, fu2 = lung_ct(1), lung_ct(2, 2), lung_ct(3, 3)
    local = LesionTracker.from_checkpoint(checkpoint, device="cpu")
    assert (local.propagation, local.refine) == ("learned", "unet")
    expected = local.track(base, [fu1, fu2], {1: Point((15.0, 24.0, 22.0)), 2: Box((10, 20, 16, 32, 14, 30))})
    with LesionLocatorClient(server.url, token=TOKEN) as c:
        assert c.capabilities["tracking_method"] == {"propagation": "learned", "refine": "unet"}
        assert c.capabilities["models"]["track"].startswith("LesionLocatorTrack@")
        got = c.track(base, [fu1, fu2], points={1: (15, 24, 22)}, boxes={2: (10, 20, 16, 32, 14, 30)})
    for g, e in zip(got, expected):
        assert set(g.lesions) == set(e.lesions) == {1, 2}
        for lid in e.lesions:
            assert g.lesions[lid].status == e.lesions[lid].status
            np.testing.assert_array_equal(g.lesions[lid].full(g.shape), e.lesions[lid].full(e.shape))
    assert any(not les.empty for les in got[-1].lesions.values())


def test_server_killed_mid_request(checkpoint, tmp_path):
    """Freeze the server (SIGSTOP) so the request is surely in flight, then kill it."""
    srv = ServerProcess(checkpoint, tmp_path)
    try:
        vol = ct(seed=2)
        original = vol.array.copy()
        c = LesionLocatorClient(srv.url, token=TOKEN, timeout=(5, 60))
        c.set_image(vol)
        c.segment(points={1: (10, 10, 10)})
        before = {k: (v.bbox, v.mask.copy()) for k, v in c.lesions.items()}
        srv.proc.send_signal(signal.SIGSTOP)
        box: dict = {}

        def click() -> None:
            try:
                c.segment(points={1: (12, 12, 12)}, boxes={2: (0, 5, 0, 5, 0, 5)})
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
        # nothing of the caller's changed: the image array, and the pasted results
        np.testing.assert_array_equal(vol.array, original)
        assert {k: v.bbox for k, v in c.lesions.items()} == {k: b for k, (b, _) in before.items()}
        for k, (_, m) in before.items():
            np.testing.assert_array_equal(c.lesions[k].mask, m)
        # a later call fails the same clear way (nothing is listening any more)
        with pytest.raises(ServerUnreachable, match="is it running"):
            c.segment(points={1: (12, 12, 12)})
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------
# error hierarchy against misbehaving loopback servers
class FakeHandler(http.server.BaseHTTPRequestHandler):
    mode = "version"

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
            self._send(200, json.dumps({"server": "lesionlocator", "protocol": 999, "version": "9.9"}).encode())
        elif mode == "html":
            self._send(200, b"<html>hello</html>", "text/html")
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
    with pytest.raises(ProtocolMismatch, match="protocol 999.*speaks 1"):
        LesionLocatorClient(url)
    for mode in ("html", "other_json"):
        fake.mode = mode
        with pytest.raises(ProtocolMismatch, match="LesionLocator server"):
            LesionLocatorClient(url)
    fake.mode = "slow"
    t0 = time.monotonic()
    with pytest.raises(ServerTimeout, match="within"):
        LesionLocatorClient(url, timeout=(2, 0.5))
    assert time.monotonic() - t0 < 2.5
    fake.mode = "error"
    with pytest.raises(ServerInternalError, match="503: GPU on fire") as ei:
        LesionLocatorClient(url)
    assert ei.value.status == 503 and ei.value.code == "busy"
    # nothing listening on a port
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ServerUnreachable, match=f"{dead}.*is it running"):
        LesionLocatorClient(dead, timeout=(2, 2))


def test_build_prompts_and_cli_helper(tmp_path):
    p = build_prompts({1: (1, 2, 3.5)}, {2: (0, 1, 0, 1, 0, 1)}, {3: np.pad(np.ones((2, 2, 2)), 1)}, "voxel")
    assert p["1"] == {"point": [1.0, 2.0, 3.5]} and p["2"] == {"box": [0, 1, 0, 1, 0, 1]}
    assert p["3"]["mask"]["bbox"] == [1, 3, 1, 3, 1, 3]
    w = build_prompts({1: (1, 2, 3)}, {2: ((0, 0, 0), (5, 5, 5))}, None, "ras")
    assert w == {"1": {"point_ras": [1.0, 2.0, 3.0]}, "2": {"box_ras": [[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]}}
    with pytest.raises(ValueError, match="more than one prompt"):
        build_prompts({1: (1, 2, 3)}, {1: (0, 1, 0, 1, 0, 1)}, None, "voxel")
    with pytest.raises(ValueError, match="positive"):
        build_prompts({0: (1, 2, 3)}, None, None, "voxel")
    with pytest.raises(ValueError, match="at least one"):
        build_prompts(None, None, None, "voxel")
    with pytest.raises(ValueError, match="space"):
        build_prompts({1: (1, 2, 3)}, None, None, "xyz")
    with pytest.raises(ValueError, match="empty"):
        build_prompts(None, None, {1: np.zeros((3, 3, 3))}, "voxel")
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    (tmp_path / "tok").write_text("# token\nsecret-token-value-123\n")
    args = parser.parse_args(["--server", f"http://127.0.0.1:{free_port()}", "--server-token-file",
                              str(tmp_path / "tok"), "--server-timeout", "3"])
    with pytest.raises(ServerUnreachable):
        client_from_args(args)


def test_cli_helper_connects_with_token(server):
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    c = client_from_args(parser.parse_args(["--server", server.url, "--server-token", TOKEN]))
    assert c.capabilities["server"] == "lesionlocator"
    c.close()
    with pytest.raises(AuthenticationError, match="token"):
        client_from_args(parser.parse_args(["--server", server.url, "--server-token", "nope-nope-nope-nope"]))
