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
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .geometry import Volume
from ..model.preprocessing import PreprocessedGrid

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


# -- the prompt vocabulary ---------------------------------------------------------------------
#
# Every front end (published JSON file, keyword arguments, the server's wire format, Slicer markups) ends in
# ``LesionPrompts``: {lesion id: [Point | Box | Mask, ...]} in input voxels. Several prompts of one lesion
# follow one rule (``effective``): a mask wins over everything, else the last box wins over points, else
# every point is segmented and the masks are united (each point is a published single-point prompt).

LesionPrompts = Dict[int, List[Prompt]]
# every way a caller may hand prompts to a session or tracker (see ``resolve_prompts``)
PromptsArg = Union[Mapping[Any, Union[Prompt, Sequence[Prompt]]], np.ndarray, None]
SPACES = ("voxel", "lps", "ras")
JSON_KINDS = ("point", "box", "mask", "point_lps", "point_ras", "box_lps", "box_ras")


def effective(prompts: Sequence[Prompt]) -> List[Prompt]:
    """The prompts of one lesion that are run: the last mask, else the last box, else all points."""
    masks = [p for p in prompts if isinstance(p, Mask)]
    if masks:
        return [masks[-1]]
    boxes = [p for p in prompts if isinstance(p, Box)]
    if boxes:
        return [boxes[-1]]
    return list(prompts)


def lesion_prompts(prompts: Mapping[Any, Union[Prompt, Sequence[Prompt]]]) -> LesionPrompts:
    """Normalise {id: prompt or [prompts]} (ids as int or digit strings) to ``LesionPrompts``, sorted by id."""
    out: LesionPrompts = {}
    for key, value in prompts.items():
        lid = _check_id(key)
        items = [value] if isinstance(value, (Point, Box, Mask)) else list(value)
        if not items:
            raise PromptError(f"lesion {lid} has no prompt")
        for p in items:
            if not isinstance(p, (Point, Box, Mask)):
                raise PromptError(f"lesion {lid}: {type(p).__name__} is not a Point, Box or Mask")
        out.setdefault(lid, []).extend(items)
    return dict(sorted(out.items()))


def _per_lesion(d: Any) -> List[Tuple[Any, Any]]:
    if d is None:
        return []
    if isinstance(d, Mapping):
        return list(d.items())
    return list(enumerate(d, start=1))


def _several(value: Any, single_ndim: int, what: str) -> List[np.ndarray]:
    """One prompt's numbers, or a list of them (several points / boxes for one lesion)."""
    arr = _numbers(value, what)
    return [arr] if arr.ndim <= single_ndim else list(arr)


def collect_prompts(image: Optional[Volume] = None, points: Any = None, boxes: Any = None, masks: Any = None,
                    space: str = "voxel") -> LesionPrompts:
    """Keyword-argument prompts -> ``LesionPrompts`` (the Python API's vocabulary).

    points: {id: (z, y, x)} voxels or {id: [(z, y, x), ...]}; with space 'lps'/'ras' (x, y, z) mm.
    boxes: {id: (z0, z1, y0, y1, x0, x1)} half-open voxels; with space 'lps'/'ras' two corners [[x,y,z],[x,y,z]].
    masks: an instance label map on the image grid, or {id: bool mask}.
    """
    if space not in SPACES:
        raise PromptError(f"space must be one of {SPACES}, got {space!r}")
    if space != "voxel" and image is None:
        raise PromptError("world-coordinate prompts need the image geometry")
    out: Dict[int, List[Prompt]] = {}
    ras = space == "ras"
    for lid, value in _per_lesion(points):
        for arr in _several(value, 1, f"lesion {lid}: point"):
            if arr.shape != (3,):
                raise PromptError(f"lesion {lid}: a point needs 3 coordinates, got {arr.tolist()}")
            pt = Point(tuple(float(v) for v in arr)) if space == "voxel" else point_from_world(arr, image, ras)
            out.setdefault(_check_id(lid), []).append(pt)  # type: ignore[arg-type]
    for lid, value in _per_lesion(boxes):
        for arr in _several(value, 1 if space == "voxel" else 2, f"lesion {lid}: box"):
            if space == "voxel":
                if arr.shape != (6,) or np.any(arr != np.round(arr)):
                    raise PromptError(f"lesion {lid}: a box needs six integers [z0, z1, y0, y1, x0, x1], "
                                      f"got {arr.tolist()}")
                box = Box(tuple(int(v) for v in arr))  # type: ignore[arg-type]
            else:
                if arr.shape != (2, 3):
                    raise PromptError(f"lesion {lid}: a world box needs two corners [[x,y,z],[x,y,z]]")
                box = box_from_world(arr[0], arr[1], image, ras=ras)  # type: ignore[arg-type]
            out.setdefault(_check_id(lid), []).append(box)
    if masks is not None:
        if isinstance(masks, np.ndarray):
            for lid, m in prompts_from_label_map(masks).items():
                out.setdefault(lid, []).append(m)
        else:
            for lid, m in _per_lesion(masks):
                out.setdefault(_check_id(lid), []).append(as_mask_prompt(m, None if image is None else image.shape))
    return dict(sorted(out.items()))


def resolve_prompts(image: Volume, prompts: PromptsArg, points: Any, boxes: Any, masks: Any,
                    space: str) -> LesionPrompts:
    """Every way of giving prompts -> validated ``LesionPrompts`` on ``image`` (one code path)."""
    if prompts is not None and (points is not None or boxes is not None or masks is not None):
        raise PromptError("give prompts either as one mapping / label map or as points=/boxes=/masks=")
    if isinstance(prompts, np.ndarray):
        todo = collect_prompts(image, masks=prompts)
    elif prompts is not None:
        todo = lesion_prompts(prompts)
    else:
        todo = collect_prompts(image, points, boxes, masks, space)
    if not todo:
        raise PromptError("no prompt given")
    for items in todo.values():
        for p in items:
            validate(p, image.shape)
    return todo


def as_mask_prompt(value: Any, shape: Optional[Sequence[int]] = None) -> "Mask":
    """A Mask, a full-size array, or anything with ``full(shape)`` (a LesionMask) -> Mask."""
    if isinstance(value, Mask):
        return value
    if hasattr(value, "full") and shape is not None:
        return Mask(value.full(shape).astype(bool))
    arr = np.asarray(value)
    if arr.ndim != 3:
        raise PromptError(f"a mask prompt must be a 3D array on the image grid, got shape {arr.shape}")
    return Mask(arr.astype(bool))


def _numbers(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        raise PromptError(f"{what} must be numbers, got {value!r}") from None
    if not np.all(np.isfinite(arr)):
        raise PromptError(f"{what} must be finite numbers, got {value!r}")
    return arr


def parse_prompts(data: Mapping[str, Any], image: Optional[Volume] = None,
                  arrays: Optional[Sequence[np.ndarray]] = None) -> LesionPrompts:
    """The published JSON prompts and this project's extensions -> ``LesionPrompts``.

    ``{"1": {"point": [z, y, x]}}`` / ``{"1": {"box": [z0, z1, y0, y1, x0, x1]}}`` (published), world variants
    ``point_lps`` / ``point_ras`` ([x, y, z] mm) and ``box_lps`` / ``box_ras`` (two corners), several prompts of
    one lesion as a list ``{"1": [{"point": ...}, {"point": ...}]}``, and (wire format) ``{"mask": {"bbox":
    [z0, z1, y0, y1, x0, x1], "array": k}}`` whose crop is ``arrays[k]``. Lesion ids may have gaps and be
    above 255. The server parses requests with this function; the client writes them with ``prompts_to_json``.
    """
    if not isinstance(data, Mapping) or not data:
        raise PromptError("prompts must be a non-empty JSON object {lesion_id: {...}}")
    out: LesionPrompts = {}
    for key, entry in data.items():
        lid = _check_id(key)
        if lid in out:
            raise PromptError(f"lesion id {lid} appears twice")
        entries = entry if isinstance(entry, list) else [entry]
        if not entries:
            raise PromptError(f"lesion {lid} has an empty prompt list")
        out[lid] = [_parse_entry(lid, e, image, arrays) for e in entries]
    return dict(sorted(out.items()))


def _parse_entry(lid: int, entry: Any, image: Optional[Volume], arrays: Optional[Sequence[np.ndarray]]) -> Prompt:
    if not isinstance(entry, Mapping):
        raise PromptError(f"lesion {lid}: expected an object like {{'point': [z, y, x]}}, got {entry!r}")
    kinds = [k for k in JSON_KINDS if k in entry]
    if len(kinds) != 1 or len(entry) != 1:
        raise PromptError(f"lesion {lid}: give exactly one of {', '.join(JSON_KINDS)} (got {sorted(entry)})")
    kind, value = kinds[0], entry[kinds[0]]
    if kind == "mask":
        return _parse_mask(lid, value, image, arrays)
    arr = _numbers(value, f"lesion {lid}: {kind}")
    if kind in ("point_lps", "point_ras", "box_lps", "box_ras") and image is None:
        raise PromptError(f"lesion {lid}: world-coordinate prompts need the image geometry")
    if kind == "point":
        if arr.shape != (3,):
            raise PromptError(f"lesion {lid}: point must be [z, y, x], got {value!r}")
        return Point(tuple(float(v) for v in arr))  # type: ignore[arg-type]
    if kind == "box":
        if arr.shape != (6,) or np.any(arr != np.round(arr)):
            raise PromptError(f"lesion {lid}: box must be six integers [z0, z1, y0, y1, x0, x1], got {value!r}")
        return Box(tuple(int(v) for v in arr))  # type: ignore[arg-type]
    if kind.startswith("point_"):
        if arr.shape != (3,):
            raise PromptError(f"lesion {lid}: {kind} must be [x, y, z] in mm, got {value!r}")
        return point_from_world(arr, image, ras=kind.endswith("ras"))  # type: ignore[arg-type]
    if arr.shape != (2, 3):
        raise PromptError(f"lesion {lid}: {kind} must be two corners [[x, y, z], [x, y, z]] in mm")
    return box_from_world(arr[0], arr[1], image, ras=kind.endswith("ras"))  # type: ignore[arg-type]


def _parse_mask(lid: int, value: Any, image: Optional[Volume], arrays: Optional[Sequence[np.ndarray]]) -> Mask:
    if image is None or arrays is None:
        raise PromptError(f"lesion {lid}: mask prompts come as label maps or through the wire format, not JSON")
    if not isinstance(value, Mapping) or set(value) != {"bbox", "array"}:
        raise PromptError(f"lesion {lid}: a mask needs {{'bbox': [z0, z1, y0, y1, x0, x1], 'array': k}}")
    bbox = _numbers(value["bbox"], f"lesion {lid}: mask bbox")
    k = value["array"]
    if bbox.shape != (6,) or np.any(bbox != np.round(bbox)) or not isinstance(k, int) or not 0 <= k < len(arrays):
        raise PromptError(f"lesion {lid}: malformed mask reference {dict(value)!r}")
    b = [int(v) for v in bbox]
    validate_box(Box(tuple(b)), image.shape)  # type: ignore[arg-type]
    crop = np.asarray(arrays[k])
    if crop.shape != (b[1] - b[0], b[3] - b[2], b[5] - b[4]):
        raise PromptError(f"lesion {lid}: mask crop of shape {crop.shape} does not fit its bbox {b}")
    full = np.zeros(image.shape, bool)
    full[b[0]:b[1], b[2]:b[3], b[4]:b[5]] = crop.astype(bool)
    return Mask(full)


def prompts_to_json(prompts: Mapping[int, Union[Prompt, Sequence[Prompt]]],
                    arrays: Optional[List[np.ndarray]] = None) -> Dict[str, Any]:
    """``LesionPrompts`` -> the JSON that ``parse_prompts`` reads (voxel coordinates). Mask crops are appended
    to ``arrays`` and referenced by index (the wire format); without ``arrays`` masks are refused."""
    from .results import tight_bbox

    out: Dict[str, Any] = {}
    for lid, items in lesion_prompts(prompts).items():
        entries = []
        for p in items:
            if isinstance(p, Point):
                entries.append({"point": [float(v) if not float(v).is_integer() else int(v) for v in p.zyx]})
            elif isinstance(p, Box):
                entries.append({"box": [int(v) for v in p.bounds]})
            else:
                if arrays is None:
                    raise PromptError("mask prompts are stored as label maps, not JSON")
                bb = tight_bbox(p.mask)
                if bb is None:
                    raise PromptError(f"lesion {lid}: the mask prompt is empty")
                arrays.append(np.ascontiguousarray(p.mask[bb[0]:bb[1], bb[2]:bb[3], bb[4]:bb[5]]))
                entries.append({"mask": {"bbox": list(bb), "array": len(arrays) - 1}})
        out[str(lid)] = entries[0] if len(entries) == 1 else entries
    return out


def load_prompt_json(source: Union[str, os.PathLike, Mapping[str, Any]], image: Optional[Volume] = None) -> LesionPrompts:
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


def prompts_from_label_map(labels: np.ndarray) -> Dict[int, Mask]:
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
