"""One backend contract: ``open_backend`` returns a local or a remote backend with identical methods.

    backend = open_backend(model="LesionLocatorModel.zip")            # in this process
    backend = open_backend(server="http://gpu-box:8765", token="...")  # on a LesionLocator server
    session = backend.session(); session.set_image(ct); result = session.segment(points={1: (z, y, x)})
    tracker = backend.tracker(); tracker.set_images(ct, [fu1, fu2]); tracked = tracker.track(masks=labels)

The CLI, the demo, the server and the Slicer module switch backends with this one call.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

if TYPE_CHECKING:  # torch is imported only by the local backend: a Slicer that talks to a server needs none
    from .model.engine import Folds, LesionLocatorModel


class LocalBackend:
    """The model in this process."""

    remote = False

    def __init__(self, model: "LesionLocatorModel"):
        self.model = model

    def session(self):
        """A new per-image segmentation session (``SegmentSession``)."""
        return self.model.session()

    def tracker(self, propagation: Optional[str] = None, refine: Optional[str] = None):
        """A new tracker (``LesionTracker``): learned when the checkpoint has LesionLocatorTrack, classical
        propagation otherwise."""
        return self.model.tracker(propagation=propagation, refine=refine)

    def describe(self) -> Dict[str, Any]:
        return {"backend": "local", **self.model.settings()}

    def close(self) -> None:
        pass

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_backend(model: Union[str, os.PathLike, None] = None, server: Optional[str] = None,
                 token: Optional[str] = None, device: str = "auto", folds: "Folds" = None, tta: bool = False,
                 compile: bool = False, grow: bool = True, **client_options: Any):
    """A ``LocalBackend`` over ``model`` (None: the bundled model), or with ``server`` a ``RemoteBackend``
    that asks the server for the same folds, TTA and growth (the server's own model and device serve it).

    ``grow`` (default on) continues a lesion's prediction past its patch when it touches an open patch face;
    ``grow=False`` is the published single-patch behaviour."""
    if server is not None:
        if not str(server).strip():
            raise ValueError("the server URL is empty")
        from .serve.client import RemoteBackend

        return RemoteBackend(server, token=token, folds=folds, tta=tta, grow=grow, **client_options)
    from .model.engine import LesionLocatorModel

    return LocalBackend(LesionLocatorModel(model, device=device, folds=folds, tta=tta, compile=compile, grow=grow))
