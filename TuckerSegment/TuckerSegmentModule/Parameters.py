"""The panel's state, saved with the scene (``parameterNodeWrapper``).

``modelFolder`` and ``outputParent`` are plain strings bound by the widget itself: Slicer's connector for
``ctkPathLineEdit`` binds only ``pathlib.Path``, which reads as ``"."`` when empty."""
from typing import Annotated

from slicer import vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from TuckerSegmentLib.defaults import MAX_TRAINING_ITERATIONS, MIN_TILE_STEP, TILE_STEP


@parameterNodeWrapper
class TuckerSegmentParameterNode:
    """Task and variant are keys of ``TuckerSegmentLib.variants.panel``; device, runtime and precision keys of
    ``Widget.DEVICES``, ``RUNTIMES`` and ``PRECISIONS``."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    task: str = "auto"
    variant: str = "auto"
    device: str = "auto"
    structures: list[str]
    tileStep: Annotated[float, WithinRange(MIN_TILE_STEP, 1.0)] = TILE_STEP
    runtime: str = "auto"
    precision: str = "auto"
    modelFolder: str = ""
    policy: str = "flops"
    target: Annotated[float, WithinRange(0.05, 1.0)] = 0.5
    outputParent: str = ""
    outputName: str = ""
    measureSpeed: bool = True
    distillIterations: Annotated[int, WithinRange(0, MAX_TRAINING_ITERATIONS)] = 0
    reportTable: vtkMRMLTableNode
    paretoChart: vtkMRMLPlotChartNode
