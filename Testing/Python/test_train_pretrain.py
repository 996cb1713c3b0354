"""train.pretrain: 1/sqrt(dataset size) sampling, MultiTalent per-dataset heads (own cases and nnU-Net v2 datasets),
the single-head mode, and a tiny run whose body initialises the segmentation trainer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans
from train import data as D
from train.pretrain import PretrainConfig, PretrainTrainer, main
from train.trainer_segment import SegmentConfig, SegmentTrainer, init_from_pretrained

PLANS = make_plans((32, 32, 32), (2.0, 2.0, 2.0), (2, 4, 8))
BODY = "encoder.stages.1.blocks.0.conv1.conv.weight"


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = config_from_dicts(PLANS, make_dataset_json())
    small = D.phantom_cases(1, config, cache, seed=1, shape=(40, 64, 64), spacing=(2.5, 2.0, 2.0), dataset="small")
    big = D.phantom_cases(4, config, cache, seed=2, shape=(40, 64, 64), spacing=(2.5, 2.0, 2.0), dataset="big")
    return small + big


@pytest.fixture(scope="module")
def nnunet_organs(tmp_path_factory):
    """A 2-case phantom dataset (lung, liver, lesion) preprocessed by nnU-Net v2 (its API, one process)."""
    pytest.importorskip("nnunetv2")
    from train import nnunet_data as N

    root = tmp_path_factory.mktemp("nnunet")
    N.write_phantom_raw_dataset(root / "raw", 921, "Organs", n_cases=2, shape=(32, 48, 48), spacing=(2.5, 2.0, 2.0),
                                seed=7, kind="organs")
    folder, _ = N.plan_and_preprocess(921, root / "raw", root / "pre", intensity_samples=20000)
    return folder


def test_dataset_sampling_is_inverse_sqrt_with_one_head_per_dataset(cases, tmp_path):
    tr = PretrainTrainer(PretrainConfig(output=tmp_path / "p", plans=PLANS, device="cpu"), cases)
    probs = dict(zip(tr.sampler.names, tr.sampler.probs))
    # sizes 1 and 4 -> weights 1 and 1/2 -> 2/3 and 1/3
    assert probs["small"] == pytest.approx(2 / 3) and probs["big"] == pytest.approx(1 / 3)
    assert tr.model.encoder.stem.convs[0].conv.in_channels == 1  # image only
    # MultiTalent: each case-list dataset has one class ("lesion") and its own output channel
    assert [(h["dataset"], h["channels"]) for h in tr.heads] == [("big", [0]), ("small", [1])]
    assert tr.model.decoder.seg_layers[0].out_channels == 2


def test_random_patch_oversamples_foreground(cases):
    rng = np.random.default_rng(0)
    fg = [D.random_patch(cases[0], (32, 32, 32), rng, foreground_prob=1.0)[1].any() for _ in range(5)]
    assert all(fg)
    img, tgt = D.random_patch(cases[0], (32, 32, 32), rng, foreground_prob=0.0)
    assert img.shape == (1, 32, 32, 32) and tgt.shape == (32, 32, 32)


def test_single_head_pretrain_learns_and_initialises_finetuning(cases, tmp_path):
    cfg = PretrainConfig(output=tmp_path / "pre", plans=PLANS, epochs=1, iters_per_epoch=2, batch_size=1,
                         device="cpu", foreground_prob=1.0, single_head=True)
    tr = PretrainTrainer(cfg, cases)
    assert tr.model.decoder.seg_layers[0].out_channels == 2  # foreground vs background, softmax
    tr.model.train()
    losses = [tr.train_step(np.random.default_rng(4))["train_loss"] for _ in range(15)]
    assert np.mean(losses[-3:]) < 0.75 * losses[0], losses
    final = tr.run()
    ck = torch.load(final, map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "LesionLocatorPretrainer" and ck["input_channels"] == 1
    assert ck["pretraining_heads"]["single_head"] is True
    seg = SegmentTrainer(SegmentConfig(output=tmp_path / "seg", plans=PLANS, device="cpu", batch_size=1,
                                       init=str(tmp_path / "pre")), cases)
    assert torch.equal(seg.model.state_dict()[BODY], ck["network_weights"][BODY])
    assert seg.model.encoder.stem.convs[0].conv.in_channels == 2
    assert init_from_pretrained(seg.model, final)["reinitialised"] > 0


def test_multitalent_heads_on_nnunet_and_own_data(cases, nnunet_organs, tmp_path):
    from train.nnunet_data import NnunetPretrainDataset

    nn_ds = NnunetPretrainDataset(nnunet_organs)
    cfg = PretrainConfig(output=tmp_path / "mt", plans=PLANS, epochs=1, iters_per_epoch=2, batch_size=2,
                         device="cpu", foreground_prob=1.0)
    tr = PretrainTrainer(cfg, [nn_ds] + list(cases))
    # 1/sqrt sampling over three datasets of 2 (nnU-Net), 4 and 1 images
    w = {"Dataset921_Organs": 2 ** -0.5, "big": 0.5, "small": 1.0}
    probs = dict(zip(tr.sampler.names, tr.sampler.probs))
    assert probs == pytest.approx({k: v / sum(w.values()) for k, v in w.items()})
    layout = {h["dataset"]: {c["name"]: c["channel"] for c in h["classes"]} for h in tr.heads}
    assert layout == {"Dataset921_Organs": {"lung": 0, "liver": 1, "lesion": 2}, "big": {"lesion": 3},
                      "small": {"lesion": 4}}
    assert tr.model.decoder.seg_layers[0].out_channels == 5

    # a fixed batch that holds samples of two datasets: the loss is finite and falls
    x, y, ds = tr.batch(np.random.default_rng(11))
    assert len(set(ds.tolist())) == 2 and x.shape == (2, 1, 32, 32, 32)
    tr.model.train()
    losses = []
    for _ in range(12):
        loss = tr.compute_loss(x, y, ds)
        tr.optimizer_step(loss)
        losses.append(float(loss.detach()))
    assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < losses[0] - 0.03, losses

    final = tr.run()
    ck = torch.load(final, map_location="cpu", weights_only=False)
    heads = json.loads((tmp_path / "mt" / "pretraining_heads.json").read_text(encoding="utf-8"))
    assert heads == ck["pretraining_heads"] and heads["num_outputs"] == 5 and heads["activation"] == "sigmoid"
    assert heads["datasets"][0]["source"] == "nnunet" and heads["datasets"][0]["channels"] == [0, 1, 2]
    assert ck["network_weights"]["decoder.seg_layers.0.weight"].shape[0] == 5
    # fine-tuning starts from the body; the 5-channel head is skipped for the fresh 2-channel one
    seg = SegmentTrainer(SegmentConfig(output=tmp_path / "seg", plans=PLANS, device="cpu", batch_size=1,
                                       init=str(tmp_path / "mt")), cases)
    assert torch.equal(seg.model.state_dict()[BODY], ck["network_weights"][BODY])
    assert seg.model.decoder.seg_layers[0].out_channels == 2


def test_cli_pretrains_on_an_nnunet_dataset(nnunet_organs, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["-o", str(out), "--nnunet-dataset", str(nnunet_organs), "--patch-size", "32", "32", "32",
               "--spacing", "2.5", "2", "2", "--features", "2", "4", "8", "--epochs", "1", "--iters", "1",
               "--batch-size", "1", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "Dataset921_Organs" in text and (out / "fold_0" / "checkpoint_final.pth").is_file()
    assert json.loads((out / "dataset.json").read_text(encoding="utf-8"))["pretraining_heads"]["num_outputs"] == 3


def test_cli_reports_missing_data(tmp_path, capsys):
    assert main(["-o", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "no pretraining data" in capsys.readouterr().err
    assert main(["-o", str(tmp_path / "x"), "--device", "cpu", "--nnunet-dataset", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "nnUNetPlans.json is missing" in err or "needs the nnunetv2 package" in err
