"""Promptable segmentation fine-tuning (LesionLocatorTrainerSegment), as published.

    python -m train segment -o OUT/LesionLocatorSeg/point_optimized --prompt point \
        --cases cases.json --phantoms 20 --patch-size 48 64 64 --spacing 2 1.25 1.25 --features 8 16 32 64 80 \
        --epochs 50 --iters 50 [--init PRETRAINED_CKPT] [--resume]
    torchrun --nproc_per_node 4 -m train segment ...      # same script, DDP

Per iteration: an image is drawn, then one lesion instance; the prompt is simulated from it and encoded by
the library's prompt encoder; a patch of the plans' patch size is cut around the lesion (random offset); the
network (plans' ResEnc UNet, 1 image + 1 prompt channel, deep supervision) is trained with nnU-Net's
Dice + CE loss and SGD (momentum 0.99, Nesterov, weight decay 3e-5, poly decay). Output: the published
layout ``OUT/{plans.json, dataset.json, fold_K/checkpoint_final.pth}`` loadable by
``LesionLocatorModel`` plus ``fold_K/checkpoint_latest.pth`` (optimizer state, for ``--resume``),
``fold_K/training_log.jsonl`` and ``fold_K/progress.png``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from LesionLocatorLib.core.files import atomic_write
from LesionLocatorLib.model.checkpoint import CheckpointError, write_checkpoint
from LesionLocatorLib.model.network import build_network
from LesionLocatorLib.model.plans import PlansError, config_from_dicts, make_dataset_json, make_plans, resolve_configuration

from . import data as D
from .distributed import (DistInfo, all_reduce_mean, all_reduce_sum, autocast, barrier, cleanup, grad_scaler,
                          init_distributed, unwrap, wrap_model)
from .losses import build_segmentation_loss, make_sgd, poly_lr

LATEST = "checkpoint_latest.pth"
LOG_NAME = "training_log.jsonl"
PLOT_NAME = "progress.png"


class TrainError(ValueError):
    """Bad training options or an unusable checkpoint to initialise/resume from."""


# ----------------------------------------------------------------------------------------------------------
# logging + plotting
# ----------------------------------------------------------------------------------------------------------
def append_log(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_progress(records: Sequence[dict], path: Path, keys: Sequence[str] = ("train_loss", "val_loss"),
                  dice_key: str = "val_dice") -> None:
    """Loss curves (left axis) and validation Dice (right axis) per epoch, written with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ep = [r["epoch"] for r in records]
    for k in keys:
        vals = [r.get(k) for r in records]
        if any(v is not None for v in vals):
            ax.plot(ep, [np.nan if v is None else v for v in vals], label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    d = [r.get(dice_key) for r in records]
    if any(v is not None for v in d):
        ax2.plot(ep, [np.nan if v is None else v for v in d], "g--", label=dice_key)
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("Dice")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="upper right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# initialisation from a pretrained body
# ----------------------------------------------------------------------------------------------------------
REINIT_PREFIXES = ("encoder.stem.", "decoder.encoder.stem.", "decoder.seg_layers.")


def _read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    p = Path(path)
    if p.is_dir():
        cands = sorted(p.glob("fold_*/checkpoint_final.pth")) or sorted(p.glob("checkpoint_final.pth"))
        if not cands:
            raise TrainError(f"no fold_K/checkpoint_final.pth under {p}")
        p = cands[0]
    if not p.is_file():
        raise TrainError(f"initial checkpoint not found: {p}")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise TrainError(f"cannot read initial checkpoint {p}: {exc}") from exc
    w = ckpt.get("network_weights") if isinstance(ckpt, dict) else None
    if not isinstance(w, dict):
        raise TrainError(f"{p} holds no 'network_weights'")
    return {k: v.float() if v.is_floating_point() else v for k, v in w.items()}


def init_from_pretrained(net: torch.nn.Module, path: str | os.PathLike,
                         reinit_prefixes: Sequence[str] = REINIT_PREFIXES) -> dict[str, int]:
    """Load the body of a pretrained network; stem (input channels differ) and head stay freshly initialised.

    Every other parameter must exist with the same shape (the body must come from the same plans).
    """
    src = _read_weights(path)
    own = net.state_dict()
    body = [k for k in own if not k.startswith(tuple(reinit_prefixes))]
    missing = [k for k in body if k not in src]
    bad = [k for k in body if k in src and tuple(src[k].shape) != tuple(own[k].shape)]
    if missing or bad:
        raise TrainError(f"pretrained weights {path} do not fit the plans' body: {len(missing)} missing "
                         f"(e.g. {missing[:2]}), {len(bad)} with other shapes (e.g. {bad[:2]})")
    own.update({k: src[k] for k in body})
    net.load_state_dict(own)
    return {"loaded": len(body), "reinitialised": len(own) - len(body)}


# ----------------------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SegmentConfig:
    output: Path  # model folder: OUT/{plans.json, dataset.json, fold_K/...}
    plans: dict
    prompt: str = "point"  # point | box | mask | mixed (point or box per sample)
    fold: int = 0
    epochs: int = 10
    iters_per_epoch: int = 50
    val_samples: int = 8
    batch_size: int = 2
    lr: float = 1e-2
    weight_decay: float = 3e-5
    seed: int = 0
    init: str | None = None
    init_whole: bool = False  # init loads every weight (same plans' network: a fine-tuning phase), not the body only
    device: str = "auto"
    max_offset: float = 0.15
    scale_range: tuple[float, float] = (1.0, 1.0)
    augment_prob: float = 0.0
    weighting: Any = "uniform"  # 'uniform', 'sqrt' or {dataset: weight}
    min_lesion_voxels: int = 0
    grad_clip: float = 12.0
    fp16_weights: bool = False  # store checkpoint_final weights as float16 (small bundled models)
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    trainer_name: str = "LesionLocatorTrainerSegment"
    extra: dict = field(default_factory=dict)


class BaseTrainer:
    """Epoch loop shared by the segmentation, tracking and pretraining trainers: poly lr, fp16 on CUDA,
    DDP, JSON-lines log, PNG plot, checkpoint_latest (resume) / checkpoint_final (published layout)."""

    log_keys: tuple[str, ...] = ("train_loss", "val_loss")
    wrap_ddp = True  # False: the subclass averages gradients itself (distributed.average_gradients)

    def __init__(self, cfg: Any, info: DistInfo | None = None):
        self.cfg = cfg
        self.info = info or DistInfo(device=torch.device("cpu"))
        self.device = self.info.device
        self.fold_dir = Path(cfg.output) / f"fold_{cfg.fold}"
        self.records: list[dict] = []
        self.start_epoch = 0
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = self.build_model().to(self.device)
        self.optimizer = make_sgd(self.model.parameters(), cfg.lr, cfg.weight_decay)
        self.scaler = grad_scaler(self.device)
        self.ddp_model = self.model  # wrapped in run()

    # hooks -------------------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def train_step(self, rng: np.random.Generator) -> dict[str, float]:
        raise NotImplementedError

    def validate(self) -> dict[str, float]:
        return {}

    def final_weights(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def write_final(self) -> Path:
        raise NotImplementedError

    # common ----------------------------------------------------------------------------------------
    def optimizer_step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def latest_state(self, next_epoch: int) -> dict[str, Any]:
        return {
            "network_weights": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.scaler.state_dict(),
            "current_epoch": next_epoch,
            "logging": self.records,
            "init_args": {"plans": self.cfg.plans, "configuration": "3d_fullres", "fold": self.cfg.fold},
            "trainer_name": self.cfg.trainer_name,
            "inference_allowed_mirroring_axes": tuple(self.cfg.mirror_axes),
            "train_config": _jsonable(asdict(self.cfg)) if hasattr(self.cfg, "__dataclass_fields__") else {},
        }

    def save_latest(self, next_epoch: int) -> Path:
        self.fold_dir.mkdir(parents=True, exist_ok=True)
        path = self.fold_dir / LATEST
        return atomic_write(path, lambda tmp: torch.save(self.latest_state(next_epoch), tmp))

    def try_resume(self) -> bool:
        path = self.fold_dir / LATEST
        if not path.is_file():
            return False
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
            self.model.load_state_dict(ckpt["network_weights"])
            self.optimizer.load_state_dict(ckpt["optimizer_state"])
            if ckpt.get("grad_scaler_state"):
                self.scaler.load_state_dict(ckpt["grad_scaler_state"])
        except (RuntimeError, KeyError, EOFError, OSError) as exc:
            raise TrainError(f"cannot resume from {path}: {exc}") from exc
        self.start_epoch = int(ckpt["current_epoch"])
        self.records = list(ckpt.get("logging") or [])
        return True

    def run(self) -> Path | None:
        """Train from ``start_epoch`` to ``cfg.epochs``; returns the final checkpoint path (rank 0)."""
        cfg, info = self.cfg, self.info
        self.ddp_model = wrap_model(self.model, info) if self.wrap_ddp else self.model
        log_path = self.fold_dir / LOG_NAME
        if info.is_main:
            self.fold_dir.mkdir(parents=True, exist_ok=True)
            if self.start_epoch == 0 and log_path.exists():
                log_path.unlink()
        for epoch in range(self.start_epoch, cfg.epochs):
            t0 = time.time()
            lr = poly_lr(cfg.lr, epoch, cfg.epochs)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.model.train()
            rng = D.rank_rng(cfg.seed, info.rank, epoch)
            sums: dict[str, float] = {}
            for _ in range(cfg.iters_per_epoch):
                for k, v in self.train_step(rng).items():
                    sums[k] = sums.get(k, 0.0) + v
            keys = sorted(sums)
            means = all_reduce_mean([sums[k] / cfg.iters_per_epoch for k in keys], info)
            record: dict[str, Any] = {"epoch": epoch, "lr": lr, **dict(zip(keys, means))}
            self.model.eval()
            with torch.no_grad():
                record.update(self.validate())
            record["epoch_seconds"] = round(time.time() - t0, 2)
            self.records.append(record)
            if info.is_main:
                append_log(log_path, record)
                self.save_latest(epoch + 1)
                try:
                    plot_progress(self.records, self.fold_dir / PLOT_NAME, self.log_keys)
                except Exception as exc:  # noqa: BLE001 - a plot must never stop training
                    print(f"warning: plot failed: {exc}", file=sys.stderr)
                print(json.dumps(record), flush=True)
            barrier(info)
        final = self.write_final() if info.is_main else None
        barrier(info)
        return final


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items() if k != "plans"}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


class SegmentTrainer(BaseTrainer):
    log_keys = ("train_loss", "val_loss")

    def __init__(self, cfg: SegmentConfig, train_cases: Sequence[D.Case], val_cases: Sequence[D.Case] = (),
                 info: DistInfo | None = None):
        if cfg.prompt not in ("point", "box", "mask", "mixed"):
            raise TrainError(f"--prompt must be point, box, mask or mixed, got {cfg.prompt!r}")
        try:
            self.config = config_from_dicts(cfg.plans, make_dataset_json(), str(cfg.output), cfg.mirror_axes)
        except PlansError as exc:
            raise TrainError(str(exc)) from exc
        self.patch = tuple(self.config.patch_size)
        super().__init__(cfg, info)
        strides = self.config.arch_kwargs["strides"]
        self.loss, self.ds_scales = build_segmentation_loss(strides, ddp=self.info.is_ddp)
        self.sampler = D.CaseSampler(train_cases, cfg.weighting, min_lesion_voxels=cfg.min_lesion_voxels)
        self.val_samples = self._fixed_val_samples(val_cases)
        if cfg.init:
            info_init = init_from_pretrained(self.model, cfg.init, () if cfg.init_whole else REINIT_PREFIXES)
            if self.info.is_main:
                print(f"initialised from {cfg.init}: {info_init}", flush=True)

    def build_model(self) -> torch.nn.Module:
        return build_network(self.config, self.config.image_channels + 1, deep_supervision=True)

    def _kind(self, rng: np.random.Generator) -> str:
        return self.cfg.prompt if self.cfg.prompt != "mixed" else ("point" if rng.random() < 0.5 else "box")

    def _fixed_val_samples(self, cases: Sequence[D.Case]) -> list[D.Sample]:
        """A fixed validation set: every lesion once (or ``val_samples`` draws), prompts from a fixed seed,
        patch centred as at inference (no offset, no augmentation)."""
        cases = [D.filter_lesions(c, self.cfg.min_lesion_voxels) for c in cases]
        cases = [c for c in cases if c.lesions]
        if not cases or self.cfg.val_samples <= 0:
            return []
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, 777]))
        pairs = [(c, l) for c in cases for l in c.lesions]
        if len(pairs) > self.cfg.val_samples:
            pairs = [pairs[i] for i in sorted(rng.choice(len(pairs), self.cfg.val_samples, replace=False))]
        pairs = pairs[self.info.rank::self.info.world_size]  # each rank validates its share
        return [D.make_sample(c, l, self._kind(rng), self.patch, rng, max_offset=0.0) for c, l in pairs]

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        samples = []
        for _ in range(self.cfg.batch_size):
            case, lesion = self.sampler.draw(rng)
            aug = self.cfg.augment_prob > 0 and rng.random() < self.cfg.augment_prob
            samples.append(D.make_sample(case, lesion, self._kind(rng), self.patch, rng, self.cfg.max_offset,
                                         tuple(self.cfg.scale_range), augment=aug))
        x, y = D.collate(samples)
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def compute_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            out = self.ddp_model(x)
        targets = downsample(y, self.ds_scales)
        return self.loss([o.float() for o in out], targets)

    def train_step(self, rng: np.random.Generator) -> dict[str, float]:
        x, y = self.batch(rng)
        loss = self.compute_loss(x, y)
        self.optimizer_step(loss)
        return {"train_loss": float(loss.detach())}

    def validate(self) -> dict[str, float]:
        tp = fp = fn = 0.0
        loss_sum, dice_sum, n = 0.0, 0.0, 0
        for s in self.val_samples:
            x, y = D.collate([s])
            x, y = x.to(self.device), y.to(self.device)
            with autocast(self.device):
                out = self.model(x)
            targets = downsample(y, self.ds_scales)
            loss_sum += float(self.loss([o.float() for o in out], targets))
            pred = out[0].argmax(1, keepdim=True)
            t, p_, f_ = (float(((pred == 1) & (y == 1)).sum()), float(((pred == 1) & (y == 0)).sum()),
                         float(((pred == 0) & (y == 1)).sum()))
            tp, fp, fn = tp + t, fp + p_, fn + f_
            dice_sum += 2 * t / max(2 * t + p_ + f_, 1.0)
            n += 1
        tot = all_reduce_sum([loss_sum, dice_sum, float(n), tp, fp, fn], self.info)
        if tot[2] == 0:
            return {}
        return {"val_loss": tot[0] / tot[2], "val_dice": tot[1] / tot[2],
                "val_pseudo_dice": 2 * tot[3] / max(2 * tot[3] + tot[4] + tot[5], 1.0)}

    def write_final(self) -> Path:
        w = self.final_weights()
        if self.cfg.fp16_weights:
            w = half_weights(w)
        return write_checkpoint(self.cfg.output, self.cfg.plans, make_dataset_json(), self.cfg.fold, w,
                                self.cfg.trainer_name, self.cfg.mirror_axes,
                                extra={"current_epoch": self.cfg.epochs, "logging": self.records,
                                       "train_config": _jsonable(asdict(self.cfg))})


def half_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float16 copies that keep shared tensors shared (the ResEnc decoder holds the encoder: every encoder
    weight appears under two keys, and converting each key separately would store it twice)."""
    done: dict[int, torch.Tensor] = {}
    out = {}
    for k, v in weights.items():
        if v.is_floating_point():
            key = v.data_ptr()
            if key not in done:
                done[key] = v.detach().half()
            out[k] = done[key]
        else:
            out[k] = v
    return out


def downsample(y: torch.Tensor, scales) -> list[torch.Tensor]:
    from .losses import downsample_targets

    return downsample_targets(y, scales)


# ----------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model (plans)")
    g.add_argument("--plans", type=Path, help="plans.json to train with (otherwise built from the options below)")
    g.add_argument("--patch-size", type=int, nargs=3, default=(48, 64, 64), metavar=("Z", "Y", "X"))
    g.add_argument("--spacing", type=float, nargs=3, default=(2.0, 1.25, 1.25), metavar=("Z", "Y", "X"))
    g.add_argument("--features", type=int, nargs="+", default=(8, 16, 32, 64, 80))
    g.add_argument("--blocks", type=int, nargs="+", help="residual blocks per encoder stage")
    g.add_argument("--resampling", choices=("torch", "scipy"), default="torch")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--cases", type=Path, action="append", default=[],
                   help="JSON list of {dataset, image, labels[, name]} (repeatable)")
    g.add_argument("--val-cases", type=Path, action="append", default=[], help="validation case list(s)")
    g.add_argument("--phantoms", type=int, default=0, help="add this many phantom cases (LesionLocatorLib.synthetic.phantom)")
    g.add_argument("--val-phantoms", type=int, default=0, help="phantom cases for validation (other seeds)")
    g.add_argument("--cache", type=Path, help="preprocessed-case cache (default OUTPUT/preprocessed)")


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", type=Path, required=True, help="model folder to write")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50, help="iterations per epoch")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (torchrun picks the GPU per rank)")
    parser.add_argument("--resume", action="store_true", help="continue from fold_K/checkpoint_latest.pth")
    parser.add_argument("--threads", type=int, help="torch CPU threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--prompt", choices=("point", "box", "mask", "mixed"), default="point")
    parser.add_argument("--init", help="pretrained checkpoint (file or model folder): body loaded, stem+head new")
    parser.add_argument("--val-samples", type=int, default=8)
    parser.add_argument("--max-offset", type=float, default=0.15, help="random patch offset, fraction of patch")
    parser.add_argument("--scale", type=float, nargs=2, default=(1.0, 1.0), metavar=("MIN", "MAX"),
                        help="zoom augmentation: read patch*s voxels (s in [MIN, MAX]) resized to the patch")
    parser.add_argument("--augment-prob", type=float, default=0.0,
                        help="probability of the batchgeneratorsv2 augmentation per sample")
    parser.add_argument("--weighting", choices=("uniform", "sqrt"), default="uniform",
                        help="dataset weights: uniform over images, or 1/sqrt(dataset size)")
    parser.add_argument("--min-lesion-voxels", type=int, default=0,
                        help="do not sample lesions smaller than this on the model grid")
    parser.add_argument("--fp16-weights", action="store_true", help="store final weights as float16")


def plans_from_args(args: argparse.Namespace) -> dict:
    if args.plans:
        try:
            plans = json.loads(Path(args.plans).read_text())
            resolve_configuration(plans)
        except (OSError, json.JSONDecodeError, PlansError) as exc:
            raise TrainError(f"cannot use plans {args.plans}: {exc}") from exc
        return plans
    f = list(args.features)
    blocks = list(args.blocks) if args.blocks else None
    if blocks is not None and len(blocks) != len(f):
        raise TrainError(f"--blocks needs {len(f)} values (one per stage), got {len(blocks)}")
    div = 2 ** (len(f) - 1)
    if any(p % div for p in args.patch_size):
        raise TrainError(f"--patch-size {tuple(args.patch_size)} must be divisible by {div} for {len(f)} stages")
    return make_plans(tuple(args.patch_size), tuple(args.spacing), f, blocks, args.resampling)


def load_cases(args: argparse.Namespace, config, cache: Path, val: bool = False) -> list[D.Case]:
    lists = args.val_cases if val else args.cases
    cases: list[D.Case] = []
    for lp in lists:
        cases += D.load_case_files(D.read_case_list(lp), config, cache)
    n = args.val_phantoms if val else args.phantoms
    if n:
        cases += D.phantom_cases(n, config, cache, seed=args.seed + (100003 if val else 0),
                                 dataset="phantom_val" if val else "phantom")
    return cases


def run_training(name: str, args: argparse.Namespace, build: Callable[[argparse.Namespace, Any], Any]) -> int:
    """The command-line driver every trainer shares: threads, process group, resume, run, clean errors.

    ``build(args, info)`` returns the trainer for this rank.
    """
    info = None
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        info = init_distributed(args.device)
        trainer = build(args, info)
        if args.resume and trainer.try_resume() and info.is_main:
            print(f"resumed at epoch {trainer.start_epoch}", flush=True)
        final = trainer.run()
        if final is not None:
            print(f"final checkpoint: {final}")
        return 0
    except (ValueError, OSError, CheckpointError) as exc:
        print(f"train {name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if info is not None:
            cleanup(info)


def _build(args: argparse.Namespace, info) -> "SegmentTrainer":
    plans = plans_from_args(args)
    cfg = SegmentConfig(output=args.output, plans=plans, prompt=args.prompt, fold=args.fold, epochs=args.epochs,
                        iters_per_epoch=args.iters, val_samples=args.val_samples, batch_size=args.batch_size,
                        lr=args.lr, seed=args.seed, init=args.init, device=str(info.device),
                        max_offset=args.max_offset, scale_range=tuple(args.scale),
                        augment_prob=args.augment_prob, weighting=args.weighting,
                        min_lesion_voxels=args.min_lesion_voxels,
                        fp16_weights=args.fp16_weights)
    config = config_from_dicts(plans, make_dataset_json())
    cache = args.cache or (Path(args.output) / "preprocessed")
    train_cases = load_cases(args, config, cache)
    if not train_cases:
        raise TrainError("no training data: give --cases and/or --phantoms")
    val_cases = load_cases(args, config, cache, val=True)
    return SegmentTrainer(cfg, train_cases, val_cases, info)


def run(args: argparse.Namespace) -> int:
    return run_training("segment", args, _build)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train segment", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
