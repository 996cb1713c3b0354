"""CT normalisation, crop-to-non-zero and the per-image geometry of the preprocessed grid."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .plans import CTStats, ModelConfig
from ..core.boxes import Spans
from .resampling import GridResampler, resampled_shape


def normalize_ct(array: np.ndarray, stats: CTStats) -> np.ndarray:
    """nnU-Net CTNormalization in float32: clip to the 0.5/99.5 percentiles, subtract mean, divide by std."""
    out = np.array(array, dtype=np.float32, copy=True)
    np.clip(out, stats.lower, stats.upper, out=out)
    out -= stats.mean
    out /= max(stats.std, 1e-8)
    return out


def nonzero_bbox(array: np.ndarray) -> Spans:
    """Bounding box of non-zero voxels (nnU-Net's crop_to_nonzero; holes do not change a box)."""
    nz = array != 0
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(np.any(nz, axis=other))
        if idx.size == 0:
            return tuple((0, int(s)) for s in array.shape)  # type: ignore[return-value]
        out.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(out)  # type: ignore[return-value]


@dataclass
class PreprocessedGrid:
    """Where one input image lands in the model's grid (computed once per image)."""

    input_shape: tuple[int, int, int]
    crop: Spans  # in input voxels
    cropped_shape: tuple[int, int, int]
    resampled_shape: tuple[int, int, int]
    padded_shape: tuple[int, int, int]
    pad_below: tuple[int, int, int]
    forward: GridResampler  # cropped input -> resampled
    backward: GridResampler  # resampled -> cropped input (probabilities)
    seg: GridResampler  # cropped input -> resampled, for masks

    @property
    def crop_start(self) -> np.ndarray:
        return np.array([a for a, _ in self.crop])

    @property
    def scale(self) -> np.ndarray:
        """resampled / cropped size per axis (the published prompt scaling factor)."""
        return np.asarray(self.resampled_shape, float) / np.asarray(self.cropped_shape, float)


def plan_grid(array: np.ndarray, spacing: Sequence[float], config: ModelConfig, crop: Spans | None = None) -> PreprocessedGrid:
    crop = crop if crop is not None else nonzero_bbox(array)
    cropped = tuple(b - a for a, b in crop)
    res = resampled_shape(cropped, spacing, config.spacing)
    if min(res) < 1:
        raise ValueError(f"image of shape {cropped} at spacing {tuple(spacing)} is too small to resample")
    padded = tuple(max(r, p) for r, p in zip(res, config.patch_size))
    pad_below = tuple((p - r) // 2 for p, r in zip(padded, res))
    return PreprocessedGrid(
        input_shape=tuple(int(s) for s in array.shape),  # type: ignore[arg-type]
        crop=crop,
        cropped_shape=cropped,  # type: ignore[arg-type]
        resampled_shape=res,  # type: ignore[arg-type]
        padded_shape=padded,  # type: ignore[arg-type]
        pad_below=pad_below,  # type: ignore[arg-type]
        forward=GridResampler(cropped, res, spacing, config.spacing, config.resampling_data),
        backward=GridResampler(res, cropped, config.spacing, spacing, config.resampling_prob),
        seg=GridResampler(cropped, res, spacing, config.spacing, config.resampling_seg),
    )


def clip_ranges(array: np.ndarray, grid: PreprocessedGrid, stats: CTStats):
    """(min, max) of the normalised cropped image used by skimage's output clipping (cubic only).

    Normalisation is monotonic, so the range of the normalised data is the normalised range.
    """
    fwd = grid.forward
    if fwd.spec.kind == "torch" or fwd.spec.order_data <= 1:
        return None
    sub = array[tuple(slice(a, b) for a, b in grid.crop)]
    if fwd.sep_axis is None:
        lo, hi = normalize_ct(np.array([sub.min(), sub.max()]), stats)
        return float(lo), float(hi)
    other = tuple(a for a in range(3) if a != fwd.sep_axis)
    mins = normalize_ct(sub.min(axis=other), stats)
    maxs = normalize_ct(sub.max(axis=other), stats)
    return [(float(a), float(b)) for a, b in zip(mins, maxs)]
