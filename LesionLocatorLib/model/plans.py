"""Model configuration read from nnU-Net v2 ``plans.json`` / ``dataset.json`` (published layout).

Everything that defines the published behaviour (spacing, patch size, CT statistics, resampling,
architecture) comes from these files; nothing here is a hidden constant.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

CONFIGURATION = "3d_fullres"
RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"


class PlansError(ValueError):
    """plans.json / dataset.json is missing, malformed or describes something unsupported."""


@dataclass(frozen=True)
class CTStats:
    lower: float  # percentile_00_5
    upper: float  # percentile_99_5
    mean: float
    std: float


@dataclass(frozen=True)
class ResamplingSpec:
    """Which nnU-Net resampling family the plans ask for ('torch' or 'scipy') and its options."""

    kind: str
    force_separate_z: bool | None = None
    anisotropy_threshold: float = 3.0
    order_data: int = 3
    order_seg: int = 1
    order_z: int = 0


@dataclass
class ModelConfig:
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    ct_stats: CTStats
    resampling_data: ResamplingSpec
    resampling_seg: ResamplingSpec
    resampling_prob: ResamplingSpec
    arch_class: str
    arch_kwargs: dict[str, Any]
    image_channels: int = 1
    labels: dict[str, int] = field(default_factory=lambda: {"background": 0, "lesion": 1})
    mirror_axes: tuple[int, ...] = (0, 1, 2)
    plans: dict[str, Any] = field(default_factory=dict, repr=False)
    source: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.labels)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PlansError(f"missing file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PlansError(f"{path} is not valid JSON: {exc}") from exc


def _resampling_spec(fn_name: str, kwargs: dict[str, Any], is_seg: bool) -> ResamplingSpec:
    if fn_name in ("resample_torch_fornnunet", "resample_torch_simple"):
        return ResamplingSpec(kind="torch", force_separate_z=kwargs.get("force_separate_z", None),
                              anisotropy_threshold=float(kwargs.get("separate_z_anisotropy_threshold", 3.0)))
    if fn_name == "resample_data_or_seg_to_shape":
        return ResamplingSpec(
            kind="scipy",
            force_separate_z=kwargs.get("force_separate_z", None),
            anisotropy_threshold=float(kwargs.get("separate_z_anisotropy_threshold", 3.0)),
            order_data=int(kwargs.get("order", 1 if is_seg else 3)),
            order_seg=int(kwargs.get("order", 1)),
            order_z=int(kwargs.get("order_z", 0)),
        )
    raise PlansError(f"unsupported resampling function in plans: {fn_name!r}")


def resolve_configuration(plans: dict[str, Any], name: str = CONFIGURATION) -> dict[str, Any]:
    """A configuration with nnU-Net's ``inherits_from`` chain applied (e.g. '3d_fullres_bs3')."""
    confs = plans.get("configurations", {})
    if name not in confs:
        raise PlansError(f"plans have no configuration {name!r} (available: {sorted(confs)})")
    conf = dict(confs[name])
    seen = {name}
    while "inherits_from" in conf:
        parent = conf.pop("inherits_from")
        if parent in seen or parent not in confs:
            raise PlansError(f"configuration {name!r} inherits from unknown or cyclic {parent!r}")
        seen.add(parent)
        conf = {**confs[parent], **conf}
    return conf


def config_from_dicts(plans: dict[str, Any], dataset: dict[str, Any], source: str = "",
                      mirror_axes: Sequence[int] = (0, 1, 2), configuration: str = CONFIGURATION) -> ModelConfig:
    try:
        conf = resolve_configuration(plans, configuration)
        arch = conf["architecture"]
        stats = plans["foreground_intensity_properties_per_channel"]["0"]
        schemes = conf["normalization_schemes"]
    except (KeyError, TypeError) as exc:
        raise PlansError(f"plans {source or ''} lack the field {exc} of a {CONFIGURATION} nnU-Net v2 plan") from exc
    if list(schemes) != ["CTNormalization"]:
        raise PlansError(f"only CTNormalization is supported, plans ask for {schemes}")
    if list(plans.get("transpose_forward", [0, 1, 2])) != [0, 1, 2]:
        raise PlansError("plans with a non-identity transpose_forward are not supported")
    channels = dataset.get("channel_names", dataset.get("modality", {"0": "CT"}))
    labels = {str(k): int(v) for k, v in dataset.get("labels", {"background": 0, "lesion": 1}).items()}
    return ModelConfig(
        patch_size=tuple(int(p) for p in conf["patch_size"]),  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in conf["spacing"]),  # type: ignore[arg-type]
        ct_stats=CTStats(float(stats["percentile_00_5"]), float(stats["percentile_99_5"]),
                         float(stats["mean"]), float(stats["std"])),
        resampling_data=_resampling_spec(conf["resampling_fn_data"], conf.get("resampling_fn_data_kwargs", {}), False),
        resampling_seg=_resampling_spec(conf["resampling_fn_seg"], conf.get("resampling_fn_seg_kwargs", {}), True),
        resampling_prob=_resampling_spec(conf["resampling_fn_probabilities"],
                                         conf.get("resampling_fn_probabilities_kwargs", {}), False),
        arch_class=arch["network_class_name"],
        arch_kwargs=dict(arch["arch_kwargs"]),
        image_channels=len(channels),
        labels=labels,
        mirror_axes=tuple(int(a) for a in mirror_axes),
        plans=plans,
        source=source,
    )


def load_model_config(model_dir: str | Path, mirror_axes: Sequence[int] = (0, 1, 2),
                      configuration: str = CONFIGURATION) -> ModelConfig:
    model_dir = Path(model_dir)
    return config_from_dicts(_read_json(model_dir / "plans.json"), _read_json(model_dir / "dataset.json"),
                             str(model_dir), mirror_axes, configuration)


def make_plans(
    patch_size: Sequence[int] = (160, 224, 224),
    spacing: Sequence[float] = (1.0, 0.8, 0.8),
    features_per_stage: Sequence[int] = (32, 64, 128, 256, 320, 320),
    n_blocks_per_stage: Sequence[int] | None = None,
    resampling: str = "torch",
    ct_stats: CTStats = CTStats(-918.0, 723.0, -63.00682013436269, 282.3602283405916),
    dataset_name: str = "LesionLocatorSeg",
) -> dict[str, Any]:
    """Plans in the published layout (ResEnc UNet, CT normalisation) for tiny test models or new trainings.

    Defaults reproduce the published ResEnc-L configuration.
    """
    n = len(features_per_stage)
    if n_blocks_per_stage is None:
        n_blocks_per_stage = [1, 3, 4, 6, 6, 6, 6, 6][:n]
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (n - 1)
    if resampling == "torch":
        fn = "resample_torch_fornnunet"
        data_kw = {"is_seg": False, "memefficient_seg_resampling": True, "force_separate_z": False}
        seg_kw = {"is_seg": True, "memefficient_seg_resampling": True, "force_separate_z": False}
    elif resampling == "scipy":
        fn = "resample_data_or_seg_to_shape"
        data_kw = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
        seg_kw = {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None}
    else:
        raise PlansError(f"resampling must be 'torch' or 'scipy', got {resampling!r}")
    return {
        "dataset_name": dataset_name,
        "plans_name": "nnUNetResEncUNetLPlans",
        "original_median_spacing_after_transp": list(spacing),
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            CONFIGURATION: {
                "data_identifier": "nnUNetPlans_3d_fullres",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2,
                "patch_size": [int(p) for p in patch_size],
                "spacing": [float(s) for s in spacing],
                "normalization_schemes": ["CTNormalization"],
                "use_mask_for_norm": [False],
                "resampling_fn_data": fn,
                "resampling_fn_seg": fn,
                "resampling_fn_data_kwargs": data_kw,
                "resampling_fn_seg_kwargs": seg_kw,
                "resampling_fn_probabilities": fn,
                "resampling_fn_probabilities_kwargs": dict(data_kw),
                "architecture": {
                    "network_class_name": RESENC_CLASS,
                    "arch_kwargs": {
                        "n_stages": n,
                        "features_per_stage": [int(f) for f in features_per_stage],
                        "conv_op": "torch.nn.modules.conv.Conv3d",
                        "kernel_sizes": [[3, 3, 3]] * n,
                        "strides": strides,
                        "n_blocks_per_stage": [int(b) for b in n_blocks_per_stage],
                        "n_conv_per_stage_decoder": [1] * (n - 1),
                        "conv_bias": True,
                        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                        "dropout_op": None,
                        "dropout_op_kwargs": None,
                        "nonlin": "torch.nn.LeakyReLU",
                        "nonlin_kwargs": {"inplace": True},
                    },
                    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
                },
                "batch_dice": True,
            }
        },
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 3071.0, "mean": ct_stats.mean, "median": ct_stats.mean, "min": -1024.0,
                  "percentile_00_5": ct_stats.lower, "percentile_99_5": ct_stats.upper, "std": ct_stats.std}
        },
    }


def make_dataset_json() -> dict[str, Any]:
    return {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lesion": 1}, "numTraining": 0,
            "file_ending": ".nii.gz"}
