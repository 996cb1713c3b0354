"""Per-click latency of the LesionLocator server over loopback against in-process, in the same run.

    python benchmarks/server_latency.py [--devices cpu,cuda] [--model CKPT] [--arch small|resenc-l]
                                        [--clicks 20] [--image auto|synthetic|PATH] [--json OUT]

For each device: one server process (python -m LesionLocatorLib.cli.main serve) and one in-process
backend (open_backend(model=...)) load the same checkpoint; clicks alternate between the two (so drift in a
shared machine's load hits both alike), and the figures are the medians of the per-click
times and of their paired differences.  Also measured: bytes sent / received per click,
and the upload of a 300 x 512 x 512 int16 CT (hash + zstd + transfer + server decode and
hash check), plus the skipped re-upload.

Targets (issue 5): server adds < 15 ms per click on loopback; a click sends < 4 KB and
receives only the changed region; a 512 x 512 x 300 int16 CT uploads in < 1 s.

Also (issue 14): fairness -- one client's single click while another client (one client key, several
connections) keeps its share of the queue full with 4-lesion requests, as a ratio to the idle click and in
units of the flood's job cost (target: at most about the job in progress plus one more, i.e. ~2 jobs); and the
server's resident memory before, during and after sessions come and go (8 sessions upload the click image,
then close): after must return to within 10% (or 64 MiB) of before.

Without --model the network is the plans' architecture with random weights (seeded): the
latency of the transport does not depend on the weights.  The default architecture is the
published ResEnc-L on CUDA and a small ResEnc on CPU (a ResEnc-L forward pass on a CPU takes
minutes, which says nothing about the server's overhead).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from LesionLocatorLib.core.geometry import Volume

LIDC = REPO.parent / "shared" / "data" / "lidc0314" / "LIDC-IDRI-0314_ct.nii.gz"
LIDC_NODULE = (159, 243, 184)

ARCHS = {
    # name: (patch (z, y, x), features per stage)
    "tiny": ((32, 32, 32), (2, 4, 8)),
    "small": ((48, 64, 64), (8, 16, 32, 64)),
    "resenc-l": ((160, 224, 224), (32, 64, 128, 256, 320, 320)),
}


def synthetic_ct(shape=(300, 512, 512), spacing=(1.0, 0.7, 0.7), seed=0) -> tuple[Volume, tuple[int, int, int]]:
    """A CT-like int16 volume: air, body ellipse with fat / soft tissue, two lungs, spine, a nodule, 12 HU noise."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    yy, xx = np.ogrid[:ny, :nx]
    sl = np.full((ny, nx), -1000, np.int16)
    body = ((yy - ny / 2) / (ny * 0.38)) ** 2 + ((xx - nx / 2) / (nx * 0.45)) ** 2 < 1
    inner = ((yy - ny / 2) / (ny * 0.33)) ** 2 + ((xx - nx / 2) / (nx * 0.40)) ** 2 < 1
    sl[body] = -100
    sl[inner] = 40
    for cx in (0.32, 0.68):
        lung = ((yy - ny * 0.47) / (ny * 0.2)) ** 2 + ((xx - nx * cx) / (nx * 0.13)) ** 2 < 1
        sl[lung] = -850
    spine = ((yy - ny * 0.75) / (ny * 0.05)) ** 2 + ((xx - nx / 2) / (nx * 0.05)) ** 2 < 1
    sl[spine] = 700
    arr = np.broadcast_to(sl, shape).copy()
    center = (nz // 2, int(ny * 0.47), int(nx * 0.32))
    zz, yy3, xx3 = np.ogrid[:nz, :ny, :nx]
    nodule = ((zz - center[0]) * spacing[0]) ** 2 + ((yy3 - center[1]) * spacing[1]) ** 2 + \
        ((xx3 - center[2]) * spacing[2]) ** 2 < 8.0 ** 2
    arr[nodule] = 30
    for z0 in range(0, nz, 32):  # noise in slabs keeps memory low
        z1 = min(nz, z0 + 32)
        arr[z0:z1] += np.round(rng.standard_normal((z1 - z0, ny, nx), dtype=np.float32) * 12).astype(np.int16)
    return Volume(arr, spacing=spacing, origin=(-180.0, -180.0, -300.0)), center


def torch_no_grad(fn):
    def wrapper(*a, **kw):
        import torch

        with torch.no_grad():
            return fn(*a, **kw)

    return wrapper


def tiny_checkpoint(arch: str, out: Path, device: str = "cpu") -> Path:
    import torch

    from LesionLocatorLib.model.checkpoint import write_checkpoint
    from LesionLocatorLib.model.network import build_network
    from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans

    patch, feats = ARCHS[arch]
    torch.manual_seed(0)
    plans = make_plans(patch_size=patch, spacing=(1.0, 0.8, 0.8), features_per_stage=feats)
    ds = make_dataset_json()
    net = build_network(config_from_dicts(plans, ds), 2)
    _lesion_sized_head(net, patch, device)
    write_checkpoint(out / arch, plans, ds, 0, net.state_dict())
    return out / arch


@torch_no_grad
def _lesion_sized_head(net, patch, device: str, fraction: float = 0.01) -> None:
    """Shift the output bias so that about ``fraction`` of a patch is foreground.

    A random network marks a third or all of the patch as lesion; real lesions are small, and the
    reply size (and the codec time) follows the lesion size, so make the random masks lesion-sized.
    """
    import torch

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    net = net.to(dev).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn((1, 2, *patch), generator=g)
    x[:, 1] = 0
    c = [p // 2 for p in patch]
    x[:, 1, c[0] - 5:c[0] + 6, c[1] - 5:c[1] + 6, c[2] - 5:c[2] + 6] = 1
    d = net(x.to(dev))[0].float()
    d = (d[1] - d[0]).flatten().cpu()
    head = net.decoder.seg_layers[-1]
    head.bias[1] -= torch.quantile(d[:: max(1, d.numel() // 2_000_000)], 1 - fraction).to(head.bias.device)
    net.to("cpu")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def bench_device(device: str, ckpt: Path, vol: Volume, center: tuple[int, int, int], clicks: int,
                 upload_vols: dict[str, Volume]) -> dict:
    from LesionLocatorLib.backend import open_backend
    from LesionLocatorLib.serve.client import RemoteBackend, wait_for_server

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "LesionLocatorLib.cli.main", "serve", "-m", str(ckpt),
                             "--port", str(port), "--device", device, "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=str(REPO), env=env, start_new_session=True)
    out: dict = {"device": device}
    try:
        t0 = time.perf_counter()
        local = open_backend(model=str(ckpt), device=device)
        local.model.warmup("point")
        seg = local.session()
        out["inprocess_load_s"] = time.perf_counter() - t0
        deadline = time.monotonic() + 600
        while True:  # bounded: stops when the server is up, has died, or 10 minutes passed
            if proc.poll() is not None:
                raise RuntimeError(f"the server process exited with code {proc.returncode} before it was ready")
            try:
                wait_for_server(url, timeout_s=2)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
        backend = RemoteBackend(url)
        client = backend.session()
        out["server_device"] = backend.describe()["device"]
        rtt = []
        for _ in range(30):  # the HTTP floor: an authenticated no-op request on the kept-alive connection
            t = time.perf_counter()
            backend.request("GET", "/v1/health")
            rtt.append(time.perf_counter() - t)
        out["http_rtt_ms_median"] = 1000 * statistics.median(rtt)

        # -- upload --------------------------------------------------------------------
        uploads = {}
        for name, uv in upload_vols.items():
            t = time.perf_counter()
            client.set_image(uv)  # content hash + upload (the server did not hold it)
            first = time.perf_counter() - t
            sent = backend.last_request_bytes
            t = time.perf_counter()
            backend.session().set_image(uv)  # another session: the server holds it, only the hash travels
            again = time.perf_counter() - t
            uploads[name] = {"shape": list(uv.shape), "raw_mb": uv.array.nbytes / 1e6, "upload_s": first,
                             "sent_mb": sent / 1e6, "ratio": uv.array.nbytes / max(sent, 1),
                             "transfer_mb_per_s": backend.last_upload["raw_mb_per_s"] if backend.last_upload else 0,
                             "reupload_skipped_s": again, "reupload_sent_bytes": backend.last_request_bytes}
        out["uploads"] = uploads

        # -- clicks: alternate in-process and server -------------------------------------
        t = time.perf_counter()
        seg.set_image(vol)
        out["inprocess_set_image_s"] = time.perf_counter() - t
        t = time.perf_counter()
        client.set_image(vol)
        out["server_set_image_s"] = time.perf_counter() - t
        # the same click each time: identical work on both sides, so the paired difference is the overhead
        pts = [tuple(int(c) for c in center)] * (clicks + 2)
        local_t, remote_t, diffs, sent_b, recv_b, server_ms, same = [], [], [], [], [], [], 0
        for i, p in enumerate(pts):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            times = {}
            for which in order:
                t = time.perf_counter()
                if which == 0:
                    loc = seg.segment(points={1: p})
                else:
                    rem = client.segment(points={1: p})
                times[which] = time.perf_counter() - t
            if i < 2:
                continue  # first clicks pay for per-image grids and caches on both sides
            local_t.append(times[0])
            remote_t.append(times[1])
            diffs.append(times[1] - times[0])
            sent_b.append(backend.last_request_bytes)
            recv_b.append(backend.last_response_bytes)
            server_ms.append(backend.last_server_ms or 0.0)
            same += int(np.array_equal(loc.lesions[1].full(vol.shape), rem.lesions[1].full(vol.shape)))
        out.update(
            clicks=len(local_t),
            inprocess_ms_median=1000 * statistics.median(local_t), inprocess_ms_p90=1000 * pct(local_t, 90),
            server_ms_median=1000 * statistics.median(remote_t), server_ms_p90=1000 * pct(remote_t, 90),
            overhead_ms_median=1000 * statistics.median(diffs), overhead_ms_p90=1000 * pct(diffs, 90),
            transport_ms_median=statistics.median(1000 * r - s for r, s in zip(remote_t, server_ms)),
            ratio=statistics.median(remote_t) / statistics.median(local_t),
            sent_bytes_median=statistics.median(sent_b), recv_bytes_median=statistics.median(recv_b),
            lesion_voxels=int(rem.lesions[1].voxels), lesion_bbox=list(rem.lesions[1].bbox),
            identical_masks=f"{same}/{len(local_t)}",
        )
        out.update(fairness(url, client, vol, center, clicks))
        out.update(memory_cycle(url, proc.pid, vol))
        backend.close()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.seek(0)
        tail = log.read()[-2000:]
        log.close()
        os.unlink(log.name)
        if "inprocess_ms_median" not in out:
            print("server log:\n" + tail, file=sys.stderr)
    return out


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")  # not Linux


def fairness(url: str, client, vol: Volume, center: tuple[int, int, int], clicks: int) -> dict:
    """One client's click while another floods the queue (3 connections of one client key, 4 lesions each)."""
    import threading

    from LesionLocatorLib.serve.client import RemoteBackend, ServerError

    c = tuple(int(x) for x in center)
    flood_pts = {i + 1: (c[0], c[1] + 6 * (i % 2), c[2] + 6 * (i // 2)) for i in range(4)}
    key = "flood-client-key-0123456789"
    floods = []
    for _ in range(3):
        b = RemoteBackend(url)
        b._http.headers["X-LesionLocator-Client"] = key  # one client, several connections
        s = b.session()
        s.set_image(vol)
        s.segment(points=flood_pts)  # per-image grids made before timing
        floods.append((b, s))
    job = []
    for _ in range(3):  # the cost of one flood job with nothing else queued
        t = time.perf_counter()
        floods[0][1].segment(points=flood_pts)
        job.append(time.perf_counter() - t)
    idle = []
    for _ in range(max(3, clicks // 2)):
        t = time.perf_counter()
        client.segment(points={1: c})
        idle.append(time.perf_counter() - t)
    stop, refused = threading.Event(), [0]

    def flood(s) -> None:
        while not stop.is_set():
            try:
                s.segment(points=flood_pts)
            except ServerError:
                refused[0] += 1  # 429: its share of the queue is full
                time.sleep(0.05)

    threads = [threading.Thread(target=flood, args=(s,), daemon=True) for _, s in floods]
    for th in threads:
        th.start()
    time.sleep(2 * statistics.median(job) + 0.2)  # the queue fills
    busy = []
    for _ in range(max(3, clicks // 2)):
        t = time.perf_counter()
        client.segment(points={1: c})
        busy.append(time.perf_counter() - t)
    stop.set()
    for th in threads:
        th.join(timeout=600)
    for b, _ in floods:
        b.close()
    idle_ms, busy_ms, job_ms = (1000 * statistics.median(x) for x in (idle, busy, job))
    return {"fair_idle_click_ms": idle_ms, "fair_flooded_click_ms": busy_ms, "fair_flood_job_ms": job_ms,
            "fair_ratio_to_idle": busy_ms / idle_ms, "fair_in_flood_jobs": (busy_ms - idle_ms) / job_ms,
            "fair_flood_refused": refused[0]}


def memory_cycle(url: str, pid: int, vol: Volume, n: int = 8) -> dict:
    """Resident memory of the server before, while 8 sessions hold the image, and after they close."""
    from LesionLocatorLib.serve.client import RemoteBackend

    time.sleep(1.0)
    before = rss_mib(pid)
    backends = []
    peak = before
    for i in range(n):
        b = RemoteBackend(url)  # a new client each: its own upload, its own copy on the server
        s = b.session()
        s.set_image(vol)
        s.segment(points={1: tuple(int(x) for x in np.array(vol.shape) // 2)})
        backends.append(b)
        peak = max(peak, rss_mib(pid))
    during = rss_mib(pid)
    for b in backends:
        b.close()  # deletes its session
    time.sleep(2.0)
    after = rss_mib(pid)
    return {"rss_before_mib": before, "rss_during_mib": during, "rss_peak_mib": peak, "rss_after_mib": after,
            "rss_sessions": n, "rss_image_mib": vol.array.nbytes / 2**20}


def report(r: dict) -> None:
    print(f"\n== device {r['device']} (server on {r.get('server_device')}) ==")
    for name, u in r["uploads"].items():
        ok = "OK" if u["upload_s"] < 1.0 else "MISS"
        print(f"upload {name} {u['shape']} int16 {u['raw_mb']:.0f} MB: {u['upload_s']:.3f} s "
              f"({u['sent_mb']:.1f} MB sent, {u['ratio']:.2f}x smaller, {u['raw_mb'] / u['upload_s']:.0f} MB/s raw) "
              f"[target < 1 s: {ok}]; re-upload skipped in {1000 * u['reupload_skipped_s']:.1f} ms "
              f"({u['reupload_sent_bytes']} B sent)")
    print(f"set_image (already uploaded): in-process {1000 * r['inprocess_set_image_s']:.1f} ms, "
          f"server {1000 * r['server_set_image_s']:.1f} ms (hash + reuse request)")
    print(f"HTTP round trip of a no-op request (health): {r['http_rtt_ms_median']:.2f} ms median")
    print(f"per click over {r['clicks']} clicks (median / p90):")
    print(f"  in-process       {r['inprocess_ms_median']:8.1f} / {r['inprocess_ms_p90']:8.1f} ms")
    print(f"  server loopback  {r['server_ms_median']:8.1f} / {r['server_ms_p90']:8.1f} ms   "
          f"ratio {r['ratio']:.3f}")
    ok = "OK" if r["overhead_ms_median"] < 15 else "MISS"
    print(f"  added by server  {r['overhead_ms_median']:8.1f} / {r['overhead_ms_p90']:8.1f} ms (paired) "
          f"[target < 15 ms: {ok}]; transport+codec outside the model job {r['transport_ms_median']:.1f} ms")
    ok = "OK" if r["sent_bytes_median"] < 4096 else "MISS"
    print(f"  bytes per click  sent {r['sent_bytes_median']:.0f} B [target < 4 KB: {ok}], received "
          f"{r['recv_bytes_median']:.0f} B for a lesion of {r['lesion_voxels']} voxels in bbox {r['lesion_bbox']}")
    print(f"  masks identical to in-process: {r['identical_masks']}")
    if "fair_ratio_to_idle" in r:
        ok = "OK" if r["fair_in_flood_jobs"] <= 2.0 else "MISS"
        print(f"fairness: a click while another client floods the queue {r['fair_flooded_click_ms']:.1f} ms vs "
              f"{r['fair_idle_click_ms']:.1f} ms idle = {r['fair_ratio_to_idle']:.1f}x idle; the flood's job costs "
              f"{r['fair_flood_job_ms']:.1f} ms, so the click waited {r['fair_in_flood_jobs']:.2f} flood jobs "
              f"[target <= ~2: {ok}]; flood requests refused with 429: {r['fair_flood_refused']}")
    if "rss_before_mib" in r:
        margin = max(64.0, 0.10 * r["rss_before_mib"])
        ok = "OK" if r["rss_after_mib"] - r["rss_before_mib"] <= margin else "MISS"
        print(f"server resident memory: before {r['rss_before_mib']:.0f} MiB, with {r['rss_sessions']} sessions "
              f"of a {r['rss_image_mib']:.0f} MiB image {r['rss_during_mib']:.0f} MiB (peak {r['rss_peak_mib']:.0f}), "
              f"after they closed {r['rss_after_mib']:.0f} MiB [target within {margin:.0f} MiB of before: {ok}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="auto", help="comma list of cpu/cuda, or auto (cpu, plus cuda if present)")
    ap.add_argument("--model", help="checkpoint (zip / folder); default: random weights, --arch architecture")
    ap.add_argument("--arch", choices=sorted(ARCHS), help="architecture without --model (default per device)")
    ap.add_argument("--clicks", type=int, default=20)
    ap.add_argument("--image", default="auto", help="auto (LIDC-IDRI-0314 when present), synthetic, or a path")
    ap.add_argument("--json", help="write the figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else []) if args.devices == "auto" \
        else args.devices.split(",")
    t = time.perf_counter()
    synth, synth_center = synthetic_ct()
    print(f"synthetic CT {synth.shape} made in {time.perf_counter() - t:.1f} s")
    upload_vols = {"synthetic": synth}
    if args.image == "synthetic" or (args.image == "auto" and not LIDC.exists()):
        vol, center, name = synth, synth_center, "synthetic"
    else:
        from LesionLocatorLib.core.image_io import read_image

        path = LIDC if args.image == "auto" else Path(args.image)
        vol, name = read_image(path), path.name
        center = LIDC_NODULE if path == LIDC else tuple(s // 2 for s in vol.shape)
        upload_vols[name] = vol
    print(f"click image: {name} {vol.shape} {vol.array.dtype}, clicks around {center}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for dev in devices:
            arch = args.arch or ("resenc-l" if dev.startswith("cuda") else "small")
            ckpt = Path(args.model) if args.model else tiny_checkpoint(arch, Path(tmp) / dev, dev)
            print(f"\n[{dev}] model: {args.model or f'{arch} (random weights)'}", flush=True)
            r = bench_device(dev, ckpt, vol, center, args.clicks, upload_vols)
            r["model"] = args.model or arch
            report(r)
            results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
