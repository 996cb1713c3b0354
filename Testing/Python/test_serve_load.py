"""The server under hostile and heavy load (issue 14): per-client quotas, bounded work, a fair queue, bounded
uploads, the client key. Behaviour that needs a real process runs against ``lesionlocator serve`` on loopback
(two processes, stopped by their pids); the scheduler's order is pure logic and runs in this process."""
from __future__ import annotations

import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import requests

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.model.tiny_model import write_random_checkpoint
from LesionLocatorLib.serve.errors import ApiError
from LesionLocatorLib.serve.service import Abandoned, ModelWorker
from LesionLocatorLib.serve.wire import MEDIA_TYPE, encode_request, encode_volume

from conftest import TOKEN, ServerProcess

MiB = 2**20


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), patch_size=(32, 32, 32), spacing=(1.0, 1.0, 1.0),
                                   features_per_stage=(2, 4, 8), n_blocks_per_stage=(1, 1, 1), folds=(0,), seed=3)


def ct(shape=(30, 40, 36), seed=0) -> Volume:  # 86 KiB of int16; 3 x 1 x 1 tiles of 32^3 at 1 mm
    rng = np.random.default_rng(seed)
    return Volume(rng.normal(-50, 150, size=shape).astype(np.int16), spacing=(2.0, 0.8, 0.8))


class Client:
    """One client identity (the token + its own client key), speaking raw HTTP so every status is visible."""

    def __init__(self, url: str, key: Optional[str]):
        self.url = url
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {TOKEN}"
        if key is not None:
            self.http.headers["X-LesionLocator-Client"] = key

    def req(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", 60)
        return self.http.request(method, self.url + path, **kw)

    def session(self) -> requests.Response:
        return self.req("POST", "/v1/sessions")

    def upload(self, sid: str, vol: Volume) -> requests.Response:
        return self.req("PUT", f"/v1/sessions/{sid}/image", data=encode_volume(vol),
                        headers={"Content-Type": MEDIA_TYPE})

    def segment(self, sid: str, prompts: dict, arrays: Optional[list] = None) -> requests.Response:
        if arrays:
            return self.req("POST", f"/v1/sessions/{sid}/segment", data=encode_request({"prompts": prompts}, arrays),
                            headers={"Content-Type": MEDIA_TYPE})
        return self.req("POST", f"/v1/sessions/{sid}/segment", json={"prompts": prompts})


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def quota_server(checkpoint, tmp_path_factory):
    """Small global limits, a quarter-ish per client: 4 sessions (2 each), 0.5 MiB of scans (0.3 MiB each),
    2 tile passes of work, 1000 mask voxels per request, 2 queued requests per client."""
    s = ServerProcess(tmp_path_factory.mktemp("quota"), checkpoint, [
        "--no-warmup", "--max-sessions", "4", "--max-sessions-per-client", "2", "--max-cache-mb", "0.5",
        "--max-cache-mb-per-client", "0.3", "--max-work", "2", "--max-mask-voxels", "1000",
        "--max-queue-per-client", "2"])
    yield s
    s.stop()


# ----------------------------------------------------------------------------------------
# 1: one client cannot wipe another's sessions
def test_one_client_cannot_evict_another(quota_server):
    url = quota_server.url
    victim, flooder, other, other2, late = (Client(url, f"client-key-{n}")
                                            for n in ("victim", "flood", "other", "other2", "late"))
    v = victim.session().json()["session_id"]
    assert victim.upload(v, ct(seed=1)).status_code == 200  # 84 KiB
    # 16 sessions from one client: it only ever evicts its own (per-client quota 2)
    flood_ids = [flooder.session() for _ in range(16)]
    assert all(r.status_code == 201 for r in flood_ids)
    assert victim.req("GET", f"/v1/sessions/{v}").status_code == 200
    live = flood_ids[-1].json()["session_id"]
    # four 84 KiB uploads past its own cache quota (300 KiB): its own older data goes, the victim's stays
    for i in range(4):
        assert flooder.upload(live, ct(seed=10 + i)).status_code == 200
    assert len(flooder.req("GET", f"/v1/sessions/{live}").json()["images"]) == 3
    assert victim.req("GET", f"/v1/sessions/{v}").json()["image"] is not None
    # global session limit (4) reached by others: a new client gets 503 + Retry-After, nobody is evicted
    o1 = other.session()
    assert o1.status_code == 201
    o2 = other2.session()
    assert o2.status_code == 201
    r = late.session()
    assert r.status_code == 503 and r.json()["error"] == "server_full" and int(r.headers["Retry-After"]) > 0
    # global cache (512 KiB) holds 337 KiB of others': a 188 KiB upload fits other2's quota, not the budget
    r = other2.upload(o2.json()["session_id"], ct(seed=31, shape=(30, 40, 80)))
    assert r.status_code == 503 and r.json()["error"] == "server_full" and "Retry-After" in r.headers, r.text
    assert victim.req("GET", f"/v1/sessions/{v}").json()["image"] is not None
    # what RemoteBackend makes of it: a ServerError with the code and retry_after
    from LesionLocatorLib.serve.client import RemoteBackend, ServerError

    with RemoteBackend(url, token=TOKEN) as rb:
        with pytest.raises(ServerError) as e:
            rb.session().set_image(ct(seed=32))
        assert e.value.status == 503 and e.value.code == "server_full" and e.value.retry_after > 0
    assert victim.segment(v, {"1": {"point": [15, 20, 18]}}).status_code == 200
    for c, sid in ((victim, v), (flooder, live), (other, o1.json()["session_id"]), (other2, o2.json()["session_id"])):
        assert c.req("DELETE", f"/v1/sessions/{sid}").status_code == 200  # room for the next tests
    for c in (victim, flooder, other, other2, late):
        c.http.close()


# ----------------------------------------------------------------------------------------
# 4 / 3: bounded work and mask voxels per request
def test_work_and_mask_voxels_are_bounded(quota_server):
    c = Client(quota_server.url, "client-key-work")
    sid = c.session().json()["session_id"]
    assert c.upload(sid, ct(seed=2)).status_code == 200
    assert c.segment(sid, {"1": {"point": [15, 20, 18]}}).status_code == 200  # one tile
    # a whole-image box: 3 tiles > --max-work 2, refused before any forward pass
    r = c.segment(sid, {"1": {"box": [0, 30, 0, 40, 0, 36]}})
    assert r.status_code == 413 and r.json()["error"] == "too_much_work", r.text
    assert r.json()["detail"] == {"estimated": 3, "limit": 2}
    r = c.segment(sid, {str(i): {"point": [15, 20, 18]} for i in range(1, 4)})  # 3 lesions x 1 tile
    assert r.status_code == 413 and r.json()["error"] == "too_much_work"
    # mask prompts: 1001 foreground voxels > 1000
    crop = np.ones((7, 11, 13), bool)
    r = c.segment(sid, {"1": {"mask": {"bbox": [5, 12, 5, 16, 5, 18], "array": 0}}}, [crop])
    assert r.status_code == 413 and "mask prompts" in r.json()["message"], r.text
    c.http.close()


# ----------------------------------------------------------------------------------------
# 8: the client key is required and used whole
def test_client_key_required_and_not_truncated(quota_server):
    url = quota_server.url
    r = Client(url, None).session()
    assert r.status_code == 400 and r.json()["error"] == "client_key_required"
    assert Client(url, "x" * 129).session().status_code == 400  # refused, not cut to 128
    assert Client(url, None).req("GET", "/v1/health").status_code == 200  # health needs only the token
    # keys equal in their first 128 characters were one identity before; now they are two
    a, b = Client(url, "k" * 100 + "A" * 28), Client(url, "k" * 100 + "B" * 28)
    sid = a.session().json()["session_id"]
    assert a.req("GET", f"/v1/sessions/{sid}").status_code == 200
    assert b.req("GET", f"/v1/sessions/{sid}").status_code == 404


# ----------------------------------------------------------------------------------------
# 4: fair queue (pure scheduling logic: the worker thread, jobs that only record their order)
def test_worker_round_robin_per_client_limit_and_abandon():
    worker = ModelWorker(max_queue=16, max_per_owner=3)
    gate, order = threading.Event(), []

    def job(name: str) -> str:
        gate.wait(10)
        order.append(name)
        return name

    try:
        jobs = [worker.submit(job, "A0", owner="A")]
        time.sleep(0.2)  # A0 is running (blocked on the gate)
        jobs += [worker.submit(job, f"A{i}", owner="A") for i in (1, 2, 3)]
        with pytest.raises(ApiError) as e:  # a 4th waiting job of A
            worker.submit(job, "A4", owner="A")
        assert e.value.status == 429 and e.value.headers["Retry-After"]
        jobs.append(worker.submit(job, "B0", owner="B"))
        gone = worker.submit(job, "C0", owner="C")
        gone.cancel.set()  # C's client left before its job started: it never runs
        late = worker.submit(job, "D0", owner="D", deadline=time.monotonic() - 1)  # deadline passed
        gate.set()
        assert [j.future.result(10) for j in jobs]
        with pytest.raises(Abandoned):
            gone.future.result(10)
        with pytest.raises(Abandoned):
            late.future.result(10)
        # B's one click ran after at most one more job of A, not after A's whole backlog
        assert order == ["A0", "A1", "B0", "A2", "A3"]
        assert worker.abandoned == 2
    finally:
        gate.set()
        worker.shutdown(timeout_s=10)
    with pytest.raises(ApiError):  # after shutdown: 503
        worker.submit(job, "X", owner="A")


# ----------------------------------------------------------------------------------------
# 5 / 6 / 7 / 10: uploads (slots, deadlines, reservations), memory after DELETE, bounded SIGTERM
@pytest.fixture(scope="module")
def upload_server(checkpoint, tmp_path_factory):
    s = ServerProcess(tmp_path_factory.mktemp("upload"), checkpoint, [
        "--no-warmup", "--upload-slots", "1", "--upload-slot-timeout", "2", "--shutdown-timeout", "3",
        "--max-cache-mb", "600", "--max-cache-mb-per-client", "300", "--max-work", "100000"])
    yield s
    s.stop()


def trickle_upload(port: int, sid: str, key: str, first: bytes) -> socket.socket:
    """Start a chunked upload, send ``first``, then stall (the connection stays open)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall((f"PUT /v1/sessions/{sid}/image HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"X-LesionLocator-Client: {key}\r\nContent-Type: {MEDIA_TYPE}\r\nTransfer-Encoding: chunked\r\n\r\n"
                  ).encode() + f"{len(first):x}\r\n".encode() + first + b"\r\n")
    return sock


def test_abandoned_request_never_runs(upload_server):
    """A request whose client disconnected while it waited in the queue is dropped before it starts."""
    c = Client(upload_server.url, "client-key-gone")
    sid = c.session().json()["session_id"]
    big = Volume(np.random.default_rng(0).normal(0, 100, (96, 128, 128)).astype(np.int16), spacing=(1, 1, 1))
    assert c.upload(sid, big).status_code == 200
    whole = {"1": {"box": [0, 96, 0, 128, 0, 128]}}  # 6 x 7 x 7 = 294 tiles: seconds of work
    assert c.segment(sid, whole).status_code == 200  # the image's grids are made once, here
    t0 = time.perf_counter()
    assert c.segment(sid, whole).status_code == 200
    job_s = time.perf_counter() - t0
    assert job_s > 0.8, f"the job ({job_s:.2f} s) is too short to queue behind"
    before = c.req("GET", "/v1/health").json()["abandoned"]
    with ThreadPoolExecutor(1) as ex:
        long = ex.submit(c.segment, sid, whole)
        time.sleep(0.2)
        impatient = Client(upload_server.url, "client-key-gone")
        with pytest.raises(requests.exceptions.ReadTimeout):  # gives up and closes while queued behind `long`
            impatient.req("POST", f"/v1/sessions/{sid}/segment", json={"prompts": whole}, timeout=0.3)
        impatient.http.close()
        assert long.result(timeout=300).status_code == 200
    deadline = time.monotonic() + 30
    while c.req("GET", "/v1/health").json()["abandoned"] != before + 1:
        assert time.monotonic() < deadline, "the abandoned request ran"
        time.sleep(0.2)
    assert c.req("GET", f"/v1/sessions/{sid}").json()["requests"] == 3  # two clicks and `long`: the abandoned one is not recorded


def test_slow_uploads_do_not_block_others(upload_server):
    url, port = upload_server.url, upload_server.port
    slow, fast = Client(url, "client-key-slow"), Client(url, "client-key-fast")
    s1 = slow.session().json()["session_id"]
    s2 = slow.session().json()["session_id"]
    data = encode_volume(ct(seed=5))
    sock = trickle_upload(port, s1, "client-key-slow", data[:100])
    try:
        time.sleep(1.0)
        r = slow.upload(s2, ct(seed=6))  # the same client's second upload: refused at once
        assert r.status_code == 429 and r.json()["error"] == "upload_in_progress"
        f = fast.session().json()["session_id"]
        t0 = time.perf_counter()
        r = fast.upload(f, ct(seed=7))  # the only slot is held: 503 after the slot timeout, not forever
        assert r.status_code == 503 and r.json()["error"] == "uploads_busy" and r.headers["Retry-After"]
        assert time.perf_counter() - t0 < 10
    finally:
        sock.close()  # aborted mid-upload: the slot is freed
    deadline = time.monotonic() + 10
    while fast.upload(f, ct(seed=7)).status_code != 200:
        assert time.monotonic() < deadline, "the aborted upload kept its slot"
        time.sleep(0.2)
    log = upload_server.log_path.read_text()
    assert "Traceback" not in log, log[-3000:]  # an aborted upload is not an error with tracebacks


def test_bomb_reserved_before_allocation_and_delete_frees_memory(upload_server):
    pid = upload_server.proc.pid
    c = Client(upload_server.url, "client-key-mem")
    sid = c.session().json()["session_id"]
    # 400 MiB of zeros compresses to a few hundred KiB: refused by the per-client quota (300 MiB) from its
    # declared size, before anything is allocated
    big = Volume(np.zeros((400, 512, 1024), np.uint16))
    before = rss_mib(pid)
    r = c.upload(sid, big)
    assert r.status_code == 413 and "per client" in r.json()["message"], r.text
    assert rss_mib(pid) - before < 50
    del big
    # 200 MiB accepted, then DELETE frees it at once (no garbage-collection cycle needed)
    vol = Volume(np.zeros((200, 512, 1024), np.uint16) + 1)
    assert c.upload(sid, vol).status_code == 200
    held = rss_mib(pid)
    assert held - before > 150
    assert c.req("DELETE", f"/v1/sessions/{sid}").status_code == 200
    deadline = time.monotonic() + 5
    while rss_mib(pid) - before > 60:
        assert time.monotonic() < deadline, f"RSS {rss_mib(pid):.0f} MiB after DELETE (before {before:.0f}, held " \
                                            f"{held:.0f})"
        time.sleep(0.2)


def test_trickled_upload_dropped_and_sigterm_bounded(checkpoint, tmp_path):
    s = ServerProcess(tmp_path, checkpoint, ["--no-warmup", "--shutdown-timeout", "2", "--upload-rate-grace", "1",
                                             "--upload-min-rate-kbps", "16", "--header-timeout", "2"])
    try:
        c = Client(s.url, "client-key-term")
        sid = c.session().json()["session_id"]
        data = encode_volume(ct(seed=9))

        def trickle():  # 200 B every 0.2 s (~1 KiB/s): never idle, far under the minimum rate
            for i in range(0, 30 * 200, 200):
                yield data[i:i + 200]
                time.sleep(0.2)

        # header slowloris: a request line and half a header, then nothing: closed after --header-timeout
        loris = socket.create_connection(("127.0.0.1", s.port), timeout=15)
        loris.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        t0 = time.perf_counter()
        assert loris.recv(1024) == b""  # closed by the server, no answer
        assert 1.5 < time.perf_counter() - t0 < 10
        loris.close()
        assert c.req("GET", "/v1/health").status_code == 200  # an ordinary request is unaffected
        # (requests reads the answer only after its body: the server's 408 came at ~1 s, the rest was discarded)
        r = c.req("PUT", f"/v1/sessions/{sid}/image", data=trickle(), headers={"Content-Type": MEDIA_TYPE})
        assert r.status_code == 408 and r.json()["error"] == "upload_too_slow", r.text
        assert c.upload(sid, ct(seed=9)).status_code == 200  # its slot was freed
        sock = trickle_upload(s.port, sid, "client-key-term", encode_volume(ct(seed=8))[:64])
        time.sleep(0.5)
        t0 = time.perf_counter()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=30)
        assert time.perf_counter() - t0 < 15
        sock.close()
    finally:
        s.stop()


def test_connection_limit(checkpoint, tmp_path):
    """``--limit-concurrency``: with that many connections open, the next request gets uvicorn's 503 at once;
    once they close, requests are served again."""
    s = ServerProcess(tmp_path, checkpoint, ["--no-warmup", "--limit-concurrency", "3"])
    socks = []
    try:
        c = Client(s.url, "client-key-conn")
        assert c.req("GET", "/v1/health").status_code == 200
        c.http.close()
        socks = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(3)]
        time.sleep(0.5)
        r = requests.get(f"{s.url}/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert r.status_code == 503, r.text
        for k in socks:
            k.close()
        deadline = time.monotonic() + 10
        while requests.get(f"{s.url}/v1/health", headers={"Authorization": f"Bearer {TOKEN}"},
                           timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "still refused after the connections closed"
            time.sleep(0.2)
    finally:
        for k in socks:
            k.close()
        s.stop()


# ----------------------------------------------------------------------------------------
# 10: low-entropy tokens; limits advertised in /version
def test_low_entropy_tokens_refused():
    from LesionLocatorLib.serve.config import ServerConfig, ServerConfigError, check_config

    for bad in ("a" * 32, "ab" * 16, "0123456" * 4):
        with pytest.raises(ServerConfigError, match="low entropy"):
            check_config(ServerConfig(host="0.0.0.0", tokens=(bad,)))
    check_config(ServerConfig(host="0.0.0.0", tokens=("Zq3-vX9_kP2mW7rT",)))


def test_version_states_the_limits(quota_server):
    limits = Client(quota_server.url, None).req("GET", "/v1/version").json()["limits"]
    assert limits["max_sessions"] == 4 and limits["max_sessions_per_client"] == 2
    assert limits["max_cache_bytes_per_client"] == int(0.3 * MiB) and limits["max_work"] == 2
    assert limits["max_queue_per_client"] == 2 and limits["max_mask_voxels"] == 1000
