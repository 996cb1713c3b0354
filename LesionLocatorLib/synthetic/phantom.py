"""Synthetic CT phantoms with known lesion instances, for tests, demos and synthetic training data.

The phantom is a crude chest / upper-abdomen CT: air around an elliptical body with a fat rim, soft
tissue, two lungs with vessels, liver with enhancing vessels, heart and aorta (contrast-enhanced
blood), spine (cancellous + cortical bone, discs, spinal canal) and ribs. Lesions are perturbed
ellipsoids of 5-30 mm placed in the lungs (solid nodules), in the liver (hypo- or hyper-dense) and in
soft tissue (hypo- or hyper-dense nodes/masses). Anatomy scales with the field of view, so tiny test
volumes still contain every tissue.

Everything is drawn from ``numpy.random.default_rng`` streams spawned from the seed: the same
arguments always give the same arrays. The anatomy uses its own stream so that
:func:`phantom_tissue_map` reproduces the tissue layout of :func:`make_phantom` exactly.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

from ..core.geometry import Volume
from ..core.results import tight_bbox

# Tissue classes of the (lesion-free) anatomy; see phantom_tissue_map.
TISSUES: dict[str, int] = {
    "air": 0,
    "fat": 1,
    "soft_tissue": 2,
    "lung": 3,
    "liver": 4,
    "bone": 5,
    "blood": 6,  # contrast-enhanced: heart chambers, aorta, liver vessels
    "lung_vessel": 7,
    "csf": 8,
}

# Mean HU per tissue before texture, partial-volume smoothing and noise.
TISSUE_HU: dict[str, float] = {
    "air": -1000.0,
    "fat": -100.0,
    "soft_tissue": 40.0,
    "lung": -850.0,
    "liver": 60.0,
    "bone": 400.0,  # cancellous; the cortical shell is set to 1000 separately
    "blood": 150.0,
    "lung_vessel": 40.0,
    "csf": 10.0,
}

CORTICAL_HU = 1000.0
NOISE_SIGMA_HU = 15.0
LESION_DIAMETER_MM = (5.0, 30.0)


class PhantomError(ValueError):
    """Invalid phantom parameters (shape, spacing, lesion count) or lesions that do not fit."""


def _streams(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    # Independent streams: anatomy, lesions, noise. Spawning keeps the anatomy identical whatever
    # the lesion count, which phantom_tissue_map relies on.
    anat, les, noise = np.random.SeedSequence(int(seed)).spawn(3)
    return np.random.default_rng(anat), np.random.default_rng(les), np.random.default_rng(noise)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: Sequence[float]) -> np.ndarray:
    """Unit-variance Gaussian random field, computed at half resolution for speed and upsampled."""
    small = tuple(max(2, (s + 1) // 2) for s in shape)
    field = rng.standard_normal(small).astype(np.float32)
    field = ndimage.gaussian_filter(field, [max(s / 2.0, 0.5) for s in sigma_vox], mode="wrap")
    field = ndimage.zoom(field, [s / t for s, t in zip(shape, small)], order=1, grid_mode=True, mode="grid-wrap")
    field = field[: shape[0], : shape[1], : shape[2]]
    std = float(field.std())
    return (field - float(field.mean())) / (std if std > 0 else 1.0)


def _check_args(shape: Sequence[int], spacing: Sequence[float], n_lesions: int) -> tuple[tuple[int, int, int],
                                                                                          tuple[float, float, float]]:
    if len(shape) != 3 or any(int(s) != s for s in shape):
        raise PhantomError(f"shape must be three integers (z, y, x), got {shape!r}")
    shape_t = tuple(int(s) for s in shape)
    if min(shape_t) < 16:
        raise PhantomError(f"phantom shape {shape_t} is too small: every axis needs at least 16 voxels")
    if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise PhantomError(f"spacing must be three positive numbers (z, y, x) in mm, got {spacing!r}")
    if int(n_lesions) != n_lesions or n_lesions < 0:
        raise PhantomError(f"n_lesions must be a non-negative integer, got {n_lesions!r}")
    return shape_t, tuple(float(s) for s in spacing)  # type: ignore[return-value]


def _mm_grid(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[np.ndarray, ...]:
    """Broadcastable voxel-centre coordinates in mm, centred on the volume (z, y, x)."""
    out = []
    for axis in range(3):
        c = (np.arange(shape[axis], dtype=np.float32) + 0.5) * spacing[axis] - shape[axis] * spacing[axis] / 2
        s = [1, 1, 1]
        s[axis] = shape[axis]
        out.append(c.reshape(s))
    return tuple(out)


def _anatomy(shape: tuple[int, int, int], spacing: tuple[float, float, float],
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Tissue map (uint8, TISSUES ids) and clean HU image (float32, before smoothing and noise)."""
    zm, ym, xm = _mm_grid(shape, spacing)
    ez, ey, ex = (shape[i] * spacing[i] for i in range(3))
    tissue = np.zeros(shape, np.uint8)

    # Body: ellipse (slightly tapering along z) with a fat rim whose thickness wobbles.
    ax, ay = 0.45 * ex, 0.36 * ey
    taper = 1.0 - 0.04 * (2 * zm / ez) ** 2
    ell = (xm / (ax * taper)) ** 2 + ((ym - 0.01 * ey) / (ay * taper)) ** 2  # (z, y, x) by broadcasting
    body = ell < 1.0
    tissue[body] = TISSUES["fat"]
    fat_frac = 0.10 + 0.03 * _smooth_noise(rng, shape, (4, 8, 8))
    inner = ell < (1.0 - fat_frac) ** 2
    tissue[inner] = TISSUES["soft_tissue"]

    # Ribs: oblique bands in the upper (thoracic) part, inside the body wall, not in front or at the spine.
    angle = np.arctan2(ym, xm)
    rib_ring = (ell > 0.80 ** 2) & (ell < 0.85 ** 2) & inner
    rib_band = np.sin(2 * np.pi * (zm + 8.0 * np.sin(angle)) / 22.0) > 0.7
    thorax = zm > -0.25 * ez
    not_sternum = ~((np.abs(xm) < 0.12 * ax) & (ym < 0))
    not_spine = ~((np.abs(xm) < 0.18 * ax) & (ym > 0))
    ribs = rib_ring & rib_band & thorax & not_sternum & not_spine

    # Spine: vertebral body (cancellous core, cortical shell, discs), canal behind it, posterior arch.
    r_vb = 0.085 * min(ex, ey)
    vb_y = 0.52 * ay
    d_vb = np.sqrt(xm ** 2 + (ym - vb_y) ** 2)
    vert = d_vb < r_vb
    disc = np.abs(((zm + 0.3 * ez) % 26.0) - 13.0) < 2.5
    canal_y = vb_y + 1.45 * r_vb
    d_canal = np.sqrt(xm ** 2 + (ym - canal_y) ** 2)
    canal = d_canal < 0.45 * r_vb
    arch = (d_canal < 0.85 * r_vb) & ~canal & ~vert
    bone = (vert | arch | ribs) & inner
    tissue[bone] = TISSUES["bone"]
    tissue[vert & disc & inner] = TISSUES["soft_tissue"]  # discs are soft tissue density
    tissue[canal & inner] = TISSUES["csf"]

    # Aorta (left-anterior of the spine) and heart (anterior, between the lungs): enhanced blood.
    aorta = (np.sqrt((xm - 0.45 * r_vb - 0.06 * ax) ** 2 + (ym - vb_y + 1.5 * r_vb) ** 2) < 0.6 * r_vb) & inner
    heart = (((xm - 0.10 * ax) / (0.30 * ax)) ** 2 + ((ym + 0.30 * ay) / (0.40 * ay)) ** 2
             + ((zm - 0.05 * ez) / (0.22 * ez)) ** 2) < 1.0

    # Lungs: two ellipsoids whose lower end forms the diaphragm domes; the upper part leaves the FOV.
    lungs = np.zeros(shape, bool)
    for side in (-1.0, 1.0):
        cx = side * 0.47 * ax
        d = (((xm - cx) / (0.38 * ax)) ** 2 + ((ym + 0.02 * ay) / (0.70 * ay)) ** 2
             + ((zm - 0.45 * ez) / (0.72 * ez)) ** 2)
        lungs |= d < 1.0
    lungs &= inner & ~bone & ~heart & ~aorta & (ell < 0.76 ** 2)

    # Liver: patient's right (-x in LPS, i.e. low x index for an identity direction), below the right lung.
    liver = (((xm + 0.33 * ax) / (0.55 * ax)) ** 2 + ((ym + 0.05 * ay) / (0.62 * ay)) ** 2
             + ((zm + 0.32 * ez) / (0.38 * ez)) ** 2) < 1.0
    liver &= inner & ~bone & ~lungs & ~aorta & (ell < 0.76 ** 2)

    tissue[heart & inner & ~bone] = TISSUES["blood"]
    tissue[aorta] = TISSUES["blood"]
    tissue[lungs] = TISSUES["lung"]
    tissue[liver] = TISSUES["liver"]

    # Vessels: where two smooth random fields are both near zero, i.e. along their intersection curves.
    vsig = [3.0 / spacing[0] * 1.5, 3.0 / spacing[1] * 1.5, 3.0 / spacing[2] * 1.5]
    f1 = _smooth_noise(rng, shape, vsig)
    f2 = _smooth_noise(rng, shape, vsig)
    tubes = (np.abs(f1) < 0.2) & (np.abs(f2) < 0.2)
    tissue[tubes & lungs] = TISSUES["lung_vessel"]
    tissue[tubes & liver] = TISSUES["blood"]

    hu = np.empty(shape, np.float32)
    for name, tid in TISSUES.items():
        hu[tissue == tid] = TISSUE_HU[name]
    # Cortical shell of the vertebral body and the ribs' cores denser than cancellous bone.
    cortical = (vert & (d_vb > r_vb - max(1.5, 1.2 * spacing[2])) & ~disc) | ribs | arch
    hu[cortical & (tissue == TISSUES["bone"])] = CORTICAL_HU
    # Low-frequency texture (organ heterogeneity) and a slight posterior density gradient in the lungs.
    texture = f1 * 0.5 + f2 * 0.5
    soft = np.isin(tissue, (TISSUES["soft_tissue"], TISSUES["liver"], TISSUES["fat"]))
    hu[soft] += 6.0 * texture[soft]
    lung_m = tissue == TISSUES["lung"]
    hu[lung_m] += np.broadcast_to(40.0 * (ym / ay), shape)[lung_m] + 15.0 * texture[lung_m]
    return tissue, hu


def phantom_tissue_map(shape: Sequence[int] = (64, 128, 128), spacing: Sequence[float] = (2.0, 1.5, 1.5),
                       seed: int = 0) -> np.ndarray:
    """The lesion-free tissue classes (uint8, ids of :data:`TISSUES`) of ``make_phantom(shape, spacing, seed=seed)``."""
    shape_t, spacing_t = _check_args(shape, spacing, 0)
    return _anatomy(shape_t, spacing_t, _streams(seed)[0])[0]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _lesion_shape(rng: np.random.Generator, diameter_mm: float, spacing: tuple[float, float, float]
                  ) -> np.ndarray:
    """Boolean block: a randomly rotated, anisotropic ellipsoid with a smooth-noise perturbed surface."""
    r = diameter_mm / 2.0
    half = [int(np.ceil(1.45 * r / s)) + 1 for s in spacing]
    coords = np.stack(np.meshgrid(*[np.arange(-h, h + 1, dtype=np.float32) * s for h, s in zip(half, spacing)],
                                  indexing="ij"), axis=-1)
    semi = r * rng.uniform(0.75, 1.2, size=3)
    local = coords @ _random_rotation(rng).astype(np.float32)
    rho = np.sqrt(((local / semi) ** 2).sum(-1))
    # Lobulated surface: perturb the ellipsoidal radius with a smooth field (sigma ~ r/3).
    sig = [max(0.6, r / 3.0 / s) for s in spacing]
    bumps = ndimage.gaussian_filter(rng.standard_normal(rho.shape).astype(np.float32), sig, mode="nearest")
    bumps /= max(float(np.abs(bumps).max()), 1e-6)
    mask = rho + rng.uniform(0.1, 0.3) * bumps < 1.0
    return mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    lab, n = ndimage.label(mask)  # face connectivity: the strictest, so one component under any connectivity
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


# Lesion kinds: (host tissue(s), diameter range mm, HU offsets relative to the host or absolute values)
_KINDS = ("lung", "liver", "soft")


def _lesion_hu(rng: np.random.Generator, kind: str) -> float:
    if kind == "lung":
        return float(rng.uniform(0.0, 60.0))  # solid nodule, far above lung parenchyma
    hypo = bool(rng.random() < 0.6)
    if kind == "liver":
        return float(rng.uniform(15.0, 35.0) if hypo else rng.uniform(105.0, 150.0))
    return float(rng.uniform(-5.0, 15.0) if hypo else rng.uniform(80.0, 120.0))


def _place_lesions(tissue: np.ndarray, hu: np.ndarray, n_lesions: int, spacing: tuple[float, float, float],
                   rng: np.random.Generator) -> np.ndarray:
    shape = tissue.shape
    labels = np.zeros(shape, np.uint16)
    occupied = np.zeros(shape, bool)  # lesions dilated by one voxel: keeps instances separate components
    body = tissue != TISSUES["air"]
    hosts = {
        "lung": np.isin(tissue, (TISSUES["lung"], TISSUES["lung_vessel"])),
        "liver": (tissue == TISSUES["liver"]) | ((tissue == TISSUES["blood"]) & ndimage.binary_dilation(
            tissue == TISSUES["liver"], iterations=2)),
        "soft": tissue == TISSUES["soft_tissue"],
    }
    host_grown = {k: ndimage.binary_dilation(v, iterations=1) for k, v in hosts.items()}
    host_idx = {k: np.flatnonzero(v) for k, v in hosts.items()}
    max_diam = {"lung": 25.0, "liver": 30.0, "soft": 22.0}
    kinds = [_KINDS[(i + int(rng.integers(3))) % 3] for i in range(n_lesions)]
    for lesion_id, kind in enumerate(kinds, start=1):
        placed = False
        for attempt in range(80):
            use_kind = kind if attempt < 50 else _KINDS[(attempt + lesion_id) % 3]  # fall back to other hosts
            lo, hi = LESION_DIAMETER_MM[0], min(max_diam[use_kind], LESION_DIAMETER_MM[1])
            # small lesions are more common: log-uniform diameter, shrunk on repeated failures
            diam = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
            diam = max(lo, diam * (0.98 ** attempt))
            candidates = host_idx[use_kind]
            if candidates.size == 0:
                continue
            centre = np.unravel_index(int(candidates[rng.integers(candidates.size)]), shape)
            if occupied[centre]:
                continue
            block = _lesion_shape(rng, diam, spacing)
            h = [b // 2 for b in block.shape]
            lo_idx = [c - hh for c, hh in zip(centre, h)]
            src = tuple(slice(max(0, -l), b - max(0, l + b - s)) for l, b, s in zip(lo_idx, block.shape, shape))
            dst = tuple(slice(max(0, l), min(s, l + b)) for l, b, s in zip(lo_idx, block.shape, shape))
            # work in the block's region plus a one-voxel margin (for the separation dilation)
            reg = tuple(slice(max(0, d.start - 1), min(n, d.stop + 1)) for d, n in zip(dst, shape))
            inner_sl = tuple(slice(d.start - r.start, d.stop - r.start) for d, r in zip(dst, reg))
            cand = np.zeros(tuple(r.stop - r.start for r in reg), bool)
            cand[inner_sl] = block[src]
            # Mostly inside the host (cheaper than a distance map): a centre near the host's edge would
            # leave a clipped half-lesion. Then clip to the host (lung nodules may touch vessels).
            allowed = host_grown[use_kind][reg] & body[reg]
            if (cand & allowed).sum() < 0.85 * block.sum():
                continue
            cand &= allowed
            cand = _largest_component(cand)
            if cand.sum() < 4 or (cand & occupied[reg]).any():
                continue
            cand = ndimage.binary_fill_holes(cand)
            labels[reg][cand] = lesion_id
            occupied[reg] |= ndimage.binary_dilation(cand, structure=np.ones((3, 3, 3), bool))
            # intensity: lesion HU with mild internal texture (necrotic-looking centre for large hypodense ones)
            value = _lesion_hu(rng, use_kind)
            inside = ndimage.distance_transform_edt(np.pad(cand, 1), sampling=spacing)[1:-1, 1:-1, 1:-1][cand]
            centre_drop = -8.0 * (inside / max(float(inside.max()), 1e-6)) if value < 60 else 0.0
            hu[reg][cand] = value + centre_drop + rng.normal(0.0, 4.0, size=int(cand.sum()))
            placed = True
            break
        if not placed:
            raise PhantomError(
                f"could not place lesion {lesion_id} of {n_lesions} in a phantom of shape {shape}; "
                "use fewer lesions or a larger field of view")
    return labels


def default_origin(shape: Sequence[int], spacing: Sequence[float], direction: np.ndarray | None = None
                   ) -> tuple[float, float, float]:
    """Origin (LPS x, y, z) that puts the volume's centre at the world origin."""
    d = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    half_ijk = np.array([(shape[2] - 1) * spacing[2], (shape[1] - 1) * spacing[1], (shape[0] - 1) * spacing[0]]) / 2
    return tuple(float(v) for v in -(d @ half_ijk))  # type: ignore[return-value]


def make_phantom(shape: Sequence[int] = (64, 128, 128), spacing: Sequence[float] = (2.0, 1.5, 1.5),
                 n_lesions: int = 3, seed: int = 0, direction: np.ndarray | Sequence[float] | None = None,
                 origin: Sequence[float] | None = None) -> tuple[Volume, Volume]:
    """A CT-like phantom (int16 HU) and its lesion instance labels (uint16, ids 1..n_lesions).

    ``shape``/``spacing`` are (z, y, x); ``direction`` is the ITK 3x3 matrix (identity by default) and
    ``origin`` the LPS position of voxel (0, 0, 0) (default: volume centred on the world origin).
    """
    shape_t, spacing_t = _check_args(shape, spacing, n_lesions)
    rng_anat, rng_les, rng_noise = _streams(seed)
    tissue, hu = _anatomy(shape_t, spacing_t, rng_anat)
    labels = _place_lesions(tissue, hu, int(n_lesions), spacing_t, rng_les)

    # Partial volume: slight smoothing (about 0.6 mm), then correlated noise like reconstructed CT.
    hu = ndimage.gaussian_filter(hu, [0.6 / s + 0.25 for s in spacing_t], mode="nearest")
    noise = ndimage.gaussian_filter(rng_noise.standard_normal(shape_t).astype(np.float32), 0.6, mode="wrap")
    noise *= NOISE_SIGMA_HU / max(float(noise.std()), 1e-6)
    outside = tissue == TISSUES["air"]
    noise[outside] *= 0.3  # air outside the patient is reconstructed less noisy and is clipped at -1024
    hu += noise
    ct = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    direction_m = np.eye(3) if direction is None else np.asarray(direction, float).reshape(3, 3)
    origin_t = default_origin(shape_t, spacing_t, direction_m) if origin is None else tuple(origin)
    ct_vol = Volume(ct, spacing_t, origin_t, direction_m)  # type: ignore[arg-type]
    return ct_vol, ct_vol.with_array(labels)


def lesion_prompts(labels: Volume | np.ndarray) -> dict[int, dict[str, list[int]]]:
    """Per lesion id: ``{"point": [z, y, x], "box": [z0, z1, y0, y1, x0, x1]}`` (voxel indices, half-open box).

    The point is a lesion voxel near the centroid: among the lesion's deep voxels (distance to the
    boundary at least half the maximum) the one closest to the centroid, so it is inside even for
    concave shapes. ``json.dumps`` of the result (int keys become strings) is the published prompt JSON.
    """
    arr = labels.array if isinstance(labels, Volume) else np.asarray(labels)
    spacing = labels.spacing if isinstance(labels, Volume) else (1.0, 1.0, 1.0)
    if arr.ndim != 3:
        raise PhantomError(f"labels must be a 3D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise PhantomError(f"labels must be an integer instance map, got dtype {arr.dtype}")
    out: dict[int, dict[str, list[int]]] = {}
    objects = ndimage.find_objects(arr.astype(np.int64, copy=False))
    for idx, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        mask = arr[sl] == idx
        off = np.array([s.start for s in sl])
        pts = np.argwhere(mask)
        centroid = pts.mean(axis=0)
        depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1][mask]
        deep = pts[depth >= 0.5 * depth.max()]
        d2 = (((deep - centroid) * np.asarray(spacing)) ** 2).sum(axis=1)
        point = deep[int(np.argmin(d2))] + off
        bbox = tight_bbox(mask)
        assert bbox is not None
        box = [int(bbox[0] + off[0]), int(bbox[1] + off[0]), int(bbox[2] + off[1]), int(bbox[3] + off[1]),
               int(bbox[4] + off[2]), int(bbox[5] + off[2])]
        out[idx] = {"point": [int(v) for v in point], "box": box}
    return out
