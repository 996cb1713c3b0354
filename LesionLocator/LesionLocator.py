"""LesionLocator: promptable 3D lesion segmentation and longitudinal tracking in 3D Slicer.

Scripted module in the usual Slicer layout (Module, parameter node, Widget, Logic, Test).

Design notes
------------
* The Logic never imports Qt (``qt``/``ctk``) so that it runs with the ``slicer-core`` wheel (real MRML, no
  application). Everything that needs the application (dialogs, settings, timers, shortcuts) lives in the
  Widget or in functions only the Widget calls.
* Nothing heavy is imported at module load: torch and the network code of ``LesionLocatorLib`` are imported
  when the user first segments, so the module loads (and explains what is missing) without them.
* The Logic is MRML glue over one ``LesionLocatorLib`` backend (``open_backend``): in this process, in a
  separate process on this computer (the module's own loopback server), or on a LesionLocator server, with
  the same speed preset (folds, TTA) everywhere. Segmenting, the several-prompts rule and tracking are the
  library's; lesion ids travel unchanged.
* The widget's decisions (prompts and lesion ids, two-click boxes, place modes, enable states, the job queue
  and its GIL-releasing timer, undo, scene close) live in ``LesionLocatorModuleLib/controller.py`` (no Qt,
  tested under slicer-core); the widget keeps widgets, dialogs and shortcuts.
* MRML access happens on the main thread only. A user action is split into ``prepare*`` (main thread: MRML ->
  arrays and prompts), ``compute*`` (worker thread: pure LesionLocatorLib, cancellable) and ``apply*`` (main
  thread: results -> segments, with an undo step).
* Geometry: a Slicer volume is RAS with IJK = (i, j, k) = (x, y, z) array columns; LesionLocatorLib works in LPS
  with arrays indexed (z, y, x). The conversion is done once, in :func:`volumeFromVolumeNode`, including the
  volume's parent transform; markups are read in world coordinates, so their transforms are accounted for too.
"""

import csv
import dataclasses
import importlib
import importlib.util
import logging
import math
import os
import re
import shutil
import sys
import threading
from typing import Annotated, Any, Callable, Optional, Sequence

import numpy as np
import vtk

import slicer


# --------------------------------------------------------------------------------------------------
# Make LesionLocatorLib importable: next to this file (installed extension) or in the repository root
# (source checkout added with "Add module path": LesionLocator/ and LesionLocatorLib/ are siblings).
# --------------------------------------------------------------------------------------------------
def _ensureLibraryImportable() -> Optional[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(candidate, "LesionLocatorLib", "__init__.py")):
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return candidate
    return None


LIBRARY_ROOT = _ensureLibraryImportable()

try:  # the full application
    from slicer.ScriptedLoadableModule import (  # noqa: F401
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_APPLICATION = True
except ImportError:  # slicer-core (MRML without Qt): only the Logic is usable
    HAVE_APPLICATION = False
    import unittest

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            raise RuntimeError("the LesionLocator widget needs the 3D Slicer application")

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.moduleName = self.__class__.__name__[: -len("Logic")]

    class ScriptedLoadableModuleTest(unittest.TestCase):  # type: ignore[no-redef]
        pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self):
            pass

try:
    from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper
except ImportError:  # slicer-core: the wrapper (and its Qt GUI connectors) is not available
    parameterNodeWrapper = None

try:
    from slicer import (
        vtkMRMLMarkupsFiducialNode,
        vtkMRMLMarkupsROINode,
        vtkMRMLScalarVolumeNode,
        vtkMRMLTableNode,
    )
except ImportError:  # very old Slicer: names only used in annotations
    vtkMRMLMarkupsFiducialNode = vtkMRMLMarkupsROINode = vtkMRMLScalarVolumeNode = vtkMRMLTableNode = object


# --------------------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------------------
MODULE_NAME = "LesionLocator"
LESION_ID_ATTRIBUTE = "LesionLocator.LesionId"  # ROI nodes, segments (tag)
STATUS_TAG = "LesionLocator.Status"  # segment tag: "found" / "not found"
SOURCE_VOLUME_REFERENCE = "LesionLocatorSourceVolume"  # segmentation node -> its timepoint volume (reference)
SOURCE_VOLUME_ATTRIBUTE = "LesionLocator.SourceVolumeID"  # the same link as written by 0.1 (node-ID attribute)
ROLE_ATTRIBUTE = "LesionLocator.Role"  # "prompts", "report", "volumes", "chart"
STATUS_FOUND = "found"
STATUS_NOT_FOUND = "not found"
_LESION_DESCRIPTION = re.compile(r"\blesion\s*[:=#]?\s*(\d+)", re.IGNORECASE)

LICENSE_NAME = "CC BY-NC-SA 4.0"
LICENSE_URL = "https://creativecommons.org/licenses/by-nc-sa/4.0/"
LICENSE_TEXT = (
    "The published LesionLocator model weights (Zenodo record 15174217) are licensed under the Creative Commons "
    "Attribution-NonCommercial-ShareAlike 4.0 International licence (CC BY-NC-SA 4.0): non-commercial use only, "
    "with attribution to the LesionLocator authors (Rokuss et al., CVPR 2025), and derivatives under the same "
    "licence. LesionLocator is a research tool and is not approved for clinical use."
)
LICENSE_SETTINGS_KEY = "LesionLocator/WeightsLicenseAccepted"

# (label, folds, test-time augmentation)
SPEED_PRESETS: dict[str, tuple[str, Any, bool]] = {
    "fastest": ("Fastest: 1 fold, no TTA", (0,), False),
    "fast": ("Fast: 1 fold + mirroring TTA", (0,), True),
    "balanced": ("Balanced: all folds, no TTA", "all", False),
    "published": ("Published: all folds + mirroring TTA (slowest)", "all", True),
}
DEVICES = ("auto", "cuda", "cpu", "mps")
DEFAULT_SERVER_URL = "http://127.0.0.1:8765"  # `lesionlocator serve` listens on port 8765 by default
BACKEND_LOCAL = "local"
BACKEND_SERVER = "server"
BACKEND_PROCESS = "process"  # a LesionLocator server the module runs on this computer, in its own process

# Distinct, colour-blind friendly palette (Okabe-Ito + Tol bright); lesion k always gets the same colour.
_PALETTE = (
    (0.902, 0.624, 0.0), (0.337, 0.706, 0.914), (0.0, 0.620, 0.451), (0.941, 0.894, 0.259),
    (0.0, 0.447, 0.698), (0.835, 0.369, 0.0), (0.800, 0.475, 0.655), (0.933, 0.400, 0.467),
    (0.133, 0.533, 0.200), (0.667, 0.200, 0.467), (0.400, 0.800, 0.933), (0.800, 0.733, 0.267),
)

SHORTCUTS = {
    "point": "Shift+P",
    "box": "Shift+B",
    "newLesion": "Shift+N",
    "undo": "Ctrl+Shift+Z",
    "segment": "Shift+S",
}


# --------------------------------------------------------------------------------------------------
# Errors (messages are shown to the user as they are: say what is wrong and what to do)
# --------------------------------------------------------------------------------------------------
class LesionLocatorInputError(ValueError):
    """The user's inputs (volumes, prompts, settings) cannot be used as they are."""


class DependencyError(ImportError):
    """A Python package LesionLocator needs is not installed in this Slicer."""


class CancelledError(RuntimeError):
    """The user cancelled a running job."""


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------
def lesionColor(lesionId: int) -> tuple[float, float, float]:
    """The colour of lesion ``lesionId``: the same at every timepoint and in every session."""
    return _PALETTE[(int(lesionId) - 1) % len(_PALETTE)]


def segmentIdForLesion(lesionId: int) -> str:
    return f"Lesion_{int(lesionId)}"


def segmentNameForLesion(lesionId: int) -> str:
    return f"Lesion {int(lesionId)}"


def arrayFromVTKMatrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtkMatrixFromArray(array: np.ndarray) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r, c]))
    return m


def _nodeName(node) -> str:
    return node.GetName() if node is not None else "(none)"


def _transformToWorld(node) -> np.ndarray:
    """4x4 node-to-world matrix of a transformable node (identity without a parent transform).

    Non-linear parent transforms cannot be represented by an image geometry: the user must harden them.
    """
    parent = node.GetParentTransformNode()
    if parent is None:
        return np.eye(4)
    if not parent.IsTransformToWorldLinear():
        raise LesionLocatorInputError(
            f"'{_nodeName(node)}' is under the non-linear transform '{_nodeName(parent)}'. Harden the transform "
            "first (Data module: right-click the node > Harden transform), then try again."
        )
    m = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(m)
    return arrayFromVTKMatrix(m)


def volumeIJKToWorldRAS(volumeNode) -> np.ndarray:
    """4x4 matrix from IJK voxel indices to world RAS, parent transforms included."""
    ijkToRas = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(ijkToRas)
    return _transformToWorld(volumeNode) @ arrayFromVTKMatrix(ijkToRas)


_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def volumeFromVolumeNode(volumeNode, copy: bool = True):
    """A scalar volume node -> ``LesionLocatorLib.Volume`` (array (z, y, x), LPS geometry), transforms included.

    IJK (i, j, k) index the VTK image's x (fastest), y, z axes, so the VTK scalars reshaped to
    (dim_k, dim_j, dim_i) give the (z, y, x) array directly. The world geometry is
    ``world = T_parent @ IJKToRAS``; its columns are direction * spacing per index axis. RAS -> LPS negates
    the first two world coordinates.
    """
    from vtk.util import numpy_support

    from LesionLocatorLib.core.geometry import Volume

    if volumeNode is None:
        raise LesionLocatorInputError("no volume selected")
    image = volumeNode.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise LesionLocatorInputError(f"volume '{_nodeName(volumeNode)}' has no voxel data")
    if image.GetNumberOfScalarComponents() != 1:
        raise LesionLocatorInputError(
            f"volume '{_nodeName(volumeNode)}' has {image.GetNumberOfScalarComponents()} components per voxel; "
            "LesionLocator needs a scalar (grayscale) CT volume"
        )
    dims = image.GetDimensions()
    if min(dims) < 1:
        raise LesionLocatorInputError(f"volume '{_nodeName(volumeNode)}' is empty")
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = scalars.reshape(dims[2], dims[1], dims[0])
    if copy:
        array = array.copy()
    world = volumeIJKToWorldRAS(volumeNode)
    extent = image.GetExtent()
    offset = np.array([extent[0], extent[2], extent[4]], dtype=np.float64)  # IJK of array element (0, 0, 0)
    axes = world[:3, :3]
    originRas = world[:3, 3] + axes @ offset
    spacingIJK = np.linalg.norm(axes, axis=0)
    if np.any(spacingIJK <= 0) or not np.all(np.isfinite(spacingIJK)):
        raise LesionLocatorInputError(f"volume '{_nodeName(volumeNode)}' has an invalid spacing {spacingIJK}")
    directionRas = axes / spacingIJK
    if not np.allclose(directionRas.T @ directionRas, np.eye(3), atol=1e-4):
        raise LesionLocatorInputError(
            f"the geometry of '{_nodeName(volumeNode)}' (with its parent transform) is sheared; harden a "
            "rigid transform or resample the volume first"
        )
    return Volume(
        array=array,
        spacing=tuple(float(s) for s in spacingIJK[::-1]),
        origin=tuple(float(v) for v in _RAS_TO_LPS @ originRas),
        direction=_RAS_TO_LPS @ directionRas,
    )


def worldRASToVoxel(volume, rasPoints) -> np.ndarray:
    """World RAS (x, y, z) points -> continuous (z, y, x) voxel coordinates of ``volume``."""
    return np.asarray(volume.world_to_voxel(np.asarray(rasPoints, dtype=np.float64), ras=True))


def _roundVoxel(zyx: np.ndarray) -> tuple[int, int, int]:
    # voxel i covers [i - 0.5, i + 0.5): round half up, identically on every platform
    return tuple(int(math.floor(v + 0.5)) for v in zyx)  # type: ignore[return-value]


def lesionIdOfControlPoint(markupsNode, index: int) -> Optional[int]:
    m = _LESION_DESCRIPTION.search(markupsNode.GetNthControlPointDescription(index) or "")
    return int(m.group(1)) if m else None


def setLesionIdOfControlPoint(markupsNode, index: int, lesionId: int) -> None:
    markupsNode.SetNthControlPointDescription(index, f"lesion {int(lesionId)}")
    markupsNode.SetNthControlPointLabel(index, f"L{int(lesionId)}")


def lesionIdOfROI(roiNode) -> Optional[int]:
    value = roiNode.GetAttribute(LESION_ID_ATTRIBUTE)
    if value and value.strip().isdigit():
        return int(value)
    m = _LESION_DESCRIPTION.search(roiNode.GetDescription() or "")
    return int(m.group(1)) if m else None


def setLesionIdOfROI(roiNode, lesionId: int) -> None:
    roiNode.SetAttribute(LESION_ID_ATTRIBUTE, str(int(lesionId)))
    roiNode.SetDescription(f"lesion {int(lesionId)}")


def _controlPointDefined(markupsNode, index: int) -> bool:
    return markupsNode.GetNthControlPointPositionStatus(index) == markupsNode.PositionDefined


def roiIsPlaced(roiNode) -> bool:
    """Whether an ROI box is fully placed: all its required control points defined and a non-zero size.

    Drawing a box takes two clicks. The first click already adds a defined control point (and fires
    ``PointPositionDefinedEvent``) while the ROI still requires two and has size 0; after the second click
    vtkMRMLMarkupsROINode::UpdateBoxROIFromControlPoints replaces both points by one centre point and sets
    the required number to 1 (Libs/MRML/Core/vtkMRMLMarkupsROINode.cxx, Slicer main). An ROI set from code
    (SetCenter/SetSize) has one defined point as well.
    """
    if roiNode is None:
        return False
    defined = roiNode.GetNumberOfDefinedControlPoints()
    required = roiNode.GetRequiredNumberOfControlPoints()
    if defined < 1 or (required > 0 and defined < required):
        return False
    return float(np.linalg.norm(roiNode.GetSize())) > 0.0


def pointVoxelsFromMarkups(markupsNode, volume) -> list[tuple[Optional[int], tuple[int, int, int], int]]:
    """Defined control points -> (lesion id or None, (z, y, x) voxel of ``volume``, control point index).

    Positions are read in world coordinates, so a transform on the markups node is applied.
    """
    out = []
    for i in range(markupsNode.GetNumberOfControlPoints()):
        if not _controlPointDefined(markupsNode, i):
            continue
        ras = [0.0, 0.0, 0.0]
        markupsNode.GetNthControlPointPositionWorld(i, ras)
        zyx = _roundVoxel(worldRASToVoxel(volume, ras))
        out.append((lesionIdOfControlPoint(markupsNode, i), zyx, i))
    return out


def roiCornersWorld(roiNode) -> np.ndarray:
    """The 8 corners of an ROI box in world RAS (ROI rotation and parent transforms included)."""
    size = np.asarray(roiNode.GetSize(), dtype=np.float64)
    objectToNode = arrayFromVTKMatrix(roiNode.GetObjectToNodeMatrix())
    corners = []
    for sx in (-0.5, 0.5):
        for sy in (-0.5, 0.5):
            for sz in (-0.5, 0.5):
                local = objectToNode @ np.array([sx * size[0], sy * size[1], sz * size[2], 1.0])
                world = [0.0, 0.0, 0.0]
                roiNode.TransformPointToWorld(local[:3].tolist(), world)
                corners.append(world)
    return np.asarray(corners)


def boxVoxelsFromROI(roiNode, volume) -> tuple[int, int, int, int, int, int]:
    """An ROI -> half-open (z0, z1, y0, y1, x0, x1) box of the voxels it touches, clipped to ``volume``.

    A box drawn on one slice may be thinner than a voxel: every voxel whose extent the box touches is
    included, so such a box still covers its slice.
    """
    if not roiIsPlaced(roiNode):
        raise LesionLocatorInputError(f"ROI '{_nodeName(roiNode)}' is not placed yet")
    vox = worldRASToVoxel(volume, roiCornersWorld(roiNode))
    lo, hi = vox.min(axis=0), vox.max(axis=0)
    eps = 1e-3  # ROI geometry is stored in single precision: edges on voxel boundaries come back +-1e-6
    box = []
    for axis in range(3):
        a = int(math.floor(lo[axis] + 0.5 + eps))
        b = int(math.ceil(hi[axis] + 0.5 - eps))  # exclusive
        a, b = max(a, 0), min(max(b, a + 1), volume.shape[axis])
        if a >= b:
            raise LesionLocatorInputError(
                f"box '{_nodeName(roiNode)}' lies outside the baseline volume; draw it on the baseline image"
            )
        box += [a, b]
    return tuple(box)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------------
# Segments <-> LesionLocatorLib masks
# --------------------------------------------------------------------------------------------------
def ensureSegmentationConverterRules() -> None:
    """Register the labelmap <-> surface rules when no application did (slicer-core)."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()) == 0:
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _volumeIJKToRASLocal(volumeNode) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(m)
    return m


def orientedImageFromMask(volumeNode, bbox: Sequence[int], mask: np.ndarray, segmentationNode=None):
    """A (z, y, x) boolean crop at ``bbox`` of the volume's array -> vtkOrientedImageData on the volume's grid.

    The geometry is expressed in the frame of ``segmentationNode`` (its own parent transform), so a volume or
    segmentation moved under another transform after the segmentation was created still gets its masks in
    the right place. Without ``segmentationNode``: the volume's local frame.
    """
    from vtk.util import numpy_support

    z0, z1, y0, y1, x0, x1 = (int(v) for v in bbox)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (z1 - z0, y1 - y0, x1 - x0):
        raise LesionLocatorInputError(f"mask shape {mask.shape} does not match its box {tuple(bbox)}")
    image = slicer.vtkOrientedImageData()
    imageToFrame = arrayFromVTKMatrix(_volumeIJKToRASLocal(volumeNode))
    if segmentationNode is not None:
        imageToFrame = np.linalg.inv(_transformToWorld(segmentationNode)) @ _transformToWorld(volumeNode) @ imageToFrame
    image.SetImageToWorldMatrix(vtkMatrixFromArray(imageToFrame))
    if mask.size == 0:
        return image
    e = volumeNode.GetImageData().GetExtent()
    image.SetExtent(x0 + e[0], x1 - 1 + e[0], y0 + e[2], y1 - 1 + e[2], z0 + e[4], z1 - 1 + e[4])
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.astype(np.uint8).ravel()
    return image


def tightOrientedImageCopy(image):
    """A binary (0/1) copy of an oriented image cropped to its non-zero voxels.

    Segments edited in the Segment Editor often span the whole volume; undo keeps only the lesion's box.
    """
    from vtk.util import numpy_support

    out = slicer.vtkOrientedImageData()
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    out.SetImageToWorldMatrix(matrix)
    ext = image.GetExtent()
    if ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5] or image.GetPointData().GetScalars() is None:
        return out
    dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    data = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims) > 0
    nz = [np.flatnonzero(data.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(n.size == 0 for n in nz):
        return out
    (z0, z1), (y0, y1), (x0, x1) = [(int(n[0]), int(n[-1])) for n in nz]
    out.SetExtent(ext[0] + x0, ext[0] + x1, ext[2] + y0, ext[2] + y1, ext[4] + z0, ext[4] + z1)
    out.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    crop = data[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1].astype(np.uint8)
    numpy_support.vtk_to_numpy(out.GetPointData().GetScalars())[:] = crop.ravel()
    return out


def maskFromSegment(segmentationNode, segmentId: str, volumeNode) -> tuple[tuple[int, ...], np.ndarray]:
    """A segment -> (bbox, boolean crop) on the (z, y, x) array grid of ``volumeNode``.

    Segments written by this module are on the volume's grid already; segments edited elsewhere (other
    geometry, other parent transform) are resampled onto it (nearest neighbour).
    """
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    segmentationNode.GetBinaryLabelmapRepresentation(segmentId, image)
    volImage = volumeNode.GetImageData()
    ve = volImage.GetExtent()
    ext = image.GetExtent()
    if ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5] or image.GetPointData().GetScalars() is None:
        return (0, 0, 0, 0, 0, 0), np.zeros((0, 0, 0), dtype=bool)
    # express the segment's image-to-world in the volume's local frame (segmentation and volume may sit
    # under different transforms)
    segToWorld = _transformToWorld(segmentationNode)
    volToWorld = _transformToWorld(volumeNode)
    imageToWorld = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(imageToWorld)
    imageToVolFrame = np.linalg.inv(volToWorld) @ segToWorld @ arrayFromVTKMatrix(imageToWorld)
    volIJKToRAS = arrayFromVTKMatrix(_volumeIJKToRASLocal(volumeNode))
    if not np.allclose(imageToVolFrame, volIJKToRAS, atol=1e-5):
        reference = slicer.vtkOrientedImageData()
        reference.SetExtent(ve)
        reference.SetImageToWorldMatrix(vtkMatrixFromArray(volIJKToRAS))
        image.SetImageToWorldMatrix(vtkMatrixFromArray(imageToVolFrame))
        resampled = slicer.vtkOrientedImageData()
        if not slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                image, reference, resampled, False):
            raise LesionLocatorInputError(f"segment '{segmentId}' could not be resampled onto '{_nodeName(volumeNode)}'")
        image = resampled
        ext = image.GetExtent()
    dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    data = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims) > 0
    # clip to the volume's extent, express in array indices
    lo = [max(ext[4], ve[4]), max(ext[2], ve[2]), max(ext[0], ve[0])]
    hi = [min(ext[5], ve[5]) + 1, min(ext[3], ve[3]) + 1, min(ext[1], ve[1]) + 1]
    if any(h <= l for l, h in zip(lo, hi)):
        return (0, 0, 0, 0, 0, 0), np.zeros((0, 0, 0), dtype=bool)
    src = (slice(lo[0] - ext[4], hi[0] - ext[4]), slice(lo[1] - ext[2], hi[1] - ext[2]),
           slice(lo[2] - ext[0], hi[2] - ext[0]))
    crop = data[src]
    bbox = (lo[0] - ve[4], hi[0] - ve[4], lo[1] - ve[2], hi[1] - ve[2], lo[2] - ve[0], hi[2] - ve[0])
    return bbox, crop


def _segmentLesionId(segment, segmentId: str) -> Optional[int]:
    tag = vtk.reference("")
    if segment.GetTag(LESION_ID_ATTRIBUTE, tag) and str(tag).strip().isdigit():
        return int(str(tag))
    m = re.fullmatch(r"Lesion[ _](\d+)", segment.GetName() or "") or re.fullmatch(r"Lesion_(\d+)", segmentId)
    return int(m.group(1)) if m else None


def _segmentStatus(segment) -> str:
    tag = vtk.reference("")
    if segment.GetTag(STATUS_TAG, tag) and str(tag):
        return str(tag)
    return STATUS_FOUND


# --------------------------------------------------------------------------------------------------
# Dependencies (installed only when the user asks)
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Requirement:
    spec: str  # pip requirement specifier
    importName: str
    noDeps: bool  # install with --no-deps (declared deps would pull another torch build or itk)


def requirementsPath() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "requirements.txt")


def parseRequirements(path: Optional[str] = None) -> list[Requirement]:
    """Read Resources/requirements.txt: ``spec  # import: module``; lines after ``# [no-deps]`` get --no-deps."""
    path = path or requirementsPath()
    out: list[Requirement] = []
    noDeps = False
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.strip()
            if not line:
                continue
            if line.startswith("#"):
                if line.lower().startswith("# [no-deps]"):
                    noDeps = True
                continue
            spec, _, comment = line.partition("#")
            m = re.search(r"import:\s*([A-Za-z0-9_.]+)", comment)
            spec = spec.strip()
            name = m.group(1) if m else re.split(r"[<>=!~\[; ]", spec, maxsplit=1)[0].replace("-", "_")
            out.append(Requirement(spec, name, noDeps))
    return out


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


MINIMUM_PYTHON = (3, 10)  # LesionLocatorLib and its tests run on 3.10+; Slicer 5.10 and newer ship Python 3.12
UNSUPPORTED_SLICER = ("LesionLocator needs 3D Slicer 5.10 or newer (Python 3.10+); this Slicer runs Python "
                      f"{sys.version_info[0]}.{sys.version_info[1]} (Slicer 5.8 ships 3.9). Install a newer Slicer.")


def missingDependencies(requirements: Optional[list[Requirement]] = None) -> list[str]:
    """Import names of the packages that are missing (torch first)."""
    if sys.version_info[:2] < MINIMUM_PYTHON:
        return [UNSUPPORTED_SLICER]
    missing = [] if _importable("torch") else ["torch"]
    for req in requirements if requirements is not None else parseRequirements():
        if not _importable(req.importName):
            missing.append(req.importName)
    return missing


def installDependencies(askConfirmation: bool = True, log: Callable[[str], None] = logging.info) -> None:
    """Install what is missing: torch through the PyTorch extension, the rest with ``slicer.util.pip_install``.

    Runs in the application only (PyTorchUtils, pip inside Slicer's Python).
    """
    requirements = parseRequirements()
    if not _importable("torch"):
        try:
            import PyTorchUtils  # provided by the PyTorch extension (EXTENSION_DEPENDS)
        except ImportError as exc:
            raise DependencyError(
                "PyTorch is not installed and the 'PyTorch' extension is missing. Install the 'PyTorch' extension "
                "from the Extensions Manager, restart Slicer, then click 'Install dependencies' again."
            ) from exc
        log("Installing PyTorch (this can take several minutes)...")
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                               torchVersionRequirement=">=2.1")
        if torch is None:
            raise DependencyError("PyTorch installation was cancelled; LesionLocator cannot run without it.")
    plain = [r.spec for r in requirements if not r.noDeps and not _importable(r.importName)]
    noDeps = [r.spec for r in requirements if r.noDeps and not _importable(r.importName)]
    if plain:
        log("Installing " + ", ".join(plain))
        slicer.util.pip_install(plain)
    if noDeps:
        # their declared dependencies (timm, itk, torchvision...) are not needed and would replace torch
        log("Installing (without dependencies) " + ", ".join(noDeps))
        slicer.util.pip_install(["--no-deps"] + noDeps)
    importlib.invalidate_caches()
    still = missingDependencies(requirements)
    if still:
        raise DependencyError("these packages are still missing after installation: " + ", ".join(still)
                              + ". See the Python console for pip's messages.")


def defaultModelPath() -> Optional[str]:
    """The model bundled with LesionLocatorLib, when this build ships one."""
    try:
        spec = importlib.util.find_spec("LesionLocatorLib")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        candidate = os.path.join(base, "default_model")
        if os.path.isdir(candidate) and os.listdir(candidate):
            return candidate
    return None


def describeError(exc: BaseException) -> str:
    """A one-paragraph message for the user: the cause, without a traceback."""
    name = type(exc).__name__
    text = str(exc).strip() or name
    lower = text.lower()
    if isinstance(exc, MemoryError) or "out of memory" in lower:
        return ("Out of memory: " + text + "\nTry the 'Fastest' speed preset, the CPU device, closing other "
                "programs, or a LesionLocator server with more memory.")
    if isinstance(exc, (ModuleNotFoundError, DependencyError)):
        return text + "\nOpen 'Setup' and click 'Install dependencies'."
    if type(exc).__module__.endswith("LesionLocatorLib.serve.client"):
        return text  # the client's errors already say what failed and what to do
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return "The LesionLocator server is not reachable: " + text + "\nCheck the URL, the token and the network."
    if isinstance(exc, (LesionLocatorInputError, CancelledError)):
        return text
    if isinstance(exc, (ValueError, OSError, RuntimeError)):
        return f"{text}"
    return f"{name}: {text}"


# --------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------
class LesionLocator(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "LesionLocator"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["LesionLocator for 3D Slicer contributors"]
        self.parent.helpText = (
            "Promptable 3D lesion segmentation (click a point or draw a box) and longitudinal tracking of the "
            "lesions over follow-up scans, with a volume / RECIST report. Based on LesionLocator (Rokuss et al., "
            "CVPR 2025). Research use only.<br>"
            "Shortcuts: " + ", ".join(f"{k}: {v}" for k, v in SHORTCUTS.items()) + "."
        )
        self.parent.acknowledgementText = (
            "LesionLocator method and published weights: Rokuss M. et al., 'LesionLocator: Zero-Shot Universal "
            "Tumor Segmentation and Tracking in 3D Whole-Body Imaging', CVPR 2025. Weights licence: "
            f"{LICENSE_NAME}."
        )


# --------------------------------------------------------------------------------------------------
# Parameter node
# --------------------------------------------------------------------------------------------------
if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class LesionLocatorParameterNode:
        """GUI state saved with the scene. The server token is deliberately not stored in the scene."""

        baselineVolume: vtkMRMLScalarVolumeNode
        followUpVolumes: list[vtkMRMLScalarVolumeNode]
        promptPoints: vtkMRMLMarkupsFiducialNode
        promptBoxes: list[vtkMRMLMarkupsROINode]
        # Minimum(1): the parameter node's GUI connector replaces the spin box's minimum from the .ui file:
        # without a Minimum annotation it calls setMinimum(-(2**31)) (Slicer main,
        # Base/Python/slicer/parameterNodeWrapper/guiConnectors.py, QSliderOrSpinBoxToIntConnector.__init__)
        currentLesionId: Annotated[int, Minimum(1)] = 1
        autoSegment: bool = True
        backend: str = BACKEND_LOCAL
        serverUrl: str = DEFAULT_SERVER_URL
        modelPath: str = ""  # empty: the bundled default model
        device: str = "auto"
        speedPreset: str = "fast"
        reportTable: vtkMRMLTableNode

else:
    LesionLocatorParameterNode = None  # type: ignore[assignment,misc]


# --------------------------------------------------------------------------------------------------
# Logic
# --------------------------------------------------------------------------------------------------
class InferenceProcess:
    """``python -m LesionLocatorLib.serve.server`` started by the module on 127.0.0.1 with a random token.

    Torch then runs outside Slicer: a crash or an out-of-memory kill ends this process, and the next request
    starts a new one. The token is passed in a file readable by this user only (not on the command line).
    Inside Slicer the interpreter is PythonSlicer (on PATH there, as ``slicer.util`` relies on when it runs
    ``python -m``), elsewhere this Python.
    """

    def __init__(self, model: Optional[str], device: str, folds, key=None, python: Optional[str] = None,
                 startTimeout: float = 300.0) -> None:
        self.model, self.device, self.folds, self.key = model, device, folds, key
        self.python = python or (shutil.which("PythonSlicer") if HAVE_APPLICATION else None) or sys.executable
        self.startTimeout = startTimeout
        self.url = ""
        self.token = ""
        self._proc = None
        self._dir = None

    def command(self, port: int, tokenFile: str) -> list:
        cmd = [self.python, "-m", "LesionLocatorLib.serve.server", "--host", "127.0.0.1", "--port", str(port),
               "--device", self.device, "--token-file", tokenFile, "--log-level", "warning", "--no-warmup"]
        if self.model:
            cmd += ["-m", self.model]
        if self.folds == "all":
            cmd += ["--folds", "all"]
        elif self.folds is not None:
            cmd += ["--folds", ",".join(str(int(f)) for f in self.folds)]
        return cmd

    def start(self) -> None:
        import secrets
        import socket
        import subprocess
        import tempfile

        from LesionLocatorLib.serve.client import ServerError, wait_for_server

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._dir = tempfile.mkdtemp(prefix="LesionLocatorProcess")  # mode 0700
        self.token = secrets.token_urlsafe(32)
        tokenFile = os.path.join(self._dir, "token")
        fd = os.open(tokenFile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token + "\n")
        env = dict(os.environ)
        if LIBRARY_ROOT:  # LesionLocatorLib next to the module (installed) or in the checkout
            env["PYTHONPATH"] = LIBRARY_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.logPath = os.path.join(self._dir, "server.log")
        with open(self.logPath, "w", encoding="utf-8") as log:
            self._proc = subprocess.Popen(self.command(port, tokenFile), stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=env, cwd=self._dir)
        self.url = f"http://127.0.0.1:{port}"
        import atexit

        atexit.register(self.stop)  # never outlive Slicer
        try:
            wait_for_server(self.url, timeout_s=self.startTimeout, token=self.token)
        except ServerError as exc:
            tail = self.logTail()
            self.stop()
            raise RuntimeError("the LesionLocator inference process did not start: " + str(exc)
                               + ("\n" + tail if tail else "")) from exc

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def logTail(self, chars: int = 2000) -> str:
        try:
            with open(self.logPath, encoding="utf-8", errors="replace") as f:
                return f.read()[-chars:].strip()
        except (OSError, AttributeError):
            return ""

    def stop(self) -> None:
        import subprocess

        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            self._proc = None
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclasses.dataclass
class SegmentJob:
    """Everything the worker needs to segment lesions on one volume (no MRML objects inside)."""

    volumeNodeID: str
    volumeKey: tuple
    volume: Any  # LesionLocatorLib.Volume
    prompts: dict  # {lesion id: [Point | Box, ...]}
    lesionIds: list[int]


@dataclasses.dataclass
class TrackJob:
    baselineNodeID: str
    followUpNodeIDs: list[str]
    baseline: Any  # Volume
    followUps: list  # [Volume]
    baselineMasks: dict  # {lesion id: (bbox, crop)}
    lesionIds: list[int]


@dataclasses.dataclass
class _UndoItem:
    segmentationNodeID: str
    segmentId: str
    previous: Any  # vtkOrientedImageData copy, or None when the segment did not exist
    previousStatus: Optional[str]


@dataclasses.dataclass
class UndoStep:
    description: str
    items: list


class LesionLocatorLogic(ScriptedLoadableModuleLogic):
    """MRML <-> LesionLocatorLib. No Qt here: usable with the slicer-core wheel and from the Python console.

    ``scene`` defaults to ``slicer.mrmlScene`` (the application's scene).
    """

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._scene = scene
        self.backend = BACKEND_LOCAL
        self.modelPath: Optional[str] = None
        self.device = "auto"
        self.speedPreset = "fast"
        self.serverUrl = ""
        self.serverToken = ""
        self._backend = None  # LesionLocatorLib backend (local model or server), see openBackend
        self._backendKey = None
        self._session = None  # backend.session(): holds the last image
        self._sessionImageKey = None
        self._process = None  # InferenceProcess of the "separate process" backend
        self._lock = threading.Lock()  # one inference at a time (the session holds one image)
        self.undoStack: list[UndoStep] = []
        self.maxUndoSteps = 20
        self.lastReport = None
        ensureSegmentationConverterRules()

    # -- scene ------------------------------------------------------------------------------------
    @property
    def scene(self):
        return self._scene if self._scene is not None else slicer.mrmlScene

    def getParameterNode(self):
        if LesionLocatorParameterNode is None:
            raise RuntimeError("the parameter node wrapper needs the 3D Slicer application")
        return LesionLocatorParameterNode(super().getParameterNode())

    # -- settings ---------------------------------------------------------------------------------
    def configure(self, backend: str = BACKEND_LOCAL, modelPath: Optional[str] = None, device: str = "auto",
                  speedPreset: str = "fast", serverUrl: str = "", serverToken: str = "") -> None:
        if backend not in (BACKEND_LOCAL, BACKEND_SERVER, BACKEND_PROCESS):
            raise LesionLocatorInputError(f"unknown backend {backend!r}")
        if device not in DEVICES and not device.startswith("cuda:"):
            raise LesionLocatorInputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
        if speedPreset not in SPEED_PRESETS:
            raise LesionLocatorInputError(f"unknown speed preset {speedPreset!r}; use one of {', '.join(SPEED_PRESETS)}")
        self.backend, self.modelPath, self.device, self.speedPreset = backend, modelPath or None, device, speedPreset
        self.serverUrl, self.serverToken = serverUrl.strip(), serverToken

    def usesPublishedWeights(self) -> bool:
        """Whether the chosen model is a user-supplied checkpoint (subject to the weights' licence)."""
        return self.backend in (BACKEND_LOCAL, BACKEND_PROCESS) and bool(self.modelPath)

    # -- prompts ----------------------------------------------------------------------------------
    def nextLesionId(self, pointNodes: Sequence = (), roiNodes: Sequence = (), segmentationNodes: Sequence = ()) -> int:
        """One more than the largest lesion id used by any prompt or segment."""
        used = [0]
        for node in pointNodes:
            if node is None:
                continue
            for i in range(node.GetNumberOfControlPoints()):
                lid = lesionIdOfControlPoint(node, i)
                if lid:
                    used.append(lid)
        for roi in roiNodes:
            lid = lesionIdOfROI(roi) if roi is not None else None
            if lid:
                used.append(lid)
        for segNode in segmentationNodes:
            if segNode is None:
                continue
            seg = segNode.GetSegmentation()
            for sid in seg.GetSegmentIDs():
                lid = _segmentLesionId(seg.GetSegment(sid), sid)
                if lid:
                    used.append(lid)
        return max(used) + 1

    def assignLesionIds(self, pointNodes: Sequence, roiNodes: Sequence, currentLesionId: Optional[int] = None) -> None:
        """Give every prompt without a lesion id one: ``currentLesionId`` if given, else a new id each."""
        nextId = self.nextLesionId(pointNodes, roiNodes)
        for node in pointNodes:
            if node is None:
                continue
            for i in range(node.GetNumberOfControlPoints()):
                if lesionIdOfControlPoint(node, i) is None:
                    lid = currentLesionId or nextId
                    if not currentLesionId:
                        nextId += 1
                    setLesionIdOfControlPoint(node, i, lid)
        for roi in roiNodes:
            if roi is not None and lesionIdOfROI(roi) is None:
                lid = currentLesionId or nextId
                if not currentLesionId:
                    nextId += 1
                setLesionIdOfROI(roi, lid)

    def collectPrompts(self, volume, pointNodes: Sequence = (), roiNodes: Sequence = (),
                       lesionIds: Optional[Sequence[int]] = None) -> dict:
        """Markups -> {lesion id: [Point, ..., Box, ...]} in the voxel (z, y, x) grid of ``volume``.

        Prompts without a lesion id are an error (call :meth:`assignLesionIds` first): guessing would merge
        or split lesions silently. Boxes that are not placed yet (first click only, or placement cancelled)
        are left out; only a requested lesion whose sole prompt is such a box is an error. With ``lesionIds``
        only those lesions are read. The several-prompts rule is the library's (``core.prompts.effective``).
        """
        from LesionLocatorLib.core.prompts import Box, Point

        wanted = None if lesionIds is None else {int(l) for l in lesionIds}
        prompts: dict[int, list] = {}
        for node in pointNodes:
            if node is None:
                continue
            for lid, zyx, index in pointVoxelsFromMarkups(node, volume):
                if lid is None:
                    raise LesionLocatorInputError(
                        f"point {index + 1} of '{_nodeName(node)}' has no lesion id (description 'lesion K')")
                if wanted is not None and lid not in wanted:
                    continue
                if not volume.contains_voxel(zyx):
                    raise LesionLocatorInputError(
                        f"point '{node.GetNthControlPointLabel(index)}' (lesion {lid}) lies outside the baseline "
                        "volume; place it on the baseline image")
                prompts.setdefault(lid, []).append(Point(tuple(float(v) for v in zyx)))
        unplaced = []
        for roi in roiNodes:
            if roi is None:
                continue
            lid = lesionIdOfROI(roi)
            if lid is None:
                raise LesionLocatorInputError(f"box '{_nodeName(roi)}' has no lesion id")
            if wanted is not None and lid not in wanted:
                continue
            if not roiIsPlaced(roi):
                unplaced.append((lid, roi))
                continue
            prompts.setdefault(lid, []).append(Box(boxVoxelsFromROI(roi, volume)))
        for lid, roi in unplaced:
            if wanted is not None and lid not in prompts:
                raise LesionLocatorInputError(f"box '{_nodeName(roi)}' of lesion {lid} is not placed yet: "
                                              "finish drawing it (two clicks) or delete it")
        for lid in prompts:
            if lid < 1:
                raise LesionLocatorInputError(f"lesion ids start at 1 (got {lid})")
        return prompts

    # -- segmentation nodes ---------------------------------------------------------------------------
    def segmentationNodeForVolume(self, volumeNode, create: bool = True):
        """The LesionLocator segmentation node of a timepoint volume (one per volume).

        The link is a node reference (role ``SOURCE_VOLUME_REFERENCE``), which MRML remaps when a scene is
        imported; scenes saved by older versions carry a node-ID attribute, migrated here.
        """
        scene = self.scene
        legacy = None
        for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
            node = scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            ref = node.GetNodeReference(SOURCE_VOLUME_REFERENCE)
            if ref is not None and ref.GetID() == volumeNode.GetID():
                return node
            if ref is None and legacy is None and node.GetAttribute(SOURCE_VOLUME_ATTRIBUTE) == volumeNode.GetID():
                legacy = node
        if legacy is not None:
            legacy.SetNodeReferenceID(SOURCE_VOLUME_REFERENCE, volumeNode.GetID())
            legacy.RemoveAttribute(SOURCE_VOLUME_ATTRIBUTE)
            return legacy
        if not create:
            return None
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volumeNode.GetName()} lesions")
        node.SetNodeReferenceID(SOURCE_VOLUME_REFERENCE, volumeNode.GetID())
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        node.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        return node

    def _ensureSegment(self, segmentationNode, lesionId: int) -> str:
        segmentation = segmentationNode.GetSegmentation()
        segmentId = segmentIdForLesion(lesionId)
        if segmentation.GetSegment(segmentId) is None:
            segmentation.AddEmptySegment(segmentId, segmentNameForLesion(lesionId), list(lesionColor(lesionId)))
        segment = segmentation.GetSegment(segmentId)
        segment.SetName(segmentNameForLesion(lesionId))
        segment.SetColor(*lesionColor(lesionId))
        segment.SetTag(LESION_ID_ATTRIBUTE, str(int(lesionId)))
        return segmentId

    def _snapshot(self, segmentationNode, lesionId: int) -> _UndoItem:
        segmentId = segmentIdForLesion(lesionId)
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            return _UndoItem(segmentationNode.GetID(), segmentId, None, None)
        image = slicer.vtkOrientedImageData()
        segmentationNode.GetBinaryLabelmapRepresentation(segmentId, image)
        return _UndoItem(segmentationNode.GetID(), segmentId, tightOrientedImageCopy(image), _segmentStatus(segment))

    def writeLesionMask(self, volumeNode, lesionId: int, bbox: Sequence[int], mask: np.ndarray,
                        status: Optional[str] = None, segmentationNode=None) -> str:
        """Write one lesion's mask (crop at ``bbox`` of the volume's array) as segment 'Lesion k'.

        Replaces the segment's previous content entirely; callers record an undo step first.
        An empty mask keeps the segment (empty, status 'not found'): lesions are listed, never dropped.
        """
        segmentationNode = segmentationNode or self.segmentationNodeForVolume(volumeNode)
        segmentId = self._ensureSegment(segmentationNode, lesionId)
        mask = np.asarray(mask, dtype=bool)
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        if mask.size == 0 or not mask.any():
            logic.ClearSegment(segmentationNode, segmentId)
            status = STATUS_NOT_FOUND
        else:
            # store only the lesion's box (a tracker or an import may hand over a much larger crop)
            nz = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
            lo, hi = [int(n[0]) for n in nz], [int(n[-1]) + 1 for n in nz]
            mask = mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            bbox = (bbox[0] + lo[0], bbox[0] + hi[0], bbox[2] + lo[1], bbox[2] + hi[1], bbox[4] + lo[2], bbox[4] + hi[2])
            image = orientedImageFromMask(volumeNode, bbox, mask, segmentationNode)
            if not logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, logic.MODE_REPLACE):
                raise RuntimeError(f"could not write lesion {lesionId} into '{segmentationNode.GetName()}'")
            status = status or STATUS_FOUND
        segmentationNode.GetSegmentation().GetSegment(segmentId).SetTag(STATUS_TAG, status)
        return segmentId

    def applyResult(self, volumeNode, result, description: str = "segment") -> list[int]:
        """Write a ``SegmentationResult`` (on ``volumeNode``'s grid) as segments, as one undo step.

        Returns the ids of the lesions that were not found.
        """
        segmentationNode = self.segmentationNodeForVolume(volumeNode)
        step = UndoStep(description, [])
        notFound = []
        for lid in sorted(result.lesions):
            lesion = result.lesions[lid]
            step.items.append(self._snapshot(segmentationNode, lid))
            status = STATUS_NOT_FOUND if (lesion.empty or lesion.status == STATUS_NOT_FOUND) else STATUS_FOUND
            self.writeLesionMask(volumeNode, lid, lesion.bbox, lesion.mask, status, segmentationNode)
            if status == STATUS_NOT_FOUND:
                notFound.append(lid)
        self._pushUndo(step)
        return notFound

    # -- undo -------------------------------------------------------------------------------------
    def _pushUndo(self, step: UndoStep) -> None:
        if step.items:
            self.undoStack.append(step)
            del self.undoStack[:-self.maxUndoSteps]

    def canUndo(self) -> bool:
        return bool(self.undoStack)

    def undoLastResult(self) -> Optional[str]:
        """Restore the segments changed by the last result (segments that did not exist are removed).

        Returns the description of the undone step, or None when there is nothing to undo.
        """
        if not self.undoStack:
            return None
        step = self.undoStack.pop()
        logic = slicer.vtkSlicerSegmentationsModuleLogic
        for item in reversed(step.items):
            node = self.scene.GetNodeByID(item.segmentationNodeID)
            if node is None:
                continue
            segmentation = node.GetSegmentation()
            if item.previous is None:
                if segmentation.GetSegment(item.segmentId) is not None:
                    segmentation.RemoveSegment(item.segmentId)
                continue
            ext = item.previous.GetExtent()
            if ext[0] > ext[1] or ext[2] > ext[3] or ext[4] > ext[5]:
                logic.ClearSegment(node, item.segmentId)
            else:
                logic.SetBinaryLabelmapToSegment(item.previous, node, item.segmentId, logic.MODE_REPLACE)
            segment = segmentation.GetSegment(item.segmentId)
            if segment is not None and item.previousStatus:
                segment.SetTag(STATUS_TAG, item.previousStatus)
        return step.description

    # -- reading results back -----------------------------------------------------------------------
    def lesionStatuses(self, volumeNode) -> dict[int, str]:
        segmentationNode = self.segmentationNodeForVolume(volumeNode, create=False)
        if segmentationNode is None:
            return {}
        seg = segmentationNode.GetSegmentation()
        out = {}
        for sid in seg.GetSegmentIDs():
            lid = _segmentLesionId(seg.GetSegment(sid), sid)
            if lid is not None:
                out[lid] = _segmentStatus(seg.GetSegment(sid))
        return out

    def notFoundLesions(self, volumeNodes: Sequence) -> list[tuple[str, int]]:
        """(volume name, lesion id) of every lesion marked 'not found'."""
        out = []
        for vn in volumeNodes:
            if vn is None:
                continue
            for lid, status in sorted(self.lesionStatuses(vn).items()):
                if status == STATUS_NOT_FOUND:
                    out.append((vn.GetName(), lid))
        return out

    def segmentationResultFromNode(self, volumeNode, volume=None):
        """The lesions of a timepoint's segmentation node as a ``SegmentationResult`` on the volume's grid.

        Reads the segments as they are now (including edits made with the Segment Editor).
        """
        from LesionLocatorLib.core.results import LesionMask, SegmentationResult

        volume = volume if volume is not None else volumeFromVolumeNode(volumeNode)
        result = SegmentationResult(volume)
        segmentationNode = self.segmentationNodeForVolume(volumeNode, create=False)
        if segmentationNode is None:
            return result
        seg = segmentationNode.GetSegmentation()
        for sid in seg.GetSegmentIDs():
            segment = seg.GetSegment(sid)
            lid = _segmentLesionId(segment, sid)
            if lid is None:
                continue
            bbox, crop = maskFromSegment(segmentationNode, sid, volumeNode)
            status = _segmentStatus(segment)
            if crop.size == 0 or not crop.any():
                status = STATUS_NOT_FOUND
            result.lesions[lid] = LesionMask(lid, tuple(int(v) for v in bbox), crop, None, status).shrink()
        return result

    # -- segmentation ---------------------------------------------------------------------------------
    def _volumeKey(self, volumeNode) -> tuple:
        image = volumeNode.GetImageData()
        return (volumeNode.GetID(), image.GetMTime() if image else 0,
                tuple(np.round(volumeIJKToWorldRAS(volumeNode), 6).ravel()))

    def prepareSegmentation(self, baselineNode, pointNodes: Sequence = (), roiNodes: Sequence = (),
                            lesionIds: Optional[Sequence[int]] = None) -> SegmentJob:
        """Main thread: read the baseline and the prompts (all lesions, or only ``lesionIds``)."""
        key = self._volumeKey(baselineNode)
        # the segmenter already holds this image: only the geometry is needed, skip copying the voxels
        volume = volumeFromVolumeNode(baselineNode, copy=self._sessionImageKey != key)
        prompts = self.collectPrompts(volume, pointNodes, roiNodes, lesionIds)
        if not prompts:
            raise LesionLocatorInputError("no prompt: place a point or draw a box on a lesion of the baseline volume")
        return SegmentJob(baselineNode.GetID(), key, volume, prompts, sorted(prompts))

    def speedSettings(self) -> tuple[Any, bool]:
        """(folds, tta) of the chosen speed preset: the same on both backends, so a click gives the same mask."""
        _, folds, tta = SPEED_PRESETS[self.speedPreset]
        return folds, tta

    def backendKey(self) -> tuple:
        folds, tta = self.speedSettings()
        if self.backend == BACKEND_SERVER:
            return (BACKEND_SERVER, self.serverUrl, self.serverToken, str(folds), tta)
        return (self.backend, self.modelPath or None, self.device, str(folds), tta)

    def openBackend(self):
        """The one LesionLocatorLib backend for the current settings (reused while they stay the same).

        Local: ``open_backend(model=path or None for the bundled model, device=, folds=, tta=)``; server:
        ``open_backend(server=url, token=, folds=, tta=)``; separate process: the same server call on the
        loopback server this module started (``InferenceProcess``), so a crash or an out-of-memory kill in
        torch ends that process, not Slicer; a dead process is started again here. Everything else
        (segmenting, the several-prompts rule, tracking, the classical fallback without a Track model) is the
        library's.
        """
        key = self.backendKey()
        processDied = self.backend == BACKEND_PROCESS and self._process is not None and not self._process.alive()
        if self._backend is not None and self._backendKey == key and not processDied:
            return self._backend
        self.closeBackend()
        if self.backend != BACKEND_SERVER and self.modelPath and not os.path.exists(self.modelPath):
            raise LesionLocatorInputError(f"model not found: {self.modelPath}")
        try:
            from LesionLocatorLib.backend import open_backend
        except ImportError as exc:
            raise DependencyError(f"LesionLocatorLib cannot be loaded: {exc}") from exc
        folds, tta = self.speedSettings()
        if self.backend == BACKEND_SERVER:
            if not self.serverUrl:
                raise LesionLocatorInputError("enter the LesionLocator server URL")
            backend = open_backend(server=self.serverUrl, token=self.serverToken or None, folds=folds, tta=tta)
        elif self.backend == BACKEND_PROCESS:
            process = self.inferenceProcess(folds)
            backend = open_backend(server=process.url, token=process.token, folds=folds, tta=tta)
        else:
            try:
                backend = open_backend(model=self.modelPath or None, device=self.device, folds=folds, tta=tta)
            except Exception as exc:
                if not self.modelPath and defaultModelPath() is None:
                    raise LesionLocatorInputError(
                        "no model selected and this build has no bundled default model: choose the LesionLocator "
                        "checkpoint (LesionLocatorModel.zip or its extracted folder) in 'Model'") from exc
                raise
        self._backend, self._backendKey = backend, key
        return backend

    def inferenceProcess(self, folds):
        """The module's own inference server for the current model / device / folds (started when needed)."""
        key = (self.modelPath or None, self.device, str(folds))
        if self._process is not None and (self._process.key != key or not self._process.alive()):
            self.stopInferenceProcess()
        if self._process is None:
            process = InferenceProcess(self.modelPath or None, self.device, folds, key=key)
            process.start()
            self._process = process
        return self._process

    def _explainProcessFailure(self, exc: BaseException) -> None:
        """A request failed because the module's inference process died: say so (Slicer itself is fine)."""
        process = self._process
        if self.backend != BACKEND_PROCESS or process is None or process.alive():
            return
        self._session = self._sessionImageKey = None
        raise RuntimeError("The LesionLocator inference process stopped (crashed or ran out of memory); Slicer is "
                           "not affected and the process starts again with the next request.\n"
                           + (process.logTail(800) or str(exc))) from exc

    def stopInferenceProcess(self) -> None:
        if self._process is not None:
            self._process.stop()
            self._process = None

    def closeBackend(self) -> None:
        """Drop the backend, its session and tracker (settings changed, scene closed, module reloaded).

        The module's inference process stays up while its settings do (``stopInferenceProcess`` ends it)."""
        for obj in (self._session, self._backend):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # closing must never hide the reason the backend is dropped
                    logging.debug("LesionLocator: closing %r failed", obj, exc_info=True)
        self._backend = self._backendKey = None
        self._session = self._sessionImageKey = None

    def testServerConnection(self) -> str:
        """Open the server backend (checks version and token) and describe it; raises with the cause."""
        self.closeBackend()  # always a fresh check
        info = self.openBackend().describe()
        return ", ".join(f"{k}: {v}" for k, v in info.items())

    def computeSegmentation(self, job: SegmentJob, progress: Optional[Callable[[float, str], None]] = None,
                            cancelEvent: Optional[threading.Event] = None):
        """Worker thread: ``backend.session().segment(prompts=...)`` (lesion ids travel unchanged).

        The library applies the several-prompts rule (last mask, else last box, else the union of the points).
        Returns a ``SegmentationResult`` on the baseline's grid with one lesion per requested id.
        """
        from LesionLocatorLib.segment.session import Cancelled

        report = _progressReporter(progress, cancelEvent)
        with self._lock:
            report(0.0, "loading the model")
            backend = self.openBackend()
            if self._session is None:
                self._session = backend.session()
                self._sessionImageKey = None
            if self._sessionImageKey != job.volumeKey:
                report(0.01, "preparing the image" + (" (uploading it)" if getattr(backend, "remote", False) else ""))
                if not job.volume.array.flags.owndata:  # a view of the MRML voxels: the session keeps its own
                    job.volume.array = job.volume.array.copy()
                self._session.set_image(job.volume)
                self._sessionImageKey = job.volumeKey
            try:
                result = self._session.segment(prompts=job.prompts, progress=report, cancel=cancelEvent)
            except Cancelled as exc:
                raise CancelledError("cancelled by the user") from exc
            except Exception as exc:
                self._explainProcessFailure(exc)
                raise
        return self.completeResult(result, job.lesionIds)

    @staticmethod
    def completeResult(result, lesionIds: Sequence[int]):
        """Every requested lesion in ``result`` (a lesion is listed as 'not found', never dropped)."""
        from LesionLocatorLib.core.results import LesionMask

        for lid in lesionIds:
            if lid not in result.lesions:
                result.lesions[lid] = LesionMask.not_found(lid)
        return result

    def applySegmentation(self, job: SegmentJob, result) -> list[int]:
        """Main thread: write the result as segments of the baseline (one undo step)."""
        volumeNode = self.scene.GetNodeByID(job.volumeNodeID)
        if volumeNode is None:
            raise LesionLocatorInputError("the baseline volume was removed while segmenting")
        return self.applyResult(volumeNode, result, f"segment lesion(s) {', '.join(map(str, job.lesionIds))}")

    def segment(self, baselineNode, pointNodes: Sequence = (), roiNodes: Sequence = (),
                lesionIds: Optional[Sequence[int]] = None, progress=None) -> list[int]:
        """Synchronous prepare + compute + apply (console / tests). Returns the ids not found."""
        job = self.prepareSegmentation(baselineNode, pointNodes, roiNodes, lesionIds)
        return self.applySegmentation(job, self.computeSegmentation(job, progress))

    # -- tracking -------------------------------------------------------------------------------------
    def prepareTracking(self, baselineNode, followUpNodes: Sequence, lesionIds: Optional[Sequence[int]] = None) -> TrackJob:
        if baselineNode is None:
            raise LesionLocatorInputError("select the baseline volume")
        followUpNodes = [n for n in followUpNodes if n is not None]
        if not followUpNodes:
            raise LesionLocatorInputError("add at least one follow-up volume")
        if any(n.GetID() == baselineNode.GetID() for n in followUpNodes):
            raise LesionLocatorInputError("the baseline volume is also in the follow-up list")
        baseline = volumeFromVolumeNode(baselineNode)
        result = self.segmentationResultFromNode(baselineNode, baseline)
        masks = {lid: (les.bbox, les.mask) for lid, les in result.lesions.items()
                 if not les.empty and (lesionIds is None or lid in lesionIds)}
        if not masks:
            raise LesionLocatorInputError("segment at least one lesion on the baseline before tracking")
        followUps = [volumeFromVolumeNode(n) for n in followUpNodes]
        return TrackJob(baselineNode.GetID(), [n.GetID() for n in followUpNodes], baseline, followUps, masks,
                        sorted(masks))

    def computeTracking(self, job: TrackJob, progress=None, cancelEvent: Optional[threading.Event] = None) -> list:
        """Worker thread: ``backend.tracker()`` tracks the baseline masks into every follow-up.

        The bundled model has no Track folder: the library's tracker then propagates classically. Returns one
        ``SegmentationResult`` per follow-up; every baseline lesion appears in each of them.
        """
        from LesionLocatorLib.segment.session import Cancelled

        report = _progressReporter(progress, cancelEvent)
        masks = {lid: _fullMask(job.baseline.shape, bbox, crop) for lid, (bbox, crop) in job.baselineMasks.items()}
        with self._lock:
            report(0.0, "loading the tracking model")
            tracker = self.openBackend().tracker()
            try:
                report(0.02, "preparing the images")
                tracker.set_images(job.baseline, job.followUps)
                report(0.05, f"tracking {len(masks)} lesion(s) into {len(job.followUps)} follow-up(s)")
                tracked = tracker.track(masks=masks, progress=report, cancel=cancelEvent)
            except Cancelled as exc:
                raise CancelledError("cancelled by the user") from exc
            except Exception as exc:
                self._explainProcessFailure(exc)
                raise
            finally:
                tracker.close()
        return self.completeTrackingResults(job, tracked.followups)

    @classmethod
    def completeTrackingResults(cls, job: TrackJob, results) -> list:
        """One result per follow-up, each listing every tracked lesion (missing ones as 'not found')."""
        results = list(results)
        if len(results) != len(job.followUps):
            raise RuntimeError(f"the tracker returned {len(results)} results for {len(job.followUps)} follow-ups")
        for res, followUp in zip(results, job.followUps):
            if tuple(res.image.shape) != tuple(followUp.shape):
                raise RuntimeError(f"a tracking result has the shape {res.image.shape}, its follow-up {followUp.shape}")
            cls.completeResult(res, job.lesionIds)
        return results

    def applyTracking(self, job: TrackJob, results: Sequence) -> list[tuple[str, int]]:
        """Main thread: write every follow-up's result (one undo step for all). Returns (volume, id) not found."""
        step = UndoStep("track lesions", [])
        notFound = []
        for nodeID, res in zip(job.followUpNodeIDs, results):
            volumeNode = self.scene.GetNodeByID(nodeID)
            if volumeNode is None:
                raise LesionLocatorInputError("a follow-up volume was removed while tracking")
            segNode = self.segmentationNodeForVolume(volumeNode)
            for lid in sorted(res.lesions):
                lesion = res.lesions[lid]
                step.items.append(self._snapshot(segNode, lid))
                status = STATUS_NOT_FOUND if (lesion.empty or lesion.status == STATUS_NOT_FOUND) else STATUS_FOUND
                self.writeLesionMask(volumeNode, lid, lesion.bbox, lesion.mask, status, segNode)
                if status == STATUS_NOT_FOUND:
                    notFound.append((volumeNode.GetName(), lid))
        self._pushUndo(step)
        return notFound

    # -- report ---------------------------------------------------------------------------------------
    def buildReport(self, volumeNodes: Sequence):
        """The longitudinal report of the current segments (baseline first, then the follow-ups)."""
        from LesionLocatorLib.measure.report import build_report_from_results

        volumeNodes = [n for n in volumeNodes if n is not None]
        if not volumeNodes:
            raise LesionLocatorInputError("select the baseline volume")
        results = [self.segmentationResultFromNode(n) for n in volumeNodes]
        if not any(r.lesions for r in results):
            raise LesionLocatorInputError("no lesion segmented yet")
        # every timepoint lists every lesion (a lesion missing at a timepoint is 'not found', not dropped)
        from LesionLocatorLib.core.results import LesionMask

        allIds = sorted({lid for r in results for lid in r.lesions})
        for r in results:
            for lid in allIds:
                if lid not in r.lesions:
                    r.lesions[lid] = LesionMask.not_found(lid)
        self.lastReport = build_report_from_results([n.GetName() for n in volumeNodes], results)
        return self.lastReport

    def reportToTable(self, report, tableNode=None):
        """Report rows -> a vtkMRMLTableNode (numbers as double columns, None as NaN / empty)."""
        rows = report.rows()
        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", "LesionLocator report")
            tableNode.SetAttribute(ROLE_ATTRIBUTE, "report")
        columns = list(rows[0].keys()) if rows else []
        table = vtk.vtkTable()
        for name in columns:
            values = [row.get(name) for row in rows]
            numeric = all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values)
            numeric = numeric and any(v is not None for v in values)
            array = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
            array.SetName(name)
            for v in values:
                if numeric:
                    array.InsertNextValue(float("nan") if v is None else float(v))
                else:
                    array.InsertNextValue("" if v is None else str(v))
            table.AddColumn(array)
        tableNode.SetAndObserveTable(table)
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        tableNode.Modified()
        return tableNode

    def volumePlot(self, report, chartNode=None):
        """A chart of lesion volume (ml) over the timepoints, one series per lesion in the lesion's colour."""
        scene = self.scene
        if chartNode is None:
            chartNode = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "LesionLocator volumes")
            chartNode.SetAttribute(ROLE_ATTRIBUTE, "chart")
        chartNode.RemoveAllPlotSeriesNodeIDs()
        tableNode = chartNode.GetNodeReference("LesionLocatorVolumesTable")
        if tableNode is None:
            tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", "LesionLocator volumes table")
            tableNode.SetAttribute(ROLE_ATTRIBUTE, "volumes")
            chartNode.SetNodeReferenceID("LesionLocatorVolumesTable", tableNode.GetID())
        table = vtk.vtkTable()
        x = vtk.vtkDoubleArray()
        x.SetName("timepoint_index")
        for i in range(len(report.timepoints)):
            x.InsertNextValue(i)
        table.AddColumn(x)
        for lid in report.lesion_ids:
            col = vtk.vtkDoubleArray()
            col.SetName(f"Lesion {lid} volume_ml")
            for i in range(len(report.timepoints)):
                try:
                    m = report.measurement(lid, i)
                    col.InsertNextValue(float(m.volume_ml) if m.found else 0.0)
                except KeyError:
                    col.InsertNextValue(float("nan"))
            table.AddColumn(col)
        tableNode.SetAndObserveTable(table)
        # reuse existing series nodes of this chart's lesions, create the others
        for lid in report.lesion_ids:
            name = f"Lesion {lid}"
            series = None
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode")):
                candidate = scene.GetNthNodeByClass(i, "vtkMRMLPlotSeriesNode")
                if candidate.GetAttribute(ROLE_ATTRIBUTE) == f"volume:{lid}":
                    series = candidate
                    break
            if series is None:
                series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
                series.SetAttribute(ROLE_ATTRIBUTE, f"volume:{lid}")
            series.SetAndObserveTableNodeID(tableNode.GetID())
            series.SetXColumnName("timepoint_index")
            series.SetYColumnName(f"Lesion {lid} volume_ml")
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            series.SetColor(*lesionColor(lid))
            chartNode.AddAndObservePlotSeriesNodeID(series.GetID())
        chartNode.SetTitle("Lesion volume over time")
        chartNode.SetXAxisTitle("timepoint (0 = baseline)")
        chartNode.SetYAxisTitle("volume (ml)")
        return chartNode

    @staticmethod
    def tableRows(tableNode) -> list[dict[str, str]]:
        """A table node's content as strings (what the CSV export writes)."""
        table = tableNode.GetTable()
        names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        out = []
        for r in range(table.GetNumberOfRows()):
            row = {}
            for c, name in enumerate(names):
                value = table.GetValue(r, c)
                if value.IsNumeric():
                    number = value.ToDouble()
                    row[name] = "" if math.isnan(number) else repr(number)
                else:
                    row[name] = value.ToString()
            out.append(row)
        return out

    def exportTableCSV(self, tableNode, path: str) -> str:
        """Write a report table as CSV (atomically: a reader never sees half a file)."""
        rows = self.tableRows(tableNode)
        table = tableNode.GetTable()
        names = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
        from LesionLocatorLib.core.files import atomic_write  # the library's one writer (umask permissions)

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                writer = csv.DictWriter(f, fieldnames=names, lineterminator="\n")
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(path, write)
        return path


def _progressReporter(progress, cancelEvent):
    """progress(fraction, message) that also stops the job when the user cancelled."""
    def report(fraction: float, message: str) -> None:
        if cancelEvent is not None and cancelEvent.is_set():
            raise CancelledError("cancelled by the user")
        if progress:
            progress(fraction, message)

    return report


def _fullMask(shape, bbox, crop) -> np.ndarray:
    out = np.zeros(tuple(shape), dtype=bool)
    z0, z1, y0, y1, x0, x1 = (int(v) for v in bbox)
    out[z0:z1, y0:y1, x0:x1] = crop
    return out


# --------------------------------------------------------------------------------------------------
# Widget (application only: everything Qt lives below)
# --------------------------------------------------------------------------------------------------
class _waitCursor:
    """Wait cursor while a block runs (restored on errors too)."""

    def __enter__(self):
        import qt

        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        return self

    def __exit__(self, *exc):
        slicer.app.restoreOverrideCursor()
        return False


class QtScheduler:
    """The controller's scheduler on Qt: ``callLater`` runs after the current event, the repeating timer is a
    QTimer (the job pump: LesionLocatorModuleLib.controller.PUMP_INTERVAL_MS)."""

    def __init__(self) -> None:
        import qt

        self._timer = qt.QTimer()
        self._callback = None
        self._timer.connect("timeout()", self._onTimeout)

    def callLater(self, callback) -> None:
        import qt

        qt.QTimer.singleShot(0, callback)

    def startRepeating(self, intervalMs: int, callback) -> None:
        self._callback = callback
        self._timer.setInterval(int(intervalMs))
        self._timer.start()

    def stopRepeating(self) -> None:
        self._timer.stop()
        self._callback = None

    def _onTimeout(self) -> None:
        if self._callback is not None:
            self._callback()


class _WidgetView:
    """The controller's view: Slicer dialogs, the status label and the progress bar."""

    def __init__(self, widget) -> None:
        self.widget = widget

    def showError(self, message: str) -> None:
        slicer.util.errorDisplay(message, windowTitle="LesionLocator")

    def showStatus(self, message: str) -> None:
        self.widget.ui.statusLabel.text = message

    def showProgress(self, fraction: Optional[float], message: str) -> None:
        bar = self.widget.ui.progressBar
        if fraction is None or fraction <= 0.0:
            bar.setRange(0, 0)  # busy indicator until the job reports real progress
        else:
            bar.setRange(0, 100)
            bar.setValue(int(round(100 * fraction)))
        bar.setFormat((message or "") + " %p%")
        if message:
            self.widget.ui.statusLabel.text = message

    def stateChanged(self) -> None:
        self.widget.updateGUIFromState()

    def showReport(self, tableNode, chartNode) -> None:
        self.widget.ui.reportTableView.setMRMLTableNode(tableNode)
        if slicer.util.mainWindow() is not None:
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)


class LesionLocatorWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Widgets, dialogs and shortcuts only; every decision is the controller's (LesionLocatorModuleLib)."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.controller = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._shortcuts = []
        self._updatingWidgets = False
        self._followUpIDs = None

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        # Slicer loaded this file as sys.modules["LesionLocator"] (Base/QTCore/qSlicerScriptedUtils.cxx,
        # loadSourceAsModule), which the controller imports; its package sits next to this file
        from LesionLocatorModuleLib.controller import LesionLocatorController

        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LesionLocator.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = LesionLocatorLogic()
        self.controller = LesionLocatorController(
            self.logic, None, QtScheduler(), _WidgetView(self),
            serverToken=lambda: self.ui.serverTokenLineEdit.text, beforeInference=self._checkReady)

        for key, (label, _, _) in SPEED_PRESETS.items():
            self.ui.speedPresetComboBox.addItem(label, key)
        for device in DEVICES:
            self.ui.deviceComboBox.addItem(device, device)
        self.ui.backendComboBox.addItem("In this Slicer", BACKEND_LOCAL)
        self.ui.backendComboBox.addItem("Separate process on this computer", BACKEND_PROCESS)
        self.ui.backendComboBox.addItem("LesionLocator server", BACKEND_SERVER)
        self.ui.licenseLabel.text = (f"Published weights: <a href=\"{LICENSE_URL}\">{LICENSE_NAME}</a> "
                                     "(non-commercial). Research use only.")
        self.ui.licenseLabel.openExternalLinks = True
        self.ui.progressBar.hide()
        self.ui.cancelButton.hide()
        # keep placing points until the user leaves place mode
        self.ui.promptPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.addFollowUpButton.connect("clicked(bool)", self.onAddFollowUp)
        self.ui.removeFollowUpButton.connect("clicked(bool)", self.onRemoveFollowUp)
        for button, action in ((self.ui.newLesionButton, "newLesion"), (self.ui.placeBoxButton, "placeBox"),
                               (self.ui.segmentButton, "segment"), (self.ui.undoButton, "undo"),
                               (self.ui.trackButton, "track"), (self.ui.reportButton, "report"),
                               (self.ui.cancelButton, "cancel")):
            button.connect("clicked(bool)", lambda _checked=False, a=action: self.onAction(a))
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        self.ui.useDefaultModelCheckBox.connect("toggled(bool)", self.onUseDefaultModelToggled)
        self.ui.backendComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.speedPresetComboBox.connect("currentIndexChanged(int)", self.onSettingsChanged)
        self.ui.serverUrlLineEdit.connect("editingFinished()", self.onSettingsChanged)
        self.ui.serverTokenLineEdit.connect("editingFinished()", self.onSettingsChanged)
        self.ui.baselineSelector.connect("currentNodeChanged(vtkMRMLNode*)", lambda *_: self.updateGUIFromState())

        self.initializeParameterNode()
        self.updateDependencyStatus()

    def cleanup(self) -> None:
        """Module reload / exit: the controller stops its timer, worker and observers."""
        self.removeObservers()
        self._removeShortcuts()
        if self.controller is not None:
            self.controller.cleanup()
        if self.logic is not None:
            self.logic.closeBackend()
            self.logic.stopInferenceProcess()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._installShortcuts()

    def exit(self) -> None:
        self._removeShortcuts()
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)

    def onSceneStartClose(self, caller, event) -> None:
        self.controller.sceneStartClose()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node -------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.baselineVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                p.baselineVolume = first
        self.controller.ensurePromptPoints()
        self.ui.promptPlaceWidget.setCurrentNode(p.promptPoints)
        self._applySettingsToWidgets()

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)
        self._parameterNode = inputParameterNode
        self.controller.state = inputParameterNode  # the wrapper has the controller state's attribute names
        if self._parameterNode:
            # baselineSelector, promptPointsSelector, autoSegmentCheckBox, currentLesionIdSpinBox and
            # serverUrlLineEdit are bound through their 'SlicerParameterName' property in the .ui file
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromState)
            self.updateGUIFromState()

    def _applySettingsToWidgets(self) -> None:
        """Parameter node -> settings widgets (without writing half-updated widget values back)."""
        p = self._parameterNode
        self._updatingWidgets = True
        try:
            for combo, value in ((self.ui.backendComboBox, p.backend), (self.ui.deviceComboBox, p.device),
                                 (self.ui.speedPresetComboBox, p.speedPreset)):
                index = combo.findData(value)
                combo.currentIndex = max(index, 0)
            self.ui.useDefaultModelCheckBox.checked = not p.modelPath
            self.ui.modelPathLineEdit.currentPath = p.modelPath
        finally:
            self._updatingWidgets = False
        self.onSettingsChanged()

    def onSettingsChanged(self, *_) -> None:
        p = self._parameterNode
        if p is None or self._updatingWidgets:
            return
        with slicer.util.NodeModify(p.parameterNode):  # one Modified event (and one GUI update) for all
            p.backend = self.ui.backendComboBox.currentData or BACKEND_LOCAL
            p.device = self.ui.deviceComboBox.currentData or "auto"
            p.speedPreset = self.ui.speedPresetComboBox.currentData or "fast"
            p.modelPath = "" if self.ui.useDefaultModelCheckBox.checked else self.ui.modelPathLineEdit.currentPath
        server = p.backend == BACKEND_SERVER
        self.ui.serverGroupBox.setVisible(server)
        self.ui.localGroupBox.setVisible(not server)
        self.ui.modelPathLineEdit.enabled = not self.ui.useDefaultModelCheckBox.checked

    def onModelPathChanged(self, path: str) -> None:
        if path:
            self.ui.useDefaultModelCheckBox.checked = False
        if path and os.path.exists(path):
            # stored in QSettings under the .ui's settingKey (CTK Libs/Widgets/ctkPathLineEdit.cpp,
            # addCurrentPathToHistory); nothing stores it otherwise
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
        self.onSettingsChanged()

    def onUseDefaultModelToggled(self, checked: bool) -> None:
        self.onSettingsChanged()

    def updateGUIFromState(self, *_) -> None:
        p = self._parameterNode
        if p is None:
            return
        actions = self.controller.actions()
        for button, action in ((self.ui.segmentButton, "segment"), (self.ui.placeBoxButton, "placeBox"),
                               (self.ui.newLesionButton, "newLesion"), (self.ui.trackButton, "track"),
                               (self.ui.reportButton, "report"), (self.ui.undoButton, "undo"),
                               (self.ui.exportCsvButton, "exportCsv"), (self.ui.cancelButton, "cancel")):
            button.enabled = actions[action]
        busy = self.controller.busy
        self.ui.progressBar.setVisible(busy)
        self.ui.cancelButton.setVisible(busy)
        self.ui.currentLesionLabel.text = f"Next prompts go to: Lesion {p.currentLesionId}"
        if p.promptPoints is not None and self.ui.promptPlaceWidget.currentNode() is not p.promptPoints:
            self.ui.promptPlaceWidget.setCurrentNode(p.promptPoints)
        observed = self.controller.observedPromptNodeIDs()
        wanted = {n.GetID() for n in ([p.promptPoints] if p.promptPoints else []) + self.controller.promptBoxes()}
        if observed != wanted:  # another point list was selected, or a box was added / removed
            self.controller.observePromptNodes()
        if p.reportTable is not None and self.ui.reportTableView.mrmlTableNode() is not p.reportTable:
            self.ui.reportTableView.setMRMLTableNode(p.reportTable)
        self._refreshFollowUpList()
        self._refreshNotFound()

    def _refreshNotFound(self) -> None:
        nodes = self.controller.timepointNodes()
        missing = self.logic.notFoundLesions(nodes) if self._parameterNode.baselineVolume else []
        self.ui.notFoundLabel.text = ("Not found: " + "; ".join(f"Lesion {lid} in {name}" for name, lid in missing)
                                      if missing else "")

    def _refreshFollowUpList(self) -> None:
        """Rebuild the list only when the follow-ups changed (keeps the selection 'Remove' reads)."""
        nodes = [n for n in self._parameterNode.followUpVolumes if n is not None]
        ids = [(n.GetID(), n.GetName()) for n in nodes]
        if ids == self._followUpIDs:
            return
        self._followUpIDs = ids
        lst = self.ui.followUpListWidget
        row = lst.currentRow
        lst.clear()
        for node in nodes:
            lst.addItem(node.GetName())
        if 0 <= row < lst.count:
            lst.setCurrentRow(row)

    # -- dependencies ---------------------------------------------------------------------------------
    def updateDependencyStatus(self) -> bool:
        try:
            missing = missingDependencies()
        except OSError as exc:
            missing = [f"(cannot read requirements: {exc})"]
        if LIBRARY_ROOT is None:
            missing.append("LesionLocatorLib (broken installation: reinstall the extension)")
        if sys.version_info[:2] < MINIMUM_PYTHON:
            self.ui.dependencyStatusLabel.text = UNSUPPORTED_SLICER
        elif missing:
            self.ui.dependencyStatusLabel.text = ("Missing Python packages: " + ", ".join(missing)
                                                  + ". Click 'Install dependencies' (needs internet, a few minutes).")
        else:
            self.ui.dependencyStatusLabel.text = "All Python dependencies are installed."
        self.ui.installDependenciesButton.enabled = bool(missing) and sys.version_info[:2] >= MINIMUM_PYTHON
        return not missing

    def onInstallDependencies(self) -> None:
        if not slicer.util.confirmOkCancelDisplay(
                "LesionLocator will now download and install PyTorch (through the PyTorch extension) and the Python "
                "packages listed in its requirements. This can take several minutes and a few GB of disk space. "
                "Continue?"):
            return
        try:
            with _waitCursor():
                installDependencies(askConfirmation=False, log=lambda m: slicer.util.showStatusMessage(m, 3000))
        except Exception as exc:  # one dialog with the cause; the status below is refreshed either way
            # (not slicer.util.tryWithErrorDisplay: it shows the error and then re-raises, Base/Python/slicer/util.py)
            logging.exception("Installing the LesionLocator dependencies failed")
            slicer.util.errorDisplay("Installing the LesionLocator dependencies failed.\n" + describeError(exc),
                                     windowTitle="LesionLocator")
        else:
            slicer.util.infoDisplay("Dependencies installed. If the module still reports missing packages, restart "
                                    "Slicer.")
        finally:
            self.updateDependencyStatus()

    def _checkReady(self) -> bool:
        """Dependencies + licence acknowledgement before the first inference (called by the controller)."""
        if self.logic.backend in (BACKEND_LOCAL, BACKEND_PROCESS) and not self.updateDependencyStatus():
            slicer.util.errorDisplay("LesionLocator cannot run yet: some Python packages are missing.\n"
                                     + self.ui.dependencyStatusLabel.text)
            return False
        if self.logic.usesPublishedWeights() and not self._licenseAccepted():
            return False
        return True

    def _licenseAccepted(self) -> bool:
        import qt

        settings = qt.QSettings()
        if slicer.util.toBool(settings.value(LICENSE_SETTINGS_KEY, False)):
            return True
        if slicer.app.testingEnabled():
            return True  # self-test: the tiny test model is not the published weights
        accepted = slicer.util.confirmYesNoDisplay(
            LICENSE_TEXT + f"\n\nFull licence text: {LICENSE_URL}\n\nDo you accept these terms?",
            windowTitle="LesionLocator model licence")
        if accepted:
            settings.setValue(LICENSE_SETTINGS_KEY, True)
        return bool(accepted)

    # -- inputs ---------------------------------------------------------------------------------------
    def onAddFollowUp(self) -> None:
        error = self.controller.addFollowUp(self.ui.followUpSelector.currentNode())
        if error:
            slicer.util.errorDisplay(error, windowTitle="LesionLocator")

    def onRemoveFollowUp(self) -> None:
        self.controller.removeFollowUp(self.ui.followUpListWidget.currentRow)

    # -- actions (buttons and shortcuts go through the controller's enable state) ----------------------
    def onAction(self, action: str) -> None:
        if self._parameterNode is None:
            return
        if action == "placePoint":
            self.ui.promptPlaceWidget.setCurrentNode(self._parameterNode.promptPoints)
        self.controller.trigger(action)
        self.updateGUIFromState()

    # kept for scripts and the self-test
    def onSegment(self) -> None:
        self.onAction("segment")

    def onUndo(self) -> None:
        self.onAction("undo")

    def onNewLesion(self) -> None:
        self.onAction("newLesion")

    def onPlaceBox(self) -> None:
        self.onAction("placeBox")

    def onReport(self) -> None:
        self.onAction("report")

    def _installShortcuts(self) -> None:
        import qt

        self._removeShortcuts()
        mainWindow = slicer.util.mainWindow()
        if mainWindow is None:
            return
        for name, action in (("point", "placePoint"), ("box", "placeBox"), ("newLesion", "newLesion"),
                             ("undo", "undo"), ("segment", "segment")):
            shortcut = qt.QShortcut(mainWindow)
            shortcut.setKey(qt.QKeySequence(SHORTCUTS[name]))
            shortcut.connect("activated()", lambda a=action: self.onAction(a))
            self._shortcuts.append(shortcut)

    def _removeShortcuts(self) -> None:
        for shortcut in self._shortcuts:
            shortcut.disconnect("activated()")
            shortcut.setParent(None)
        self._shortcuts = []

    def waitForJob(self, timeoutSeconds: float = 600.0) -> None:
        """Run the job timer until the running job finished (self-test / scripting)."""
        self.controller.waitForJob(timeoutSeconds, processEvents=slicer.app.processEvents)

    def onExportCsv(self) -> None:
        import qt

        p = self._parameterNode
        if p.reportTable is None:
            return
        path = qt.QFileDialog.getSaveFileName(None, "Export report", "LesionLocator_report.csv", "CSV files (*.csv)")
        if not path:
            return
        try:
            self.logic.exportTableCSV(p.reportTable, path)
        except Exception as exc:
            slicer.util.errorDisplay("Could not write the CSV file.\n" + describeError(exc), windowTitle="LesionLocator")
            return
        self.ui.statusLabel.text = f"Report written to {path}"

    def onTestConnection(self) -> None:
        try:
            self.controller.configureLogic()
            with _waitCursor():
                info = self.logic.testServerConnection()
        except Exception as exc:
            slicer.util.errorDisplay("The LesionLocator server is not reachable.\n" + describeError(exc),
                                     windowTitle="LesionLocator server")
            return
        slicer.util.infoDisplay(f"Connected: {info}", windowTitle="LesionLocator server")


# --------------------------------------------------------------------------------------------------
# Self-test (runs in the application: Slicer --no-main-window --python-code ...)
# --------------------------------------------------------------------------------------------------
def makeTinyTestModel(folder: str, seed: int = 0) -> str:
    """A tiny random-weight point + box model in the published layout (tests only; masks are meaningless)."""
    from LesionLocatorLib.model.tiny_model import write_random_checkpoint

    write_random_checkpoint(folder, kinds=("point", "box"), patch_size=(16, 16, 16), spacing=(2.0, 2.0, 2.0),
                            features_per_stage=(2, 4), n_blocks_per_stage=(1, 1), seed=seed)
    return folder


class LesionLocatorTest(ScriptedLoadableModuleTest):
    """Workflow tests in the real application (widget + logic)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_logic_geometry()
        self.setUp()
        self.test_widget_workflow()

    def _makeVolume(self, name: str, shift: float = 0.0):
        array = np.full((24, 32, 32), -1000, dtype=np.int16)
        zz, yy, xx = np.mgrid[:24, :32, :32]
        array[(zz - 12) ** 2 + (yy - 16 - shift) ** 2 + (xx - 16) ** 2 <= 25] = 60
        node = slicer.util.addVolumeFromArray(array, name=name)
        node.SetSpacing(1.5, 1.2, 2.0)
        node.SetOrigin(-20.0, 10.0, 5.0)
        return node

    def test_logic_geometry(self):
        self.delayDisplay("Logic: volume and prompt geometry")
        node = self._makeVolume("baseline")
        logic = LesionLocatorLogic()
        volume = volumeFromVolumeNode(node)
        self.assertEqual(volume.shape, (24, 32, 32))
        self.assertEqual(tuple(np.round(volume.spacing, 6)), (2.0, 1.2, 1.5))
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "pts")
        ras = volume.voxel_to_world((12, 16, 16), ras=True)
        points.AddControlPoint(vtk.vtkVector3d(*ras))
        logic.assignLesionIds([points], [], 1)
        prompts = logic.collectPrompts(volume, [points], [])
        self.assertEqual(prompts[1][0].zyx, (12.0, 16.0, 16.0))
        self.delayDisplay("Logic geometry OK")

    def test_widget_workflow(self):
        import tempfile

        self.delayDisplay("Widget workflow: point -> segment -> undo -> follow-up -> report")
        missing = missingDependencies()
        if missing:
            # not skipTest: slicer.selfTests['LesionLocator'] is ScriptedLoadableModule.runTest, which calls
            # testCase.runTest() directly, without a unittest runner (Slicer main, Base/Python/slicer/
            # ScriptedLoadableModule.py, runTest), so SkipTest would escape and the README's headless command
            # would exit 1 on a Slicer that simply has not installed the dependencies yet
            self.delayDisplay("Widget workflow not run: missing " + ", ".join(missing)
                              + " (open the module and click 'Install dependencies')")
            return
        baseline = self._makeVolume("baseline")
        followUp = self._makeVolume("follow-up", shift=2.0)
        modelDir = makeTinyTestModel(tempfile.mkdtemp(prefix="LesionLocatorTest"))

        # works with and without a main window (--no-main-window): the module's own widget instance
        widget = slicer.modules.lesionlocator.widgetRepresentation().self()
        widget.initializeParameterNode()
        p = widget._parameterNode
        p.baselineVolume = baseline
        p.autoSegment = False
        widget.ui.useDefaultModelCheckBox.checked = False
        widget.ui.modelPathLineEdit.currentPath = modelDir
        widget.ui.deviceComboBox.currentIndex = widget.ui.deviceComboBox.findData("cpu")
        widget.ui.speedPresetComboBox.currentIndex = widget.ui.speedPresetComboBox.findData("fastest")
        widget.onSettingsChanged()

        volume = volumeFromVolumeNode(baseline)
        ras = volume.voxel_to_world((12, 16, 16), ras=True)
        p.promptPoints.AddControlPoint(vtk.vtkVector3d(*ras))
        widget.onSegment()
        widget.waitForJob()
        segNode = widget.logic.segmentationNodeForVolume(baseline, create=False)
        self.assertIsNotNone(segNode)
        segment = segNode.GetSegmentation().GetSegment(segmentIdForLesion(1))
        self.assertIsNotNone(segment)
        self.assertEqual(segment.GetName(), "Lesion 1")
        self.assertTrue(widget.logic.canUndo())

        widget.onUndo()
        self.assertIsNone(segNode.GetSegmentation().GetSegment(segmentIdForLesion(1)))
        self.assertFalse(widget.logic.canUndo())

        # a second lesion from a box, after "New lesion"
        interactionNode = slicer.app.applicationLogic().GetInteractionNode()
        widget.onNewLesion()
        interactionNode.SwitchToViewTransformMode()
        self.assertEqual(p.currentLesionId, 2)
        widget.onPlaceBox()
        interactionNode.SwitchToViewTransformMode()
        roi = p.promptBoxes[len(p.promptBoxes) - 1]
        self.assertEqual(lesionIdOfROI(roi), 2)
        center = volume.voxel_to_world((12, 16, 16), ras=True)
        roi.SetCenter(*center)
        roi.SetSize(12.0, 12.0, 12.0)
        widget.onSegment()
        widget.waitForJob()
        segment2 = segNode.GetSegmentation().GetSegment(segmentIdForLesion(2))
        self.assertIsNotNone(segment2)
        self.assertEqual(segment2.GetName(), "Lesion 2")
        for got, expected in zip(segment2.GetColor(), lesionColor(2)):
            self.assertAlmostEqual(got, expected, places=5)

        # a hand-made lesion so that the report has a non-empty baseline
        mask = np.zeros((6, 6, 6), dtype=bool)
        mask[1:5, 1:5, 1:5] = True
        widget.logic.writeLesionMask(baseline, 1, (9, 15, 13, 19, 13, 19), mask)
        p.followUpVolumes.append(followUp)
        widget.onReport()
        self.assertIsNotNone(p.reportTable)
        self.assertGreaterEqual(p.reportTable.GetNumberOfRows(), 2)
        csvPath = os.path.join(tempfile.mkdtemp(prefix="LesionLocatorTest"), "report.csv")
        widget.logic.exportTableCSV(p.reportTable, csvPath)
        with open(csvPath, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        self.assertEqual(len(rows), p.reportTable.GetNumberOfRows())
        self.assertIn("volume_ml", rows[0])
        self.delayDisplay("Widget workflow OK")
