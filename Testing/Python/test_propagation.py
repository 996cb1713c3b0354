"""Tests for the Deformation representation, mask/point warping, z alignment and the learned propagation geometry."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from LesionLocatorLib.track.propagation import (
    Deformation,
    DeformationError,
    LearnedPropagator,
    ZAlignment,
    deformation_from_icon_map,
    nearest_exact_indices,
    resize_nearest_exact,
    warp_mask,
    warp_points,
    z_align,
)


def identity_coords(shape, grid=None):
    """Node coordinates of an identity map of a follow-up of ``shape`` sampled on ``grid`` nodes."""
    grid = grid or shape
    axes = [(np.arange(g) + 0.5) * n / g - 0.5 for n, g in zip(shape, grid)]
    return np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)


def cube(shape, lo, hi, value=1):
    m = np.zeros(shape, dtype=np.uint8)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = value
    return m


def dice(a, b):
    a, b = a > 0, b > 0
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def smooth_field(shape, amplitude, seed):
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(-1, 1, size=(1, 3, 4, 4, 4)).astype(np.float32))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0].numpy() * amplitude


# -- resizing helpers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_in,n_out", [(70, 65), (65, 70), (100, 175), (175, 37), (7, 7), (350, 175)])
def test_nearest_exact_matches_torch(n_in, n_out):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 5, size=(n_in, 3, 4)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(a)[None, None], size=(n_out, 5, 2), mode="nearest-exact")[0, 0].numpy()
    np.testing.assert_array_equal(resize_nearest_exact(a, (n_out, 5, 2)), ref)
    assert nearest_exact_indices(n_in, n_out).shape == (n_out,)


# -- Deformation and warping ---------------------------------------------------------------------------------------

def test_identity_nearest_and_linear_keep_the_mask():
    shape = (30, 40, 50)
    mask = cube(shape, (5, 10, 12), (15, 22, 30), value=3)
    for grid, mode in ((shape, "nearest"), ((10, 13, 17), "linear")):
        d = Deformation(identity_coords(shape, grid), shape, shape, interpolation=mode)
        out = d.warp(mask)
        assert out.dtype == mask.dtype
        np.testing.assert_array_equal(out, mask)


def test_shift_moves_the_mask_by_minus_the_pullback_offset():
    shape = (30, 40, 50)
    mask = cube(shape, (5, 10, 12), (15, 22, 30))
    # follow-up voxel j samples baseline j + (3, -2, 4): the lesion appears at baseline position - offset
    coords = identity_coords(shape) + np.array([3, -2, 4], np.float32)[:, None, None, None]
    expected = cube(shape, (2, 12, 8), (12, 24, 26))
    for mode in ("nearest", "linear"):
        d = Deformation(coords, shape, shape, interpolation=mode)
        np.testing.assert_array_equal(warp_mask(d, mask), expected)
        # bool in, bool out
        assert warp_mask(d, mask.astype(bool)).dtype == bool
    # pushed points go the same way (within the Newton tolerance)
    d = Deformation(coords, shape, shape, interpolation="linear")
    np.testing.assert_allclose(warp_points(d, [[10, 16, 20]]), [[7, 18, 16]], atol=1e-3)


def test_linear_coarse_affine_map_is_interpolated_exactly():
    fshape, bshape = (40, 60, 50), (50, 45, 55)
    rng = np.random.default_rng(1)
    a = np.eye(3) + rng.uniform(-0.08, 0.08, (3, 3))
    t = np.array([4.0, -3.0, 2.5])
    grid = (9, 12, 11)
    nodes = identity_coords(fshape, grid).reshape(3, -1)
    coords = (a @ nodes + t[:, None]).reshape(3, *grid).astype(np.float32)
    d = Deformation(coords, fshape, bshape, interpolation="linear")
    # the map at every follow-up voxel is the affine map
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in fshape], indexing="ij")
    pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], 1)[::97]
    np.testing.assert_allclose(d.sample(pts), pts @ a.T + t, atol=1e-3)
    # warping a ball: every warped voxel maps into the ball, and the warp covers the whole ball's pre-image
    ball = ((np.indices(bshape) - np.array([25, 22, 27])[:, None, None, None]) ** 2).sum(0) <= 8 ** 2
    out = d.warp(ball.astype(np.uint8))
    full = np.stack([zz, yy, xx], -1).reshape(-1, 3)
    mapped = np.rint(full @ a.T + t).astype(int)
    inside = np.all((mapped >= 0) & (mapped < np.array(bshape)), axis=1)
    truth = np.zeros(full.shape[0], dtype=np.uint8)
    truth[inside] = ball[mapped[inside, 0], mapped[inside, 1], mapped[inside, 2]]
    assert (out.ravel() != truth).sum() <= 0.001 * truth.sum()
    assert out.sum() > 1000
    # pushing the ball centre forward lands where the map sends it back to the centre
    p = warp_points(d, [[25, 22, 27]])[0]
    np.testing.assert_allclose(p @ a.T + t, [25, 22, 27], atol=1e-2)


def test_points_outside_the_map_are_nan():
    shape = (20, 20, 20)
    d = Deformation(identity_coords(shape), shape, shape, interpolation="nearest")
    out = warp_points(d, [[5, 5, 5], [60, 5, 5]])
    np.testing.assert_allclose(out[0], [5, 5, 5], atol=1e-3)
    assert np.all(np.isnan(out[1]))


def test_window_and_empty_results():
    fshape, bshape = (30, 20, 20), (20, 20, 20)
    coords = identity_coords((10, 20, 20))
    d = Deformation(coords, fshape, bshape, followup_window=((12, 22), (0, 20), (0, 20)))
    mask = cube(bshape, (2, 3, 4), (6, 8, 9))
    out = d.warp(mask)
    np.testing.assert_array_equal(out[12:22], mask[:10])
    assert out[:12].sum() == 0 and out[22:].sum() == 0
    # a lesion the map never reaches warps to an empty mask
    assert d.warp(cube(bshape, (15, 3, 4), (18, 8, 9))).sum() == 0
    assert d.warp(np.zeros(bshape, np.uint8)).sum() == 0


def test_bad_input_raises():
    shape = (10, 10, 10)
    d = Deformation(identity_coords(shape), shape, shape)
    with pytest.raises(DeformationError, match="baseline mask has shape"):
        d.warp(np.zeros((10, 10, 11), np.uint8))
    with pytest.raises(DeformationError, match="coords must be"):
        Deformation(np.zeros((2, 4, 4, 4)), shape, shape)
    with pytest.raises(DeformationError, match="NaN"):
        Deformation(np.full((3, 4, 4, 4), np.nan), shape, shape)
    with pytest.raises(DeformationError, match="window"):
        Deformation(identity_coords(shape), shape, shape, followup_window=((0, 11), (0, 10), (0, 10)))
    with pytest.raises(DeformationError, match="interpolation"):
        Deformation(identity_coords(shape), shape, shape, interpolation="cubic")  # type: ignore[arg-type]


# -- z alignment -----------------------------------------------------------------------------------------------------

def _smooth_volume(shape, seed):
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.normal(size=(1, 1, shape[0] // 4 + 2, 8, 8)).astype(np.float32))
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def test_z_align_finds_the_offset_both_ways():
    long_ = _smooth_volume((90, 48, 40), 2)
    short = long_[23:53] + np.random.default_rng(3).normal(0, 0.01, (30, 48, 40)).astype(np.float32)
    za = z_align(short, long_)
    assert za == ZAlignment((0, 30), (23, 53), 23, za.mse) and za.mse < 1e-3
    za2 = z_align(long_, short)
    assert za2.baseline_z == (23, 53) and za2.followup_z == (0, 30)
    # within the threshold: no crop at all
    assert z_align(long_[:70], long_[:90]) == ZAlignment((0, 70), (0, 90))
    assert z_align(short, long_) == za  # deterministic


# -- the published learned geometry ---------------------------------------------------------------------------

def published_warp(prompt, phi, za, followup_shape):
    """The published prompt path, step by step with torch and icon_registration's own warping function."""
    from icon_registration.mermaidlite import compute_warped_image_multiNC

    grid = tuple(phi.shape[2:])
    p = torch.from_numpy(prompt[za.baseline_z[0]:za.baseline_z[1]].astype(np.float32))[None, None]
    p = F.interpolate(p, size=grid, mode="nearest-exact")
    w = compute_warped_image_multiNC(p, phi, 1.0 / (np.array(grid) - 1), 0, zero_boundary=True)
    fz = za.followup_z[1] - za.followup_z[0]
    w = F.interpolate(w, size=(fz,) + tuple(followup_shape[1:]), mode="nearest-exact")[0, 0].numpy()
    out = np.zeros(followup_shape, np.float32)
    out[za.followup_z[0]:za.followup_z[1]] = w
    return out


@pytest.mark.parametrize("za", [ZAlignment((10, 70), (0, 60)), ZAlignment((0, 60), (25, 85)), None])
def test_deformation_reproduces_the_published_prompt_warp(za):
    grid = (33, 37, 35)
    bshape = (70, 50, 45) if za is None or za.baseline_z[1] == 70 else (60, 50, 45)
    fshape = (60, 55, 40) if za is None or za.followup_z[1] == 60 else (85, 55, 40)
    if za is None:
        bshape, fshape = (60, 50, 45), (60, 55, 40)
    ident = np.stack(np.meshgrid(*[np.linspace(0, 1, g) for g in grid], indexing="ij"))
    phi = torch.from_numpy((ident + smooth_field(grid, 0.08, 4)).astype(np.float32))[None]
    rng = np.random.default_rng(5)
    prompt = np.zeros(bshape, np.uint8)
    for _ in range(3):
        c = rng.integers(8, np.array(bshape) - 8)
        prompt[c[0] - 6:c[0] + 6, c[1] - 5:c[1] + 7, c[2] - 7:c[2] + 4] = 1
    ref = published_warp(prompt, phi, za or ZAlignment((0, bshape[0]), (0, fshape[0])), fshape)
    d = deformation_from_icon_map(phi, bshape, fshape, za)
    out = d.warp(prompt)
    assert ref.sum() > 500
    assert (out != ref).sum() <= 1e-4 * ref.size


def test_learned_propagator_identity_net_with_z_crop():
    from LesionLocatorLib.model.registration_net import build_registration_network

    torch.manual_seed(0)
    net = build_registration_network((1, 1, 65, 65, 65))  # untrained: identity transform
    prop = LearnedPropagator(net, device="cpu")
    followup = _smooth_volume((100, 70, 66), 6)
    baseline = followup[30:72].copy()  # 42 slices: more than 20 shorter, so the follow-up is cropped to 30..72
    lesion = cube(baseline.shape, (10, 20, 25), (22, 35, 40))
    d = prop.register(baseline, followup)
    assert d.followup_window[0] == (30, 72) and d.source_window[0] == (0, 42)
    out = d.warp(lesion)
    expected = np.zeros(followup.shape, np.uint8)
    expected[30:72] = lesion
    assert dice(out, expected) > 0.9
    za = ZAlignment((0, 42), (30, 72))
    ident = torch.from_numpy(
        np.stack(np.meshgrid(*[np.linspace(0, 1, 65)] * 3, indexing="ij")).astype(np.float32))[None]
    np.testing.assert_array_equal(out, published_warp(lesion, ident, za, followup.shape).astype(np.uint8))
    with pytest.raises(DeformationError, match="3D"):
        prop.register(baseline[0], followup)
    # built from a tracking checkpoint's weights: same network, same result
    weights = {f"reg_net.{k}": v for k, v in net.state_dict().items()}
    weights["unet.stem.weight"] = torch.zeros(1)
    prop2 = LearnedPropagator.from_track_weights(weights, input_shape=(1, 1, 65, 65, 65))
    np.testing.assert_array_equal(prop2.register(baseline, followup).coords, d.coords)


def test_learned_propagator_direction_and_scaling():
    """A network that outputs a constant +5-voxel z displacement on its 65^3 grid: on a 130-slice pair the
    follow-up voxel z samples baseline z + 10, so the lesion appears 10 slices lower in the follow-up."""
    from LesionLocatorLib.model.registration_net import build_registration_network

    torch.manual_seed(0)
    net = build_registration_network((1, 1, 65, 65, 65))
    with torch.no_grad():
        net.regis_net.netPsi.net.lastConv.bias[0] = 10 * 5 / 64
    vol = _smooth_volume((130, 65, 65), 8)
    d = LearnedPropagator(net).register(vol, vol)
    lesion = cube(vol.shape, (60, 20, 30), (80, 30, 40))
    out = d.warp(lesion)
    np.testing.assert_array_equal(out, cube(vol.shape, (50, 20, 30), (70, 30, 40)))
    # nearest-node sampling: z 55 uses node 27 (centre z 54.5), whose value is baseline z 64.5
    np.testing.assert_allclose(d.sample(np.array([[55.0, 25, 35]])), [[64.5, 25, 35]], atol=1e-3)
    np.testing.assert_allclose(warp_points(d, [[70.0, 25, 35]]), [[60.0, 25, 35]], atol=0.51)


def test_linear_warp_equals_brute_force_on_a_curved_map():
    """The region-restricted linear warp equals sampling every follow-up voxel through Deformation.sample."""
    fshape, bshape = (36, 44, 40), (40, 40, 48)
    grid = (7, 9, 8)
    coords = identity_coords(fshape, grid) + smooth_field(grid, 4.0, 11) + np.array([2, -3, 5])[:, None, None, None]
    d = Deformation(coords.astype(np.float32), fshape, bshape, interpolation="linear")
    rng = np.random.default_rng(12)
    labels = np.zeros(bshape, np.int32)
    for k in (1, 2, 3):
        c = rng.integers(6, np.array(bshape) - 6)
        labels[c[0] - 4:c[0] + 4, c[1] - 5:c[1] + 3, c[2] - 3:c[2] + 5] = k * 1000
    out = d.warp(labels)
    allvox = np.indices(fshape).reshape(3, -1).T
    c = np.rint(d.sample(allvox)).astype(int)
    ok = np.all((c >= 0) & (c < np.array(bshape)), axis=1)
    ref = np.zeros(allvox.shape[0], np.int32)
    ref[ok] = labels[c[ok, 0], c[ok, 1], c[ok, 2]]
    assert set(np.unique(out)) == {0, 1000, 2000, 3000}
    # rounding of float32 vs float64 interpolation may differ exactly at .5: allow a handful of voxels
    assert (out.ravel() != ref).sum() <= 3
