"""train.data: preprocessing as at inference, cache, 1/sqrt dataset sampling, prompt simulation, patches."""
from __future__ import annotations

import numpy as np
import pytest

from LesionLocatorLib.synthetic.phantom import make_phantom
from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans
from LesionLocatorLib.model.preprocessing import plan_grid
from LesionLocatorLib.core.prompts import ball
from train import data as D


@pytest.fixture(scope="module")
def config():
    return config_from_dicts(make_plans((32, 32, 32), (2.0, 2.0, 2.0), (2, 4, 8)), make_dataset_json())


@pytest.fixture(scope="module")
def phantom():
    return make_phantom((40, 64, 64), (2.5, 1.5, 1.5), n_lesions=2, seed=5)


def test_dataset_probabilities_inverse_sqrt():
    p = D.dataset_probabilities({"a": 1, "b": 4, "c": 100})
    assert sum(p.values()) == pytest.approx(1.0)
    # 1/sqrt(n): 1, 1/2, 1/10
    assert p["a"] / p["b"] == pytest.approx(2.0)
    assert p["a"] / p["c"] == pytest.approx(10.0)
    with pytest.raises(D.TrainDataError):
        D.dataset_probabilities({"a": 0})
    with pytest.raises(D.TrainDataError):
        D.dataset_probabilities({})


def _case(name, ds, n_lesions=1):
    lab = np.zeros((4, 4, 4), np.int16)
    for i in range(n_lesions):
        lab[i, 0, 0] = i + 1
    return D.Case(name, ds, np.zeros((4, 4, 4), np.float32), lab, list(range(1, n_lesions + 1)),
                  {i + 1: (i, i + 1, 0, 1, 0, 1) for i in range(n_lesions)})


def test_case_sampler_frequencies_follow_sqrt_weights():
    cases = [_case(f"a{i}", "A") for i in range(1)] + [_case(f"b{i}", "B") for i in range(16)]
    s = D.CaseSampler(cases, "sqrt")
    rng = np.random.default_rng(0)
    draws = [s.draw(rng)[0].dataset for _ in range(4000)]
    frac_a = draws.count("A") / len(draws)
    # weights 1 : 1/4 -> P(A) = 0.8 (uniform over images would give 1/17)
    assert frac_a == pytest.approx(0.8, abs=0.03)
    u = D.CaseSampler(cases, "uniform")
    draws = [u.draw(rng)[0].dataset for _ in range(3000)]
    assert draws.count("A") / len(draws) == pytest.approx(1 / 17, abs=0.02)


def test_rank_rng_streams_are_reproducible_and_distinct():
    a = D.rank_rng(3, 0, 1).integers(1 << 30, size=4)
    assert np.array_equal(a, D.rank_rng(3, 0, 1).integers(1 << 30, size=4))
    assert not np.array_equal(a, D.rank_rng(3, 1, 1).integers(1 << 30, size=4))
    assert not np.array_equal(a, D.rank_rng(3, 0, 2).integers(1 << 30, size=4))


def test_preprocess_matches_inference_grid_and_cache(config, phantom, tmp_path):
    ct, lab = phantom
    img, seg = D.preprocess_case(ct, lab, config)
    grid = plan_grid(ct.array, ct.spacing, config)
    assert img.shape == tuple(grid.resampled_shape) == seg.shape
    assert img.dtype == np.float32 and seg.dtype == np.int16
    # CT normalisation: values bounded by the clipped, z-scored range
    st = config.ct_stats
    assert img.min() >= (st.lower - st.mean) / st.std - 1e-4 and img.max() <= (st.upper - st.mean) / st.std + 1e-4
    assert set(np.unique(seg)) == {0, 1, 2}
    c1 = D.cache_case("p", "ds", ct, lab, config, tmp_path, "k1")
    c2 = D.cache_case("p", "ds", ct, lab, config, tmp_path, "k1")  # from the cache
    assert np.array_equal(np.asarray(c1.image), img) and np.array_equal(np.asarray(c2.labels), seg)
    assert c2.lesions == [1, 2]
    z0, z1, y0, y1, x0, x1 = c2.lesion_boxes[1]
    assert (np.asarray(c2.labels)[z0:z1, y0:y1, x0:x1] == 1).sum() == (seg == 1).sum()


def test_simulated_prompts(phantom):
    les = np.zeros((30, 30, 30), bool)
    les[10:18, 12:20, 8:22] = True
    rng = np.random.default_rng(1)
    p = D.simulate_prompt(les, "point", rng)
    assert p.sum() == ball().sum()  # the library's radius-5 ball, fully inside
    centre = np.argwhere(p).mean(0).round().astype(int)
    assert les[tuple(centre)]
    b = D.simulate_prompt(les, "box", rng, box_jitter=0)
    assert np.argwhere(b).min(0).tolist() == [9, 11, 7] and np.argwhere(b).max(0).tolist() == [18, 20, 22]
    m = D.simulate_prompt(les, "mask", rng)
    assert m.any() and (m.astype(bool) & les).any()
    again = D.simulate_prompt(les, "point", np.random.default_rng(1))
    assert np.array_equal(again, p)
    with pytest.raises(D.TrainDataError):
        D.simulate_prompt(les, "scribble", rng)
    with pytest.raises(D.TrainDataError):
        D.simulate_prompt(np.zeros_like(les), "point", rng)


def test_make_sample_targets_one_lesion(config, phantom, tmp_path):
    ct, lab = phantom
    case = D.cache_case("p", "ds", ct, lab, config, tmp_path, "k")
    rng = np.random.default_rng(0)
    for kind in ("point", "box", "mask"):
        s = D.make_sample(case, 1, kind, (32, 32, 32), rng, max_offset=0.1)
        assert s.image.shape == (1, 32, 32, 32) and s.prompt.shape == (1, 32, 32, 32)
        assert s.target.any() and s.prompt.any()
        assert (s.prompt[0] > 0)[s.target > 0].any() or kind == "box"
    # the other lesion is background in the target
    s = D.make_sample(case, 2, "box", (32, 32, 32), rng, max_offset=0.0)
    full = np.asarray(case.labels)
    assert s.target.sum() <= (full == 2).sum()
    # zoom augmentation keeps the patch size
    s = D.make_sample(case, 1, "point", (32, 32, 32), rng, scale_range=(0.7, 1.3))
    assert s.image.shape == (1, 32, 32, 32)
    x, y = D.collate([s, s])
    assert tuple(x.shape) == (2, 2, 32, 32, 32) and tuple(y.shape) == (2, 1, 32, 32, 32)


def test_crop_padded_pads_with_fill():
    a = np.arange(27, dtype=np.float32).reshape(3, 3, 3)
    out = D.crop_padded(a, (-1, 0, 1), (3, 3, 3), -5.0)
    assert out.shape == (3, 3, 3)
    assert np.all(out[0] == -5.0) and np.all(out[:, :, 2] == -5.0)
    assert np.array_equal(out[1:, :, :2], a[:2, :, 1:])


def test_case_list_errors(tmp_path):
    p = tmp_path / "l.json"
    p.write_text("[]")
    with pytest.raises(D.TrainDataError):
        D.read_case_list(p)
    p.write_text('[{"image": "a.nii.gz"}]')
    with pytest.raises(D.TrainDataError):
        D.read_case_list(p)
    p.write_text('[{"image": "a.nii.gz", "labels": "b.nii.gz", "dataset": "x"}]')
    entries = D.read_case_list(p)
    assert entries[0]["image"] == tmp_path / "a.nii.gz" and entries[0]["name"] == "a"
    with pytest.raises(D.TrainDataError):
        D.load_case_files(entries, None, tmp_path)


def test_case_sampler_explicit_weights_and_size_filter():
    cases = [_case("a", "A", 2), _case("b", "B")]
    cases[0].lesion_voxels.update({1: 10, 2: 500})
    cases[1].lesion_voxels.update({1: 500})
    s = D.CaseSampler(cases, {"A": 3.0, "B": 1.0}, min_lesion_voxels=100)
    assert s.probs.tolist() == [0.75, 0.25]
    rng = np.random.default_rng(0)
    draws = [s.draw(rng) for _ in range(50)]
    assert {lid for c, lid in draws if c.name == "a"} == {2}  # lesion 1 is too small
    assert s.n_lesions == 2
    with pytest.raises(D.TrainDataError):
        D.CaseSampler(cases, {"A": 1.0})
