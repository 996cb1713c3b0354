"""The Slicer module's Logic against real MRML objects (slicer-core wheel: MRML without the application).

Runs where ``import slicer`` gives MRML (``pip install slicer-core``, see .ci/run); skipped elsewhere.
Checks the geometry conversions MRML <-> LesionLocatorLib exactly (non-identity directions, anisotropic
spacing, parent transforms on volumes and markups), segments/undo/report nodes, and one real segmentation
with a tiny random-weight checkpoint compared against LesionSegmenter called directly.
"""
from __future__ import annotations

import csv
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

try:
    import slicer  # noqa: E402

    _HAVE_MRML = hasattr(slicer, "vtkMRMLScene") and hasattr(slicer, "vtkMRMLSegmentationNode")
    _REASON = "slicer is importable but has no MRML classes"
except ImportError as exc:  # the main venv: no MRML
    _HAVE_MRML = False
    _REASON = f"MRML not available ({exc}); install the slicer-core wheel to run these tests"

pytestmark = pytest.mark.skipif(not _HAVE_MRML, reason=_REASON)

if _HAVE_MRML:
    import vtk
    from vtk.util import numpy_support


def _load_module():
    # load LesionLocator/LesionLocator.py by path: the folder LesionLocator/ would otherwise shadow it
    if "LesionLocator" in sys.modules and hasattr(sys.modules["LesionLocator"], "LesionLocatorLogic"):
        return sys.modules["LesionLocator"]
    spec = importlib.util.spec_from_file_location("LesionLocator", REPO / "LesionLocator" / "LesionLocator.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["LesionLocator"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def LL():
    return _load_module()


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def logic(LL, scene):
    return LL.LesionLocatorLogic(scene=scene)


# ----------------------------------------------------------------------------------------------- helpers
def rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


DIRECTIONS_RAS = rotation(2, 30.0) @ rotation(0, -20.0) @ np.diag([1.0, -1.0, 1.0])  # improper (det -1) on purpose
SPACING_IJK = (0.7, 0.9, 2.5)
ORIGIN_RAS = (12.0, -40.5, 7.25)


def make_volume_node(scene, shape_zyx=(9, 11, 13), name="ct", directions=DIRECTIONS_RAS, spacing=SPACING_IJK,
                     origin=ORIGIN_RAS, seed=0):
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, size=shape_zyx).astype(np.int16)
    image = vtk.vtkImageData()
    image.SetDimensions(shape_zyx[2], shape_zyx[1], shape_zyx[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    m = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            m.SetElement(r, c, directions[r, c])
    node.SetIJKToRASDirectionMatrix(m)
    return node, array


def add_linear_transform(scene, matrix4: np.ndarray, name="T"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix4[r, c]))
    node.SetMatrixTransformToParent(m)
    return node


def rigid(rot: np.ndarray, shift) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = shift
    return m


def ijk_to_world(node, ijk) -> np.ndarray:
    """Independent reference: Slicer's own IJKToRAS, then the parent transform's matrix."""
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
    to_world = np.eye(4)
    if node.GetParentTransformNode() is not None:
        t = vtk.vtkMatrix4x4()
        node.GetParentTransformNode().GetMatrixTransformToWorld(t)
        to_world = np.array([[t.GetElement(r, c) for c in range(4)] for r in range(4)])
    return (to_world @ ijk_to_ras @ np.append(np.asarray(ijk, float), 1.0))[:3]


# ----------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("with_transform", [False, True])
def test_volume_node_to_volume_matches_slicer_geometry(LL, scene, with_transform):
    node, array = make_volume_node(scene)
    if with_transform:
        t = add_linear_transform(scene, rigid(rotation(1, 25.0) @ rotation(2, -10.0), (5.0, -3.0, 11.0)))
        node.SetAndObserveTransformNodeID(t.GetID())
    vol = LL.volumeFromVolumeNode(node)
    # array: (z, y, x) = (k, j, i); VTK's own voxel accessor is indexed (i, j, k)
    assert vol.shape == array.shape
    image = node.GetImageData()
    for z, y, x in [(0, 0, 0), (8, 10, 12), (3, 7, 2), (5, 0, 11)]:
        assert vol.array[z, y, x] == image.GetScalarComponentAsDouble(x, y, z, 0)
    np.testing.assert_array_equal(vol.array, array)
    # spacing in (z, y, x) order
    np.testing.assert_allclose(vol.spacing, SPACING_IJK[::-1], atol=1e-9)
    # every voxel maps to the same world point as Slicer's IJKToRAS (+ parent transform) says, RAS and LPS
    for zyx in [(0, 0, 0), (8, 10, 12), (3.5, 7.25, 2.0), (5, 0, 11)]:
        ijk = zyx[::-1]
        expected_ras = ijk_to_world(node, ijk)
        np.testing.assert_allclose(vol.voxel_to_world(zyx, ras=True), expected_ras, atol=1e-9)
        np.testing.assert_allclose(vol.voxel_to_world(zyx), expected_ras * [-1, -1, 1], atol=1e-9)
        np.testing.assert_allclose(LL.worldRASToVoxel(vol, expected_ras), zyx, atol=1e-9)


def test_volume_with_nonzero_extent_start(LL, scene):
    node, _ = make_volume_node(scene, directions=np.eye(3))
    image = node.GetImageData()
    image.SetExtent(2, 14, -1, 9, 4, 12)  # same dims, IJK of element (0, 0, 0) is (2, -1, 4)
    vol = LL.volumeFromVolumeNode(node)
    np.testing.assert_allclose(vol.voxel_to_world((0, 0, 0), ras=True), ijk_to_world(node, (2, -1, 4)), atol=1e-9)


def test_sheared_or_nonlinear_transform_is_refused(LL, scene):
    node, _ = make_volume_node(scene)
    shear = np.eye(4)
    shear[0, 1] = 0.4
    t = add_linear_transform(scene, shear)
    node.SetAndObserveTransformNodeID(t.GetID())
    with pytest.raises(LL.LesionLocatorInputError, match="sheared"):
        LL.volumeFromVolumeNode(node)

    grid = vtk.vtkGridTransform()
    disp = vtk.vtkImageData()
    disp.SetDimensions(2, 2, 2)
    disp.SetSpacing(100, 100, 100)
    disp.SetOrigin(-50, -50, -50)
    disp.AllocateScalars(vtk.VTK_DOUBLE, 3)
    disp.GetPointData().GetScalars().Fill(1.0)
    grid.SetDisplacementGridData(disp)
    nonlinear = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    nonlinear.SetAndObserveTransformToParent(grid)
    node.SetAndObserveTransformNodeID(nonlinear.GetID())
    with pytest.raises(LL.LesionLocatorInputError, match="Harden"):
        LL.volumeFromVolumeNode(node)


def test_scaling_transform_is_folded_into_spacing(LL, scene):
    node, _ = make_volume_node(scene)
    t = add_linear_transform(scene, np.diag([2.0, 2.0, 2.0, 1.0]))
    node.SetAndObserveTransformNodeID(t.GetID())
    vol = LL.volumeFromVolumeNode(node)
    np.testing.assert_allclose(vol.spacing, np.array(SPACING_IJK[::-1]) * 2.0, atol=1e-9)


def test_multicomponent_volume_is_refused(LL, scene):
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    image = vtk.vtkImageData()
    image.SetDimensions(4, 4, 4)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    node.SetAndObserveImageData(image)
    with pytest.raises(LL.LesionLocatorInputError, match="components"):
        LL.volumeFromVolumeNode(node)


# ----------------------------------------------------------------------------------------------- prompts
def _place_world(scene, markups, world_ras, transform_matrix=None):
    """Add a control point whose *world* position is ``world_ras`` (its node may be under a transform)."""
    local = np.asarray(world_ras, float)
    if transform_matrix is not None:
        local = (np.linalg.inv(transform_matrix) @ np.append(local, 1.0))[:3]
    return markups.AddControlPoint(vtk.vtkVector3d(*local))


def test_markups_points_to_voxel_prompts(LL, scene, logic):
    node, _ = make_volume_node(scene)
    tv = rigid(rotation(2, 15.0), (4.0, 2.0, -6.0))
    node.SetAndObserveTransformNodeID(add_linear_transform(scene, tv, "volT").GetID())
    vol = LL.volumeFromVolumeNode(node)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    tm = rigid(rotation(0, 40.0), (-7.0, 3.0, 1.5))
    points.SetAndObserveTransformNodeID(add_linear_transform(scene, tm, "ptsT").GetID())
    targets = [(4, 5, 6), (0, 10, 12), (8, 0, 0)]
    for zyx in targets:
        # world position = the voxel centre + a sub-voxel offset that must round back to the voxel
        world = ijk_to_world(node, np.array(zyx[::-1]) + [0.3, -0.2, 0.4])
        _place_world(scene, points, world, tm)
    logic.assignLesionIds([points], [], currentLesionId=None)  # a new lesion each
    assert [LL.lesionIdOfControlPoint(points, i) for i in range(3)] == [1, 2, 3]
    assert points.GetNthControlPointDescription(1) == "lesion 2"
    prompts = logic.collectPrompts(vol, [points], [])
    assert {k: [p.zyx for p in v] for k, v in prompts.items()} == {
        1: [(4.0, 5.0, 6.0)], 2: [(0.0, 10.0, 12.0)], 3: [(8.0, 0.0, 0.0)]}


def test_points_share_current_lesion_and_outside_point_is_refused(LL, scene, logic):
    node, _ = make_volume_node(scene)
    vol = LL.volumeFromVolumeNode(node)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    _place_world(scene, points, ijk_to_world(node, (2, 3, 4)))
    _place_world(scene, points, ijk_to_world(node, (3, 3, 4)))
    logic.assignLesionIds([points], [], currentLesionId=7)
    prompts = logic.collectPrompts(vol, [points], [])
    assert list(prompts) == [7] and len(prompts[7]) == 2
    assert logic.nextLesionId([points]) == 8
    _place_world(scene, points, ijk_to_world(node, (40, 3, 4)))
    LL.setLesionIdOfControlPoint(points, 2, 8)
    with pytest.raises(LL.LesionLocatorInputError, match="outside the baseline"):
        logic.collectPrompts(vol, [points], [])


def test_prompt_without_lesion_id_is_refused(LL, scene, logic):
    node, _ = make_volume_node(scene)
    vol = LL.volumeFromVolumeNode(node)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    _place_world(scene, points, ijk_to_world(node, (2, 3, 4)))
    with pytest.raises(LL.LesionLocatorInputError, match="no lesion id"):
        logic.collectPrompts(vol, [points], [])


def _roi_on_voxels(scene, LL, volume_node, lo_ijk, hi_ijk, transform_matrix=None, name="box"):
    """An ROI aligned with the volume's axes covering voxels lo..hi (inclusive, IJK), in world space."""
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    lo, hi = np.asarray(lo_ijk, float) - 0.5, np.asarray(hi_ijk, float) + 0.5
    spacing = np.array(volume_node.GetSpacing())
    center_world = ijk_to_world(volume_node, (lo + hi) / 2)
    # world axes of the volume (direction columns incl. the volume's parent transform)
    axes = np.stack([ijk_to_world(volume_node, np.eye(3)[a]) - ijk_to_world(volume_node, np.zeros(3))
                     for a in range(3)], axis=1) / spacing
    object_to_world = rigid(axes, center_world)
    object_to_node = object_to_world if transform_matrix is None else np.linalg.inv(transform_matrix) @ object_to_world
    if np.linalg.det(object_to_node[:3, :3]) < 0:  # an ROI frame must be right-handed: flip one axis
        object_to_node[:3, 0] *= -1
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, object_to_node[r, c])
    roi.SetAndObserveObjectToNodeMatrix(m)
    roi.SetSize(*((hi - lo) * spacing))
    if transform_matrix is not None:
        roi.SetAndObserveTransformNodeID(add_linear_transform(scene, transform_matrix, name + "T").GetID())
    return roi


def test_roi_to_voxel_box_with_transforms(LL, scene, logic):
    node, _ = make_volume_node(scene)
    node.SetAndObserveTransformNodeID(add_linear_transform(scene, rigid(rotation(1, 12.0), (1, 2, 3)), "vt").GetID())
    vol = LL.volumeFromVolumeNode(node)
    tm = rigid(rotation(2, -33.0), (9.0, -4.0, 2.0))
    roi = _roi_on_voxels(scene, LL, node, (2, 3, 1), (6, 8, 4), tm)
    LL.setLesionIdOfROI(roi, 4)
    assert roi.GetAttribute(LL.LESION_ID_ATTRIBUTE) == "4"
    box = LL.boxVoxelsFromROI(roi, vol)
    assert box == (1, 5, 3, 9, 2, 7)  # (z0, z1, y0, y1, x0, x1) half-open = IJK lo..hi inclusive
    prompts = logic.collectPrompts(vol, [], [roi])
    assert prompts[4][0].bounds == box


def test_thin_and_clipped_roi(LL, scene):
    node, _ = make_volume_node(scene, directions=np.eye(3))
    vol = LL.volumeFromVolumeNode(node)
    roi = _roi_on_voxels(scene, LL, node, (2, 3, 5), (6, 8, 5))
    roi.SetSize(roi.GetSize()[0], roi.GetSize()[1], 0.0)  # drawn on one slice: zero thickness
    assert LL.boxVoxelsFromROI(roi, vol)[:2] == (5, 6)
    big = _roi_on_voxels(scene, LL, node, (-4, -4, -4), (50, 50, 50), name="big")
    assert LL.boxVoxelsFromROI(big, vol) == (0, 9, 0, 11, 0, 13)
    outside = _roi_on_voxels(scene, LL, node, (100, 100, 100), (110, 110, 110), name="far")
    with pytest.raises(LL.LesionLocatorInputError, match="outside"):
        LL.boxVoxelsFromROI(outside, vol)


# ----------------------------------------------------------------------------------------------- segments
def _lesion(lid, bbox, mask, status="found"):
    from LesionLocatorLib.core.results import LesionMask

    return LesionMask(lid, tuple(bbox), np.asarray(mask, bool), None, status)


def _result(vol, lesions):
    from LesionLocatorLib.core.results import SegmentationResult

    return SegmentationResult(vol, {l.lesion_id: l for l in lesions})


def _labelmap_via_export(scene, seg_node, segment_id, volume_node):
    """Independent read-back: Slicer's own export of a segment onto the volume's grid."""
    lm = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "tmp")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, ids, lm, volume_node)
    dims = lm.GetImageData().GetDimensions()
    arr = numpy_support.vtk_to_numpy(lm.GetImageData().GetPointData().GetScalars()).reshape(dims[::-1]).copy()
    scene.RemoveNode(lm)
    return arr


def test_result_to_segments_names_colours_geometry(LL, scene, logic):
    node, _ = make_volume_node(scene)
    node.SetAndObserveTransformNodeID(add_linear_transform(scene, rigid(rotation(0, 20.0), (3, 0, -2))).GetID())
    vol = LL.volumeFromVolumeNode(node)
    rng = np.random.default_rng(1)
    m1 = rng.random((3, 4, 5)) > 0.4
    m2 = np.ones((2, 2, 2), bool)  # overlaps lesion 1: both must survive
    res = _result(vol, [_lesion(1, (2, 5, 3, 7, 4, 9), m1), _lesion(2, (3, 5, 4, 6, 5, 7), m2),
                        _lesion(3, (0, 0, 0, 0, 0, 0), np.zeros((0, 0, 0)), "not found")])
    not_found = logic.applyResult(node, res)
    assert not_found == [3]
    seg_node = logic.segmentationNodeForVolume(node, create=False)
    assert seg_node is not None and seg_node.GetNodeReference(LL.SOURCE_VOLUME_REFERENCE) is node
    assert seg_node.GetParentTransformNode() is node.GetParentTransformNode()
    seg = seg_node.GetSegmentation()
    for lid in (1, 2, 3):
        s = seg.GetSegment(LL.segmentIdForLesion(lid))
        assert s is not None and s.GetName() == f"Lesion {lid}"
        np.testing.assert_allclose(s.GetColor(), LL.lesionColor(lid), atol=1e-6)
    # Slicer's own export onto the volume grid puts lesion 1 exactly where the crop says
    full1 = res.lesions[1].full(vol.shape)
    np.testing.assert_array_equal(_labelmap_via_export(scene, seg_node, "Lesion_1", node) > 0, full1 > 0)
    np.testing.assert_array_equal(_labelmap_via_export(scene, seg_node, "Lesion_2", node) > 0,
                                  res.lesions[2].full(vol.shape) > 0)
    # and the module's own read-back agrees
    back = logic.segmentationResultFromNode(node)
    np.testing.assert_array_equal(back.mask(1), full1)
    assert back.lesions[3].status == "not found" and back.lesions[3].empty
    assert logic.notFoundLesions([node]) == [(node.GetName(), 3)]


def test_segment_on_other_geometry_is_resampled(LL, scene, logic):
    node, _ = make_volume_node(scene, directions=np.eye(3), spacing=(1.0, 1.0, 1.0), origin=(0, 0, 0))
    seg_node = logic.segmentationNodeForVolume(node)
    seg_node.GetSegmentation().AddEmptySegment("Lesion_5", "Lesion 5", [1, 0, 0])
    # a segment on a grid with 0.5 mm voxels (as after an oversampled edit): IJK 4..7 -> mm 2.0..3.5
    fine = slicer.vtkOrientedImageData()
    fine.SetExtent(4, 7, 4, 7, 4, 7)
    fine.SetSpacing(0.5, 0.5, 0.5)
    fine.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    fine.GetPointData().GetScalars().Fill(1)
    L = slicer.vtkSlicerSegmentationsModuleLogic
    assert L.SetBinaryLabelmapToSegment(fine, seg_node, "Lesion_5", L.MODE_REPLACE)
    back = logic.segmentationResultFromNode(node)
    mask = back.mask(5)
    assert mask[2:4, 2:4, 2:4].all() and mask.sum() == 8


def test_undo_restores_previous_segments(LL, scene, logic):
    node, _ = make_volume_node(scene)
    vol = LL.volumeFromVolumeNode(node)
    first = _result(vol, [_lesion(1, (1, 3, 1, 3, 1, 3), np.ones((2, 2, 2)))])
    second = _result(vol, [_lesion(1, (4, 6, 4, 6, 4, 6), np.ones((2, 2, 2))),
                           _lesion(2, (0, 1, 0, 1, 0, 1), np.ones((1, 1, 1)))])
    logic.applyResult(node, first, "first")
    logic.applyResult(node, second, "second")
    seg = logic.segmentationNodeForVolume(node).GetSegmentation()
    np.testing.assert_array_equal(logic.segmentationResultFromNode(node).mask(1), second.lesions[1].full(vol.shape))
    assert logic.undoLastResult() == "second"
    np.testing.assert_array_equal(logic.segmentationResultFromNode(node).mask(1), first.lesions[1].full(vol.shape))
    assert seg.GetSegment("Lesion_2") is None
    assert logic.undoLastResult() == "first"
    assert seg.GetSegment("Lesion_1") is None
    assert logic.undoLastResult() is None and not logic.canUndo()


def test_undo_restores_not_found_status(LL, scene, logic):
    node, _ = make_volume_node(scene)
    vol = LL.volumeFromVolumeNode(node)
    logic.applyResult(node, _result(vol, [_lesion(1, (0, 0, 0, 0, 0, 0), np.zeros((0, 0, 0)), "not found")]))
    logic.applyResult(node, _result(vol, [_lesion(1, (1, 2, 1, 2, 1, 2), np.ones((1, 1, 1)))]))
    assert logic.lesionStatuses(node) == {1: "found"}
    logic.undoLastResult()
    assert logic.lesionStatuses(node) == {1: "not found"}
    assert logic.segmentationResultFromNode(node).lesions[1].empty


# ----------------------------------------------------------------------------------------------- report
def test_report_table_plot_and_csv(LL, scene, logic, tmp_path):
    base, _ = make_volume_node(scene, name="baseline", directions=np.eye(3), spacing=(1.0, 1.0, 2.0))
    fu, _ = make_volume_node(scene, name="follow-up", directions=np.eye(3), spacing=(1.0, 1.0, 2.0), seed=1)
    vb, vf = LL.volumeFromVolumeNode(base), LL.volumeFromVolumeNode(fu)
    logic.applyResult(base, _result(vb, [_lesion(1, (2, 5, 2, 6, 2, 6), np.ones((3, 4, 4))),
                                         _lesion(2, (6, 8, 6, 8, 6, 8), np.ones((2, 2, 2)))]))
    # lesion 2 is lost at follow-up: it must stay in the report as 'not found'
    logic.applyResult(fu, _result(vf, [_lesion(1, (2, 4, 2, 6, 2, 6), np.ones((2, 4, 4))),
                                       _lesion(2, (0, 0, 0, 0, 0, 0), np.zeros((0, 0, 0)), "not found")]))
    report = logic.buildReport([base, fu])
    rows = report.rows()
    assert len(rows) == 4
    table = logic.reportToTable(report)
    assert table.GetNumberOfRows() == 4
    names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert names == list(rows[0].keys())
    by = {(r["timepoint"], r["lesion_id"]): r for r in rows}
    assert by[("follow-up", 2)]["status"] == "not found"
    # lesion 1: 3*4*4 voxels of 2 mm^3 at baseline = 0.096 ml
    assert by[("baseline", 1)]["volume_ml"] == pytest.approx(3 * 4 * 4 * 2.0 / 1000)
    col = names.index("volume_ml")
    got = sorted(table.GetTable().GetValue(r, col).ToDouble() for r in range(4))
    assert got == pytest.approx(sorted(r["volume_ml"] for r in rows))
    chart = logic.volumePlot(report)
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    s1 = chart.GetNthPlotSeriesNode(0)
    np.testing.assert_allclose(s1.GetColor(), LL.lesionColor(1), atol=1e-6)
    out = logic.exportTableCSV(table, str(tmp_path / "report.csv"))
    with open(out, newline="") as f:
        parsed = list(csv.DictReader(f))
    assert len(parsed) == 4 and list(parsed[0].keys()) == names
    assert float(parsed[0]["volume_ml"]) == pytest.approx(rows[0]["volume_ml"])
    # a second update reuses the chart's series instead of adding new ones
    logic.volumePlot(report, chart)
    assert chart.GetNumberOfPlotSeriesNodes() == 2


def test_report_without_lesions_is_refused(LL, scene, logic):
    base, _ = make_volume_node(scene)
    with pytest.raises(LL.LesionLocatorInputError, match="no lesion"):
        logic.buildReport([base])


def test_tracking_needs_baseline_segments(LL, scene, logic):
    base, _ = make_volume_node(scene, name="b")
    fu, _ = make_volume_node(scene, name="f")
    with pytest.raises(LL.LesionLocatorInputError, match="segment at least one lesion"):
        logic.prepareTracking(base, [fu])
    with pytest.raises(LL.LesionLocatorInputError, match="follow-up"):
        logic.prepareTracking(base, [])


# ----------------------------------------------------------------------------------------------- inference
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, LL):
    pytest.importorskip("torch")
    pytest.importorskip("dynamic_network_architectures")
    return LL.makeTinyTestModel(str(tmp_path_factory.mktemp("tiny_model")))


def _direct_session(model, volume, folds=(0,), tta=False):
    from LesionLocatorLib.backend import open_backend

    session = open_backend(model=model, device="cpu", folds=folds, tta=tta).session()
    session.set_image(volume)
    return session


def test_segment_with_the_backend_session_matches_a_direct_call(LL, scene, logic, tiny_model):
    from LesionLocatorLib.core.prompts import Box, Point

    node, _ = make_volume_node(scene, shape_zyx=(14, 20, 22), spacing=(1.6, 1.8, 2.5))
    node.SetAndObserveTransformNodeID(add_linear_transform(scene, rigid(rotation(2, 8.0), (1, 1, 1))).GetID())
    vol = LL.volumeFromVolumeNode(node)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    _place_world(scene, points, ijk_to_world(node, (10, 9, 7)))
    LL.setLesionIdOfControlPoint(points, 0, 7)  # lesion ids travel unchanged (no renumbering)
    roi = _roi_on_voxels(scene, LL, node, (3, 4, 2), (8, 10, 6))
    LL.setLesionIdOfROI(roi, 2)

    logic.configure(modelPath=tiny_model, device="cpu", speedPreset="fastest")
    seen = []
    not_found = logic.segment(node, [points], [roi], progress=lambda f, m: seen.append(f))
    assert seen and seen[-1] == 1.0
    expected = _direct_session(tiny_model, vol).segment(prompts={7: Point((7.0, 9.0, 10.0)), 2: Box((2, 7, 4, 11, 3, 9))})
    back = logic.segmentationResultFromNode(node)
    assert sorted(back.lesions) == [2, 7]
    for lid in (2, 7):
        np.testing.assert_array_equal(back.mask(lid), expected.mask(lid))
        assert (lid in not_found) == expected.lesions[lid].empty
    assert logic.canUndo()
    # cancelling stops before any inference
    import threading

    job = logic.prepareSegmentation(node, [points], [roi])
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(LL.CancelledError):
        logic.computeSegmentation(job, cancelEvent=cancel)


def test_speed_preset_reaches_the_backend(LL, logic, tiny_model):
    logic.configure(modelPath=tiny_model, device="cpu", speedPreset="fast")
    settings = logic.openBackend().describe()
    assert settings["tta"] is True and list(settings["default_folds"]) == [0]
    assert logic.openBackend() is logic.openBackend()  # reused while the settings stay
    logic.configure(modelPath=tiny_model, device="cpu", speedPreset="fastest")
    assert logic.openBackend().describe()["tta"] is False


def test_several_prompts_of_one_lesion_follow_the_library_rule(LL, scene, logic, tiny_model):
    from LesionLocatorLib.core.prompts import Box, Point

    node, _ = make_volume_node(scene, shape_zyx=(12, 16, 16), directions=np.eye(3), spacing=(2.0, 2.0, 2.0))
    vol = LL.volumeFromVolumeNode(node)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    for ijk in [(4, 4, 3), (11, 10, 8)]:
        _place_world(scene, points, ijk_to_world(node, ijk))
    logic.assignLesionIds([points], [], currentLesionId=3)
    logic.configure(modelPath=tiny_model, device="cpu", speedPreset="fastest")
    logic.segment(node, [points], [])
    session = _direct_session(tiny_model, vol)
    exp = session.segment(prompts={3: [Point((3.0, 4.0, 4.0)), Point((8.0, 10.0, 11.0))]})
    np.testing.assert_array_equal(logic.segmentationResultFromNode(node).mask(3), exp.mask(3))
    # a box of the same lesion replaces its points
    roi = _roi_on_voxels(scene, LL, node, (3, 4, 2), (8, 10, 6))
    LL.setLesionIdOfROI(roi, 3)
    logic.segment(node, [points], [roi])
    exp = session.segment(prompts={3: [Box((2, 7, 4, 11, 3, 9))]})
    np.testing.assert_array_equal(logic.segmentationResultFromNode(node).mask(3), exp.mask(3))


def test_missing_model_is_explained(LL, logic, tmp_path):
    logic.configure(modelPath=str(tmp_path / "nope"), device="cpu")
    with pytest.raises(LL.LesionLocatorInputError, match="model not found"):
        logic.openBackend()
    with pytest.raises(LL.LesionLocatorInputError, match="unknown speed preset"):
        logic.configure(speedPreset="turbo")


def test_cached_image_is_not_copied_and_new_model_gets_its_own_copy(LL, scene, logic, tiny_model):
    node, _ = make_volume_node(scene, shape_zyx=(10, 12, 12), directions=np.eye(3), spacing=(2.0, 2.0, 2.0))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    _place_world(scene, points, ijk_to_world(node, (6, 6, 5)))
    logic.assignLesionIds([points], [], currentLesionId=1)
    logic.configure(modelPath=tiny_model, device="cpu", speedPreset="fastest")
    logic.segment(node, [points], [])
    job = logic.prepareSegmentation(node, [points], [])
    assert not job.volume.array.flags.owndata  # the session holds this image already: geometry only
    logic.configure(modelPath=tiny_model, device="cpu", speedPreset="fast")  # another backend (TTA)
    logic.applySegmentation(job, logic.computeSegmentation(job))
    held = logic._session.image.array
    assert held.flags.owndata  # never a view of MRML memory that Slicer may free
    np.testing.assert_array_equal(held, LL.volumeFromVolumeNode(node).array)


# ----------------------------------------------------------------------------------------------- server backend
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server_url(tiny_model, tmp_path_factory):
    """``python -m LesionLocatorLib.serve.server`` with the tiny model, as a child process on a loopback port."""
    import os
    import subprocess

    for mod in ("fastapi", "uvicorn", "requests", "zstandard"):
        pytest.importorskip(mod)
    from LesionLocatorLib.serve.client import ServerError, wait_for_server

    tmp = tmp_path_factory.mktemp("server")
    token = "slicer-logic-test-token-0123456789"
    (tmp / "tokens.txt").write_text(token + "\n")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "LesionLocatorLib.serve.server", "-m", tiny_model, "--host", "127.0.0.1",
                             "--port", str(port), "--device", "cpu", "--token-file", str(tmp / "tokens.txt"),
                             "--log-level", "warning", "--no-warmup"],
                            cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_server(url, timeout_s=90, token=token)
    except ServerError:
        proc.kill()
        proc.wait(timeout=30)
        log.close()
        raise AssertionError("server did not start:\n" + (tmp / "server.log").read_text()[-3000:])
    yield url, token
    proc.kill()
    proc.wait(timeout=30)
    log.close()


def test_server_backend_gives_the_local_result(LL, scene, tiny_model, server_url):
    url, token = server_url
    node, _ = make_volume_node(scene, shape_zyx=(12, 18, 18), spacing=(1.6, 1.8, 2.5))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    _place_world(scene, points, ijk_to_world(node, (9, 8, 6)))
    LL.setLesionIdOfControlPoint(points, 0, 1)
    roi = _roi_on_voxels(scene, LL, node, (2, 3, 2), (7, 9, 5))
    LL.setLesionIdOfROI(roi, 2)

    remote = LL.LesionLocatorLogic(scene=scene)
    remote.configure(backend=LL.BACKEND_SERVER, serverUrl=url, serverToken=token, speedPreset="fastest")
    assert "server" in remote.testServerConnection().lower()
    remote.segment(node, [points], [roi])
    got = remote.segmentationResultFromNode(node)

    local_scene = slicer.vtkMRMLScene()
    local_node, _ = make_volume_node(local_scene, shape_zyx=(12, 18, 18), spacing=(1.6, 1.8, 2.5))
    local = LL.LesionLocatorLogic(scene=local_scene)
    local.configure(modelPath=tiny_model, device="cpu", speedPreset="fastest")
    job = remote.prepareSegmentation(node, [points], [roi])  # same prompts, read from the same markups
    local_result = local.computeSegmentation(job)
    for lid in (1, 2):
        np.testing.assert_array_equal(got.mask(lid), local_result.mask(lid))


def test_server_errors_name_the_cause(LL, scene, server_url):
    url, _ = server_url
    wrong_token = LL.LesionLocatorLogic(scene=scene)
    wrong_token.configure(backend=LL.BACKEND_SERVER, serverUrl=url, serverToken="not-the-token")
    with pytest.raises(OSError) as info:
        wrong_token.testServerConnection()
        session = wrong_token.openBackend().session()
        session.set_image(LL.volumeFromVolumeNode(make_volume_node(scene)[0]))
    assert "token" in LL.describeError(info.value).lower()
    unreachable = LL.LesionLocatorLogic(scene=scene)
    unreachable.configure(backend=LL.BACKEND_SERVER, serverUrl=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(OSError) as info:
        unreachable.testServerConnection()
    assert "cannot reach" in LL.describeError(info.value)


def test_separate_process_backend_matches_local_and_survives_a_crash(LL, scene, tiny_model):
    """'Separate process on this computer': the module runs the server on loopback with a random token; torch
    dying there (killed here like an out-of-memory kill) costs one request, not Slicer."""
    import os
    import signal

    for mod in ("fastapi", "uvicorn", "requests", "zstandard"):
        pytest.importorskip(mod)
    node, _ = make_volume_node(scene, shape_zyx=(12, 18, 18), spacing=(1.6, 1.8, 2.5))
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
    _place_world(scene, points, ijk_to_world(node, (9, 8, 6)))
    LL.setLesionIdOfControlPoint(points, 0, 5)
    logic = LL.LesionLocatorLogic(scene=scene)
    logic.configure(backend=LL.BACKEND_PROCESS, modelPath=tiny_model, device="cpu", speedPreset="fastest")
    try:
        job = logic.prepareSegmentation(node, [points], [])
        got = logic.computeSegmentation(job)
        process = logic._process
        assert process.alive() and process.url.startswith("http://127.0.0.1:")
        assert oct(os.stat(os.path.join(process._dir, "token")).st_mode & 0o777) == "0o600"
        assert process.token not in " ".join(process._proc.args)  # never on the command line
        expected = _direct_session(tiny_model, job.volume).segment(prompts=job.prompts)
        np.testing.assert_array_equal(got.mask(5), expected.mask(5))

        os.kill(process._proc.pid, signal.SIGKILL)
        process._proc.wait(timeout=30)
        again = logic.computeSegmentation(job)  # this process lives on; the next request starts a new server
        assert logic._process is not process and logic._process.alive()
        np.testing.assert_array_equal(again.mask(5), expected.mask(5))
    finally:
        logic.closeBackend()
        logic.stopInferenceProcess()
    assert logic._process is None


def test_undo_snapshots_are_cropped_to_the_lesion(LL, scene, logic):
    """A whole-volume labelmap (as Segment Editor layers can be) is stored for undo as the lesion's box only."""
    from vtk.util import numpy_support as ns

    node, _ = make_volume_node(scene, directions=np.eye(3))
    vol = LL.volumeFromVolumeNode(node)
    full = np.zeros(vol.shape, bool)
    full[2:4, 3:6, 4:9] = True
    image = LL.orientedImageFromMask(node, (0, 9, 0, 11, 0, 13), full)
    assert image.GetExtent() == (0, 12, 0, 10, 0, 8)
    tight = LL.tightOrientedImageCopy(image)
    assert tight.GetExtent() == (4, 8, 3, 5, 2, 3)
    assert ns.vtk_to_numpy(tight.GetPointData().GetScalars()).all()
    assert LL.tightOrientedImageCopy(LL.orientedImageFromMask(node, (0, 1, 0, 1, 0, 1), np.zeros((1, 1, 1)))
                                     ).GetPointData().GetScalars() is None
    logic.applyResult(node, _result(vol, [_lesion(1, (0, 9, 0, 11, 0, 13), full)]))
    seg = logic.segmentationNodeForVolume(node)
    assert logic._snapshot(seg, 1).previous.GetExtent() == (4, 8, 3, 5, 2, 3)
    logic.applyResult(node, _result(vol, [_lesion(1, (0, 1, 0, 1, 0, 1), np.ones((1, 1, 1)))]))
    logic.undoLastResult()
    np.testing.assert_array_equal(logic.segmentationResultFromNode(node).mask(1).astype(bool), full)


def test_tracking_results_to_follow_up_segments(LL, scene, logic):
    """prepareTracking reads the baseline segments; tracker output becomes per-follow-up segments (one undo step)."""
    base, _ = make_volume_node(scene, name="baseline")
    fu1, _ = make_volume_node(scene, name="fu1", shape_zyx=(10, 12, 11), seed=1)
    fu2, _ = make_volume_node(scene, name="fu2", shape_zyx=(8, 11, 13), seed=2)
    fu1.SetAndObserveTransformNodeID(add_linear_transform(scene, rigid(rotation(2, 5.0), (2, 0, 0))).GetID())
    vb = LL.volumeFromVolumeNode(base)
    logic.applyResult(base, _result(vb, [_lesion(1, (2, 5, 3, 7, 4, 9), np.ones((3, 4, 5))),
                                         _lesion(2, (6, 8, 1, 3, 1, 3), np.ones((2, 2, 2)))]))
    job = logic.prepareTracking(base, [fu1, fu2])
    assert job.lesionIds == [1, 2] and len(job.followUps) == 2
    np.testing.assert_array_equal(LL.LesionLocatorLogic.completeTrackingResults(job, [
        _result(job.followUps[0], []), _result(job.followUps[1], [])])[0].lesions[1].mask, np.zeros((0, 0, 0)))
    v1, v2 = job.followUps
    # what a tracker returns: lesion 1 found in both follow-ups, lesion 2 only in the first
    results = LL.LesionLocatorLogic.completeTrackingResults(job, [
        _result(v1, [_lesion(1, (3, 6, 3, 7, 4, 8), np.ones((3, 4, 4))), _lesion(2, (5, 7, 1, 3, 1, 3), np.ones((2, 2, 2)))]),
        _result(v2, [_lesion(1, (2, 4, 3, 7, 4, 9), np.ones((2, 4, 5)))]),
    ])
    assert results[1].lesions[2].status == "not found"
    not_found = logic.applyTracking(job, results)
    assert not_found == [("fu2", 2)]
    for node, res in ((fu1, results[0]), (fu2, results[1])):
        seg = logic.segmentationNodeForVolume(node, create=False)
        assert seg.GetParentTransformNode() is node.GetParentTransformNode()
        back = logic.segmentationResultFromNode(node)
        np.testing.assert_array_equal(back.mask(1), res.lesions[1].full(res.shape))
        np.testing.assert_allclose(seg.GetSegmentation().GetSegment("Lesion_1").GetColor(), LL.lesionColor(1), atol=1e-6)
    report = logic.buildReport([base, fu1, fu2])
    assert len(report.rows()) == 6
    assert logic.undoLastResult() == "track lesions"
    assert logic.segmentationNodeForVolume(fu1, create=False).GetSegmentation().GetNumberOfSegments() == 0
    with pytest.raises(RuntimeError, match="results for 2 follow-ups"):
        LL.LesionLocatorLogic.completeTrackingResults(job, [_result(v1, [])])


def test_track_lesions_with_the_bundled_model(LL, scene, logic):
    """The bundled model has no Track folder: the library's tracker propagates classically (issue 10)."""
    pytest.importorskip("torch")
    if LL.defaultModelPath() is None:
        pytest.skip("this build ships no bundled model")
    base, _ = make_volume_node(scene, name="b", shape_zyx=(16, 20, 20), directions=np.eye(3), spacing=(2.0, 2.0, 2.0))
    fu, _ = make_volume_node(scene, name="f", shape_zyx=(16, 20, 20), directions=np.eye(3), spacing=(2.0, 2.0, 2.0))
    vb = LL.volumeFromVolumeNode(base)
    logic.applyResult(base, _result(vb, [_lesion(4, (6, 10, 7, 12, 7, 12), np.ones((4, 5, 5)))]))
    logic.configure(device="cpu", speedPreset="fastest")  # no model path: the bundled model
    job = logic.prepareTracking(base, [fu])
    results = logic.computeTracking(job)
    assert len(results) == 1 and sorted(results[0].lesions) == [4]
    logic.applyTracking(job, results)
    assert sorted(logic.lesionStatuses(fu)) == [4]


def test_scene_import_keeps_the_segmentation_volume_link(LL, scene, logic, tmp_path):
    """MRML remaps node references on import, not node-ID attributes (defect 7)."""
    node, _ = make_volume_node(scene, name="ct")
    vol = LL.volumeFromVolumeNode(node)
    logic.applyResult(node, _result(vol, [_lesion(1, (2, 5, 3, 7, 4, 9), np.ones((3, 4, 5), bool))]))
    scene.SetURL(str(tmp_path / "saved.mrml"))
    scene.SetRootDirectory(str(tmp_path))
    assert scene.Commit()
    other = slicer.vtkMRMLScene()
    for i in range(3):  # occupy the IDs the saved scene uses: import must rename its nodes
        make_volume_node(other, name=f"existing{i}")
        other.AddNewNodeByClass("vtkMRMLSegmentationNode", f"existing seg {i}")
    other.SetURL(str(tmp_path / "saved.mrml"))
    assert other.Import()
    imported = [other.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                for i in range(other.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    ct = next(n for n in imported if n.GetName() == "ct")
    assert ct.GetID() != node.GetID(), "the test needs the import to rename the volume"
    other_logic = LL.LesionLocatorLogic(scene=other)
    seg = other_logic.segmentationNodeForVolume(ct, create=False)
    assert seg is not None and seg.GetName() == "ct lesions"


def test_legacy_attribute_link_is_migrated(LL, scene, logic):
    node, _ = make_volume_node(scene)
    old = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "old lesions")
    old.SetAttribute(LL.SOURCE_VOLUME_ATTRIBUTE, node.GetID())
    assert logic.segmentationNodeForVolume(node, create=False) is old
    assert old.GetNodeReference(LL.SOURCE_VOLUME_REFERENCE) is node and old.GetAttribute(LL.SOURCE_VOLUME_ATTRIBUTE) is None


@pytest.mark.parametrize("moved", ["volume", "segmentation"])
def test_masks_land_on_the_volume_after_a_transform_change(LL, scene, logic, moved):
    """Volume or segmentation put under another transform after the segmentation was created (defect 8)."""
    node, _ = make_volume_node(scene, directions=np.eye(3), spacing=(1.0, 1.0, 1.0))
    vol = LL.volumeFromVolumeNode(node)
    first = np.ones((2, 2, 2), bool)
    logic.applyResult(node, _result(vol, [_lesion(1, (1, 3, 1, 3, 1, 3), first)]))
    seg = logic.segmentationNodeForVolume(node, create=False)
    t = add_linear_transform(scene, rigid(np.eye(3), (3.0, -2.0, 4.0)))
    (node if moved == "volume" else seg).SetAndObserveTransformNodeID(t.GetID())
    mask = np.zeros((3, 4, 2), bool)
    mask[1:, 1:3, :] = True
    logic.applyResult(node, _result(vol, [_lesion(2, (4, 7, 5, 9, 6, 8), mask)]))
    back = logic.segmentationResultFromNode(node)  # read on the volume's grid, wherever both are now
    expected = np.zeros(vol.shape, bool)
    expected[4:7, 5:9, 6:8] = mask
    np.testing.assert_array_equal(back.mask(2).astype(bool), expected)


def test_requirements_and_missing_dependencies(LL, tmp_path):
    reqs = LL.parseRequirements()
    by = {r.spec.split(">")[0].split("=")[0].strip(): r for r in reqs}
    assert by["dynamic-network-architectures"].noDeps and by["icon-registration"].noDeps
    assert not by["numpy"].noDeps and by["SimpleITK"].importName == "SimpleITK"
    assert "connected-components-3d" not in by  # declared once but never imported (issue 10)
    custom = tmp_path / "requirements.txt"
    custom.write_text("numpy  # import: numpy\n# [no-deps]\nnot-a-real-package-xyz>=1  # import: not_a_real_package_xyz\n")
    parsed = LL.parseRequirements(str(custom))
    assert [r.noDeps for r in parsed] == [False, True]
    torch = [] if importlib.util.find_spec("torch") is not None else ["torch"]
    assert LL.missingDependencies(parsed) == torch + ["not_a_real_package_xyz"]  # numpy is installed here


def test_error_messages_for_users(LL):
    assert "Install dependencies" in LL.describeError(LL.DependencyError("torch is missing"))
    assert "Fastest" in LL.describeError(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert LL.describeError(LL.LesionLocatorInputError("select the baseline volume")) == "select the baseline volume"
    assert LL.describeError(KeyError("x")).startswith("KeyError")
