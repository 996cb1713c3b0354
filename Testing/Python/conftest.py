"""Shared pytest fixtures: where the real data lives, and skipping cleanly without it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import pytest

REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("LESIONLOCATOR_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"
PARITY = SHARED / "parity"

os.environ.setdefault("OMP_NUM_THREADS", "2")


def require(path: Path) -> Path:
    """Skip the calling test when an optional real-data file is not present."""
    if not path.exists():
        pytest.skip(f"real data not available: {path}")
    return path


@pytest.fixture
def shared_data() -> Path:
    return require(DATA)


@pytest.fixture
def parity_dir() -> Path:
    return require(PARITY)


def lung_ct(seed: int, shift: int = 0):
    """Lung-like background (-700 HU) with one soft-tissue nodule, moved by ``shift`` voxels in y."""
    import numpy as np

    from LesionLocatorLib.core.geometry import Volume

    r = np.random.default_rng(seed)
    a = r.normal(-700, 50, (30, 48, 44))
    zz, yy, xx = np.indices(a.shape)
    a[((zz - 15) ** 2 / 36 + (yy - 24 - shift) ** 2 / 64 + (xx - 22) ** 2 / 49) < 1] = 40
    return Volume(a.astype(np.int16), spacing=(2.0, 1.0, 1.0))


TOKEN = "client-test-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``lesionlocator serve`` (``python -m LesionLocatorLib.cli.main serve``) as a child process on a free
    loopback port, stopped by its pid."""

    def __init__(self, tmp: Path, checkpoint: Optional[Path], extra: List[str] = ()):  # type: ignore[assignment]
        from LesionLocatorLib.serve.client import ServerError, wait_for_server

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        token_file = tmp / "tokens.txt"
        token_file.write_text(TOKEN + "\n")
        token_file.chmod(0o600)
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   OMP_NUM_THREADS="1")
        self.log_path = tmp / "server.log"
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "LesionLocatorLib.cli.main", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--token-file", str(token_file), "--log-level", "warning",
               *(["-m", str(checkpoint)] if checkpoint else []), *extra]
        self.proc = subprocess.Popen(cmd, cwd=str(REPO), env=env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_server(self.url, timeout_s=120, token=TOKEN)
        except ServerError:
            self.stop()
            raise AssertionError("server did not start:\n" + self.log_path.read_text()[-3000:]) from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout=30)
        self.log.close()
