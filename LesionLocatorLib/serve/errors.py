"""HTTP errors of the server: every failure is ``{"error": code, "message": text}`` with a 4xx/5xx status."""
from __future__ import annotations

from typing import Any, Dict, Optional


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, detail: Any = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.detail, self.headers = status, code, message, detail, headers


def error_for(exc: BaseException) -> ApiError:
    """Library exceptions -> HTTP answers; anything unknown is an inference failure (500)."""
    from ..core.geometry import GeometryError
    from ..core.prompts import PromptError
    from ..model.checkpoint import CheckpointError
    from .sessions import CacheFull, ImageNotFound, ServerFull, SessionNotFound
    from .wire import PayloadTooLarge, WireError

    if isinstance(exc, ApiError):
        return exc
    from ..core.jobs import Cancelled
    from .service import Abandoned

    if isinstance(exc, (Abandoned, Cancelled)):
        return ApiError(503, "abandoned", f"the request was dropped: {exc}", headers={"Retry-After": "5"})
    if isinstance(exc, PayloadTooLarge):
        return ApiError(413, "payload_too_large", str(exc))
    if isinstance(exc, WireError):
        return ApiError(400, "bad_payload", str(exc))
    if isinstance(exc, SessionNotFound):
        return ApiError(404, "unknown_session", str(exc))
    if isinstance(exc, ImageNotFound):
        return ApiError(409, "no_image", str(exc))
    if isinstance(exc, ServerFull):
        return ApiError(503, "server_full", str(exc), headers={"Retry-After": str(ServerFull.retry_after_s)})
    if isinstance(exc, CacheFull):
        return ApiError(413, "image_too_large", str(exc))
    if isinstance(exc, (PromptError, GeometryError)):
        return ApiError(422, "invalid_prompt", str(exc))
    if isinstance(exc, CheckpointError):  # e.g. a fold this server does not hold
        return ApiError(422, "unsupported_setting", str(exc))
    try:
        from ..track.checks import TrackingError
    except ImportError:  # pragma: no cover - an installation without the tracker
        TrackingError = ()  # type: ignore[assignment,misc]  # noqa: N806
    if TrackingError and isinstance(exc, TrackingError):
        return ApiError(422, "cannot_track", str(exc))
    return ApiError(500, "inference_failed", f"{type(exc).__name__}: {exc}")
