"""LesionLocatorModel: the weights and how to run them, shared by every session, tracker and server request.

The Segment Anything split: this object owns the networks (point, box and track models, loaded lazily, every
fold), the device, the folds and TTA defaults and the out-of-memory fallback; per-image state lives in
sessions (``segment.session.SegmentSession``) and the tracker (``track.tracker.LesionTracker``). A CUDA
out-of-memory error moves *every* loaded network to the CPU and changes ``device`` here, so every user of
the model sees the fallback at once.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import devices
from .checkpoint import (CheckpointError, available_folds, load_checkpoint, load_weights_strict, mirror_axes_of,
                         resolve_model_dir, select_folds)
from .network import build_network, set_inference_mode
from .plans import ModelConfig, load_model_config

log = logging.getLogger(__name__)

KINDS = ("point", "box", "track")
TRACK_UNET_PREFIX = "unet."
TRACK_REG_PREFIX = "reg_net."
TRACK_PARTS = (TRACK_UNET_PREFIX, TRACK_REG_PREFIX, "unet_patch_size")
REGISTRATION_SIZE_KEY = "registration_input_size"  # optional plans key of small Track models (default 175^3)
Folds = Union[None, int, str, Sequence[int]]


class InferenceError(RuntimeError):
    """Inference failed (e.g. out of GPU memory without CPU fallback)."""


@dataclass
class PromptModel:
    """The UNets of one model folder (point, box or the Track UNet), one per fold, on one device."""

    kind: str
    model_dir: Path
    config: ModelConfig
    folds: List[int]
    networks: List[torch.nn.Module]
    mirror_axes: Tuple[int, ...]

    @classmethod
    def load(cls, model_dir: Path, kind: str, folds: Folds, device: torch.device) -> "PromptModel":
        """Load every selected fold. The Track checkpoint holds the UNet under ``unet.`` beside the
        registration network (``reg_net.``); any other key is an error."""
        fold_ids = select_folds(model_dir, folds)
        nets, axes, config = [], None, None
        for f in fold_ids:
            ckpt = load_checkpoint(model_dir, f)
            axes = mirror_axes_of(ckpt)
            if config is None:
                config = load_model_config(model_dir, axes)
            weights = ckpt["network_weights"]
            if kind == "track":
                foreign = [k for k in weights if not k.startswith(TRACK_PARTS)]
                if foreign:
                    raise CheckpointError(f"{ckpt['_path']} holds keys that belong to no part of a track model "
                                          f"(e.g. {foreign[:3]}): not a LesionLocator track checkpoint")
                n = len(TRACK_UNET_PREFIX)
                weights = {k[n:]: v for k, v in weights.items() if k.startswith(TRACK_UNET_PREFIX)}
                if not weights:
                    raise CheckpointError(f"{ckpt['_path']} has no '{TRACK_UNET_PREFIX}*' weights")
            net = build_network(config, config.image_channels + 1)
            load_weights_strict(net, weights, ckpt["_path"])
            nets.append(set_inference_mode(net).to(device))
            del ckpt
        assert config is not None
        return cls(kind, Path(model_dir), config, fold_ids, nets, tuple(axes or ()))


def find_model_dirs(checkpoint: Union[str, os.PathLike, None]) -> Dict[str, Path]:
    """{kind: model folder} for every model the checkpoint package holds (None: the bundled model)."""
    if checkpoint is None:
        from .bundled import default_checkpoint

        checkpoint = default_checkpoint()
    dirs: Dict[str, Path] = {}
    errors = []
    for kind in KINDS:
        try:
            dirs[kind] = resolve_model_dir(checkpoint, kind)
        except CheckpointError as exc:
            errors.append(str(exc))
    if not Path(checkpoint).expanduser().exists():
        raise CheckpointError(f"checkpoint not found: {checkpoint}")
    if not dirs:
        raise CheckpointError(errors[0] if errors else f"no LesionLocator model under {checkpoint}")
    # a single model folder resolves for every kind: keep it only for the kinds its layout fits
    if len({p for p in dirs.values()}) == 1 and len(dirs) > 1:
        only = next(iter(dirs.values()))
        dirs = {_kind_of_folder(only): only}
    return dirs


def _kind_of_folder(folder: Path) -> str:
    parts = [p.lower() for p in folder.parts]
    if any("track" in p for p in parts[-2:]):
        return "track"
    if any("bbox" in p or "box" in p for p in parts[-2:]):
        return "box"
    return "point"


class LesionLocatorModel:
    """Weights, device, folds, TTA and the out-of-memory fallback (one per process, shared)."""

    def __init__(self, checkpoint: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "auto",
                 folds: Folds = None, tta: bool = False, compile: bool = False, cpu_fallback: bool = True,
                 num_threads: Optional[int] = None, model_dirs: Optional[Dict[str, Path]] = None,
                 grow: bool = True):
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.model_dirs = dict(model_dirs) if model_dirs else find_model_dirs(checkpoint)
        unknown = set(self.model_dirs) - set(KINDS)
        if unknown:
            raise CheckpointError(f"unknown model kind(s) {sorted(unknown)}; use {KINDS}")
        self._device = devices.resolve_device(device)
        devices.configure(self._device)
        self.folds = folds
        self.tta = bool(tta)
        self.compile = compile
        self.cpu_fallback = cpu_fallback
        self.grow = bool(grow)  # continue a lesion's prediction past its patch (False: published single patch)
        if num_threads:
            torch.set_num_threads(num_threads)
        for kind, d in self.model_dirs.items():  # a missing fold fails now, not on the first click
            select_folds(d, folds)
        self._models: Dict[str, PromptModel] = {}
        self._reg_nets: Dict[int, torch.nn.Module] = {}
        self._lock = threading.RLock()
        self.network_passes = 0  # forward passes run (folds x TTA mirrors per tile): the server's work meter

    # -- what it holds -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def kinds(self) -> List[str]:
        return [k for k in KINDS if k in self.model_dirs]

    def has(self, kind: str) -> bool:
        return kind in self.model_dirs

    def prompt_model(self, kind: str) -> PromptModel:
        """The UNets of ``kind`` ('point', 'box' or 'track'), loaded on first use."""
        with self._lock:
            if kind not in self._models:
                if kind not in self.model_dirs:
                    raise CheckpointError(f"the checkpoint has no {kind} model; available: {self.kinds}")
                t0 = time.perf_counter()
                m = PromptModel.load(self.model_dirs[kind], kind, self.folds, self._device)
                if self.compile and self._device.type == "cuda":
                    m.networks = [torch.compile(n) for n in m.networks]
                self._models[kind] = m
                log.info("loaded %s model (%d fold(s)) from %s in %.1f s", kind, len(m.folds), m.model_dir,
                         time.perf_counter() - t0)
            return self._models[kind]

    def config(self, kind: str) -> ModelConfig:
        return self.prompt_model(kind).config

    def fold_ids(self, kind: str, folds: Folds = None) -> List[int]:
        """The folds a request runs: the model's own selection, or a subset of the folds on disk."""
        if kind not in self.model_dirs:
            raise CheckpointError(f"the checkpoint has no {kind} model; available: {self.kinds}")
        return select_folds(self.model_dirs[kind], self.folds if folds is None else folds)

    def registration_net(self, fold: int) -> torch.nn.Module:
        """The uniGradICON network of one Track fold (each fold registers with its own weights)."""
        with self._lock:
            if fold not in self._reg_nets:
                from .registration_net import build_registration_network, load_registration_weights

                if "track" not in self.model_dirs:
                    raise CheckpointError("learned propagation needs the LesionLocatorTrack model")
                conf = self.config("track").plans["configurations"]["3d_fullres"]
                size = tuple(int(s) for s in conf.get(REGISTRATION_SIZE_KEY, (175, 175, 175)))
                ckpt = load_checkpoint(self.model_dirs["track"], fold)
                net = build_registration_network((1, 1, *size))
                try:
                    load_registration_weights(net, ckpt["network_weights"], TRACK_REG_PREFIX)
                except ValueError as exc:
                    raise CheckpointError(f"{ckpt['_path']}: {exc}") from exc
                self._reg_nets[fold] = net.to(self._device).eval()
            return self._reg_nets[fold]

    def settings(self) -> Dict[str, Any]:
        """What a client needs to reproduce this model's masks (the server reports it)."""
        return {"checkpoint": self.checkpoint or "bundled", "kinds": self.kinds, "device": str(self._device),
                "folds": {k: available_folds(d) for k, d in self.model_dirs.items()},
                "default_folds": self.folds if not isinstance(self.folds, tuple) else list(self.folds),
                "tta": self.tta, "grow": self.grow}

    # -- running -----------------------------------------------------------------------------
    def forward(self, kind: str, x: torch.Tensor, tta: Optional[bool] = None, folds: Folds = None) -> torch.Tensor:
        """Logits (C, Z, Y, X) of one tile ``x`` (channels, Z, Y, X): mean over folds and, with TTA, over the
        checkpoint's mirroring axes. A CUDA out-of-memory error falls back to the CPU for everyone."""
        try:
            return self._forward(kind, x, tta, folds)
        except RuntimeError as exc:
            if self._device.type != "cuda" or not devices.is_oom(exc):
                raise
            torch.cuda.empty_cache()
            if not self.cpu_fallback:
                raise InferenceError("the GPU ran out of memory for this patch; close other GPU programs, use "
                                     "fewer folds / no TTA, or run on the CPU (--device cpu)") from exc
            self.fall_back_to_cpu()
            return self._forward(kind, x.to(self._device), tta, folds)

    def fall_back_to_cpu(self) -> None:
        """Move every loaded network to the CPU; every session and tracker sees the new device."""
        with self._lock:
            log.warning("CUDA out of memory: falling back to the CPU for the rest of this process")
            self._device = torch.device("cpu")
            for m in self._models.values():
                m.networks = [n.to(self._device) for n in m.networks]
            for f, n in list(self._reg_nets.items()):
                self._reg_nets[f] = n.to(self._device)

    def _forward(self, kind: str, x_region: torch.Tensor, tta: Optional[bool], folds: Folds) -> torch.Tensor:
        model = self.prompt_model(kind)
        wanted = model.folds if folds is None else self.fold_ids(kind, folds)
        missing = [f for f in wanted if f not in model.folds]
        if missing:
            raise CheckpointError(f"fold(s) {missing} of the {kind} model are not loaded (loaded: {model.folds}); "
                                  "open the model with folds='all' to choose folds per request")
        nets = [model.networks[model.folds.index(f)] for f in wanted]
        x = x_region[None].to(self._device)
        axes = model.mirror_axes if (self.tta if tta is None else tta) else ()
        combos = [c for k in range(1, len(axes) + 1) for c in itertools.combinations([a + 2 for a in axes], k)]
        total = None
        self.network_passes += len(nets) * (len(combos) + 1)
        with torch.inference_mode(), devices.autocast(self._device):
            for net in nets:
                pred = net(x).float()
                for c in combos:
                    pred += torch.flip(net(torch.flip(x, c)), c).float()
                pred /= len(combos) + 1
                total = pred if total is None else total + pred
            assert total is not None
            total /= len(nets)
            return total[0]

    def warmup(self, kind: str = "point") -> None:
        """One forward pass at the patch size (CUDA kernels / cuDNN autotuning happen here, not on click 1)."""
        cfg = self.config(kind)
        self.forward(kind, torch.zeros((cfg.image_channels + 1, *cfg.patch_size), device=self._device), tta=False)
        if self._device.type == "cuda":
            torch.cuda.synchronize()

    # -- what runs on it -----------------------------------------------------------------------
    def session(self, tta: Optional[bool] = None, folds: Folds = None, grow: Optional[bool] = None):
        """A per-image segmentation session over this model (None: the model's own settings)."""
        from ..segment.session import SegmentSession

        return SegmentSession(self, tta=tta, folds=folds, grow=grow)

    def tracker(self, propagation: Optional[str] = None, refine: Optional[str] = None, tta: Optional[bool] = None,
                folds: Folds = None, classical_options: Optional[dict] = None):
        """The one place a tracker is built: learned propagation + Track UNet when the checkpoint has
        LesionLocatorTrack, classical registration + the segmentation model otherwise."""
        from ..track.tracker import LesionTracker

        return LesionTracker(self, propagation=propagation, refine=refine, tta=tta, folds=folds,
                             classical_options=classical_options)
