"""Deterministic synthetic follow-up scans with known truth.

Used by the tracking tests, the demo and synthetic training pairs (``train.synthesize``). A follow-up
is made from a baseline CT and its lesion instance map by, in this order:

1. lesion-level growth / shrinkage (the published anatomy-informed field, see :func:`grow_shrink_field`),
2. optionally vanishing lesions (voxels replaced by the surrounding tissue, label removed),
3. a global rigid motion (shift, optional small rotation) plus a smooth deformation, in physical space,
4. optionally a different z extent (slices cropped or padded with air, to exercise z-alignment),
5. noise.

Image and labels always go through the same coordinate maps (linear interpolation for the image,
nearest neighbour for the labels), so instance ids correspond between baseline and follow-up.

Displacements use the pull-back convention: ``out(x) = in(x + u(x))``.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from ..core.geometry import GeometryError, Volume
from ..core.results import tight_bbox

GROWTH_AMPLITUDES: tuple[float, ...] = (-22.0, -18.0, 15.0, 25.0)  # published set; negative shrinks
R_RANGE = 3.5  # r(x) ~ U(-R_RANGE, R_RANGE) voxel-wise
SIGMA_R = 3.0  # smoothing of r, voxels
SIGMA_S_RANGE = (4.0, 5.5)  # smoothing of the lesion mask, voxels, chosen by lesion size
N_STAGES = 3  # growth applied as this many stages of amplitude A / N_STAGES each
AIR_HU = -1000.0


class FollowupError(ValueError):
    """Invalid arguments for a synthetic follow-up (unknown lesion id, bad z extent, mismatched grids...)."""


# ---------------------------------------------------------------------------------------------------------
# lesion-level growth / shrinkage
# ---------------------------------------------------------------------------------------------------------
def lesion_sigma(n_voxels: int) -> float:
    """sigma_s (voxels) for a lesion: 4 for small lesions rising linearly to 5.5 for large ones.

    Size is the equivalent-sphere diameter d in voxels: d <= 6 -> 4.0, d >= 30 -> 5.5. Larger lesions
    get a wider smoothing so that the field reaches over their larger boundary.
    """
    d = (6.0 * max(int(n_voxels), 1) / np.pi) ** (1.0 / 3.0)
    t = float(np.clip((d - 6.0) / 24.0, 0.0, 1.0))
    return SIGMA_S_RANGE[0] + t * (SIGMA_S_RANGE[1] - SIGMA_S_RANGE[0])


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(0 if rng is None else int(rng))


def _grown_box(bbox: tuple[int, ...], margin: int, shape: Sequence[int]) -> tuple[slice, slice, slice]:
    return tuple(slice(max(0, bbox[2 * a] - margin), min(shape[a], bbox[2 * a + 1] + margin))  # type: ignore
                 for a in range(3))


def grow_shrink_field(labels: np.ndarray | Volume, lesion_id: int, amplitude: float,
                      sigma_s: float | None = None, rng: np.random.Generator | int | None = None) -> np.ndarray:
    """One stage of the lesion-level field ``V = grad(G_sigma_s * S_lesion) * A(x)`` (voxel units).

    ``A(x) = amplitude * (1 + (G_sigma_r * r)(x))`` with ``r ~ U(-3.5, 3.5)`` voxel-wise, ``sigma_r = 3``.
    The published formula writes ``A(x) = A * (G_sigma_r * r)(x)``; taken literally that factor has zero
    mean, flips sign from place to place and could not grow or shrink a lesion as a whole, so the
    smoothed noise here modulates the amplitude around A (about +-15 %) and makes the change irregular.

    Sign convention: the gradient of the smoothed mask points into the lesion, and the field is used
    as a pull-back displacement (``out(x) = in(x + V(x))``), so boundary voxels just outside the lesion
    sample from inside it: ``amplitude > 0`` grows the lesion, ``< 0`` shrinks it.

    Returns a float32 array (3, z, y, x), zero away from the lesion. ``sigma_s=None`` picks it from the
    lesion size (:func:`lesion_sigma`). An absent lesion gives a zero field.
    """
    arr = labels.array if isinstance(labels, Volume) else np.asarray(labels)
    if arr.ndim != 3:
        raise FollowupError(f"labels must be a 3D instance map, got shape {arr.shape}")
    field = np.zeros((3, *arr.shape), np.float32)
    mask = arr == lesion_id
    bbox = tight_bbox(mask)
    if bbox is None:
        return field
    if sigma_s is None:
        sigma_s = lesion_sigma(int(mask.sum()))
    if not (np.isfinite(sigma_s) and sigma_s > 0):
        raise FollowupError(f"sigma_s must be positive, got {sigma_s}")
    gen = _as_rng(rng)
    # Beyond 3.5 sigma from the lesion the smoothed mask's gradient is below 1 % of its peak: cut there.
    box = _grown_box(bbox, int(np.ceil(3.5 * sigma_s)) + 1, arr.shape)
    smooth = ndimage.gaussian_filter(mask[box].astype(np.float32), sigma_s, mode="constant")
    r = gen.uniform(-R_RANGE, R_RANGE, size=smooth.shape).astype(np.float32)
    modulation = 1.0 + ndimage.gaussian_filter(r, SIGMA_R, mode="reflect")
    for axis, g in enumerate(np.gradient(smooth)):
        field[(axis, *box)] = float(amplitude) * g * modulation
    return field


def _warp_points(array: np.ndarray, disp: np.ndarray, order: int, cval: float) -> np.ndarray:
    """``array`` pulled back through ``disp`` (3, z, y, x); only voxels with a non-zero displacement are
    resampled (the field is zero away from the lesions, so this is a small fraction of the volume)."""
    out = array.copy()
    pts = np.nonzero(np.any(disp != 0, axis=0))
    if pts[0].size:
        coords = np.stack(pts).astype(np.float32) + disp[(slice(None), *pts)]
        out[pts] = ndimage.map_coordinates(array, coords, order=order, mode="constant", cval=cval,
                                           prefilter=False).astype(array.dtype, copy=False)
    return out


def apply_lesion_growth(image: np.ndarray, labels: np.ndarray, growth: Mapping[int, float],
                        seed: int | np.random.SeedSequence = 0, n_stages: int = N_STAGES,
                        fill_value: float = AIR_HU) -> tuple[np.ndarray, np.ndarray, dict[int, dict]]:
    """Grow / shrink lesions: ``growth`` maps lesion id -> amplitude A (published set: -22, -18, 15, 25).

    The amplitude is split evenly into ``n_stages`` stages (A / n_stages each). Each stage recomputes the
    field from the lesion as the previous stages left it (so growth follows the lesion's new outline,
    and each stage moves the boundary by at most a voxel or two, which keeps the map fold-free). The
    stages are composed into one displacement, so the image is interpolated only once.
    ``sigma_s`` is chosen from the baseline size of each lesion and kept over the stages; the smoothed
    noise r of a lesion is the same in every stage. Returns (image, labels, per-lesion info).
    """
    if n_stages < 1:
        raise FollowupError(f"n_stages must be >= 1, got {n_stages}")
    present = set(np.unique(labels).tolist()) - {0}
    unknown = sorted(set(int(k) for k in growth) - present)
    if unknown:
        raise FollowupError(f"growth names lesion ids {unknown} that are not in the label map (ids: {sorted(present)})")
    info: dict[int, dict] = {}
    active = {int(k): float(a) for k, a in growth.items() if float(a) != 0.0}
    if not active:
        return image, labels, info
    root = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    seeds = dict(zip(sorted(active), root.spawn(len(active))))
    sigmas = {lid: lesion_sigma(int(np.count_nonzero(labels == lid))) for lid in active}
    total = np.zeros((3, *labels.shape), np.float32)
    current = labels
    for _ in range(n_stages):
        stage = np.zeros_like(total)
        for lid, amp in active.items():
            # the same generator state per stage: the lesion's irregularity pattern stays put
            stage += grow_shrink_field(current, lid, amp / n_stages, sigmas[lid], np.random.default_rng(seeds[lid]))
        # compose: new total map x -> x + u(x) + U(x + u(x)); where u(x) = 0 the total is unchanged
        pts = np.nonzero(np.any(stage != 0, axis=0))
        u = stage[(slice(None), *pts)]
        at = np.stack(pts).astype(np.float32) + u
        if total.any():
            moved = np.stack([ndimage.map_coordinates(total[a], at, order=1, mode="nearest", prefilter=False)
                              for a in range(3)])
        else:
            moved = 0.0
        total[(slice(None), *pts)] = u + moved
        current = _warp_points(labels, total, order=0, cval=0)
    out_img = _warp_points(image.astype(np.float32), total, order=1, cval=fill_value)
    for lid, amp in active.items():
        info[lid] = {"amplitude": amp, "sigma_s": sigmas[lid], "stages": n_stages,
                     "stage_amplitude": amp / n_stages}
    return out_img, current, info


# ---------------------------------------------------------------------------------------------------------
# vanishing lesions
# ---------------------------------------------------------------------------------------------------------
def vanish_lesion(image: np.ndarray, labels: np.ndarray, lesion_id: int,
                  rng: np.random.Generator | int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Replace a lesion by the intensity of the tissue around it and remove its label.

    Each lesion voxel takes the local mean (Gaussian-weighted, sigma 2 voxels) of the lesion-free ring
    around the lesion at the ring voxel nearest to it, plus noise with the ring's own residual spread,
    so the filled region continues the neighbouring tissue rather than becoming a flat blob.
    """
    gen = _as_rng(rng)
    mask = labels == lesion_id
    bbox = tight_bbox(mask)
    if bbox is None:
        raise FollowupError(f"lesion {lesion_id} is not in the label map, cannot make it vanish")
    box = _grown_box(bbox, 6, labels.shape)
    m = mask[box]
    img = image[box].astype(np.float32)
    ring = ndimage.binary_dilation(m, iterations=3) & ~m & (labels[box] == 0)
    out_img = image.astype(np.float32, copy=True)
    if ring.any():
        wsum = ndimage.gaussian_filter(ring.astype(np.float32), 2.0, mode="constant")
        vsum = ndimage.gaussian_filter(np.where(ring, img, 0.0).astype(np.float32), 2.0, mode="constant")
        local = np.where(ring, vsum / np.maximum(wsum, 1e-6), 0.0)
        _, idx = ndimage.distance_transform_edt(~ring, return_indices=True)
        nearest = local[tuple(i[m] for i in idx)]
        resid = img[ring] - local[ring]
        spread = float(np.clip(1.4826 * np.median(np.abs(resid - np.median(resid))), 0.0, 40.0))
    else:  # the lesion is walled in by other lesions: fall back to the median of the unlabelled voxels
        free = labels == 0
        nearest = np.full(int(m.sum()), float(np.median(image[free])) if free.any() else AIR_HU, np.float32)
        spread = 0.0
    filled = nearest + gen.normal(0.0, spread, size=nearest.shape) if spread > 0 else nearest
    region_img = out_img[box]
    region_img[m] = filled
    out_labels = labels.copy()
    out_labels[mask] = 0
    return out_img, out_labels


# ---------------------------------------------------------------------------------------------------------
# global motion in physical space
# ---------------------------------------------------------------------------------------------------------
def rotation_matrix(rotation_deg: Sequence[float]) -> np.ndarray:
    """Rotation about the LPS x, then y, then z axis (degrees), as a 3x3 matrix acting on (x, y, z)."""
    ax, ay, az = np.deg2rad(np.asarray(rotation_deg, dtype=float))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def volume_center_world(volume: Volume) -> np.ndarray:
    return volume.voxel_to_world((np.asarray(volume.shape, float) - 1.0) / 2.0)


def _smooth_displacement_mm(shape: tuple[int, int, int], spacing: Sequence[float], magnitude_mm: float,
                            scale_mm: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth random world-space displacement (3, z, y, x) in mm with max norm ``magnitude_mm``.

    Drawn on a coarse lattice (spacing scale_mm / 2), smoothed there and interpolated linearly to the
    grid: cheap, and smooth on the scale of ``scale_mm``.
    """
    extent = np.asarray(shape, float) * np.asarray(spacing, float)
    coarse = tuple(int(np.ceil(e / (scale_mm / 2.0))) + 2 for e in extent)
    noise = rng.standard_normal((3, *coarse)).astype(np.float32)
    noise = np.stack([ndimage.gaussian_filter(n, 1.0, mode="nearest") for n in noise])
    pos = np.meshgrid(*[np.linspace(0.5, c - 1.5, n, dtype=np.float32) for c, n in zip(coarse, shape)],
                      indexing="ij")
    disp = np.stack([ndimage.map_coordinates(n, pos, order=1, mode="nearest") for n in noise])
    norm = float(np.sqrt((disp ** 2).sum(0)).max())
    return disp * (magnitude_mm / norm if norm > 0 else 0.0)


def _lesion_stats(lab: np.ndarray, vol: Volume) -> dict[int, tuple[int, list[float]]]:
    out = {}
    objs = ndimage.find_objects(lab.astype(np.int64, copy=False))
    for lid, sl in enumerate(objs, start=1):
        if sl is None:
            continue
        pts = np.argwhere(lab[sl] == lid) + np.array([s.start for s in sl])
        out[lid] = (int(len(pts)), [float(v) for v in vol.voxel_to_world(pts.mean(0))])
    return out


def make_followup(volume: Volume, labels: Volume, seed: int = 0,
                  shift_mm: Sequence[float] = (0.0, 0.0, 0.0),
                  smooth_deformation_mm: float = 0.0,
                  growth: Mapping[int, float] | None = None,
                  vanish: Iterable[int] = (),
                  z_extent: tuple[int, int] | None = None,
                  rotation_deg: Sequence[float] = (0.0, 0.0, 0.0),
                  deformation_scale_mm: float = 40.0,
                  noise_hu: float = 5.0,
                  n_stages: int = N_STAGES,
                  fill_value: float = AIR_HU) -> tuple[Volume, Volume, dict]:
    """A synthetic follow-up of ``volume`` (CT) with instance ``labels`` and its ground-truth labels.

    - ``growth``: lesion id -> amplitude A (see :func:`apply_lesion_growth`); ``vanish``: ids to remove.
    - ``shift_mm``: rigid translation in LPS (x, y, z) mm; ``rotation_deg``: small rotation about the
      volume centre (about LPS x, y, z). A baseline point p appears at ``R (p - c) + c + shift`` in the
      follow-up (before the smooth deformation).
    - ``smooth_deformation_mm``: max magnitude of a smooth random world-space deformation with
      correlation length ``deformation_scale_mm``.
    - ``z_extent=(start, stop)``: the follow-up covers baseline-grid slices start..stop-1 (may reach past
      either end; missing slices are ``fill_value``, air). The physical positions of kept slices are kept.
    - ``noise_hu``: sigma of added Gaussian noise.

    Returns (follow-up CT, follow-up labels on the follow-up grid, metadata). The metadata holds the
    applied parameters and, per lesion, voxel counts, volumes (ml), world centres, the volume ratio,
    the centre expected from the rigid motion, and a status (present / vanished / shrunk_away /
    out_of_view). Deterministic for a seed.
    """
    if not isinstance(volume, Volume) or not isinstance(labels, Volume):
        raise FollowupError("make_followup needs Volume objects for the image and the labels")
    if not volume.same_grid(labels):
        raise GeometryError("image and labels are not on the same grid (shape, spacing, origin, direction)")
    if not np.issubdtype(labels.array.dtype, np.integer):
        raise FollowupError(f"labels must be an integer instance map, got dtype {labels.array.dtype}")
    shift = np.asarray(shift_mm, dtype=float)
    if shift.shape != (3,) or not np.all(np.isfinite(shift)):
        raise FollowupError(f"shift_mm must be three finite numbers (LPS x, y, z), got {shift_mm!r}")
    if len(rotation_deg) != 3:
        raise FollowupError(f"rotation_deg must be three angles, got {rotation_deg!r}")
    if smooth_deformation_mm < 0 or noise_hu < 0 or deformation_scale_mm <= 0:
        raise FollowupError("smooth_deformation_mm and noise_hu must be >= 0, deformation_scale_mm > 0")
    growth = {int(k): float(v) for k, v in (growth or {}).items()}
    vanish = sorted(int(v) for v in vanish)
    both = sorted(set(growth) & set(vanish))
    if both:
        raise FollowupError(f"lesions {both} are asked both to change size and to vanish")
    present = set(np.unique(labels.array).tolist()) - {0}
    missing = sorted(set(vanish) - present)
    if missing:
        raise FollowupError(f"vanish names lesion ids {missing} that are not in the label map (ids: {sorted(present)})")
    nz = volume.shape[0]
    if z_extent is not None:
        z0, z1 = (int(z_extent[0]), int(z_extent[1]))
        if z1 <= z0:
            raise FollowupError(f"z_extent must be (start, stop) with stop > start, got {z_extent!r}")
        if z1 <= 0 or z0 >= nz:
            raise FollowupError(f"z_extent {z_extent!r} does not overlap the {nz} baseline slices")
    else:
        z0, z1 = 0, nz

    ss_growth, ss_vanish, ss_deform, ss_noise = np.random.SeedSequence(int(seed)).spawn(4)
    before = _lesion_stats(labels.array, volume)

    # 1. lesion-level growth / shrinkage
    img, lab, growth_info = apply_lesion_growth(volume.array.astype(np.float32), labels.array, growth,
                                                seed=ss_growth, n_stages=n_stages, fill_value=fill_value)
    after_growth = _lesion_stats(lab, volume)
    # 2. vanishing lesions
    rng_v = np.random.default_rng(ss_vanish)
    for lid in vanish:
        img, lab = vanish_lesion(img, lab, lid, rng_v)

    # 3. + 4. global motion and z extent: pull each follow-up voxel back to the baseline grid
    out_origin = volume.voxel_to_world((z0, 0, 0))
    out_grid = Volume(np.zeros((z1 - z0, *volume.shape[1:]), np.uint8), volume.spacing, tuple(out_origin),
                      volume.direction.copy())
    rot = rotation_matrix(rotation_deg)
    centre = volume_center_world(volume)
    identity = (not shift.any() and np.allclose(rot, np.eye(3)) and smooth_deformation_mm == 0
                and (z0, z1) == (0, nz))
    if identity:
        out_img, out_lab = img, lab
    else:
        idx = np.indices(out_grid.shape, dtype=np.float32).reshape(3, -1).T
        q = out_grid.voxel_to_world(idx)
        if smooth_deformation_mm > 0:
            d = _smooth_displacement_mm(out_grid.shape, volume.spacing, smooth_deformation_mm,
                                        deformation_scale_mm, np.random.default_rng(ss_deform))
            q = q + d.reshape(3, -1).T
        p = (q - centre - shift) @ rot + centre  # R^T (q - c - t) + c, row-vector form
        coords = volume.world_to_voxel(p).T.reshape(3, *out_grid.shape).astype(np.float32)
        out_img = ndimage.map_coordinates(img, coords, order=1, mode="constant", cval=fill_value, prefilter=False)
        out_lab = ndimage.map_coordinates(lab, coords, order=0, mode="constant", cval=0, prefilter=False)
    # 5. noise
    if noise_hu > 0:
        out_img = out_img + np.random.default_rng(ss_noise).normal(0.0, noise_hu, out_img.shape).astype(np.float32)
    dtype = volume.array.dtype
    if np.issubdtype(dtype, np.integer):
        info_t = np.iinfo(dtype)
        out_img = np.clip(np.rint(out_img), info_t.min, info_t.max)
    follow_ct = out_grid.with_array(out_img.astype(dtype))
    follow_lab = out_grid.with_array(out_lab.astype(labels.array.dtype))

    after = _lesion_stats(follow_lab.array, follow_ct)
    vml = volume.voxel_volume_ml()
    lesions: dict[str, dict] = {}
    for lid, (n0, c0) in before.items():
        n_g, c_g = after_growth.get(lid, (0, c0))
        expected = (rot @ (np.asarray(c_g) - centre) + centre + shift).tolist()
        n1, c1 = after.get(lid, (0, None))
        if lid in vanish:
            status = "vanished"
        elif n_g == 0:
            status = "shrunk_away"
        elif n1 == 0:
            status = "out_of_view"
        else:
            status = "present"
        lesions[str(lid)] = {
            "status": status, "baseline_voxels": n0, "followup_voxels": n1,
            "baseline_ml": n0 * vml, "followup_ml": n1 * vml,
            "volume_ratio": (n1 / n0) if n0 else None,
            "growth_volume_ratio": (n_g / n0) if n0 else None,  # before motion / z cropping
            "growth_amplitude": growth.get(lid, 0.0),
            "baseline_center_lps": c0, "followup_center_lps": c1,
            "expected_followup_center_lps": [float(v) for v in expected],
        }
    meta = {
        "seed": int(seed),
        "order": ["growth", "vanish", "rigid+deformation", "z_extent", "noise"],
        "growth": {str(k): v for k, v in growth_info.items()},
        "vanished": vanish,
        "shift_mm_lps": shift.tolist(),
        "rotation_deg": [float(v) for v in rotation_deg],
        "rotation_center_lps": centre.tolist(),
        "smooth_deformation_mm": float(smooth_deformation_mm),
        "deformation_scale_mm": float(deformation_scale_mm),
        "z_extent": [z0, z1],
        "noise_hu": float(noise_hu),
        "followup_grid": {"shape": list(follow_ct.shape), "spacing": list(follow_ct.spacing),
                          "origin": list(follow_ct.origin), "direction": follow_ct.direction.ravel().tolist()},
        "lesions": lesions,
    }
    return follow_ct, follow_lab, meta


def random_growth(label_ids: Iterable[int], rng: np.random.Generator | int | None = None) -> dict[int, float]:
    """Draw one published amplitude per lesion (uniform over :data:`GROWTH_AMPLITUDES`)."""
    gen = _as_rng(rng)
    return {int(i): float(gen.choice(GROWTH_AMPLITUDES)) for i in sorted(label_ids)}
