"""Build the segmentation network exactly as the plans describe it (dynamic-network-architectures)."""
from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from .plans import ModelConfig, PlansError

_ALLOWED_CLASSES = {
    "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
}
_IMPORTABLE_PREFIXES = ("torch.nn.",)


def _import_dotted(path: str) -> Any:
    # plans name classes by dotted path; only torch.nn classes are accepted so a plans file cannot import arbitrary code
    if not path.startswith(_IMPORTABLE_PREFIXES):
        raise PlansError(f"plans name a class outside torch.nn: {path!r}")
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise PlansError(f"cannot import {path!r} named in the plans") from exc


def build_network(config: ModelConfig, input_channels: int, num_classes: int | None = None,
                  deep_supervision: bool = False) -> nn.Module:
    """The plans' UNet with ``input_channels`` inputs (image channels + prompt channels)."""
    if config.arch_class not in _ALLOWED_CLASSES:
        raise PlansError(f"unsupported network class {config.arch_class!r}")
    module, _, name = config.arch_class.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    kwargs = dict(config.arch_kwargs)
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):  # the plans' `_kw_requires_import` fields
        if isinstance(kwargs.get(key), str):
            kwargs[key] = _import_dotted(kwargs[key])
    return cls(input_channels=input_channels, num_classes=num_classes or config.num_classes,
               deep_supervision=deep_supervision, **kwargs)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def set_inference_mode(net: nn.Module) -> nn.Module:
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


__all__ = ["build_network", "count_parameters", "set_inference_mode", "torch"]
