"""Server configuration and the checks that run before anything binds a port."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple


class ServerConfigError(ValueError):
    """The server cannot start with the given options (e.g. a public address without a token)."""


@dataclass
class ServerConfig:
    checkpoint: Optional[str] = None  # None: the bundled demo model
    device: str = "auto"
    folds: Any = None  # folds loaded and served by default (None: the library default, the first fold)
    tta: bool = False  # only for requests that do not say (the client always says)
    compile: bool = False
    grow: bool = True  # for requests that do not say, and for tracking (the tracker uses the model's setting)
    host: str = "127.0.0.1"
    port: int = 8765
    tokens: Tuple[str, ...] = ()
    max_sessions: int = 16
    max_upload_mb: float = 1024.0  # compressed scan upload
    max_request_mb: float = 64.0  # any other body (JSON, or a container of mask-prompt crops)
    max_request_raw_mb: float = 256.0  # decoded mask-prompt crops of one request
    max_cache_mb: Optional[float] = None  # None: a quarter of physical memory, at most 8192 (default_cache_mb)
    session_ttl_s: float = 3600.0
    max_queue: int = 64
    upload_idle_timeout_s: float = 60.0
    # per-client quotas (a client = token + client key); None: a quarter of the global limit
    max_sessions_per_client: Optional[int] = None
    max_cache_mb_per_client: Optional[float] = None
    max_queue_per_client: int = 4  # model requests waiting per client (round-robin across clients)
    # bounded work per request (tiles x lesions x folds x TTA mirrors) and decoded mask-prompt voxels
    max_work: int = 256
    max_mask_voxels: int = 2**27
    request_deadline_s: float = 300.0  # a job still queued or running after this is dropped (checked before each tile)
    # uploads: decoded at once in total, waiting time for a slot, overall deadline and minimum average rate
    upload_slots: int = 2
    upload_slot_timeout_s: float = 10.0
    upload_deadline_s: float = 900.0
    upload_min_rate_kbps: float = 64.0  # KiB/s averaged, enforced after the first upload_rate_grace_s
    upload_rate_grace_s: float = 30.0
    header_timeout_s: float = 30.0  # a request's line and headers must arrive within this (slowloris)
    limit_concurrency: int = 64  # open connections; more get 503 from uvicorn
    shutdown_timeout_s: float = 20.0
    warmup: bool = True
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_request_bytes(self) -> int:
        return int(min(self.max_request_mb, self.max_upload_mb) * 2**20)

    @property
    def max_cache_bytes(self) -> int:
        return int((self.max_cache_mb if self.max_cache_mb is not None else default_cache_mb()) * 2**20)

    @property
    def max_cache_bytes_per_client(self) -> Optional[int]:
        return None if self.max_cache_mb_per_client is None else int(self.max_cache_mb_per_client * 2**20)


def physical_memory_bytes() -> Optional[int]:
    try:
        import os

        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        try:
            import psutil  # Windows has no sysconf

            return int(psutil.virtual_memory().total)
        except Exception:  # noqa: BLE001
            return None


def default_cache_mb() -> float:
    """A quarter of physical memory, at most 8 GiB: the scans of all sessions must never crowd out the model."""
    phys = physical_memory_bytes()
    return 8192.0 if phys is None else min(8192.0, phys / 4 / 2**20)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_config(cfg: ServerConfig) -> None:
    if not is_loopback(cfg.host) and not cfg.tokens:
        raise ServerConfigError(
            f"refusing to listen on {cfg.host} without a token: anyone on the network could use the server; "
            "pass --token or --token-file (or bind 127.0.0.1)")
    for t in cfg.tokens:
        # printable ASCII only: a header carries the token byte for byte (no encoding guesswork)
        if len(t) < 16 or not all(33 <= ord(c) < 127 for c in t):
            raise ServerConfigError("tokens must be at least 16 printable ASCII characters without whitespace "
                                    "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if len(set(t)) < 8:  # e.g. "aaaaaaaaaaaaaaaa" or "abababab...": guessable however long
            raise ServerConfigError("a token has fewer than 8 distinct characters (low entropy); use a random one "
                                    "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ServerConfigError("--tls-cert and --tls-key go together")
    for f in (cfg.tls_cert, cfg.tls_key):
        if f and not Path(f).is_file():
            raise ServerConfigError(f"TLS file not found: {f}")
    if (cfg.max_sessions < 1 or cfg.max_upload_mb <= 0 or cfg.max_cache_bytes <= 0 or cfg.session_ttl_s <= 0
            or cfg.max_request_mb <= 0 or cfg.max_queue < 1 or cfg.max_queue_per_client < 1 or cfg.max_work < 1
            or (cfg.max_sessions_per_client is not None and cfg.max_sessions_per_client < 1)
            or (cfg.max_cache_mb_per_client is not None and cfg.max_cache_mb_per_client <= 0)
            or cfg.upload_slots < 1 or cfg.limit_concurrency < 1):
        raise ServerConfigError("--max-sessions, --max-upload-mb, --max-request-mb, --max-cache-mb, --max-queue "
                                "and --session-ttl must be positive")
