"""nnU-Net's training loss (soft Dice + cross-entropy with deep supervision), MultiTalent's per-dataset-head loss
(sigmoid BCE + soft Dice on the sample's own dataset channels), nnU-Net's poly learning rate, and the
registration losses of the tracking trainer (GradICON via icon_registration).

Re-implemented from nnU-Net v2's documented behaviour (``MemoryEfficientSoftDiceLoss`` with batch Dice and
no background, ``DC_and_CE_loss`` with weights 1/1, ``DeepSupervisionWrapper`` with weights 1/2^i where the
lowest resolution gets 0, normalised; targets downsampled per decoder stage by nearest neighbour;
``PolyLRScheduler`` lr = lr0 * (1 - epoch / max_epochs)^0.9).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """nnU-Net's ``_get_deep_supervision_scales``: 1 / cumprod(strides), without the bottleneck."""
    cum = np.cumprod(np.vstack([np.asarray(s, float) for s in strides]), axis=0)
    return [list(1.0 / c) for c in cum][:-1]


def deep_supervision_weights(n: int, ddp: bool = False) -> np.ndarray:
    """1/2^i, lowest resolution 0 (1e-6 under DDP so every parameter gets a gradient), normalised to sum 1."""
    w = np.array([1.0 / (2 ** i) for i in range(n)])
    if n > 1:
        w[-1] = 1e-6 if ddp else 0.0
    return w / w.sum()


def downsample_targets(target: torch.Tensor, scales: Sequence[Sequence[float]]) -> list[torch.Tensor]:
    """The target [B, 1, z, y, x] at every deep-supervision resolution (nearest neighbour, as nnU-Net's
    DownsampleSegForDSTransform with order 0)."""
    out = []
    spatial = target.shape[2:]
    for s in scales:
        if all(float(v) == 1.0 for v in s):
            out.append(target)
        else:
            size = [int(round(n * float(f))) for n, f in zip(spatial, s)]
            out.append(F.interpolate(target.float(), size=size, mode="nearest").to(target.dtype))
    return out


class SoftDiceLoss(nn.Module):
    """nnU-Net's MemoryEfficientSoftDiceLoss: softmax, one-hot target, background excluded, batch Dice,
    smooth 1e-5; returns -dice (nnU-Net's sign convention)."""

    def __init__(self, batch_dice: bool = True, do_bg: bool = False, smooth: float = 1e-5):
        super().__init__()
        self.batch_dice, self.do_bg, self.smooth = batch_dice, do_bg, smooth

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(logits.float(), 1)
        axes = tuple(range(2, logits.ndim))
        with torch.no_grad():
            onehot = torch.zeros_like(probs)
            onehot.scatter_(1, target.long(), 1)
            if not self.do_bg:
                onehot = onehot[:, 1:]
            sum_gt = onehot.sum(axes)
        if not self.do_bg:
            probs = probs[:, 1:]
        intersect = (probs * onehot).sum(axes)
        sum_pred = probs.sum(axes)
        if self.batch_dice:
            intersect, sum_pred, sum_gt = intersect.sum(0), sum_pred.sum(0), sum_gt.sum(0)
        dc = (2 * intersect + self.smooth) / torch.clip(sum_gt + sum_pred + self.smooth, 1e-8)
        return -dc.mean()


class DiceCELoss(nn.Module):
    """nnU-Net's DC_and_CE_loss (weight 1 each)."""

    def __init__(self, weight_ce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = True):
        super().__init__()
        self.dice = SoftDiceLoss(batch_dice=batch_dice)
        self.weight_ce, self.weight_dice = weight_ce, weight_dice

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float(), target[:, 0].long())
        return self.weight_ce * ce + self.weight_dice * self.dice(logits, target)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``loss`` over the decoder outputs (highest resolution first)."""

    def __init__(self, loss: nn.Module, weights: Sequence[float]):
        super().__init__()
        self.loss = loss
        self.weights = [float(w) for w in weights]

    def forward(self, outputs: Sequence[torch.Tensor] | torch.Tensor, targets: Sequence[torch.Tensor],
                **kwargs) -> torch.Tensor:
        """``kwargs`` (e.g. the per-sample dataset index of :class:`MultiHeadBCEDiceLoss`) go to every term."""
        if isinstance(outputs, torch.Tensor):
            outputs = [outputs]
        if len(outputs) != len(targets) or len(outputs) > len(self.weights):
            raise ValueError(f"deep supervision: {len(outputs)} outputs, {len(targets)} targets, "
                             f"{len(self.weights)} weights")
        total = None
        for w, o, t in zip(self.weights, outputs, targets):
            if w == 0:
                continue
            term = w * self.loss(o, t, **kwargs)
            total = term if total is None else total + term
        assert total is not None
        return total


def build_segmentation_loss(strides: Sequence[Sequence[int]], ddp: bool = False
                            ) -> tuple[DeepSupervisionLoss, list[list[float]]]:
    """(loss, scales) for a network built with deep_supervision=True from plans with these strides."""
    scales = deep_supervision_scales(strides)
    return DeepSupervisionLoss(DiceCELoss(), deep_supervision_weights(len(scales), ddp)), scales


class MultiHeadBCEDiceLoss(nn.Module):
    """MultiTalent's loss for per-dataset output heads: every class of every dataset owns one output channel
    (sigmoid), and a sample is scored only on the channels of the dataset it came from - binary cross-entropy
    plus soft Dice (nnU-Net's ``DC_and_BCE_loss``: weights 1/1, Dice with ``do_bg=True``, smooth 1e-5,
    batch Dice: summed over the batch's samples of that dataset).

    ``heads[d]`` lists dataset ``d``'s classes, each as the label values it covers (``(3,)`` for a label, a
    tuple for an nnU-Net region); ``channels[d]`` their output channels (default: consecutive, dataset after
    dataset). ``forward(logits [B, C, ...], target [B, 1, ...], dataset [B])``: the target holds each sample's
    own (dataset-local) label values; voxels < 0 are ignored (nnU-Net's ignore label).
    """

    def __init__(self, heads: Sequence[Sequence[Sequence[int]]], channels: Sequence[Sequence[int]] | None = None,
                 weight_bce: float = 1.0, weight_dice: float = 1.0, batch_dice: bool = True, smooth: float = 1e-5):
        super().__init__()
        self.heads = [[tuple(int(v) for v in cls) for cls in h] for h in heads]
        if channels is None:
            channels, n = [], 0
            for h in self.heads:
                channels.append(list(range(n, n + len(h))))
                n += len(h)
        self.channels = [[int(c) for c in ch] for ch in channels]
        if [len(c) for c in self.channels] != [len(h) for h in self.heads] or any(not h for h in self.heads):
            raise ValueError("every dataset needs at least one class and one output channel per class")
        self.num_channels = 1 + max(c for ch in self.channels for c in ch)
        self.weight_bce, self.weight_dice = float(weight_bce), float(weight_dice)
        self.batch_dice, self.smooth = batch_dice, float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, dataset: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] < self.num_channels:
            raise ValueError(f"{logits.shape[1]} output channels, the heads need {self.num_channels}")
        dataset = torch.as_tensor(dataset, device=logits.device).long().view(-1)
        bce_sum = logits.new_zeros((), dtype=torch.float32)
        bce_n = logits.new_zeros((), dtype=torch.float32)
        dices = []
        for d in torch.unique(dataset).tolist():
            idx = torch.nonzero(dataset == d).view(-1)
            ch = torch.tensor(self.channels[d], device=logits.device)
            lg = logits.index_select(0, idx).index_select(1, ch).float()
            t = target.index_select(0, idx)
            valid = (t >= 0).float()
            gt = torch.cat([torch.isin(t, torch.tensor(c, device=t.device, dtype=t.dtype)) for c in self.heads[d]],
                           1).float()
            bce = F.binary_cross_entropy_with_logits(lg, gt, reduction="none")
            bce_sum = bce_sum + (bce * valid).sum()
            bce_n = bce_n + valid.sum() * lg.shape[1]
            p = torch.sigmoid(lg) * valid
            gt = gt * valid
            axes = tuple(range(2, lg.ndim))
            inter, sp, sg = (p * gt).sum(axes), p.sum(axes), gt.sum(axes)
            if self.batch_dice:
                inter, sp, sg = inter.sum(0), sp.sum(0), sg.sum(0)
            dices.append(((2 * inter + self.smooth) / torch.clip(sg + sp + self.smooth, 1e-8)).reshape(-1))
        bce = bce_sum / torch.clip(bce_n, min=1.0)
        return self.weight_bce * bce - self.weight_dice * torch.cat(dices).mean()


def build_multihead_loss(strides: Sequence[Sequence[int]], heads: Sequence[Sequence[Sequence[int]]],
                         channels: Sequence[Sequence[int]] | None = None, ddp: bool = False
                         ) -> tuple[DeepSupervisionLoss, list[list[float]]]:
    """(loss, scales) for MultiTalent-style pretraining with deep supervision; call the loss as
    ``loss(outputs, downsample_targets(target, scales), dataset=index_per_sample)``."""
    scales = deep_supervision_scales(strides)
    return (DeepSupervisionLoss(MultiHeadBCEDiceLoss(heads, channels), deep_supervision_weights(len(scales), ddp)),
            scales)


def poly_lr(initial_lr: float, epoch: int, max_epochs: int, exponent: float = 0.9) -> float:
    """nnU-Net's PolyLRScheduler value for ``epoch`` (0-based)."""
    return float(initial_lr) * (1 - min(epoch, max_epochs) / max(max_epochs, 1)) ** exponent


def make_sgd(params, lr: float = 1e-2, weight_decay: float = 3e-5) -> torch.optim.SGD:
    """nnU-Net's optimiser: SGD, momentum 0.99, Nesterov, weight decay 3e-5."""
    return torch.optim.SGD(params, lr=lr, momentum=0.99, nesterov=True, weight_decay=weight_decay)


def gradicon_loss(reg_net: nn.Module, moving: torch.Tensor, fixed: torch.Tensor):
    """icon_registration's GradientICONSparse forward: LNCC similarity (both directions) + lambda x gradient
    inverse consistency. Returns its ICONLoss namedtuple (``all_loss``, ``similarity_loss``,
    ``inverse_consistency_loss``, ...); ``reg_net.phi_AB_vectorfield`` then holds the moving->fixed map."""
    import icon_registration.config as icon_config

    # icon_registration draws its inverse-consistency probe points on ``config.device``
    icon_config.device = fixed.device
    return reg_net(moving, fixed)
