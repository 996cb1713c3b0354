"""Tests for train.synthesize: published image-level augmentation, pair synthesis CLI, determinism."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("batchgeneratorsv2")
torch = pytest.importorskip("torch")

from LesionLocatorLib.core.geometry import Volume  # noqa: E402
from LesionLocatorLib.core.image_io import read_image, write_image  # noqa: E402
from LesionLocatorLib.synthetic.phantom import make_phantom  # noqa: E402
from train import synthesize as syn  # noqa: E402

TINY = ["--phantom-shape", "24", "48", "48", "--phantom-spacing", "5", "4", "4", "--phantom-lesions", "3"]


@pytest.fixture(scope="module")
def case() -> tuple[Volume, Volume]:
    return make_phantom((24, 48, 48), (5.0, 4.0, 4.0), n_lesions=3, seed=2)


def test_augment_pair_deterministic_and_keeps_ids(case):
    ct, lab = case
    a_img, a_lab = syn.augment_pair(ct, lab, seed=5)
    b_img, b_lab = syn.augment_pair(ct, lab, seed=5)
    c_img, c_lab = syn.augment_pair(ct, lab, seed=6)
    np.testing.assert_array_equal(a_img.array, b_img.array)
    np.testing.assert_array_equal(a_lab.array, b_lab.array)
    assert not np.array_equal(a_img.array, c_img.array)
    assert a_img.same_grid(ct) and a_lab.same_grid(lab)
    assert a_img.array.dtype == np.int16 and a_lab.array.dtype == lab.array.dtype
    assert set(np.unique(a_lab.array)) <= set(np.unique(lab.array))
    assert len(set(np.unique(a_lab.array)) - {0}) >= 2
    assert not np.array_equal(a_img.array, ct.array)
    # HU stay HU: air outside the body, soft tissue inside
    assert np.median(a_img.array[:, :3, :]) < -900
    assert abs(float(np.median(a_img.array[a_lab.array == 0][a_img.array[a_lab.array == 0] > -300])) - 40) < 40


def test_augment_pair_leaves_global_rng_alone(case):
    ct, lab = case
    np.random.seed(123)
    torch.manual_seed(123)
    expect_np, expect_t = np.random.random(), torch.rand(1).item()
    np.random.seed(123)
    torch.manual_seed(123)
    syn.augment_pair(ct.array, lab.array, seed=1)
    assert np.random.random() == expect_np and torch.rand(1).item() == expect_t


def test_augment_pair_normalised_input(case):
    ct, lab = case
    norm = (ct.array.astype(np.float32) - syn.CT_MEAN) / syn.CT_STD
    img, out_lab = syn.augment_pair(norm, lab.array, seed=3, normalization=None)
    assert isinstance(img, np.ndarray) and img.dtype == np.float32 and img.shape == norm.shape
    assert out_lab.dtype == lab.array.dtype
    # same spatial transform as the HU path with the same seed (the intensity part differs only in domain)
    hu_img, hu_lab = syn.augment_pair(ct.array, lab.array, seed=3)
    np.testing.assert_array_equal(out_lab, hu_lab)


def test_augmentation_parameters_follow_the_published_ranges():
    shape = (32, 64, 64)
    spatial = syn.build_augmentation(shape).transforms[0]
    img = torch.zeros((1, *shape))
    scaled = 0
    for s in range(40):
        np.random.seed(s)
        torch.manual_seed(s)
        p = spatial.get_parameters(image=img)
        shift = np.array(p["center_location_in_pixels"]) - np.array(shape) / 2
        assert np.all(np.abs(shift) <= 5.0)  # translation (-5, 5) voxels
        sv = np.linalg.svd(p["affine"])[1]
        assert np.allclose(sv, sv[0]) and 0.95 <= sv[0] <= 1.05  # synchronised scaling
        scaled += not np.isclose(sv[0], 1.0)
        rot = p["affine"] / sv[0]
        angle = np.degrees(np.arccos(np.clip((np.trace(rot) - 1) / 2, -1, 1)))
        assert 0 < angle <= 5.0 * np.sqrt(3) + 1e-6  # three axis rotations of at most 5 degrees each
        # elastic displacement: max 0.05 of the edge per axis, always applied
        np.testing.assert_allclose(p["elastic_offsets"].abs().amax(dim=(0, 1, 2)).numpy(),
                                   0.05 * np.array(shape), rtol=1e-4)
    assert 8 <= scaled <= 32  # p = 0.5


def test_bad_augment_input(case):
    ct, lab = case
    with pytest.raises(syn.SynthesizeError, match="same shape"):
        syn.augment_pair(ct.array, lab.array[:-1], seed=0)
    with pytest.raises(syn.SynthesizeError, match="integer"):
        syn.augment_pair(ct.array, lab.array.astype(np.float32), seed=0)


def _arrays(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): read_image(p).array for p in sorted(out.rglob("*.nii.gz"))}


def test_cli_phantoms_pairs_manifest_preview_deterministic(tmp_path):
    out_a, out_b, out_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    args = ["--phantoms", "2", "--pairs-per-case", "2", "--seed", "7", *TINY]
    assert syn.main([*args, "-o", str(out_a), "--preview", str(out_a / "preview.png")]) == 0
    manifest = json.loads((out_a / "manifest.json").read_text())
    assert len(manifest["pairs"]) == 4 and manifest["seed"] == 7
    assert manifest["lesion_level"]["amplitudes"] == [-22.0, -18.0, 15.0, 25.0]
    assert manifest["image_level"]["rotation"]["degrees"] == [-5.0, 5.0]
    for pair in manifest["pairs"]:
        base = read_image(out_a / pair["baseline"])
        base_lab = read_image(out_a / pair["baseline_labels"]).array
        fol = read_image(out_a / pair["followup"])
        fol_lab = read_image(out_a / pair["followup_labels"]).array
        assert fol.same_grid(base) and fol.array.dtype == base.array.dtype
        assert set(np.unique(fol_lab)) <= set(np.unique(base_lab))
        assert sorted(pair["lesions"]) == [str(i) for i in sorted(set(np.unique(base_lab)) - {0})]
        for lid, les in pair["lesions"].items():
            assert les["followup_voxels"] == int((fol_lab == int(lid)).sum())
            assert les["growth_amplitude"] in (-22.0, -18.0, 15.0, 25.0)
        assert not np.array_equal(fol.array, base.array)
    png = (out_a / "preview.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the same seed reproduces every array and the manifest; another seed does not
    assert syn.main([*args, "-o", str(out_b)]) == 0
    a, b = _arrays(out_a), _arrays(out_b)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert json.loads((out_b / "manifest.json").read_text()) == manifest
    assert syn.main(["--phantoms", "2", "--pairs-per-case", "2", "--seed", "8", *TINY, "-o", str(out_c)]) == 0
    c = _arrays(out_c)
    assert not np.array_equal(a["phantom_000/followup_0.nii.gz"], c["phantom_000/followup_0.nii.gz"])


def test_cli_folders_match_by_name(tmp_path, capsys):
    images, labels, out = tmp_path / "imagesTr", tmp_path / "labelsTr", tmp_path / "out"
    for i in range(2):
        ct, lab = make_phantom((24, 48, 48), (5.0, 4.0, 4.0), n_lesions=2, seed=10 + i)
        write_image(ct, images / f"case{i}_0000.nii.gz")  # nnU-Net naming
        write_image(lab, labels / f"case{i}.nii.gz")
    write_image(ct, images / "orphan_0000.nii.gz")  # no label: skipped with a message
    rc = syn.main(["--images", str(images), "--labels", str(labels), "-o", str(out), "--pairs-per-case", "1",
                   "--seed", "0", "--vanish-prob", "1.0", "--no-augment"])
    assert rc == 0
    assert "orphan_0000.nii.gz" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [p["case"] for p in manifest["pairs"]] == ["case0", "case1"]
    assert manifest["pairs"][0]["source"] == "case0_0000.nii.gz"
    # every lesion vanished (vanish-prob 1): follow-up labels are empty, statuses say so
    for pair in manifest["pairs"]:
        assert not read_image(out / pair["followup_labels"]).array.any()
        assert {v["status"] for v in pair["lesions"].values()} == {"vanished"}
    np.testing.assert_array_equal(read_image(out / "case1/baseline.nii.gz").array,
                                  read_image(images / "case1_0000.nii.gz").array)


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    assert syn.main(["--images", str(tmp_path / "img"), "--labels", str(tmp_path / "lab"), "-o",
                     str(tmp_path / "o")]) == 2
    assert "no image" in capsys.readouterr().err
    assert syn.main(["-o", str(tmp_path / "o")]) == 2
    assert "--phantoms" in capsys.readouterr().err
    assert syn.main(["--phantoms", "1", *TINY, "--pairs-per-case", "0", "-o", str(tmp_path / "o")]) == 2
    assert "pairs-per-case" in capsys.readouterr().err
