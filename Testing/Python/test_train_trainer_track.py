"""train.trainer_track: joint GradICON + UNet training on synthetic pairs, published Track checkpoint layout."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LesionLocatorLib.model.checkpoint import load_weights_strict, write_checkpoint
from LesionLocatorLib.model.network import build_network
from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans
from LesionLocatorLib.model.registration_net import build_registration_network, load_registration_weights
from train.trainer_track import (REG_SIZE_KEY, TrackConfig, TrackTrainer, load_track_network, phantom_pairs,
                                 registration_input_size, track_plans)

SEG_PLANS = make_plans((32, 32, 32), (2.0, 2.0, 2.0), (2, 4, 8))
PLANS = track_plans(SEG_PLANS, (65, 65, 65))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = config_from_dicts(PLANS, make_dataset_json())
    return phantom_pairs(1, 2, config, cache, seed=3, shape=(40, 64, 64), spacing=(2.5, 2.0, 2.0))


@pytest.fixture(scope="module")
def seg_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("seg") / "point_optimized"
    torch.manual_seed(7)
    net = build_network(config_from_dicts(SEG_PLANS, make_dataset_json()), 2, deep_supervision=True)
    write_checkpoint(d, SEG_PLANS, make_dataset_json(), 0, net.state_dict())
    return d, net.state_dict()


def test_registration_size_field():
    assert PLANS["configurations"]["3d_fullres"][REG_SIZE_KEY] == [65, 65, 65]
    assert registration_input_size(PLANS) == (65, 65, 65)
    assert registration_input_size(SEG_PLANS) == (175, 175, 175)  # published default when absent


def test_joint_training_writes_track_checkpoint(pairs, seg_model, tmp_path):
    seg_dir, seg_sd = seg_model
    out = tmp_path / "LesionLocatorTrack"
    cfg = TrackConfig(output=out, plans=PLANS, epochs=1, iters_per_epoch=2, val_samples=1, seed=0,
                      init_seg=str(seg_dir), device="cpu", reg_lr=1e-3)
    tr = TrackTrainer(cfg, pairs[:1], pairs[1:])
    # UNet initialised from the segmentation checkpoint
    assert all(torch.equal(tr.model.unet.state_dict()[k], v) for k, v in seg_sd.items())
    reg_before = {k: v.clone() for k, v in tr.model.reg_net.state_dict().items()}
    final = tr.run()
    assert final == out / "fold_0" / "checkpoint_final.pth"
    rec = json.loads((out / "fold_0" / "training_log.jsonl").read_text().splitlines()[0])
    for key in ("train_loss", "train_seg_loss", "train_reg_loss", "train_similarity", "val_dice"):
        assert np.isfinite(rec[key]), key
    changed = [k for k, v in tr.model.reg_net.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, reg_before[k])]
    assert changed, "the registration network did not learn"

    ck = torch.load(final, map_location="cpu", weights_only=False)
    w = ck["network_weights"]
    assert ck["trainer_name"] == "LesionLocatorTrainerTrack"
    assert {k.split(".")[0] for k in w} == {"reg_net", "unet", "unet_patch_size"}
    assert w["unet_patch_size"].tolist() == [32, 32, 32]
    assert sum(k.startswith("reg_net.regis_net.") for k in w) == 188
    saved_plans = json.loads((out / "plans.json").read_text())
    assert saved_plans["configurations"]["3d_fullres"][REG_SIZE_KEY] == [65, 65, 65]
    # the parts load into the library's own builders
    reg = load_registration_weights(build_registration_network((1, 1, 65, 65, 65)), w)
    assert reg is not None
    unet = build_network(config_from_dicts(saved_plans, make_dataset_json()), 2)
    load_weights_strict(unet, {k[5:]: v for k, v in w.items() if k.startswith("unet.")}, str(final))
    net = load_track_network(out)
    assert not net.unet.decoder.deep_supervision

    # the library's tracker loads the trained checkpoint unchanged and tracks a mask prompt
    from LesionLocatorLib.synthetic.phantom import make_phantom
    from LesionLocatorLib.model.engine import LesionLocatorModel
    from train.synthesize import synthesize_pair

    ct, lab = make_phantom((40, 64, 64), (2.5, 2.0, 2.0), n_lesions=1, seed=11)
    fu, _, _ = synthesize_pair(ct, lab, 3, augment=False)
    tracker = LesionLocatorModel(tmp_path, device="cpu").tracker()
    assert (tracker.propagation, tracker.refine) == ("learned", "unet")
    tracker.set_images(ct, [fu])
    results = tracker.track(lab.array.astype(np.int32)).followups
    assert len(results) == 1 and set(results[0].lesions) == {1}


def test_frozen_registration_segmentation_loss_decreases(pairs, tmp_path):
    cfg = TrackConfig(output=tmp_path / "t", plans=PLANS, epochs=1, iters_per_epoch=1, seed=0, device="cpu",
                      train_registration=False)
    tr = TrackTrainer(cfg, pairs[:1])
    tr.model.train()
    losses = [tr.train_step(np.random.default_rng(5))["train_seg_loss"] for _ in range(10)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-2:]) < losses[0] - 0.2, losses
    assert all(not p.requires_grad for p in tr.model.reg_net.parameters())
