"""LesionLocatorLib: promptable 3D lesion segmentation and longitudinal tracking (no Slicer needed).

Heavy parts (torch, networks) are imported lazily so that ``import LesionLocatorLib`` is cheap.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .core.geometry import GeometryError, Volume  # noqa: F401
from .core.image_io import ImageReadError, read_image, write_image  # noqa: F401


def __getattr__(name: str):
    if name == "LesionSegmenter":
        from .segment.segmenter import LesionSegmenter

        return LesionSegmenter
    if name == "LesionTracker":
        from .track.tracker import LesionTracker

        return LesionTracker
    raise AttributeError(name)
