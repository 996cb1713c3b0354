"""The small default model bundled with the package (used when the user gives no checkpoint).

It is a tiny promptable ResEnc UNet trained by ``python -m train default-model`` (see
``default_model/MODEL_CARD.md`` for data, command and measured accuracy); it is far less accurate than
the published LesionLocator weights and meant for trying the tools without a download.
"""
from __future__ import annotations

from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"


class BundledModelMissing(FileNotFoundError):
    """The bundled default model is not installed (e.g. a source checkout without model files)."""


def default_checkpoint() -> Path:
    """The bundled ``LesionLocatorCheckpoint`` folder (point + box models), for ``LesionLocatorModel``."""
    root = DEFAULT_MODEL_DIR / "LesionLocatorCheckpoint"
    needed = [root / "LesionLocatorSeg" / sub / name
              for sub in ("point_optimized", "bbox_optimized")
              for name in ("plans.json", "dataset.json", "fold_0/checkpoint_final.pth")]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        raise BundledModelMissing(
            f"the bundled default model is not installed: {missing[0]} is missing. Give a checkpoint with -m "
            "(e.g. the published LesionLocatorModel.zip) or build the small model with "
            "`python -m train default-model --work DIR`.")
    return root


def model_card() -> Path:
    return DEFAULT_MODEL_DIR / "MODEL_CARD.md"
