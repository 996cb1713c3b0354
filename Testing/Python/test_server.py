"""The server on loopback, with a tiny published-layout checkpoint and the real LesionSegmenter.

The uvicorn servers here run in a thread of the test process (the real separate-process server
is exercised in test_client.py).  Every loop is bounded, every address is 127.0.0.1.
"""
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

from LesionLocatorLib.serve.client import (
    AuthenticationError,
    LesionLocatorClient,
    RequestRejected,
    SessionLost,
    wait_for_server,
)
from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.segment.segmenter import LesionSegmenter
from LesionLocatorLib.model.tiny_model import write_random_checkpoint
from LesionLocatorLib.serve.server import (
    ServerConfig,
    ServerConfigError,
    add_arguments,
    check_config,
    config_from_args,
    create_app,
    run,
)
from LesionLocatorLib.serve.sessions import SessionNotFound, SessionStore
from LesionLocatorLib.serve.wire import (
    MASKS_MEDIA_TYPE,
    VOLUME_MEDIA_TYPE,
    content_hash,
    decode_masks,
    encode_mask_prompt,
    encode_volume,
)

from conftest import lung_ct

TOKEN_A = "token-A-0123456789abcdef"
TOKEN_B = "token-B-0123456789abcdef"


# ----------------------------------------------------------------------------------------
# fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight package in the published layout (LesionLocatorCheckpoint/LesionLocatorSeg/
    {point,bbox}_optimized): patch 32^3, features (2, 4, 8), fold 0; heads balanced so masks respond to prompts."""
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), patch_size=(32, 32, 32), spacing=(1.0, 1.0, 1.0),
                                   features_per_stage=(2, 4, 8), n_blocks_per_stage=(1, 1, 1), seed=0)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The in-process segmenter every server answer is compared with."""
    return LesionSegmenter.from_checkpoint(checkpoint, prompt_type=["point", "box"], device="cpu", folds=(0,))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn in a daemon thread on 127.0.0.1 (stopped by the fixture)."""

    def __init__(self, cfg: ServerConfig):
        import uvicorn

        self.app = create_app(cfg)
        self.state = self.app.state
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=cfg.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for_server(self.url, timeout_s=60, token=cfg.tokens[0] if cfg.tokens else None)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


def start(checkpoint, **kw) -> ThreadServer:
    cfg = ServerConfig(checkpoint=str(checkpoint), device="cpu", port=free_port(), **kw)
    return ThreadServer(cfg)


@pytest.fixture(scope="module")
def srv(checkpoint):
    """A server configured with two client tokens (as on a public address) but bound to loopback."""
    s = start(checkpoint, tokens=(TOKEN_A, TOKEN_B), max_upload_mb=1.0)
    yield s
    s.stop()


def ct(shape=(36, 44, 40), seed=0, dtype=np.int16, spacing=(1.5, 0.9, 0.9)) -> Volume:
    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 120, size=shape)
    zz, yy, xx = np.indices(shape)
    blob = ((zz - shape[0] / 2) ** 2 / 25 + (yy - shape[1] / 2) ** 2 / 40 + (xx - shape[2] / 2) ** 2 / 30) < 1
    arr[blob] += 300
    return Volume(arr.astype(dtype), spacing=spacing, origin=(10.0, -20.0, 5.0))


def full(res):
    return {k: v.full(res.shape) for k, v in res.lesions.items()}


def assert_same(remote, local):
    assert set(remote.lesions) == set(local.lesions)
    for lid, les in local.lesions.items():
        r = remote.lesions[lid]
        assert r.status == les.status
        np.testing.assert_array_equal(r.full(local.shape), les.full(local.shape))


def raw(srv, method, path, token=TOKEN_A, client_key="k1", **kw):
    headers = kw.pop("headers", {})
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    if client_key is not None:
        headers["X-LesionLocator-Client"] = client_key
    return requests.request(method, srv.url + path, headers=headers, timeout=30, **kw)


def raw_session(srv, token=TOKEN_A, client_key="k1", vol=None):
    sid = raw(srv, "POST", "/v1/sessions", token, client_key).json()["session_id"]
    if vol is not None:
        r = raw(srv, "PUT", f"/v1/sessions/{sid}/image", token, client_key, data=encode_volume(vol),
                headers={"Content-Type": VOLUME_MEDIA_TYPE})
        assert r.status_code == 200, r.text
    return sid


# ----------------------------------------------------------------------------------------
# configuration
def test_public_address_needs_a_token(checkpoint, tmp_path):
    with pytest.raises(ServerConfigError, match="without a token"):
        check_config(ServerConfig(checkpoint=str(checkpoint), host="0.0.0.0"))
    with pytest.raises(ServerConfigError, match="at least 16"):
        check_config(ServerConfig(checkpoint=str(checkpoint), host="0.0.0.0", tokens=("short",)))
    check_config(ServerConfig(checkpoint=str(checkpoint), host="0.0.0.0", tokens=(TOKEN_A,)))  # accepted
    check_config(ServerConfig(checkpoint=str(checkpoint), host="::1"))
    with pytest.raises(ServerConfigError, match="go together"):
        check_config(ServerConfig(checkpoint=str(checkpoint), tls_cert=str(tmp_path / "c.pem")))
    with pytest.raises(ServerConfigError, match="not found"):
        check_config(ServerConfig(checkpoint=str(checkpoint), tls_cert=str(tmp_path / "c.pem"),
                                  tls_key=str(tmp_path / "k.pem")))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    # run() refuses before binding anything
    assert run(parser.parse_args(["-m", str(checkpoint), "--host", "0.0.0.0", "--port", "1"])) == 2
    tf = tmp_path / "tokens"
    tf.write_text(f"# clients\n{TOKEN_A}\n\n{TOKEN_B}\n")
    cfg = config_from_args(parser.parse_args(["-m", str(checkpoint), "--token-file", str(tf), "--folds", "0,1"]))
    assert cfg.tokens == (TOKEN_A, TOKEN_B) and cfg.folds == (0, 1)
    (tmp_path / "empty").write_text("# nothing\n")
    with pytest.raises(ServerConfigError, match="no token"):
        config_from_args(parser.parse_args(["-m", str(checkpoint), "--token-file", str(tmp_path / "empty")]))


def test_run_fails_cleanly_before_binding(checkpoint, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    port = str(free_port())
    assert run(parser.parse_args(["-m", str(tmp_path / "missing"), "--port", port])) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty_dir").mkdir()
    assert run(parser.parse_args(["-m", str(tmp_path / "empty_dir"), "--port", port])) == 2
    assert "no segmentation model" in capsys.readouterr().err
    from LesionLocatorLib.model.bundled import BundledModelMissing, default_checkpoint

    try:
        default_checkpoint()
    except BundledModelMissing:  # without -m the bundled model is served; absent, that is a clear error
        assert run(parser.parse_args(["--port", port])) == 2
        assert "no checkpoint given" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert run(parser.parse_args(["-m", str(checkpoint), "--device", "cuda", "--port", port])) == 2
        assert "CUDA" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# auth, version, OpenAPI
def test_every_request_needs_the_token(srv):
    for method, path in [("GET", "/v1/health"), ("GET", "/v1/version"), ("POST", "/v1/sessions"),
                         ("GET", "/openapi.json"), ("GET", "/docs"), ("POST", "/v1/sessions/x/segment")]:
        for token in (None, "wrong-token-0123456789", TOKEN_A[:-1], TOKEN_A + "x", ""):
            r = raw(srv, method, path, token=token)
            assert r.status_code == 401, (method, path, token)
            assert r.json()["error"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
    r = raw(srv, "GET", "/v1/health", headers={"Authorization": f"Basic {TOKEN_A}"}, token=None)
    assert r.status_code == 401
    assert raw(srv, "GET", "/v1/health").status_code == 200
    assert raw(srv, "GET", "/v1/health", token=TOKEN_B).status_code == 200
    with pytest.raises(AuthenticationError, match="401"):
        LesionLocatorClient(srv.url, token="wrong-token-0123456789")
    with pytest.raises(AuthenticationError):
        LesionLocatorClient(srv.url)


def test_version_capabilities_and_openapi(srv):
    info = raw(srv, "GET", "/v1/version").json()
    assert info["protocol"] == 1 and info["server"] == "lesionlocator"
    assert set(info["prompt_types"]) == {"point", "box", "mask"}
    assert info["device"] == "cpu" and "cpu" in info["devices"]
    assert info["models"]["point"].startswith("point_optimized@")
    assert info["models"]["box"].startswith("bbox_optimized@")
    assert info["auth"] is True and info["max_upload_bytes"] == 2**20
    spec = raw(srv, "GET", "/openapi.json").json()
    paths = spec["paths"]
    for p in ["/v1/health", "/v1/version", "/v1/sessions", "/v1/sessions/{session_id}",
              "/v1/sessions/{session_id}/image", "/v1/sessions/{session_id}/image/reuse",
              "/v1/sessions/{session_id}/segment", "/v1/sessions/{session_id}/track",
              "/v1/sessions/{session_id}/undo"]:
        assert p in paths, p
    assert VOLUME_MEDIA_TYPE in json.dumps(paths["/v1/sessions/{session_id}/image"])
    assert MASKS_MEDIA_TYPE in json.dumps(paths["/v1/sessions/{session_id}/segment"])
    assert "SegmentRequest" in spec["components"]["schemas"]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer" and spec["security"]


# ----------------------------------------------------------------------------------------
# the round trip, against the in-process segmenter
def test_round_trip_equals_in_process(srv, reference):
    vol = ct(seed=1)
    reference.set_image(vol)
    with LesionLocatorClient(srv.url, token=TOKEN_A) as c:
        c.set_image(vol)
        assert c.uploads == 1
        clicks = [dict(points={1: (18, 22, 20)}), dict(points={1: (17.4, 20.6, 19)}),
                  dict(boxes={2: (10, 26, 12, 30, 10, 28)}),
                  dict(points={3: (5, 5, 5)}, boxes={4: (0, 8, 30, 44, 0, 9)})]
        masks = []
        for click in clicks:
            remote = c.segment(**click)
            local = reference.segment(**click)
            assert_same(remote, local)
            assert c.last_request_bytes < 4096, "a click must send < 4 KB"
            masks.append({k: v.full(vol.shape) for k, v in remote.lesions.items()})
        # the comparison means something: masks are neither empty nor the whole image, and follow the click
        assert all(0 < m.sum() < m.size / 2 for m in masks[0].values())
        assert not np.array_equal(masks[0][1], masks[1][1])
        # the pasted state is the union of all answers, like merging the in-process results
        assert sorted(c.lesions) == [1, 2, 3, 4]
        assert any(not les.empty for les in c.lesions.values())
        # probabilities on request: exact float32 on the lesion's box, as in-process
        remote = c.segment(points={1: (18, 22, 20)}, return_probabilities=True)
        local = reference.segment(points={1: (18, 22, 20)}, return_probabilities=True)
        assert remote.lesions[1].bbox == local.lesions[1].bbox
        np.testing.assert_array_equal(remote.lesions[1].probability, local.lesions[1].probability)
        np.testing.assert_array_equal(remote.label_map(), local.label_map())
        # world-coordinate prompts, converted on the server with the uploaded geometry
        lps = vol.voxel_to_world((18, 22, 20))
        assert_same(c.segment(points={5: lps}, space="lps"), reference.segment(points={5: lps}, space="lps"))
        ras = vol.voxel_to_world((12, 20, 15), ras=True)
        assert_same(c.segment(points={6: ras}, space="ras"), reference.segment(points={6: ras}, space="ras"))
        # a mask prompt travels as a packed crop
        m = np.zeros(vol.shape, bool)
        m[14:22, 18:26, 16:24] = True
        assert_same(c.segment(masks={7: m}), reference.segment(masks={7: m}))
        # the reply holds only the changed lesion; it is pasted over the others
        before = {k: v for k, v in c.lesions.items() if k != 1}
        r = c.segment(points={1: (20, 22, 20)})
        assert list(r.lesions) == [1]
        assert c.last_response_bytes < 4096
        for k, v in before.items():
            assert c.lesions[k] is v
        np.testing.assert_array_equal(c.lesions[1].full(vol.shape),
                                      reference.segment(points={1: (20, 22, 20)}).lesions[1].full(vol.shape))

        # undo twice: lesion 1 goes back to its previous click (18, 22, 20), then the mask lesion 7 disappears
        u = c.undo()
        assert list(u.lesions) == [1]
        np.testing.assert_array_equal(c.lesions[1].full(vol.shape),
                                      reference.segment(points={1: (18, 22, 20)}).lesions[1].full(vol.shape))
        u = c.undo()
        assert u.lesions[7].status == "removed" and 7 not in c.lesions
        # the server's state and the client's pasted state agree
        client_map = c.label_map()
        server_state = c.fetch_results()
        np.testing.assert_array_equal(server_state.label_map(), client_map)
        key = c._http.headers["X-LesionLocator-Client"]
        info = raw(srv, "GET", f"/v1/sessions/{c.session_id}", client_key=key).json()
        assert info["uploads"] == 1 and info["lesions"] == [1, 2, 3, 4, 5, 6]


def test_reupload_of_the_same_scan_is_skipped(srv):
    vol, other = ct(seed=2), ct(seed=3)
    with LesionLocatorClient(srv.url, token=TOKEN_A) as c:
        h = c.set_image(vol)
        first = c.last_request_bytes
        assert first > 10_000
        # same scan again (a copy, even): only a small reuse request travels
        assert c.set_image(Volume(vol.array.copy(), vol.spacing, vol.origin, vol.direction)) == h
        assert c.uploads == 1 and c.last_request_bytes < 1000
        c.set_image(other)
        c.set_image(vol)  # back to the first scan: still held by the session
        assert c.uploads == 2
        key = c._http.headers["X-LesionLocator-Client"]
        info = raw(srv, "GET", f"/v1/sessions/{c.session_id}", client_key=key).json()
        assert info["uploads"] == 2 and info["reuses"] == 2 and info["image"] == h
        # a changed voxel is another scan
        changed = Volume(vol.array.copy(), vol.spacing, vol.origin, vol.direction)
        changed.array[0, 0, 0] += 1
        c.set_image(changed)
        assert c.uploads == 3
    # another client never reuses this client's upload (isolation): it must upload its own copy
    with LesionLocatorClient(srv.url, token=TOKEN_B) as c2:
        c2.set_image(vol)
        assert c2.uploads == 1


# ----------------------------------------------------------------------------------------
# bad inputs
def test_isolation_between_clients(srv):
    vol = ct(seed=4)
    sid = raw_session(srv, TOKEN_A, "alice", vol)
    r = raw(srv, "POST", f"/v1/sessions/{sid}/segment", TOKEN_A, "alice", json={"prompts": {"1": {"point": [5, 5, 5]}}})
    assert r.status_code == 200
    # other token, or same token from another client: the session does not exist for them
    for token, key in [(TOKEN_B, "alice"), (TOKEN_A, "mallory"), (TOKEN_B, None)]:
        for method, path, kw in [("GET", f"/v1/sessions/{sid}", {}),
                                 ("GET", f"/v1/sessions/{sid}/results", {}),
                                 ("POST", f"/v1/sessions/{sid}/segment",
                                  {"json": {"prompts": {"1": {"point": [1, 1, 1]}}}}),
                                 ("POST", f"/v1/sessions/{sid}/undo", {}),
                                 ("POST", f"/v1/sessions/{sid}/image/reuse", {"json": {"hash": content_hash(vol)}}),
                                 ("PUT", f"/v1/sessions/{sid}/image", {"data": encode_volume(ct(seed=5))}),
                                 ("DELETE", f"/v1/sessions/{sid}", {})]:
            r = raw(srv, method, path, token, key, **kw)
            assert r.status_code == 404, (method, path, token, key, r.text)
            assert r.json()["error"] == "unknown_session"
        # nor can they pick the victim's image by its hash in their own session
        own = raw_session(srv, token, key)
        r = raw(srv, "POST", f"/v1/sessions/{own}/image/reuse", token, key, json={"hash": content_hash(vol)})
        assert r.status_code == 404 and r.json()["error"] == "image_not_cached"
    # the owner's session is intact: still one result, one history entry
    info = raw(srv, "GET", f"/v1/sessions/{sid}", TOKEN_A, "alice").json()
    assert info["lesions"] == [1] and info["history"] == 1 and info["uploads"] == 1
    assert raw(srv, "DELETE", f"/v1/sessions/{sid}", TOKEN_A, "alice").status_code == 200
    assert raw(srv, "GET", f"/v1/sessions/{sid}", TOKEN_A, "alice").status_code == 404


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
    # truncated, corrupt, garbage, empty
    for data, word in [(good[: len(good) // 2], "truncated"), (good[:-4], "truncated"), (b"", "truncated"),
                       (b"GIF89a" + b"\0" * 100, "magic"),
                       (good[:-100] + bytes([good[-100] ^ 0xFF]) + good[-99:], "corrupt|hash|frame"),
                       (good[:8] + b"{" * 50 + good[58:], "header")]:
        r = put(data)
        assert r.status_code == 400, (word, r.text)
        body = r.json()
        assert body["error"] == "bad_payload"
        assert re.search(word, body["message"]), body["message"]
    # wrong dtype / shape in an otherwise well-formed stream
    hlen = struct.unpack_from("<I", good, 4)[0]
    header = json.loads(good[8:8 + hlen])
    for key, val, word in [("dtype", "<c8", "voxel type"), ("dtype", "<i8", "voxel type"), ("shape", [36, 44], "shape"),
                           ("shape", [0, 44, 40], "shape"), ("raw_nbytes", 12, "raw_nbytes"),
                           ("spacing", [1, -1, 1], "geometry")]:
        h = json.dumps(dict(header, **{key: val})).encode()
        r = put(b"LLV1" + struct.pack("<I", len(h)) + h + good[8 + hlen:])
        assert r.status_code == 400 and word in r.json()["message"], (key, r.text)
    # a declared volume larger than the cache budget is refused before allocating it
    h = json.dumps(dict(header, shape=[4000, 4000, 4000], raw_nbytes=2 * 4000**3)).encode()
    r = put(b"LLV1" + struct.pack("<I", len(h)) + h)
    assert r.status_code == 413
    # the client knows the limits from the capabilities and stops early with a clear message
    with LesionLocatorClient(srv.url, token=TOKEN_A) as c:
        with pytest.raises(RequestRejected, match="upload limit of 1 MiB"):
            c.set_image(Volume(np.random.default_rng(0).integers(-1000, 1000, (40, 100, 200)).astype(np.int16)))
        assert c.image is None and c.uploads == 0
    # after all that the session has no image, and a good upload still works
    assert raw(srv, "GET", f"/v1/sessions/{sid}").json()["uploads"] == 0
    assert put(good).status_code == 200


def test_bad_requests(srv):
    vol = ct(seed=7)
    sid = raw_session(srv)
    post = lambda path, **kw: raw(srv, "POST", f"/v1/sessions/{sid}/{path}", **kw)  # noqa: E731
    r = post("segment", json={"prompts": {"1": {"point": [1, 1, 1]}}})
    assert r.status_code == 409 and r.json()["error"] == "no_image"
    r = post("undo")
    assert r.status_code == 409
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
        ({"prompts": {"1": {"point": ["1", 1, 1]}}}, 422, "valid number"),
        ({"prompts": {"1": {"box": [0.0, 1, 0, 1, 0, 1]}}}, 422, "valid integer"),
        ({"prompts": {"-3": {"point": [1, 1, 1]}}}, 422, ""),
        ({"prompts": {"x": {"point": [1, 1, 1]}}}, 422, ""),
        ({"prompts": {"1": {"point": [1, 1]}}}, 422, ""),
        ({"prompts": {"1": {"point": [1, 1, "a"]}}}, 422, ""),
        ({"prompts": {"1": {"point": [1, 1, 1], "box": [0, 1, 0, 1, 0, 1]}}}, 422, "exactly one"),
        ({"prompts": {"1": {}}}, 422, "exactly one"),
        ({"prompts": {}}, 422, ""),
        ({}, 422, "prompts"),
        ({"prompts": {"1": {"point": [1, 1, 1]}}, "evil": 1}, 422, "Extra inputs"),
        ({"prompts": {"1": {"point": [1, 1, 1]}}, "image": "0" * 64}, 409, "not held"),
        ({"prompts": {"1": {"mask": {"bbox": [0, 2, 0, 2, 0, 2], "data": "!!"}}}}, 422, "base64"),
        ({"prompts": {"1": {"mask": encode_mask_prompt(np.ones((40, 44, 40), bool))}}}, 422, "outside"),
    ]
    for body, status, word in cases:
        r = post("segment", json=body)
        assert r.status_code == status, (body, r.status_code, r.text[:300])
        assert word in r.json()["message"], (body, r.json())
    # NaN / Infinity are not JSON; a non-JSON body is a 422 with a message
    for data in [b'{"prompts": {"1": {"point": [NaN, 1, 1]}}}', b'{"prompts": {"1": {"point": [Infinity, 1, 1]}}}',
                 b"not json", b"", b"[]", b'{"prompts": {"1": {"point": [1, 1, 1]}}'[:-5]]:
        r = post("segment", data=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (data, r.text)
        assert r.json()["message"]
    # JSON bodies have their own cap (here the 1 MiB upload cap is lower): declared, and chunked
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
    # none of it changed the session
    assert raw(srv, "GET", f"/v1/sessions/{sid}").json()["history"] == 0


def test_inference_crash_is_500_and_the_server_keeps_serving(srv):
    """An image the model cannot resample (1 voxel at 0.1 mm) makes inference fail inside the segmenter."""
    with LesionLocatorClient(srv.url, token=TOKEN_A) as c:
        c.set_image(Volume(np.full((1, 1, 1), 5, np.int16), spacing=(0.1, 0.1, 0.1)))
        from LesionLocatorLib.serve.client import ServerInternalError

        with pytest.raises(ServerInternalError, match="500.*too small") as ei:
            c.segment(points={1: (0, 0, 0)})
        assert ei.value.status == 500 and ei.value.code == "inference_failed"
        assert c.lesions == {}
        c.set_image(ct(seed=8))
        assert c.segment(points={1: (10, 10, 10)}).lesions[1].status in ("found", "not found")


# ----------------------------------------------------------------------------------------
# sessions: expiry, eviction, memory bound
def test_session_store_expiry_eviction_and_budget():
    now = [0.0]
    store = SessionStore(max_sessions=3, idle_timeout_s=10, max_bytes=3000, clock=lambda: now[0])
    a, b, c = (store.create(o) for o in "abc")
    assert len({a.id, b.id, c.id}) == 3 and min(len(x.id) for x in (a, b, c)) >= 40
    with pytest.raises(SessionNotFound):
        store.get(a.id, "b")
    now[0] = 5
    store.get(a.id, "a")  # touch a: b is now the least recently used
    d = store.create("d")
    with pytest.raises(SessionNotFound):
        store.get(b.id, "b")
    assert store.evicted == 1
    vol = Volume(np.zeros((10, 10, 10), np.int16))  # 2000 bytes
    store.add_image(a, "h1", vol)
    store.add_image(c, "h2", vol)  # over budget: a (older) is evicted
    with pytest.raises(SessionNotFound):
        store.get(a.id, "a")
    assert store.total_bytes() <= 3000
    with pytest.raises(Exception, match="cache budget"):
        store.add_image(c, "h3", Volume(np.zeros((20, 20, 20), np.int16)))
    now[0] = 100  # idle past the timeout
    with pytest.raises(SessionNotFound):
        store.get(c.id, "c")
    with pytest.raises(SessionNotFound):
        store.get(d.id, "d")
    assert len(store) == 0


def test_server_expires_idle_sessions_and_bounds_memory(checkpoint):
    s = start(checkpoint, session_ttl_s=1.0, max_cache_mb=0.35)
    try:
        vol_a, vol_b = ct(seed=10), ct(seed=11)  # ~0.12 MiB each
        c1 = LesionLocatorClient(s.url)
        c1.set_image(vol_a)
        c1.segment(points={1: (10, 10, 10)})
        sid1 = c1.session_id
        time.sleep(1.6)
        key = c1._http.headers["X-LesionLocator-Client"]
        r = requests.get(f"{s.url}/v1/sessions/{sid1}", headers={"X-LesionLocator-Client": key}, timeout=10)
        assert r.status_code == 404
        # the client notices the lost session, re-creates it and re-uploads the image once
        c1.segment(points={1: (12, 10, 10)})
        assert c1.session_id != sid1 and c1.uploads == 2
        # memory budget: three 0.12 MiB scans from three clients cannot all stay
        clients = [c1] + [LesionLocatorClient(s.url) for _ in range(2)]
        clients[1].set_image(vol_b)
        clients[2].set_image(ct(seed=12))
        assert s.state.store.total_bytes() <= 0.35 * 2**20
        assert s.state.store.evicted >= 1
        with pytest.raises(SessionLost):
            clients[0].undo()  # undo history does not survive eviction, and is not silently replaced
        # a click still works: the client re-uploads transparently
        assert clients[0].segment(points={1: (10, 10, 10)}).lesions[1] is not None
        with pytest.raises(RequestRejected, match="larger than the server's image cache"):
            clients[1].set_image(ct(shape=(40, 80, 80), seed=13))  # 0.49 MiB > 0.35 MiB
        for c in clients:
            c.close()
    finally:
        s.stop()


# ----------------------------------------------------------------------------------------
# concurrency: several clients at once, one model thread
def test_concurrent_clients_get_their_own_results(srv, reference):
    vols = [ct(seed=20 + i) for i in range(4)]
    clicks = [(10 + i, 15 + i, 12 + 2 * i) for i in range(4)]
    expected = []
    for v, p in zip(vols, clicks):
        reference.set_image(v)
        expected.append(reference.segment(points={1: p}, boxes={2: (2, 12, 3, 20, 4, 30)}))

    def work(i):
        with LesionLocatorClient(srv.url, token=(TOKEN_A, TOKEN_B)[i % 2]) as c:
            c.set_image(vols[i])
            out = []
            for _ in range(3):
                out.append(c.segment(points={1: clicks[i]}, boxes={2: (2, 12, 3, 20, 4, 30)}))
            return out

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(4), timeout=120))
    for exp, got in zip(expected, results):
        for r in got:
            assert_same(r, exp)
    # all model work happened on one persistent thread
    assert len(srv.state.worker.thread_ids) == 1


# ----------------------------------------------------------------------------------------
# property-based fuzz of request bodies
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
    st.dictionaries(st.sampled_from(["point", "box", "mask", "zz"]), json_any, max_size=2),
    json_any,
)
segment_body = st.one_of(
    json_any,
    st.fixed_dictionaries({"prompts": st.dictionaries(st.one_of(st.integers(-3, 4).map(str), st.text(max_size=3)),
                                                      prompt_entry, max_size=3)},
                          optional={"image": st.text(max_size=70), "x": json_any}),
)
FUZZ_SHAPE = (36, 44, 40)


def is_valid_segment_body(body) -> bool:
    """Independent statement of what the server must accept (for the fuzz oracle)."""
    if not isinstance(body, dict) or set(body) - {"prompts", "image"} or "image" in body:
        return False
    prompts = body.get("prompts")
    if not isinstance(prompts, dict) or not prompts:
        return False
    for key, entry in prompts.items():
        if not (isinstance(key, str) and re.fullmatch(r"[1-9][0-9]{0,9}", key) and int(key) < 2**31):
            return False
        if not isinstance(entry, dict) or len(entry) != 1:
            return False
        (kind, val), = entry.items()
        nums = isinstance(val, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in val)
        if kind == "point":
            if not (nums and len(val) == 3 and all(-0.5 <= v <= n - 0.5 for v, n in zip(val, FUZZ_SHAPE))):
                return False
        elif kind == "box":
            if not (nums and len(val) == 6 and all(isinstance(v, int) for v in val)):
                return False
            if not all(0 <= val[2 * a] < val[2 * a + 1] <= FUZZ_SHAPE[a] for a in range(3)):
                return False
        elif kind == "point_lps":
            if not (nums and len(val) == 3):
                return False
            vox = FUZZ_VOL.world_to_voxel(val)
            if not all(-0.5 <= v <= n - 0.5 for v, n in zip(vox, FUZZ_SHAPE)):
                return False
        else:
            return False
    return True


FUZZ_VOL = ct(seed=30)


@pytest.fixture(scope="module")
def fuzz_session(srv):
    return raw_session(srv, TOKEN_A, "fuzzer", FUZZ_VOL)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(body=segment_body)
def test_fuzz_segment_bodies(srv, fuzz_session, body):
    r = raw(srv, "POST", f"/v1/sessions/{fuzz_session}/segment", TOKEN_A, "fuzzer", json=body)
    assert r.status_code < 500, r.text
    assert (r.status_code == 200) == is_valid_segment_body(body), (body, r.status_code, r.text[:300])
    if r.status_code == 200:
        assert set(decode_masks(r.content).lesions) == {int(k) for k in body["prompts"]}
    else:
        assert r.json()["message"]


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(junk=st.binary(max_size=400), cut=st.integers(0, 2000),
       path=st.sampled_from(["image", "image/reuse", "segment"]))
def test_fuzz_binary_and_other_endpoints(srv, fuzz_session, junk, cut, path):
    good = encode_volume(ct(shape=(6, 7, 8)))
    method = "PUT" if path == "image" else "POST"
    for data in (junk, good[:cut] + junk):
        if data == good:
            continue
        r = raw(srv, method, f"/v1/sessions/{fuzz_session}/{path}", TOKEN_A, "fuzzer", data=data,
                headers={"Content-Type": "application/json"} if method == "POST" else {})
        assert r.status_code < 500, r.text
        assert r.status_code != 200, r.text
        assert r.json()["message"]
    assert raw(srv, "GET", "/v1/health").status_code == 200


def test_track_round_trip_equals_in_process(srv, checkpoint):
    from LesionLocatorLib.core.prompts import Mask, Point
    from LesionLocatorLib.track.tracker import LesionTracker

    info = raw(srv, "GET", "/v1/version").json()
    assert info["tracking"] is True, info["unavailable"]
    # the tiny package has no LesionLocatorTrack model: classical registration refined by the segmenter
    assert info["tracking_method"] == {"propagation": "classical", "refine": "segment"}
    base, fu1, fu2 = lung_ct(1), lung_ct(2, 2), lung_ct(3, 4)
    seg = LesionSegmenter.from_checkpoint(checkpoint, prompt_type=["point", "box"], device="cpu")
    local = LesionTracker(None, segmenter=seg, device="cpu")
    expected = local.track(base, [fu1, fu2], {1: Point((15.0, 24.0, 22.0))})
    with LesionLocatorClient(srv.url, token=TOKEN_A) as c:
        got = c.track(base, [fu1, fu2], points={1: (15, 24, 22)})
        assert len(got) == 2
        for g, e in zip(got, expected):
            assert_same(g, e)
        assert_same(c.baseline_result, local.baseline_result)
        assert any(not les.empty for les in got[0].lesions.values())
        # the tracked follow-up is now the client's image, with its masks pasted
        assert c.image_hash == content_hash(fu2) and set(c.lesions) == {1}
        # track the masks the client drew on the baseline (no prompts in the request)
        c.set_image(base)  # the session holds the baseline masks of the tracking: the client pastes them
        assert set(c.lesions) == {1}
        assert_same(c.result(), local.track(base, [fu1], {1: Point((15.0, 24.0, 22.0))}) and local.baseline_result)
        c.segment(boxes={4: (8, 22, 14, 34, 12, 32)})
        drawn = {lid: Mask(les.full(base.shape).astype(bool)) for lid, les in c.lesions.items()}
        got = c.track(base, [fu1])
        exp = local.track(base, [fu1], drawn)
        assert set(exp[0].lesions) == {1, 4}
        assert_same(got[0], exp[0])
        # a scan of another modality / field of view is refused with the tracker's message
        with pytest.raises(RequestRejected, match="422.*same modality"):
            c.track(base, [Volume(np.full((30, 48, 44), 100, np.int16), spacing=(2.0, 1.0, 1.0))],
                    points={1: (15, 24, 22)})


def test_bad_track_requests(srv):
    base, fu = lung_ct(4), lung_ct(5, 1)
    sid = raw_session(srv, TOKEN_A, "tracker", base)
    raw(srv, "PUT", f"/v1/sessions/{sid}/image", TOKEN_A, "tracker", data=encode_volume(fu))
    body = {"baseline": content_hash(base), "followups": [content_hash(fu)], "prompts": {"1": {"point": [5, 5, 5]}}}
    post = lambda b: raw(srv, "POST", f"/v1/sessions/{sid}/track", TOKEN_A, "tracker", json=b)  # noqa: E731
    for bad, status in [(dict(body, followups=[]), 422), (dict(body, use_results=True), 422),
                        ({k: v for k, v in body.items() if k != "prompts"}, 422), (dict(body, baseline="x"), 422),
                        (dict(body, followups=["0" * 64]), 409),
                        (dict(body, prompts={"1": {"point": [99, 5, 5]}}), 422),
                        ({k: v for k, v in body.items() if k != "prompts"} | {"use_results": True}, 409)]:
        r = post(bad)
        assert r.status_code == status, (bad, r.text)
        assert r.json()["message"]
    assert raw(srv, "GET", f"/v1/sessions/{sid}", TOKEN_A, "tracker").json()["lesions"] == []


def test_stalled_upload_is_dropped(checkpoint):
    """A client that stops sending mid-upload gets a 408 and frees its upload slot."""
    s = start(checkpoint, upload_idle_timeout_s=0.5)
    try:
        sid = requests.post(f"{s.url}/v1/sessions", timeout=10).json()["session_id"]
        data = encode_volume(ct(seed=50))
        sent = threading.Event()

        def body():  # bounded: two pieces with a pause longer than the idle timeout in between
            yield data[:100]
            sent.set()
            time.sleep(2.0)
            yield data[100:]

        r = requests.put(f"{s.url}/v1/sessions/{sid}/image", data=body(), timeout=10)
        assert r.status_code == 408 and r.json()["error"] == "upload_stalled"
        assert sent.is_set()
        assert requests.get(f"{s.url}/v1/sessions/{sid}", timeout=10).json()["uploads"] == 0
        r = requests.put(f"{s.url}/v1/sessions/{sid}/image", data=data, timeout=10)
        assert r.status_code == 200
    finally:
        s.stop()
