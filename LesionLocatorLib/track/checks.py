"""What tracking accepts, checked the same way before any work, locally and by the remote tracker (no torch)."""
from __future__ import annotations

import os
from typing import List, Sequence, Union

import numpy as np

from ..core.geometry import Volume
from ..core.image_io import load_volume

PROPAGATIONS = ("learned", "classical")
REFINES = ("unet", "segment", "none")


class TrackingError(ValueError):
    """Tracking cannot be done as asked (incompatible scans, missing models, bad prompts)."""


def check_compatible(images: Sequence[Volume]) -> None:
    """Refuse pairs that cannot be the same patient's CT region: other modality or disjoint fields of view."""
    ref = images[0]
    extent0 = np.array(ref.shape) * np.array(ref.spacing)
    for i, im in enumerate(images[1:], start=1):
        extent = np.array(im.shape) * np.array(im.spacing)
        ratio = np.max(np.maximum(extent, extent0) / np.maximum(np.minimum(extent, extent0), 1e-6))
        if ratio > 8:
            raise TrackingError(f"follow-up {i} covers a field of view {extent.round()} mm vs the baseline's "
                                f"{extent0.round()} mm: too different to track between")
        lo = np.percentile(im.array[::4, ::4, ::4], 1)
        if lo > -20 and np.percentile(ref.array[::4, ::4, ::4], 1) < -500:
            raise TrackingError(f"follow-up {i} does not look like a CT in HU (1st percentile {lo:.0f}) while "
                                "the baseline does: baseline and follow-up must be the same modality")


def load_scans(baseline: Union[Volume, str, os.PathLike],
               followups: Sequence[Union[Volume, str, os.PathLike]]) -> List[Volume]:
    """Read and check every scan before any work (the local and the remote tracker), so a bad follow-up fails
    before anything runs, with the same error on both backends."""
    if isinstance(followups, (str, os.PathLike, Volume)) or not followups:
        raise TrackingError("give the follow-up scans as a non-empty list")
    images = [load_volume(im) for im in [baseline, *followups]]
    check_compatible(images)
    return images
