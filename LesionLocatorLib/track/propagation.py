"""Prompt propagation for longitudinal tracking: one deformation per scan pair, then a cheap warp per lesion.

Both registration backends (the learned uniGradICON network of LesionLocatorTrack, and the classical SimpleITK
registration in ``classical_registration``) produce a :class:`Deformation`: a *pull-back* map that gives, for the
follow-up's voxels, the continuous baseline voxel coordinate (z, y, x) to sample. Warping a baseline mask with it
puts the mask onto the follow-up grid.

The learned path reproduces the published LesionLocatorTrack geometry on preprocessed (cropped, CT-normalised,
resampled) arrays: optional z alignment (:func:`z_align`), trilinear resizing of both images to the network's
175^3 grid, phi_AB from the network, nearest-neighbour warping of the prompt (zero outside), nearest-exact
resizing back to the follow-up's shape and undoing the z crop. The published code redoes all of that for every
lesion; here :meth:`LearnedPropagator.register` runs once per pair and :meth:`Deformation.warp` per lesion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..core.boxes import Spans



class DeformationError(ValueError):
    """A deformation is malformed or is applied to an array of the wrong shape."""


def _shape3(shape: Sequence[int], name: str) -> tuple[int, int, int]:
    s = tuple(int(v) for v in shape)
    if len(s) != 3 or min(s) < 1:
        raise DeformationError(f"{name} must be three positive sizes, got {tuple(shape)}")
    return s  # type: ignore[return-value]


def _full_window(shape: tuple[int, int, int]) -> Spans:
    return ((0, shape[0]), (0, shape[1]), (0, shape[2]))


def _check_window(window: Sequence[Sequence[int]] | None, shape: tuple[int, int, int], name: str) -> Spans:
    if window is None:
        return _full_window(shape)
    w = tuple((int(a), int(b)) for a, b in window)
    if len(w) != 3 or any(not (0 <= a < b <= n) for (a, b), n in zip(w, shape)):
        raise DeformationError(f"{name} {window} is not a non-empty (start, stop) window per axis inside {shape}")
    return w  # type: ignore[return-value]


def nearest_exact_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of every output index for torch's ``mode='nearest-exact'`` resize along one axis.

    Computed by torch itself, on a float32 tensor as in the published pipeline (its prompts are float32): for
    some sizes (242 -> 175, 402 -> 175) a float64 tensor gives another source index for one output index.
    """
    src = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in, 1, 1)
    out = F.interpolate(src, size=(int(n_out), 1, 1), mode="nearest-exact")[0, 0, :, 0, 0]
    return out.numpy().astype(np.int64)


def resize_nearest_exact(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``F.interpolate(..., mode='nearest-exact')`` for any dtype (labels stay exact)."""
    idx = [nearest_exact_indices(n, m) for n, m in zip(array.shape, shape)]
    return array[np.ix_(*idx)]


def resize_trilinear(array: np.ndarray | torch.Tensor, shape: Sequence[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """Trilinear resize (``align_corners=False``) of a 3D array to ``shape``; returns a float32 [1, 1, *shape] tensor."""
    t = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(array))
    t = t.to(device=device, dtype=torch.float32)[None, None]
    if tuple(t.shape[2:]) == tuple(shape):
        return t
    return F.interpolate(t, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)


def _linear_positions(n_vox: int, n_nodes: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear (align_corners=False) node indices and weights for voxels start..stop-1.

    The half node cell beyond the outermost nodes is extrapolated linearly, not clamped: a coarse grid of an
    affine map then reproduces the affine map at every voxel, borders included."""
    j = np.arange(start, stop, dtype=np.float64)
    p = (j + 0.5) * n_nodes / n_vox - 0.5
    if n_nodes == 1:
        z = np.zeros(p.shape, dtype=np.int64)
        return z, z, np.zeros(p.shape)
    i0 = np.clip(np.floor(p).astype(np.int64), 0, n_nodes - 2)
    return i0, i0 + 1, (p - i0)


def _interp_separable(nodes: np.ndarray, axes_idx: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Tensor-product linear interpolation of ``nodes`` (C, a, b, c) along its three spatial axes."""
    out = nodes
    for axis, (i0, i1, w) in enumerate(axes_idx):
        ax = axis + 1
        shape = [1] * out.ndim
        shape[ax] = -1
        w = w.reshape(shape).astype(np.float32)
        out = np.take(out, i0, axis=ax) * (1 - w) + np.take(out, i1, axis=ax) * w
    return out


@dataclass(eq=False)
class Deformation:
    """Pull-back map from the follow-up grid to baseline voxel coordinates.

    ``coords`` (3, gz, gy, gx) float32 holds, at the nodes of a map grid, the continuous baseline voxel coordinate
    (z, y, x) to sample. The map grid spans ``followup_window`` of the follow-up (default: all of it), possibly at
    reduced resolution, with the ``align_corners=False`` relation: window voxel ``j`` sits at node position
    ``(j + 0.5) * g / n - 0.5``. Follow-up voxels outside the window map to nothing (zero after warping).

    ``interpolation`` says how nodes spread to voxels: ``"nearest"`` = nearest-exact (the published pipeline warps
    at 175^3 and resizes the warped mask back with nearest-exact), ``"linear"`` = trilinear interpolation of the
    coordinates (smooth classical fields sampled on a coarse grid).

    ``source_window`` / ``source_shape`` reproduce the published prompt handling exactly: the baseline mask is first
    cropped to ``source_window`` and resized (nearest-exact) to ``source_shape``, and sampled there (nearest,
    zero outside). ``source_shape=None`` samples the baseline (window) directly at the rounded coordinate.
    """

    coords: np.ndarray
    followup_shape: tuple[int, int, int]
    baseline_shape: tuple[int, int, int]
    followup_window: Spans | None = None
    source_window: Spans | None = None
    source_shape: tuple[int, int, int] | None = None
    interpolation: Literal["nearest", "linear"] = "nearest"
    _margin: float | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.coords = np.asarray(self.coords, dtype=np.float32)
        if self.coords.ndim != 4 or self.coords.shape[0] != 3 or min(self.coords.shape[1:]) < 1:
            raise DeformationError(f"coords must be (3, gz, gy, gx), got {self.coords.shape}")
        if not np.all(np.isfinite(self.coords)):
            raise DeformationError("coords contain NaN or infinite values")
        self.followup_shape = _shape3(self.followup_shape, "followup_shape")
        self.baseline_shape = _shape3(self.baseline_shape, "baseline_shape")
        self.followup_window = _check_window(self.followup_window, self.followup_shape, "followup_window")
        self.source_window = _check_window(self.source_window, self.baseline_shape, "source_window")
        if self.source_shape is not None:
            self.source_shape = _shape3(self.source_shape, "source_shape")
        if self.interpolation not in ("nearest", "linear"):
            raise DeformationError(f"interpolation must be 'nearest' or 'linear', got {self.interpolation!r}")

    # -- geometry helpers ----------------------------------------------------------------------------------------
    @property
    def grid_shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.coords.shape[1:])  # type: ignore[return-value]

    def _window_sizes(self) -> np.ndarray:
        return np.array([b - a for a, b in self.followup_window], dtype=np.float64)  # type: ignore[union-attr]

    def _to_source(self, coords: np.ndarray) -> np.ndarray:
        """Baseline voxel coordinates (3, ...) -> coordinates in the sampled source grid."""
        out = np.empty(coords.shape, dtype=np.float64 if coords.dtype == np.float64 else np.float32)
        for d in range(3):
            w0, w1 = self.source_window[d]  # type: ignore[index]
            c = coords[d] - np.float32(w0)
            if self.source_shape is not None and self.source_shape[d] != w1 - w0:
                scale = self.source_shape[d] / (w1 - w0)
                c = (c + 0.5) * scale - 0.5
            out[d] = c
        return out

    def _source_array(self, baseline_mask: np.ndarray) -> np.ndarray:
        sl = tuple(slice(a, b) for a, b in self.source_window)  # type: ignore[union-attr]
        src = baseline_mask[sl]
        if self.source_shape is not None and tuple(src.shape) != self.source_shape:
            src = resize_nearest_exact(src, self.source_shape)
        return src

    @staticmethod
    def _sample_nearest(src: np.ndarray, coords_src: np.ndarray) -> np.ndarray:
        # np.rint rounds half to even, like grid_sample(mode='nearest') (std::nearbyint).
        idx = np.rint(coords_src).astype(np.int64)
        valid = np.ones(idx.shape[1:], dtype=bool)
        for d in range(3):
            valid &= (idx[d] >= 0) & (idx[d] < src.shape[d])
        out = np.zeros(idx.shape[1:], dtype=src.dtype)
        out[valid] = src[idx[0][valid], idx[1][valid], idx[2][valid]]
        return out

    def margin(self) -> float:
        """Largest coordinate change (source units) between neighbouring nodes: bounds interpolation reach."""
        if self._margin is None:
            c = self._to_source(self.coords)
            m = 0.0
            for ax in range(1, 4):
                if c.shape[ax] > 1:
                    m = max(m, float(np.abs(np.diff(c, axis=ax)).max()))
            self._margin = m
        return self._margin

    # -- warping ------------------------------------------------------------------------------------------------
    def warp(self, baseline_mask: np.ndarray) -> np.ndarray:
        """Warp a baseline mask / label map to the follow-up grid (nearest neighbour, zero outside)."""
        return warp_mask(self, baseline_mask)

    def sample(self, followup_zyx: np.ndarray) -> np.ndarray:
        """Baseline voxel coordinates (N, 3) of follow-up voxel coordinates (N, 3) (NaN outside the window)."""
        p = np.atleast_2d(np.asarray(followup_zyx, dtype=np.float64))
        out = np.full(p.shape, np.nan)
        g = np.array(self.grid_shape)
        n = self._window_sizes()
        start = np.array([a for a, _ in self.followup_window])  # type: ignore[union-attr]
        local = p - start
        inside = np.all((local >= -0.5) & (local < n - 0.5), axis=1)
        pos = (local + 0.5) * g / n - 0.5
        if self.interpolation == "nearest":
            node = np.clip(np.floor(pos + 0.5), 0, g - 1).astype(np.int64)
            vals = self.coords[:, node[:, 0], node[:, 1], node[:, 2]].T
        else:
            vals = _trilinear_points(self.coords, pos)
        out[inside] = vals[inside]
        return out

    def _voxel_range(self, axis: int, lo_node: int, hi_node: int) -> tuple[int, int]:
        """Window-voxel range whose interpolation may touch nodes lo_node..hi_node (conservative)."""
        n = int(self._window_sizes()[axis])
        g = self.grid_shape[axis]
        a = int(np.floor((lo_node - 2 + 0.5) * n / g - 0.5))
        b = int(np.ceil((hi_node + 2 + 0.5) * n / g - 0.5)) + 1
        return max(a, 0), min(b, n)


def _trilinear_points(nodes: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of nodes (C, a, b, c) at node positions pos (N, 3) -> (N, C), linearly
    extrapolated outside the outermost nodes (as in :func:`_linear_positions`)."""
    g = np.array(nodes.shape[1:])
    p = np.asarray(pos, dtype=np.float64)
    i0 = np.clip(np.floor(p).astype(np.int64), 0, np.maximum(g - 2, 0))
    i1 = np.minimum(i0 + 1, g - 1)
    w = np.where(g > 1, p - i0, 0.0)
    out = np.zeros((p.shape[0], nodes.shape[0]))
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                iz = i1[:, 0] if dz else i0[:, 0]
                iy = i1[:, 1] if dy else i0[:, 1]
                ix = i1[:, 2] if dx else i0[:, 2]
                wt = (w[:, 0] if dz else 1 - w[:, 0]) * (w[:, 1] if dy else 1 - w[:, 1]) * (w[:, 2] if dx else 1 - w[:, 2])
                out += nodes[:, iz, iy, ix].T * wt[:, None]
    return out


def warp_mask(deformation: Deformation, baseline_mask: np.ndarray, followup_shape: Sequence[int] | None = None) -> np.ndarray:
    """Warp a baseline mask or label map onto the follow-up grid: nearest neighbour, zero outside, same dtype."""
    d = deformation
    mask = np.asarray(baseline_mask)
    if mask.dtype == bool:
        return warp_mask(d, mask.astype(np.uint8), followup_shape).astype(bool)
    if tuple(mask.shape) != d.baseline_shape:
        raise DeformationError(f"baseline mask has shape {mask.shape}, the deformation expects {d.baseline_shape}")
    if followup_shape is not None and tuple(int(s) for s in followup_shape) != d.followup_shape:
        raise DeformationError(
            f"follow-up shape {tuple(followup_shape)} does not match the deformation's {d.followup_shape}"
        )
    out = np.zeros(d.followup_shape, dtype=mask.dtype)
    src = d._source_array(mask)
    if not np.any(src):
        return out
    win = d.followup_window
    g = d.grid_shape
    n = [b - a for a, b in win]  # type: ignore[union-attr]
    if d.interpolation == "nearest":
        node_vals = d._sample_nearest(src, d._to_source(d.coords))
        nz = np.nonzero(node_vals)
        if nz[0].size == 0:
            return out
        # Only the follow-up voxels whose nearest node lies in the non-zero nodes' box can be non-zero.
        idx = [nearest_exact_indices(g[k], n[k]) for k in range(3)]
        sel = [np.nonzero((idx[k] >= nz[k].min()) & (idx[k] <= nz[k].max()))[0] for k in range(3)]
        block = node_vals[np.ix_(idx[0][sel[0]], idx[1][sel[1]], idx[2][sel[2]])]
        lo = [int(s[0]) + win[k][0] for k, s in enumerate(sel)]  # type: ignore[index]
        out[lo[0]:lo[0] + block.shape[0], lo[1]:lo[1] + block.shape[1], lo[2]:lo[2] + block.shape[2]] = block
        return out
    # linear: interpolate coordinates voxel-wise, but only where the map can reach the mask's bounding box.
    nzs = np.nonzero(src)
    csrc = d._to_source(d.coords)
    # A voxel's coordinate is a convex combination of its 8 stencil nodes (or extrapolated half a cell past the
    # outermost ones), so it lies within 3.5 neighbour steps of one of them: nodes farther than that from the
    # mask's box cannot produce a voxel inside it.
    reach = 3.5 * d.margin() + 1.0
    near = np.ones(g, dtype=bool)
    for k in range(3):
        near &= (csrc[k] >= nzs[k].min() - reach) & (csrc[k] <= nzs[k].max() + reach)
    node_nz = np.nonzero(near)
    if node_nz[0].size == 0:
        return out
    ranges = [d._voxel_range(k, int(node_nz[k].min()), int(node_nz[k].max())) for k in range(3)]
    lin_y = _linear_positions(n[1], g[1], *ranges[1])
    lin_x = _linear_positions(n[2], g[2], *ranges[2])
    chunk = max(1, int(4_000_000 // max(1, (ranges[1][1] - ranges[1][0]) * (ranges[2][1] - ranges[2][0]))))
    for z0 in range(ranges[0][0], ranges[0][1], chunk):
        z1 = min(z0 + chunk, ranges[0][1])
        lin_z = _linear_positions(n[0], g[0], z0, z1)
        # restrict the node block before interpolating to keep the work proportional to the region
        nz0, nz1 = int(lin_z[0].min()), int(lin_z[1].max()) + 1
        ny0, ny1 = int(lin_y[0].min()), int(lin_y[1].max()) + 1
        nx0, nx1 = int(lin_x[0].min()), int(lin_x[1].max()) + 1
        nodes = csrc[:, nz0:nz1, ny0:ny1, nx0:nx1]
        shifted = [
            (lin_z[0] - nz0, lin_z[1] - nz0, lin_z[2]),
            (lin_y[0] - ny0, lin_y[1] - ny0, lin_y[2]),
            (lin_x[0] - nx0, lin_x[1] - nx0, lin_x[2]),
        ]
        c = _interp_separable(nodes, shifted)
        vals = d._sample_nearest(src, c)
        out[
            win[0][0] + z0: win[0][0] + z1,  # type: ignore[index]
            win[1][0] + ranges[1][0]: win[1][0] + ranges[1][1],  # type: ignore[index]
            win[2][0] + ranges[2][0]: win[2][0] + ranges[2][1],  # type: ignore[index]
        ] = vals
    return out


def warp_points(deformation: Deformation, baseline_zyx: np.ndarray, tolerance: float = 1.5) -> np.ndarray:
    """Push baseline voxel points (N, 3) to follow-up voxel coordinates (N, 3) by inverting the map.

    Starts at the node whose baseline coordinate is closest, then refines with Newton steps on the trilinear
    interpolation of the map. Points the map does not reach within ``tolerance`` baseline voxels are NaN.
    """
    d = deformation
    pts = np.atleast_2d(np.asarray(baseline_zyx, dtype=np.float64))
    if pts.shape[1] != 3:
        raise DeformationError(f"points must be (N, 3) voxel coordinates (z, y, x), got shape {pts.shape}")
    g = np.array(d.grid_shape)
    n = d._window_sizes()
    start = np.array([a for a, _ in d.followup_window])  # type: ignore[union-attr]
    flat = d.coords.reshape(3, -1).T.astype(np.float64)
    out = np.full(pts.shape, np.nan)
    for i, p in enumerate(pts):
        node = np.array(np.unravel_index(int(np.argmin(((flat - p) ** 2).sum(axis=1))), tuple(g)), dtype=np.float64)
        q = node
        for _ in range(20):
            c = _trilinear_points(d.coords, q[None])[0]
            jac = np.zeros((3, 3))
            for k in range(3):
                if g[k] < 2:
                    jac[k, k] = 1.0
                    continue
                h = np.zeros(3)
                h[k] = 0.5
                lo = np.clip(q - h, -0.5, g - 0.5)
                hi = np.clip(q + h, -0.5, g - 0.5)
                span = hi[k] - lo[k]
                jac[:, k] = (_trilinear_points(d.coords, hi[None])[0] - _trilinear_points(d.coords, lo[None])[0]) / span
            try:
                step = np.linalg.solve(jac, p - c)
            except np.linalg.LinAlgError:
                break
            q = np.clip(q + np.clip(step, -4, 4), -0.5, g - 0.5)
            if np.abs(step).max() < 1e-3:
                break
        resid = np.abs(_trilinear_points(d.coords, q[None])[0] - p).max()
        if resid <= tolerance:
            out[i] = (q + 0.5) * n / g - 0.5 + start
    return out


# -- the published learned propagation ----------------------------------------------------------------------------

@dataclass(frozen=True)
class ZAlignment:
    """Which z range of each scan enters the registration (the published z alignment)."""

    baseline_z: tuple[int, int]
    followup_z: tuple[int, int]
    offset: int = 0
    mse: float | None = None


def z_align(
    baseline: np.ndarray | torch.Tensor,
    followup: np.ndarray | torch.Tensor,
    threshold: int = 20,
    inplane: int = 175,
    device: str | torch.device = "cpu",
) -> ZAlignment:
    """Published z alignment of two preprocessed scans.

    If the z sizes differ by more than ``threshold`` voxels, both are resized in-plane to ``inplane`` squared
    (trilinear, align_corners=False), the shorter is slid along z over the longer, and the offset with the lowest
    mean squared error wins (the first one on ties); the longer scan is cropped to that window. Otherwise both are
    used whole. As published, the offsets tried are 0 .. difference - 1: the last offset (the shorter scan flush
    with the end of the longer) is never tried. The weights do not depend on this search range, but the
    published results do, so it is kept.
    """
    zb, zf = int(baseline.shape[0]), int(followup.shape[0])
    if abs(zb - zf) <= threshold:
        return ZAlignment((0, zb), (0, zf))
    b = resize_trilinear(baseline, (zb, inplane, inplane), device)[0, 0].reshape(zb, -1).double()
    f = resize_trilinear(followup, (zf, inplane, inplane), device)[0, 0].reshape(zf, -1).double()
    long_, short = (b, f) if zb > zf else (f, b)
    nl, ns = long_.shape[0], short.shape[0]
    # MSE(o) = (sum |L[o+s]|^2 - 2 <L[o+s], S[s]> + sum |S[s]|^2) / N, all offsets at once via the Gram matrix.
    gram = long_ @ short.T  # (nl, ns)
    sq_long = (long_ * long_).sum(dim=1)
    sq_short = float((short * short).sum())
    cum = torch.cat([torch.zeros(1, dtype=sq_long.dtype, device=sq_long.device), torch.cumsum(sq_long, 0)])
    offsets = torch.arange(nl - ns, device=gram.device)  # published range: the last offset is never tried
    diag_idx = offsets[:, None] + torch.arange(ns, device=gram.device)[None, :]
    cross = gram[diag_idx, torch.arange(ns, device=gram.device)[None, :]].sum(dim=1)
    mse = (cum[offsets + ns] - cum[offsets] - 2 * cross + sq_short) / (ns * long_.shape[1])
    best = int(torch.argmin(mse).item())
    window = (best, best + ns)
    if zb > zf:
        return ZAlignment(window, (0, zf), best, float(mse[best]))
    return ZAlignment((0, zb), window, best, float(mse[best]))


class LearnedPropagator:
    """One uniGradICON registration per scan pair on preprocessed arrays -> a :class:`Deformation`.

    ``net`` is the network from :func:`registration_net.build_registration_network` with the checkpoint's
    ``reg_net.*`` weights loaded; its identity map fixes the registration grid (175^3 for the published weights).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        device: str | torch.device = "cpu",
        fp16: bool | None = None,
        z_threshold: int = 20,
    ) -> None:
        from ..model.registration_net import registration_shape

        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.fp16 = fp16
        self.z_threshold = int(z_threshold)
        self.shape = registration_shape(self.net)

    @classmethod
    def from_track_weights(
        cls,
        network_weights: dict,
        device: str | torch.device = "cpu",
        input_shape: Sequence[int] = (1, 1, 175, 175, 175),
        fp16: bool | None = None,
        z_threshold: int = 20,
    ) -> "LearnedPropagator":
        """Build the uniGradICON network for ``input_shape`` and load the ``reg_net.*`` entries of a
        LesionLocatorTrack checkpoint's ``network_weights`` (175^3 for the published weights)."""
        from ..model.registration_net import build_registration_network, load_registration_weights

        net = build_registration_network(tuple(input_shape))
        load_registration_weights(net, network_weights)
        return cls(net, device=device, fp16=fp16, z_threshold=z_threshold)

    def register(self, baseline_pp: np.ndarray, followup_pp: np.ndarray) -> Deformation:
        """Register preprocessed baseline (moving) to preprocessed follow-up (fixed).

        Both are the section-2 preprocessed arrays (cropped to non-zero, CT-normalised, resampled to the model
        spacing; not padded to the patch size). Warp the baseline's resampled lesion masks with the result."""
        from ..model.registration_net import one_way_displacement

        for name, a in (("baseline", baseline_pp), ("follow-up", followup_pp)):
            if np.ndim(a) != 3:
                raise DeformationError(f"{name} must be a 3D preprocessed array, got shape {np.shape(a)}")
        # float16 (the published rounding, exact in float32) or float32 arrays are used as they are
        baseline_pp = np.asarray(baseline_pp)
        followup_pp = np.asarray(followup_pp)
        if baseline_pp.dtype not in (np.float16, np.float32):
            baseline_pp = baseline_pp.astype(np.float32)
        if followup_pp.dtype not in (np.float16, np.float32):
            followup_pp = followup_pp.astype(np.float32)
        for name, a in (("baseline", baseline_pp), ("follow-up", followup_pp)):
            if not np.all(np.isfinite(a)):
                raise DeformationError(f"{name} contains NaN or infinite values")
        za = z_align(baseline_pp, followup_pp, self.z_threshold, device=self.device)
        b = baseline_pp[za.baseline_z[0]:za.baseline_z[1]]
        f = followup_pp[za.followup_z[0]:za.followup_z[1]]
        b_r = resize_trilinear(b, self.shape, self.device)
        f_r = resize_trilinear(f, self.shape, self.device)
        phi = one_way_displacement(self.net, b_r, f_r, fp16=self.fp16)
        return deformation_from_icon_map(phi, baseline_pp.shape, followup_pp.shape, za)


def deformation_from_icon_map(
    phi: torch.Tensor | np.ndarray,
    baseline_shape: Sequence[int],
    followup_shape: Sequence[int],
    alignment: ZAlignment | None = None,
) -> Deformation:
    """Wrap phi_AB ([1, 3, S0, S1, S2] icon coordinates in [0, 1]) as a :class:`Deformation` between the
    preprocessed baseline and follow-up, with the published geometry: the baseline window (z crop) resized
    nearest-exact to S is sampled nearest at phi; the result is resized nearest-exact to the follow-up window."""
    phi_np = phi.detach().double().cpu().numpy() if isinstance(phi, torch.Tensor) else np.asarray(phi, np.float64)
    if phi_np.ndim == 5:
        if phi_np.shape[0] != 1:
            raise DeformationError(f"expected a single map [1, 3, ...], got {phi_np.shape}")
        phi_np = phi_np[0]
    if phi_np.ndim != 4 or phi_np.shape[0] != 3:
        raise DeformationError(f"phi must be [1, 3, S0, S1, S2], got {np.shape(phi)}")
    bs = _shape3(baseline_shape, "baseline_shape")
    fs = _shape3(followup_shape, "followup_shape")
    za = alignment or ZAlignment((0, bs[0]), (0, fs[0]))
    grid = tuple(int(s) for s in phi_np.shape[1:])
    win_b = (tuple(za.baseline_z), (0, bs[1]), (0, bs[2]))
    coords = np.empty(phi_np.shape, dtype=np.float32)
    for d in range(3):
        # icon [0, 1] -> voxels of the S-grid -> voxels of the baseline window (align_corners=False relation of the
        # nearest-exact prompt resize) -> baseline voxels (undo the z crop)
        k = phi_np[d] * (grid[d] - 1)
        size = win_b[d][1] - win_b[d][0]
        coords[d] = (k + 0.5) * size / grid[d] - 0.5 + win_b[d][0]
    return Deformation(
        coords=coords,
        followup_shape=fs,
        baseline_shape=bs,
        followup_window=(tuple(za.followup_z), (0, fs[1]), (0, fs[2])),
        source_window=win_b,
        source_shape=grid,
        interpolation="nearest",
    )
