"""TuckerSegment: a 3D Slicer scripted module. The engine lives in TuckerSegmentLib (no Slicer imports).

The Logic segments volume nodes into segmentation nodes (and batches files); the panel comes later.
"""
from pathlib import Path

import slicer
import vtk
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
    """Segments volume nodes into segmentation nodes; all computation is delegated to TuckerSegmentLib.

    The last (model, device) stays loaded and is reused, so a loop over many volumes in Slicer's
    Python console pays the loading cost once; choosing another model releases it."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self, parent)
        self._task = self._taskKey = None
        self.modelReason = ""
        self.notices = []

    def engineVersion(self) -> str:
        import TuckerSegmentLib
        return TuckerSegmentLib.__version__

    def task(self, model="auto", device: str = "auto", task: str = "auto"):
        """The task segmenter for ``model``: ``auto`` (the variant of ``task`` that fits this machine best), a
        variant id, a model folder, or a list of model folders that together make one task. Sets
        ``modelReason`` (which model, where and why); messages about fallbacks go to ``notices``."""
        from TuckerSegmentLib.catalogue import catalogue
        from TuckerSegmentLib.hardware import detect_devices
        from TuckerSegmentLib.models import choose_model, usable_devices
        from TuckerSegmentLib.runner import SafeTask
        from TuckerSegmentLib.task import TaskSegmenter
        if isinstance(model, (list, tuple)):
            paths = tuple(Path(m).expanduser().resolve() for m in model)
            key = (paths, device)
            if key != self._taskKey:
                self._task, self._taskKey = TaskSegmenter(list(paths), device=device), key
            self.modelReason = "model folders given"
            return self._task
        variants, devices = catalogue(), detect_devices()
        choice = choose_model(model, task, device, variants, devices)
        key = (choice.folders, choice.device)
        if key != self._taskKey:
            self._task = SafeTask(choice, variants, usable_devices(device, devices), notify=self.notices.append)
            self._taskKey = key
        self.modelReason = choice.reason
        return self._task

    def segment(self, volumeNode, model="auto", device: str = "auto", subset=None, segmentationNode=None,
                progress=None, cancel=None, task: str = "auto"):
        """Segment ``volumeNode`` where it is shown (parent linear transform included) and return the
        segmentation node: ``segmentationNode`` with its segments replaced, or a new node. ``progress``
        gets (fraction, message); ``cancel()`` returning True stops between tiles. On any error the scene
        is left as it was."""
        return self._segmentWith(self.task(model, device, task), volumeNode, subset, segmentationNode, progress, cancel)

    def _segmentWith(self, segmenter, volumeNode, subset, segmentationNode, progress, cancel):
        volume = self._readVolume(volumeNode)
        result = segmenter.segment(volume, progress, cancel, subset)
        return self._writeSegmentation(result, volumeNode, segmentationNode)

    def saveSegmentation(self, segmentationNode, path) -> Path:
        """Write ``segmentationNode`` as ``.seg.nrrd`` with Slicer's storage node; the file appears whole or
        not at all."""
        from TuckerSegmentLib.atomic import atomic_output_file
        from TuckerSegmentLib.errors import OutputPathError
        from TuckerSegmentLib.volume import SEG_NRRD
        path = Path(path).expanduser()
        if not path.name.lower().endswith(SEG_NRRD):
            raise OutputPathError(f"{path}: name the segmentation file .seg.nrrd")
        storage = segmentationNode.GetStorageNode()
        added = storage is None
        if added:
            segmentationNode.AddDefaultStorageNode()
            storage = segmentationNode.GetStorageNode()
        previous = storage.GetFileName()
        try:
            with atomic_output_file(path) as staging:
                storage.SetFileName(str(staging))
                if not storage.WriteData(segmentationNode):
                    raise OutputPathError(f"Slicer could not write {path}; check free disk space and permissions")
        except BaseException:
            storage.SetFileName(previous or "")
            if added:
                segmentationNode.SetAndObserveStorageNodeID(None)
                slicer.mrmlScene.RemoveNode(storage)
            raise
        storage.SetFileName(str(path.resolve()))
        return path.resolve()

    def segmentFiles(self, inputs, model="auto", device: str = "auto", subset=None, outputFolder=None,
                     progress=None, cancel=None, task: str = "auto") -> list:
        """Segment CT files (a list, or a folder's NIfTI/NRRD files) with one model load, saving
        ``<name>.seg.nrrd`` beside each input (or in ``outputFolder``). The loaded nodes are removed again.
        Returns ``(input, output or None, message)`` per file: a bad file or output is reported and the rest
        go on; a model error stops the batch, a cancel ends it after the files already done."""
        from TuckerSegmentLib.errors import OutputPathError, SegmentationCancelled, VolumeError
        from TuckerSegmentLib.label_output import plan_outputs
        from TuckerSegmentLib.volume import volume_files
        files = volume_files(inputs)
        pairs = (plan_outputs(files, Path(outputFolder)) if outputFolder is not None
                 else [plan_outputs([f], f.parent)[0] for f in files])
        segmenter = self.task(model, device, task)  # loaded once for every file
        segmenter.check_subset(subset)  # a wrong model or structure fails before any file is read
        report = progress or (lambda fraction, message: None)
        outcomes = []
        for index, (source, output) in enumerate(pairs):
            def step(fraction, message, index=index, source=source):
                report((index + fraction) / len(pairs), f"{index + 1}/{len(pairs)} {source.name}: {message}")
            added = []
            try:
                volumeNode = slicer.modules.volumes.logic().AddArchetypeVolume(str(source), source.name)
                if volumeNode is None:
                    raise VolumeError(f"Slicer could not read {source}; pass a NIfTI or NRRD CT volume")
                added.append(volumeNode)
                segmentation = self._segmentWith(segmenter, volumeNode, subset, None, step, cancel)
                added.append(segmentation)
                self.saveSegmentation(segmentation, output)
                outcomes.append((source, output, f"{segmentation.GetSegmentation().GetNumberOfSegments()} segments"))
            except (VolumeError, OutputPathError) as exc:
                outcomes.append((source, None, str(exc)))
            except SegmentationCancelled as exc:
                outcomes.append((source, None, str(exc)))
                break
            finally:
                for node in added:
                    _removeWithDependents(node)
        return outcomes

    def _readVolume(self, volumeNode):
        """The node's voxels (k, j, i) and its IJK-to-world matrix as an engine ``Volume``."""
        from TuckerSegmentLib.errors import VolumeError
        from TuckerSegmentLib.volume import Volume
        if volumeNode is None or not volumeNode.IsA("vtkMRMLScalarVolumeNode"):
            raise VolumeError("no CT volume selected; load a CT volume and choose it as the input")
        if volumeNode.IsA("vtkMRMLLabelMapVolumeNode"):
            raise VolumeError(f"{volumeNode.GetName()} is a label map; choose a CT volume as the input")
        if volumeNode.GetImageData() is None:
            raise VolumeError(f"{volumeNode.GetName()} has no voxels; load a CT volume")
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        ijkToWorld = slicer.util.arrayFromVTKMatrix(matrix)
        parent = volumeNode.GetParentTransformNode()
        if parent is not None:
            if not parent.IsTransformToWorldLinear():
                raise VolumeError(f"{volumeNode.GetName()} is under a non-linear transform; harden the transform "
                                  "(Transforms module) or remove it, then segment")
            toWorld = vtk.vtkMatrix4x4()
            parent.GetMatrixTransformToWorld(toWorld)
            ijkToWorld = slicer.util.arrayFromVTKMatrix(toWorld) @ ijkToWorld
        return Volume(slicer.util.arrayFromVolume(volumeNode), ijkToWorld)

    def _writeSegmentation(self, result, volumeNode, segmentationNode):
        """Import the labels into a staging node, then hand its segments to the target; temporary nodes
        are removed whatever happens."""
        from TuckerSegmentLib.provenance import provenance
        scene = slicer.mrmlScene
        transformId = volumeNode.GetTransformNodeID()
        staging = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "TuckerSegment staging")
        staging.SetHideFromEditors(True)
        temporary = [staging]
        try:
            staging.SetAndObserveTransformNodeID(transformId)
            staging.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
            labelmap = self._labelmapNode(result, volumeNode, temporary)
            if result.labels.any() and not slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(
                    labelmap, staging):
                raise RuntimeError("Slicer could not import the label map into a segmentation")
            tags = provenance(result)
            byValue = {s.value: s for s in result.segments}
            segmentation = staging.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(index)
                label = byValue[segment.GetLabelValue()]
                segment.SetName(label.name)
                segment.SetColor(*label.color)
                if label.terminology is not None:
                    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), label.terminology.to_slicer_string())
                for key, value in tags.items():
                    segment.SetTag(key, value)
            if segmentationNode is None:
                segmentationNode = staging
                temporary.remove(staging)
                segmentationNode.SetName(scene.GenerateUniqueName(f"{volumeNode.GetName()} segmentation"))
                segmentationNode.SetHideFromEditors(False)
                self._placeInHierarchy(segmentationNode, volumeNode)
            else:
                segmentationNode.SetAndObserveTransformNodeID(transformId)
                segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
                segmentationNode.GetSegmentation().DeepCopy(segmentation)
            for key, value in tags.items():
                segmentationNode.SetAttribute(key, value)
            if segmentationNode.GetDisplayNode() is None:
                segmentationNode.CreateDefaultDisplayNodes()
            return segmentationNode
        finally:
            for node in temporary:
                _removeWithDependents(node)

    def _labelmapNode(self, result, volumeNode, temporary: list):
        """A labelmap node on the volume's grid (and transform) holding the result, coloured and named by a
        colour table; both nodes are appended to ``temporary`` as soon as they exist."""
        scene = slicer.mrmlScene
        colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "TuckerSegment colors")
        temporary.append(colors)
        colors.SetHideFromEditors(True)
        colors.SetTypeToUser()
        largest = max((s.value for s in result.segments), default=0)
        colors.SetNumberOfColors(largest + 1)
        for value in range(largest + 1):
            colors.SetColor(value, "(none)", 0.0, 0.0, 0.0, 0.0)
        for segment in result.segments:
            colors.SetColor(segment.value, segment.name, *segment.color, 1.0)
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "TuckerSegment labels")
        temporary.append(labelmap)
        labelmap.SetHideFromEditors(True)
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        labelmap.SetIJKToRASMatrix(matrix)
        labelmap.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(labelmap, result.labels)
        labelmap.CreateDefaultDisplayNodes()
        labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
        return labelmap

    @staticmethod
    def _placeInHierarchy(node, volumeNode) -> None:
        """Put a new segmentation beside its volume in the subject hierarchy (the volume's study)."""
        hierarchy = slicer.mrmlScene.GetSubjectHierarchyNode()
        volumeItem = hierarchy.GetItemByDataNode(volumeNode) if hierarchy else 0
        if not volumeItem:
            return
        parent, item = hierarchy.GetItemParent(volumeItem), hierarchy.GetItemByDataNode(node)
        if item:
            hierarchy.SetItemParent(item, parent)
        else:
            hierarchy.CreateItem(parent, node)


def _removeWithDependents(node) -> None:
    """Remove a node and the display and storage nodes that only it uses."""
    scene = slicer.mrmlScene
    if node is None or scene.GetNodeByID(node.GetID()) is None:
        return
    dependents = []
    if node.IsA("vtkMRMLDisplayableNode"):
        dependents += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
    if node.IsA("vtkMRMLStorableNode"):
        dependents += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
    scene.RemoveNode(node)
    for dependent in dependents:
        if dependent is not None and scene.GetNodeByID(dependent.GetID()) is not None:
            scene.RemoveNode(dependent)


class TuckerSegmentTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer's generic module tests."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_engine_imports()

    def test_engine_imports(self):
        self.assertTrue(TuckerSegmentLogic().engineVersion())
