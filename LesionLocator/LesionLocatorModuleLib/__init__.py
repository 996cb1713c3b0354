"""Qt-free parts of the LesionLocator Slicer module (importable with the slicer-core wheel).

A package, not a file next to LesionLocator.py: Slicer's scripted-module factory takes every ``*.py`` in the
module folder for a module (Base/QTGUI/qSlicerScriptedLoadableModuleFactory.cxx, isValidFile: "accept if
current file is a python script"), so helpers live in a subfolder, as DICOMLib does.
"""
