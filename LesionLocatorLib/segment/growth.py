"""Growing a lesion's prediction past its patch.

The published pipeline predicts a click (and any prompt smaller than a patch) in one patch, and a larger box
in the sliding-window tiles that overlap it; everything outside is background, so a lesion larger than the
patch is cut at the patch faces. Growth continues the prediction instead:

1. Predict the published tiles (unchanged: with no growth needed the result is bit-identical).
2. The *lesion* is the set of foreground components (26-connected, on the model grid) that touch the prompt.
   If a lesion voxel's neighbour lies inside the image (not in the padding) but in no predicted tile, the
   lesion touches an *open face* in that direction.
3. Add the nnU-Net sliding-window tiles (the published step, 0.5 x patch, on the padded image) that overlap
   the lesion's bounding box, extended by one voxel across every touched open face, by a quarter patch or
   more (``next_tiles``); blend all tiles with the published Gaussian importance map (a running weighted
   sum: each tile runs once). Repeat from 2.
4. Stop when no open face is touched, or at a limit (``GrowthLimits``): a number of tiles, or an extent
   around the prompt. The outcome is recorded (``GrowthOutcome``), the stop reason included.
5. A grown result is the lesion only: other foreground the added tiles see (neighbouring structures, other
   lesions, not connected to the prompt's component) becomes background with the same confidence. With the
   bundled model on a real DeepLesion lesion at twice its size (151 ml, the voxel spacing doubled), a click
   gives Dice 0.41 in the single patch and 0.57 grown (13 tiles); keeping that other foreground gave 0.32
   (measured with an earlier, denser tile rule: 37 tiles, 0.56 without it).

Everything is a function of the prompt, the image and the weights: the tile order is fixed (sorted), so the
result is deterministic. Where tiles overlap, the blend is exactly the published sliding-window blend;
the first patch (centred on the prompt, off the sliding-window grid) keeps its place in the blend.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence, Set, Tuple

import numpy as np
import torch
from scipy import ndimage

from ..core.boxes import Spans
from ..model.sliding_window import union_box, window_tiles

Faces = Dict[Tuple[int, int], bool]  # (axis, side -1 | +1) -> touched
STEP = 0.5  # nnU-Net's (and the published inference's) tile step, in patches
UNCOVERED_LOGITS = (0.0, -1e4)  # background, as the published NaN (0/0) of never-predicted voxels becomes


@dataclass(frozen=True)
class GrowthLimits:
    """Where growth stops even though the lesion still touches an open face.

    max_tiles: tiles per lesion in all (the first ones included). A lesion one patch wide on every axis takes
    about 27 tiles (3 per axis), 1.5 patches about 64, one patch across and three long about 63 (the
    published model's patch is 160 x 179 x 179 mm). One tile costs one forward pass x folds x TTA flips;
    when the limit cuts, the tiles nearest the prompt run first.
    max_extent: the grown region stays inside a window of ``max_extent`` patches per axis centred on the
    prompt (and never smaller than the first tiles).
    """

    max_tiles: int = 64
    max_extent: float = 3.0


DEFAULT_LIMITS = GrowthLimits()

# stop reasons
NOT_NEEDED = "not needed"  # the lesion does not touch an open face of the first tiles
COMPLETE = "complete"  # grew until the lesion touched no open face
MAX_TILES = "max tiles"
MAX_EXTENT = "max extent"
OFF = "off"


@dataclass
class GrowthOutcome:
    grown: bool = False
    tiles: List[Spans] = field(default_factory=list)
    rounds: int = 0
    stop: str = OFF


class Canvas:
    """Gaussian-weighted running sum of tile logits on a growing box of the padded grid.

    ``add`` does exactly what the published sliding window does per tile (``acc += pred * g; w += g``), in
    float32; ``logits()`` is ``acc / w`` where a tile predicted, background elsewhere.
    """

    def __init__(self, box: Spans, num_classes: int, device: torch.device):
        self.box = box
        self.acc = torch.zeros((num_classes, *[b - a for a, b in box]), dtype=torch.float32, device=device)
        self.weight = torch.zeros(self.acc.shape[1:], dtype=torch.float32, device=device)

    def _slices(self, inner: Spans) -> Tuple[slice, ...]:
        return tuple(slice(a - o, b - o) for (a, b), (o, _) in zip(inner, self.box))

    def expand(self, box: Spans) -> None:
        """Grow the canvas to hold ``box`` too (values already summed are kept)."""
        new = tuple((min(a, c), max(b, d)) for (a, b), (c, d) in zip(self.box, box))
        if new == self.box:
            return
        old = Canvas(new, self.acc.shape[0], self.acc.device)
        sl = old._slices(self.box)
        old.acc[(slice(None),) + sl] = self.acc
        old.weight[sl] = self.weight
        self.box, self.acc, self.weight = old.box, old.acc, old.weight

    def add(self, tile: Spans, pred: torch.Tensor, gauss: torch.Tensor) -> None:
        if pred.device != self.acc.device:  # a CPU fallback moved the model: follow it
            self.acc, self.weight = self.acc.to(pred.device), self.weight.to(pred.device)
        self.expand(tile)
        sl = self._slices(tile)
        g = gauss.to(self.acc.device)
        self.acc[(slice(None),) + sl] += pred.to(self.acc.device) * g
        self.weight[sl] += g

    def covered(self) -> torch.Tensor:
        return self.weight > 0

    def logits(self) -> torch.Tensor:
        out = self.acc / self.weight.clamp_min(torch.finfo(torch.float32).tiny)
        hole = ~self.covered()
        if bool(hole.any()):
            for c, v in enumerate(UNCOVERED_LOGITS[: out.shape[0]]):
                out[c][hole] = v
        return out

    def keep_only(self, lesion: np.ndarray) -> None:
        """Foreground outside ``lesion`` becomes background with the same confidence (class sums swapped)."""
        drop = torch.from_numpy(self.foreground() & ~lesion).to(self.acc.device)
        fg = self.acc[1][drop]
        self.acc[1][drop] = self.acc[0][drop]
        self.acc[0][drop] = fg

    def foreground(self) -> np.ndarray:
        """argmax == 1 (2-class softmax) on covered voxels, as a CPU bool array."""
        fg = (self.acc[1] > self.acc[0]) & self.covered()
        return fg.cpu().numpy()


def lesion_of(foreground: np.ndarray, prompt: np.ndarray) -> np.ndarray:
    """The foreground components (26-connected) that share a voxel with the prompt channel."""
    hit = foreground & prompt
    if not hit.any():
        return np.zeros_like(foreground)
    labels, _ = ndimage.label(foreground, structure=np.ones((3, 3, 3), bool))
    ids = np.unique(labels[hit])
    return np.isin(labels, ids[ids > 0])


def open_faces(lesion: np.ndarray, covered: np.ndarray, canvas_box: Spans, image_box: Spans) -> Faces:
    """Per direction: does a lesion voxel have a neighbour inside the image that no tile predicted?

    ``lesion`` and ``covered`` live on ``canvas_box``; ``image_box`` is the resampled image inside the
    padded grid (padding is not image: a lesion reaching the padding has reached the image border).
    """
    faces: Faces = {}
    if not lesion.any():
        return {(a, s): False for a in range(3) for s in (-1, 1)}
    # open = inside the image and not predicted, on the canvas plus a one-voxel margin
    shape = [n + 2 for n in lesion.shape]
    inside = np.ones(shape, bool)
    for ax, ((c0, _), (i0, i1)) in enumerate(zip(canvas_box, image_box)):
        coord = np.arange(c0 - 1, c0 - 1 + shape[ax])
        ok = (coord >= i0) & (coord < i1)
        inside &= ok.reshape([-1 if a == ax else 1 for a in range(3)])
    cov = np.zeros(shape, bool)
    cov[1:-1, 1:-1, 1:-1] = covered
    open_ = inside & ~cov
    core = tuple(slice(1, -1) for _ in range(3))
    for ax in range(3):
        for side in (-1, 1):
            sl = list(core)
            sl[ax] = slice(1 + side, shape[ax] - 1 + side)
            faces[(ax, side)] = bool((lesion & open_[tuple(sl)]).any())
    return faces


def bbox_of(mask: np.ndarray, offset: Sequence[int]) -> Spans:
    """Half-open bounding box of a non-empty mask, shifted by ``offset``."""
    out = []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        out.append((int(idx[0]) + offset[ax], int(idx[-1]) + 1 + offset[ax]))
    return tuple(out)  # type: ignore[return-value]


def extent_window(first: Sequence[Spans], prompt_box: Spans, patch: Sequence[int], padded_shape: Sequence[int],
                  limits: GrowthLimits) -> Spans:
    """The box growth may reach: ``max_extent`` patches centred on the prompt, at least the first tiles."""
    u = union_box(first)
    out = []
    for ax in range(3):
        size = int(round(limits.max_extent * patch[ax]))
        c = (prompt_box[ax][0] + prompt_box[ax][1]) // 2
        lo, hi = c - size // 2, c - size // 2 + size
        out.append((max(min(lo, u[ax][0]), 0), min(max(hi, u[ax][1]), padded_shape[ax])))
    return tuple(out)  # type: ignore[return-value]


def next_tiles(lesion_box: Spans, faces: Faces, done: Set[Spans], padded_shape: Sequence[int],
               patch: Sequence[int], window: Spans) -> List[Spans]:
    """Sliding-window tiles to add: the tiles of the published grid that overlap the lesion's box, extended
    by one voxel across each touched open face and clipped to ``window``, by at least a quarter patch per
    axis (or by the whole box where it is thinner), less the tiles that already ran.

    The published rule for a box larger than a patch keeps every tile that overlaps it at all: about
    2L/p + 2 tiles per axis for an extent L, 64 for a lesion one patch wide; a quarter-patch overlap keeps
    2L/p + 1 (27) and still covers every voxel of the box (see ``window_tiles``), where each voxel is
    predicted with at least a quarter patch of context on either side by one tile or another.
    While a touched open neighbour lies inside ``window`` the result is never empty (a kept tile covers
    that neighbour, which no tile covered), so growth ends only at a complete lesion or a limit.
    """
    lo, hi = [], []
    for ax in range(3):
        a, b = lesion_box[ax]
        a -= 1 if faces[(ax, -1)] else 0
        b += 1 if faces[(ax, 1)] else 0
        lo.append(max(a, window[ax][0]))
        hi.append(min(b, window[ax][1]) - 1)
    quarter = [max(1, p // 4) for p in patch]
    return [t for t in window_tiles(padded_shape, patch, lo, hi, STEP, quarter) if t not in done]


def order_tiles(tiles: Sequence[Spans], centre: Sequence[float]) -> List[Spans]:
    """Nearest tile centre to the prompt first, then by position (a fixed order: deterministic sums)."""
    def key(t: Spans):
        d = sum(((a + b) / 2 - c) ** 2 for (a, b), c in zip(t, centre))
        return (d, t)
    return sorted(tiles, key=key)


def summary(debugs: Mapping[int, object]) -> Dict[str, object]:
    """Which lesions grew and how many tiles each used (for logs, the CLI and the server's summary)."""
    grew = sorted(int(lid) for lid, d in debugs.items() if getattr(d, "grown", False))
    return {"grown": grew, "tiles": {int(lid): int(getattr(d, "tiles", 0)) for lid, d in debugs.items()},
            "stopped": {int(lid): getattr(d, "growth_stop", "") for lid, d in debugs.items()
                        if getattr(d, "growth_stop", "") in (MAX_TILES, MAX_EXTENT)}}
