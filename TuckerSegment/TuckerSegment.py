"""TuckerSegment: a 3D Slicer scripted module; this file only names it and its parts.

The parts live in ``TuckerSegmentModule`` (parameters, Logic, install logic, widget, self-test); the
engine in ``TuckerSegmentLib`` (no Slicer, no Qt). Long work runs in a worker process, never in a thread
of Slicer's Python. Parses on Python 3.9, so an old Slicer lists the module and says what it needs.
"""
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule
from TuckerSegmentModule.Logic import TuckerSegmentLogic, platformProblem
from TuckerSegmentModule.Parameters import TuckerSegmentParameterNode
from TuckerSegmentModule.SelfTest import TuckerSegmentTest
from TuckerSegmentModule.Widget import TuckerSegmentWidget

__all__ = ["TuckerSegment", "TuckerSegmentLogic", "TuckerSegmentParameterNode", "TuckerSegmentTest",
           "TuckerSegmentWidget"]


class TuckerSegment(ScriptedLoadableModule):
    """Module description shown in Slicer's module list."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("TuckerSegment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["TuckerSegment developers"]
        self.parent.helpText = _(
            "Segments CT volumes with TotalSegmentator-class nnU-Net models compressed by Tucker decomposition "
            "(Weber et al. 2024), and compresses any nnU-Net v2 model. For research use, not for clinical use.")
        problem = platformProblem()
        if problem:
            self.parent.helpText += "\n\n" + problem
        self.parent.acknowledgementText = _(
            "Method: Weber, Dexl, Rügamer, Ingrisch, Post-Training Network Compression for 3D Medical Image "
            "Segmentation via Tucker Decomposition (2024). Models: TotalSegmentator (Wasserthal et al.), nnU-Net.")
