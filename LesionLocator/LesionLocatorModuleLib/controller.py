"""The module's interaction logic without Qt: prompts, lesion ids, place modes, follow-ups, the job queue.

``LesionLocatorController`` holds every decision the widget used to make (which lesion a click belongs to,
when a box is complete, what a shortcut may do now, which job runs next, what undo restores) and talks to
the outside through three small objects:

* ``state``: plain attributes (``ControllerState`` here and in the tests; in Slicer the parameter node
  wrapper, which has the same attribute names and is saved with the scene);
* ``scheduler``: ``callLater(callback)`` (run once on the main thread, after the current event) and
  ``startRepeating(intervalMs, callback)`` / ``stopRepeating()`` (QTimer in Slicer);
* ``view``: ``showError``, ``showStatus``, ``showProgress``, ``stateChanged`` (dialogs and widgets in Slicer).

It runs under slicer-core (real MRML, real markups events) in Testing/Python/test_slicer_controller.py.

Why the job timer waits on the future
-------------------------------------
In Slicer the main thread holds the Python GIL while it sits in the Qt event loop: Python is initialised on
that thread and nothing releases the GIL around the event loop (PythonQt could, via
``PythonQt::setEnableThreadSupport`` in commontk/PythonQt src/PythonQt.cpp, but Slicer never calls it; a
``git grep setEnableThreadSupport`` of Slicer main finds nothing), so a worker thread running Python (torch's Python parts, the library's loops) only gets the GIL
while the main thread itself runs Python. A poll tick that merely checks ``future.done()`` lets the worker
run a few microseconds per tick: jobs crawl or look hung. Each tick here blocks in
``concurrent.futures.wait(..., timeout=PUMP_WAIT_S)``, which releases the GIL, for most of the timer interval.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import slicer
import vtk

import LesionLocator as LL  # the scripted module (already loaded: the widget imports this package lazily)

PUMP_INTERVAL_MS = 20  # job timer interval
PUMP_WAIT_S = 0.015  # each tick gives the worker this long with the GIL released

SELECTION_NODE_ID = "vtkMRMLSelectionNodeSingleton"  # slicer.app.applicationLogic().GetSelectionNode()
INTERACTION_NODE_ID = "vtkMRMLInteractionNodeSingleton"  # slicer.app.applicationLogic().GetInteractionNode()

ACTIONS = ("placePoint", "placeBox", "newLesion", "segment", "undo", "track", "report", "exportCsv", "cancel")


@dataclasses.dataclass
class ControllerState:
    """The module's state as plain attributes (the parameter node wrapper has the same names)."""

    baselineVolume: Any = None
    followUpVolumes: List[Any] = dataclasses.field(default_factory=list)
    promptPoints: Any = None
    promptBoxes: List[Any] = dataclasses.field(default_factory=list)
    currentLesionId: int = 1
    autoSegment: bool = True
    backend: str = LL.BACKEND_LOCAL
    serverUrl: str = LL.DEFAULT_SERVER_URL
    modelPath: str = ""
    device: str = "auto"
    speedPreset: str = "fast"
    reportTable: Any = None


class ControllerView:
    """What the controller tells the user; the widget overrides these with dialogs and widgets."""

    def showError(self, message: str) -> None:
        logging.error("LesionLocator: %s", message)

    def showStatus(self, message: str) -> None:
        logging.info("LesionLocator: %s", message)

    def showProgress(self, fraction: Optional[float], message: str) -> None:
        """fraction None: the job has not reported progress yet (show a busy indicator)."""

    def stateChanged(self) -> None:
        """Enable states, labels or lists may have changed."""

    def showReport(self, tableNode, chartNode) -> None:
        """A new report table and volume chart were built."""


class Progress:
    """Thread-safe progress shared between the worker and the main-thread timer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fraction: Optional[float] = None
        self.message = ""

    def __call__(self, fraction: float, message: str) -> None:
        with self._lock:
            self.fraction, self.message = float(fraction), str(message)

    def get(self):
        with self._lock:
            return self.fraction, self.message


@dataclasses.dataclass
class _Job:
    title: str
    future: concurrent.futures.Future
    cancelEvent: threading.Event
    progress: Progress
    onDone: Callable[[Any], None]
    abandoned: bool = False  # the scene was closed while it ran: its result goes nowhere, silently


class LesionLocatorController:
    def __init__(self, logic, state, scheduler, view: Optional[ControllerView] = None,
                 serverToken: Callable[[], str] = lambda: "",
                 beforeInference: Callable[[], bool] = lambda: True,
                 createSurfaces: bool = True) -> None:
        self.logic = logic
        self.state = state
        self.scheduler = scheduler
        self.view = view or ControllerView()
        self.serverToken = serverToken
        self.beforeInference = beforeInference  # the widget's dependency / licence check (dialogs)
        self.createSurfaces = createSurfaces
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._job: Optional[_Job] = None
        self._pendingLesionIds: set = set()  # prompt changes that arrived while a job ran
        self._changedLesionIds: set = set()  # prompt changes not yet handled (deferred to the event loop)
        self._flushScheduled = False
        self._observations: list = []  # (node, tag)
        self._pointPositions: Dict[str, Any] = {}
        self._placedBoxIDs: set = set()  # boxes whose placement was already reported (segmented once)
        self.jobsStarted = 0  # how many inference jobs ran (tests, diagnostics)

    # -- scene helpers ------------------------------------------------------------------------------------
    @property
    def scene(self):
        return self.logic.scene

    def selectionNode(self):
        return self.scene.GetNodeByID(SELECTION_NODE_ID)

    def interactionNode(self):
        return self.scene.GetNodeByID(INTERACTION_NODE_ID)

    def promptBoxes(self) -> list:
        return [n for n in self.state.promptBoxes if n is not None and self.scene.IsNodePresent(n)]

    def timepointNodes(self) -> list:
        s = self.state
        return ([s.baselineVolume] if s.baselineVolume is not None else []) + [
            n for n in s.followUpVolumes if n is not None]

    # -- settings -----------------------------------------------------------------------------------------
    def configureLogic(self) -> None:
        s = self.state
        self.logic.configure(backend=s.backend, modelPath=s.modelPath or None, device=s.device,
                             speedPreset=s.speedPreset, serverUrl=s.serverUrl, serverToken=self.serverToken() or "")

    # -- what may be done now (buttons and shortcuts) -------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._job is not None

    def actions(self) -> Dict[str, bool]:
        s = self.state
        idle = not self.busy
        baseline = s.baselineVolume is not None
        return {
            "placePoint": baseline and s.promptPoints is not None,
            "placeBox": baseline and idle,
            "newLesion": baseline and idle,
            "segment": baseline and idle,
            "undo": idle and self.logic.canUndo(),
            "track": baseline and idle and any(n is not None for n in s.followUpVolumes),
            "report": baseline and idle,
            "exportCsv": s.reportTable is not None,
            "cancel": not idle,
        }

    def trigger(self, action: str) -> bool:
        """Run a button's / shortcut's action if it is enabled now; returns whether it ran."""
        if not self.actions().get(action, False):
            self.view.showStatus(f"'{action}' is not available now"
                                 + (" (a job is running)" if self.busy else ""))
            return False
        {"placePoint": self.placePoint, "placeBox": self.placeBox, "newLesion": self.newLesion,
         "segment": lambda: self.segment(None), "undo": self.undo, "track": self.track, "report": self.report,
         "cancel": self.cancel, "exportCsv": lambda: None}[action]()
        return True

    # -- prompt nodes ---------------------------------------------------------------------------------------
    def ensurePromptPoints(self):
        s = self.state
        if s.promptPoints is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "LesionLocator points")
            node.SetAttribute(LL.ROLE_ATTRIBUTE, "prompts")
            node.CreateDefaultDisplayNodes()
            s.promptPoints = node
        self.observePromptNodes()
        return s.promptPoints

    def observePromptNodes(self) -> None:
        """Observe the point list and every box (again): call after either changed."""
        self.removeObservers()
        s = self.state
        M = slicer.vtkMRMLMarkupsNode
        if s.promptPoints is not None:
            self._observe(s.promptPoints, M.PointPositionDefinedEvent, self._onPointsDefined)
            self._observe(s.promptPoints, M.PointEndInteractionEvent, self._onPointsMoved)
        for roi in self.promptBoxes():
            # a box counts as drawn once it is fully placed, whichever of these events shows it first: the ROI
            # node replaces its two corner points by a centre point inside a modify block, and the order in
            # which the queued point events then arrive is not something to rely on
            for event in (M.PointPositionDefinedEvent, M.PointModifiedEvent, vtk.vtkCommand.ModifiedEvent):
                self._observe(roi, event, self._onBoxDefined)
            self._observe(roi, M.PointEndInteractionEvent, self._onBoxMoved)
        self._placedBoxIDs = {roi.GetID() for roi in self.promptBoxes() if LL.roiIsPlaced(roi)}
        interaction = self.interactionNode()
        if interaction is not None:
            self._observe(interaction, interaction.InteractionModeChangedEvent, self._onInteractionModeChanged)
        self._pointPositions = self._currentPointPositions()

    def _observe(self, node, event, callback) -> None:
        # one callback per event: custom MRML events all arrive as "UserEvent" in Python observers
        self._observations.append((node, node.AddObserver(event, lambda caller, _event: callback(caller))))

    def observedPromptNodeIDs(self) -> set:
        return {node.GetID() for node, _ in self._observations if node.IsA("vtkMRMLMarkupsNode")}

    def removeObservers(self) -> None:
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations = []

    def _currentPointPositions(self) -> dict:
        node = self.state.promptPoints
        out = {}
        if node is None:
            return out
        for i in range(node.GetNumberOfControlPoints()):
            pos = [0.0, 0.0, 0.0]
            node.GetNthControlPointPositionWorld(i, pos)
            out[node.GetNthControlPointID(i)] = (tuple(round(v, 4) for v in pos), LL.lesionIdOfControlPoint(node, i))
        return out

    # markups callbacks: cheap bookkeeping only; the work runs later from the event loop (a dialog opened
    # inside the callback would run in the middle of the click, and the mouse release could be lost)
    def _onPointsDefined(self, node) -> None:
        lid = self.state.currentLesionId
        touched = set()
        for i in range(node.GetNumberOfControlPoints()):
            if LL._controlPointDefined(node, i) and LL.lesionIdOfControlPoint(node, i) is None:
                LL.setLesionIdOfControlPoint(node, i, lid)
                touched.add(lid)
        self._pointPositions = self._currentPointPositions()
        self._promptsChanged(touched)

    def _onPointsMoved(self, node) -> None:
        before, now = self._pointPositions, self._currentPointPositions()
        changed = {lid for pid, (pos, lid) in now.items() if before.get(pid, (None, None))[0] != pos}
        self._pointPositions = now
        changed.discard(None)
        self._promptsChanged(changed)

    def _onBoxDefined(self, roi) -> None:
        if roi.GetID() in self._placedBoxIDs or not LL.roiIsPlaced(roi):  # done before, or first click of two
            return
        self._placedBoxIDs.add(roi.GetID())
        if LL.lesionIdOfROI(roi) is None:
            LL.setLesionIdOfROI(roi, self.state.currentLesionId)
        self._promptsChanged({LL.lesionIdOfROI(roi)})

    def _onBoxMoved(self, roi) -> None:
        if LL.roiIsPlaced(roi) and LL.lesionIdOfROI(roi) is not None:
            self._promptsChanged({LL.lesionIdOfROI(roi)})

    def _onInteractionModeChanged(self, interaction) -> None:
        if interaction.GetCurrentInteractionMode() != interaction.Place:
            self.scheduler.callLater(self.removeUnplacedBoxes)  # placement ended: drop boxes left half-drawn

    def _promptsChanged(self, lesionIds) -> None:
        lesionIds = {int(l) for l in lesionIds if l is not None}
        if not lesionIds or not self.state.autoSegment:
            return
        self._changedLesionIds |= lesionIds
        if not self._flushScheduled:
            self._flushScheduled = True
            self.scheduler.callLater(self._flushPromptChanges)

    def _flushPromptChanges(self) -> None:
        self._flushScheduled = False
        ids, self._changedLesionIds = sorted(self._changedLesionIds), set()
        if ids and self.state is not None:
            self.segment(ids)

    # -- placing prompts ----------------------------------------------------------------------------------
    def placePoint(self) -> None:
        """Place points of the current lesion until the user leaves place mode."""
        points = self.ensurePromptPoints()
        self._startPlacing(points, "vtkMRMLMarkupsFiducialNode", persistent=True)

    def placeBox(self):
        """A new box for the current lesion, placed with two clicks (place mode ends after it)."""
        self.removeUnplacedBoxes()
        s = self.state
        lid = s.currentLesionId
        roi = self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"L{lid} box")
        roi.CreateDefaultDisplayNodes()
        roi.GetDisplayNode().SetSelectedColor(*LL.lesionColor(lid))
        LL.setLesionIdOfROI(roi, lid)
        s.promptBoxes.append(roi)
        self.observePromptNodes()
        self._startPlacing(roi, "vtkMRMLMarkupsROINode", persistent=False)
        return roi

    def _startPlacing(self, node, className: str, persistent: bool) -> None:
        selection, interaction = self.selectionNode(), self.interactionNode()
        if selection is None or interaction is None:
            return
        # the Reference setters fire ActivePlaceNode*ChangedEvent, which the place widgets and the markups
        # logic follow (Libs/MRML/Core/vtkMRMLSelectionNode.h: SetReferenceActivePlaceNodeID invokes
        # ActivePlaceNodeIDChangedEvent; SetActivePlaceNodeID does not)
        selection.SetReferenceActivePlaceNodeClassName(className)
        selection.SetReferenceActivePlaceNodeID(node.GetID())
        # persistence is global: points switch it on ("place multiple"); a box must switch it off again, or
        # every further click creates a new ROI node that nobody observes
        interaction.SetPlaceModePersistence(1 if persistent else 0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def removeUnplacedBoxes(self) -> int:
        """Remove boxes whose placement was cancelled (not being placed right now). Returns how many."""
        if self.state is None:
            return 0
        interaction, selection = self.interactionNode(), self.selectionNode()
        placingId = None
        if interaction is not None and selection is not None and interaction.GetCurrentInteractionMode() == interaction.Place:
            placingId = selection.GetActivePlaceNodeID()
        removed = 0
        s = self.state
        for roi in list(self.promptBoxes()):
            if roi.GetID() != placingId and not LL.roiIsPlaced(roi):
                for i in range(len(s.promptBoxes) - 1, -1, -1):
                    if s.promptBoxes[i] is not None and s.promptBoxes[i].GetID() == roi.GetID():
                        del s.promptBoxes[i]
                self.scene.RemoveNode(roi)
                removed += 1
        if removed:
            self.observePromptNodes()
            self.view.stateChanged()
        return removed

    def newLesion(self) -> int:
        s = self.state
        segNodes = [self.logic.segmentationNodeForVolume(n, create=False) for n in self.timepointNodes()]
        nextId = self.logic.nextLesionId([s.promptPoints], self.promptBoxes(), segNodes)
        s.currentLesionId = max(int(s.currentLesionId) + 1, nextId, 1)
        return s.currentLesionId

    def setCurrentLesionId(self, lesionId: int) -> None:
        if int(lesionId) < 1:
            raise LL.LesionLocatorInputError("lesion ids start at 1")
        self.state.currentLesionId = int(lesionId)

    # -- follow-ups -----------------------------------------------------------------------------------------
    def addFollowUp(self, node) -> Optional[str]:
        """Append a follow-up volume; returns an error message instead of adding an invalid one."""
        s = self.state
        if node is None:
            return None
        if s.baselineVolume is not None and node.GetID() == s.baselineVolume.GetID():
            return "The baseline cannot also be a follow-up."
        if any(n is not None and n.GetID() == node.GetID() for n in s.followUpVolumes):
            return None
        s.followUpVolumes.append(node)
        return None

    def removeFollowUp(self, row: int) -> bool:
        s = self.state
        if 0 <= row < len(s.followUpVolumes):
            del s.followUpVolumes[row]
            return True
        return False

    def followUpNames(self) -> List[str]:
        return [n.GetName() for n in self.state.followUpVolumes if n is not None]

    # -- jobs -----------------------------------------------------------------------------------------------
    def segment(self, lesionIds: Optional[List[int]] = None) -> bool:
        """Segment the given lesions (None: all). While a job runs, the request waits in the queue."""
        s = self.state
        if self.busy:
            if lesionIds:
                self._pendingLesionIds.update(int(l) for l in lesionIds)
                self.view.showStatus("queued until the running job finishes")
            else:
                self.view.showStatus("busy: wait or cancel")
            return False
        if s.baselineVolume is None:
            self.view.showError("Select the baseline volume first.")
            return False
        try:
            self.configureLogic()
            if not self.beforeInference():
                return False
            boxes = self.promptBoxes()
            self.logic.assignLesionIds([s.promptPoints], boxes, s.currentLesionId)
            job = self.logic.prepareSegmentation(s.baselineVolume, [s.promptPoints], boxes, lesionIds)
        except Exception as exc:
            self.view.showError(LL.describeError(exc))
            return False

        def done(result) -> None:
            notFound = self.logic.applySegmentation(job, result)
            node = self.scene.GetNodeByID(job.volumeNodeID)
            if self.createSurfaces and node is not None:
                self.logic.segmentationNodeForVolume(node).CreateClosedSurfaceRepresentation()
            self.view.showStatus(f"Segmented lesion(s) {', '.join(map(str, job.lesionIds))}"
                                 + (f"; not found: {', '.join(map(str, notFound))}" if notFound else "."))

        return self._startJob("Segmenting", lambda progress, cancel: self.logic.computeSegmentation(
            job, progress, cancel), done)

    def track(self) -> bool:
        s = self.state
        if self.busy:
            self.view.showStatus("busy: wait or cancel")
            return False
        try:
            self.configureLogic()
            if not self.beforeInference():
                return False
            job = self.logic.prepareTracking(s.baselineVolume, list(s.followUpVolumes))
        except Exception as exc:
            self.view.showError(LL.describeError(exc))
            return False

        def done(results) -> None:
            notFound = self.logic.applyTracking(job, results)
            for nodeID in job.followUpNodeIDs:
                node = self.scene.GetNodeByID(nodeID)
                if self.createSurfaces and node is not None:
                    self.logic.segmentationNodeForVolume(node).CreateClosedSurfaceRepresentation()
            self.view.showStatus("Tracked." + (
                " Not found: " + "; ".join(f"Lesion {l} in {n}" for n, l in notFound) if notFound else ""))
            self.report()  # one error dialog at most, from report()

        return self._startJob("Tracking", lambda progress, cancel: self.logic.computeTracking(
            job, progress, cancel), done)

    def report(self):
        """Build the report table and the volume chart now (main thread). Returns (table, chart) or None."""
        s = self.state
        try:
            report = self.logic.buildReport(self.timepointNodes())
            table = self.logic.reportToTable(report, s.reportTable)
            s.reportTable = table
            chart = None
            for i in range(self.scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode")):
                node = self.scene.GetNthNodeByClass(i, "vtkMRMLPlotChartNode")
                if node.GetAttribute(LL.ROLE_ATTRIBUTE) == "chart":
                    chart = node
            chart = self.logic.volumePlot(report, chart)
        except Exception as exc:
            self.view.showError("Could not build the report: " + LL.describeError(exc))
            return None
        self.view.stateChanged()
        self.view.showReport(table, chart)
        return table, chart

    def undo(self) -> Optional[str]:
        if self.busy:
            self.view.showStatus("busy: wait or cancel")
            return None
        description = self.logic.undoLastResult()
        self.view.showStatus(f"Undone: {description}" if description else "Nothing to undo.")
        self.view.stateChanged()
        return description

    def cancel(self) -> None:
        if self._job is not None:
            self._job.cancelEvent.set()
            self.view.showStatus("Cancelling...")

    def _startJob(self, title: str, compute: Callable, onDone: Callable) -> bool:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="LesionLocator")
        progress, cancelEvent = Progress(), threading.Event()
        future = self._executor.submit(compute, progress, cancelEvent)
        self._job = _Job(title, future, cancelEvent, progress, onDone)
        self.jobsStarted += 1
        self.view.showProgress(None, title)
        self.scheduler.startRepeating(PUMP_INTERVAL_MS, self.tick)
        self.view.stateChanged()
        return True

    def tick(self) -> None:
        """Job timer (main thread): give the worker the GIL for a while, show progress, finish when done."""
        job = self._job
        if job is None:
            self.scheduler.stopRepeating()
            return
        concurrent.futures.wait([job.future], timeout=PUMP_WAIT_S)  # releases the GIL while it waits
        fraction, message = job.progress.get()
        self.view.showProgress(fraction, message or job.title)
        if job.future.done():
            self._finishJob()

    def _finishJob(self) -> None:
        job, self._job = self._job, None
        self.scheduler.stopRepeating()
        if job.abandoned:
            if job.future.exception() is not None:
                logging.info("LesionLocator: a job of a closed scene ended with %r", job.future.exception())
            self.view.stateChanged()
            return
        try:
            result = job.future.result()
        except LL.CancelledError:
            self.view.showStatus("Cancelled.")
        except Exception as exc:  # shown with its cause; the traceback goes to the log only
            logging.error("LesionLocator job failed", exc_info=(type(exc), exc, exc.__traceback__))
            self.view.showError(LL.describeError(exc))
        else:
            try:
                job.onDone(result)
            except Exception as exc:
                logging.error("LesionLocator could not apply the result", exc_info=(type(exc), exc, exc.__traceback__))
                self.view.showError(LL.describeError(exc))
        self.view.stateChanged()
        if self._pendingLesionIds:
            pending, self._pendingLesionIds = sorted(self._pendingLesionIds), set()
            self.segment(pending)

    def waitForJob(self, timeoutSeconds: float = 600.0, processEvents: Callable[[], None] = lambda: None) -> None:
        """Run the job timer by hand until no job is left (self-test, scripting, tests)."""
        deadline = time.monotonic() + timeoutSeconds
        while self.busy:
            if time.monotonic() > deadline:
                raise TimeoutError("LesionLocator job did not finish in time")
            processEvents()
            self.tick()

    # -- scene / module lifetime ------------------------------------------------------------------------
    def sceneStartClose(self) -> None:
        self.cancel()
        if self._job is not None:
            self._job.abandoned = True
        self._pendingLesionIds.clear()
        self._changedLesionIds.clear()
        self.removeObservers()
        self.logic.undoStack.clear()
        self.logic.closeBackend()

    def cleanup(self) -> None:
        """Module reload / application exit: stop the timer, the worker and every observer."""
        self.cancel()
        self.scheduler.stopRepeating()
        self.removeObservers()
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
