"""One code path for one CPU, one GPU or several GPUs (``torchrun``).

``init_process_group`` is called only when ``WORLD_SIZE`` > 1 (torchrun sets it): backend ``nccl`` on GPUs,
``gloo`` on CPU. Each rank draws its own samples from a seeded stream (see ``train.data.rank_rng``), gradients
are averaged by DDP, only rank 0 writes files.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from LesionLocatorLib.model.devices import resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_ddp(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str = "auto") -> DistInfo:
    """Read torchrun's environment; start the process group when there is more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    dev = resolve_device(device)
    if dev.type == "cuda":
        if world > 1:
            dev = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistInfo(rank, world, local, dev)


def wrap_model(model: torch.nn.Module, info: DistInfo) -> torch.nn.Module:
    if not info.is_ddp:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [info.device.index] if info.device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def all_reduce_mean(values: list[float], info: DistInfo) -> list[float]:
    """Average floats over ranks (identity in a single process)."""
    if not info.is_ddp:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / info.world_size).tolist()


def all_reduce_sum(values: list[float], info: DistInfo) -> list[float]:
    if not info.is_ddp:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def average_gradients(model: torch.nn.Module, info: DistInfo) -> None:
    """All-reduce (mean) every gradient: DDP's effect for models whose parts are called separately."""
    if not info.is_ddp:
        return
    for p in model.parameters():
        if p.requires_grad:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= info.world_size


def barrier(info: DistInfo) -> None:
    if info.is_ddp:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.is_ddp and dist.is_initialized():
        dist.destroy_process_group()


def autocast(device: torch.device):
    """fp16 autocast on CUDA only (never bf16 on CPU: it is ~300x slower there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
