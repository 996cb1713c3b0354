"""Classical (SimpleITK) baseline -> follow-up registration, returning the same pull-back :class:`Deformation`.

This is the paper's "registration" baseline and the fallback propagation when no learned tracking weights are
installed. It works in physical space on the two original :class:`Volume`s (grids, spacings and directions may
differ): both are smoothed and resampled to about ``resolution_mm``, aligned by an affine registration (centre of
mass initialisation, correlation metric, three resolution levels) and refined by symmetric-forces demons
(two levels; CT intensities are comparable between time points, and demons costs milliseconds per iteration where
a B-spline with a mutual-information metric took tens of seconds).
The transform maps follow-up physical points to baseline physical points; it is sampled on a coarse grid over the
follow-up (``align_corners=False`` relation to the follow-up's voxels) and stored as baseline voxel coordinates,
so :func:`propagation.warp_mask` interpolates it linearly and warps masks at full resolution.

Determinism: fixed thread count, full (``NONE``) or ``REGULAR`` metric sampling with a fixed seed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ..core.geometry import Volume
from .propagation import Deformation


DEFAULT_RESOLUTION_MM = 3.0  # working grid of the registration (both scans resampled to it)

class RegistrationError(ValueError):
    """Classical registration failed, or the two images do not overlap enough to be registered."""


@dataclass
class ClassicalRegistrationReport:
    """Diagnostics of one classical registration."""

    overlap: float  # overlapping physical volume / volume of the smaller image (after registration)
    correlation_before: float  # Pearson correlation on the overlap, initial alignment
    correlation: float  # Pearson correlation on the overlap, final transform
    affine_metric: float
    deformable: bool  # whether the demons stage ran
    stages: list[str] = field(default_factory=list)


def _coarse_grid(volume: Volume, resolution_mm: float) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Node count per axis (z, y, x) for ~resolution_mm nodes, never finer than the image itself."""
    n = np.array(volume.shape, dtype=np.float64)
    s = np.array(volume.spacing, dtype=np.float64)
    g = np.maximum(np.minimum(np.round(n * s / resolution_mm), n), 2).astype(int)
    g = np.minimum(g, n.astype(int))  # a 1-voxel axis stays 1 node
    return n, tuple(int(v) for v in g)  # type: ignore[return-value]


def _node_voxels(n: np.ndarray, g: tuple[int, int, int]) -> list[np.ndarray]:
    return [(np.arange(gk) + 0.5) * nk / gk - 0.5 for nk, gk in zip(n, g)]


def _reference_image(volume: Volume, g: tuple[int, int, int]) -> sitk.Image:
    """An empty SimpleITK image whose voxels sit at the coarse nodes over ``volume``."""
    n = np.array(volume.shape, dtype=np.float64)
    first = np.array([0.5 * nk / gk - 0.5 for nk, gk in zip(n, g)])
    origin = volume.voxel_to_world(first)
    spacing_zyx = np.array(volume.spacing) * n / np.array(g)
    ref = sitk.Image([int(v) for v in g[::-1]], sitk.sitkFloat32)
    ref.SetOrigin(tuple(float(v) for v in origin))
    ref.SetSpacing(tuple(float(v) for v in spacing_zyx[::-1]))
    ref.SetDirection(tuple(float(v) for v in volume.direction.ravel()))
    return ref


def _to_sitk(volume: Volume) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in volume.spacing[::-1]))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in volume.direction.ravel()))
    return image


def _clip_range(volume: Volume, name: str = "image") -> tuple[float, float]:
    a = np.asarray(volume.array)
    sample = a.reshape(-1)[:: max(1, a.size // 1_000_000)].astype(np.float32)  # subsample before casting
    lo, hi = np.percentile(sample, [0.5, 99.5])
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise RegistrationError(f"{name} contains NaN or infinite values")
    if hi - lo <= 1e-6 * max(1.0, abs(lo)):
        raise RegistrationError(f"{name} has no contrast (constant intensity {lo:g}); cannot register it")
    return float(lo), float(hi)


def _downsample(
    volume: Volume, resolution_mm: float, threads: int, name: str = "image"
) -> tuple[sitk.Image, tuple[float, float]]:
    """Clip to the 0.5-99.5 percentiles, smooth against aliasing and resample onto the coarse node grid."""
    lo, hi = _clip_range(volume, name)
    image = sitk.Clamp(_to_sitk(volume), sitk.sitkFloat32, lo, hi)
    _, g = _coarse_grid(volume, resolution_mm)
    ref = _reference_image(volume, g)
    # Block averaging first (cheap on a 500^3 scan), then a small Gaussian for the remaining factor.
    factors = [max(1, int(np.floor(n / m))) for n, m in zip(volume.shape[::-1], g[::-1])]
    if max(factors) > 1:
        image = sitk.BinShrink(image, factors)
    old = np.array(image.GetSpacing())
    new = np.array(ref.GetSpacing())
    variance = np.maximum(new ** 2 - old ** 2, 0.0) / (2.355 ** 2)  # FWHM of the new voxel, in mm^2
    if np.any(variance > 0):
        smoother = sitk.DiscreteGaussianImageFilter()
        smoother.SetVariance([float(v) for v in variance])
        smoother.SetMaximumKernelWidth(32)
        smoother.SetUseImageSpacing(True)
        smoother.SetNumberOfThreads(threads)
        image = smoother.Execute(image)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(ref)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(lo)
    resampler.SetNumberOfThreads(threads)
    return resampler.Execute(image), (lo, hi)


def _mass_image(image: sitk.Image, low: float) -> sitk.Image:
    # Moments need non-negative "mass": CT air (about -1000) must weigh nothing, not negatively.
    return sitk.Clamp(image - low, sitk.sitkFloat32, 0.0, 1e9)


def _sampling(reg: sitk.ImageRegistrationMethod, fixed: sitk.Image, seed: int, max_samples: int) -> None:
    n = int(np.prod(fixed.GetSize()))
    if n <= max_samples:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(max_samples / n, seed)


def _correlation(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform, threads: int) -> tuple[float, float]:
    """Pearson correlation on the overlap, and the overlapping share of the fixed grid's nodes."""
    inside_img = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    inside_img.CopyInformation(moving)
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(fixed)
    resampler.SetTransform(transform)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetNumberOfThreads(threads)
    inside = sitk.GetArrayFromImage(resampler.Execute(inside_img)) > 0.999
    warped = sitk.GetArrayFromImage(resampler.Execute(moving))
    f = sitk.GetArrayFromImage(fixed)
    if inside.sum() < 10:
        return 0.0, 0.0
    a = f[inside].astype(np.float64)
    b = warped[inside].astype(np.float64)
    if a.std() < 1e-6 or b.std() < 1e-6:
        return 0.0, float(inside.mean())
    return float(np.corrcoef(a, b)[0, 1]), float(inside.mean())


def _demons(
    fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform, moving_low: float, sigma_mm: float, threads: int,
    max_voxels: int = 300_000,
) -> sitk.Image:
    """Residual displacement field (fixed grid, mm, x-y-z) after the affine: moving(affine(x + d(x))) ~ fixed(x).

    Symmetric-forces demons at two levels (2x coarser, then the coarse grid itself, or a grid of at most about
    ``max_voxels`` voxels). Where the baseline does not cover the follow-up, the fixed image is replaced by the
    warped moving image, so the edge of the baseline's field of view exerts no force.
    """
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(fixed)
    resampler.SetTransform(affine)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetNumberOfThreads(threads)
    resampler.SetDefaultPixelValue(moving_low)
    warped = resampler.Execute(moving)
    ones = sitk.Image(moving.GetSize(), sitk.sitkFloat32) + 1.0
    ones.CopyInformation(moving)
    resampler.SetDefaultPixelValue(0.0)
    inside = sitk.Cast(resampler.Execute(ones) > 0.999, sitk.sitkFloat32)
    # No histogram matching: CT intensities are calibrated (HU), and matching histograms of scans with different
    # fields of view shifts the soft-tissue range that the lesion boundaries depend on.
    target = fixed * inside + warped * (1.0 - inside)

    disp: sitk.Image | None = None
    # Demons cost grows with the grid: the finest level is capped at ~max_voxels (large scans: a coarser field).
    base = 1
    while np.prod(np.array(fixed.GetSize()) / base) > max_voxels:
        base += 1
    for shrink, iterations in ((2 * base, 40), (base, 30)):
        if shrink > 1 and min(fixed.GetSize()) < 4 * shrink:
            continue
        f = sitk.Shrink(target, [shrink] * 3) if shrink > 1 else target
        m = sitk.Shrink(warped, [shrink] * 3) if shrink > 1 else warped
        demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
        demons.SetNumberOfIterations(iterations)
        demons.SetSmoothDisplacementField(True)
        # the standard deviation is in voxels of the current level: keep it about sigma_mm
        demons.SetStandardDeviations(max(1.0, sigma_mm / (min(fixed.GetSpacing()) * shrink)))
        demons.SetMaximumUpdateStepLength(2.0)
        demons.SetNumberOfThreads(threads)
        if disp is None:
            disp = demons.Execute(f, m)
        else:
            init = sitk.Resample(disp, f, sitk.Transform(), sitk.sitkLinear, 0.0, disp.GetPixelID())
            disp = demons.Execute(f, m, init)
    if disp is None:  # tiny images: no pyramid level ran
        disp = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64)
        disp.CopyInformation(fixed)
    if tuple(disp.GetSize()) != tuple(fixed.GetSize()):
        disp = sitk.Resample(disp, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, disp.GetPixelID())
    return sitk.Cast(disp, sitk.sitkVectorFloat64)


def _initial_transform(
    fixed: sitk.Image, moving: sitk.Image, f_lo: float, m_lo: float, threads: int, share_to_overlap: float
) -> tuple[sitk.AffineTransform, float, str]:
    """Best of three starting points by intensity correlation on the overlap: the scanner coordinates as they are
    (longitudinal scans of one patient are often roughly aligned already), the centres of mass (body), and the
    centres of the fields of view. Candidates overlapping less than a quarter of the smaller image are used only
    when no candidate does."""
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    identity = sitk.AffineTransform(3)
    identity.SetCenter(centre)
    candidates: list[tuple[str, sitk.AffineTransform]] = [("scanner coordinates", identity)]
    try:
        candidates.append(("centres of mass", sitk.AffineTransform(sitk.CenteredTransformInitializer(
            _mass_image(fixed, f_lo), _mass_image(moving, m_lo), sitk.AffineTransform(3),
            sitk.CenteredTransformInitializerFilter.MOMENTS,
        ))))
    except RuntimeError:  # zero mass (e.g. an image of air only): the other candidates remain
        pass
    candidates.append(("image centres", sitk.AffineTransform(sitk.CenteredTransformInitializer(
        fixed, moving, sitk.AffineTransform(3), sitk.CenteredTransformInitializerFilter.GEOMETRY,
    ))))
    scored = []
    for name, t in candidates:
        corr, share = _correlation(fixed, moving, t, threads)
        scored.append((min(1.0, share * share_to_overlap) >= 0.25, corr, name, t))
    best = max(scored, key=lambda c: (c[0], c[1]))  # max() keeps the first of equals: deterministic
    return best[3], best[1], best[2]


def classical_transform(
    baseline: Volume,
    followup: Volume,
    *,
    resolution_mm: float = DEFAULT_RESOLUTION_MM,
    deformable: bool = True,
    demons_sigma_mm: float = 9.0,
    threads: int = 2,
    seed: int = 12345,
    max_samples: int = 20_000,
    min_overlap: float = 0.2,
    min_correlation: float = 0.2,
) -> tuple[sitk.Transform, ClassicalRegistrationReport]:
    """Register baseline (moving) to follow-up (fixed) in physical space.

    Returns the transform mapping follow-up physical points (LPS mm) to baseline physical points, and a report.
    Raises :class:`RegistrationError` when SimpleITK fails, or when after registration the images overlap on less
    than ``min_overlap`` of the smaller one or their intensities correlate less than ``min_correlation``.
    """
    if resolution_mm <= 0 or demons_sigma_mm <= 0:
        raise RegistrationError("resolution_mm and demons_sigma_mm must be positive")
    for name, v in (("baseline", baseline), ("follow-up", followup)):
        if min(v.shape) < 2:
            raise RegistrationError(f"{name} image is too small to register: shape {v.shape}")
    fixed, (f_lo, _) = _downsample(followup, resolution_mm, threads, "follow-up image")
    moving, (m_lo, _) = _downsample(baseline, resolution_mm, threads, "baseline image")
    stages: list[str] = []
    fixed_volume = float(np.prod(np.array(followup.shape) * np.array(followup.spacing)))
    moving_volume = float(np.prod(np.array(baseline.shape) * np.array(baseline.spacing)))
    initial, corr_before, how = _initial_transform(
        fixed, moving, f_lo, m_lo, threads, fixed_volume / min(fixed_volume, moving_volume)
    )
    stages.append(f"initialisation: {how}")

    # -- affine: three levels, correlation ------------------------------------------------------------------------
    # (ITK's Mattes mutual information is not bit-reproducible from run to run, even on one thread; the
    # correlation metric is, and suits CT-to-CT where intensities are related linearly.)
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(threads)
    reg.SetMetricAsCorrelation()
    _sampling(reg, fixed, seed, max_samples)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-2, numberOfIterations=100, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    affine = sitk.AffineTransform(initial)
    reg.SetInitialTransform(affine, inPlace=True)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise RegistrationError(f"affine registration failed: {str(exc).strip().splitlines()[-1]}") from exc
    affine_metric = float(reg.GetMetricValue())
    stages.append(f"affine: {reg.GetOptimizerStopConditionDescription()}")
    transform: sitk.Transform = sitk.CompositeTransform([affine])

    # -- deformable: symmetric-forces demons on the follow-up's coarse grid, after the affine -----------------
    if deformable:
        dft = sitk.DisplacementFieldTransform(_demons(fixed, moving, affine, m_lo, demons_sigma_mm, threads))
        # x -> affine(x + d(x)): a CompositeTransform applies its last-added transform first.
        transform = sitk.CompositeTransform([affine, dft])
        stages.append("demons")
    corr, inside_share = _correlation(fixed, moving, transform, threads)
    overlap = min(1.0, inside_share * fixed_volume / min(fixed_volume, moving_volume))
    report = ClassicalRegistrationReport(overlap, corr_before, corr, affine_metric, deformable, stages)
    if overlap < min_overlap:
        raise RegistrationError(
            f"the registered images overlap on only {overlap:.0%} of the smaller one (need {min_overlap:.0%}): "
            "baseline and follow-up do not show the same region"
        )
    if corr < min_correlation:
        raise RegistrationError(
            f"registration failed: intensity correlation after registration is {corr:.2f} "
            f"(need {min_correlation:.2f}); the scans may not show the same anatomy"
        )
    return transform, report


def transform_to_deformation(
    transform: sitk.Transform, baseline: Volume, followup: Volume, resolution_mm: float = DEFAULT_RESOLUTION_MM
) -> Deformation:
    """Sample a follow-up -> baseline physical transform on a coarse follow-up grid as a :class:`Deformation`."""
    n, g = _coarse_grid(followup, resolution_mm)
    ref = _reference_image(followup, g)
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(ref)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    disp = sitk.GetArrayFromImage(to_field.Execute(transform))  # (gz, gy, gx, 3) in (x, y, z) mm
    nodes = np.stack(np.meshgrid(*_node_voxels(n, g), indexing="ij"), axis=-1)  # (gz, gy, gx, 3) voxels z,y,x
    world = followup.voxel_to_world(nodes) + disp
    coords = baseline.world_to_voxel(world)  # (gz, gy, gx, 3) baseline voxels z,y,x
    return Deformation(
        coords=np.moveaxis(coords, -1, 0).astype(np.float32),
        followup_shape=followup.shape,
        baseline_shape=baseline.shape,
        interpolation="linear",
    )


def register_classical(baseline: Volume, followup: Volume, **options: object) -> Deformation:
    """Classical affine + demons registration of two original-grid volumes -> pull-back :class:`Deformation`
    from the follow-up's voxels to the baseline's voxels (warp baseline masks with ``deformation.warp``).

    ``options`` are those of :func:`classical_transform` (resolution_mm, deformable, demons_sigma_mm, ...).
    """
    return ClassicalPropagator(**options).register(baseline, followup)


class ClassicalPropagator:
    """Same role as :class:`propagation.LearnedPropagator`, on original-grid volumes: one registration per pair."""

    def __init__(self, **options: object) -> None:
        self.options = options
        self.last_report: ClassicalRegistrationReport | None = None

    def register(self, baseline: Volume, followup: Volume) -> Deformation:
        resolution = float(self.options.get("resolution_mm", DEFAULT_RESOLUTION_MM))  # type: ignore[arg-type]
        transform, self.last_report = classical_transform(baseline, followup, **self.options)  # type: ignore[arg-type]
        return transform_to_deformation(transform, baseline, followup, resolution)


# -- command line: `lesionlocator register` (the registration-only baseline) -------------------------------------
