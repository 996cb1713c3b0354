"""The module's Qt-free controller (LesionLocator/LesionLocatorModuleLib/controller.py) under slicer-core.

Real MRML scene, real markups nodes firing their own events (a point added fires PointPositionDefinedEvent,
an ROI's second click replaces its two corner points by one centre point, ...), the real Logic and the real
library with a tiny random-weight model. The scheduler is a small event loop on the test thread with
QTimer semantics; it can hold the GIL between events the way Slicer's Qt event loop does.
"""
from __future__ import annotations

import ctypes
import gc
import importlib.util
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

try:
    import slicer

    _HAVE_MRML = hasattr(slicer, "vtkMRMLScene") and hasattr(slicer, "vtkMRMLMarkupsROINode")
    _REASON = "slicer is importable but has no MRML classes"
except ImportError as exc:
    _HAVE_MRML = False
    _REASON = f"MRML not available ({exc}); install the slicer-core wheel (pip install slicer-core)"

pytestmark = pytest.mark.skipif(not _HAVE_MRML, reason=_REASON)

if _HAVE_MRML:
    import vtk
    from vtk.util import numpy_support


def _load():
    if "LesionLocator" not in sys.modules or not hasattr(sys.modules["LesionLocator"], "LesionLocatorLogic"):
        spec = importlib.util.spec_from_file_location("LesionLocator", REPO / "LesionLocator" / "LesionLocator.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["LesionLocator"] = module
        spec.loader.exec_module(module)
    if str(REPO / "LesionLocator") not in sys.path:
        sys.path.insert(0, str(REPO / "LesionLocator"))
    from LesionLocatorModuleLib import controller

    return sys.modules["LesionLocator"], controller


@pytest.fixture(scope="module")
def mods():
    return _load()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, mods):
    pytest.importorskip("torch")
    LL, _ = mods
    return LL.makeTinyTestModel(str(tmp_path_factory.mktemp("tiny_model")))


# ----------------------------------------------------------------------------------------------- event loop
_libc = ctypes.PyDLL(None)  # PyDLL: the call keeps the GIL, as Qt's event loop does inside PythonQt


def hold_gil(seconds: float) -> None:
    if seconds > 0:
        _libc.usleep(ctypes.c_uint(int(seconds * 1e6)))


class LoopScheduler:
    """callLater / startRepeating / stopRepeating with QTimer semantics, driven by ``run``.

    hold_gil=True: between events the main thread sits in C holding the GIL (Slicer's situation).
    """

    def __init__(self, hold_gil: bool = False):
        self.hold_gil = hold_gil
        self.later = []
        self.callback = None
        self.interval = 0.0
        self.due = 0.0
        self.ticks = 0

    def callLater(self, callback):
        self.later.append(callback)

    def startRepeating(self, intervalMs, callback):
        self.interval, self.callback = intervalMs / 1000.0, callback
        self.due = time.monotonic() + self.interval

    def stopRepeating(self):
        self.callback = None

    def run_pending(self):
        while self.later:
            self.later.pop(0)()

    def run(self, until=lambda: False, timeout=120.0):
        deadline = time.monotonic() + timeout
        while True:
            self.run_pending()
            if until() or (self.callback is None and not self.later):
                return
            if time.monotonic() > deadline:
                raise TimeoutError("event loop timed out")
            wait = max(0.0, self.due - time.monotonic())
            hold_gil(wait) if self.hold_gil else time.sleep(wait)
            if self.callback is not None:
                self.due = time.monotonic() + self.interval  # QTimer: next timeout one interval after this one
                self.ticks += 1
                self.callback()


class RecordingView:
    def __init__(self):
        self.errors, self.statuses, self.progress = [], [], []

    def showError(self, message):
        self.errors.append(message)

    def showStatus(self, message):
        self.statuses.append(message)

    def showProgress(self, fraction, message):
        self.progress.append(fraction)

    def stateChanged(self):
        pass

    def showReport(self, table, chart):
        self.reports = getattr(self, "reports", []) + [(table, chart)]


# ----------------------------------------------------------------------------------------------- scene
def make_volume(scene, shape=(16, 24, 24), name="baseline", spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)):
    zz, yy, xx = np.mgrid[:shape[0], :shape[1], :shape[2]]
    array = np.full(shape, -800, np.int16)
    array[(zz - 8) ** 2 + (yy - 12) ** 2 + (xx - 12) ** 2 <= 16] = 60
    array[(zz - 8) ** 2 + (yy - 5) ** 2 + (xx - 18) ** 2 <= 4] = 40
    image = vtk.vtkImageData()
    image.SetDimensions(shape[2], shape[1], shape[0])
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(image)
    node.SetSpacing(*spacing)
    node.SetOrigin(*origin)
    return node


def add_singletons(scene):
    """The selection and interaction nodes Slicer's application logic adds to every scene."""
    for node in (slicer.vtkMRMLSelectionNode(), slicer.vtkMRMLInteractionNode()):
        node.SetSingletonTag("Singleton")
        scene.AddNode(node)


class Rig:
    def __init__(self, mods, model, hold_gil=False):
        # destroy the MRML objects of earlier tests now, on this thread: left to the cyclic GC they can be
        # destroyed on a worker thread in the middle of this test, concurrently with MRML's event broker
        gc.collect()
        self.LL, self.C = mods
        self.scene = slicer.vtkMRMLScene()
        add_singletons(self.scene)
        self.logic = self.LL.LesionLocatorLogic(scene=self.scene)
        self.state = self.C.ControllerState()
        self.loop = LoopScheduler(hold_gil)
        self.view = RecordingView()
        self.ctl = self.C.LesionLocatorController(self.logic, self.state, self.loop, self.view, createSurfaces=False)
        self.baseline = make_volume(self.scene)
        self.state.baselineVolume = self.baseline
        self.state.modelPath = model or ""
        self.state.device = "cpu"
        self.state.speedPreset = "fastest"
        self.ctl.ensurePromptPoints()
        self.volume = self.LL.volumeFromVolumeNode(self.baseline)

    def ras(self, zyx):
        return self.volume.voxel_to_world(zyx, ras=True)

    def click_point(self, zyx):
        return self.state.promptPoints.AddControlPointWorld(vtk.vtkVector3d(*self.ras(zyx)))

    def click_box_corner(self, roi, zyx):
        roi.AddControlPointWorld(vtk.vtkVector3d(*self.ras(zyx)))

    def settle(self):
        self.loop.run(until=lambda: not self.ctl.busy and not self.loop.later)

    def segment_ids(self):
        seg = self.logic.segmentationNodeForVolume(self.baseline, create=False)
        return [] if seg is None else sorted(seg.GetSegmentation().GetSegmentIDs())

    def mask(self, lid):
        return self.logic.segmentationResultFromNode(self.baseline).mask(lid)

    def close(self):
        self.ctl.cleanup()
        self.ctl.waitForJob(60)  # no worker left running into the next test
        gc.collect()


@pytest.fixture
def rig(mods, tiny_model):
    r = Rig(mods, tiny_model)
    yield r
    r.close()


# ----------------------------------------------------------------------------------------------- clicks
def test_click_a_point_gives_one_inference_and_one_segment(rig):
    rig.click_point((8, 12, 12))
    assert rig.ctl.jobsStarted == 0, "the click callback itself must not start work (deferred to the loop)"
    assert rig.LL.lesionIdOfControlPoint(rig.state.promptPoints, 0) == 1
    rig.settle()
    assert rig.ctl.jobsStarted == 1
    assert rig.segment_ids() == ["Lesion_1"]
    assert rig.view.errors == []
    assert rig.logic.canUndo()


def test_two_click_box_gives_one_inference_after_the_second_click(rig):
    roi = rig.ctl.placeBox()
    rig.click_box_corner(roi, (5, 9, 9))
    rig.settle()
    assert rig.ctl.jobsStarted == 0, "the first corner (zero-size box) must not be segmented"
    assert rig.segment_ids() == [] and not rig.logic.canUndo()
    rig.click_box_corner(roi, (11, 15, 15))
    rig.settle()
    assert rig.ctl.jobsStarted == 1
    assert rig.segment_ids() == ["Lesion_1"]
    assert rig.view.errors == []


def test_cancelled_box_does_not_block_other_lesions(rig):
    roi = rig.ctl.placeBox()
    rig.click_box_corner(roi, (5, 9, 9))  # one corner, then the user presses Esc
    interaction = rig.ctl.interactionNode()
    interaction.SetCurrentInteractionMode(interaction.ViewTransform)
    rig.settle()
    assert not rig.scene.IsNodePresent(roi), "a box whose placement was cancelled is removed"
    assert rig.ctl.promptBoxes() == []
    rig.ctl.newLesion()
    rig.click_point((8, 5, 18))
    rig.settle()
    assert rig.view.errors == []
    assert rig.segment_ids() == ["Lesion_2"]


def test_unplaced_box_is_ignored_by_segment_all_but_named_for_its_own_lesion(rig):
    LL = rig.LL
    roi = rig.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "half")
    rig.click_box_corner(roi, (5, 9, 9))
    LL.setLesionIdOfROI(roi, 3)
    rig.state.promptBoxes.append(roi)
    rig.click_point((8, 12, 12))
    rig.settle()
    assert rig.view.errors == [] and rig.segment_ids() == ["Lesion_1"]
    with pytest.raises(LL.LesionLocatorInputError, match="lesion 3 is not placed yet"):
        rig.logic.prepareSegmentation(rig.baseline, [rig.state.promptPoints], [roi], [3])


def test_several_boxes_in_a_row(rig):
    for lid, (lo, hi) in enumerate((((5, 9, 9), (11, 15, 15)), ((6, 2, 15), (10, 8, 21))), start=1):
        if lid > 1:
            rig.ctl.newLesion()
        roi = rig.ctl.placeBox()
        interaction = rig.ctl.interactionNode()
        assert interaction.GetPlaceModePersistence() == 0, "a box ends place mode after it"
        assert rig.ctl.selectionNode().GetActivePlaceNodeID() == roi.GetID()
        rig.click_box_corner(roi, lo)
        rig.click_box_corner(roi, hi)
        rig.settle()
    assert rig.view.errors == []
    assert rig.ctl.jobsStarted == 2, rig.view.statuses
    assert rig.segment_ids() == ["Lesion_1", "Lesion_2"]
    assert [rig.LL.lesionIdOfROI(r) for r in rig.ctl.promptBoxes()] == [1, 2]


def test_moving_a_box_resegments_its_lesion(rig):
    roi = rig.ctl.placeBox()
    rig.click_box_corner(roi, (5, 9, 9))
    rig.click_box_corner(roi, (11, 15, 15))
    rig.settle()
    rig.ctl.newLesion()
    rig.click_point((8, 5, 18))
    rig.settle()
    assert rig.ctl.jobsStarted == 2
    before = rig.mask(1).copy()
    roi.SetCenterWorld(*rig.ras((8, 11, 11)))
    roi.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    rig.settle()
    assert rig.ctl.jobsStarted == 3
    assert rig.logic.undoStack[-1].description == "segment lesion(s) 1"
    rig.ctl.undo()
    np.testing.assert_array_equal(rig.mask(1), before)


def test_place_box_after_points_switches_persistence_off_and_fires_the_selection_event(rig):
    selection = rig.ctl.selectionNode()
    seen = []
    selection.AddObserver(selection.ActivePlaceNodeIDChangedEvent,
                          lambda caller, event: seen.append(caller.GetActivePlaceNodeID()))
    rig.ctl.placePoint()
    interaction = rig.ctl.interactionNode()
    assert interaction.GetPlaceModePersistence() == 1
    assert seen[-1] == rig.state.promptPoints.GetID()
    roi = rig.ctl.placeBox()
    assert interaction.GetPlaceModePersistence() == 0
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    assert seen[-1] == roi.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsROINode"


def test_moving_a_point_resegments_only_its_lesion(rig):
    rig.click_point((8, 12, 12))
    rig.settle()
    rig.ctl.newLesion()
    rig.click_point((8, 5, 18))
    rig.settle()
    assert rig.ctl.jobsStarted == 2
    written = []
    original = rig.logic.writeLesionMask

    def spy(volumeNode, lesionId, *args, **kwargs):
        written.append(lesionId)
        return original(volumeNode, lesionId, *args, **kwargs)

    rig.logic.writeLesionMask = spy
    points = rig.state.promptPoints
    points.SetNthControlPointPositionWorld(1, *rig.ras((8, 6, 17)))
    # on release the markups widget fires this (Slicer main, Modules/Loadable/Markups/VTKWidgets/
    # vtkSlicerMarkupsWidget.cxx, EndWidgetInteraction: InvokeCustomModifiedEvent(PointEndInteractionEvent))
    points.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    rig.settle()
    assert rig.ctl.jobsStarted == 3
    assert written == [2]


def test_undo_restores_and_is_refused_while_busy(rig):
    rig.click_point((8, 12, 12))
    rig.settle()
    first = rig.mask(1).copy()
    rig.click_point((8, 13, 12))  # a second point of lesion 1: one new result for lesion 1
    rig.settle()
    assert rig.ctl.jobsStarted == 2
    assert rig.ctl.undo() is not None
    np.testing.assert_array_equal(rig.mask(1), first)
    assert rig.ctl.undo() is not None
    assert rig.segment_ids() == []
    assert rig.ctl.actions()["undo"] is False


def test_job_queued_while_another_runs(rig):
    release = threading.Event()
    original = rig.logic.computeSegmentation

    def slow(job, progress=None, cancelEvent=None):
        release.wait(10)
        return original(job, progress, cancelEvent)

    rig.logic.computeSegmentation = slow
    rig.click_point((8, 12, 12))
    rig.loop.run_pending()
    assert rig.ctl.busy
    actions = rig.ctl.actions()
    assert not actions["segment"] and not actions["track"] and not actions["undo"] and actions["cancel"]
    assert rig.ctl.trigger("segment") is False  # a shortcut acts only when its button would
    assert rig.ctl.trigger("newLesion") is False
    rig.state.currentLesionId = 2
    rig.click_point((8, 5, 18))  # arrives while lesion 1 is computed
    rig.loop.run_pending()
    assert rig.ctl.jobsStarted == 1
    release.set()
    rig.settle()
    assert rig.ctl.jobsStarted == 2, "the queued lesion runs right after the first job"
    assert rig.segment_ids() == ["Lesion_1", "Lesion_2"]
    assert rig.view.errors == []


def test_scene_closed_while_a_job_runs(rig):
    release = threading.Event()
    original = rig.logic.computeSegmentation
    rig.logic.computeSegmentation = lambda job, progress=None, cancelEvent=None: (
        release.wait(10), original(job, progress, cancelEvent))[1]
    rig.click_point((8, 12, 12))
    rig.loop.run_pending()
    assert rig.ctl.busy
    rig.ctl.sceneStartClose()  # what the widget does on StartCloseEvent
    rig.ctl.state = None  # the widget drops its parameter node
    rig.scene.Clear(0)
    release.set()
    rig.loop.run(until=lambda: not rig.ctl.busy)
    assert rig.view.errors == [], "a closed scene's job ends silently"


def test_shortcuts_without_baseline_do_nothing(mods):
    r = Rig(mods, None)
    try:
        r.state.baselineVolume = None
        for action in ("newLesion", "segment", "placeBox", "track", "report", "undo"):
            assert r.ctl.trigger(action) is False
        assert r.view.errors == [] and r.ctl.jobsStarted == 0
    finally:
        r.close()


def test_lesion_ids_start_at_one(rig):
    with pytest.raises(rig.LL.LesionLocatorInputError):
        rig.ctl.setCurrentLesionId(0)
    rig.state.currentLesionId = 0  # e.g. an old scene: the prompt is refused with a message, nothing crashes
    rig.click_point((8, 12, 12))
    rig.settle()
    assert rig.segment_ids() == [] and rig.view.errors and "start at 1" in rig.view.errors[-1]


def test_failure_shows_one_error_and_scene_close_stops_everything(rig):
    rig.state.modelPath = "/nonexistent/model"
    rig.click_point((8, 12, 12))
    assert rig.view.errors == [], "no dialog inside the markups callback (the mouse release could be lost)"
    rig.settle()
    assert len(rig.view.errors) == 1 and "model not found" in rig.view.errors[0]
    rig.ctl.sceneStartClose()
    assert rig.ctl.observedPromptNodeIDs() == set() and not rig.logic.canUndo()
    rig.ctl.cleanup()
    assert rig.loop.callback is None


def test_track_then_report_through_the_controller(rig):
    """Track lesions with a model that has no Track folder (the library falls back to classical propagation),
    then the report, as the Track button does."""
    rig.click_point((8, 12, 12))
    rig.settle()
    assert rig.ctl.actions()["track"] is False  # no follow-up yet
    follow = make_volume(rig.scene, name="follow-up")
    assert rig.ctl.addFollowUp(rig.baseline) == "The baseline cannot also be a follow-up."
    assert rig.ctl.addFollowUp(follow) is None and rig.ctl.addFollowUp(follow) is None
    assert rig.ctl.followUpNames() == ["follow-up"]
    assert rig.ctl.trigger("track") is True
    assert rig.view.progress[0] is None, "busy indicator until the job reports progress"
    rig.settle()
    assert rig.view.errors == []
    assert sorted(rig.logic.lesionStatuses(follow)) == [1]
    table = rig.state.reportTable
    assert table is not None and table.GetNumberOfRows() >= 2
    assert len(rig.view.reports) == 1 and rig.view.reports[0][0] is table  # one report, after tracking
    assert rig.ctl.actions()["exportCsv"] is True
    assert rig.ctl.undo() == "track lesions"
    assert rig.ctl.removeFollowUp(0) and rig.ctl.followUpNames() == []


# ----------------------------------------------------------------------------------------------- GIL pump
def _python_workload(iterations: int, done: list) -> int:
    total = 0
    for i in range(iterations):
        total += i % 7
        if i % 10000 == 0:
            done[0] = i
    done[0] = iterations
    return total


def test_gil_pump_keeps_the_worker_running_while_the_main_thread_holds_the_gil(mods):
    """Reproduces Slicer's starvation (main thread in C holding the GIL between timer ticks) and bounds the
    slowdown of the controller's job timer."""
    LL, C = mods
    iterations = 1_500_000
    t0 = time.perf_counter()
    t = threading.Thread(target=_python_workload, args=(iterations, [0]))
    t.start()
    t.join()
    alone = time.perf_counter() - t0
    budget = 4 * alone + 0.5

    # the old widget: a 100 ms timer whose tick only looks at the future. The worker gets the GIL only
    # around the moments the main thread returns to Python, a few ms per 100 ms.
    loop = LoopScheduler(hold_gil=True)
    worker = threading.Thread(target=_python_workload, args=(iterations, [0]))
    loop.startRepeating(100, lambda: None)
    start = time.perf_counter()
    worker.start()
    loop.run(until=lambda: not worker.is_alive(), timeout=120)
    loop.stopRepeating()
    starved = time.perf_counter() - start
    worker.join()

    # the controller's job timer under the same conditions
    loop = LoopScheduler(hold_gil=True)
    rig_scene = slicer.vtkMRMLScene()
    logic = LL.LesionLocatorLogic(scene=rig_scene)
    ctl = C.LesionLocatorController(logic, C.ControllerState(), loop, RecordingView(), createSurfaces=False)
    results = []
    start = time.perf_counter()
    ctl._startJob("work", lambda progress, cancel: _python_workload(iterations, [0]), results.append)
    loop.run(until=lambda: not ctl.busy, timeout=60)
    pumped = time.perf_counter() - start
    ctl.cleanup()
    assert results, "the job finished and its result was applied on the main thread"
    print(f"workload alone {alone:.2f} s, old 100 ms poll {starved:.2f} s, pump {pumped:.2f} s")
    assert starved > 2.5 * pumped, f"the starvation did not reproduce: old poll {starved:.2f} s, pump {pumped:.2f} s"
    assert pumped < budget, f"pumped job took {pumped:.2f} s, the workload alone {alone:.2f} s"
