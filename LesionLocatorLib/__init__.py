"""LesionLocatorLib: promptable 3D lesion segmentation and longitudinal tracking (no Slicer needed).

    from LesionLocatorLib import open_backend, read_image
    backend = open_backend(model="LesionLocatorModel.zip")     # or open_backend(server=URL, token=...)
    session = backend.session()
    session.set_image(read_image("ct.nii.gz"))
    result = session.segment(points={1: (159, 243, 184)})

Heavy parts (torch, networks) are imported lazily so that ``import LesionLocatorLib`` is cheap.
"""
from __future__ import annotations

__version__ = "0.2.0"

from .core.geometry import GeometryError, Volume
from .core.image_io import ImageReadError, read_image, write_image
from .core.prompts import Box, LesionPrompts, Mask, Point, PromptError, load_prompt_json, parse_prompts
from .core.results import LesionMask, LesionStatus, SegmentationResult, TrackingResult

# name -> submodule, imported on first use (these pull in torch)
_LAZY = {
    "open_backend": "backend",
    "LocalBackend": "backend",
    "LesionLocatorModel": "model.engine",
    "SegmentSession": "segment.session",
    "Cancelled": "core.jobs",
    "LesionTracker": "track.tracker",
    "TrackingError": "track.tracker",
    "CheckpointError": "model.checkpoint",
    "RemoteBackend": "serve.client",
    "LongitudinalReport": "measure.report",
}

__all__ = [
    "__version__", "Volume", "GeometryError", "ImageReadError", "read_image", "write_image",
    "Point", "Box", "Mask", "LesionPrompts", "PromptError", "parse_prompts", "load_prompt_json",
    "LesionMask", "LesionStatus", "SegmentationResult", "TrackingResult", *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'LesionLocatorLib' has no attribute {name!r}")
