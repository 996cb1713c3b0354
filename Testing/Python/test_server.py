"""The server on loopback (uvicorn in a thread of this process) with a tiny random checkpoint, against the
in-process backend. Every answer is compared with ``open_backend(model=...)``; every loop is bounded; every
address is 127.0.0.1. The separate-process server is exercised in test_client.py."""
from __future__ import annotations

import argparse
import json
import re
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from LesionLocatorLib.backend import open_backend
from LesionLocatorLib.cli.serve import add_arguments, config_from_args, run
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.prompts import Box, Mask, Point, PromptError, parse_prompts, prompts_to_json
from LesionLocatorLib.core.results import LesionStatus
from LesionLocatorLib.model.tiny_model import write_random_checkpoint
from LesionLocatorLib.segment.session import Cancelled, resolve_prompts
from LesionLocatorLib.serve.app import create_app
from LesionLocatorLib.serve.client import (
    AuthenticationError,
    RemoteBackend,
    RequestRejected,
    ServerInternalError,
    wait_for_server,
)
from LesionLocatorLib.serve.config import ServerConfig, ServerConfigError, check_config
from LesionLocatorLib.serve.schemas import SegmentRequest
from LesionLocatorLib.serve.sessions import CacheFull, ServerFull, SessionNotFound, SessionStore
from LesionLocatorLib.serve.wire import (
    MEDIA_TYPE,
    MIN_CHUNK_BYTES,
    content_hash,
    decode_results,
    encode,
    encode_request,
    encode_volume,
)

from conftest import lung_ct

TOKEN_A = "token-A-0123456789abcdef"
TOKEN_B = "token-B-0123456789abcdef"


# ----------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight package in the published layout (point and box model, folds 0 and 1, patch 32^3);
    heads balanced so that masks respond to prompts."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), patch_size=(32, 32, 32), spacing=(1.0, 1.0, 1.0),
                                   features_per_stage=(2, 4, 8), n_blocks_per_stage=(1, 1, 1), folds=(0, 1), seed=0)


@pytest.fixture(scope="module")
def local(checkpoint):
    """The in-process backend every server answer is compared with (default settings)."""
    return open_backend(model=str(checkpoint), device="cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn in a daemon thread on 127.0.0.1 (stopped by the fixture)."""

    def __init__(self, cfg: ServerConfig):
        import uvicorn

        self.app = create_app(cfg)
        self.state = self.app.state.ll
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for_server(self.url, timeout_s=60, token=cfg.tokens[0] if cfg.tokens else None)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def start(checkpoint, **kw) -> ThreadServer:
    return ThreadServer(ServerConfig(checkpoint=str(checkpoint), device="cpu", port=free_port(), **kw))


@pytest.fixture(scope="module")
def srv(checkpoint):
    """A server configured with two client tokens (as on a public address) but bound to loopback."""
    # many test clients share this server (not all close their sessions): room for them all
    s = start(checkpoint, tokens=(TOKEN_A, TOKEN_B), max_upload_mb=1.0, max_sessions=256)
    yield s
    s.stop()


def ct(shape=(36, 44, 40), seed=0, dtype=np.int16, spacing=(1.5, 0.9, 0.9)) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 120, size=shape)
    zz, yy, xx = np.indices(shape)
    blob = ((zz - shape[0] / 2) ** 2 / 25 + (yy - shape[1] / 2) ** 2 / 40 + (xx - shape[2] / 2) ** 2 / 30) < 1
    arr[blob] += 300
    return Volume(arr.astype(dtype), spacing=spacing, origin=(10.0, -20.0, 5.0))


def assert_same(remote, local):
    assert list(remote.lesions) == list(local.lesions)
    for lid, les in local.lesions.items():
        r = remote.lesions[lid]
        assert r.status is les.status and r.lesion_id == lid
        np.testing.assert_array_equal(r.full(local.shape), les.full(local.shape))


def raw(srv, method, path, token=TOKEN_A, client_key="client-key-1", **kw):
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if client_key is not None:
        headers["X-LesionLocator-Client"] = client_key
    return requests.request(method, srv.url + path, headers=headers, timeout=60, **kw)


def raw_session(srv, token=TOKEN_A, client_key="client-key-1", vol=None):
    sid = raw(srv, "POST", "/v1/sessions", token, client_key).json()["session_id"]
    if vol is not None:
        r = raw(srv, "PUT", f"/v1/sessions/{sid}/image", token, client_key, data=encode_volume(vol),
                headers={"Content-Type": MEDIA_TYPE})
        assert r.status_code == 200, r.text
    return sid


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


# ----------------------------------------------------------------------------------------
# configuration (lesionlocator serve's options)
def test_public_address_needs_a_token(checkpoint, tmp_path):
    with pytest.raises(ServerConfigError, match="without a token"):
        check_config(ServerConfig(checkpoint=str(checkpoint), host="0.0.0.0"))
    for bad in ("short", "x" * 15 + " y", "tökentökentökentöken"):
        with pytest.raises(ServerConfigError, match="at least 16"):
            check_config(ServerConfig(checkpoint=str(checkpoint), host="0.0.0.0", tokens=(bad,)))
    check_config(ServerConfig(checkpoint=str(checkpoint), host="0.0.0.0", tokens=(TOKEN_A,)))  # accepted
    check_config(ServerConfig(checkpoint=str(checkpoint), host="::1"))
    with pytest.raises(ServerConfigError, match="go together"):
        check_config(ServerConfig(checkpoint=str(checkpoint), tls_cert=str(tmp_path / "c.pem")))
    with pytest.raises(ServerConfigError, match="not found"):
        check_config(ServerConfig(checkpoint=str(checkpoint), tls_cert=str(tmp_path / "c.pem"),
                                  tls_key=str(tmp_path / "k.pem")))
    parser = serve_parser()
    # run() refuses before binding anything
    assert run(parser.parse_args(["-m", str(checkpoint), "--host", "0.0.0.0", "--port", "1"])) == 2
    tf = tmp_path / "tokens"
    tf.write_text(f"\ufeff# clients\n{TOKEN_A}\n\n{TOKEN_B}\n", encoding="utf-8")  # a byte-order mark is dropped
    cfg = config_from_args(parser.parse_args(["-m", str(checkpoint), "--token-file", str(tf), "--folds", "0,1"]))
    assert cfg.tokens == (TOKEN_A, TOKEN_B) and cfg.folds == [0, 1]
    assert config_from_args(parser.parse_args([])).folds is None  # the library default, as in-process
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ValueError, match="no token"):
        config_from_args(parser.parse_args(["-m", str(checkpoint), "--token-file", str(tmp_path / "empty")]))
    assert run(parser.parse_args(["--token-file", str(tmp_path / "missing"), "--port", "1"])) == 2
    assert run(parser.parse_args(["--folds", "0,x", "--port", "1"])) == 2


def test_run_fails_cleanly_before_binding(checkpoint, tmp_path, capsys):
    parser = serve_parser()
    port = str(free_port())
    assert run(parser.parse_args(["-m", str(tmp_path / "missing"), "--port", port])) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty_dir").mkdir()
    assert run(parser.parse_args(["-m", str(tmp_path / "empty_dir"), "--port", port])) == 2
    assert "lesionlocator serve:" in capsys.readouterr().err
    assert run(parser.parse_args(["-m", str(checkpoint), "--folds", "7", "--port", port])) == 2
    assert "fold" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run(parser.parse_args(["-m", str(checkpoint), "--device", "cuda", "--port", port])) == 2
        assert "CUDA" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# auth, version, OpenAPI
def test_every_request_needs_the_token(srv):
    for method, path, kw in [("GET", "/v1/health", {}), ("GET", "/v1/version", {}), ("POST", "/v1/sessions", {}),
                             ("GET", "/openapi.json", {}), ("GET", "/docs", {}),
                             ("POST", "/v1/sessions/x/segment", {"data": b"not json"}),
                             ("POST", "/v1/sessions/x/image/reuse", {"data": b"{"}),
                             ("PUT", "/v1/sessions/x/image", {"data": b"LLW2"})]:
        for token in (None, "wrong-token-0123456789", TOKEN_A[:-1], TOKEN_A + "x", ""):
            r = raw(srv, method, path, token=token, **kw)
            assert r.status_code == 401, (method, path, token, r.text)
            assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    r = raw(srv, "GET", "/v1/health", headers={"Authorization": f"Basic {TOKEN_A}"}, token=None)
    assert r.status_code == 401
    assert raw(srv, "GET", "/v1/health").status_code == 200
    assert raw(srv, "GET", "/v1/health", token=TOKEN_B).status_code == 200
    with pytest.raises(AuthenticationError, match="401"):
        RemoteBackend(srv.url, token="wrong-token-0123456789")
    with pytest.raises(AuthenticationError):
        RemoteBackend(srv.url)


def test_version_settings_and_openapi(srv, local):
    info = raw(srv, "GET", "/v1/version").json()
    assert info["protocol"] == 2 and info["server"] == "lesionlocator"
    assert set(info["prompt_types"]) == {"point", "box", "mask"}
    settings_ = info["settings"]  # the model's own settings, as the local backend describes them
    expected = {k: v for k, v in local.describe().items() if k not in ("backend", "checkpoint")}
    assert {k: settings_[k] for k in expected} == expected
    assert settings_["folds"] == {"point": [0, 1], "box": [0, 1]} and settings_["default_folds"] is None
    assert info["tracking"] == {"propagation": "classical", "refine": "segment"}
    assert "cpu" in info["devices"] and info["auth"] is True and info["max_upload_bytes"] == 2**20
    with RemoteBackend(srv.url, token=TOKEN_A, folds=1, tta=True) as b:
        d = b.describe()
        assert d["backend"] == "remote" and d["url"] == srv.url and d["kinds"] == ["point", "box"]
        assert d["default_folds"] == [1] and d["tta"] is True  # what this backend's requests run
        assert d["server_defaults"] == {"default_folds": None, "tta": False, "grow": True}
        t = b.tracker()
        assert (t.propagation, t.refine) == ("classical", "segment")  # resolved as the local tracker does
        from LesionLocatorLib.track.tracker import TrackingError

        with pytest.raises(TrackingError, match="propagation"):
            b.tracker(propagation="magic")
    with RemoteBackend(srv.url, token=TOKEN_A) as b:  # equal settings describe alike
        remote = {k: v for k, v in b.describe().items() if k in local.describe() and k not in ("checkpoint", "backend")}
        assert remote == {k: v for k, v in local.describe().items() if k in remote}
    spec = raw(srv, "GET", "/openapi.json").json()
    paths = spec["paths"]
    assert set(paths) == {"/v1/health", "/v1/version", "/v1/sessions", "/v1/sessions/{session_id}",
                          "/v1/sessions/{session_id}/image", "/v1/sessions/{session_id}/image/reuse",
                          "/v1/sessions/{session_id}/segment", "/v1/sessions/{session_id}/track",
                          "/v1/sessions/{session_id}/progress", "/v1/sessions/{session_id}/cancel"}
    seg = json.dumps(paths["/v1/sessions/{session_id}/segment"])
    assert MEDIA_TYPE in seg and "probabilities" in seg and "folds" in seg
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer" and spec["security"]
    assert "swagger" in raw(srv, "GET", "/docs").text.lower()


# ----------------------------------------------------------------------------------------
# the round trip, against the in-process backend
def test_round_trip_equals_in_process(srv, local):
    vol = ct(seed=1)
    ls = local.session()
    ls.set_image(vol)
    m = np.zeros(vol.shape, bool)
    m[14:22, 18:26, 16:24] = True
    labels = np.zeros(vol.shape, np.uint16)
    labels[5:12, 5:15, 5:12] = 7
    labels[20:30, 25:35, 20:30] = 70000 % 65536
    lps, ras = vol.voxel_to_world((18, 22, 20)), vol.voxel_to_world((12, 20, 15), ras=True)
    clicks = [
        dict(points={1: (18, 22, 20)}), dict(points={1: (17.4, 20.6, 19)}),
        dict(boxes={2: (10, 26, 12, 30, 10, 28)}),
        dict(points={3: (5, 5, 5)}, boxes={4: (0, 8, 30, 44, 0, 9)}),
        dict(points={300: [(18, 22, 20), (8, 10, 9)]}),  # several points of one lesion: masks united
        dict(points={5: (18, 22, 20)}, boxes={5: (10, 26, 12, 30, 10, 28)}),  # a box replaces its points
        dict(masks={7: m}), dict(masks={8: m}, boxes={8: (0, 8, 30, 44, 0, 9)}),  # a mask wins
        dict(points={9: lps}, space="lps"), dict(points={10: ras}, space="ras"),
        dict(prompts={11: [Point((18.0, 22.0, 20.0))], 70000: Box((10, 26, 12, 30, 10, 28))}),  # ids kept
        dict(prompts=labels),  # an instance label map: one mask prompt per id
    ]
    with RemoteBackend(srv.url, token=TOKEN_A) as backend:
        rs = backend.session()
        rs.set_image(vol)
        assert backend.uploads == 1
        masks = []
        for click in clicks:
            remote, here = rs.segment(**click), ls.segment(**click)
            assert_same(remote, here)
            assert backend.last_request_bytes < 4096, "a click must send < 4 KB"
            masks.append({k: v.full(vol.shape) for k, v in remote.lesions.items()})
        # the comparison means something: masks are neither empty nor the whole image, and follow the click
        assert all(0 < mk.sum() < mk.size / 2 for mk in masks[0].values())
        assert not np.array_equal(masks[0][1], masks[1][1])
        assert not np.array_equal(masks[4][300], masks[0][1])  # two points give more than one
        # probabilities on request: exact float32 on the lesion's box, as in-process
        remote = rs.segment(points={1: (18, 22, 20)}, return_probabilities=True)
        here = ls.segment(points={1: (18, 22, 20)}, return_probabilities=True)
        assert remote.lesions[1].bbox == here.lesions[1].bbox
        np.testing.assert_array_equal(remote.lesions[1].probability, here.lesions[1].probability)
        np.testing.assert_array_equal(remote.label_map(), here.label_map())
        # a bad prompt fails the same way on both sides, before anything is sent
        for bad in (dict(points={1: (99, 0, 0)}), dict(boxes={1: (5, 5, 0, 5, 0, 5)}), dict(points={0: (1, 1, 1)})):
            with pytest.raises(PromptError) as e_local:
                ls.segment(**bad)
            with pytest.raises(PromptError) as e_remote:
                rs.segment(**bad)
            assert str(e_local.value) == str(e_remote.value)
        key = backend._http.headers["X-LesionLocator-Client"]
        info = raw(srv, "GET", f"/v1/sessions/{rs.session_id}", client_key=key).json()
        assert info["uploads"] == 1 and info["requests"] >= len(clicks)
        sid = rs.session_id
    # closing the backend deletes its server session, and the model-side state of its image soon after
    assert raw(srv, "GET", f"/v1/sessions/{sid}", client_key=key).status_code == 404
    deadline = time.monotonic() + 30
    while any(k[0] == sid for k in list(srv.state.service._sessions)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(k[0] == sid for k in srv.state.service._sessions)


def test_settings_travel_with_every_request(srv, checkpoint):
    """folds and TTA are the request's: equal settings give equal masks; folds the server lacks are a 4xx."""
    vol = ct(seed=2)
    click = dict(points={1: (18, 22, 20)}, boxes={2: (10, 26, 12, 30, 10, 28)})
    for folds, tta, grow in [(None, True, True), ([0], False, False)]:
        here = open_backend(model=str(checkpoint), device="cpu", folds=folds, tta=tta, grow=grow).session()
        here.set_image(vol)
        with RemoteBackend(srv.url, token=TOKEN_A, folds=folds, tta=tta, grow=grow) as b:
            rs = b.session()
            rs.set_image(vol)
            assert_same(rs.segment(**click), here.segment(**click))
    # this server loaded fold 0 only (its default); fold 1 exists on disk, fold 5 does not
    for folds, word in [([1], r"loaded.*--folds"), ([0, 5], r"fold\(s\) \[5\] missing")]:
        with RemoteBackend(srv.url, token=TOKEN_A, folds=folds) as b:
            rs = b.session()
            rs.set_image(vol)
            with pytest.raises(RequestRejected, match=word) as ei:
                rs.segment(**click)
            assert ei.value.status == 422
    # a server that loads every fold runs any of them per request, exactly as in-process
    s = start(checkpoint, folds="all", warmup=False)
    try:
        for folds in ([1], [0, 1]):
            here = open_backend(model=str(checkpoint), device="cpu", folds=folds).session()
            here.set_image(vol)
            with RemoteBackend(s.url, folds=folds) as b:
                rs = b.session()
                rs.set_image(vol)
                assert_same(rs.segment(**click), here.segment(**click))
    finally:
        s.stop()


def test_progress_and_cancel_behave_as_in_process(srv, local):
    vol = ct(seed=3)
    ls = local.session()
    ls.set_image(vol)
    with RemoteBackend(srv.url, token=TOKEN_A) as b:
        rs = b.session()
        rs.set_image(vol)
        calls = {"local": [], "remote": []}
        for name, s in (("local", ls), ("remote", rs)):
            s.segment(points={4: (18, 22, 20), 2: (10, 10, 10)}, progress=lambda f, m, n=name: calls[n].append((f, m)))
        assert calls["local"] == calls["remote"] and calls["remote"][-1] == (1.0, "done")
        cancel = threading.Event()
        seen = []

        def progress(f, m):
            seen.append(m)
            cancel.set()  # cancelled during the first lesion: the second never runs

        for s in (ls, rs):
            cancel.clear()
            seen.clear()
            with pytest.raises(Cancelled):
                s.segment(points={1: (18, 22, 20), 2: (10, 10, 10)}, progress=progress, cancel=cancel)
            assert seen == ["lesion 1 (1/2)"]


def test_reupload_of_the_same_scan_is_skipped(srv):
    vol, other = ct(seed=2), ct(seed=3)
    with RemoteBackend(srv.url, token=TOKEN_A) as b:
        s = b.session()
        s.set_image(vol)
        h = s.image_hash
        assert b.last_request_bytes > 10_000 and b.last_upload["raw_mb_per_s"] > 0
        # same scan again (a copy, even): only a small reuse request travels
        s.set_image(Volume(vol.array.copy(), vol.spacing, vol.origin, vol.direction))
        assert s.image_hash == h and b.uploads == 1 and b.last_request_bytes < 1000
        s.set_image(other)
        s.set_image(vol)  # back to the first scan: still held by the session
        assert b.uploads == 2
        # another session of the same client reuses the upload too
        s2 = b.session()
        s2.set_image(vol)
        assert b.uploads == 2
        key = b._http.headers["X-LesionLocator-Client"]
        info = raw(srv, "GET", f"/v1/sessions/{s.session_id}", client_key=key).json()
        assert info["uploads"] == 2 and info["reuses"] == 2 and info["image"] == h
        changed = Volume(vol.array.copy(), vol.spacing, vol.origin, vol.direction)
        changed.array[0, 0, 0] += 1  # a changed voxel is another scan
        s.set_image(changed)
        assert b.uploads == 3
    # another client never reuses this client's upload (isolation): it must upload its own copy
    with RemoteBackend(srv.url, token=TOKEN_B) as b2:
        b2.session().set_image(vol)
        assert b2.uploads == 1


# ----------------------------------------------------------------------------------------
# bad inputs
def test_isolation_between_clients(srv):
    vol = ct(seed=4)
    sid = raw_session(srv, TOKEN_A, "alice-client-key", vol)
    r = raw(srv, "POST", f"/v1/sessions/{sid}/segment", TOKEN_A, "alice-client-key", json={"prompts": {"1": {"point": [5, 5, 5]}}})
    assert r.status_code == 200
    # other token, or same token from another client: the session does not exist for them
    for token, key in [(TOKEN_B, "alice-client-key"), (TOKEN_A, "mallory-client-key"), (TOKEN_B, "bob-client-key")]:
        for method, path, kw in [("GET", f"/v1/sessions/{sid}", {}),
                                 ("POST", f"/v1/sessions/{sid}/segment",
                                  {"json": {"prompts": {"1": {"point": [1, 1, 1]}}}}),
                                 ("POST", f"/v1/sessions/{sid}/image/reuse", {"json": {"hash": content_hash(vol)}}),
                                 ("PUT", f"/v1/sessions/{sid}/image", {"data": encode_volume(ct(seed=5))}),
                                 ("GET", f"/v1/sessions/{sid}/progress", {}),
                                 ("POST", f"/v1/sessions/{sid}/cancel", {}),
                                 ("DELETE", f"/v1/sessions/{sid}", {})]:
            r = raw(srv, method, path, token, key, **kw)
            assert r.status_code == 404, (method, path, token, key, r.text)
            assert r.json()["error"] == "unknown_session"
        # nor can they pick the victim's image by its hash in their own session
        own = raw_session(srv, token, key)
        r = raw(srv, "POST", f"/v1/sessions/{own}/image/reuse", token, key, json={"hash": content_hash(vol)})
        assert r.status_code == 404 and r.json()["error"] == "image_not_cached"
    # without a client key there is no identity at all (not one shared by every key-less client)
    r = raw(srv, "POST", "/v1/sessions", TOKEN_A, None)
    assert r.status_code == 400 and r.json()["error"] == "client_key_required"
    info = raw(srv, "GET", f"/v1/sessions/{sid}", TOKEN_A, "alice-client-key").json()
    assert info["uploads"] == 1 and info["requests"] == 1
    assert raw(srv, "DELETE", f"/v1/sessions/{sid}", TOKEN_A, "alice-client-key").status_code == 200
    assert raw(srv, "GET", f"/v1/sessions/{sid}", TOKEN_A, "alice-client-key").status_code == 404


def _header(data: bytes) -> tuple:
    hlen = struct.unpack_from("<I", data, 4)[0]
    return json.loads(data[8:8 + hlen]), data[8 + hlen:]


def _join(header: dict, rest: bytes) -> bytes:
    body = json.dumps(header).encode()
    return b"LLW2" + struct.pack("<I", len(body)) + body + rest


def test_bad_uploads(srv):
    sid = raw_session(srv)
    put = lambda data, **kw: raw(srv, "PUT", f"/v1/sessions/{sid}/image", data=data, **kw)  # noqa: E731
    good = encode_volume(ct(seed=6))
    # oversized: declared by Content-Length, and streamed without one (chunked)
    big = encode_volume(Volume(np.random.default_rng(0).integers(-1000, 1000, (40, 100, 200)).astype(np.int16)))
    assert len(big) > 2**20
    r = put(big)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    r = put(iter([big[i:i + 65536] for i in range(0, len(big), 65536)]))
    assert r.status_code == 413 and "limit" in r.json()["message"]
    # truncated, corrupt, garbage, empty, the old protocol's stream, a container of another kind
    header, rest = _header(good)
    for data, word in [(good[: len(good) // 2], "truncated"), (good[:-4], "truncated"), (b"", "truncated"),
                       (b"GIF89a" + b"\0" * 100, "magic"), (b"LLV1" + good[4:], "magic"),
                       (good[:-100] + bytes([good[-100] ^ 0xFF]) + good[-99:], "corrupt|hash|frame"),
                       (good[:8] + b"{" * 50 + good[58:], "JSON"),
                       (encode_request({"prompts": {}}), "expected a volume")]:
        r = put(data)
        assert r.status_code == 400, (word, r.text)
        assert r.json()["error"] == "bad_payload" and re.search(word, r.json()["message"]), r.json()
    geo = header["volume"]
    for key, val, word in [("dtype", "<c8", "voxel type"), ("dtype", "<i8", "voxel type"), ("shape", [36, 44], "shape"),
                           ("shape", [0, 44, 40], "shape"), ("spacing", [1, -1, 1], "geometry")]:
        r = put(_join(dict(header, volume=dict(geo, **{key: val})), rest))
        assert r.status_code == 400 and word in r.json()["message"], (key, r.text)
    # a declared volume larger than the cache budget is refused before allocating it
    huge = {"dtype": "<i2", "shape": [4000, 4000, 4000]}
    r = put(_join(dict(header, volume=dict(geo, **huge), arrays=[huge], raw_nbytes=2 * 4000**3), b""))
    assert r.status_code == 413
    # the client knows the limits from /version and stops early with a clear message
    with RemoteBackend(srv.url, token=TOKEN_A) as b:
        s = b.session()
        with pytest.raises(RequestRejected, match="upload limit of 1 MiB"):
            s.set_image(Volume(np.random.default_rng(0).integers(-1000, 1000, (40, 100, 200)).astype(np.int16)))
        assert s.image_hash is None and b.uploads == 0
    assert raw(srv, "GET", f"/v1/sessions/{sid}").json()["uploads"] == 0
    assert put(good).status_code == 200


def test_bad_requests(srv):
    vol = ct(seed=7)
    sid = raw_session(srv)
    post = lambda path, **kw: raw(srv, "POST", f"/v1/sessions/{sid}/{path}", **kw)  # noqa: E731
    r = post("segment", json={"prompts": {"1": {"point": [1, 1, 1]}}})
    assert r.status_code == 409 and r.json()["error"] == "no_image"
    for gone in ("undo", "results"):  # one undo: the client's; the server keeps no history
        assert raw(srv, "POST", f"/v1/sessions/{sid}/{gone}").status_code in (404, 405)
    raw(srv, "PUT", f"/v1/sessions/{sid}/image", data=encode_volume(vol))
    cases = [
        ({"prompts": {"1": {"point": [36, 5, 5]}}}, 422, "outside"),
        ({"prompts": {"1": {"point": [-1, 5, 5]}}}, 422, "outside"),
        ({"prompts": {"1": {"box": [0, 37, 0, 5, 0, 5]}}}, 422, "outside"),
        ({"prompts": {"1": {"box": [5, 5, 0, 5, 0, 5]}}}, 422, "empty"),
        ({"prompts": {"1": {"point_lps": [1e6, 0, 0]}}}, 422, "outside"),
        ({"prompts": {"1": {"box_ras": [[1e5, 0, 0], [1e5 + 1, 1, 1]]}}}, 422, ""),
        ({"prompts": {"0": {"point": [1, 1, 1]}}}, 422, "pattern"),
        ({"prompts": {"01": {"point": [1, 1, 1]}}}, 422, "pattern"),
        ({"prompts": {"4294967296": {"point": [1, 1, 1]}}}, 422, "2^31"),
        ({"prompts": {"1": {"point": ["a", 1, 1]}}}, 422, "numbers"),
        ({"prompts": {"1": {"box": [0.5, 1, 0, 1, 0, 1]}}}, 422, "integers"),
        ({"prompts": {"1": {"point": [1, 1]}}}, 422, "[z, y, x]"),
        ({"prompts": {"1": {"point": [1, 1, 1], "box": [0, 1, 0, 1, 0, 1]}}}, 422, "exactly one"),
        ({"prompts": {"1": {}}}, 422, "exactly one"),
        ({"prompts": {"1": []}}, 422, "empty"),
        ({"prompts": {"1": {"mask": {"bbox": [0, 2, 0, 2, 0, 2], "array": 0}}}}, 422, "mask"),  # no crop sent
        ({"prompts": {}}, 422, "prompts"),
        ({}, 422, "prompts"),
        ({"prompts": {"1": {"point": [1, 1, 1]}}, "evil": 1}, 422, "Extra inputs"),
        ({"prompts": {"1": {"point": [1, 1, 1]}}, "folds": [-1]}, 422, "folds"),
        ({"prompts": {"1": {"point": [1, 1, 1]}}, "tta": "yes"}, 422, "tta"),
        ({"prompts": {"1": {"point": [1, 1, 1]}}, "image": "0" * 64}, 409, "not held"),
    ]
    for body, status, word in cases:
        r = post("segment", json=body)
        assert r.status_code == status, (body, r.status_code, r.text[:300])
        assert word in r.json()["message"], (body, r.json())
    # NaN / Infinity are not JSON; a non-JSON body is a 422 with a message
    for data in [b'{"prompts": {"1": {"point": [NaN, 1, 1]}}}', b'{"prompts": {"1": {"point": [Infinity, 1, 1]}}}',
                 b"not json", b"", b"[]", b'{"prompts": {"1": {"point": [1, 1, 1]}}'[:-5], b"[" * 100_000]:
        r = post("segment", data=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (data[:40], r.text)
        assert r.json()["message"]
    # request bodies have their own cap (here the 1 MiB upload cap is lower): declared, and chunked
    huge = b'{"prompts": {"1": {"point": [1, 1, 1]}}, "pad": "' + b"x" * (2**20 + 10) + b'"}'
    r = post("segment", data=huge, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["message"]
    r = post("segment", data=iter([huge[i:i + 65536] for i in range(0, len(huge), 65536)]),
             headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
    r = raw(srv, "GET", "/v1/nowhere")
    assert r.status_code == 404 and r.json()["message"]
    r = raw(srv, "POST", "/v1/sessions/not-a-session/segment", json={"prompts": {"1": {"point": [1, 1, 1]}}})
    assert r.status_code == 404 and r.json()["error"] == "unknown_session"
    assert raw(srv, "GET", f"/v1/sessions/{sid}").json()["requests"] == 0  # none of it ran


def test_mask_prompts_in_the_container(srv, local):
    """Mask prompts travel as crops in the wire request container; malformed ones are refused with a 4xx."""
    vol = ct(seed=8)
    sid = raw_session(srv, vol=vol)
    send = lambda data: raw(srv, "POST", f"/v1/sessions/{sid}/segment", data=data,  # noqa: E731
                            headers={"Content-Type": MEDIA_TYPE})
    m = np.zeros(vol.shape, bool)
    m[10:20, 12:24, 14:22] = True
    arrays: list = []
    body = {"prompts": prompts_to_json({3: Mask(m)}, arrays)}
    r = send(encode_request(body, arrays))
    assert r.status_code == 200, r.text
    here = local.session()
    here.set_image(vol)
    got = decode_results(r.content).results[0]
    np.testing.assert_array_equal(got[3].full(vol.shape), here.segment(masks={3: m}).lesions[3].full(vol.shape))
    crop = arrays[0]
    bad = [
        (encode_request({"prompts": {"3": {"mask": {"bbox": [10, 20, 12, 24, 14, 22], "array": 1}}}}, arrays),
         422, "mask reference"),
        (encode_request({"prompts": {"3": {"mask": {"bbox": [10, 20, 12, 24, 14, 23], "array": 0}}}}, arrays),
         422, "does not fit"),
        (encode_request({"prompts": {"3": {"mask": {"bbox": [30, 40, 12, 24, 14, 22], "array": 0}}}}, arrays),
         422, "outside"),
        (encode_request({"prompts": {"3": {"mask": {"bbox": [10, 20, 12, 24, 14, 22], "array": 0}}}},
                        [np.zeros_like(crop)]), 422, "empty"),
        (encode("volume", [crop], {}), 400, "expected a request"),
        (encode("request", [crop], {"nope": 1}), 400, "JSON request"),
        (encode_request(body, arrays)[:-6], 400, "truncated"),
    ]
    for data, status, word in bad:
        r = send(data)
        assert r.status_code == status, (word, r.text)
        assert word in r.json()["message"], r.json()
    # a decompression bomb in a mask prompt: refused from its declared sizes, never inflated
    import zstandard as zstd

    frame = zstd.ZstdCompressor(level=19).compress(b"\xff" * (64 * 2**20))
    header = {"kind": "request", "protocol": 2, "request": body,
              "arrays": [{"dtype": "bits", "shape": list(crop.shape)}],
              "raw_nbytes": (crop.size + 7) // 8, "chunk_bytes": MIN_CHUNK_BYTES}
    r = send(_join(header, struct.pack("<I", len(frame)) + frame + struct.pack("<I", 0)))
    assert r.status_code == 400 and "declares" in r.json()["message"]
    big = dict(header, arrays=[{"dtype": "bits", "shape": [2**20, 2**20, 64]}], raw_nbytes=2**20 * 2**20 * 8)
    r = send(_join(big, b""))
    assert r.status_code == 413


def test_inference_crash_is_500_and_the_server_keeps_serving(srv):
    """An image the model cannot resample (1 voxel at 0.1 mm) makes inference fail inside the library."""
    with RemoteBackend(srv.url, token=TOKEN_A) as b:
        s = b.session()
        s.set_image(Volume(np.full((1, 1, 1), 5, np.int16), spacing=(0.1, 0.1, 0.1)))
        with pytest.raises(ServerInternalError) as ei:
            s.segment(points={1: (0, 0, 0)})
        assert ei.value.status == 500 and ei.value.code == "inference_failed"
        s.set_image(ct(seed=8))
        assert s.segment(points={1: (10, 10, 10)}).lesions[1].status in tuple(LesionStatus)


# ----------------------------------------------------------------------------------------
# sessions: expiry, eviction, memory bound
def test_session_store_expiry_quotas_and_budget():
    """Per-owner quotas: making room evicts only the requester's own data; when other owners fill the global
    limit the request is refused (ServerFull -> 503), never by evicting them (issue 14 #1)."""
    now = [0.0]
    store = SessionStore(max_sessions=3, idle_timeout_s=10, max_bytes=4000, clock=lambda: now[0],
                         max_sessions_per_owner=2, max_bytes_per_owner=2500)
    a, b, c = store.create("a"), store.create("b"), store.create("c")
    assert len({a.id, b.id, c.id}) == 3 and min(len(x.id) for x in (a, b, c)) >= 40
    with pytest.raises(SessionNotFound):
        store.get(a.id, "b")
    with pytest.raises(ServerFull):  # global limit reached because of others: nobody is evicted
        store.create("d")
    assert len(store) == 3 and store.evicted == 0
    a2 = store.create("a")  # global limit, but "a" has its own oldest session to give: only that one goes
    with pytest.raises(SessionNotFound):
        store.get(a.id, "a")
    store.get(b.id, "b"), store.get(c.id, "c")
    vol = Volume(np.zeros((10, 10, 10), np.int16))  # 2000 bytes
    store.add_image(a2, "h1", vol)
    store.add_image(b, "h2", vol)
    assert store.live_keys() == {(a2.id, "h1"), (b.id, "h2")}
    with pytest.raises(ServerFull):  # 6000 > 4000 because of a2 and b: c is refused, they keep their images
        store.add_image(c, "h3", vol)
    assert store.live_keys() == {(a2.id, "h1"), (b.id, "h2")}
    store.add_image(a2, "h4", vol)  # over a's quota (2500): a's own older image makes room
    assert store.live_keys() == {(a2.id, "h4"), (b.id, "h2")}
    with pytest.raises(CacheFull, match="per client"):
        store.add_image(c, "h5", Volume(np.zeros((20, 20, 20), np.int16)))
    # reservations (uploads in flight) count before anything is decoded
    b2 = store.create("b")  # at the global limit: b's own older session (and its image) goes
    assert store.live_keys() == {(a2.id, "h4")}
    rid = store.reserve(c, 1500)
    assert store.owner_bytes("c") == 1500
    with pytest.raises(ServerFull):
        store.reserve(c, 1000)  # c's quota allows it, the global budget (2000 + 1500 + 1000) does not
    store.release(rid)
    assert store.owner_bytes("c") == 0
    store.add_image(b2, "h2", vol)
    now[0] = 100  # idle past the timeout: images dropped at once
    held = store._sessions[b2.id]
    with pytest.raises(SessionNotFound):
        store.get(b2.id, "b")
    assert held.images == {} and len(store) == 0


def test_server_expires_idle_sessions_and_bounds_memory(checkpoint):
    s = start(checkpoint, session_ttl_s=2.0, warmup=False)
    try:
        vol_a, vol_b = ct(seed=10), ct(seed=11)  # ~0.12 MiB each
        b1 = RemoteBackend(s.url)
        s1 = b1.session()
        s1.set_image(vol_a)
        first = s1.segment(points={1: (10, 10, 10)})
        sid1 = s1.session_id
        time.sleep(3.0)
        key = b1._http.headers["X-LesionLocator-Client"]
        r = requests.get(f"{s.url}/v1/sessions/{sid1}", headers={"X-LesionLocator-Client": key}, timeout=10)
        assert r.status_code == 404
        # the client notices the lost session, re-creates it and re-uploads the image once; same answer
        again = s1.segment(points={1: (10, 10, 10)})
        assert s1.session_id != sid1 and b1.uploads == 2
        assert_same(again, first)
        b1.close()
    finally:
        s.stop()
    # memory budget (a long TTL here, so that only the budget acts): three 0.12 MiB scans of three clients
    # cannot all stay; the third client is refused (503 + Retry-After), the first two keep theirs (issue 14 #1)
    s = start(checkpoint, max_cache_mb=0.35, max_cache_mb_per_client=0.3, warmup=False)
    try:
        b1 = RemoteBackend(s.url)
        s1 = b1.session()
        s1.set_image(vol_a)
        others = [RemoteBackend(s.url) for _ in range(2)]
        others[0].session().set_image(vol_b)
        with pytest.raises(ServerInternalError, match="503.*other clients") as e:
            others[1].session().set_image(ct(seed=12))
        assert e.value.status == 503 and e.value.code == "server_full"
        assert s.state.store.total_bytes() <= 0.35 * 2**20 and s.state.store.evicted == 0
        # a click still works, without a re-upload: nobody evicted b1's scan
        assert s1.segment(points={1: (10, 10, 10)}).lesions[1] is not None and b1.uploads == 1
        with pytest.raises(RequestRejected, match="image cache for one client"):
            others[0].session().set_image(ct(shape=(40, 80, 80), seed=13))  # 0.49 MiB > 0.3 MiB per client
        # the same client's own older scan makes room for its new one
        o = others[0].session()
        o.set_image(ct(seed=14))
        assert s.state.store.evicted >= 1 and o.segment(points={1: (10, 10, 10)}).lesions[1] is not None
        # per-image sessions on the model side follow the store: evicted images are dropped there too
        s1.segment(points={1: (12, 10, 10)})
        assert set(s.state.service._sessions) <= s.state.store.live_keys() | {(s1.session_id, s1.image_hash)}
        for b in [b1, *others]:
            b.close()
    finally:
        s.stop()


# ----------------------------------------------------------------------------------------
# concurrency: several clients at once, one model thread
def test_concurrent_clients_get_their_own_results(srv, local):
    vols = [ct(seed=20 + i) for i in range(4)]
    clicks = [(10 + i, 15 + i, 12 + 2 * i) for i in range(4)]
    expected = []
    ls = local.session()
    for v, p in zip(vols, clicks):
        ls.set_image(v)
        expected.append(ls.segment(points={1: p}, boxes={2: (2, 12, 3, 20, 4, 30)}))

    def work(i):
        with RemoteBackend(srv.url, token=(TOKEN_A, TOKEN_B)[i % 2]) as b:
            s = b.session()
            s.set_image(vols[i])
            return [s.segment(points={1: clicks[i]}, boxes={2: (2, 12, 3, 20, 4, 30)}) for _ in range(3)]

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4), timeout=180))
    for exp, got in zip(expected, results):
        for r in got:
            assert_same(r, exp)
    assert len(srv.state.worker.thread_ids) == 1  # all model work happened on one persistent thread


# ----------------------------------------------------------------------------------------
# property-based fuzz of request bodies: the server agrees with the library's own parser
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                      st.floats(allow_nan=False, allow_infinity=False, width=32), st.text(max_size=8))
json_any = st.recursive(json_leaf, lambda ch: st.one_of(st.lists(ch, max_size=4),
                                                        st.dictionaries(st.text(max_size=6), ch, max_size=4)),
                        max_leaves=12)
coord = st.one_of(st.integers(-5, 50), st.floats(-5, 50, allow_nan=False), st.text(max_size=2), st.none())
prompt_entry = st.one_of(
    st.fixed_dictionaries({"point": st.lists(coord, min_size=2, max_size=4)}),
    st.fixed_dictionaries({"box": st.lists(coord, min_size=5, max_size=7)}),
    st.fixed_dictionaries({"point_lps": st.lists(coord, min_size=3, max_size=3)}),
    st.lists(st.fixed_dictionaries({"point": st.lists(st.integers(0, 30), min_size=3, max_size=3)}), max_size=3),
    st.dictionaries(st.sampled_from(["point", "box", "mask", "zz"]), json_any, max_size=2),
    json_any,
)
segment_body = st.one_of(
    json_any,
    st.fixed_dictionaries({"prompts": st.dictionaries(st.one_of(st.integers(-3, 4).map(str), st.text(max_size=3)),
                                                      prompt_entry, max_size=3)},
                          optional={"tta": st.booleans(), "x": json_any}),
)
FUZZ_VOL = ct(seed=30)


def library_accepts(body) -> bool:
    """The oracle: the request schema, then the library's one prompt parser and validation."""
    try:
        req = SegmentRequest.model_validate(body)
        for lid, entry in req.prompts.items():
            resolve_prompts(FUZZ_VOL, parse_prompts({lid: entry}, FUZZ_VOL, []), None, None, None, "voxel")
    except (ValueError, PromptError):
        return False
    return True


@pytest.fixture(scope="module")
def fuzz_session(srv):
    return raw_session(srv, TOKEN_A, "fuzzer-client-key", FUZZ_VOL)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=segment_body)
def test_fuzz_segment_bodies(srv, fuzz_session, body):
    r = raw(srv, "POST", f"/v1/sessions/{fuzz_session}/segment", TOKEN_A, "fuzzer-client-key", json=body)
    assert r.status_code < 500, r.text
    assert (r.status_code == 200) == library_accepts(body), (body, r.status_code, r.text[:300])
    if r.status_code == 200:
        assert set(decode_results(r.content).results[0]) == {int(k) for k in body["prompts"]}
    else:
        assert r.json()["message"]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=400), cut=st.integers(0, 2000),
       path=st.sampled_from(["image", "image/reuse", "segment", "track"]))
def test_fuzz_binary_and_other_endpoints(srv, fuzz_session, junk, cut, path):
    good = encode_volume(ct(shape=(6, 7, 8)))
    method = "PUT" if path == "image" else "POST"
    for data in (junk, good[:cut] + junk):
        if data == good:
            continue
        for ctype in ("application/json", MEDIA_TYPE):
            r = raw(srv, method, f"/v1/sessions/{fuzz_session}/{path}", TOKEN_A, "fuzzer-client-key", data=data,
                    headers={"Content-Type": ctype})
            assert r.status_code < 500, r.text
            assert r.status_code != 200, r.text
            assert r.json()["message"]
    assert raw(srv, "GET", "/v1/health").status_code == 200


# ----------------------------------------------------------------------------------------
# tracking through the server equals in-process tracking
def test_track_round_trip_equals_in_process(srv, local):
    base, fu1, fu2 = lung_ct(1), lung_ct(2, 2), lung_ct(3, 4)
    m = np.zeros(base.shape, bool)
    m[10:20, 18:30, 16:28] = True
    with RemoteBackend(srv.url, token=TOKEN_A) as b:
        here, there = local.tracker(), b.tracker()
        for t in (here, there):
            t.set_images(base, [fu1, fu2])
        for kw in (dict(points={1: (15, 24, 22)}), dict(masks={4: m}, boxes={300: (8, 22, 14, 34, 12, 32)}),
                   dict(points={1: (15, 24, 22)}, from_baseline=True)):
            exp, got = here.track(**kw), there.track(**kw)
            assert len(got.followups) == 2
            for g, e in zip(got.timepoints, exp.timepoints):
                assert_same(g, e)
            assert got.report().to_dict() == exp.report().to_dict()
        assert any(les.found for les in got.followups[0].lesions.values())
        # progress starts and ends as in-process; a cancel raises Cancelled on both sides
        seen = {"local": [], "remote": []}
        for name, t in (("local", here), ("remote", there)):
            t.track(points={1: (15, 24, 22)}, progress=lambda f, m, n=name: seen[n].append((f, m)))
            cancel = threading.Event()
            cancel.set()
            with pytest.raises(Cancelled):
                t.track(points={1: (15, 24, 22)}, cancel=cancel)
        assert seen["local"][0] == seen["remote"][0] and seen["local"][-1] == seen["remote"][-1] == (1.0, "done")
        # a scan of another modality / field of view is refused at set_images, with the tracker's message
        from LesionLocatorLib.track.tracker import TrackingError

        other = Volume(np.full((30, 48, 44), 100, np.int16), spacing=(2.0, 1.0, 1.0))
        for t in (here, there):
            with pytest.raises(TrackingError, match="same modality"):
                t.set_images(base, [other])
            with pytest.raises(TrackingError, match="non-empty list"):
                t.set_images(base, [])
        # and by the server itself, for clients that skip the check
        raw(srv, "PUT", f"/v1/sessions/{there.session_id}/image", client_key=b._http.headers["X-LesionLocator-Client"],
            data=encode_volume(other))
        r = raw(srv, "POST", f"/v1/sessions/{there.session_id}/track", client_key=b._http.headers[
            "X-LesionLocator-Client"], json={"baseline": content_hash(base), "followups": [content_hash(other)],
                                             "prompts": {"1": {"point": [15, 24, 22]}}})
        assert r.status_code == 422 and "same modality" in r.json()["message"]
        sid = there.session_id
        there.close()
        key = b._http.headers["X-LesionLocator-Client"]
        assert raw(srv, "GET", f"/v1/sessions/{sid}", client_key=key).status_code == 404


def test_bad_track_requests(srv):
    base, fu = lung_ct(4), lung_ct(5, 1)
    sid = raw_session(srv, TOKEN_A, "tracker-client-key", base)
    raw(srv, "PUT", f"/v1/sessions/{sid}/image", TOKEN_A, "tracker-client-key", data=encode_volume(fu))
    body = {"baseline": content_hash(base), "followups": [content_hash(fu)], "prompts": {"1": {"point": [5, 5, 5]}}}
    post = lambda b: raw(srv, "POST", f"/v1/sessions/{sid}/track", TOKEN_A, "tracker-client-key", json=b)  # noqa: E731
    for bad, status in [(dict(body, followups=[]), 422), (dict(body, use_results=True), 422),
                        ({k: v for k, v in body.items() if k != "prompts"}, 422), (dict(body, baseline="x"), 422),
                        (dict(body, followups=["0" * 64]), 409), (dict(body, propagation="magic"), 422),
                        (dict(body, prompts={"1": {"point": [99, 5, 5]}}), 422),
                        (dict(body, grow=False), 422)]:  # this server's tracker grows; it says so, not ignores it
        r = post(bad)
        assert r.status_code == status, (bad, r.text)
        assert r.json()["message"]
    assert raw(srv, "GET", f"/v1/sessions/{sid}", TOKEN_A, "tracker-client-key").json()["requests"] == 0


def test_upload_deadline_in_all(checkpoint):
    """An upload that never stalls and whose rate check is off still ends at the overall deadline (408), and its
    slot is free at once for the next upload."""
    s = start(checkpoint, upload_deadline_s=1.0, upload_idle_timeout_s=5.0, upload_min_rate_kbps=0.001,
              warmup=False)
    key = {"X-LesionLocator-Client": "deadline-client-key"}
    try:
        sid = requests.post(f"{s.url}/v1/sessions", headers=key, timeout=10).json()["session_id"]
        data = encode_volume(ct(seed=51))

        def body():  # bounded: 12 pieces 0.25 s apart (3 s), each well inside the idle timeout
            step = len(data) // 12 + 1
            for i in range(0, len(data), step):
                yield data[i:i + step]
                time.sleep(0.25)

        t0 = time.perf_counter()
        r = requests.put(f"{s.url}/v1/sessions/{sid}/image", data=body(), headers=key, timeout=10)
        assert r.status_code == 408 and r.json()["error"] == "upload_too_slow", r.text
        assert "longer than 1 s" in r.json()["message"]
        assert time.perf_counter() - t0 < 8
        assert requests.put(f"{s.url}/v1/sessions/{sid}/image", data=data, headers=key, timeout=10).status_code == 200
    finally:
        s.stop()


def test_stalled_upload_is_dropped(checkpoint):
    """A client that stops sending mid-upload gets a 408 and frees its upload slot."""
    s = start(checkpoint, upload_idle_timeout_s=0.5, warmup=False)
    key = {"X-LesionLocator-Client": "stalled-client-key"}
    try:
        sid = requests.post(f"{s.url}/v1/sessions", headers=key, timeout=10).json()["session_id"]
        data = encode_volume(ct(seed=50))
        sent = threading.Event()

        def body():  # bounded: two pieces with a pause longer than the idle timeout in between
            yield data[:100]
            sent.set()
            time.sleep(2.0)
            yield data[100:]

        r = requests.put(f"{s.url}/v1/sessions/{sid}/image", data=body(), headers=key, timeout=10)
        assert r.status_code == 408 and r.json()["error"] == "upload_stalled"
        assert sent.is_set()
        assert requests.get(f"{s.url}/v1/sessions/{sid}", headers=key, timeout=10).json()["uploads"] == 0
        assert requests.put(f"{s.url}/v1/sessions/{sid}/image", data=data, headers=key, timeout=10).status_code == 200
    finally:
        s.stop()
