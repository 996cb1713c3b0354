"""Prompt parsing, world coordinates and encoding into the resampled grid."""
import json

import numpy as np
import pytest

from LesionLocatorLib.core.geometry import Volume
from LesionLocatorLib.model.plans import config_from_dicts, make_dataset_json, make_plans
from LesionLocatorLib.model.preprocessing import plan_grid
from LesionLocatorLib.core.prompts import (Box, Mask, Point, PromptError, ball, collect_prompts, effective, lesion_prompts, parse_prompts, box_to_resampled, encode_prompt,
                                      load_prompt_json, point_to_resampled, prompts_from_label_map,
                                      prompts_to_json, validate)


def grid_for(shape=(48, 143, 161), spacing=(3.27, 0.9765620231628418, 0.9765620231628418), array=None):
    cfg = config_from_dicts(make_plans(), make_dataset_json())
    arr = np.ones(shape, np.int16) if array is None else array
    return plan_grid(arr, spacing, cfg)


def test_ball_matches_published_stamp():
    b = ball(5)
    assert b.shape == (11, 11, 11) and b.sum() == 739  # meta.json dense_prompt_voxels
    assert b[5, 5, 0] and b[5, 5, 10] and not b[0, 0, 0]


def test_point_and_box_mapping_reproduces_published_values():
    g = grid_for()
    assert g.resampled_shape == (157, 175, 197)
    # STS_002 reference meta.json: point [24, 71, 81] -> [78, 87, 99] (78.5 rounds to even)
    assert point_to_resampled(Point((24, 71, 81)), g) == (78, 87, 99)
    # box [16, 32, 52, 91, 52, 109] -> [51, 106, 62, 113, 62, 135]
    assert box_to_resampled(Box((16, 32, 52, 91, 52, 109)), g) == (51, 106, 62, 113, 62, 135)


def test_box_touching_first_slice_is_kept():
    g = grid_for((13, 512, 512), (5.0, 0.9375, 0.9375))
    # DeepLesion reference (uint16fix): the published CLI wrapped this box to 65535 and dropped it
    assert box_to_resampled(Box((0, 13, 285, 334, 231, 285)), g) == (0, 65, 332, 393, 269, 335)
    enc = encode_prompt(Box((0, 13, 285, 334, 231, 285)), g, "box")
    assert enc.voxels() == 261690


def test_crop_origin_is_subtracted_once():
    arr = np.zeros((54, 153, 181), np.int16)
    arr[6:54, 0:143, 20:181] = 1
    g = grid_for(array=arr)
    assert g.crop == ((6, 54), (0, 143), (20, 181))
    # the same lesion point as in plain STS_002 lands on the same resampled voxel
    assert point_to_resampled(Point((24 + 6, 71, 81 + 20)), g) == (78, 87, 99)


def test_point_stamp_is_clipped_at_border():
    g = grid_for((20, 30, 30), (1.0, 0.8, 0.8))
    enc = encode_prompt(Point((0, 0, 0)), g, "point")
    assert enc.sparse == [0, 0, 0]
    assert enc.voxels() == int(ball(5)[5:, 5:, 5:].sum())
    assert enc.bbox_incl == ([0, 0, 0], [5, 5, 5])


def test_json_with_gaps_and_large_ids(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"1": {"point": [1, 2, 3]}, "7": {"point": [4, 5, 6]}, "300": {"box": [0, 2, 0, 3, 0, 4]}}))
    prompts = load_prompt_json(path)
    assert sorted(prompts) == [1, 7, 300]
    assert prompts[300] == [Box((0, 2, 0, 3, 0, 4))]
    assert prompts_to_json(prompts)["7"] == {"point": [4, 5, 6]}


def test_one_vocabulary_from_json_kwargs_and_wire():
    """The published JSON, keyword arguments and the wire format (JSON + mask crops) give the same prompts."""
    img = Volume(np.zeros((10, 20, 30), np.int16), spacing=(2.0, 0.5, 0.75), origin=(3.0, -4.0, 5.0))
    mask = np.zeros(img.shape, bool)
    mask[2:5, 3:9, 4:6] = True
    kw = collect_prompts(img, points={2: [(1, 2, 3), (4, 5.5, 6)]}, boxes={9: (0, 2, 0, 3, 0, 4)}, masks={4: mask})
    assert list(kw) == [2, 4, 9]
    assert kw[2] == [Point((1.0, 2.0, 3.0)), Point((4.0, 5.5, 6.0))]
    from_json = parse_prompts({"2": [{"point": [1, 2, 3]}, {"point": [4, 5.5, 6]}], "9": {"box": [0, 2, 0, 3, 0, 4]}})
    assert from_json == {2: kw[2], 9: kw[9]}
    arrays = []
    wire = prompts_to_json(kw, arrays)
    assert len(arrays) == 1 and arrays[0].shape == (3, 6, 2)
    back = parse_prompts(json.loads(json.dumps(wire)), img, arrays)
    assert back[2] == kw[2] and back[9] == kw[9]
    np.testing.assert_array_equal(back[4][0].mask, mask)
    with pytest.raises(PromptError, match="label maps"):
        prompts_to_json(kw)  # masks need the wire container
    with pytest.raises(PromptError, match="does not fit"):
        parse_prompts({"4": {"mask": {"bbox": [2, 5, 3, 9, 4, 6], "array": 0}}}, img, [np.ones((1, 1, 1), bool)])
    with pytest.raises(PromptError, match="malformed"):
        parse_prompts({"4": {"mask": {"bbox": [2, 5, 3, 9, 4, 6], "array": 1}}}, img, arrays)


def test_several_prompts_rule():
    """A mask wins, else the last box, else every point (documented in core.prompts)."""
    p1, p2, b1, b2 = Point((1, 1, 1)), Point((2, 2, 2)), Box((0, 1, 0, 1, 0, 1)), Box((0, 2, 0, 2, 0, 2))
    m = Mask(np.ones((2, 2, 2), bool))
    assert effective([p1, p2]) == [p1, p2]
    assert effective([p1, b1, p2, b2]) == [b2]
    assert effective([b1, m, p1]) == [m]
    assert lesion_prompts({"3": p1, 1: [b1, p2]}) == {1: [b1, p2], 3: [p1]}
    with pytest.raises(PromptError, match="not a Point"):
        lesion_prompts({1: [(1, 2, 3)]})


@pytest.mark.parametrize("data, msg", [
    ({}, "non-empty"),
    ({"a": {"point": [1, 2, 3]}}, "not an integer"),
    ({"0": {"point": [1, 2, 3]}}, "positive"),
    ({"1": {"point": [1, 2]}}, "point must be"),
    ({"1": {"box": [1, 2, 3]}}, "six integers"),
    ({"1": {"point": [1, 2, 3], "box": [0, 1, 0, 1, 0, 1]}}, "exactly one"),
    ({"1": {"pont": [1, 2, 3]}}, "exactly one"),
    ({"1": {"point": ["a", 2, 3]}}, "numbers"),
    ({"1": {"point_lps": [1, 2, 3]}}, "geometry"),
])
def test_malformed_json_is_rejected(data, msg):
    with pytest.raises(PromptError, match=msg):
        load_prompt_json(data)


def test_invalid_json_file(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(PromptError, match="not valid JSON"):
        load_prompt_json(p)
    with pytest.raises(PromptError, match="not found"):
        load_prompt_json(tmp_path / "missing.json")


def test_prompts_outside_image_are_rejected():
    shape = (10, 20, 30)
    with pytest.raises(PromptError, match="outside"):
        validate(Point((10, 5, 5)), shape)
    with pytest.raises(PromptError, match="outside"):
        validate(Point((-1, 5, 5)), shape)
    with pytest.raises(PromptError, match="outside"):
        validate(Box((0, 11, 0, 5, 0, 5)), shape)
    with pytest.raises(PromptError, match="empty"):
        validate(Box((3, 3, 0, 5, 0, 5)), shape)
    with pytest.raises(PromptError, match="empty"):
        validate(Mask(np.zeros(shape, bool)), shape)
    validate(Point((9, 19, 29)), shape)


def test_world_prompts_lps_and_ras():
    direction = np.array([[-1, 0, 0], [0, -1, 0], [0, 0, 1]], float)
    img = Volume(np.zeros((10, 20, 30), np.int16), spacing=(2.0, 0.5, 0.75), origin=(100.0, 50.0, -20.0),
                 direction=direction)
    zyx = (4, 7, 11)
    lps = img.voxel_to_world(zyx)
    ras = img.voxel_to_world(zyx, ras=True)
    got = load_prompt_json({"1": {"point_lps": lps.tolist()}, "2": {"point_ras": ras.tolist()}}, img)
    np.testing.assert_allclose(got[1][0].zyx, zyx, atol=1e-9)
    np.testing.assert_allclose(got[2][0].zyx, zyx, atol=1e-9)
    a, b = img.voxel_to_world((2, 3, 4)), img.voxel_to_world((5, 9, 12))
    box = load_prompt_json({"3": {"box_lps": [a.tolist(), b.tolist()]}}, img)[3]
    assert box == [Box((2, 6, 3, 10, 4, 13))]
    ras_box = collect_prompts(img, boxes={3: [img.voxel_to_world((2, 3, 4), ras=True),
                                              img.voxel_to_world((5, 9, 12), ras=True)]}, space="ras")
    assert ras_box[3] == box


def test_label_map_prompts_keep_any_ids():
    lab = np.zeros((5, 5, 5), np.int32)
    lab[1, 1, 1] = 1
    lab[3, 3, 3] = 70000
    prompts = prompts_from_label_map(lab)
    assert sorted(prompts) == [1, 70000]
    assert prompts[70000].mask.sum() == 1
    with pytest.raises(PromptError, match="negative"):
        prompts_from_label_map(-lab)


def test_mask_prompt_becomes_centroid_or_box():
    g = grid_for((20, 30, 30), (1.0, 0.8, 0.8))
    m = np.zeros((20, 30, 30), bool)
    m[8:12, 10:16, 12:18] = True
    enc_p = encode_prompt(Mask(m), g, "point")
    expect = point_to_resampled(Point((9.5, 12.5, 14.5)), g)
    assert np.abs(np.array(enc_p.sparse) - expect).max() <= 1
    enc_b = encode_prompt(Mask(m), g, "box")
    ref = box_to_resampled(Box((8, 12, 10, 16, 12, 18)), g)
    assert np.abs(np.array(enc_b.sparse) - ref).max() <= 1
