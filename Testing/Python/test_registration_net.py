"""Tests for the uniGradICON registration network built from icon_registration's classes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from LesionLocatorLib.track.propagation import Deformation
from LesionLocatorLib.model.registration_net import (
    MIN_REGISTRATION_EDGE,
    RegistrationNetError,
    build_registration_network,
    icon_coords_to_voxels,
    load_registration_weights,
    one_way_displacement,
    registration_shape,
    warp_with_icon_map,
)

SMALL = (1, 1, 65, 65, 65)


@pytest.fixture(scope="module")
def small_net():
    torch.manual_seed(0)
    return build_registration_network(SMALL)


def test_published_architecture_keys_and_parameter_count():
    torch.manual_seed(0)
    net = build_registration_network()  # 175^3, built only (not run) on CPU
    sd = net.state_dict()
    assert len(sd) == 188
    assert all(k.startswith("regis_net.") for k in sd)
    n_params = sum(p.numel() for p in net.parameters())
    assert n_params == 70_680_916  # "about 70.7 M": four tallUNet2
    assert registration_shape(net) == (175, 175, 175)
    assert not net.training
    # the parameters do not depend on the grid: a small net has the same state-dict layout
    small = build_registration_network(SMALL).state_dict()
    assert {k: tuple(v.shape) for k, v in small.items()} == {k: tuple(v.shape) for k, v in sd.items()}


def test_too_small_input_shape_is_a_clear_error():
    with pytest.raises(RegistrationNetError, match="at least 65 voxels"):
        build_registration_network((1, 1, 64, 80, 80))
    with pytest.raises(RegistrationNetError, match="1 channel"):
        build_registration_network((1, 2, 80, 80, 80))
    with pytest.raises(RegistrationNetError, match="input_shape"):
        build_registration_network((80, 80))
    assert MIN_REGISTRATION_EDGE == 65
    assert registration_shape(build_registration_network((65, 70, 66))) == (65, 70, 66)


def test_untrained_network_is_the_identity(small_net):
    rng = np.random.default_rng(0)
    a = rng.normal(size=SMALL[2:]).astype(np.float32)
    b = rng.normal(size=SMALL[2:]).astype(np.float32)
    phi = one_way_displacement(small_net, a, b)
    assert phi.shape == (1, 3, 65, 65, 65) and phi.dtype == torch.float32
    torch.testing.assert_close(phi, small_net.identity_map, atol=1e-6, rtol=0)
    # identity map convention: channel d runs along array axis d, from 0 to 1
    assert phi[0, 0, -1, 0, 0] == 1 and phi[0, 0, 0, -1, -1] == 0 and phi[0, 2, 0, 0, -1] == 1


def test_known_displacement_moves_a_cube_like_icon_registration_does():
    torch.manual_seed(0)
    net = build_registration_network(SMALL)
    # The last step is the top-level TwoStepRegistration's netPsi; UNet2 divides its output by 10.
    # A constant bias of the zero-initialised last conv = a constant displacement of 5 voxels along z.
    shift_vox = 5
    with torch.no_grad():
        net.regis_net.netPsi.net.lastConv.bias[0] = 10 * shift_vox / (65 - 1)
    a = torch.rand(SMALL)
    b = torch.rand(SMALL)
    phi = one_way_displacement(net, a, b)
    disp_vox = (phi - net.identity_map)[0] * 64
    torch.testing.assert_close(disp_vox[0], torch.full((65, 65, 65), 5.0), atol=1e-4, rtol=0)
    assert disp_vox[1:].abs().max() < 1e-5

    baseline = torch.zeros(SMALL)
    baseline[0, 0, 20:30, 10:20, 30:40] = 1
    # icon_registration semantics: A o phi_AB ~ B, so follow-up voxel j shows baseline voxel j + 5 along z
    warped = warp_with_icon_map(baseline, phi)[0, 0].numpy()
    expected = np.zeros(SMALL[2:], np.float32)
    expected[15:25, 10:20, 30:40] = 1
    np.testing.assert_array_equal(warped, expected)
    # the Deformation path gives the identical result
    d = Deformation(icon_coords_to_voxels(phi), SMALL[2:], SMALL[2:], interpolation="nearest")
    np.testing.assert_array_equal(d.warp(baseline[0, 0].numpy().astype(np.uint8)), expected.astype(np.uint8))
    # zero boundary: content shifted in from outside the baseline is empty
    edge = torch.zeros(SMALL)
    edge[0, 0, :] = 1
    assert warp_with_icon_map(edge, phi)[0, 0, -shift_vox:].sum() == 0


def test_load_weights_from_a_tracking_checkpoint(small_net):
    torch.manual_seed(1)
    other = build_registration_network(SMALL)
    weights = {f"reg_net.{k}": v.clone() + 0.5 for k, v in other.state_dict().items() if v.is_floating_point()}
    weights.update({f"reg_net.{k}": v.clone() for k, v in other.state_dict().items() if not v.is_floating_point()})
    weights["unet.some.weight"] = torch.zeros(3)
    weights["unet_patch_size"] = torch.tensor([160, 224, 224])
    load_registration_weights(small_net, weights)
    key = "regis_net.netPsi.net.lastConv.weight"
    torch.testing.assert_close(small_net.state_dict()[key], other.state_dict()[key] + 0.5)
    with pytest.raises(RegistrationNetError, match="missing"):
        load_registration_weights(small_net, {k: v for k, v in weights.items() if "lastConv" not in k})
    bad = dict(weights)
    bad[f"reg_net.{key}"] = torch.zeros(1)
    with pytest.raises(RegistrationNetError, match="shape"):
        load_registration_weights(small_net, bad)
    with pytest.raises(RegistrationNetError, match="no registration weights"):
        load_registration_weights(small_net, {"unet.x": torch.zeros(1)})


def test_bad_inputs(small_net):
    x = np.zeros((65, 65, 65), np.float32)
    with pytest.raises(RegistrationNetError, match="spatial shape"):
        one_way_displacement(small_net, np.zeros((64, 65, 65), np.float32), x)
    with pytest.raises(RegistrationNetError, match="fixed_followup"):
        one_way_displacement(small_net, x, np.zeros((2, 1, 65, 65, 65), np.float32))
    with pytest.raises(RegistrationNetError, match="CUDA"):
        one_way_displacement(small_net, x, x, fp16=True)
