"""train.nnunet_data: a tiny phantom dataset goes raw -> nnU-Net v2 fingerprint/plans/preprocessing (its Python API,
one process, in this process) -> nnU-Net's dataset class + nnUNetDataLoader patches."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

from train import nnunet_data as N

pytest.importorskip("nnunetv2")
pytest.importorskip("blosc2")

SHAPE, SPACING = (32, 48, 48), (2.5, 2.0, 2.0)


@pytest.fixture(scope="module")
def organs(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env_before = {k: os.environ.get(k) for k in N.PATH_VARIABLES}
    children_before = set(multiprocessing.active_children())
    N.write_phantom_raw_dataset(root / "raw", 911, "Organs", n_cases=2, shape=SHAPE, spacing=SPACING, seed=3,
                                kind="organs")
    folder, plans_id = N.plan_and_preprocess(911, root / "raw", root / "pre", intensity_samples=20000)
    assert set(multiprocessing.active_children()) <= children_before  # nnU-Net's workers ran in this process
    assert {k: os.environ.get(k) for k in N.PATH_VARIABLES} == env_before
    return root, folder, plans_id


def test_plan_and_preprocess_writes_the_nnunet_layout(organs):
    root, folder, plans_id = organs
    raw = root / "raw" / "Dataset911_Organs"
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == ["organs_000_0000.nii.gz", "organs_001_0000.nii.gz"]
    assert folder == root / "pre" / "Dataset911_Organs" and plans_id == "nnUNetPlans"
    for f in ("nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json"):
        assert (folder / f).is_file()
    names = sorted(p.name for p in (folder / "nnUNetPlans_3d_fullres").iterdir())
    assert names == sorted(f"organs_00{i}{s}" for i in range(2) for s in (".b2nd", "_seg.b2nd", ".pkl"))


def test_dataset_uses_nnunet_plans_labels_and_dataset_class(organs):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    _, folder, _ = organs
    ds = N.NnunetPretrainDataset(folder)
    assert ds.name == "Dataset911_Organs" and ds.num_images == 2 and ds.image_channels == 1
    assert [(c.name, c.labels) for c in ds.classes] == [("lung", (1,)), ("liver", (2,)), ("lesion", (3,))]
    assert ds.spacing == pytest.approx(SPACING) and ds.normalization == ["CTNormalization"]
    assert isinstance(ds.dataset, nnUNetDatasetBlosc2) and ds.ignore_label is None
    assert ds.describe()["data_identifier"] == "nnUNetPlans_3d_fullres"


def test_patches_oversample_foreground_reproducibly(organs):
    _, folder, _ = organs
    ds = N.NnunetPretrainDataset(folder)
    state = np.random.get_state()
    a = [ds.sample(np.random.default_rng(5), (16, 16, 16), foreground_prob=1.0) for _ in range(2)]
    assert np.array_equal(a[0][0], a[1][0]) and np.array_equal(a[0][1], a[1][1])  # same stream, same patch
    assert np.array_equal(np.random.get_state()[1], state[1])  # numpy's global stream is left as it was
    rng = np.random.default_rng(0)
    for _ in range(6):  # always centred on a voxel of some foreground class
        img, seg = ds.sample(rng, (16, 16, 16), foreground_prob=1.0)
        assert img.shape == (1, 16, 16, 16) and img.dtype == np.float32
        assert seg.shape == (16, 16, 16) and seg.dtype == np.int16 and (seg > 0).any()
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}


def test_padding_is_background_and_ignore_label_is_negative(organs):
    _, folder, _ = organs
    ds = N.NnunetPretrainDataset(folder)
    img, seg = ds.sample(np.random.default_rng(1), (48, 64, 64), foreground_prob=0.0)  # larger than the image
    assert seg.min() >= 0 and img.shape == (1, 48, 64, 64)
    assert (img == 0).any()  # nnU-Net pads the image with 0
    ds.ignore_label = 3  # as if dataset.json declared {"ignore": 3}
    _, seg = ds.sample(np.random.default_rng(2), (32, 48, 48), foreground_prob=1.0)
    assert 3 not in seg and set(np.unique(seg).tolist()) <= {-1, 0, 1, 2}


def test_resolve_by_id_and_clear_errors(organs, tmp_path):
    root, folder, _ = organs
    with N.nnunet_paths(preprocessed=root / "pre"):
        assert N.resolve_preprocessed("911") == folder
        assert N.resolve_preprocessed("Dataset911_Organs") == folder
        with pytest.raises(N.NnunetDataError, match="no unique"):
            N.resolve_preprocessed("912")
    with pytest.raises(N.NnunetDataError, match="nnUNetPlans.json is missing"):
        N.NnunetPretrainDataset(tmp_path)
    with pytest.raises(N.NnunetDataError, match="1..999"):
        N.dataset_folder_name(1000, "x")


def test_region_labels_become_one_class_per_region():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing": 3}
    lm = LabelManager(labels, regions_class_order=[1, 2, 3])
    classes = N._label_classes(labels, lm)
    assert [(c.name, c.labels) for c in classes] == [("whole tumor", (1, 2, 3)), ("tumor core", (2, 3)),
                                                     ("enhancing", (3,))]
