"""TuckerSegment: a 3D Slicer scripted module. The engine lives in TuckerSegmentLib (no Slicer imports).

This is the minimal module; the segmentation panel, Logic and self-tests come in later versions.
"""
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)


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
        self.parent.acknowledgementText = _(
            "Method: Weber, Dexl, Rügamer, Ingrisch, Post-Training Network Compression for 3D Medical Image "
            "Segmentation via Tucker Decomposition (2024). Models: TotalSegmentator (Wasserthal et al.), nnU-Net.")


class TuckerSegmentWidget(ScriptedLoadableModuleWidget):
    """Panel: filled in by the segmentation panel issue."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)


class TuckerSegmentLogic(ScriptedLoadableModuleLogic):
    """MRML-facing logic; delegates all computation to TuckerSegmentLib."""

    def engineVersion(self) -> str:
        import TuckerSegmentLib
        return TuckerSegmentLib.__version__


class TuckerSegmentTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's generic module tests."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_engine_imports()

    def test_engine_imports(self):
        self.assertTrue(TuckerSegmentLogic().engineVersion())
