"""train.pretrain: 1/sqrt(dataset size) sampling, a tiny run whose body initialises the segmentation trainer."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from LesionLocatorLib.plans import config_from_dicts, make_dataset_json, make_plans
from train import data as D
from train.pretrain import PretrainConfig, PretrainTrainer
from train.trainer_segment import SegmentConfig, SegmentTrainer, init_from_pretrained

PLANS = make_plans((32, 32, 32), (2.0, 2.0, 2.0), (2, 4, 8))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = config_from_dicts(PLANS, make_dataset_json())
    small = D.phantom_cases(1, config, cache, seed=1, shape=(40, 64, 64), spacing=(2.5, 2.0, 2.0), dataset="small")
    big = D.phantom_cases(4, config, cache, seed=2, shape=(40, 64, 64), spacing=(2.5, 2.0, 2.0), dataset="big")
    return small + big


def test_dataset_sampling_is_inverse_sqrt(cases, tmp_path):
    tr = PretrainTrainer(PretrainConfig(output=tmp_path / "p", plans=PLANS, device="cpu"), cases)
    probs = dict(zip(tr.sampler.names, tr.sampler.probs))
    # sizes 1 and 4 -> weights 1 and 1/2 -> 2/3 and 1/3
    assert probs["small"] == pytest.approx(2 / 3) and probs["big"] == pytest.approx(1 / 3)
    assert tr.model.encoder.stem.convs[0].conv.in_channels == 1  # image only


def test_random_patch_oversamples_foreground(cases):
    rng = np.random.default_rng(0)
    fg = [D.random_patch(cases[0], (32, 32, 32), rng, foreground_prob=1.0)[1].any() for _ in range(5)]
    assert all(fg)
    img, tgt = D.random_patch(cases[0], (32, 32, 32), rng, foreground_prob=0.0)
    assert img.shape == (1, 32, 32, 32) and tgt.shape == (32, 32, 32)


def test_pretrain_learns_and_initialises_finetuning(cases, tmp_path):
    cfg = PretrainConfig(output=tmp_path / "pre", plans=PLANS, epochs=1, iters_per_epoch=2, batch_size=1,
                         device="cpu", foreground_prob=1.0)
    tr = PretrainTrainer(cfg, cases)
    tr.model.train()
    losses = [tr.train_step(np.random.default_rng(4))["train_loss"] for _ in range(15)]
    assert np.mean(losses[-3:]) < 0.75 * losses[0], losses
    final = tr.run()
    ck = torch.load(final, map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "LesionLocatorPretrainer" and ck["input_channels"] == 1
    seg = SegmentTrainer(SegmentConfig(output=tmp_path / "seg", plans=PLANS, device="cpu", batch_size=1,
                                       init=str(tmp_path / "pre")), cases)
    body = "encoder.stages.1.blocks.0.conv1.conv.weight"
    assert torch.equal(seg.model.state_dict()[body], ck["network_weights"][body])
    assert seg.model.encoder.stem.convs[0].conv.in_channels == 2
    assert init_from_pretrained(seg.model, final)["reinitialised"] > 0
