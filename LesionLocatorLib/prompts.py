"""Prompts: parsing (published JSON, world coordinates, label maps) and encoding into the model grid.

Encoding follows the published pipeline: a point becomes a binary ball of radius 5 voxels
(``skimage.morphology.ball(5)`` with strict_radius=False) in the resampled grid, a box a filled
block one voxel larger on every side; a mask prompt is reduced to its centroid or bounding box.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from .geometry import Volume
from .preprocessing import PreprocessedGrid

BALL_RADIUS = 5


class PromptError(ValueError):
    """A prompt is malformed, of the wrong kind, or lies outside the image."""


@dataclass(frozen=True)
class Point:
    zyx: tuple[float, float, float]  # input-image voxel coordinates


@dataclass(frozen=True)
class Box:
    bounds: tuple[int, int, int, int, int, int]  # (z0, z1, y0, y1, x0, x1), half-open input voxels


@dataclass
class Mask:
    mask: np.ndarray  # bool on the input grid


Prompt = Union[Point, Box, Mask]


def ball(radius: int = BALL_RADIUS) -> np.ndarray:
    """skimage.morphology.ball(radius, strict_radius=False): x²+y²+z² <= (radius + 0.5)²."""
    r = np.arange(-radius, radius + 1)
    z, y, x = np.meshgrid(r, r, r, indexing="ij")
    return (x * x + y * y + z * z) <= (radius + 0.5) ** 2


# -- validation --------------------------------------------------------------------------------

def _check_id(key: Any) -> int:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        lid = int(key)
    elif isinstance(key, str) and key.strip().isdigit():
        lid = int(key)
    else:
        raise PromptError(f"lesion id {key!r} is not an integer")
    if lid < 1:
        raise PromptError(f"lesion id {key!r} must be a positive integer (0 is background)")
    return lid


def validate_point(p: Point, shape: Sequence[int]) -> Point:
    zyx = np.asarray(p.zyx, dtype=float)
    if zyx.shape != (3,) or not np.all(np.isfinite(zyx)):
        raise PromptError(f"a point needs three finite coordinates (z, y, x), got {p.zyx}")
    if np.any(zyx < -0.5) or np.any(zyx > np.asarray(shape) - 0.5):
        raise PromptError(f"point (z, y, x) = {tuple(float(v) for v in zyx)} lies outside the image of shape "
                          f"{tuple(shape)}")
    return p


def validate_box(b: Box, shape: Sequence[int]) -> Box:
    vals = list(b.bounds)
    if len(vals) != 6:
        raise PromptError(f"a box needs six values [z0, z1, y0, y1, x0, x1], got {vals}")
    for ax in range(3):
        lo, hi = vals[2 * ax], vals[2 * ax + 1]
        if hi <= lo:
            raise PromptError(f"box {vals} is empty along axis {'zyx'[ax]} (upper bound must exceed lower)")
        if lo < 0 or hi > shape[ax]:
            raise PromptError(f"box {vals} lies (partly) outside the image of shape {tuple(shape)}")
    return b


def validate(prompt: Prompt, shape: Sequence[int]) -> Prompt:
    if isinstance(prompt, Point):
        return validate_point(prompt, shape)
    if isinstance(prompt, Box):
        return validate_box(prompt, shape)
    if isinstance(prompt, Mask):
        if tuple(prompt.mask.shape) != tuple(shape):
            raise PromptError(f"mask prompt of shape {prompt.mask.shape} does not match the image {tuple(shape)}")
        if not prompt.mask.any():
            raise PromptError("mask prompt is empty")
        return prompt
    raise PromptError(f"unknown prompt type {type(prompt).__name__}")


# -- world coordinates -------------------------------------------------------------------------

def point_from_world(xyz: Sequence[float], image: Volume, ras: bool = False) -> Point:
    return Point(tuple(float(v) for v in image.world_to_voxel(xyz, ras=ras)))  # type: ignore[arg-type]


def box_from_world(corner_a: Sequence[float], corner_b: Sequence[float], image: Volume, ras: bool = False) -> Box:
    """Axis-aligned voxel box spanning two opposite world corners (voxel centres inside are kept)."""
    a = image.world_to_voxel(corner_a, ras=ras)
    b = image.world_to_voxel(corner_b, ras=ras)
    lo = np.ceil(np.minimum(a, b) - 1e-6).astype(int)
    hi = np.floor(np.maximum(a, b) + 1e-6).astype(int) + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, image.shape)
    return Box((int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])))


# -- parsing -----------------------------------------------------------------------------------

def parse_prompts(data: Mapping[str, Any], image: Volume | None = None) -> dict[int, Prompt]:
    """Published JSON prompts (``{"1": {"point": [z, y, x]}}`` / ``{"1": {"box": [...]}}``), plus world
    variants ``point_lps`` / ``point_ras`` ([x, y, z] mm) and ``box_lps`` / ``box_ras`` (two corners).

    Lesion ids may have gaps and be above 255.
    """
    if not isinstance(data, Mapping) or not data:
        raise PromptError("prompt file must be a non-empty JSON object {lesion_id: {...}}")
    out: dict[int, Prompt] = {}
    for key, entry in data.items():
        lid = _check_id(key)
        if lid in out:
            raise PromptError(f"lesion id {lid} appears twice")
        if not isinstance(entry, Mapping):
            raise PromptError(f"lesion {lid}: expected an object like {{'point': [z, y, x]}}, got {entry!r}")
        kinds = [k for k in ("point", "box", "point_lps", "point_ras", "box_lps", "box_ras") if k in entry]
        if len(kinds) != 1:
            raise PromptError(f"lesion {lid}: give exactly one of point, box, point_lps, point_ras, box_lps, "
                              f"box_ras (got {sorted(entry)})")
        kind, value = kinds[0], entry[kinds[0]]
        try:
            arr = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            raise PromptError(f"lesion {lid}: {kind} must be numbers, got {value!r}") from None
        if kind in ("point_lps", "point_ras", "box_lps", "box_ras") and image is None:
            raise PromptError(f"lesion {lid}: world-coordinate prompts need the image geometry")
        if kind == "point":
            if arr.shape != (3,):
                raise PromptError(f"lesion {lid}: point must be [z, y, x], got {value!r}")
            out[lid] = Point(tuple(float(v) for v in arr))  # type: ignore[arg-type]
        elif kind == "box":
            if arr.shape != (6,) or np.any(arr != np.round(arr)):
                raise PromptError(f"lesion {lid}: box must be six integers [z0, z1, y0, y1, x0, x1], got {value!r}")
            out[lid] = Box(tuple(int(v) for v in arr))  # type: ignore[arg-type]
        elif kind.startswith("point_"):
            if arr.shape != (3,):
                raise PromptError(f"lesion {lid}: {kind} must be [x, y, z] in mm, got {value!r}")
            out[lid] = point_from_world(arr, image, ras=kind.endswith("ras"))  # type: ignore[arg-type]
        else:
            if arr.shape != (2, 3):
                raise PromptError(f"lesion {lid}: {kind} must be two corners [[x, y, z], [x, y, z]] in mm")
            out[lid] = box_from_world(arr[0], arr[1], image, ras=kind.endswith("ras"))  # type: ignore[arg-type]
    return dict(sorted(out.items()))


def load_prompt_json(source: str | os.PathLike | Mapping[str, Any], image: Volume | None = None) -> dict[int, Prompt]:
    if isinstance(source, Mapping):
        return parse_prompts(source, image)
    path = Path(source)
    if not path.is_file():
        raise PromptError(f"prompt file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"prompt file {path} is not valid JSON: {exc}") from exc
    return parse_prompts(data, image)


def prompts_from_label_map(labels: np.ndarray) -> dict[int, Prompt]:
    """One mask prompt per non-zero id of an instance label map (any integer ids)."""
    if labels.ndim != 3:
        raise PromptError(f"label map must be 3D, got shape {labels.shape}")
    if np.issubdtype(labels.dtype, np.floating):
        if np.any(labels != np.round(labels)):
            raise PromptError("label map holds non-integer values")
        labels = labels.astype(np.int64)
    ids = [int(v) for v in np.unique(labels) if v != 0]
    if any(i < 0 for i in ids):
        raise PromptError("label map holds negative ids")
    return {i: Mask(labels == i) for i in ids}


def prompts_to_json(prompts: Mapping[int, Prompt]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lid, p in prompts.items():
        if isinstance(p, Point):
            out[str(lid)] = {"point": [float(v) if not float(v).is_integer() else int(v) for v in p.zyx]}
        elif isinstance(p, Box):
            out[str(lid)] = {"box": list(p.bounds)}
        else:
            raise PromptError("mask prompts are stored as label maps, not JSON")
    return out


# -- encoding into the resampled grid ------------------------------------------------------------

def point_to_resampled(p: Point, grid: PreprocessedGrid) -> tuple[int, int, int]:
    """Input voxel -> resampled-grid voxel: subtract the crop origin once, scale by the shape ratio, round."""
    q = np.round((np.asarray(p.zyx, float) - grid.crop_start) * grid.scale).astype(int)
    q = np.clip(q, 0, np.asarray(grid.resampled_shape) - 1)
    return tuple(int(v) for v in q)  # type: ignore[return-value]


def box_to_resampled(b: Box, grid: PreprocessedGrid) -> tuple[int, int, int, int, int, int]:
    """Half-open input box -> enlarged half-open box in the resampled grid (floor lower, ceil upper, +-1, clip).

    Computed in signed integers: the published uint16 arithmetic wrapped a box starting at 0.
    """
    out = []
    for ax in range(3):
        lo = (b.bounds[2 * ax] - grid.crop_start[ax]) * grid.scale[ax]
        hi = (b.bounds[2 * ax + 1] - grid.crop_start[ax]) * grid.scale[ax]
        lo_i = max(int(np.floor(lo)) - 1, 0)
        hi_i = min(int(np.ceil(hi)) + 1, grid.resampled_shape[ax])
        out += [lo_i, hi_i]
    return tuple(out)  # type: ignore[return-value]


@dataclass
class EncodedPrompt:
    """A prompt channel known on a box of the resampled grid (zero elsewhere)."""

    kind: str  # 'point' or 'box'
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # resampled-grid box of the stamp
    stamp: np.ndarray  # uint8 on ``box``
    sparse: list[int]  # the published `sparse_prompt_resampled_grid`

    @property
    def bbox_incl(self) -> tuple[list[int], list[int]]:
        """Inclusive bounding box of the non-zero prompt voxels (resampled grid)."""
        nz = np.argwhere(self.stamp > 0)
        lo = nz.min(0) + [a for a, _ in self.box]
        hi = nz.max(0) + [a for a, _ in self.box]
        return [int(v) for v in lo], [int(v) for v in hi]

    def voxels(self) -> int:
        return int(np.count_nonzero(self.stamp))

    def on_box(self, box) -> np.ndarray:
        """The prompt channel cut to ``box`` (resampled-grid coordinates, may extend beyond the grid)."""
        out = np.zeros([b - a for a, b in box], dtype=np.float32)
        src, dst = [], []
        for (pa, pb), (a, b) in zip(self.box, box):
            lo, hi = max(pa, a), min(pb, b)
            if hi <= lo:
                return out
            src.append(slice(lo - pa, hi - pa))
            dst.append(slice(lo - a, hi - a))
        out[tuple(dst)] = self.stamp[tuple(src)]
        return out


def encode_point_at(center: Sequence[int], shape: Sequence[int], radius: int = BALL_RADIUS) -> EncodedPrompt:
    """Stamp the ball at a resampled-grid voxel, clipped to the grid."""
    b = ball(radius)
    box, src = [], []
    for c, n in zip(center, shape):
        lo, hi = c - radius, c + radius + 1
        box.append((max(lo, 0), min(hi, n)))
        src.append(slice(max(lo, 0) - lo, (2 * radius + 1) - (hi - min(hi, n))))
    return EncodedPrompt("point", tuple(box), b[tuple(src)].astype(np.uint8), [int(v) for v in center])  # type: ignore[arg-type]


def encode_box_at(rbox: Sequence[int]) -> EncodedPrompt:
    box = ((rbox[0], rbox[1]), (rbox[2], rbox[3]), (rbox[4], rbox[5]))
    stamp = np.ones([b - a for a, b in box], dtype=np.uint8)
    return EncodedPrompt("box", box, stamp, [int(v) for v in rbox])


def mask_to_resampled(mask: np.ndarray, grid: PreprocessedGrid) -> tuple[np.ndarray, tuple]:
    """Resample a mask prompt as a segmentation, on the part of the resampled grid it can reach."""
    from .results import tight_bbox

    cropped = mask[tuple(slice(a, b) for a, b in grid.crop)]
    tb = tight_bbox(cropped)
    if tb is None:
        raise PromptError("mask prompt is empty inside the image's non-zero region")
    box = []
    for ax in range(3):
        lo = int(np.floor((tb[2 * ax] - 1) * grid.scale[ax])) - 1
        hi = int(np.ceil((tb[2 * ax + 1] + 1) * grid.scale[ax])) + 1
        box.append((max(lo, 0), min(hi, grid.resampled_shape[ax])))
    res = grid.seg.seg_region(cropped.astype(np.uint8), tuple(box))
    return res, tuple(box)


def encode_prompt(prompt: Prompt, grid: PreprocessedGrid, kind: str) -> EncodedPrompt:
    """Encode one prompt for a model of ``kind`` ('point' or 'box')."""
    if isinstance(prompt, Point):
        if kind != "point":
            raise PromptError("a point prompt needs the point model")
        c = point_to_resampled(prompt, grid)
        return encode_point_at(c, grid.resampled_shape)
    if isinstance(prompt, Box):
        if kind != "box":
            raise PromptError("a box prompt needs the box model")
        return encode_box_at(box_to_resampled(prompt, grid))
    if isinstance(prompt, Mask):
        res, box = mask_to_resampled(prompt.mask, grid)
        if not res.any():
            raise PromptError("mask prompt vanishes when resampled to the model spacing (too small)")
        nz = np.argwhere(res > 0) + [a for a, _ in box]
        if kind == "point":
            c = np.round(nz.mean(0)).astype(int)
            return encode_point_at(c, grid.resampled_shape)
        lo = np.maximum(nz.min(0) - 1, 0)
        hi = np.minimum(nz.max(0) + 2, grid.resampled_shape)
        return encode_box_at([int(lo[0]), int(hi[0]), int(lo[1]), int(hi[1]), int(lo[2]), int(hi[2])])
    raise PromptError(f"unknown prompt type {type(prompt).__name__}")
