"""The uniGradICON registration network of LesionLocatorTrack, built from ``icon_registration``'s classes.

The published tracker's ``reg_net`` is the uniGradICON architecture (``unigradicon.make_network(input_shape,
include_last_step=True)``). ``unigradicon`` imports ``itk``, so we build the identical module tree from
``icon_registration`` directly; the state-dict keys then match the checkpoint's ``reg_net.*`` entries exactly
(188 keys starting ``regis_net.``, about 70.7 M parameters).

Coordinate convention of ``icon_registration`` (checked against its ``mermaidlite`` code):
- An image is a tensor [B, C, D0, D1, D2]; here (D0, D1, D2) = (z, y, x) of our arrays.
- A map (e.g. the identity map) is a tensor [B, 3, D0, D1, D2] whose channel ``d`` holds the coordinate along
  spatial axis ``d`` (channel 0 = z, 1 = y, 2 = x), scaled to [0, 1]: voxel index ``i`` <-> ``i / (n_d - 1)``
  (``align_corners=True``).
- ``phi_AB = regis_net(A, B)`` satisfies ``A o phi_AB ~= B``: evaluated on B's identity map it gives, for every
  voxel of B (the fixed image, here the follow-up), the coordinate in A (the moving image, here the baseline) to
  sample. It is a pull-back map on the follow-up grid, which is why warping the baseline prompt with it puts the
  prompt onto the follow-up.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

REGISTRATION_SHAPE: tuple[int, int, int] = (175, 175, 175)
# Two DownsampleRegistration levels (/4) then a 5-level tallUNet2 (/32): below 65 voxels per edge the coarsest
# average pooling sees a 1-voxel image and fails.
MIN_REGISTRATION_EDGE = 65
REGISTRATION_STATE_PREFIX = "reg_net."


class RegistrationNetError(ValueError):
    """The registration network cannot be built or applied as asked (bad shape, weights that do not fit)."""


def _icon_modules():
    # Imported lazily: icon_registration pulls in matplotlib and takes seconds to import.
    from icon_registration import losses, network_wrappers, networks

    return losses, network_wrappers, networks


def _spatial_shape(input_shape: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 5:
        if shape[1] != 1:
            raise RegistrationNetError(f"registration input must have 1 channel, got input_shape {shape}")
        shape = shape[2:]
    if len(shape) != 3:
        raise RegistrationNetError(
            f"input_shape must be (1, 1, D, H, W) or (D, H, W), got {tuple(input_shape)}"
        )
    if min(shape) < MIN_REGISTRATION_EDGE:
        raise RegistrationNetError(
            f"the uniGradICON network needs at least {MIN_REGISTRATION_EDGE} voxels per edge, got {shape}"
        )
    return shape  # type: ignore[return-value]


def build_registration_network(input_shape: tuple[int, ...] = (1, 1) + REGISTRATION_SHAPE) -> torch.nn.Module:
    """Build the uniGradICON ``GradientICONSparse`` network (random weights, eval mode, CPU).

    The last conv of every tallUNet2 is zero-initialised, so an untrained network is the identity transform.
    """
    spatial = _spatial_shape(input_shape)
    losses, network_wrappers, networks = _icon_modules()
    inner = network_wrappers.FunctionFromVectorField(networks.tallUNet2(dimension=3))
    for _ in range(2):
        inner = network_wrappers.TwoStepRegistration(
            network_wrappers.DownsampleRegistration(inner, dimension=3),
            network_wrappers.FunctionFromVectorField(networks.tallUNet2(dimension=3)),
        )
    inner = network_wrappers.TwoStepRegistration(
        inner, network_wrappers.FunctionFromVectorField(networks.tallUNet2(dimension=3))
    )
    net = losses.GradientICONSparse(inner, losses.LNCC(sigma=5), lmbda=1.5)
    net.assign_identity_map((1, 1) + spatial)
    net.eval()  # BatchNorm layers must use their running statistics at inference
    return net


def registration_shape(net: torch.nn.Module) -> tuple[int, int, int]:
    """The spatial input shape (D, H, W) the network's identity map was built for."""
    return tuple(int(s) for s in net.identity_map.shape[2:])  # type: ignore[return-value]


def registration_state_dict(
    network_weights: Mapping[str, torch.Tensor], prefix: str = REGISTRATION_STATE_PREFIX
) -> dict[str, torch.Tensor]:
    """The registration part of a LesionLocatorTrack ``network_weights`` dict, with ``prefix`` removed."""
    out = {k[len(prefix):]: v for k, v in network_weights.items() if k.startswith(prefix)}
    if not out:
        raise RegistrationNetError(f"no registration weights (keys starting {prefix!r}) in the checkpoint")
    return out


def load_registration_weights(
    net: torch.nn.Module, network_weights: Mapping[str, torch.Tensor], prefix: str = REGISTRATION_STATE_PREFIX
) -> torch.nn.Module:
    """Load the ``reg_net.*`` weights of a tracking checkpoint into ``net`` (strict: every key must match)."""
    state = registration_state_dict(network_weights, prefix)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise RegistrationNetError(
            f"registration weights do not fit the uniGradICON architecture: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise RegistrationNetError(
                f"registration weight {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    net.load_state_dict(state, strict=True)
    net.eval()
    return net


def _as_image_tensor(image: np.ndarray | torch.Tensor, shape: tuple[int, int, int], name: str) -> torch.Tensor:
    t = image if isinstance(image, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(image))
    if t.ndim == 3:
        t = t[None, None]
    if t.ndim != 5 or t.shape[0] != 1 or t.shape[1] != 1:
        raise RegistrationNetError(f"{name} must be (D, H, W) or (1, 1, D, H, W), got {tuple(t.shape)}")
    if tuple(t.shape[2:]) != shape:
        raise RegistrationNetError(
            f"{name} has spatial shape {tuple(t.shape[2:])}, the registration network expects {shape}"
        )
    return t.float()


def one_way_displacement(
    net: torch.nn.Module,
    moving_baseline: np.ndarray | torch.Tensor,
    fixed_followup: np.ndarray | torch.Tensor,
    fp16: bool | None = None,
) -> torch.Tensor:
    """phi_AB of (A = baseline, B = follow-up): the map [1, 3, D, H, W] (float32, on the net's device).

    Only the A->B direction is computed (the published code runs the full two-way GradICON forward with its
    losses and then uses only ``phi_AB_vectorfield``; this is the same tensor at a sixth of the cost).
    The result holds map coordinates in [0, 1] (identity + displacement), not the displacement alone: for each
    follow-up voxel, where in the baseline to sample (see the module docstring for the convention).
    ``fp16`` (default: on CUDA only) runs the network under float16 autocast; CPU always runs in float32.
    """
    shape = registration_shape(net)
    device = next(net.parameters()).device
    a = _as_image_tensor(moving_baseline, shape, "moving_baseline").to(device)
    b = _as_image_tensor(fixed_followup, shape, "fixed_followup").to(device)
    if fp16 is None:
        fp16 = device.type == "cuda"
    if fp16 and device.type != "cuda":
        raise RegistrationNetError("fp16 autocast is only supported on CUDA (CPU half precision is very slow)")
    if net.training:
        net.eval()
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.float16, enabled=bool(fp16)):
        identity = net.identity_map
        # The same tag GradientICONSparse.forward sets: lets the last FunctionFromVectorField add its displacement
        # on the identity grid directly instead of interpolating it (the published phi_AB_vectorfield path).
        identity.isIdentity = True
        phi_ab = net.regis_net(a, b)
        coords = phi_ab(identity)
    return coords.float()


def icon_coords_to_voxels(phi: torch.Tensor) -> np.ndarray:
    """An icon map [1, 3, D, H, W] in [0, 1] -> voxel coordinates (3, D, H, W) float32 of the same grid."""
    if phi.ndim != 5 or phi.shape[0] != 1 or phi.shape[1] != 3:
        raise RegistrationNetError(f"expected a map of shape [1, 3, D, H, W], got {tuple(phi.shape)}")
    scale = torch.tensor([n - 1 for n in phi.shape[2:]], dtype=torch.float32, device=phi.device)
    return (phi[0].float() * scale.view(3, 1, 1, 1)).cpu().numpy()


def warp_with_icon_map(
    image: torch.Tensor, phi: torch.Tensor, spline_order: int = 0, zero_boundary: bool = True
) -> torch.Tensor:
    """``icon_registration``'s ``compute_warped_image_multiNC``: sample ``image`` [1, C, D, H, W] at ``phi``.

    ``phi`` holds [0, 1] coordinates of ``image``'s grid; the result has ``phi``'s spatial shape.

    With the defaults (nearest neighbour, zeros outside) this is how the published tracker warps the prompt.
    """
    from icon_registration.mermaidlite import compute_warped_image_multiNC

    if image.ndim != 5 or phi.ndim != 5 or phi.shape[1] != 3 or image.shape[0] != phi.shape[0]:
        raise RegistrationNetError(f"expected image [B, C, D, H, W] and map [B, 3, D', H', W'], got "
                                   f"{tuple(image.shape)} and {tuple(phi.shape)}")
    spacing = 1.0 / (np.array(image.shape[2:]) - 1)
    return compute_warped_image_multiNC(image.float(), phi.float(), spacing, spline_order, zero_boundary=zero_boundary)
