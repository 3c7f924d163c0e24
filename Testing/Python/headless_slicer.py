"""Headless 3D Slicer on the ``slicer-core`` pip package: real MRML, no Qt.

``setup()`` builds a ``vtkMRMLScene`` with a ``vtkSlicerApplicationLogic`` and the Volumes,
Segmentations, Colors and SubjectHierarchy module logics, sets ``slicer.mrmlScene`` and
``slicer.modules.<name>.logic()``, and installs import stand-ins for what needs Qt only (``qt``,
``ctk``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``slicer.i18n``) so
scripted modules import. MRML itself is never stood in for. Batch pipelines can use it too::

    import headless_slicer, TuckerSegment
    headless_slicer.setup()
    node = headless_slicer.load_volume("ct.nrrd")
    TuckerSegment.TuckerSegmentLogic().segment(node)
"""
from __future__ import annotations

import sys
import tempfile
import types
import unittest
from pathlib import Path

import slicer
import vtk

MODULE_LOGICS = {  # slicer.modules attribute -> (application logic name, class); colours first
    "colors": ("Colors", "vtkSlicerColorLogic"),
    "volumes": ("Volumes", "vtkSlicerVolumesLogic"),
    "segmentations": ("Segmentations", "vtkSlicerSegmentationsModuleLogic"),
    "subjecthierarchy": ("SubjectHierarchy", "vtkSlicerSubjectHierarchyModuleLogic"),
}
GENERIC_COLORS = "0 Background 0 0 0 0\n1 label 128 174 128 255\n"
_alive: list[object] = []  # module logics keep only a raw pointer to the application logic: hold it here


def _module(name: str, **attributes: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class _ScriptedLoadableModule:
    def __init__(self, parent: object = None) -> None:
        self.parent = parent if parent is not None else types.SimpleNamespace()


class _ScriptedLoadableModuleWidget:
    def __init__(self, parent: object = None) -> None:
        self.parent = parent

    def setup(self) -> None:
        raise RuntimeError("module widgets need Slicer's Qt application; headless_slicer runs logic only")


class _ScriptedLoadableModuleLogic:
    def __init__(self, parent: object = None) -> None:
        self.parent = parent


class _ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message: str, msec: int = 0) -> None:
        print(message)


def _install_qt_stand_ins() -> None:
    """Modules Slicer provides through its Qt application; only those, and only when missing."""
    def tr(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text

    def parameter_pack(cls: type) -> type:
        return cls

    def within_range(minimum: float, maximum: float) -> tuple[float, float]:
        return minimum, maximum

    stand_ins = {
        "qt": _module("qt"),
        "ctk": _module("ctk"),
        "slicer.i18n": _module("slicer.i18n", tr=tr, translate=translate),
        "slicer.ScriptedLoadableModule": _module(
            "slicer.ScriptedLoadableModule", ScriptedLoadableModule=_ScriptedLoadableModule,
            ScriptedLoadableModuleWidget=_ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleLogic=_ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest=_ScriptedLoadableModuleTest),
        "slicer.parameterNodeWrapper": _module("slicer.parameterNodeWrapper", parameterNodeWrapper=parameter_pack,
                                               parameterPack=parameter_pack, WithinRange=within_range),
    }
    for name, module in stand_ins.items():
        if name in sys.modules:
            continue
        try:
            __import__(name)
        except ImportError:
            sys.modules[name] = module
            if name.startswith("slicer."):
                setattr(slicer, name.split(".", 1)[1], module)


def setup(home: str | Path | None = None) -> slicer.vtkMRMLScene:
    """A fresh scene with application and module logics, installed as ``slicer.mrmlScene``."""
    output = vtk.vtkOutputWindow()
    output.SetDisplayModeToAlwaysStdErr()
    vtk.vtkOutputWindow.SetInstance(output)
    home = Path(home) if home is not None else Path(tempfile.mkdtemp(prefix="headless_slicer_"))
    colors = home / "share" / "ColorFiles"
    colors.mkdir(parents=True, exist_ok=True)
    (colors / "GenericColors.txt").write_text(GENERIC_COLORS)  # labelmap display nodes refer to it

    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    _alive[:] = [app, scene]
    app.SetHomeDirectory(str(home))
    app.SetShareDirectory("share")
    app.SetMRMLScene(scene)
    app.SetSliceLogics(vtk.vtkCollection())
    app.SetViewLogics(vtk.vtkCollection())
    modules = {}
    for attribute, (name, cls) in MODULE_LOGICS.items():
        logic = getattr(slicer, cls)()
        logic.SetMRMLApplicationLogic(app)
        logic.SetMRMLScene(scene)
        app.SetModuleLogic(name, logic)
        if name == "Colors":
            app.SetColorLogic(logic)
        modules[attribute] = types.SimpleNamespace(name=name, logic=lambda logic=logic: logic)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**modules)
    _install_qt_stand_ins()
    return scene


def load_volume(path: str | Path, name: str | None = None) -> slicer.vtkMRMLScalarVolumeNode:
    """Load a volume file into ``slicer.mrmlScene`` with Slicer's volumes logic (storage node attached)."""
    node = slicer.modules.volumes.logic().AddArchetypeVolume(str(path), name or Path(path).name.split(".")[0])
    if node is None:
        raise OSError(f"Slicer could not read {path}")
    return node
