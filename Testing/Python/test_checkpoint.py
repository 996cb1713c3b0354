"""Checkpoint discovery (zip, package, model folder) and clear errors for broken checkpoints."""
import json
import shutil
import zipfile

import pytest
import torch

from LesionLocatorLib.model.checkpoint import (CheckpointError, available_folds, load_checkpoint, resolve_model_dir,
                                         select_folds)
from LesionLocatorLib.model.network import build_network, count_parameters
from LesionLocatorLib.model.plans import PlansError, config_from_dicts, load_model_config, make_dataset_json, make_plans
from LesionLocatorLib.model.engine import LesionLocatorModel
from LesionLocatorLib.model.tiny_model import write_random_checkpoint


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("ck"), folds=(0, 1))


def test_published_resenc_l_architecture_from_plans():
    cfg = config_from_dicts(make_plans(), make_dataset_json())
    net = build_network(cfg, 2)
    assert count_parameters(net) == pytest.approx(102.4e6, rel=0.01)
    assert net.encoder.stem.convs[0].conv.in_channels == 2
    assert net.decoder.seg_layers[-1].out_channels == 2


def test_resolve_all_accepted_locations(package, tmp_path):
    point = resolve_model_dir(package, "point")
    assert point.name == "point_optimized"
    assert resolve_model_dir(package / "LesionLocatorCheckpoint", "box").name == "bbox_optimized"
    assert resolve_model_dir(point, "point") == point
    zpath = tmp_path / "LesionLocatorModel.zip"
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in (package / "LesionLocatorCheckpoint").rglob("*"):
            zf.write(f, f.relative_to(package))
    from_zip = resolve_model_dir(zpath, "box")
    assert from_zip.name == "bbox_optimized" and available_folds(from_zip) == [0, 1]
    assert resolve_model_dir(zpath, "box") == from_zip  # extracted once
    with pytest.raises(CheckpointError, match="no track model"):
        resolve_model_dir(package, "track")
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model_dir(tmp_path / "missing", "point")


def test_corrupt_zip(tmp_path):
    z = tmp_path / "LesionLocatorModel.zip"
    z.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(CheckpointError, match="zip"):
        resolve_model_dir(z, "point")


def test_fold_selection(package):
    d = resolve_model_dir(package, "point")
    assert select_folds(d, None) == [0]
    assert select_folds(d, "all") == [0, 1]
    assert select_folds(d, [1]) == [1]
    with pytest.raises(CheckpointError, match=r"fold_3.*checkpoint_final.pth"):
        select_folds(d, [3])


def test_truncated_checkpoint_names_the_file(package, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(resolve_model_dir(package, "point"), d)
    f = d / "fold_0" / "checkpoint_final.pth"
    f.write_bytes(f.read_bytes()[:500])
    with pytest.raises(CheckpointError, match=r"fold_0/checkpoint_final.pth"):
        load_checkpoint(d, 0)


def test_weights_that_do_not_fit_the_plans(package, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(resolve_model_dir(package, "point"), d)
    plans = json.loads((d / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][0] = 3
    (d / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match=r"checkpoint_final.pth do not fit.*shape"):
        LesionLocatorModel(d, device="cpu").prompt_model("point")


def test_foreign_checkpoint(package, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(resolve_model_dir(package, "point"), d)
    torch.save({"state_dict": {}}, d / "fold_0" / "checkpoint_final.pth")
    with pytest.raises(CheckpointError, match="network_weights"):
        load_checkpoint(d, 0)


def test_bad_plans(tmp_path):
    (tmp_path / "plans.json").write_text("{}")
    (tmp_path / "dataset.json").write_text("{}")
    with pytest.raises(PlansError, match="3d_fullres"):
        load_model_config(tmp_path)
    plans = make_plans()
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["nonlin"] = "os.system"
    with pytest.raises(PlansError, match="outside torch.nn"):
        build_network(config_from_dicts(plans, make_dataset_json()), 2)


def test_inherited_configuration():
    plans = make_plans(patch_size=(32, 32, 32))
    plans["configurations"]["3d_fullres_bs3"] = {"inherits_from": "3d_fullres", "batch_size": 3}
    cfg = config_from_dicts(plans, make_dataset_json(), configuration="3d_fullres_bs3")
    assert cfg.patch_size == (32, 32, 32)
