"""Random-weight checkpoints in the published layout: for tests, benchmarks and smoke checks.

The weights are meaningless; the layout, plans and key names are exactly those the published
checkpoints use, so every loading and inference path runs as it would with real weights.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .checkpoint import MODEL_SUBDIRS, write_checkpoint
from .network import build_network
from .plans import config_from_dicts, make_dataset_json, make_plans


def write_random_checkpoint(root: str | Path, kinds: Sequence[str] = ("point", "box"),
                            patch_size: Sequence[int] = (32, 48, 48), spacing: Sequence[float] = (1.0, 0.8, 0.8),
                            features_per_stage: Sequence[int] = (2, 4, 8, 8),
                            n_blocks_per_stage: Sequence[int] | None = (1, 1, 1, 1), resampling: str = "torch",
                            folds: Sequence[int] = (0,), seed: int = 0,
                            mirror_axes: Sequence[int] = (0, 1, 2)) -> Path:
    """Write ``root/LesionLocatorCheckpoint/LesionLocatorSeg/{point,bbox}_optimized`` and return ``root``.

    Output layers get non-zero random weights (nnU-Net's init is fine too) so that masks vary with the input.
    """
    root = Path(root)
    plans = make_plans(patch_size, spacing, features_per_stage, n_blocks_per_stage, resampling)
    dataset = make_dataset_json()
    config = config_from_dicts(plans, dataset)
    for k_i, kind in enumerate(kinds):
        model_dir = root.joinpath("LesionLocatorCheckpoint", *MODEL_SUBDIRS[kind])
        for fold in folds:
            torch.manual_seed(seed + 100 * k_i + fold)
            net = build_network(config, config.image_channels + 1)
            _balance_head(net, config, seed)
            write_checkpoint(model_dir, plans, dataset, fold, net.state_dict(), mirror_axes=mirror_axes)
    return root


@torch.no_grad()
def _balance_head(net: torch.nn.Module, config, seed: int) -> None:
    """Shift the last layer's bias so about a third of a noise patch is foreground.

    A freshly initialised UNet predicts one class everywhere; tests comparing masks need masks
    that are neither empty nor full, and that respond to the prompt channel.
    """
    net.eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, config.image_channels + 1, *config.patch_size), generator=g)
    x[:, -1] = 0
    c = [p // 2 for p in config.patch_size]
    x[:, -1, c[0] - 3:c[0] + 4, c[1] - 3:c[1] + 4, c[2] - 3:c[2] + 4] = 1
    head = net.decoder.seg_layers[-1]
    head.weight[1] *= 4
    d = net(x)[0]
    d = (d[1] - d[0]).flatten()
    head.bias[1] -= torch.quantile(d, 0.66)


def write_random_track_checkpoint(root: str | Path, patch_size: Sequence[int] = (32, 48, 48),
                                  spacing: Sequence[float] = (1.0, 0.8, 0.8),
                                  features_per_stage: Sequence[int] = (2, 4, 8, 8),
                                  n_blocks_per_stage: Sequence[int] | None = (1, 1, 1, 1),
                                  registration_size: Sequence[int] = (65, 65, 65), folds: Sequence[int] = (0,),
                                  seed: int = 0, resampling: str = "torch") -> Path:
    """``root/LesionLocatorCheckpoint/LesionLocatorTrack`` with the published key layout
    (``reg_net.*`` uniGradICON, ``unet.*`` 2-channel ResEnc UNet, buffer ``unet_patch_size``).

    ``registration_size`` (plans field ``registration_input_size``; the published weights use 175^3)
    may be reduced for tests; the registration net's last layer is zero at initialisation, so a random
    checkpoint registers with the identity transform.
    """
    from .registration_net import build_registration_network

    root = Path(root)
    plans = make_plans(patch_size, spacing, features_per_stage, n_blocks_per_stage, resampling,
                       dataset_name="LesionLocatorTrack")
    plans["configurations"]["3d_fullres"]["registration_input_size"] = [int(s) for s in registration_size]
    dataset = make_dataset_json()
    config = config_from_dicts(plans, dataset)
    model_dir = root.joinpath("LesionLocatorCheckpoint", *MODEL_SUBDIRS["track"])
    for fold in folds:
        torch.manual_seed(seed + fold)
        unet = build_network(config, config.image_channels + 1)
        _balance_head(unet, config, seed + fold)
        reg = build_registration_network((1, 1, *registration_size))
        weights = {f"reg_net.{k}": v for k, v in reg.state_dict().items()}
        weights.update({f"unet.{k}": v for k, v in unet.state_dict().items()})
        weights["unet_patch_size"] = torch.tensor(config.patch_size, dtype=torch.int64)
        write_checkpoint(model_dir, plans, dataset, fold, weights, trainer_name="LesionLocatorTrainerTrack")
    return root
