"""nnU-Net's resampling, computed on any sub-region of the output grid.

The published pipeline resamples the whole scan. Here every output voxel is sampled at exactly
the coordinate the whole-scan resampling uses (align_corners=False convention:
``src = (i + 0.5) * old_n / new_n - 0.5`` with the *whole* scan's sizes), so a region gives the
same values as the whole-scan result cut to that region, at a cost that depends on the region only.

Two families, chosen by the plans:
- ``torch``: ``F.interpolate(mode='trilinear', align_corners=False)`` semantics (float32 weights,
  source index clamped at 0, upper neighbour clamped at n-1); segmentations per label, > 0.5.
- ``scipy``: nnU-Net's default (skimage ``resize``, edge mode, no anti-aliasing): order 3 for
  images (B-spline with prefilter, output clipped to the input range), order 1 for
  segmentations (per label, >= 0.5) and probabilities; with "separate z" for anisotropic data
  (in-plane per slice, nearest neighbour along the low-resolution axis).

Interpolation with order <= 1 is done as separable 1-D passes with explicit index/weight
tables (``AxisPlan``); the same tables tell which source voxels an output voxel touches, which is
how uncovered (never predicted) voxels are kept out of the result.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

from ..core.boxes import Spans
from .plans import ResamplingSpec


# The cubic B-spline prefilter is an IIR filter whose influence decays as 0.268^d; 16 voxels of
# context make a region's prefilter equal to the whole scan's to ~1e-9.
SPLINE_MARGIN = 16


def resampled_shape(shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float]) -> tuple[int, ...]:
    """nnU-Net's ``compute_new_shape``: round(old_shape * old_spacing / new_spacing)."""
    return tuple(int(v) for v in np.round(np.asarray(shape, float) * np.asarray(old_spacing, float)
                                          / np.asarray(new_spacing, float)).astype(int))


@dataclass
class AxisPlan:
    """Source indices and weights for output indices [start, stop) along one axis."""

    idx: np.ndarray  # (k, m) int64 source indices (global)
    weight: np.ndarray  # (k, m) float
    start: int
    stop: int

    @property
    def src_range(self) -> tuple[int, int]:
        return int(self.idx.min()), int(self.idx.max()) + 1


def linear_plan(old_n: int, new_n: int, start: int, stop: int, style: str = "torch") -> AxisPlan:
    i = np.arange(start, stop)
    if style == "torch":
        # torch: float32 scale, negative source coordinates clamped to 0, upper neighbour clamped
        scale = np.float32(old_n) / np.float32(new_n)
        src = np.maximum((np.float64(scale) * (i + 0.5) - 0.5).astype(np.float32), np.float32(0))
        i0 = np.minimum(np.floor(src).astype(np.int64), old_n - 1)
        lam = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
        one = np.float32(1)
    elif style == "scipy":
        # scipy ndimage (mode 'nearest'): float64 coordinates clamped into [0, n-1]
        src = np.clip((i + 0.5) * (old_n / new_n) - 0.5, 0.0, old_n - 1.0)
        i0 = np.floor(src).astype(np.int64)
        lam = src - i0
        one = 1.0
    else:
        raise ValueError(style)
    i1 = np.where(i0 < old_n - 1, i0 + 1, i0)
    return AxisPlan(np.stack([i0, i1]), np.stack([one - lam, lam]), start, stop)


def nearest_plan(old_n: int, new_n: int, start: int, stop: int) -> AxisPlan:
    """scipy map_coordinates order 0, mode 'nearest': index = clip(floor(c + 0.5))."""
    i = np.arange(start, stop)
    src = (old_n / new_n) * (i + 0.5) - 0.5
    idx = np.clip(np.floor(src + 0.5), 0, old_n - 1).astype(np.int64)
    return AxisPlan(idx[None], np.ones((1, idx.size)), start, stop)


def identity_plan(start: int, stop: int) -> AxisPlan:
    i = np.arange(start, stop, dtype=np.int64)
    return AxisPlan(i[None], np.ones((1, i.size), np.float32), start, stop)


def apply_plan(block, axis: int, plan: AxisPlan, offset: int):
    """Interpolate ``block`` (whose index 0 along ``axis`` is global index ``offset``) along one axis.

    ``block`` is a numpy array or a torch tensor (then computed on its device, in its dtype).
    """
    shape = [1] * block.ndim
    shape[axis] = -1
    if not isinstance(block, np.ndarray):
        import torch

        out = None
        for k in range(plan.idx.shape[0]):
            idx = torch.as_tensor(plan.idx[k] - offset, device=block.device)
            w = torch.as_tensor(plan.weight[k], dtype=block.dtype, device=block.device).reshape(shape)
            term = torch.index_select(block, axis, idx) * w
            out = term if out is None else out + term
        return out
    dtype = np.result_type(block.dtype, plan.weight.dtype)
    out = None
    for k in range(plan.idx.shape[0]):
        term = np.take(block, plan.idx[k] - offset, axis=axis) * plan.weight[k].astype(dtype).reshape(shape)
        out = term if out is None else out + term
    return out


def apply_plan_any(block: np.ndarray, axis: int, plan: AxisPlan, offset: int) -> np.ndarray:
    """Boolean 'touches': True where any source voxel used (weight zero included) is True."""
    out = None
    for k in range(plan.idx.shape[0]):
        term = np.take(block, plan.idx[k] - offset, axis=axis)
        out = term if out is None else (out | term)
    return out


def separable(block: np.ndarray, plans: Sequence[AxisPlan], offsets: Sequence[int], any_mode: bool = False,
              axis_order: Sequence[int] = (2, 1, 0)) -> np.ndarray:
    # x first, then y, then z: the nesting order of torch's trilinear kernel (closest float rounding)
    fn = apply_plan_any if any_mode else apply_plan
    for axis in axis_order:
        block = fn(block, axis, plans[axis], offsets[axis])
    return block


def lowres_axis(spacing: Sequence[float]) -> list[int]:
    s = np.asarray(spacing, float)
    return [int(a) for a in np.where(s.max() / s == 1)[0]]


def separate_z_axis(spec: ResamplingSpec, current_spacing: Sequence[float], new_spacing: Sequence[float]) -> int | None:
    """nnU-Net's choice of resampling the low-resolution axis separately (None: plain 3-D)."""
    if spec.kind == "torch":
        return None  # the published torch plans force_separate_z = False
    if spec.force_separate_z is not None:
        axes = lowres_axis(current_spacing) if spec.force_separate_z else None
    elif max(current_spacing) / min(current_spacing) > spec.anisotropy_threshold:
        axes = lowres_axis(current_spacing)
    elif max(new_spacing) / min(new_spacing) > spec.anisotropy_threshold:
        axes = lowres_axis(new_spacing)
    else:
        axes = None
    if axes is None or len(axes) != 1:
        return None
    return axes[0]


class GridResampler:
    """Resampling from a source grid to a destination grid (whole-scan sizes), evaluated per region."""

    def __init__(self, src_shape: Sequence[int], dst_shape: Sequence[int], src_spacing: Sequence[float],
                 dst_spacing: Sequence[float], spec: ResamplingSpec):
        self.src_shape = tuple(int(s) for s in src_shape)
        self.dst_shape = tuple(int(s) for s in dst_shape)
        self.spec = spec
        self.sep_axis = separate_z_axis(spec, src_spacing, dst_spacing)

    # -- plans ------------------------------------------------------------------------
    def linear_plans(self, box: Spans) -> list[AxisPlan]:
        """Order-1 plans (torch trilinear, or scipy order 1 with nearest along the separate axis)."""
        plans = []
        for ax, (a, b) in enumerate(box):
            old_n, new_n = self.src_shape[ax], self.dst_shape[ax]
            if self.spec.kind == "torch":
                plans.append(linear_plan(old_n, new_n, a, b, "torch"))
            elif old_n == new_n:
                plans.append(identity_plan(a, b))
            elif ax == self.sep_axis:
                plans.append(nearest_plan(old_n, new_n, a, b) if self.spec.order_z == 0
                             else linear_plan(old_n, new_n, a, b, "scipy"))
            else:
                plans.append(linear_plan(old_n, new_n, a, b, "scipy"))
        return plans

    def source_box(self, box: Spans) -> Spans:
        return tuple(p.src_range for p in self.linear_plans(box))  # type: ignore[return-value]

    # -- images ---------------------------------------------------------------------------
    def image_region(self, source: np.ndarray, box: Spans, normalize=None, slice_ranges=None, device=None):
        """Resampled image values on ``box`` of the destination grid.

        ``source`` is the whole (cropped) source array (may be a lazy view); ``normalize`` maps raw
        source values to float32 (applied only to the part read); ``slice_ranges`` gives the
        (min, max) of the *normalised* source used by skimage's output clipping for cubic scipy
        resampling: per slice along the separate axis, or one global pair. With ``device`` (a torch
        device) the linear family runs in torch there and a tensor is returned (``normalize`` must then
        accept and return tensors).
        """
        norm = normalize or (lambda a: a.float() if device is not None else np.asarray(a, dtype=np.float32))
        if self.spec.kind == "torch" or self.spec.order_data <= 1:
            plans = self.linear_plans(box)
            src = tuple(p.src_range for p in plans)
            raw = source[tuple(slice(a, b) for a, b in src)]
            if device is not None:
                import torch

                raw = torch.from_numpy(np.ascontiguousarray(raw)).to(device)
            out = separable(norm(raw), plans, [a for a, _ in src])
            return out if device is not None else out.astype(np.float32, copy=False)
        if device is None:
            return self._cubic_region(source, box, norm, slice_ranges)
        import torch  # a torch normaliser applied to the numpy blocks the spline code reads

        out = self._cubic_region(source, box, lambda a: norm(torch.from_numpy(np.ascontiguousarray(a))).numpy(),
                                 slice_ranges)
        return torch.from_numpy(out).to(device)

    def _cubic_region(self, source: np.ndarray, box: Spans, norm, slice_ranges) -> np.ndarray:
        order = self.spec.order_data
        axes = [0, 1, 2] if self.sep_axis is None else [a for a in range(3) if a != self.sep_axis]
        # source range (with spline support + prefilter margin) along the interpolated axes
        src_box: list[tuple[int, int]] = [(0, 0)] * 3
        offsets, zooms = {}, {}
        for ax in axes:
            a, b = box[ax]
            old_n, new_n = self.src_shape[ax], self.dst_shape[ax]
            zoom = old_n / new_n
            lo = (a + 0.5) * zoom - 0.5
            hi = (b - 1 + 0.5) * zoom - 0.5
            s0 = max(0, int(np.floor(lo)) - 2 - SPLINE_MARGIN)
            s1 = min(old_n, int(np.floor(hi)) + 3 + SPLINE_MARGIN)
            src_box[ax] = (s0, s1)
            zooms[ax] = zoom
            offsets[ax] = (a + 0.5) * zoom - 0.5 - s0
        if self.sep_axis is not None:
            zp = (nearest_plan(self.src_shape[self.sep_axis], self.dst_shape[self.sep_axis], *box[self.sep_axis])
                  if self.src_shape[self.sep_axis] != self.dst_shape[self.sep_axis]
                  else identity_plan(*box[self.sep_axis]))
            slices_needed = np.unique(zp.idx[0])
            src_box[self.sep_axis] = (int(slices_needed.min()), int(slices_needed.max()) + 1)
        block = norm(source[tuple(slice(a, b) for a, b in src_box)]).astype(np.float64)
        out_shape = [b - a for a, b in box]
        if self.sep_axis is None:
            out = ndimage.affine_transform(block, [zooms[a] for a in axes], offset=[offsets[a] for a in axes],
                                           output_shape=out_shape, order=order, mode="nearest", prefilter=True)
            lo, hi = slice_ranges if slice_ranges is not None else (block.min(), block.max())
            return np.clip(out, lo, hi).astype(np.float32)
        sep = self.sep_axis
        plane_shape = [out_shape[a] for a in axes]
        z0 = src_box[sep][0]
        planes = {}
        for s in slices_needed:
            plane = np.take(block, int(s) - z0, axis=sep)
            if all(self.src_shape[a] == self.dst_shape[a] for a in axes):
                res = plane[tuple(slice(box[a][0] - src_box[a][0], box[a][1] - src_box[a][0]) for a in axes)]
            else:
                res = ndimage.affine_transform(plane, [zooms[a] for a in axes], offset=[offsets[a] for a in axes],
                                               output_shape=plane_shape, order=order, mode="nearest",
                                               prefilter=True)
                lo, hi = slice_ranges[int(s)] if slice_ranges is not None else (plane.min(), plane.max())
                res = np.clip(res, lo, hi)
            planes[int(s)] = res.astype(np.float32)
        return np.stack([planes[int(s)] for s in zp.idx[0]], axis=sep)

    # -- probabilities / logits -----------------------------------------------------------
    def prob_region(self, values, values_box: Spans, box: Spans) -> tuple[np.ndarray, np.ndarray]:
        """Resample channel-first ``values`` known on ``values_box`` of the source grid onto ``box``.

        Returns (resampled values, valid) where ``valid`` is False for output voxels that would
        touch a source voxel outside ``values_box`` (those are NaN in the whole-scan computation
        of the published code and background in its mask).
        """
        plans = self.linear_plans(box)
        clipped = []
        for p, (va, vb) in zip(plans, values_box):
            clipped.append(AxisPlan(np.clip(p.idx, va, vb - 1), p.weight, p.start, p.stop))
        offsets = [va for va, _ in values_box]
        if isinstance(values, np.ndarray):
            out = np.stack([separable(values[c], clipped, offsets) for c in range(values.shape[0])])
        else:  # torch tensor: computed on its device, copied back once
            out = separable(values, [identity_plan(0, values.shape[0])] + clipped, [0] + offsets, axis_order=(3, 2, 1))
            out = out.float().cpu().numpy()
        valid = np.ones([b - a for a, b in box], dtype=bool)
        for ax, p in enumerate(plans):
            va, vb = values_box[ax]
            ok = np.all((p.idx >= va) & (p.idx < vb), axis=0)
            shape = [1, 1, 1]
            shape[ax] = -1
            valid &= ok.reshape(shape)
        return out.astype(np.float32, copy=False), valid

    def valid_output_box(self, values_box: Spans) -> Spans | None:
        """The destination-grid box whose voxels only touch source voxels inside ``values_box``."""
        out = []
        for ax, (va, vb) in enumerate(values_box):
            full = self.linear_plans(tuple((0, self.dst_shape[a]) if a == ax else (0, 1) for a in range(3)))[ax]
            ok = np.all((full.idx >= va) & (full.idx < vb), axis=0)
            nz = np.flatnonzero(ok)
            if nz.size == 0:
                return None
            out.append((int(nz[0]), int(nz[-1]) + 1))
        return tuple(out)  # type: ignore[return-value]

    # -- segmentations --------------------------------------------------------------------
    def seg_region(self, seg: np.ndarray, box: Spans) -> np.ndarray:
        """Resample a label map onto ``box`` the nnU-Net way (per-label indicator interpolation)."""
        plans = self.linear_plans(box)
        src = tuple(p.src_range for p in plans)
        block = seg[tuple(slice(a, b) for a, b in src)]
        out = np.zeros([b - a for a, b in box], dtype=seg.dtype)
        labels = [int(v) for v in np.unique(block) if v != 0]
        for lab in labels:
            ind = (block == lab).astype(np.float32)
            val = separable(ind, plans, [a for a, _ in src])
            if self.spec.kind == "torch":
                out[val > 0.5] = lab
            else:
                out[val >= 0.5] = lab
        return out


def whole_box(shape: Sequence[int]) -> Spans:
    return tuple((0, int(s)) for s in shape)  # type: ignore[return-value]
