"""Training data: preprocessing (as at inference) with an .npy cache, lesion sampling, prompt simulation, patches.

Everything geometric reuses LesionLocatorLib: cases are preprocessed with :func:`plan_grid` /
:class:`GridResampler` and :func:`normalize_ct` exactly as a segmentation session does at inference (crop to non-zero,
CT normalisation, resampling to the plans' spacing), and prompts are encoded with the library's
:func:`encode_point_at` / :func:`encode_box_at`, so the network sees in training what it sees in use.

Sampling follows the published fine-tuning: an image first (datasets weighted, see
:func:`dataset_probabilities`), then one lesion instance of it; the prompt is simulated from that lesion
(point: a random lesion voxel; box: its bounding box with jitter; mask: a perturbed mask), and the target is
that lesion alone.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.core.image_io import read_image
from LesionLocatorLib.model.plans import ModelConfig
from LesionLocatorLib.model.preprocessing import clip_ranges, normalize_ct, plan_grid
from LesionLocatorLib.core.prompts import BALL_RADIUS, encode_box_at, encode_point_at
from LesionLocatorLib.core.files import atomic_write, atomic_write_text
from LesionLocatorLib.model.resampling import whole_box

PROMPT_KINDS = ("point", "box", "mask")
CACHE_VERSION = 1


class TrainDataError(ValueError):
    """Training data is missing, malformed or unusable (no lesions, mismatched grids, bad list file)."""


# ----------------------------------------------------------------------------------------------------------
# preprocessing + cache
# ----------------------------------------------------------------------------------------------------------
def preprocess_case(image: Volume, labels: Volume, config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(normalised float32 image, int16 instance labels) on the model grid, computed as at inference."""
    if image.shape != labels.shape:
        raise TrainDataError(f"image {image.shape} and labels {labels.shape} differ in shape")
    lab = np.asarray(labels.array)
    if not np.issubdtype(lab.dtype, np.integer):
        if not np.array_equal(lab, np.round(lab)) or lab.min() < 0:
            raise TrainDataError("labels must be a non-negative integer instance map")
        lab = lab.astype(np.int32)
    grid = plan_grid(image.array, image.spacing, config)
    crop = tuple(slice(a, b) for a, b in grid.crop)
    src = image.array[crop]
    box = whole_box(grid.resampled_shape)
    img = grid.forward.image_region(src, box, lambda a: normalize_ct(a, config.ct_stats),
                                    clip_ranges(image.array, grid, config.ct_stats))
    seg = grid.seg.seg_region(lab[crop].astype(np.int32), box)
    if seg.max(initial=0) > np.iinfo(np.int16).max:
        raise TrainDataError("more than 32767 lesion ids in one case")
    return img.astype(np.float32), seg.astype(np.int16)


def _config_key(config: ModelConfig) -> str:
    rs = config.resampling_data
    key = json.dumps([CACHE_VERSION, config.spacing, list(config.ct_stats.__dict__.values()), rs.kind, rs.order_data,
                      config.resampling_seg.kind], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


@dataclass
class Case:
    """One preprocessed case (arrays memory-mapped from the cache)."""

    name: str
    dataset: str
    image: np.ndarray  # float32 (z, y, x), normalised, model spacing
    labels: np.ndarray  # int16 instance ids
    lesions: list[int] = field(default_factory=list)
    lesion_boxes: dict[int, tuple[int, ...]] = field(default_factory=dict)  # half-open (z0,z1,y0,y1,x0,x1)
    lesion_voxels: dict[int, int] = field(default_factory=dict)  # size on the model grid


def _lesion_boxes(labels: np.ndarray) -> dict[int, tuple[int, ...]]:
    out = {}
    for i, sl in enumerate(ndimage.find_objects(labels.astype(np.int32)), start=1):
        if sl is not None:
            out[i] = tuple(v for s in sl for v in (int(s.start), int(s.stop)))
    return out


def cache_case(name: str, dataset: str, image: Volume, labels: Volume, config: ModelConfig,
               cache_dir: str | os.PathLike, source_key: str | None = None) -> Case:
    """Preprocess once and keep ``<cache>/<config key>/<dataset>__<name>.{npy,json}``; reuse when present.

    ``source_key`` identifies the input (e.g. path + mtime, or a phantom seed); a different key recomputes.
    """
    d = Path(cache_dir) / _config_key(config)
    d.mkdir(parents=True, exist_ok=True)
    stem = f"{dataset}__{name}"
    meta_p = d / f"{stem}.json"
    if meta_p.is_file():
        meta = json.loads(meta_p.read_text())
        if meta.get("source_key") == source_key:
            return load_cached(d, stem)
    img, seg = preprocess_case(image, labels, config)
    for suffix, arr in (("_image.npy", img), ("_labels.npy", seg)):
        # a unique temp file per writer: DDP ranks may cache the same case
        atomic_write(d / f"{stem}{suffix}", lambda tmp, arr=arr: np.save(tmp, arr))
    boxes = _lesion_boxes(seg)
    meta = {"name": name, "dataset": dataset, "source_key": source_key, "shape": list(img.shape),
            "spacing": list(config.spacing), "lesion_boxes": {str(k): v for k, v in boxes.items()}}
    atomic_write_text(meta_p, json.dumps(meta))  # a unique temp file: DDP ranks may cache the same case
    return load_cached(d, stem)


def load_cached(directory: Path, stem: str) -> Case:
    meta = json.loads((directory / f"{stem}.json").read_text())
    img = np.load(directory / f"{stem}_image.npy", mmap_mode="r")
    seg = np.load(directory / f"{stem}_labels.npy", mmap_mode="r")
    boxes = {int(k): tuple(v) for k, v in meta["lesion_boxes"].items()}
    counts = np.bincount(np.asarray(seg).ravel().clip(0)) if boxes else np.zeros(1, int)
    voxels = {k: int(counts[k]) if k < len(counts) else 0 for k in boxes}
    return Case(meta["name"], meta["dataset"], img, seg, sorted(boxes), boxes, voxels)


def read_case_list(path: str | os.PathLike) -> list[dict]:
    """A JSON list of ``{"dataset": name, "image": path, "labels": path[, "name": id]}`` (paths relative to
    the list file allowed)."""
    p = Path(path)
    try:
        items = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainDataError(f"cannot read case list {p}: {exc}") from exc
    if not isinstance(items, list) or not items:
        raise TrainDataError(f"case list {p} must be a non-empty JSON list")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, Mapping) or "image" not in it or "labels" not in it:
            raise TrainDataError(f"case list {p} entry {i} needs 'image' and 'labels'")
        img = Path(it["image"]) if Path(it["image"]).is_absolute() else p.parent / it["image"]
        lab = Path(it["labels"]) if Path(it["labels"]).is_absolute() else p.parent / it["labels"]
        out.append({"dataset": str(it.get("dataset", "default")), "image": img, "labels": lab,
                    "name": str(it.get("name", _stem(img)))})
    return out


def _stem(p: Path) -> str:
    name = p.name
    for suf in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return p.stem


def load_case_files(entries: Iterable[Mapping], config: ModelConfig, cache_dir: str | os.PathLike) -> list[Case]:
    cases = []
    for e in entries:
        img_p, lab_p = Path(e["image"]), Path(e["labels"])
        for q in (img_p, lab_p):
            if not q.is_file():
                raise TrainDataError(f"training file not found: {q}")
        key = f"{img_p.resolve()}:{img_p.stat().st_mtime_ns}:{lab_p.resolve()}:{lab_p.stat().st_mtime_ns}"
        image = read_image(img_p)
        labels = read_image(lab_p)
        cases.append(cache_case(e["name"], e["dataset"], image, image.with_array(labels.array), config, cache_dir,
                                key))
    return cases


def phantom_cases(n: int, config: ModelConfig, cache_dir: str | os.PathLike, seed: int = 0,
                  shape: Sequence[int] = (64, 128, 128), spacing: Sequence[float] = (2.0, 1.5, 1.5),
                  n_lesions: int = 3, dataset: str = "phantom") -> list[Case]:
    """``n`` phantoms from :func:`LesionLocatorLib.synthetic.phantom.make_phantom`, preprocessed and cached."""
    from LesionLocatorLib.synthetic.phantom import make_phantom

    out = []
    for i in range(n):
        s = int(np.random.SeedSequence([seed, i, 4242]).generate_state(1)[0])
        key = f"phantom:{s}:{tuple(shape)}:{tuple(spacing)}:{n_lesions}"
        d = Path(cache_dir) / _config_key(config)
        stem = f"{dataset}__phantom_{i:04d}"
        if (d / f"{stem}.json").is_file() and json.loads((d / f"{stem}.json").read_text()).get("source_key") == key:
            out.append(load_cached(d, stem))
            continue
        ct, lab = make_phantom(shape, spacing, n_lesions=n_lesions, seed=s)
        out.append(cache_case(f"phantom_{i:04d}", dataset, ct, lab, config, cache_dir, key))
    return out


# ----------------------------------------------------------------------------------------------------------
# sampling
# ----------------------------------------------------------------------------------------------------------
def dataset_probabilities(sizes: Mapping[str, int]) -> dict[str, float]:
    """Dataset sampling probabilities proportional to 1/sqrt(number of images) (MultiTalent / published pretraining)."""
    if not sizes:
        raise TrainDataError("no datasets to sample from")
    bad = {k: v for k, v in sizes.items() if int(v) <= 0}
    if bad:
        raise TrainDataError(f"datasets without images: {sorted(bad)}")
    w = {k: 1.0 / np.sqrt(float(v)) for k, v in sizes.items()}
    total = sum(w.values())
    return {k: v / total for k, v in w.items()}


def rank_rng(seed: int, rank: int = 0, epoch: int = 0) -> np.random.Generator:
    """Independent, reproducible sampling stream per (seed, rank, epoch): the DistributedSampler idea for
    random patch sampling (each rank draws different samples; a resumed run redraws the same ones)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(rank), int(epoch)]))


class CaseSampler:
    """Draws (case, lesion id): a dataset (weights per dataset: 'sqrt' = 1/sqrt(size), 'uniform' over
    images, or an explicit {dataset: weight}), an image of it, then one lesion instance uniformly."""

    def __init__(self, cases: Sequence[Case], weighting: str | Mapping[str, float] = "uniform",
                 require_lesions: bool = True,
                 min_lesion_voxels: int = 0):
        if min_lesion_voxels > 0:  # lesions smaller than this (on the model grid) are not drawn
            cases = [filter_lesions(c, min_lesion_voxels) for c in cases]
        self.cases = [c for c in cases if c.lesions or not require_lesions]
        if not self.cases:
            raise TrainDataError("no training case has a lesion")
        self.by_ds: dict[str, list[Case]] = {}
        for c in self.cases:
            self.by_ds.setdefault(c.dataset, []).append(c)
        self.names = sorted(self.by_ds)
        if isinstance(weighting, Mapping):  # explicit dataset weights (normalised)
            missing = [k for k in self.names if k not in weighting]
            if missing:
                raise TrainDataError(f"no sampling weight for dataset(s) {missing}")
            total = float(sum(weighting[k] for k in self.names))
            probs = {k: float(weighting[k]) / total for k in self.names}
        elif weighting == "sqrt":
            probs = dataset_probabilities({k: len(v) for k, v in self.by_ds.items()})
        elif weighting == "uniform":
            n = len(self.cases)
            probs = {k: len(v) / n for k, v in self.by_ds.items()}
        else:
            raise TrainDataError(f"unknown dataset weighting {weighting!r} (use 'sqrt' or 'uniform')")
        self.probs = np.array([probs[k] for k in self.names])

    @property
    def n_lesions(self) -> int:
        return sum(len(c.lesions) for c in self.cases)

    def draw(self, rng: np.random.Generator) -> tuple[Case, int | None]:
        ds = self.names[int(rng.choice(len(self.names), p=self.probs))]
        pool = self.by_ds[ds]
        case = pool[int(rng.integers(len(pool)))]
        lesion = int(case.lesions[int(rng.integers(len(case.lesions)))]) if case.lesions else None
        return case, lesion


def filter_lesions(case: Case, min_voxels: int) -> Case:
    """The same case with only lesions of at least ``min_voxels`` voxels listed for sampling."""
    keep = [l for l in case.lesions if case.lesion_voxels.get(l, min_voxels) >= min_voxels]
    return Case(case.name, case.dataset, case.image, case.labels, keep, case.lesion_boxes, case.lesion_voxels)


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------
def simulate_prompt(lesion_mask: np.ndarray, kind: str, rng: np.random.Generator, box_jitter: int = 2,
                    mask_perturb: int = 2) -> np.ndarray:
    """The prompt channel (uint8, same shape as ``lesion_mask``) for one lesion on the model grid.

    point: the library's ball (radius 5) at a random lesion voxel; box: the lesion's bounding box with each
    side moved by up to ``box_jitter`` voxels, then encoded as at inference (one voxel larger on every
    side); mask: the lesion dilated or eroded by up to ``mask_perturb`` voxels (never empty).
    """
    if kind not in PROMPT_KINDS:
        raise TrainDataError(f"unknown prompt kind {kind!r} (use one of {PROMPT_KINDS})")
    shape = lesion_mask.shape
    idx = np.argwhere(lesion_mask)
    if idx.size == 0:
        raise TrainDataError("cannot simulate a prompt for an empty lesion")
    out = np.zeros(shape, dtype=np.uint8)
    if kind == "point":
        center = idx[int(rng.integers(len(idx)))]
        enc = encode_point_at([int(v) for v in center], shape, BALL_RADIUS)
    elif kind == "box":
        lo, hi = idx.min(0), idx.max(0) + 1
        jl = rng.integers(-box_jitter, box_jitter + 1, size=3)
        jh = rng.integers(-box_jitter, box_jitter + 1, size=3)
        lo = np.clip(lo + jl, 0, np.asarray(shape) - 1)
        hi = np.maximum(np.clip(hi + jh, 1, shape), lo + 1)
        # same enlargement as prompts.box_to_resampled: one voxel on every side, clipped
        rb = []
        for ax in range(3):
            rb += [max(int(lo[ax]) - 1, 0), min(int(hi[ax]) + 1, shape[ax])]
        enc = encode_box_at(rb)
    else:
        k = int(rng.integers(-mask_perturb, mask_perturb + 1))
        m = lesion_mask.astype(bool)
        if k > 0:
            m = ndimage.binary_dilation(m, iterations=k)
        elif k < 0:
            er = ndimage.binary_erosion(m, iterations=-k)
            m = er if er.any() else m
        return m.astype(np.uint8)
    out[tuple(slice(a, b) for a, b in enc.box)] = enc.stamp
    return out


# ----------------------------------------------------------------------------------------------------------
# patches
# ----------------------------------------------------------------------------------------------------------
def crop_padded(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float = 0) -> np.ndarray:
    """``array[start:start+size]`` with constant ``fill`` outside (nnU-Net pads images with 0)."""
    out = np.full(tuple(int(s) for s in size), fill, dtype=array.dtype)
    src, dst = [], []
    for a, s, n in zip(start, size, array.shape):
        lo, hi = max(int(a), 0), min(int(a) + int(s), n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - int(a), hi - int(a)))
    out[tuple(dst)] = array[tuple(src)]
    return out


@dataclass
class Sample:
    image: np.ndarray  # float32 (C=1, z, y, x)
    prompt: np.ndarray  # float32 (1, z, y, x)
    target: np.ndarray  # uint8 (z, y, x): the chosen lesion only
    case: str
    lesion: int | None


def patch_start_around(lo: np.ndarray, hi: np.ndarray, patch: Sequence[int], rng: np.random.Generator | None,
                       max_offset: float) -> np.ndarray:
    """Start of a patch centred on box [lo, hi) (as at inference), shifted by up to ``max_offset`` x patch."""
    p = np.asarray(patch)
    start = ((lo + hi - 1 - p) / 2).astype(int)
    if rng is not None and max_offset > 0:
        r = np.maximum((p * max_offset).astype(int), 0)
        start = start + rng.integers(-r, r + 1)
    return start


def make_sample(case: Case, lesion: int, kind: str, patch: Sequence[int], rng: np.random.Generator,
                max_offset: float = 0.15, scale_range: tuple[float, float] = (1.0, 1.0),
                augment: bool = False, aug_seed: int | None = None) -> Sample:
    """One training sample for ``lesion`` of ``case``: the prompt is simulated on the whole case, the patch of
    the plans' patch size is placed around the lesion (random offset), optionally read at a zoom (scale < 1
    magnifies) and augmented with the published batchgeneratorsv2 pipeline (train/synthesize.py).

    The prompt is zoomed together with the image: with scale s the point ball has radius 5/s voxels (s = 1,
    the default, is exactly the inference encoding); the zoom thus also jitters the prompt size."""
    box = np.asarray(case.lesion_boxes[lesion]).reshape(3, 2)
    p = np.asarray(patch)
    s = float(rng.uniform(*scale_range)) if scale_range != (1.0, 1.0) else 1.0
    read = np.maximum(np.round(p * s).astype(int), 1)
    # the prompt is computed on a window around the lesion (cheaper than the whole case, same result)
    margin = read + 8
    w_lo = np.maximum(box[:, 0] - margin, 0)
    w_hi = np.minimum(box[:, 1] + margin, case.labels.shape)
    win = tuple(slice(a, b) for a, b in zip(w_lo, w_hi))
    lab_w = np.asarray(case.labels[win])
    les = lab_w == lesion
    prompt_w = simulate_prompt(les, kind, rng)
    if kind == "point":  # centre the patch on the click, as a segmentation session does
        nz = np.argwhere(prompt_w)
        lo, hi = nz.min(0), nz.max(0) + 1
    else:
        lo, hi = box[:, 0] - w_lo, box[:, 1] - w_lo
    start = patch_start_around(lo, hi, read, rng, max_offset)
    img_w = np.asarray(case.image[win])
    img = crop_padded(img_w, start, read, 0.0)
    prm = crop_padded(prompt_w, start, read, 0)
    tgt = crop_padded(les.astype(np.uint8), start, read, 0)
    if tuple(read) != tuple(p):
        img = _resize(img, p, "trilinear")
        prm = _resize(prm, p, "nearest")
        tgt = _resize(tgt, p, "nearest")
    if augment:
        from .synthesize import augment_pair

        lab2 = (tgt.astype(np.int16) + 2 * prm.astype(np.int16))  # move prompt and target together
        img, lab2 = augment_pair(img.astype(np.float32), lab2, seed=int(aug_seed if aug_seed is not None
                                                                      else rng.integers(2 ** 31)),
                                 normalization=None)
        tgt = (lab2 % 2).astype(np.uint8)
        prm = (lab2 >= 2).astype(np.uint8)
    return Sample(img[None].astype(np.float32), prm[None].astype(np.float32), tgt.astype(np.uint8), case.name,
                  lesion)


def _resize(a: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    kw = {"align_corners": False} if mode == "trilinear" else {}
    r = F.interpolate(t, size=tuple(int(s) for s in shape), mode=mode, **kw)[0, 0].numpy()
    return r if mode == "trilinear" else r.astype(a.dtype)


def collate(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Network input [B, 2, z, y, x] (image, prompt) and target [B, 1, z, y, x]."""
    x = torch.from_numpy(np.stack([np.concatenate([s.image, s.prompt]) for s in samples]))
    y = torch.from_numpy(np.stack([s.target[None] for s in samples]).astype(np.int64))
    return x, y


def random_patch(case: Case, patch: Sequence[int], rng: np.random.Generator, foreground_prob: float = 0.33
                 ) -> tuple[np.ndarray, np.ndarray]:
    """nnU-Net-style patch: random location, or (with ``foreground_prob``) centred on a random foreground
    voxel; returns (image [1, ...], binary foreground target) for pretraining."""
    p = np.asarray(patch)
    shape = np.asarray(case.image.shape)
    if case.lesions and rng.random() < foreground_prob:
        lid = case.lesions[int(rng.integers(len(case.lesions)))]
        b = np.asarray(case.lesion_boxes[lid]).reshape(3, 2)
        sub = np.asarray(case.labels[tuple(slice(a, c) for a, c in b)]) == lid
        pts = np.argwhere(sub)
        c = pts[int(rng.integers(len(pts)))] + b[:, 0]
        start = c - p // 2
    else:
        hi = np.maximum(shape - p, 0)
        start = np.array([int(rng.integers(0, h + 1)) for h in hi])
    img = crop_padded(np.asarray(case.image), start, p, 0.0)
    tgt = (crop_padded(np.asarray(case.labels), start, p, 0) > 0).astype(np.uint8)
    return img[None], tgt
