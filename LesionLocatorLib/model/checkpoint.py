"""Finding and loading checkpoints in the published LesionLocator layout.

Accepted locations (the user chooses; nothing is ever downloaded):
- ``LesionLocatorModel.zip`` (extracted once next to the zip, into ``<zip stem>_extracted/``),
- a folder containing ``LesionLocatorCheckpoint/``, the ``LesionLocatorCheckpoint`` folder itself,
- one model folder (``.../point_optimized``, ``.../bbox_optimized``, ``.../LesionLocatorTrack``).
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterable, List, Sequence, Union

import torch

from ..core.files import atomic_write, atomic_write_text

MODEL_SUBDIRS = {
    "point": ("LesionLocatorSeg", "point_optimized"),
    "box": ("LesionLocatorSeg", "bbox_optimized"),
    "track": ("LesionLocatorTrack",),
}
CHECKPOINT_NAME = "checkpoint_final.pth"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit its plans."""


def _is_model_dir(path: Path) -> bool:
    return (path / "plans.json").is_file() and (path / "dataset.json").is_file()


def _extract_zip(zip_path: Path) -> Path:
    target = zip_path.with_name(zip_path.stem + "_extracted")
    marker = target / ".complete"
    if marker.is_file():
        return target
    try:
        with zipfile.ZipFile(zip_path) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise CheckpointError(f"{zip_path} is corrupt (bad member {bad}); download it again")
            for name in zf.namelist():  # refuse path traversal
                if name.startswith("/") or ".." in Path(name).parts:
                    raise CheckpointError(f"{zip_path} holds an unsafe path {name!r}")
            tmp = Path(tempfile.mkdtemp(prefix=".extract_", dir=zip_path.parent))
            zf.extractall(tmp)
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{zip_path} is not a valid zip file: {exc}") from exc
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    marker.touch()
    return target


def resolve_model_dir(path: str | os.PathLike, kind: str) -> Path:
    """The model folder for ``kind`` ('point', 'box' or 'track') inside whatever the user pointed at."""
    if kind not in MODEL_SUBDIRS:
        raise CheckpointError(f"unknown model kind {kind!r}; use one of {sorted(MODEL_SUBDIRS)}")
    root = Path(path).expanduser()
    if not root.exists():
        raise CheckpointError(f"checkpoint not found: {root}")
    if root.is_file():
        if root.suffix.lower() != ".zip":
            raise CheckpointError(f"{root} is neither a folder nor a .zip checkpoint package")
        root = _extract_zip(root)
    if _is_model_dir(root):
        return root
    sub = MODEL_SUBDIRS[kind]
    for base in (root, root / "LesionLocatorCheckpoint"):
        candidate = base.joinpath(*sub)
        if _is_model_dir(candidate):
            return candidate
    raise CheckpointError(
        f"no {kind} model under {Path(path)}: expected LesionLocatorCheckpoint/{'/'.join(sub)}/"
        "{plans.json,dataset.json,fold_K/checkpoint_final.pth}"
    )


def available_folds(model_dir: str | os.PathLike) -> list[int]:
    folds = []
    for child in Path(model_dir).iterdir():
        m = re.fullmatch(r"fold_(\d+)", child.name)
        if m and (child / CHECKPOINT_NAME).is_file():
            folds.append(int(m.group(1)))
    return sorted(folds)


def parse_folds(text: str) -> Union[str, List[int]]:
    """'all' or comma-separated fold numbers ('0,1') -> 'all' or [0, 1]: the one folds parser."""
    text = str(text).strip()
    if text == "all":
        return "all"
    try:
        folds = [int(f) for f in text.split(",") if f.strip()]
    except ValueError:
        folds = []
    if not folds or any(f < 0 for f in folds):
        raise ValueError(f"folds must be 'all' or comma-separated fold numbers such as '0,1', got {text!r}")
    return folds


def select_folds(model_dir: str | os.PathLike, folds: int | str | Sequence[int] | None) -> list[int]:
    """``None`` -> the lowest available fold (interactive default); 'all' -> every fold present."""
    present = available_folds(model_dir)
    if not present:
        raise CheckpointError(f"no fold_K/{CHECKPOINT_NAME} found in {model_dir}")
    if folds is None:
        return present[:1]
    if isinstance(folds, str):
        folds = parse_folds(folds)
        if folds == "all":
            return present
    if isinstance(folds, int):
        folds = [folds]
    wanted = [int(f) for f in folds]
    missing = [f for f in wanted if f not in present]
    if missing:
        raise CheckpointError(
            f"fold(s) {missing} missing: {Path(model_dir) / f'fold_{missing[0]}' / CHECKPOINT_NAME} "
            f"does not exist (available folds: {present})"
        )
    return wanted


def load_checkpoint(model_dir: str | os.PathLike, fold: int) -> dict[str, Any]:
    """The checkpoint dict of one fold, loaded on CPU; clear errors naming the file."""
    path = Path(model_dir) / f"fold_{fold}" / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path} (truncated or corrupt?): {exc}") from exc
    if not isinstance(ckpt, dict) or "network_weights" not in ckpt:
        raise CheckpointError(f"{path} is not a LesionLocator/nnU-Net checkpoint (no 'network_weights')")
    ckpt["_path"] = str(path)
    return ckpt


def load_weights_strict(net: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with an error message that names the file and the first mismatches."""
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape_bad = [f"{k}: file {tuple(state_dict[k].shape)} vs plans {tuple(own[k].shape)}"
                 for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape_bad:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shape_bad:
            parts.append(f"{len(shape_bad)} shape mismatches (e.g. {shape_bad[:2]})")
        raise CheckpointError(f"weights in {source} do not fit the plans' network: " + "; ".join(parts))
    net.load_state_dict(state_dict, strict=True)


def mirror_axes_of(ckpt: dict[str, Any]) -> tuple[int, ...]:
    axes = ckpt.get("inference_allowed_mirroring_axes", (0, 1, 2))
    return tuple(int(a) for a in axes) if axes is not None else ()


def write_checkpoint(model_dir: str | os.PathLike, plans: dict[str, Any], dataset: dict[str, Any], fold: int,
                     network_weights: dict[str, torch.Tensor], trainer_name: str = "LesionLocatorTrainerSegment",
                     mirror_axes: Iterable[int] | None = (0, 1, 2), extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint in the published layout (what the published code and this library load)."""
    model_dir = Path(model_dir)
    (model_dir / f"fold_{fold}").mkdir(parents=True, exist_ok=True)
    for name, content in (("plans.json", plans), ("dataset.json", dataset)):
        atomic_write_text(model_dir / name, json.dumps(content, indent=2))
    ckpt = {
        "network_weights": {k: v.detach().cpu() for k, v in network_weights.items()},
        "optimizer_state": None,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 0,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": fold, "dataset_json": dataset,
                      "device": "cpu"},
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": tuple(mirror_axes) if mirror_axes is not None else None,
    }
    if extra:
        ckpt.update(extra)
    return atomic_write(model_dir / f"fold_{fold}" / CHECKPOINT_NAME, lambda tmp: torch.save(ckpt, tmp))
