"""Synthetic lesions pasted into real CT backgrounds: training data with real anatomy around every lesion.

The few real lesion masks at hand cannot teach a network where lesions end; phantoms alone teach it the
phantom's anatomy. Pasting lesions into real scans gives the network real neighbours (muscle, fat, vessels,
bowel, lung, bone) to separate a lesion from, with exact masks. Each lesion is a rotated, lobulated
ellipsoid (6-80 mm), placed in soft tissue or lung, with a soft-tissue HU at least 10 HU off its host
(sometimes with a necrotic core or an enhancing rim), a smooth texture, a soft partial-volume edge, and the
background's own high-frequency noise kept on top so its texture matches the scanner's.

    cases = paste_lesions(image, n_lesions=4, seed=7)   # -> (image Volume, instance labels Volume)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.synthetic.phantom import _largest_component, _random_rotation

# Host classes by HU on the original grid: soft tissue (fat to enhanced organ) and aerated lung.
SOFT_HU = (-150.0, 200.0)
LUNG_HU = (-950.0, -600.0)
BODY_HU = -500.0  # below this (outside lung) is air outside the body


class PasteError(ValueError):
    """The background cannot host the requested lesions (too small, no soft tissue, bad labels)."""


@dataclass(frozen=True)
class PastedLesion:
    lesion_id: int
    kind: str  # "soft" or "lung"
    diameter_mm: float
    centre_zyx: tuple[int, int, int]
    contrast_hu: float  # lesion mean minus host mean


def _smooth(rng: np.random.Generator, shape: tuple[int, ...], sigma: Sequence[float]) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="nearest")
    s = float(f.std())
    return f / (s if s > 0 else 1.0)


def lesion_field(rng: np.random.Generator, diameter_mm: float, spacing: Sequence[float]) -> np.ndarray:
    """Normalised radius field on a local block (< 1 inside): a rotated anisotropic ellipsoid whose surface
    is perturbed by a smooth field (lobulation) - thresholding it gives the lesion, its value the depth."""
    r = diameter_mm / 2.0
    half = [int(np.ceil(1.5 * r / s)) + 2 for s in spacing]
    axes = [np.arange(-h, h + 1, dtype=np.float32) * s for h, s in zip(half, spacing)]
    coords = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    semi = r * rng.uniform(0.6, 1.25, size=3)
    rho = np.sqrt(((coords @ _random_rotation(rng).astype(np.float32) / semi) ** 2).sum(-1))
    lobes = _smooth(rng, rho.shape, [max(0.7, r / 2.5 / s) for s in spacing])
    fine = _smooth(rng, rho.shape, [max(0.5, r / 6.0 / s) for s in spacing])
    return rho + rng.uniform(0.06, 0.22) * lobes + rng.uniform(0.0, 0.06) * fine


def _pick_centre(host: np.ndarray, half: np.ndarray, occupied: np.ndarray, rng: np.random.Generator,
                 tries: int = 200) -> np.ndarray | None:
    """A host voxel whose lesion block (clipped to the image) touches no other lesion. The lesion's core
    (half its extent) must lie in the image; the rest may leave it, as lesions leave a scan's field of view."""
    shape = np.asarray(host.shape)
    lo = np.minimum(half // 2, shape - 1)
    hi = np.maximum(shape - half // 2 - 1, lo)
    for _ in range(tries):
        c = np.array([int(rng.integers(a, b + 1)) for a, b in zip(lo, hi)])
        if not host[tuple(c)]:
            continue
        if occupied[_block(c, half, shape)[0]].any():
            continue
        return c
    return None


def _block(c: np.ndarray, half: np.ndarray, shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """(image slices, field slices) of the lesion block centred at ``c``, clipped to the image."""
    img_sl, fld_sl = [], []
    for a, h, n in zip(c, half, shape):
        lo, hi = int(a - h), int(a + h + 1)
        clo, chi = max(lo, 0), min(hi, int(n))
        img_sl.append(slice(clo, chi))
        fld_sl.append(slice(clo - lo, chi - lo))
    return tuple(img_sl), tuple(fld_sl)


def paste_lesions(image: Volume, n_lesions: int = 4, seed: int = 0, labels: np.ndarray | None = None,
                  diameter_mm: tuple[float, float] = (6.0, 80.0), lung_fraction: float = 0.2,
                  heterogeneity_hu: float = 0.0) -> tuple[Volume, Volume, list[PastedLesion]]:
    """``image`` (HU) with up to ``n_lesions`` synthetic lesions, their instance labels and what was pasted.

    Existing ``labels`` (an instance map on the image grid) are kept and new lesions get the next ids, never
    overlapping a labelled lesion. Diameters are log-uniform in ``diameter_mm``. A lesion that finds no room
    after many tries is skipped (the returned list says what was placed); none placed raises PasteError.
    ``heterogeneity_hu`` > 0: most lesions over 20 mm also get compartments of different density (a smooth
    field a quarter to an eighth of the lesion wide, up to that amplitude), as real masses such as sarcomas
    have; parts may then match their host, so the lesion is told by its shape, not by its HU alone. 0 draws
    exactly the random numbers of the earlier data.
    """
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 5150]))
    hu = np.asarray(image.array, dtype=np.float32)
    if hu.ndim != 3:
        raise PasteError(f"expected a 3D image, got shape {hu.shape}")
    spacing = np.asarray(image.spacing, dtype=float)
    lab = np.zeros(hu.shape, np.int32) if labels is None else np.asarray(labels).astype(np.int32).copy()
    if lab.shape != hu.shape:
        raise PasteError(f"labels {lab.shape} do not match the image {hu.shape}")
    # hosts on a lightly smoothed image: a lesion sits in tissue, not on a single noisy voxel
    sm = ndimage.uniform_filter(hu, 3)
    body = ndimage.binary_fill_holes(sm > BODY_HU) if hu.size < 4e7 else sm > BODY_HU
    soft = (sm > SOFT_HU[0]) & (sm < SOFT_HU[1]) & ndimage.binary_erosion(body, iterations=2)
    lung = (sm > LUNG_HU[0]) & (sm < LUNG_HU[1])
    # the scanner's noise: what a 3-voxel mean removes, kept on top of the pasted lesion
    residual = hu - sm
    occupied = ndimage.binary_dilation(lab > 0, iterations=2)
    out = hu.copy()
    placed: list[PastedLesion] = []
    next_id = int(lab.max(initial=0)) + 1
    for _ in range(int(n_lesions)):
        kind = "lung" if (rng.random() < lung_fraction and lung.any()) else "soft"
        host = lung if kind == "lung" else soft
        if not host.any():
            continue
        lo = np.log(diameter_mm[0])  # lung nodules stay below 35 mm
        hi = max(lo, np.log(diameter_mm[1] if kind == "soft" else min(diameter_mm[1], 35.0)))
        for shrink in (1.0, 0.7, 0.5, 0.35):
            d = float(np.exp(rng.uniform(lo, hi))) * shrink
            field = lesion_field(rng, d, spacing)
            half = (np.asarray(field.shape) - 1) // 2
            c = _pick_centre(host, half, occupied, rng)
            if c is not None:
                break
        else:
            continue
        sl, fsl = _block(c, half, hu.shape)
        field = field[fsl]
        # edge width 0.4-1.5 mm: sharp to blurred margins
        edge = rng.uniform(0.4, 1.5) / (d / 2.0)
        alpha = 1.0 / (1.0 + np.exp(np.clip((field - 1.0) / edge, -30, 30)))
        alpha[lab[sl] > 0] = 0.0  # never over another lesion
        if kind == "soft":  # soft lesions stay in the body
            alpha *= body[sl]
        mask = alpha > 0.5
        mask = _largest_component(mask)
        if mask.sum() < 8:
            continue
        region = hu[sl]
        host_mean = float(np.median(region[mask]))
        # solid tumours are soft tissue whatever they grow in: an absolute HU, at least 10 HU off the host
        target = float(rng.uniform(-80.0, 70.0)) if kind == "lung" else float(rng.uniform(-15.0, 140.0))
        if kind == "soft" and abs(target - host_mean) < 10.0:
            target = host_mean + (10.0 if target >= host_mean else -10.0)
        tex_sigma = [max(0.6, rng.uniform(1.0, 4.0) / s) for s in spacing]
        lesion_hu = target + rng.uniform(3.0, 18.0) * _smooth(rng, field.shape, tex_sigma)
        if d > 25 and rng.random() < 0.35:  # necrotic / cystic core
            core = 1.0 / (1.0 + np.exp(np.clip((field - rng.uniform(0.35, 0.7)) / 0.08, -30, 30)))
            lesion_hu = lesion_hu - core * rng.uniform(20.0, 60.0)
        if rng.random() < 0.3:  # enhancing rim
            rim = np.exp(-((field - 0.92) / 0.08) ** 2)
            lesion_hu = lesion_hu + rim * rng.uniform(10.0, 40.0)
        if heterogeneity_hu > 0 and d > 20 and rng.random() < 0.7:
            sig = [max(1.0, rng.uniform(d / 8, d / 4) / s) for s in spacing]
            lesion_hu = lesion_hu + rng.uniform(0.3, 1.0) * heterogeneity_hu * _smooth(rng, field.shape, sig)
        blended = (1 - alpha) * region + alpha * (lesion_hu + residual[sl])
        out[sl] = blended
        lid = next_id
        next_id += 1
        lab[sl][mask] = lid
        occupied[sl] |= ndimage.binary_dilation(mask, iterations=2)
        placed.append(PastedLesion(lid, kind, round(d, 2), tuple(int(v) for v in c),
                                   round(float(np.mean(lesion_hu[mask]) - host_mean), 1)))
    if not placed:
        raise PasteError("no lesion could be placed: the image has no room or no soft tissue/lung host")
    dtype = image.array.dtype if np.issubdtype(image.array.dtype, np.integer) else np.float32
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return (image.with_array(out.astype(dtype)), image.with_array(lab.astype(np.uint16)), placed)


def random_crop(image: Volume, size_mm: Sequence[float], rng: np.random.Generator,
                labels: np.ndarray | None = None) -> tuple[Volume, np.ndarray | None]:
    """A random sub-volume of at most ``size_mm`` (z, y, x) with correct origin (for varied backgrounds)."""
    shape = np.asarray(image.shape)
    n = np.minimum(np.round(np.asarray(size_mm) / np.asarray(image.spacing)).astype(int), shape)
    start = np.array([int(rng.integers(0, s - k + 1)) for s, k in zip(shape, n)])
    sl = tuple(slice(int(a), int(a + k)) for a, k in zip(start, n))
    origin = tuple(float(v) for v in image.voxel_to_world(start))
    sub = Volume(np.ascontiguousarray(image.array[sl]), image.spacing, origin, image.direction.copy())
    return sub, (None if labels is None else np.ascontiguousarray(np.asarray(labels)[sl]))


def pasted_cases(backgrounds: Sequence[tuple[str, str | None]], n: int, config, cache_dir, seed: int = 0,
                 dataset: str = "paste", crop_mm: Sequence[float] = (200.0, 260.0, 260.0),
                 lesions_per_case: tuple[int, int] = (3, 6),
                 diameter_mm: tuple[float, float] = (6.0, 80.0), heterogeneity_hu: float = 0.0) -> list:
    """``n`` training cases (``train.data.Case``): background ``i % len(backgrounds)`` (an image path and an
    optional instance-label path whose lesions are kept), a random crop of at most ``crop_mm``, 3-6 pasted
    lesions; preprocessed as at inference and cached (a case is pasted once per seed)."""
    import json
    from pathlib import Path

    from LesionLocatorLib.core.image_io import read_image

    from . import data as D

    if not backgrounds:
        raise PasteError("no background images to paste lesions into")
    loaded: dict[int, tuple[Volume, np.ndarray | None]] = {}
    d = Path(cache_dir) / D._config_key(config)
    out = []
    for i in range(int(n)):
        b = i % len(backgrounds)
        img_p, lab_p = backgrounds[b]
        key = f"paste:v1:{Path(img_p).name}:{lab_p and Path(lab_p).name}:{seed}:{i}:{tuple(crop_mm)}"
        if tuple(diameter_mm) != (6.0, 80.0):  # the default keeps the keys (and caches) of earlier runs
            key += f":{tuple(float(v) for v in diameter_mm)}"
        if heterogeneity_hu:
            key += f":het{float(heterogeneity_hu)}"
        stem = f"{dataset}__paste_{i:04d}"
        meta = d / f"{stem}.json"
        if meta.is_file() and json.loads(meta.read_text(encoding="utf-8")).get("source_key") == key:
            out.append(D.load_cached(d, stem))
            continue
        if b not in loaded:
            loaded[b] = (read_image(img_p), None if lab_p is None else read_image(lab_p).array)
        image, labels = loaded[b]
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), i, 31337]))
        sub, sub_lab = random_crop(image, crop_mm, rng, labels)
        k = int(rng.integers(lesions_per_case[0], lesions_per_case[1] + 1))
        img, lab, _ = paste_lesions(sub, k, seed=int(rng.integers(2 ** 31)), labels=sub_lab, diameter_mm=diameter_mm,
                                    heterogeneity_hu=heterogeneity_hu)
        out.append(D.cache_case(f"paste_{i:04d}", dataset, img, lab, config, cache_dir, key))
    return out
