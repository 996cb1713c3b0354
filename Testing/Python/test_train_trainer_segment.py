"""train.trainer_segment: a tiny configuration overfits one sample, writes the published layout, resumes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from LesionLocatorLib.synthetic.phantom import lesion_prompts, make_phantom
from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans
from LesionLocatorLib.model.engine import LesionLocatorModel
from train import data as D
from train.trainer_segment import (LATEST, LOG_NAME, PLOT_NAME, SegmentConfig, SegmentTrainer, TrainError,
                                   init_from_pretrained, read_log)

PLANS = make_plans((32, 32, 32), (2.0, 2.0, 2.0), (2, 4, 8))


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    config = config_from_dicts(PLANS, make_dataset_json())
    return D.phantom_cases(2, config, cache, seed=1, shape=(40, 64, 64), spacing=(2.5, 2.0, 2.0))


def _cfg(out, **kw):
    base = dict(output=out, plans=PLANS, prompt="point", epochs=2, iters_per_epoch=2, val_samples=2,
                batch_size=1, lr=1e-2, seed=0, device="cpu")
    base.update(kw)
    return SegmentConfig(**base)


def test_overfits_one_sample(cases, tmp_path):
    tr = SegmentTrainer(_cfg(tmp_path / "m"), cases[:1])
    tr.model.train()
    losses = [tr.train_step(np.random.default_rng(123))["train_loss"] for _ in range(20)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-3:]) < losses[0] - 0.3, losses


def test_run_writes_published_layout_loadable_and_resumes(cases, tmp_path):
    out = tmp_path / "LesionLocatorSeg" / "point_optimized"
    tr = SegmentTrainer(_cfg(out, fp16_weights=True), cases[:1], cases[1:])
    final = tr.run()
    assert final == out / "fold_0" / "checkpoint_final.pth"
    for name in ("plans.json", "dataset.json"):
        assert (out / name).is_file()
    for name in (LATEST, LOG_NAME, PLOT_NAME):
        assert (out / "fold_0" / name).is_file()
    recs = read_log(out / "fold_0" / LOG_NAME)
    assert [r["epoch"] for r in recs] == [0, 1]
    assert all("train_loss" in r and "val_dice" in r for r in recs)
    ck = torch.load(final, map_location="cpu", weights_only=False)
    assert ck["trainer_name"] == "LesionLocatorTrainerSegment"
    assert all(v.dtype == torch.float16 for v in ck["network_weights"].values() if v.is_floating_point())
    latest = torch.load(out / "fold_0" / LATEST, map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 2 and latest["optimizer_state"]["state"]

    # the library loads it unchanged (fp16-stored weights become float) and segments
    model = LesionLocatorModel(tmp_path, device="cpu")
    assert next(model.prompt_model("point").networks[0].parameters()).dtype == torch.float32
    seg = model.session()
    ct, lab = make_phantom((40, 64, 64), (2.5, 2.0, 2.0), n_lesions=1, seed=9)
    seg.set_image(ct)
    res = seg.segment(points={1: lesion_prompts(lab)[1]["point"]})
    assert res.lesions[1].mask.ndim == 3

    # resume: a new trainer with more epochs continues at epoch 2 with the saved optimizer state
    tr2 = SegmentTrainer(_cfg(out, epochs=3), cases[:1], cases[1:])
    assert tr2.try_resume() and tr2.start_epoch == 2
    sd_saved = latest["network_weights"]
    assert all(torch.equal(tr2.model.state_dict()[k], sd_saved[k]) for k in sd_saved)
    tr2.run()
    assert [r["epoch"] for r in read_log(out / "fold_0" / LOG_NAME)] == [0, 1, 2]
    assert torch.load(out / "fold_0" / LATEST, map_location="cpu", weights_only=False)["current_epoch"] == 3


def test_init_from_pretrained_reinitialises_stem_and_head(cases, tmp_path):
    src = SegmentTrainer(_cfg(tmp_path / "a", seed=1), cases[:1])
    path = tmp_path / "pre.pth"
    torch.save({"network_weights": src.model.state_dict()}, path)
    dst = SegmentTrainer(_cfg(tmp_path / "b", seed=2), cases[:1])
    before = {k: v.clone() for k, v in dst.model.state_dict().items()}
    info = init_from_pretrained(dst.model, path)
    after = dst.model.state_dict()
    assert info["reinitialised"] > 0
    for k, v in after.items():
        if k.startswith(("encoder.stem.", "decoder.encoder.stem.", "decoder.seg_layers.")):
            assert torch.equal(v, before[k])
        elif v.is_floating_point():
            assert torch.equal(v, src.model.state_dict()[k])
    bad = {k: v for k, v in src.model.state_dict().items() if "stages.1" not in k}
    torch.save({"network_weights": bad}, path)
    with pytest.raises(TrainError):
        init_from_pretrained(dst.model, path)
    with pytest.raises(TrainError):
        init_from_pretrained(dst.model, tmp_path / "missing.pth")


def test_bad_options(cases, tmp_path):
    with pytest.raises(TrainError):
        SegmentTrainer(_cfg(tmp_path / "x", prompt="scribble"), cases[:1])


def test_half_weights_keep_shared_tensors_shared(cases, tmp_path):
    from train.trainer_segment import half_weights

    tr = SegmentTrainer(_cfg(tmp_path / "h"), cases[:1])
    sd = tr.model.state_dict()
    shared = "encoder.stem.convs.0.conv.weight"
    assert sd[shared].data_ptr() == sd["decoder." + shared].data_ptr()
    h = half_weights(sd)
    assert h[shared].dtype == torch.float16
    assert h[shared].data_ptr() == h["decoder." + shared].data_ptr()
