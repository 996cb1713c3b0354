"""Progress and cancellation of long work, the same for local and remote backends."""
from __future__ import annotations

import threading
from typing import Callable, Optional

Progress = Callable[[float, str], None]  # progress(fraction in [0, 1], message)


class Cancelled(RuntimeError):
    """The caller's cancel event was set; the work stopped between two steps."""


def check_cancel(cancel: Optional[threading.Event]) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")
