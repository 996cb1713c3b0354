"""Server-side sessions: one client's uploaded images, isolated from every other client.

A session id is an unguessable token (256 random bits) *and* is bound to the creating client's
credentials (the owner key ``auth.Authenticate`` derives from the bearer token and the client key);
a request with the right id but other credentials is answered exactly like an unknown id, so one
client can neither read nor change nor even detect another's session.

The masks live with the client (the Slicer module keeps its own undo): a session holds images only.
The model-side state of an image (crop box, grids: a ``SegmentSession``) lives in the service, keyed by
(session id, image hash), and is dropped when the image leaves its session.

Memory is bounded: idle sessions expire after ``idle_timeout_s``; the images held by all sessions together
stay under ``max_bytes`` (least recently used sessions are evicted first); at most ``max_sessions`` sessions
live at once. All methods are thread-safe (the event loop and the model worker thread both use the store).
"""
from __future__ import annotations

import hmac
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional, Set, Tuple

from ..core.geometry import Volume


class SessionError(LookupError):
    """Base of session-store errors."""


class SessionNotFound(SessionError):
    """Unknown, expired, evicted, deleted, or another client's session (indistinguishable on purpose)."""


class ImageNotFound(SessionError):
    """The session does not hold the requested image (upload it first)."""


class CacheFull(SessionError):
    """A single image is larger than the whole cache budget."""


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

    def image_bytes(self) -> int:
        return sum(int(v.array.nbytes) for v in self.images.values())

    def info(self) -> dict:
        cur = self.images.get(self.current) if self.current else None
        return {"session_id": self.id, "image": self.current, "shape": None if cur is None else list(cur.shape),
                "images": list(self.images), "uploads": self.uploads, "reuses": self.reuses,
                "requests": self.requests}


class SessionStore:
    def __init__(self, max_sessions: int = 16, idle_timeout_s: float = 3600.0, max_bytes: int = 8 * 2**30,
                 max_images_per_session: int = 17, clock: Callable[[], float] = time.monotonic) -> None:
        if max_sessions < 1 or idle_timeout_s <= 0 or max_bytes <= 0:
            raise ValueError("max_sessions, idle_timeout_s and max_bytes must be positive")
        self.max_sessions = int(max_sessions)
        self.idle_timeout_s = float(idle_timeout_s)
        self.max_bytes = int(max_bytes)
        self.max_images_per_session = int(max_images_per_session)  # a baseline and 16 follow-ups
        self._clock = clock
        self._lock = threading.RLock()
        self._sessions: "OrderedDict[str, Session]" = OrderedDict()  # least recently used first
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def total_bytes(self) -> int:
        with self._lock:
            return sum(s.image_bytes() for s in self._sessions.values())

    def expire(self) -> int:
        """Drop sessions idle for longer than the timeout; returns how many."""
        now = self._clock()
        with self._lock:
            stale = [sid for sid, s in self._sessions.items() if now - s.last_used > self.idle_timeout_s]
            for sid in stale:
                del self._sessions[sid]
            self.expired += len(stale)
            return len(stale)

    def _touch(self, s: Session) -> None:
        s.last_used = self._clock()
        self._sessions.move_to_end(s.id)

    def create(self, owner: str) -> Session:
        with self._lock:
            self.expire()
            while len(self._sessions) >= self.max_sessions:
                self._sessions.popitem(last=False)
                self.evicted += 1
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
            del self._sessions[s.id]

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

    def add_image(self, session: Session, image_hash: str, volume: Volume) -> None:
        """Put an image into a session (making it current) and evict others to stay within the budget."""
        nbytes = int(volume.array.nbytes)
        if nbytes > self.max_bytes:
            raise CacheFull(f"image of {nbytes / 2**20:.1f} MiB exceeds the server's cache budget of "
                            f"{self.max_bytes / 2**20:.1f} MiB")
        with self._lock:
            if session.id not in self._sessions:
                raise SessionNotFound("the session was evicted or deleted during the upload; create a new one")
            if image_hash in session.images:
                session.images.move_to_end(image_hash)
            else:
                session.images[image_hash] = volume
            session.current = image_hash
            self._touch(session)
            while len(session.images) > self.max_images_per_session:
                session.images.popitem(last=False)
            # oldest other sessions go first; then this session's own older images.
            while self.total_bytes() > self.max_bytes:
                victim = next((sid for sid in self._sessions if sid != session.id), None)
                if victim is not None:
                    del self._sessions[victim]
                    self.evicted += 1
                    continue
                old = next(h for h in session.images if h != image_hash)
                session.images.pop(old)

    def image(self, session: Session, image_hash: Optional[str] = None) -> Tuple[str, Volume]:
        key = image_hash or session.current
        if key is None:
            raise ImageNotFound("no image in this session yet: upload one first (PUT .../image)")
        vol = session.images.get(key)
        if vol is None:
            raise ImageNotFound(f"image {key[:12]}... is not held by this session: upload it first")
        return key, vol
