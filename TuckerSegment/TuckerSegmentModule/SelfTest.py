"""The module's self-test (Slicer's module tests, and pytest with slicer-core): real inference with the
bundled demo model on the bundled chest CT and a real compression, both in the worker process. It
skips, saying why, where the engine's dependencies are missing (Slicer's extension build machines)."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from .Logic import TuckerSegmentLogic, platformProblem
from .SceneNodes import exportLabels

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"


def skipReason():
    """Why the self-test cannot run here (old Slicer, missing packages), or None."""
    problem = platformProblem()
    if problem:
        return problem
    from TuckerSegmentLib.dependencies import problems
    missing = [p for p in problems() if p.blocking]
    if missing:
        return "missing Python packages (" + "; ".join(str(p) for p in missing) + "); install them from the panel"
    return None


class TuckerSegmentTest(ScriptedLoadableModuleTest):
    SAMPLE = RESOURCES / "SampleData" / "CTChest4.nrrd"
    DEMO_MODEL = RESOURCES / "Models" / "chest-demo"

    def setUp(self):
        """Each test skips, saying why, where it cannot run: Slicer's ``runUnitTest`` (its ctest) runs the ``test_*``
        methods through unittest, never ``runTest``."""
        reason = skipReason()
        if reason:
            self.skipTest(f"TuckerSegment self-test skipped: {reason}")
        slicer.mrmlScene.Clear()

    def runTest(self):
        reason = skipReason()
        if reason:
            self.delayDisplay(f"TuckerSegment self-test skipped: {reason}")
            return
        self.setUp()
        self.test_segments_the_bundled_sample_with_the_demo_model()
        self.setUp()
        self.test_compresses_the_demo_model_and_reports()

    def _sample(self):
        node = slicer.modules.volumes.logic().AddArchetypeVolume(str(self.SAMPLE), "CTChest")
        self.assertIsNotNone(node, f"could not read {self.SAMPLE}")
        return node

    def test_segments_the_bundled_sample_with_the_demo_model(self):
        self.delayDisplay("Segmenting the bundled chest CT with the demo model on the CPU, in the worker process")
        volume = self._sample()
        logic = TuckerSegmentLogic()
        job = logic.startSegmentation(volume, model="auto", task="demo", device="cpu")
        self.assertEqual(job.wait(300), "done", job.error)
        segmentation = logic.finishSegmentation(job)
        segments = segmentation.GetSegmentation()
        names = {segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())}
        self.assertTrue({"right lung", "left lung", "ribs"} <= names, names)
        labels = exportLabels(segmentation, [segments.GetSegmentIdBySegmentName("right lung"),
                                             segments.GetSegmentIdBySegmentName("left lung")], volume)
        ct = slicer.util.arrayFromVolume(volume)
        spacing = volume.GetSpacing()
        lungs_ml = [float((labels == value).sum()) * spacing[0] * spacing[1] * spacing[2] / 1000 for value in (1, 2)]
        for millilitres in lungs_ml:
            self.assertGreater(millilitres, 300)  # adult lungs: litres; the sample covers most of them
        self.assertLess(float(ct[labels > 0].mean()), -500)  # lungs are air-filled (HU)
        table = logic.showStatistics(segmentation, volume)
        self.assertEqual(table.GetNumberOfRows(), segments.GetNumberOfSegments())
        self.delayDisplay(f"Segmented in {job.seconds:.1f} s: {len(names)} segments; lungs {lungs_ml} ml")

    def test_compresses_the_demo_model_and_reports(self):
        self.delayDisplay("Compressing the demo model to a FLOP budget of 0.5, calibrated on the sample")
        volume = self._sample()
        logic = TuckerSegmentLogic()
        source = self.DEMO_MODEL / "Dataset901_ChestDemo"
        with tempfile.TemporaryDirectory() as folder:
            output = Path(folder) / "chest-demo-selftest"
            job = logic.startCompression(source, output, policy="flops", target=0.5, calibrationNodes=[volume],
                                         device="cpu", measure=False)
            self.assertEqual(job.wait(600), "done", job.error)
            review = logic.finishCompression(job)
            self.assertTrue((output / "fold_0" / "tucker.json").is_file())
            self.assertLessEqual(review.compressed.flops, 0.55 * review.original.flops)
            self.assertLess(review.compressed.params, review.original.params)
            self.assertGreater(review.agreement, 0.8)
            table, chart = logic.showReview(review)
            self.assertGreaterEqual(table.GetNumberOfRows(), 4)
            self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 2)
        self.delayDisplay(f"Compressed: {review.compressed.flops / review.original.flops:.2f} of the FLOPs, "
                          f"Dice vs original {review.agreement:.3f} (Python {sys.version.split()[0]})")
