"""Server-side sessions: one client's uploaded images, isolated from every other client.

A session id is an unguessable token (256 random bits) *and* is bound to the creating client's
credentials (the owner key ``auth.Authenticate`` derives from the bearer token and the client key);
a request with the right id but other credentials is answered exactly like an unknown id, so one
client can neither read nor change nor even detect another's session.

The masks live with the client (the Slicer module keeps its own undo): a session holds images only.
The model-side state of an image (crop box, grids: a ``SegmentSession``) lives in the service, keyed by
(session id, image hash), and is dropped when the image leaves its session.

Memory is bounded, and one client cannot take another's share: idle sessions expire after ``idle_timeout_s``;
each owner holds at most ``max_sessions_per_owner`` sessions and ``max_bytes_per_owner`` bytes of images; all
owners together hold at most ``max_sessions`` sessions and ``max_bytes`` bytes. Making room only ever evicts the
*requester's own* least recently used sessions / images; when the global limit is reached because of other
owners, the request is refused with :class:`ServerFull` (HTTP 503 + Retry-After), never by evicting them.
Uploads reserve their declared size (:meth:`SessionStore.reserve`) before any voxel is allocated, so uploads in
flight count against both budgets. All methods are thread-safe (the event loop and the model worker thread both
use the store).
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Set, Tuple

from ..core.geometry import Volume


class SessionError(LookupError):
    """Base of session-store errors."""


class SessionNotFound(SessionError):
    """Unknown, expired, evicted, deleted, or another client's session (indistinguishable on purpose)."""


class ImageNotFound(SessionError):
    """The session does not hold the requested image (upload it first)."""


class CacheFull(SessionError):
    """A single image is larger than the cache budget of one client."""


class ServerFull(SessionError):
    """The global session / memory limit is reached because of *other* clients (retry later: HTTP 503)."""

    retry_after_s = 30


@dataclass
class Session:
    id: str
    owner: str
    created: float
    last_used: float
    images: "OrderedDict[str, Volume]" = field(default_factory=OrderedDict)
    current: Optional[str] = None
    uploads: int = 0
    reuses: int = 0
    requests: int = 0
    # the running tracking job's progress (fraction, message), for GET .../progress; None: none running
    progress: Optional[Tuple[float, str]] = None
    cancel: threading.Event = field(default_factory=threading.Event)  # POST .../cancel: stop before the next tile

    def image_bytes(self) -> int:
        return sum(int(v.array.nbytes) for v in self.images.values())

    def info(self) -> dict:
        cur = self.images.get(self.current) if self.current else None
        return {"session_id": self.id, "image": self.current, "shape": None if cur is None else list(cur.shape),
                "images": list(self.images), "uploads": self.uploads, "reuses": self.reuses,
                "requests": self.requests}


class SessionStore:
    def __init__(self, max_sessions: int = 16, idle_timeout_s: float = 3600.0, max_bytes: int = 8 * 2**30,
                 max_images_per_session: int = 17, clock: Callable[[], float] = time.monotonic,
                 max_sessions_per_owner: Optional[int] = None, max_bytes_per_owner: Optional[int] = None) -> None:
        if max_sessions < 1 or idle_timeout_s <= 0 or max_bytes <= 0:
            raise ValueError("max_sessions, idle_timeout_s and max_bytes must be positive")
        self.max_sessions = int(max_sessions)
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_bytes = int(max_bytes)
        # defaults: a quarter of each global limit, so at least four clients always fit side by side
        self.max_sessions_per_owner = min(self.max_sessions, int(max_sessions_per_owner or max(1, max_sessions // 4)))
        self.max_bytes_per_owner = min(self.max_bytes, int(max_bytes_per_owner or max(1, max_bytes // 4)))
        self.max_images_per_session = int(max_images_per_session)  # a baseline and 16 follow-ups
        self._clock = clock
        self._lock = threading.RLock()
        self._sessions: "OrderedDict[str, Session]" = OrderedDict()  # least recently used first
        self._reserved: "Dict[str, int]" = {}  # reservation id -> bytes (uploads in flight)
        self._reserved_owner: "Dict[str, str]" = {}
        self.evicted = 0
        self.expired = 0
        self.refused = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.image_bytes() for s in self._sessions.values())

    def _owner_sessions(self, owner: str) -> List[Session]:
        return [s for s in self._sessions.values() if hmac.compare_digest(s.owner.encode(), owner.encode())]

    def owner_bytes(self, owner: str) -> int:
        """Bytes this owner's sessions hold plus its uploads in flight."""
        with self._lock:
            return (sum(s.image_bytes() for s in self._owner_sessions(owner))
                    + sum(n for r, n in self._reserved.items() if self._reserved_owner[r] == owner))

    def _used(self) -> int:
        return self.total_bytes() + sum(self._reserved.values())

    def _drop(self, sid: str) -> None:
        s = self._sessions.pop(sid)
        s.images.clear()  # the arrays go now even if a request still holds the Session object
        s.current = None

    def expire(self) -> int:
        """Drop sessions idle for longer than the timeout; returns how many."""
        now = self._clock()
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]
            for sid in stale:
                self._drop(sid)
            self.expired += len(stale)
            return len(stale)

    def _touch(self, s: Session) -> None:
        s.last_used = self._clock()
        self._sessions.move_to_end(s.id)

    def _full(self, what: str) -> ServerFull:
        self.refused += 1
        return ServerFull(f"the server is at its limit of {what} because of other clients; retry in "
                          f"{ServerFull.retry_after_s} s (your own sessions were kept)")

    def create(self, owner: str) -> Session:
        with self._lock:
            self.expire()
            own = self._owner_sessions(owner)  # least recently used first
            # at the per-owner quota: the requester's own oldest session makes room (a client that never closes
            # its sessions only ever evicts its own)
            while own and (len(own) >= self.max_sessions_per_owner or len(self._sessions) >= self.max_sessions):
                self._drop(own.pop(0).id)
                self.evicted += 1
            if len(self._sessions) >= self.max_sessions:
                raise self._full(f"{self.max_sessions} sessions")
            now = self._clock()
            s = Session(id=secrets.token_urlsafe(32), owner=owner, created=now, last_used=now)
            self._sessions[s.id] = s
            return s

    def get(self, session_id: str, owner: str) -> Session:
        with self._lock:
            self.expire()
            s = self._sessions.get(session_id)
            # compare_digest: the owner key is derived from a secret, so do not leak it by timing.
            if s is None or not hmac.compare_digest(s.owner.encode(), owner.encode()):
                raise SessionNotFound("unknown session (it expired, was evicted or deleted, or belongs to another "
                                      "client); create a new one")
            self._touch(s)
            return s

    def delete(self, session_id: str, owner: str) -> None:
        with self._lock:
            s = self.get(session_id, owner)
            self._drop(s.id)

    def live_keys(self) -> Set[Tuple[str, str]]:
        """(session id, image hash) of every image some session still holds."""
        with self._lock:
            return {(s.id, h) for s in self._sessions.values() for h in s.images}

    def find_image(self, owner: str, image_hash: str) -> Optional[Volume]:
        """An image this owner already uploaded in any live session (never another owner's)."""
        with self._lock:
            for s in reversed(self._sessions.values()):
                if hmac.compare_digest(s.owner.encode(), owner.encode()) and image_hash in s.images:
                    return s.images[image_hash]
            return None

    def _make_room(self, session: Session, nbytes: int, keep: Optional[str], rid: Optional[str] = None) -> None:
        """Evict the owner's own data (older sessions first, then older images of ``session``) until ``nbytes``
        more fit both the owner's quota and the global budget; :class:`CacheFull` when the image alone exceeds
        the owner's quota, :class:`ServerFull` when other owners fill the global budget."""
        owner = session.owner
        if nbytes > self.max_bytes_per_owner:
            raise CacheFull(f"image of {nbytes / 2**20:.1f} MiB exceeds the server's cache budget of "
                            f"{self.max_bytes_per_owner / 2**20:.1f} MiB per client")
        mine = 0 if rid is None else self._reserved.get(rid, 0)  # do not count the caller's own reservation

        def over() -> bool:
            return (self.owner_bytes(owner) - mine + nbytes > self.max_bytes_per_owner
                    or self._used() - mine + nbytes > self.max_bytes)

        while over():
            others = [s for s in self._owner_sessions(owner) if s.id != session.id]
            if others:
                self._drop(others[0].id)
                self.evicted += 1
                continue
            old = next((h for h in session.images if h != keep), None)
            if old is None:
                break
            session.images.pop(old)
        if over():
            raise self._full(f"{self.max_bytes / 2**20:.1f} MiB of images")

    def reserve(self, session: Session, nbytes: int) -> str:
        """Count an upload of ``nbytes`` against the budgets *before* it is decoded; returns a reservation id
        for :meth:`add_image` / :meth:`release`."""
        with self._lock:
            if session.id not in self._sessions:
                raise SessionNotFound("the session was evicted or deleted; create a new one")
            self._make_room(session, int(nbytes), keep=None)
            rid = secrets.token_hex(8)
            self._reserved[rid] = int(nbytes)
            self._reserved_owner[rid] = session.owner
            return rid

    def release(self, rid: Optional[str]) -> None:
        with self._lock:
            if rid is not None:
                self._reserved.pop(rid, None)
                self._reserved_owner.pop(rid, None)

    def add_image(self, session: Session, image_hash: str, volume: Volume, reservation: Optional[str] = None) -> None:
        """Put an image into a session (making it current), evicting only this owner's older data to fit."""
        nbytes = int(volume.array.nbytes)
        with self._lock:
            try:
                if session.id not in self._sessions:
                    raise SessionNotFound("the session was evicted or deleted during the upload; create a new one")
                if image_hash not in session.images:
                    self._make_room(session, nbytes, keep=None, rid=reservation)
                    session.images[image_hash] = volume
                session.images.move_to_end(image_hash)
                session.current = image_hash
                self._touch(session)
                while len(session.images) > self.max_images_per_session:
                    session.images.popitem(last=False)
            finally:
                self.release(reservation)

    def image(self, session: Session, image_hash: Optional[str] = None) -> Tuple[str, Volume]:
        key = image_hash or session.current
        if key is None:
            raise ImageNotFound("no image in this session yet: upload one first (PUT .../image)")
        vol = session.images.get(key)
        if vol is None:
            raise ImageNotFound(f"image {key[:12]}... is not held by this session: upload it first")
        return key, vol
