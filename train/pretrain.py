"""Multi-dataset supervised pretraining of the segmentation body (the published step before fine-tuning).

    python -m train pretrain -o OUT/pretrained --cases ds1.json --cases ds2.json [--phantoms 20] \
        --patch-size 48 64 64 --spacing 2 1.25 1.25 --features 8 16 32 64 80 --epochs 100 --iters 250
    python -m train segment ... --init OUT/pretrained            # body loaded, stem + head re-initialised

Published recipe (supplement, section 6): nnU-Net ResEnc-L on 47 datasets, each drawn with probability
proportional to 1/sqrt(number of images) (MultiTalent), SGD lr 1e-2 with poly decay, nnU-Net's Dice + CE.
Here: the same sampling, loss, optimiser and plans-built network (1 input channel: the image); patches are
drawn nnU-Net-style (a random location, or with probability 1/3 centred on a random foreground voxel) from
cases preprocessed as at inference. The target is foreground (any label > 0) vs background: MultiTalent's
per-dataset class heads and nnU-Net's full augmentation pipeline are not reproduced here (see train/README.md).
The optional nnU-Net v2 package is not needed.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from LesionLocatorLib.checkpoint import write_checkpoint
from LesionLocatorLib.network import build_network
from LesionLocatorLib.plans import config_from_dicts, make_dataset_json

from . import data as D
from .distributed import DistInfo, autocast
from .losses import build_segmentation_loss, downsample_targets
from .trainer_segment import (BaseTrainer, TrainError, _jsonable, add_common_arguments, add_data_arguments,
                              add_model_arguments, load_cases, plans_from_args, run_training)


@dataclass
class PretrainConfig:
    output: Path
    plans: dict
    fold: int = 0
    epochs: int = 10
    iters_per_epoch: int = 50
    batch_size: int = 2
    lr: float = 1e-2
    weight_decay: float = 3e-5
    seed: int = 0
    foreground_prob: float = 1.0 / 3.0
    device: str = "auto"
    grad_clip: float = 12.0
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    trainer_name: str = "LesionLocatorPretrainer"


class PretrainTrainer(BaseTrainer):
    log_keys = ("train_loss",)

    def __init__(self, cfg: PretrainConfig, cases: Sequence[D.Case], info: DistInfo | None = None):
        self.config = config_from_dicts(cfg.plans, make_dataset_json())
        self.patch = tuple(self.config.patch_size)
        super().__init__(cfg, info)
        self.loss, self.ds_scales = build_segmentation_loss(self.config.arch_kwargs["strides"], self.info.is_ddp)
        # images count per dataset; 1/sqrt(size) dataset weights
        self.sampler = D.CaseSampler(cases, "sqrt", require_lesions=False)

    def build_model(self) -> torch.nn.Module:
        return build_network(self.config, self.config.image_channels, deep_supervision=True)

    def train_step(self, rng: np.random.Generator) -> dict[str, float]:
        xs, ys = [], []
        for _ in range(self.cfg.batch_size):
            case, _ = self.sampler.draw(rng)
            img, tgt = D.random_patch(case, self.patch, rng, self.cfg.foreground_prob)
            xs.append(img)
            ys.append(tgt[None])
        x = torch.from_numpy(np.stack(xs).astype(np.float32)).to(self.device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(self.device)
        with autocast(self.device):
            out = self.ddp_model(x)
        loss = self.loss([o.float() for o in out], downsample_targets(y, self.ds_scales))
        self.optimizer_step(loss)
        return {"train_loss": float(loss.detach())}

    def write_final(self) -> Path:
        return write_checkpoint(self.cfg.output, self.cfg.plans, make_dataset_json(), self.cfg.fold,
                                self.model.state_dict(), self.cfg.trainer_name, self.cfg.mirror_axes,
                                extra={"current_epoch": self.cfg.epochs, "logging": self.records,
                                       "input_channels": self.config.image_channels,
                                       "train_config": _jsonable(asdict(self.cfg))})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--foreground-prob", type=float, default=1.0 / 3.0,
                        help="share of patches centred on foreground (nnU-Net oversampling)")


def _build(args: argparse.Namespace, info) -> "PretrainTrainer":
    plans = plans_from_args(args)
    config = config_from_dicts(plans, make_dataset_json())
    cache = args.cache or (Path(args.output) / "preprocessed")
    cases = load_cases(args, config, cache)
    if not cases:
        raise TrainError("no pretraining data: give --cases and/or --phantoms")
    cfg = PretrainConfig(output=args.output, plans=plans, fold=args.fold, epochs=args.epochs,
                         iters_per_epoch=args.iters, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         foreground_prob=args.foreground_prob, device=str(info.device))
    trainer = PretrainTrainer(cfg, cases, info)
    if info.is_main:
        probs = dict(zip(trainer.sampler.names, trainer.sampler.probs.round(4).tolist()))
        print(f"dataset sampling probabilities (1/sqrt(size)): {probs}", flush=True)
    return trainer


def run(args: argparse.Namespace) -> int:
    return run_training("pretrain", args, _build)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train pretrain", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
