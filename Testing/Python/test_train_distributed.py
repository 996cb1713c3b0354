"""train.distributed: one process without a process group; two CPU ranks (gloo) train in lockstep."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from train import distributed as dist_mod


def test_single_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = dist_mod.init_distributed("cpu")
    assert not info.is_ddp and info.is_main and info.device.type == "cpu"
    assert not torch.distributed.is_initialized()
    assert dist_mod.all_reduce_mean([1.0, 3.0], info) == [1.0, 3.0]
    net = torch.nn.Linear(2, 2)
    assert dist_mod.wrap_model(net, info) is net
    # CPU: no autocast, a disabled GradScaler
    assert not dist_mod.grad_scaler(info.device).is_enabled()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from pathlib import Path

    from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans
    from train import data as D
    from train.trainer_segment import SegmentConfig, SegmentTrainer

    info = dist_mod.init_distributed("cpu")
    assert info.is_ddp and info.world_size == world
    plans = make_plans((32, 32, 32), (2.0, 2.0, 2.0), (2, 4, 8))
    config = config_from_dicts(plans, make_dataset_json())
    cases = D.phantom_cases(1, config, Path(out_dir) / f"cache{rank}", seed=1, shape=(40, 64, 64),
                            spacing=(2.5, 2.0, 2.0))
    cfg = SegmentConfig(output=Path(out_dir) / "model", plans=plans, epochs=1, iters_per_epoch=2, val_samples=1,
                        batch_size=1, device="cpu")
    tr = SegmentTrainer(cfg, cases, cases, info)
    tr.run()
    flat = torch.cat([p.detach().flatten() for p in tr.model.parameters()])
    torch.save(flat, Path(out_dir) / f"params{rank}.pt")
    dist_mod.cleanup(info)


def test_two_cpu_ranks_stay_in_sync(tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed not available")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    p0, p1 = torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt")
    assert torch.equal(p0, p1)  # gradients were averaged: identical weights on both ranks
    assert (tmp_path / "model" / "fold_0" / "checkpoint_final.pth").is_file()  # written by rank 0
    lines = (tmp_path / "model" / "fold_0" / "training_log.jsonl").read_text().splitlines()
    assert len(lines) == 1
