"""train.losses: nnU-Net deep-supervision Dice+CE, MultiTalent per-dataset-head BCE+Dice, poly lr, SGD settings,
GradICON loss forward."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train import losses as L


def test_deep_supervision_scales_and_weights():
    scales = L.deep_supervision_scales([[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    assert scales == [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]
    w = L.deep_supervision_weights(3)
    assert np.allclose(w, np.array([1, 0.5, 0]) / 1.5)
    wd = L.deep_supervision_weights(3, ddp=True)
    assert wd[-1] > 0 and wd.sum() == pytest.approx(1.0)


def test_downsample_targets_nearest():
    y = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    y[..., 2:6, 2:6, 2:6] = 1
    ts = L.downsample_targets(y, [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]])
    assert [tuple(t.shape[2:]) for t in ts] == [(8, 8, 8), (4, 4, 4), (2, 2, 2)]
    assert ts[0] is y and ts[1].dtype == torch.long and int(ts[1].sum()) == 8


def test_dice_ce_perfect_vs_wrong():
    y = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    y[:, :, 1:4, 1:4, 1:4] = 1
    good = torch.where(y.bool(), 20.0, -20.0).float()
    logits_good = torch.cat([-good, good], 1)
    loss = L.DiceCELoss()
    lg = float(loss(logits_good, y))
    lb = float(loss(-logits_good, y))
    assert lg == pytest.approx(-1.0, abs=1e-3)  # CE ~ 0, soft Dice ~ 1 (nnU-Net's sign)
    assert lb > lg + 1.0
    ds, scales = L.build_segmentation_loss([[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    outs = [logits_good, logits_good[..., ::2, ::2, ::2]]  # n_stages - 1 decoder outputs
    total = float(ds(outs, L.downsample_targets(y, scales)))
    assert total == pytest.approx(-1.0, abs=1e-2)
    with pytest.raises(ValueError):
        ds(outs, L.downsample_targets(y, scales)[:1])


def test_multihead_loss_scores_only_the_samples_own_dataset_channels():
    # dataset 0: labels 1, 2 -> channels 0, 1; dataset 1: one region {1, 2} -> channel 2
    loss = L.MultiHeadBCEDiceLoss([[(1,), (2,)], [(1, 2)]])
    assert loss.channels == [[0, 1], [2]] and loss.num_channels == 3
    y = torch.zeros(2, 1, 6, 6, 6, dtype=torch.long)
    y[:, :, 1:3, 1:4, 1:4] = 1
    y[:, :, 3:5, 1:4, 1:4] = 2
    ds = torch.tensor([0, 1])
    good = torch.full((2, 3, 6, 6, 6), -20.0)
    good[0, 0][y[0, 0] == 1] = 20.0
    good[0, 1][y[0, 0] == 2] = 20.0
    good[1, 2][y[1, 0] > 0] = 20.0
    lg = float(loss(good, y, ds))
    assert lg == pytest.approx(-1.0, abs=1e-3)  # BCE ~ 0, every Dice ~ 1
    other = good.clone()
    other[0, 2] = 5.0  # channels of the other dataset do not count
    other[1, :2] = -5.0
    assert float(loss(other, y, ds)) == pytest.approx(lg, abs=1e-6)
    assert float(loss(-good, y, ds)) > lg + 1.0
    ignored = y.clone()
    ignored[0, 0, 1:2] = -1  # ignore label: those voxels do not count even where the logits are wrong
    wrong = good.clone()
    wrong[0, :, 1:2] = -good[0, :, 1:2]
    assert float(loss(wrong, ignored, ds)) == pytest.approx(-1.0, abs=1e-3)
    with pytest.raises(ValueError, match="output channels"):
        loss(good[:, :2], y, ds)
    # deep supervision passes the dataset index to every resolution
    dsl, scales = L.build_multihead_loss([[1, 1, 1], [2, 2, 2], [2, 2, 2]], [[(1,), (2,)], [(1, 2)]])
    total = dsl([good, good[..., ::2, ::2, ::2]], L.downsample_targets(y, scales), dataset=ds)
    assert float(total) == pytest.approx(-1.0, abs=1e-2)


def test_poly_lr_and_sgd():
    assert L.poly_lr(1e-2, 0, 100) == pytest.approx(1e-2)
    assert L.poly_lr(1e-2, 50, 100) == pytest.approx(1e-2 * 0.5 ** 0.9)
    assert L.poly_lr(1e-2, 100, 100) == 0.0
    opt = L.make_sgd([torch.nn.Parameter(torch.zeros(2))], lr=1e-2)
    g = opt.param_groups[0]
    assert g["momentum"] == 0.99 and g["nesterov"] and g["weight_decay"] == 3e-5


def test_gradicon_loss_forward_small():
    from LesionLocatorLib.model.registration_net import build_registration_network

    torch.manual_seed(0)
    net = build_registration_network((1, 1, 65, 65, 65)).train()
    a = torch.rand(1, 1, 65, 65, 65)
    out = L.gradicon_loss(net, a, a.clone())
    # untrained network = identity: identical images give ~zero inverse-consistency error
    assert float(out.inverse_consistency_loss) < 1e-3
    assert torch.isfinite(out.all_loss) and out.all_loss.requires_grad
    assert tuple(net.phi_AB_vectorfield.shape) == (1, 3, 65, 65, 65)
