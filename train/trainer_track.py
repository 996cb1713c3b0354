"""Joint training of prompt propagation (uniGradICON registration) and follow-up segmentation
(LesionLocatorTrainerTrack).

    python -m train synthesize --phantoms 8 -o PAIRS --pairs-per-case 2           # synthetic pairs (optional)
    python -m train track -o OUT/LesionLocatorTrack --init-seg SEG_MODEL_DIR --pairs PAIRS \
        [--phantoms 4 --pairs-per-case 2] [--init-reg TRACK_OR_UNIGRADICON_WEIGHTS] --epochs E --iters I

Per iteration, on one baseline/follow-up pair and one lesion present in both (geometry as the published
tracker, section 3 of the reference): both preprocessed scans (CT normalisation, plans spacing) are z-aligned
(``propagation.z_align``) and resized to the registration grid; the GradICON loss (LNCC both directions + 1.5 x
gradient inverse consistency, icon_registration's ``GradientICONSparse`` forward) is computed and phi_AB warps
the baseline lesion mask (nearest neighbour, zero outside) onto the follow-up; the UNet's patch is centred on a
*random* voxel of the propagated prompt (published training; inference uses its centre) and trained on
[follow-up patch, warped prompt patch] against the follow-up lesion with nnU-Net's deep-supervision loss.
Loss = registration loss x ``reg_weight`` + segmentation loss. The warp is nearest neighbour, so the
segmentation loss does not reach the registration network (as published); it learns from its own loss.

Checkpoint (published layout): ``OUT/{plans.json, dataset.json, fold_K/checkpoint_final.pth}`` whose
``network_weights`` hold ``reg_net.*`` (uniGradICON keys), ``unet.*`` and the buffer ``unet_patch_size``.
The registration grid is ``configurations.3d_fullres.registration_input_size`` in plans.json
(absent = the published 175^3).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from LesionLocatorLib.model.checkpoint import load_weights_strict, write_checkpoint
from LesionLocatorLib.model.network import build_network
from LesionLocatorLib.model.plans import CONFIGURATION, PlansError, config_from_dicts, make_dataset_json
from LesionLocatorLib.track.propagation import resize_nearest_exact, resize_trilinear, z_align
from LesionLocatorLib.model.registration_net import (REGISTRATION_SHAPE, build_registration_network,
                                               load_registration_weights, warp_with_icon_map)

from . import data as D
from .distributed import DistInfo, all_reduce_sum, autocast, average_gradients
from .losses import build_segmentation_loss, downsample_targets, gradicon_loss, make_sgd
from .trainer_segment import (BaseTrainer, TrainError, _jsonable, _read_weights, add_common_arguments,
                              plans_from_args, add_model_arguments, run_training)

REG_SIZE_KEY = "registration_input_size"
TRACK_TRAINER = "LesionLocatorTrainerTrack"


def registration_input_size(plans: dict) -> tuple[int, int, int]:
    """The registration grid of a Track plans file (``configurations.3d_fullres.registration_input_size``)."""
    size = plans.get("configurations", {}).get(CONFIGURATION, {}).get(REG_SIZE_KEY)
    if size is None:
        return REGISTRATION_SHAPE
    if len(size) != 3:
        raise PlansError(f"{REG_SIZE_KEY} must have three sizes, got {size}")
    return tuple(int(s) for s in size)  # type: ignore[return-value]


def track_plans(seg_plans: dict, reg_size: Sequence[int]) -> dict:
    plans = json.loads(json.dumps(seg_plans))
    plans["dataset_name"] = "LesionLocatorTrack"
    plans["configurations"][CONFIGURATION][REG_SIZE_KEY] = [int(s) for s in reg_size]
    return plans


class TrackNetwork(nn.Module):
    """The published tracking network container: ``reg_net`` (uniGradICON), ``unet`` (plans' ResEnc UNet with
    follow-up image + warped prompt inputs) and the buffer ``unet_patch_size``."""

    def __init__(self, plans: dict, deep_supervision: bool = True):
        super().__init__()
        config = config_from_dicts(plans, make_dataset_json())
        self.reg_net = build_registration_network((1, 1) + registration_input_size(plans))
        self.unet = build_network(config, config.image_channels + 1, deep_supervision=deep_supervision)
        self.register_buffer("unet_patch_size", torch.tensor(config.patch_size, dtype=torch.int64))


@dataclass
class Pair:
    name: str
    baseline: D.Case
    followup: D.Case
    lesions: list[int] = field(default_factory=list)  # ids present in both


def make_pairs(baselines: Sequence[D.Case], followups: Sequence[D.Case]) -> list[Pair]:
    out = []
    for b, f in zip(baselines, followups):
        common = sorted(set(b.lesions) & set(f.lesions))
        if common:
            out.append(Pair(f"{b.name}->{f.name}", b, f, common))
    return out


def load_manifest_pairs(pairs_dir: Path, config, cache: Path) -> list[Pair]:
    """Pairs written by ``python -m train synthesize`` (``manifest.json``), preprocessed and cached."""
    man_p = pairs_dir / "manifest.json"
    if not man_p.is_file():
        raise TrainError(f"no manifest.json in {pairs_dir} (write pairs with `python -m train synthesize`)")
    man = json.loads(man_p.read_text())
    bs, fs = [], []
    for p in man.get("pairs", []):
        entries = [{"dataset": "pairs", "name": f"{p['id']}_baseline", "image": pairs_dir / p["baseline"],
                    "labels": pairs_dir / p["baseline_labels"]},
                   {"dataset": "pairs", "name": f"{p['id']}_followup", "image": pairs_dir / p["followup"],
                    "labels": pairs_dir / p["followup_labels"]}]
        b, f = D.load_case_files(entries, config, cache)
        bs.append(b)
        fs.append(f)
    return make_pairs(bs, fs)


def phantom_pairs(n: int, per_case: int, config, cache: Path, seed: int = 0,
                  shape: Sequence[int] = (64, 128, 128), spacing: Sequence[float] = (2.0, 1.5, 1.5)) -> list[Pair]:
    """Phantom baselines with synthetic follow-ups (``train.synthesize.synthesize_pair``), cached."""
    from LesionLocatorLib.synthetic.phantom import make_phantom
    from .synthesize import synthesize_pair

    bs, fs = [], []
    for i in range(n):
        s = int(np.random.SeedSequence([seed, i, 5151]).generate_state(1)[0])
        ct, lab = make_phantom(shape, spacing, n_lesions=3, seed=s)
        b = D.cache_case(f"trk_{i:04d}_b", "track_phantom", ct, lab, config, cache, f"trk:{s}:{shape}:{spacing}")
        for k in range(per_case):
            ps = int(np.random.SeedSequence([s, k]).generate_state(1)[0])
            key = f"trkf:{s}:{ps}:{shape}:{spacing}"
            stem = f"track_phantom__trk_{i:04d}_f{k}"
            d = cache / D._config_key(config)
            if (d / f"{stem}.json").is_file() and json.loads((d / f"{stem}.json").read_text()).get("source_key") == key:
                f = D.load_cached(d, stem)
            else:
                fol, fol_lab, _ = synthesize_pair(ct, lab, ps)
                f = D.cache_case(f"trk_{i:04d}_f{k}", "track_phantom", fol, fol_lab, config, cache, key)
            bs.append(b)
            fs.append(f)
    return make_pairs(bs, fs)


@dataclass
class TrackConfig:
    output: Path
    plans: dict  # Track plans (with registration_input_size)
    fold: int = 0
    epochs: int = 10
    iters_per_epoch: int = 20
    val_samples: int = 4
    lr: float = 1e-2  # UNet (SGD, nnU-Net)
    reg_lr: float = 5e-5  # registration (Adam, as GradICON fine-tuning)
    reg_weight: float = 1.0
    train_registration: bool = True
    weight_decay: float = 3e-5
    seed: int = 0
    init_seg: str | None = None
    init_reg: str | None = None
    device: str = "auto"
    grad_clip: float = 12.0
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    trainer_name: str = TRACK_TRAINER


class TrackTrainer(BaseTrainer):
    wrap_ddp = False
    log_keys = ("train_loss", "train_seg_loss", "train_reg_loss", "val_seg_loss")

    def __init__(self, cfg: TrackConfig, train_pairs: Sequence[Pair], val_pairs: Sequence[Pair] = (),
                 info: DistInfo | None = None):
        self.config = config_from_dicts(cfg.plans, make_dataset_json())
        self.reg_size = registration_input_size(cfg.plans)
        self.patch = tuple(self.config.patch_size)
        super().__init__(cfg, info)
        # BaseTrainer made one SGD over everything; the UNet gets nnU-Net's SGD, the registration Adam
        self.optimizer = make_sgd(self.model.unet.parameters(), cfg.lr, cfg.weight_decay)
        self.reg_optimizer = torch.optim.Adam(self.model.reg_net.parameters(), lr=cfg.reg_lr)
        if not cfg.train_registration:
            self.model.reg_net.requires_grad_(False)
        self.loss, self.ds_scales = build_segmentation_loss(self.config.arch_kwargs["strides"], self.info.is_ddp)
        self.pairs = [p for p in train_pairs if p.lesions]
        if not self.pairs:
            raise TrainError("no training pair has a lesion present in both scans")
        self.val_pairs = [p for p in val_pairs if p.lesions][: max(cfg.val_samples, 0)]
        if cfg.init_seg:
            w = _read_weights(cfg.init_seg)
            w = {k[len("unet."):]: v for k, v in w.items() if k.startswith("unet.")} or w
            load_weights_strict(self.model.unet, w, str(cfg.init_seg))
        if cfg.init_reg:
            self._load_reg(cfg.init_reg)

    def build_model(self) -> nn.Module:
        return TrackNetwork(self.cfg.plans)

    def _load_reg(self, path: str) -> None:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise TrainError(f"cannot read registration weights {path}: {exc}") from exc
        weights = ckpt.get("network_weights", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(weights, dict):
            raise TrainError(f"{path} holds no state dict")
        if any(k.startswith("reg_net.") for k in weights):
            load_registration_weights(self.model.reg_net, weights)
        else:  # a bare uniGradICON state dict ("regis_net.*")
            load_registration_weights(self.model.reg_net, {f"reg_net.{k}": v for k, v in weights.items()})
        self.model.reg_net.train()

    # -- one pair ------------------------------------------------------------------------------------
    def _register(self, pair: Pair, lesion: int, train_reg: bool):
        """(reg loss or None, warped prompt on the follow-up grid (uint8))."""
        b_img, f_img = np.asarray(pair.baseline.image), np.asarray(pair.followup.image)
        za = z_align(b_img, f_img)
        b = np.array(b_img[za.baseline_z[0]:za.baseline_z[1]], dtype=np.float32)  # copies: the cache is read-only
        f = np.array(f_img[za.followup_z[0]:za.followup_z[1]], dtype=np.float32)
        prompt = (np.asarray(pair.baseline.labels)[za.baseline_z[0]:za.baseline_z[1]] == lesion).astype(np.float32)
        b_r = resize_trilinear(b, self.reg_size, self.device)
        f_r = resize_trilinear(f, self.reg_size, self.device)
        p_r = torch.from_numpy(resize_nearest_exact(prompt, self.reg_size)).to(self.device)[None, None]
        reg = self.model.reg_net
        loss = None
        if train_reg:
            reg.train()
            with autocast(self.device):
                loss = gradicon_loss(reg, b_r, f_r)
            phi = reg.phi_AB_vectorfield.detach().float()
        else:
            reg.eval()
            with torch.no_grad(), autocast(self.device):
                reg.identity_map.isIdentity = True
                phi = reg.regis_net(b_r, f_r)(reg.identity_map).float()
        warped = warp_with_icon_map(p_r, phi, spline_order=0, zero_boundary=True)[0, 0].detach().cpu().numpy()
        out = np.zeros(f_img.shape, dtype=np.uint8)
        out[za.followup_z[0]:za.followup_z[1]] = resize_nearest_exact(warped > 0.5, f.shape)
        return loss, out

    def _seg_sample(self, pair: Pair, lesion: int, warped: np.ndarray, rng: np.random.Generator | None):
        """UNet input/target around a random voxel of the propagated prompt (centre when ``rng`` is None)."""
        target = (np.asarray(pair.followup.labels) == lesion)
        pts = np.argwhere(warped)
        if len(pts) == 0:  # the prompt was lost: centre on the true lesion so the UNet still learns
            pts = np.argwhere(target)
        c = pts[int(rng.integers(len(pts)))] if rng is not None else np.round(pts.mean(0)).astype(int)
        p = np.asarray(self.patch)
        shape = np.asarray(warped.shape)
        start = np.clip(c - p // 2, 0, np.maximum(shape - p, 0))  # clamped into the image, padded if smaller
        img = D.crop_padded(np.asarray(pair.followup.image), start, p, 0.0)
        prm = D.crop_padded(warped, start, p, 0)
        tgt = D.crop_padded(target.astype(np.uint8), start, p, 0)
        x = torch.from_numpy(np.stack([img, prm.astype(np.float32)])[None]).to(self.device)
        y = torch.from_numpy(tgt[None, None].astype(np.int64)).to(self.device)
        return x, y

    def _seg_loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(self.device):
            out = net(x)
        return self.loss([o.float() for o in out], downsample_targets(y, self.ds_scales))

    def train_step(self, rng: np.random.Generator) -> dict[str, float]:
        pair = self.pairs[int(rng.integers(len(self.pairs)))]
        lesion = int(pair.lesions[int(rng.integers(len(pair.lesions)))])
        # the registration's Adam follows the UNet's poly schedule
        factor = self.optimizer.param_groups[0]["lr"] / self.cfg.lr
        for g in self.reg_optimizer.param_groups:
            g["lr"] = self.cfg.reg_lr * factor
        reg_loss, warped = self._register(pair, lesion, self.cfg.train_registration)
        x, y = self._seg_sample(pair, lesion, warped, rng)
        seg_loss = self._seg_loss(self.model.unet, x, y)
        total = seg_loss + (self.cfg.reg_weight * reg_loss.all_loss if reg_loss is not None else 0.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.reg_optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        average_gradients(self.model, self.info)  # DDP by hand: the two halves are called separately
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.unet.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        if reg_loss is not None:
            self.scaler.unscale_(self.reg_optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.reg_net.parameters(), self.cfg.grad_clip)
            self.scaler.step(self.reg_optimizer)
        self.scaler.update()
        out = {"train_loss": float(total.detach()), "train_seg_loss": float(seg_loss.detach())}
        if reg_loss is not None:
            out.update(train_reg_loss=float(reg_loss.all_loss.detach()),
                       train_similarity=float(reg_loss.similarity_loss.detach()),
                       train_inverse_consistency=float(reg_loss.inverse_consistency_loss.detach()))
        return out

    def validate(self) -> dict[str, float]:
        loss_sum = dice_sum = 0.0
        n = 0
        for i, pair in enumerate(self.val_pairs[self.info.rank::self.info.world_size]):
            lesion = pair.lesions[0]
            _, warped = self._register(pair, lesion, False)
            x, y = self._seg_sample(pair, lesion, warped, None)
            with autocast(self.device):
                out = self.model.unet(x)
            loss_sum += float(self.loss([o.float() for o in out], downsample_targets(y, self.ds_scales)))
            pred = out[0].argmax(1, keepdim=True)
            tp = float(((pred == 1) & (y == 1)).sum())
            den = float((pred == 1).sum() + (y == 1).sum())
            dice_sum += 2 * tp / den if den > 0 else 1.0
            n += 1
        tot = all_reduce_sum([loss_sum, dice_sum, float(n)], self.info)
        if tot[2] == 0:
            return {}
        return {"val_seg_loss": tot[0] / tot[2], "val_dice": tot[1] / tot[2]}

    def latest_state(self, next_epoch: int) -> dict[str, Any]:
        st = super().latest_state(next_epoch)
        st["reg_optimizer_state"] = self.reg_optimizer.state_dict()
        return st

    def try_resume(self) -> bool:
        ok = super().try_resume()
        if ok:
            ckpt = torch.load(self.fold_dir / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
            if ckpt.get("reg_optimizer_state"):
                self.reg_optimizer.load_state_dict(ckpt["reg_optimizer_state"])
        return ok

    def write_final(self) -> Path:
        return write_checkpoint(self.cfg.output, self.cfg.plans, make_dataset_json(), self.cfg.fold,
                                self.model.state_dict(), TRACK_TRAINER, self.cfg.mirror_axes,
                                extra={"current_epoch": self.cfg.epochs, "logging": self.records,
                                       "train_config": _jsonable(asdict(self.cfg))})


def load_track_network(model_dir: str | Path, fold: int = 0) -> TrackNetwork:
    """Rebuild a Track checkpoint written by this trainer (or the published one) for inference."""
    from LesionLocatorLib.model.checkpoint import load_checkpoint
    from LesionLocatorLib.model.plans import load_model_config

    model_dir = Path(model_dir)
    plans = json.loads((model_dir / "plans.json").read_text())
    load_model_config(model_dir)  # validates plans/dataset
    net = TrackNetwork(plans, deep_supervision=False)
    ckpt = load_checkpoint(model_dir, fold)
    load_weights_strict(net, {k: v.float() if v.is_floating_point() else v
                              for k, v in ckpt["network_weights"].items()}, ckpt["_path"])
    return net.eval()


# ----------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    add_model_arguments(parser)
    g = parser.add_argument_group("tracking")
    g.add_argument("--init-seg", help="segmentation model folder/checkpoint: UNet weights and (unless --plans) plans")
    g.add_argument("--init-reg", help="registration weights: a Track checkpoint (reg_net.*) or a uniGradICON "
                                      "state dict (regis_net.*)")
    g.add_argument("--registration-size", type=int, nargs=3, default=REGISTRATION_SHAPE, metavar=("Z", "Y", "X"),
                   help="registration grid (published 175^3; >= 65 per edge)")
    g.add_argument("--reg-lr", type=float, default=5e-5)
    g.add_argument("--reg-weight", type=float, default=1.0)
    g.add_argument("--freeze-registration", action="store_true", help="train the UNet only")
    g.add_argument("--pairs", type=Path, action="append", default=[], help="synthesize output folder(s)")
    g.add_argument("--phantoms", type=int, default=0, help="phantom baselines with synthetic follow-ups")
    g.add_argument("--pairs-per-case", type=int, default=1)
    g.add_argument("--val-phantoms", type=int, default=0)
    g.add_argument("--val-samples", type=int, default=4)
    g.add_argument("--cache", type=Path)


def _build(args: argparse.Namespace, info) -> "TrackTrainer":
    if args.init_seg and not args.plans and (Path(args.init_seg) / "plans.json").is_file():
        seg_plans = json.loads((Path(args.init_seg) / "plans.json").read_text())
    else:
        seg_plans = plans_from_args(args)
    plans = track_plans(seg_plans, args.registration_size)
    config = config_from_dicts(plans, make_dataset_json())
    cache = args.cache or (Path(args.output) / "preprocessed")
    pairs: list[Pair] = []
    for pd in args.pairs:
        pairs += load_manifest_pairs(pd, config, cache)
    if args.phantoms:
        pairs += phantom_pairs(args.phantoms, args.pairs_per_case, config, cache, args.seed)
    if not pairs:
        raise TrainError("no training pairs: give --pairs and/or --phantoms")
    val = phantom_pairs(args.val_phantoms, 1, config, cache, args.seed + 100003) if args.val_phantoms else []
    cfg = TrackConfig(output=args.output, plans=plans, fold=args.fold, epochs=args.epochs,
                      iters_per_epoch=args.iters, val_samples=args.val_samples, lr=args.lr, reg_lr=args.reg_lr,
                      reg_weight=args.reg_weight, train_registration=not args.freeze_registration,
                      seed=args.seed, init_seg=args.init_seg, init_reg=args.init_reg, device=str(info.device))
    trainer = TrackTrainer(cfg, pairs, val, info)
    return trainer


def run(args: argparse.Namespace) -> int:
    return run_training("track", args, _build)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train track", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
