"""One scenario suite, two backends: in-process and a real ``lesionlocator serve`` process on loopback must give
identical results (masks, statuses, ids, reports) for every scenario, and so must the CLI with and without
``--server``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")

from LesionLocatorLib.backend import open_backend  # noqa: E402
from LesionLocatorLib.cli.main import main  # noqa: E402
from LesionLocatorLib.core.image_io import read_image, write_image  # noqa: E402
from LesionLocatorLib.core.prompts import Box, Point  # noqa: E402
from LesionLocatorLib.core.results import LesionStatus, SegmentationResult  # noqa: E402
from LesionLocatorLib.model.bundled import default_checkpoint  # noqa: E402
from LesionLocatorLib.model.tiny_model import write_random_checkpoint, write_random_track_checkpoint  # noqa: E402
from LesionLocatorLib.synthetic.longitudinal import make_followup, vanish_lesion  # noqa: E402
from LesionLocatorLib.synthetic.phantom import lesion_prompts, make_phantom  # noqa: E402

from conftest import TOKEN, ServerProcess  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenario")
    ct, lab = make_phantom(shape=(40, 80, 80), spacing=(2.5, 1.5, 1.5), n_lesions=3, seed=11)
    ids = sorted(int(v) for v in np.unique(lab.array) if v)
    fu1, fu1_lab, _ = make_followup(ct, lab, seed=3, shift_mm=(3.0, -2.0, 1.5), smooth_deformation_mm=1.5,
                                    growth={ids[0]: 20.0})
    # the last lesion vanishes at follow-up 1 and is back (grown) at follow-up 2
    gone, gone_lab = vanish_lesion(fu1.array, fu1_lab.array, ids[-1])
    fu1 = fu1.with_array(gone)
    fu2, _, _ = make_followup(ct, lab, seed=5, shift_mm=(-2.0, 2.0, 0.0), smooth_deformation_mm=1.5,
                              growth={ids[-1]: 15.0})
    for name, vol in (("ct", ct), ("lab", lab), ("fu1", fu1), ("fu2", fu2)):
        write_image(vol, d / f"{name}.nii.gz")
    return d, ct, lab, [fu1, fu2], lesion_prompts(lab), ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    # the phantom's own spacing: the scan is about two patches wide, so growth past the patch stays cheap
    write_random_checkpoint(root, patch_size=(32, 48, 48), spacing=(2.5, 1.5, 1.5), seed=3)
    write_random_track_checkpoint(root, patch_size=(32, 48, 48), spacing=(2.5, 1.5, 1.5),
                                  registration_size=(65, 65, 65), seed=4)
    return root


@pytest.fixture(scope="module")
def servers(tiny, tmp_path_factory):
    started = {}
    try:
        started["tiny"] = ServerProcess(tmp_path_factory.mktemp("srv_tiny"), tiny)
        started["bundled"] = ServerProcess(tmp_path_factory.mktemp("srv_bundled"), default_checkpoint())
        yield {k: s.url for k, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def both(model, servers, key, **settings):
    """The same settings, local and through the server that runs ``model``."""
    return (open_backend(model=model, device="cpu", **settings),
            open_backend(server=servers[key], token=TOKEN, **settings))


def assert_same(a: SegmentationResult, b: SegmentationResult) -> None:
    assert sorted(a.lesions) == sorted(b.lesions)
    for lid in a.lesions:
        la, lb = a.lesions[lid], b.lesions[lid]
        assert la.status == lb.status, lid
        assert tuple(la.bbox) == tuple(lb.bbox), lid
        np.testing.assert_array_equal(la.mask, lb.mask)


@pytest.mark.parametrize("settings", [{}, {"tta": True}])
def test_segment_scenarios(data, tiny, servers, settings):
    d, ct, lab, _, pr, ids = data
    local, remote = both(tiny, servers, "tiny", **settings)
    scenarios = [
        {"points": {7: pr[ids[0]]["point"], 300: pr[ids[1]]["point"]}},                 # ids kept, gaps, > 255
        {"boxes": {ids[1]: pr[ids[1]]["box"]}},
        {"masks": lab.array},                                                            # label map
        {"prompts": {4: [Point(tuple(pr[ids[0]]["point"])), Point(tuple(pr[ids[2]]["point"]))]}},  # united
        {"prompts": {5: [Point(tuple(pr[ids[0]]["point"])), Box(tuple(pr[ids[0]]["box"]))]}},      # box wins
        {"points": {1: tuple(ct.voxel_to_world(pr[ids[2]]["point"], ras=True))}, "space": "ras"},
    ]
    if settings:  # TTA: 8 passes per tile, one scenario is enough to show it travels
        scenarios = scenarios[:1]
    with local, remote:
        sessions = [local.session(), remote.session()]
        for s in sessions:
            s.set_image(ct)
        for kw in scenarios:
            a, b = (s.segment(**kw) for s in sessions)
            assert_same(a, b)
            assert any(les.found for les in a.lesions.values())
        assert sorted(sessions[1].segment(points={7: pr[ids[0]]["point"], 300: pr[ids[1]]["point"]}).lesions) == [7, 300]


@pytest.mark.parametrize("model_key, from_baseline", [("bundled", False), ("bundled", True), ("tiny", False)])
def test_track_scenarios(data, tiny, servers, model_key, from_baseline):
    d, ct, lab, fus, pr, ids = data
    model = default_checkpoint() if model_key == "bundled" else tiny
    local, remote = both(model, servers, model_key)
    results = []
    with local, remote:
        for backend in (local, remote):
            tracker = backend.tracker()
            tracker.set_images(ct, fus)
            # points are segmented on the baseline first; ids travel unchanged
            results.append(tracker.track(points={ids[0]: pr[ids[0]]["point"], 42: pr[ids[-1]]["point"]},
                                         from_baseline=from_baseline))
            tracker.close()
    a, b = results
    assert_same(a.baseline, b.baseline)
    assert len(a.followups) == len(b.followups) == 2
    for ra, rb in zip(a.followups, b.followups):
        assert_same(ra, rb)
        assert sorted(ra.lesions) == sorted([ids[0], 42])  # lost lesions stay listed
        assert all(isinstance(les.status, LesionStatus) for les in ra.lesions.values())
    assert a.report(["bl", "fu1", "fu2"]).to_dict() == b.report(["bl", "fu1", "fu2"]).to_dict()


def _files(folder: Path) -> dict:
    return {p.name: p for p in sorted(folder.iterdir()) if p.is_file()}


def test_cli_gives_identical_outputs_with_and_without_server(data, servers, tmp_path):
    """``lesionlocator segment`` / ``track``: same masks (voxels and geometry) and the same report.json, with and
    without --server, with the bundled model on both sides."""
    d, ct, lab, fus, pr, ids = data
    (tmp_path / "pts.json").write_text(json.dumps({"1": {"point": pr[ids[0]]["point"]},
                                                   "9": [{"point": pr[ids[1]]["point"]}, {"box": pr[ids[1]]["box"]}]}))
    remote = ["--server", servers["bundled"], "--token", TOKEN]
    for cmd in (["segment", "-i", str(d / "ct.nii.gz")],
                ["track", "-bl", str(d / "ct.nii.gz"), "-fu", str(d / "fu1.nii.gz"), str(d / "fu2.nii.gz")]):
        outs = []
        for extra in ([], remote):
            out = tmp_path / f"{cmd[0]}_{'remote' if extra else 'local'}"
            assert main(cmd + ["-p", str(tmp_path / "pts.json"), "-o", str(out)] + extra) == 0
            outs.append(_files(out))
        local, srv = outs
        assert sorted(local) == sorted(srv)
        for name in local:
            if name.endswith(".nii.gz"):
                a, b = read_image(local[name]), read_image(srv[name])
                assert a.same_grid(b)
                np.testing.assert_array_equal(a.array, b.array)
                assert local[name].read_bytes() == srv[name].read_bytes(), name
            elif name.endswith(".json"):
                assert json.loads(local[name].read_text()) == json.loads(srv[name].read_text()), name
            else:
                assert local[name].read_text() == srv[name].read_text(), name
