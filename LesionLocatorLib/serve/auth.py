"""Who may talk to the server: bearer tokens (a FastAPI dependency), the token-file reader, and the
request-body size guard (pure ASGI, so a body over the limit is refused while it streams in)."""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence, Tuple, Union

from starlette.requests import Request

from .errors import ApiError
from .wire import PayloadTooLarge

log = logging.getLogger("lesionlocator.server")

CLIENT_KEY_HEADER = "X-LesionLocator-Client"
MAX_CLIENT_KEY = 128
MIN_CLIENT_KEY = 8


def read_token_file(path: Union[str, os.PathLike], first_only: bool = False) -> Tuple[str, ...]:
    """Tokens, one a line (blank lines and '#' comments ignored; a byte-order mark is dropped).

    The one reader of token files: the server reads every token (one per client identity), a client takes
    the first (``first_only``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read token file {p}: {exc}") from None
    tokens = tuple(t.strip() for t in text.splitlines() if t.strip() and not t.strip().startswith("#"))
    if not tokens:
        raise ValueError(f"token file {p} holds no token")
    try:
        if os.name == "posix" and p.stat().st_mode & 0o077:
            log.warning("token file %s is readable by other users; restrict it with chmod 600", p)
    except OSError:
        pass
    return tokens[:1] if first_only else tokens


class Authenticate:
    """FastAPI dependency: checks ``Authorization: Bearer <token>`` (when the server has tokens) and returns
    the caller's owner key, derived from the token and the client key header. Sessions and uploaded images
    belong to an owner key: another token, or the same token with another client key, cannot see them."""

    def __init__(self, tokens: Sequence[str]):
        self.tokens = [t.encode("ascii") for t in tokens]

    def owner(self, request: Request) -> str:
        """The caller's owner key: the token *and* the client-key header, which is required (without it every
        client of a token-less server would share one identity) and used whole (never truncated)."""
        self(request)
        key = request.headers.get(CLIENT_KEY_HEADER)
        if not key or len(key) > MAX_CLIENT_KEY or len(key) < MIN_CLIENT_KEY or not all(33 <= ord(c) < 127 for c in key):
            raise ApiError(400, "client_key_required",
                           f"send a random {CLIENT_KEY_HEADER} header of {MIN_CLIENT_KEY}..{MAX_CLIENT_KEY} printable "
                           f"ASCII characters (e.g. secrets.token_hex(16)): your sessions are bound to it")
        return hashlib.sha256(b"lesionlocator-owner\0" + self._token(request) + b"\0" + key.encode("ascii")).hexdigest()

    @staticmethod
    def _token(request: Request) -> bytes:
        auth = request.headers.get("authorization", "")
        return auth[7:].strip().encode("latin-1") if auth[:7].lower() == "bearer " else b""

    def __call__(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        token = b""
        if auth[:7].lower() == "bearer ":
            token = auth[7:].strip().encode("latin-1")
        if self.tokens:
            # compare against every token (no early exit) so timing does not tell which prefix matched.
            ok = False
            for t in self.tokens:
                ok |= hmac.compare_digest(token, t)
            if not ok:
                msg = "missing bearer token" if not auth else "wrong token"
                raise ApiError(401, "unauthorized", f"{msg}: send 'Authorization: Bearer <token>'",
                               headers={"WWW-Authenticate": "Bearer"})
        return ""  # the token is valid (or none is needed); sessions need the owner key (``owner``)


class BodyTooLarge(PayloadTooLarge):
    """The request body streamed past the limit."""


class BodyLimit:
    """ASGI middleware: caps request bodies (uploads of scans have their own, larger cap).

    A declared Content-Length over the cap is answered 413 at once; a streamed body raises
    :class:`BodyTooLarge` from ``receive`` as soon as it passes the cap, so nothing past it is buffered."""

    def __init__(self, app: Any, max_upload: int, max_request: int, upload_suffix: str = "/image"):
        self.app = app
        self.max_upload = max_upload
        self.max_request = max_request
        self.upload_suffix = upload_suffix

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope["method"] == "PUT" and scope["path"].endswith(self.upload_suffix)
        limit = self.max_upload if upload else self.max_request
        what = "uploads" if upload else "requests"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                n = int(length)
            except ValueError:
                return await send_json(send, 400, {"error": "bad_request", "message": "invalid Content-Length"})
            if n > limit:
                return await send_json(send, 413, {"error": "payload_too_large", "message":
                                                   f"request body of {n} bytes exceeds the limit of {limit} bytes "
                                                   f"for {what}"})
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes for {what}")
            return msg

        return await self.app(scope, limited, send)


async def send_json(send: Callable, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
