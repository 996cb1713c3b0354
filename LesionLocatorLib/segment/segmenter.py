"""LesionSegmenter: set an image once, then segment lesions from prompts as often as the user clicks.

The one prediction API used by the CLI, the server and the Slicer module. Processing is limited to
the tiles around each prompt: the image region they need is normalised and resampled on the fly
with the whole scan's sampling grid (see resampling.py), so a click costs the same on a small crop
and on a whole-body CT, and gives what whole-scan processing would give inside the patch.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from ..model import devices
from ..model.checkpoint import (CheckpointError, load_checkpoint, load_weights_strict, mirror_axes_of, resolve_model_dir,
                         select_folds)
from ..core.geometry import GeometryError, Volume
from ..core.image_io import read_image
from ..model.network import build_network, set_inference_mode
from ..model.plans import ModelConfig, load_model_config
from ..model.preprocessing import PreprocessedGrid, clip_ranges, plan_grid
from ..core.prompts import Box, EncodedPrompt, Mask, Point, Prompt, PromptError, encode_prompt, validate
from ..model.resampling import Box as GridBox
from ..core.results import LesionMask, SegmentationResult
from ..model.sliding_window import gaussian_importance, tiles_for_prompt, union_box

log = logging.getLogger(__name__)
Progress = Callable[[float, str], None]


class InferenceError(RuntimeError):
    """Inference failed (e.g. out of GPU memory without CPU fallback)."""


@dataclass
class PromptModel:
    """All folds of one model folder (point or box), on one device."""

    kind: str
    model_dir: Path
    config: ModelConfig
    folds: list[int]
    networks: list[torch.nn.Module]
    mirror_axes: tuple[int, ...]

    @classmethod
    def load(cls, model_dir: Path, kind: str, folds, device: torch.device, weights_prefix: str = "",
             other_prefixes: Sequence[str] = ()) -> "PromptModel":
        """Load every selected fold. ``weights_prefix`` picks the UNet out of a combined (Track) state dict;
        keys under ``other_prefixes`` belong to other parts and are ignored, any other key is an error."""
        fold_ids = select_folds(model_dir, folds)
        nets, axes = [], None
        config = None
        for f in fold_ids:
            ckpt = load_checkpoint(model_dir, f)
            axes = mirror_axes_of(ckpt)
            if config is None:
                config = load_model_config(model_dir, axes)
            weights = ckpt["network_weights"]
            if weights_prefix:
                foreign = [k for k in weights if not k.startswith((weights_prefix, *other_prefixes))]
                if foreign:
                    raise CheckpointError(f"{ckpt['_path']} holds keys that belong to no part of a {kind} model "
                                          f"(e.g. {foreign[:3]}): not a LesionLocator {kind} checkpoint")
                weights = {k[len(weights_prefix):]: v for k, v in weights.items() if k.startswith(weights_prefix)}
                if not weights:
                    raise CheckpointError(f"{ckpt['_path']} has no '{weights_prefix}*' weights")
            net = build_network(config, config.image_channels + 1)
            load_weights_strict(net, weights, ckpt["_path"])
            nets.append(set_inference_mode(net).to(device))
            del ckpt
        assert config is not None
        return cls(kind, Path(model_dir), config, fold_ids, nets, tuple(axes or ()))


@dataclass
class LesionDebug:
    """The published pipeline's intermediate values for one lesion (for parity checks and logs)."""

    sparse_prompt_resampled_grid: list[int]
    dense_prompt_voxels: int
    dense_prompt_bbox_incl_zyx: list[list[int]]
    padded_shape_zyx: list[int]
    tiles_start_stop_zyx: list[list[list[int]]]
    seconds: float = 0.0


@dataclass
class _ImageState:
    image: Volume
    grids: dict[str, PreprocessedGrid] = field(default_factory=dict)
    clip: dict[str, Any] = field(default_factory=dict)


class LesionSegmenter:
    """Promptable lesion segmentation (SAM-predictor style)."""

    def __init__(self, model_dirs: Mapping[str, Path], device: str | torch.device = "auto",
                 folds: int | str | Sequence[int] | None = None, tta: bool = False, compile: bool = False,
                 cpu_fallback: bool = True, num_threads: int | None = None):
        if not model_dirs:
            raise CheckpointError("no model folder given")
        self.model_dirs = dict(model_dirs)
        self.device = devices.resolve_device(device)
        devices.configure(self.device)
        self.folds = folds
        self.tta = tta
        self.compile = compile
        self.cpu_fallback = cpu_fallback
        if num_threads:
            torch.set_num_threads(num_threads)
        self._models: dict[str, PromptModel] = {}
        self._state: _ImageState | None = None
        self._recent: list[_ImageState] = []  # a few recent images (the tracker alternates two)
        self.last_debug: dict[int, LesionDebug] = {}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, prompt_type: str | Iterable[str] = "point",
                        device: str | torch.device = "auto", folds: int | str | Sequence[int] | None = None,
                        tta: bool = False, **kwargs: Any) -> "LesionSegmenter":
        """Load from a published package (zip / extracted folder) or one model folder.

        ``prompt_type`` names the model(s) to load now ('point', 'box' or both); the other one, when the
        package has it, is loaded on first use.
        """
        kinds = [prompt_type] if isinstance(prompt_type, str) else list(prompt_type)
        dirs: dict[str, Path] = {}
        for kind in ("point", "box"):
            try:
                dirs[kind] = resolve_model_dir(path, kind)
            except CheckpointError:
                if kind in kinds:
                    raise
        seg = cls(dirs, device=device, folds=folds, tta=tta, **kwargs)
        for kind in kinds:
            seg.model(kind)
        return seg

    def model(self, kind: str) -> PromptModel:
        if kind not in self._models:
            if kind not in self.model_dirs:
                raise CheckpointError(f"the checkpoint has no {kind} model; available: {sorted(self.model_dirs)}")
            t0 = time.perf_counter()
            m = PromptModel.load(self.model_dirs[kind], kind, self.folds, self.device)
            if self.compile and self.device.type == "cuda":
                m.networks = [torch.compile(n) for n in m.networks]
            self._models[kind] = m
            log.info("loaded %s model (%d fold(s)) from %s in %.1f s", kind, len(m.folds), m.model_dir,
                     time.perf_counter() - t0)
        return self._models[kind]

    @property
    def prompt_types(self) -> list[str]:
        return sorted(self.model_dirs)

    def warmup(self, kind: str = "point") -> None:
        """One forward pass at the patch size (CUDA kernels / cuDNN autotuning happen here, not on click 1)."""
        m = self.model(kind)
        x = torch.zeros((1, m.config.image_channels + 1, *m.config.patch_size), device=self.device)
        with torch.inference_mode(), devices.autocast(self.device):
            m.networks[0](x)
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- image ------------------------------------------------------------------------------
    def set_image(self, image: Volume | str | os.PathLike) -> None:
        """Use ``image`` for the next prompts. Setting the same ``Volume`` object again (or one of the last
        few) reuses its crop box and grids: do not change its voxels in place between calls."""
        for st in self._recent:
            if image is st.image:
                self._state = st
                self.last_debug = {}
                # rebinding (not mutating) keeps shallow copies of this segmenter (server views) independent
                self._recent = [st] + [s for s in self._recent if s is not st]
                return
        if not isinstance(image, Volume):
            image = read_image(image)
        arr = image.array
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise GeometryError(f"image voxels must be numbers, got dtype {arr.dtype}")
        if min(arr.shape) < 1:
            raise GeometryError(f"image is empty: shape {arr.shape}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise GeometryError("image contains NaN or infinite values")
        self._state = _ImageState(image)
        self._recent = [self._state] + self._recent[:2]
        self.last_debug = {}
        for kind in self._models:  # crop box and resampling grid now, not on the first click
            self.grid(kind)

    @property
    def image(self) -> Volume:
        if self._state is None:
            raise RuntimeError("call set_image() before segment()")
        return self._state.image

    def grid(self, kind: str) -> PreprocessedGrid:
        st = self._state
        if st is None:
            raise RuntimeError("call set_image() before segment()")
        if kind not in st.grids:
            cfg = self.model(kind).config
            st.grids[kind] = plan_grid(st.image.array, st.image.spacing, cfg)
            st.clip[kind] = clip_ranges(st.image.array, st.grids[kind], cfg.ct_stats)
        return st.grids[kind]

    # -- prompts ------------------------------------------------------------------------------
    def _collect(self, points, boxes, masks, space: str) -> dict[int, Prompt]:
        img = self.image
        if space not in ("voxel", "lps", "ras"):
            raise PromptError(f"space must be 'voxel', 'lps' or 'ras', got {space!r}")
        ras = space == "ras"
        prompts: dict[int, Prompt] = {}

        def add(lid, p):
            lid = int(lid)
            if lid < 1:
                raise PromptError(f"lesion id {lid} must be a positive integer")
            if lid in prompts:
                raise PromptError(f"lesion {lid} has more than one prompt")
            prompts[lid] = p

        for lid, p in _items(points):
            p = np.asarray(p, float)
            if p.shape != (3,):
                raise PromptError(f"lesion {lid}: a point needs 3 coordinates, got {p.tolist()}")
            add(lid, Point(tuple(p)) if space == "voxel" else Point(tuple(img.world_to_voxel(p, ras=ras))))
        for lid, b in _items(boxes):
            if space == "voxel":
                b = np.asarray(b)
                if b.shape != (6,):
                    raise PromptError(f"lesion {lid}: a box needs [z0, z1, y0, y1, x0, x1], got {b.tolist()}")
                add(lid, Box(tuple(int(v) for v in b)))
            else:
                from ..core.prompts import box_from_world

                corners = np.asarray(b, float)
                if corners.shape != (2, 3):
                    raise PromptError(f"lesion {lid}: a world box needs two corners [[x,y,z],[x,y,z]]")
                add(lid, box_from_world(corners[0], corners[1], img, ras=ras))
        if masks is not None:
            if isinstance(masks, np.ndarray):
                from ..core.prompts import prompts_from_label_map

                for lid, p in prompts_from_label_map(masks).items():
                    add(lid, p)
            else:
                for lid, m in _items(masks):
                    add(lid, Mask(np.asarray(m).astype(bool)))
        if not prompts:
            raise PromptError("no prompt given")
        for p in prompts.values():
            validate(p, img.shape)
        return prompts

    def segment(self, points=None, boxes=None, masks=None, space: str = "voxel",
                return_probabilities: bool = False, progress: Progress | None = None) -> SegmentationResult:
        """Segment one lesion per prompt.

        points: {id: (z, y, x)} voxels, or (x, y, z) mm with space='lps'/'ras';
        boxes: {id: (z0, z1, y0, y1, x0, x1)} half-open voxels, or two world corners;
        masks: an instance label map on the image grid, or {id: bool mask}.
        """
        return self.segment_prompts(self._collect(points, boxes, masks, space), return_probabilities, progress)

    def segment_prompts(self, prompts: Mapping[int, Prompt], return_probabilities: bool = False,
                        progress: Progress | None = None) -> SegmentationResult:
        img = self.image
        result = SegmentationResult(img)
        n = len(prompts)
        for i, (lid, prompt) in enumerate(sorted(prompts.items())):
            validate(prompt, img.shape)
            if progress:
                progress(i / n, f"lesion {lid} ({i + 1}/{n})")
            kind = self._kind_for(prompt)
            result.lesions[lid] = self._segment_one(lid, prompt, kind, return_probabilities)
        if progress:
            progress(1.0, "done")
        return result

    def _kind_for(self, prompt: Prompt) -> str:
        if isinstance(prompt, Point):
            return "point"
        if isinstance(prompt, Box):
            return "box"
        # a mask is reduced to a point or a box: use whichever model is loaded (box preferred: more information)
        for kind in ("box", "point"):
            if kind in self._models:
                return kind
        return "box" if "box" in self.model_dirs else "point"

    # -- inference ------------------------------------------------------------------------------
    def _segment_one(self, lid: int, prompt: Prompt, kind: str, return_probabilities: bool) -> LesionMask:
        grid = self.grid(kind)
        enc = encode_prompt(prompt, grid, kind)
        return self.predict_encoded(lid, kind, enc, None, return_probabilities, _prompt_center(prompt))

    def add_model(self, model: PromptModel) -> None:
        """Use an already loaded model under its kind (the tracker's refinement UNet)."""
        self._models[model.kind] = model

    def predict_encoded(self, lid: int, kind: str, enc: EncodedPrompt, tiles=None, return_probabilities: bool = False,
                        center: tuple[float, float, float] | None = None) -> LesionMask:
        """Run the ``kind`` model on an encoded prompt (default tiles: the published placement) and export
        the result to the current image's grid."""
        t0 = time.perf_counter()
        model = self.model(kind)
        grid = self.grid(kind)
        lo, hi = enc.bbox_incl
        pad = np.asarray(grid.pad_below)
        if tiles is None:
            tiles = tiles_for_prompt(grid.padded_shape, model.config.patch_size, np.asarray(lo) + pad,
                                     np.asarray(hi) + pad)
        self.last_debug[lid] = LesionDebug(enc.sparse, enc.voxels(), [lo, hi], list(grid.padded_shape),
                                           [[list(ax) for ax in t] for t in tiles])
        logits, values_box = self._predict_region(model, grid, enc, tiles)
        out_box = grid.backward.valid_output_box(values_box)
        if out_box is None:
            return LesionMask(lid, (0, 0, 0, 0, 0, 0), np.zeros((0, 0, 0), bool), None, "not found", center)
        vals, _ = grid.backward.prob_region(logits, values_box, out_box)
        fg = vals[1] > vals[0]
        prob = None
        if return_probabilities:
            m = np.maximum(vals[0], vals[1])
            e0, e1 = np.exp(vals[0] - m), np.exp(vals[1] - m)
            prob = (e1 / (e0 + e1)).astype(np.float32)
        c = grid.crop_start
        bbox = (int(out_box[0][0] + c[0]), int(out_box[0][1] + c[0]), int(out_box[1][0] + c[1]),
                int(out_box[1][1] + c[1]), int(out_box[2][0] + c[2]), int(out_box[2][1] + c[2]))
        les = LesionMask(lid, bbox, fg, prob, "found", center)
        if not return_probabilities:
            les = les.shrink()
        if les.empty:
            les.status = "not found"
        self.last_debug[lid].seconds = time.perf_counter() - t0
        log.info("lesion %d: %d voxels, %d tile(s), %.2f s", lid, les.voxels, len(tiles),
                 self.last_debug[lid].seconds)
        return les

    def _predict_region(self, model: PromptModel, grid: PreprocessedGrid, enc: EncodedPrompt,
                        tiles) -> tuple[torch.Tensor, GridBox]:
        """Logits (float32 tensor on the model's device) on the covered part of the resampled grid, and
        that part's box. Region preprocessing and tile blending run on the device too (GPU clicks do not
        wait for CPU resampling)."""
        pad = grid.pad_below
        region_p = union_box(tiles)
        region_r = tuple((a - p, b - p) for (a, b), p in zip(region_p, pad))
        values_box = tuple((max(a, 0), min(b, n)) for (a, b), n in zip(region_r, grid.resampled_shape))
        st = self._state
        assert st is not None
        dev = self.device
        src = st.image.array[tuple(slice(a, b) for a, b in grid.crop)]
        stats = model.config.ct_stats

        def normalize(t: torch.Tensor) -> torch.Tensor:  # nnU-Net CTNormalization, float32 as in numpy
            return (t.float().clamp(stats.lower, stats.upper) - stats.mean) / max(stats.std, 1e-8)

        with torch.inference_mode():
            values = grid.forward.image_region(src, values_box, normalize, st.clip[model.kind], device=dev)
            # network input on the union of tiles (zero outside the scan = nnU-Net's constant padding)
            x_region = torch.zeros((2, *[b - a for a, b in region_r]), dtype=torch.float32, device=dev)
            x_region[(0,) + tuple(slice(va - ra, vb - ra) for (va, vb), (ra, _) in zip(values_box, region_r))] = values
            x_region[1] = torch.from_numpy(enc.on_box(region_r)).to(dev)
            if len(tiles) == 1:
                logits = self._predict_tile(model, x_region)
            else:
                gauss = torch.from_numpy(np.array(gaussian_importance(tuple(model.config.patch_size)))).to(dev)
                acc = torch.zeros((model.config.num_classes, *x_region.shape[1:]), dtype=torch.float32, device=dev)
                weight = torch.zeros(x_region.shape[1:], dtype=torch.float32, device=dev)
                for t in tiles:
                    sl = tuple(slice(a - ra, b - ra) for (a, b), (ra, _) in zip(t, region_p))
                    pred = self._predict_tile(model, x_region[(slice(None),) + sl])
                    acc[(slice(None),) + sl] += pred * gauss
                    weight[sl] += gauss
                logits = acc / weight
            crop = tuple(slice(va - ra, vb - ra) for (va, vb), (ra, _) in zip(values_box, region_r))
            return logits[(slice(None),) + crop].contiguous(), values_box  # type: ignore[return-value]

    def _predict_tile(self, model: PromptModel, x: torch.Tensor) -> torch.Tensor:
        try:
            return self._forward(model, x)
        except RuntimeError as exc:
            if self.device.type != "cuda" or not devices.is_oom(exc):
                raise
            torch.cuda.empty_cache()
            if not self.cpu_fallback:
                raise InferenceError("the GPU ran out of memory for this patch; close other GPU programs, use "
                                     "fewer folds / no TTA, or run on the CPU (--device cpu)") from exc
            log.warning("CUDA out of memory: falling back to the CPU for the rest of this session")
            self.device = torch.device("cpu")
            for m in self._models.values():
                m.networks = [n.to(self.device) for n in m.networks]
            return self._forward(model, x.to(self.device))

    def _forward(self, model: PromptModel, x_region: torch.Tensor) -> torch.Tensor:
        x = x_region[None].to(self.device)
        axes = model.mirror_axes if self.tta else ()
        combos = [c for k in range(1, len(axes) + 1) for c in itertools.combinations([a + 2 for a in axes], k)]
        total = None
        with torch.inference_mode(), devices.autocast(self.device):
            for net in model.networks:
                pred = net(x).float()
                for c in combos:
                    pred += torch.flip(net(torch.flip(x, c)), c).float()
                pred /= len(combos) + 1
                total = pred if total is None else total + pred
            assert total is not None
            total /= len(model.networks)
            return total[0]


def _items(d) -> list[tuple[int, Any]]:
    if d is None:
        return []
    if isinstance(d, Mapping):
        return list(d.items())
    return list(enumerate(d, start=1))


def _prompt_center(p: Prompt) -> tuple[float, float, float] | None:
    if isinstance(p, Point):
        return tuple(float(v) for v in p.zyx)  # type: ignore[return-value]
    if isinstance(p, Box):
        b = p.bounds
        return ((b[0] + b[1] - 1) / 2, (b[2] + b[3] - 1) / 2, (b[4] + b[5] - 1) / 2)
    if isinstance(p, Mask):
        return tuple(float(v) for v in np.argwhere(p.mask).mean(0))  # type: ignore[return-value]
    return None
