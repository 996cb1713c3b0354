"""Device choice and the precision policy (fp16 autocast on CUDA only: bf16 on CPU is ~300x slower)."""
from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger(__name__)


class DeviceError(RuntimeError):
    """The requested device is not available."""


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but no CUDA GPU is available to this torch "
                              f"({torch.__version__}); use --device cpu (slow) or a LesionLocator server with a GPU")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps' requested but Apple MPS is not available")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def autocast(device: torch.device):
    """fp16 autocast on CUDA; nothing elsewhere (never bf16 on CPU)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def configure(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
