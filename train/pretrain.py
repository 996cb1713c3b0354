"""Multi-dataset supervised pretraining of the segmentation body (the published step before fine-tuning).

    # nnU-Net v2 preprocessed datasets (nnUNetv2_plan_and_preprocess), MultiTalent heads:
    python -m train pretrain -o OUT/pretrained --nnunet-dataset $nnUNet_preprocessed/Dataset003_Liver \
        --nnunet-dataset 6 [--nnunet-plans nnUNetPlans] --plans plans.json --epochs 1000 --iters 250
    # our own preprocessing (case lists / phantoms), one dataset per case-list "dataset" name:
    python -m train pretrain -o OUT/pretrained --cases ds1.json --cases ds2.json [--phantoms 20] \
        --patch-size 48 64 64 --spacing 2 1.25 1.25 --features 8 16 32 64 80 --epochs 100 --iters 250
    python -m train segment ... --init OUT/pretrained            # body loaded, stem + head re-initialised

Published recipe (supplement, section 6): nnU-Net ResEnc-L on 47 datasets, each drawn with probability
proportional to 1/sqrt(number of images) (MultiTalent), SGD lr 1e-2 with poly decay. Here:

* datasets: nnU-Net v2 preprocessed datasets (``--nnunet-dataset``, read with nnunetv2's own dataset class,
  ``PlansManager``/``LabelManager`` and ``nnUNetDataLoader`` with foreground oversampling; see
  ``train/nnunet_data.py``) and/or cases preprocessed by our code as at inference (``--cases``, ``--phantoms``:
  every case-list dataset is one dataset with one class, "lesion" = any label > 0);
* sampling: per sample a dataset with probability proportional to 1/sqrt(its number of images), then a patch of
  it (a random location, or with probability ``--foreground-prob`` = 1/3 centred on a foreground voxel);
* network: ours - the plans' ResEnc UNet built by ``LesionLocatorLib.model.network.build_network`` (1 input channel,
  deep supervision) with MultiTalent's per-dataset heads: every foreground class of every dataset owns one output
  channel (layout printed at start, stored in the checkpoint and in ``OUT/pretraining_heads.json``);
* loss: MultiTalent's - per-class sigmoid, BCE + soft Dice over the channels of the sample's own dataset only
  (``train.losses.MultiHeadBCEDiceLoss``), deep supervision as nnU-Net; ``--single-head`` instead trains one
  foreground-vs-background softmax head with nnU-Net's Dice + CE (all datasets' foreground merged);
* optimiser/schedule: nnU-Net's SGD (momentum 0.99, Nesterov) with poly decay; fp16 on CUDA only.

Not reproduced: nnU-Net's data augmentation pipeline (patches are used as loaded) and its trainer bookkeeping.
``train segment --init OUT`` loads the body only, so the head layout (any number of channels) does not matter
there.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from LesionLocatorLib.model.checkpoint import write_checkpoint
from LesionLocatorLib.model.network import build_network
from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json
from LesionLocatorLib.core.files import atomic_write_text

from . import data as D
from .distributed import DistInfo, autocast
from .losses import build_multihead_loss, build_segmentation_loss, downsample_targets
from .nnunet_data import HeadClass  # nnunetv2 itself is imported only for --nnunet-dataset
from .trainer_segment import (BaseTrainer, TrainError, _jsonable, add_common_arguments, add_data_arguments,
                              add_model_arguments, load_cases, plans_from_args, run_training)

HEADS_FILE = "pretraining_heads.json"


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
    single_head: bool = False  # True: one foreground-vs-background softmax head (all datasets merged)
    trainer_name: str = "LesionLocatorPretrainer"


class CaseListDataset:
    """Cases preprocessed by our code (``--cases`` / ``--phantoms``) of one dataset name, as a pretraining
    source with one class: "lesion" (any label > 0)."""

    kind = "cases"

    def __init__(self, name: str, cases: Sequence[D.Case]):
        if not cases:
            raise TrainError(f"dataset {name!r} has no cases")
        self.name = name
        self.cases = list(cases)
        self.classes = [HeadClass("lesion", (1,))]
        self.image_channels = 1

    @property
    def num_images(self) -> int:
        return len(self.cases)

    def describe(self) -> dict:
        return {"source": "cases"}

    def sample(self, rng: np.random.Generator, patch: Sequence[int], foreground_prob: float
               ) -> tuple[np.ndarray, np.ndarray]:
        case = self.cases[int(rng.integers(len(self.cases)))]
        img, tgt = D.random_patch(case, patch, rng, foreground_prob)
        return img, tgt.astype(np.int16)


def group_cases(cases: Sequence[D.Case]) -> list[CaseListDataset]:
    by_ds: dict[str, list[D.Case]] = {}
    for c in cases:
        by_ds.setdefault(c.dataset, []).append(c)
    return [CaseListDataset(k, v) for k, v in sorted(by_ds.items())]


class DatasetMixer:
    """Draws a dataset per sample with probability proportional to 1/sqrt(number of images) (MultiTalent)."""

    def __init__(self, sources: Sequence[Any]):
        names = [s.name for s in sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise TrainError(f"two pretraining datasets share the name(s) {dup}")
        self.sources = sorted(sources, key=lambda s: s.name)
        self.names = [s.name for s in self.sources]
        probs = D.dataset_probabilities({s.name: s.num_images for s in self.sources})
        self.probs = np.array([probs[k] for k in self.names])

    def draw(self, rng: np.random.Generator) -> int:
        return int(rng.choice(len(self.names), p=self.probs))


def head_layout(sources: Sequence[Any]) -> list[dict]:
    """Per dataset (in the mixer's order): its output channels, one per foreground class, dataset after dataset."""
    out, n = [], 0
    for s in sources:
        classes = [{"name": c.name, "labels": list(c.labels), "channel": n + j} for j, c in enumerate(s.classes)]
        out.append({"dataset": s.name, "num_images": s.num_images, "channels": [c["channel"] for c in classes],
                    "classes": classes, **s.describe()})
        n += len(classes)
    return out


class PretrainTrainer(BaseTrainer):
    log_keys = ("train_loss",)

    def __init__(self, cfg: PretrainConfig, sources: Sequence[Any], info: DistInfo | None = None):
        """``sources``: pretraining datasets (:class:`CaseListDataset`, ``train.nnunet_data.NnunetPretrainDataset``)
        and/or preprocessed :class:`train.data.Case` objects (grouped by their dataset name)."""
        self.config = config_from_dicts(cfg.plans, make_dataset_json())
        self.patch = tuple(self.config.patch_size)
        cases = [s for s in sources if isinstance(s, D.Case)]
        srcs = [s for s in sources if not isinstance(s, D.Case)] + group_cases(cases)
        if not srcs:
            raise TrainError("no pretraining data")
        for s in srcs:
            if s.image_channels != self.config.image_channels:
                raise TrainError(f"dataset {s.name!r} has {s.image_channels} image channels, the plans "
                                 f"{self.config.image_channels}")
        self.sampler = DatasetMixer(srcs)
        self.heads = head_layout(self.sampler.sources)
        self.num_outputs = 2 if cfg.single_head else sum(len(h["channels"]) for h in self.heads)
        super().__init__(cfg, info)
        strides = self.config.arch_kwargs["strides"]
        if cfg.single_head:
            self.loss, self.ds_scales = build_segmentation_loss(strides, self.info.is_ddp)
        else:
            self.loss, self.ds_scales = build_multihead_loss(
                strides, [[c["labels"] for c in h["classes"]] for h in self.heads],
                [h["channels"] for h in self.heads], self.info.is_ddp)

    def build_model(self) -> torch.nn.Module:
        return build_network(self.config, self.config.image_channels, num_classes=self.num_outputs,
                             deep_supervision=True)

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [B, 1, ...], dataset-local labels [B, 1, ...] int64 (-1: ignore), dataset index [B])."""
        xs, ys, ds = [], [], []
        for _ in range(self.cfg.batch_size):
            d = self.sampler.draw(rng)
            img, lab = self.sampler.sources[d].sample(rng, self.patch, self.cfg.foreground_prob)
            xs.append(img)
            ys.append(lab[None])
            ds.append(d)
        x = torch.from_numpy(np.stack(xs).astype(np.float32)).to(self.device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(self.device)
        return x, y, torch.tensor(ds, dtype=torch.long, device=self.device)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            out = self.ddp_model(x)
        out = [o.float() for o in out]
        if self.cfg.single_head:
            return self.loss(out, downsample_targets((y > 0).long(), self.ds_scales))
        return self.loss(out, downsample_targets(y, self.ds_scales), dataset=ds)

    def train_step(self, rng: np.random.Generator) -> dict[str, float]:
        loss = self.compute_loss(*self.batch(rng))
        self.optimizer_step(loss)
        return {"train_loss": float(loss.detach())}

    def heads_record(self) -> dict:
        return {"single_head": bool(self.cfg.single_head), "num_outputs": self.num_outputs,
                "activation": "softmax" if self.cfg.single_head else "sigmoid",
                "sampling_probabilities": dict(zip(self.sampler.names, self.sampler.probs.round(6).tolist())),
                "datasets": self.heads}

    def write_final(self) -> Path:
        heads = self.heads_record()
        dataset = {**make_dataset_json(), "pretraining_heads": heads}
        path = write_checkpoint(self.cfg.output, self.cfg.plans, dataset, self.cfg.fold,
                                self.model.state_dict(), self.cfg.trainer_name, self.cfg.mirror_axes,
                                extra={"current_epoch": self.cfg.epochs, "logging": self.records,
                                       "input_channels": self.config.image_channels,
                                       "pretraining_heads": heads,
                                       "train_config": _jsonable(asdict(self.cfg))})
        atomic_write_text(Path(self.cfg.output) / HEADS_FILE, json.dumps(heads, indent=2))
        return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--foreground-prob", type=float, default=1.0 / 3.0,
                        help="share of patches centred on foreground (nnU-Net oversampling)")
    parser.add_argument("--single-head", action="store_true",
                        help="one foreground-vs-background softmax head instead of MultiTalent per-dataset heads")
    g = parser.add_argument_group("nnU-Net v2 datasets (needs nnunetv2)")
    g.add_argument("--nnunet-dataset", action="append", default=[],
                   help="nnU-Net v2 preprocessed dataset: folder nnUNet_preprocessed/DatasetXXX_Name, or its id/name "
                        "under $nnUNet_preprocessed (repeatable; one pretraining dataset each)")
    g.add_argument("--nnunet-plans", default="nnUNetPlans", help="plans identifier (e.g. nnUNetResEncUNetLPlans)")
    g.add_argument("--nnunet-configuration", default="3d_fullres")


def nnunet_sources(args: argparse.Namespace, config, is_main: bool = True) -> list[Any]:
    if not args.nnunet_dataset:
        return []
    from .nnunet_data import NnunetPretrainDataset

    out = []
    for spec in args.nnunet_dataset:
        src = NnunetPretrainDataset(spec, plans=args.nnunet_plans, configuration=args.nnunet_configuration)
        if is_main and not np.allclose(src.spacing, config.spacing, rtol=0.05):
            print(f"note: {src.name} is preprocessed at spacing {list(src.spacing)}, the plans' spacing is "
                  f"{list(config.spacing)} (re-plan with -overwrite_target_spacing to match)", flush=True)
        out.append(src)
    return out


def _build(args: argparse.Namespace, info) -> "PretrainTrainer":
    plans = plans_from_args(args)
    config = config_from_dicts(plans, make_dataset_json())
    cache = args.cache or (Path(args.output) / "preprocessed")
    sources: list[Any] = nnunet_sources(args, config, info.is_main)
    sources += load_cases(args, config, cache)
    if not sources:
        raise TrainError("no pretraining data: give --nnunet-dataset, --cases and/or --phantoms")
    cfg = PretrainConfig(output=args.output, plans=plans, fold=args.fold, epochs=args.epochs,
                         iters_per_epoch=args.iters, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         foreground_prob=args.foreground_prob, device=str(info.device),
                         single_head=args.single_head)
    trainer = PretrainTrainer(cfg, sources, info)
    if info.is_main:
        probs = dict(zip(trainer.sampler.names, trainer.sampler.probs.round(4).tolist()))
        print(f"dataset sampling probabilities (1/sqrt(size)): {probs}", flush=True)
        if not cfg.single_head:
            layout = {h["dataset"]: {c["name"]: c["channel"] for c in h["classes"]} for h in trainer.heads}
            print(f"output channels per dataset (MultiTalent heads): {layout}", flush=True)
    return trainer


def run(args: argparse.Namespace) -> int:
    return run_training("pretrain", args, _build)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train pretrain", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
