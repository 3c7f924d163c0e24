"""TuckerSegment: a 3D Slicer scripted module. The engine lives in TuckerSegmentLib (no Slicer imports).

The panel (``Resources/UI/TuckerSegment.ui``) only gathers choices and shows progress; the Logic reads
and writes MRML and leaves everything else to the engine. Long work runs in a background thread.
"""
import pathlib
from pathlib import Path
from typing import Annotated

import slicer
import vtk
from slicer import vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

POLL_MS = 200
CHOOSE_FOLDER = "choose-folder"
DEVICES = (("auto", "Auto"), ("cpu", "CPU"), ("cuda", "GPU (CUDA)"), ("mps", "Apple GPU (MPS)"))


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


@parameterNodeWrapper
class TuckerSegmentParameterNode:
    """The panel's state, saved with the scene. Task and variant are keys of ``TuckerSegmentLib.variants.panel``."""

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    task: str = "auto"
    variant: str = "auto"
    device: str = "auto"
    structures: list[str]
    tileStep: Annotated[float, WithinRange(0.25, 1.0)] = 0.8
    halfPrecision: bool = True
    modelFolder: pathlib.Path
    policy: str = "flops"
    target: Annotated[float, WithinRange(0.05, 1.0)] = 0.5
    outputFolder: pathlib.Path
    measureSpeed: bool = True
    reportTable: vtkMRMLTableNode
    paretoChart: vtkMRMLPlotChartNode


class TuckerSegmentWidget(ScriptedLoadableModuleWidget):
    """The panel: choices into the parameter node, jobs started through the Logic and polled by a timer."""

    def setup(self):
        import qt
        ScriptedLoadableModuleWidget.setup(self)
        panel = slicer.util.loadUI(self.resourcePath("UI/TuckerSegment.ui"))
        self.layout.addWidget(panel)
        self.ui = slicer.util.childWidgetVariables(panel)
        panel.setMRMLScene(slicer.mrmlScene)
        self.logic = TuckerSegmentLogic()
        self._parameterNode = None
        self._job = self._jobKind = None
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)
        for key, label in DEVICES:
            self.ui.deviceComboBox.addItem(label, key)
        from TuckerSegmentLib.policies.methods import METHODS
        for method in METHODS:
            self.ui.policyComboBox.addItem(method.label, method.key)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskChanged)
        self.ui.variantComboBox.connect("currentIndexChanged(int)", self.onVariantChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.policyComboBox.connect("currentIndexChanged(int)", self.onPolicyChanged)
        self.ui.structureSearchBox.connect("textChanged(QString)", self.onStructureFilter)
        self.ui.structureListWidget.connect("itemChanged(QListWidgetItem*)", self.onStructureChecked)
        self.ui.clearStructuresButton.connect("clicked(bool)", self.onClearStructures)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.modelFolderPathLineEdit.connect("currentPathChanged(QString)", self.updateButtons)
        self.ui.outputFolderPathLineEdit.connect("currentPathChanged(QString)", self.updateButtons)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.compressButton.connect("clicked(bool)", self.onCompress)
        self.ui.compressCancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.showStatisticsButton.connect("clicked(bool)", self.onShowStatistics)
        self.ui.addVariantButton.connect("clicked(bool)", self.onAddVariant)
        self._observers = [slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)]
        self._review = None
        self.initializeParameterNode()
        self.fillTasks()

    def cleanup(self):
        self.onCancel()
        self._timer.stop()
        for tag in self._observers:
            slicer.mrmlScene.RemoveObserver(tag)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiConnection)

    def enter(self):
        self.initializeParameterNode()

    def onSceneEndClose(self, caller=None, event=None):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        """Bind the panel to this scene's parameter node; pick the first CT when none is chosen."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiConnection)
        self._parameterNode = TuckerSegmentParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self._guiConnection = self._parameterNode.connectGui(self.ui)
        _selectData(self.ui.deviceComboBox, self._parameterNode.device)
        _selectData(self.ui.policyComboBox, self._parameterNode.policy)
        self.updateButtons()

    # --- choices ---------------------------------------------------------------------------------
    def fillTasks(self):
        self._fillCombo(self.ui.taskComboBox, self.logic.taskChoices(self._parameterNode.task), self._parameterNode.task)
        self.ui.taskComboBox.addItem(_("Choose an nnU-Net model folder..."), CHOOSE_FOLDER)
        self.onTaskChanged()

    def _fillCombo(self, combo, choices, selected):
        import qt
        combo.blockSignals(True)
        combo.clear()
        for index, choice in enumerate(choices):
            combo.addItem(choice.label, choice.key)
            combo.setItemData(index, choice.tooltip, qt.Qt.ToolTipRole)
        _selectData(combo, selected)
        combo.blockSignals(False)

    def onTaskChanged(self, index=None):
        import qt
        if _currentData(self.ui.taskComboBox) == CHOOSE_FOLDER:
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("nnU-Net v2 model folder"))
            if folder:
                self._parameterNode.task, self._parameterNode.variant = "folder:" + folder, "auto"
            self.fillTasks()
            return
        self._parameterNode.task = _currentData(self.ui.taskComboBox) or "auto"
        self._fillCombo(self.ui.variantComboBox, self.logic.variantChoices(self._parameterNode.task,
                                                                           self._parameterNode.device),
                        self._parameterNode.variant)
        self.onVariantChanged()

    def onVariantChanged(self, index=None):
        import qt
        self._parameterNode.variant = _currentData(self.ui.variantComboBox) or "auto"
        combo = self.ui.variantComboBox
        self.ui.variantReasonLabel.text = combo.itemData(combo.currentIndex, qt.Qt.ToolTipRole) or ""
        self.fillStructures()

    def onDeviceChanged(self, index=None):
        self._parameterNode.device = _currentData(self.ui.deviceComboBox) or "auto"
        self.onTaskChanged()

    def onPolicyChanged(self, index=None):
        from TuckerSegmentLib.policies.methods import DEFAULT_METHOD, method
        self._parameterNode.policy = _currentData(self.ui.policyComboBox) or DEFAULT_METHOD
        chosen = method(self._parameterNode.policy)
        self.ui.targetSpinBox.enabled = bool(chosen.target)
        self.ui.targetSpinBox.toolTip = chosen.target or _("this method chooses its ranks itself")

    def fillStructures(self):
        import qt
        try:
            names = self.logic.structureNames(self._parameterNode.task, self._parameterNode.variant,
                                              self._parameterNode.device)
        except Exception as error:  # a task that is not installed has no structure list yet
            names, self.ui.statusLabel.text = [], str(error)
        wanted = set(self._parameterNode.structures)
        widget = self.ui.structureListWidget
        widget.blockSignals(True)
        widget.clear()
        for name in names:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            item.setCheckState(qt.Qt.Checked if name in wanted else qt.Qt.Unchecked)
            widget.addItem(item)
        widget.blockSignals(False)
        self._parameterNode.structures = [n for n in names if n in wanted]
        self.onStructureFilter(self.ui.structureSearchBox.text)
        self._showStructureCount(len(names))

    def onStructureFilter(self, text):
        widget, text = self.ui.structureListWidget, text.strip().lower()
        for row in range(widget.count):
            item = widget.item(row)
            item.setHidden(bool(text) and text not in item.text().lower())

    def onStructureChecked(self, item=None):
        import qt
        widget = self.ui.structureListWidget
        self._parameterNode.structures = [widget.item(r).text() for r in range(widget.count)
                                          if widget.item(r).checkState() == qt.Qt.Checked]
        self._showStructureCount(widget.count)

    def onClearStructures(self):
        self._parameterNode.structures = []
        self.fillStructures()

    def _showStructureCount(self, total):
        chosen = len(self._parameterNode.structures)
        self.ui.structureCountLabel.text = (_("{chosen} of {total} structures").format(chosen=chosen, total=total)
                                            if chosen else _("All {total} structures").format(total=total))

    def updateButtons(self, *args):
        idle = self._job is None
        self.ui.applyButton.enabled = idle and self.ui.inputVolumeSelector.currentNode() is not None
        self.ui.compressButton.enabled = idle and bool(self.ui.modelFolderPathLineEdit.currentPath) and bool(
            self.ui.outputFolderPathLineEdit.currentPath)
        self.ui.cancelButton.enabled = not idle and self._jobKind == "segment"
        self.ui.compressCancelButton.enabled = not idle and self._jobKind == "compress"
        self.ui.addVariantButton.enabled = idle and self._review is not None

    # --- jobs ------------------------------------------------------------------------------------
    def _dependenciesReady(self):
        problems = self.logic.dependencyProblems()
        self.ui.dependenciesLabel.text = ""
        if not problems:
            return True
        listed = "\n".join(f"- {p}" for p in problems)
        if not slicer.util.confirmOkCancelDisplay(
                _("TuckerSegment needs these Python packages:\n{listed}\n\nInstall them now? This takes a few "
                  "minutes and downloads PyTorch when it is missing.").format(listed=listed)):
            self.ui.dependenciesLabel.text = _("Not installed: {listed}").format(listed=listed)
            return False
        with slicer.util.tryWithErrorDisplay(_("Installing TuckerSegment's dependencies failed."), waitCursor=True):
            self.logic.installDependencies(problems)
            return True
        return False

    def onApply(self):
        if not self._dependenciesReady():
            return
        node = self._parameterNode
        model, task = self.logic.modelAndTask(node.task, node.variant)
        self.logic.notices.clear()  # the status line shows this run's fallbacks only
        with slicer.util.tryWithErrorDisplay(_("Segmentation could not start."), waitCursor=True):
            self._startJob("segment", self.logic.startSegmentation(
                node.inputVolume, model=model, device=node.device, subset=list(node.structures) or None, task=task,
                tileStep=node.tileStep, halfPrecision=node.halfPrecision))
            self.ui.variantReasonLabel.text = self.logic.modelReason

    def onCompress(self):
        if not self._dependenciesReady():
            return
        node = self._parameterNode
        calibration = list(self.ui.calibrationVolumesSelector.checkedNodes())
        with slicer.util.tryWithErrorDisplay(_("Compression could not start."), waitCursor=True):
            self._review = None
            self._startJob("compress", self.logic.startCompression(
                self.ui.modelFolderPathLineEdit.currentPath, self.ui.outputFolderPathLineEdit.currentPath,
                policy=node.policy, target=node.target, calibrationNodes=calibration, device=node.device,
                measure=node.measureSpeed))

    def _startJob(self, kind, job):
        self._job, self._jobKind = job, kind
        self._timer.start()
        self.updateButtons()

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()
            self._status(_("Cancelling..."))

    def _status(self, text, fraction=None):
        label, bar = ((self.ui.statusLabel, self.ui.progressBar) if self._jobKind == "segment"
                      else (self.ui.compressStatusLabel, self.ui.compressProgressBar))
        label.text = text
        if fraction is not None:
            bar.value = int(round(100 * fraction))

    def onPoll(self):
        from TuckerSegmentLib.background import CANCELLED, RUNNING
        job = self._job
        fraction, message = job.progress()
        if job.state == RUNNING:
            self._status(message, fraction)
            return
        self._timer.stop()
        try:
            if job.state == CANCELLED:
                self._status(_("Cancelled; nothing was changed."), 0)
            elif self._jobKind == "segment":
                self._finishSegmentation(job)
            else:
                self._finishCompression(job)
        except Exception as error:
            self._status(_("Failed: {error}").format(error=error), 0)
            slicer.util.errorDisplay(str(error))
        finally:
            self._job = None
            self.updateButtons()

    def _finishSegmentation(self, job):
        node = self._parameterNode
        segmentation = self.logic.finishSegmentation(job, node.inputVolume, node.outputSegmentation)
        node.outputSegmentation = segmentation
        self.ui.showStatisticsButton.enabled = True
        self._status(_("Done in {seconds:.1f} s with {model} ({policy}) on {device}: {count} segments").format(
            seconds=job.seconds, model=job.result.model, policy=job.result.policy, device=job.result.device,
            count=segmentation.GetSegmentation().GetNumberOfSegments()), 1)
        if self.logic.notices:
            self.ui.statusLabel.text += "\n" + "\n".join(self.logic.notices)

    def _finishCompression(self, job):
        node = self._parameterNode
        self._review = self.logic.finishCompression(job)
        node.reportTable, node.paretoChart = self.logic.showReview(self._review, node.reportTable, node.paretoChart)
        self.ui.reportTableView.setMRMLTableNode(node.reportTable)
        view = self.ui.paretoPlotWidget.mrmlPlotViewNode()
        if view is None or not slicer.mrmlScene.IsNodePresent(view):
            view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "TuckerSegment Pareto view")
            self.ui.paretoPlotWidget.setMRMLPlotViewNode(view)
        view.SetPlotChartNodeID(node.paretoChart.GetID())
        self._status(_("Compressed in {seconds:.0f} s: {folder}").format(seconds=job.seconds,
                                                                         folder=self._review.output), 1)

    def onAddVariant(self):
        with slicer.util.tryWithErrorDisplay(_("Could not add the variant."), waitCursor=True):
            added = self.logic.addToMyVariants(self._review)
            self._parameterNode.task = "folder:" + added.source
            self._parameterNode.variant = added.folder
            self.fillTasks()
            self._status(_("Added {name}: choose it under Task and Variant.").format(name=added.id))

    def onShowStatistics(self):
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Segment statistics failed."), waitCursor=True):
            table = self.logic.showStatistics(node.outputSegmentation, node.inputVolume)
            slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
            slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
            slicer.app.applicationLogic().PropagateTableSelection()


def _currentData(combo):
    return combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else None


def _selectData(combo, key):
    index = combo.findData(key)
    combo.currentIndex = index if index >= 0 else 0


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

    def task(self, model="auto", device: str = "auto", task: str = "auto", tileStep: float = 0.8,
             halfPrecision: bool = True):
        """The task segmenter for ``model``: ``auto`` (the variant of ``task`` that fits this machine best), a
        variant id, a model folder, or a list of model folders that together make one task. Sets
        ``modelReason`` (which model, where and why); messages about fallbacks go to ``notices``."""
        from TuckerSegmentLib.segment.task import TaskSegmenter
        from TuckerSegmentLib.variants.catalogue import catalogue
        from TuckerSegmentLib.variants.choice import choose_model, usable_devices
        from TuckerSegmentLib.variants.guard import SafeTask
        from TuckerSegmentLib.variants.hardware import detect_devices
        options = {"tile_step": float(tileStep), "half_precision": bool(halfPrecision)}
        if isinstance(model, (list, tuple)):
            paths = tuple(Path(m).expanduser().resolve() for m in model)
            key = (paths, device, tuple(options.items()))
            if key != self._taskKey:
                self._task, self._taskKey = TaskSegmenter(list(paths), device=device, **options), key
            self.modelReason = "model folders given"
            return self._task
        variants, devices = catalogue(), detect_devices()
        choice = choose_model(model, task, device, variants, devices)
        key = (choice.folders, choice.device, tuple(options.items()))
        if key != self._taskKey:
            self._task = SafeTask(choice, variants, usable_devices(device, devices), notify=self.notices.append,
                                  **options)
            self._taskKey = key
        self.modelReason = choice.reason
        return self._task

    # --- what the panel offers ---------------------------------------------------------------------
    def taskChoices(self, current: str = "auto") -> list:
        """Task combo entries (``TuckerSegmentLib.variants.panel.Choice``): Auto, the catalogue's tasks, your models
        (``current``, a ``folder:<path>`` key the user picked, is kept among them)."""
        from TuckerSegmentLib.variants.catalogue import catalogue
        from TuckerSegmentLib.variants.panel import FOLDER, task_choices
        from TuckerSegmentLib.variants.user_variants import user_variants
        folders = [current[len(FOLDER):]] if current.startswith(FOLDER) else []
        return task_choices(catalogue(), user_variants(), folders)

    def variantChoices(self, task: str = "auto", device: str = "auto") -> list:
        """Variant combo entries for ``task``: "Auto: <its pick>" (reason as tooltip) first."""
        from TuckerSegmentLib.variants.catalogue import catalogue
        from TuckerSegmentLib.variants.hardware import detect_devices
        from TuckerSegmentLib.variants.panel import variant_choices
        from TuckerSegmentLib.variants.user_variants import user_variants
        return variant_choices(task, catalogue(), detect_devices(), device, user_variants())

    @staticmethod
    def modelAndTask(task: str, variant: str) -> tuple:
        """``segment``'s (model, task) for a task and variant key of the panel."""
        from TuckerSegmentLib.variants.panel import model_and_task
        return model_and_task(task, variant)

    def structureNames(self, task: str = "auto", variant: str = "auto", device: str = "auto") -> list:
        """The structures the panel's choice segments, in label order (nothing is loaded)."""
        from TuckerSegmentLib.variants.panel import structure_names
        return structure_names(task, variant, device)

    # --- dependencies ------------------------------------------------------------------------------
    @staticmethod
    def dependencyProblems() -> list:
        """Python packages the engine needs that are missing or of an untested version (nothing installed)."""
        from TuckerSegmentLib.dependencies import problems
        return problems()

    @staticmethod
    def installDependencies(problems) -> None:
        """Install what ``problems`` lists: PyTorch through the PyTorch extension (the build that fits this
        computer's GPU), the rest with pip at the engine's tested versions. Only when the user agreed."""
        import importlib

        from TuckerSegmentLib.dependencies import TORCH
        from TuckerSegmentLib.errors import TuckerSegmentError
        rest = [p.requirement.pip for p in problems if p.requirement != TORCH]
        if any(p.requirement == TORCH for p in problems):
            try:
                import PyTorchUtils
            except ImportError as error:
                raise TuckerSegmentError("PyTorch is missing: install the PyTorch extension (Extensions Manager), "
                                         "restart Slicer and try again") from error
            if PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=False,
                                                             torchVersionRequirement=TORCH.specifier) is None:
                raise TuckerSegmentError("PyTorch could not be installed; see the Python console, or install it "
                                         "from the PyTorch module, then try again")
        if rest:
            slicer.util.pip_install(rest)
        importlib.invalidate_caches()

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

    def startSegmentation(self, volumeNode, model="auto", device: str = "auto", subset=None, task: str = "auto",
                          tileStep: float = 0.8, halfPrecision: bool = True):
        """Start segmenting ``volumeNode`` in a background thread and return the ``BackgroundJob``; the
        volume and the model choice are checked (and the voxels copied) here, before it starts. Poll the
        job, then call ``finishSegmentation`` on this (the GUI) thread. ``job.cancel()`` stops it."""
        from TuckerSegmentLib.background import BackgroundJob
        volume = self._readVolume(volumeNode)
        segmenter = self.task(model, device, task, tileStep, halfPrecision)
        segmenter.check_subset(subset)

        def work(progress, cancelled):
            return segmenter.segment(volume, progress, cancelled, subset)
        return BackgroundJob(work, "segmentation")

    def finishSegmentation(self, job, volumeNode, segmentationNode=None):
        """Write a finished job's labels into ``segmentationNode`` (or a new node) and return it; a failed or
        cancelled job raises its error and the scene stays as it was."""
        from TuckerSegmentLib.errors import VolumeError
        result = job.outcome()
        if volumeNode is None or not slicer.mrmlScene.IsNodePresent(volumeNode):
            raise VolumeError("the input volume was removed while it was segmented; nothing was added")
        if segmentationNode is not None and not slicer.mrmlScene.IsNodePresent(segmentationNode):
            segmentationNode = None
        return self._writeSegmentation(result, volumeNode, segmentationNode)

    def saveSegmentation(self, segmentationNode, path) -> Path:
        """Write ``segmentationNode`` as ``.seg.nrrd`` with Slicer's storage node; the file appears whole or
        not at all."""
        from TuckerSegmentLib.atomic import atomic_output_file
        from TuckerSegmentLib.errors import OutputPathError
        from TuckerSegmentLib.image.volume import SEG_NRRD
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
                     progress=None, cancel=None, task: str = "auto", overwrite: bool = False) -> list:
        """Segment CT files (a list, or a folder's NIfTI/NRRD files) with one model load, saving
        ``<name>.seg.nrrd`` beside each input (or in ``outputFolder``); an existing file is reported and kept
        unless ``overwrite``. The loaded nodes are removed again.
        Returns ``(input, output or None, message)`` per file: a bad file or output is reported and the rest
        go on; a cancel ends the batch after the files already done; a task or memory error stops it (raised)."""
        from TuckerSegmentLib.atomic import refuse_existing
        from TuckerSegmentLib.errors import VolumeError
        from TuckerSegmentLib.image.volume import volume_files
        from TuckerSegmentLib.segment.batch import segment_batch
        from TuckerSegmentLib.segment.output import plan_outputs
        files = volume_files(inputs)
        pairs = (plan_outputs(files, Path(outputFolder)) if outputFolder is not None
                 else [plan_outputs([f], f.parent)[0] for f in files])
        segmenter = self.task(model, device, task)  # loaded once for every file
        segmenter.check_subset(subset)  # a wrong model or structure fails before any file is read

        def work(pair, step):
            source, output = pair
            refuse_existing(output, overwrite)
            added = []
            try:
                volumeNode = slicer.modules.volumes.logic().AddArchetypeVolume(str(source), source.name)
                if volumeNode is None:
                    raise VolumeError(f"Slicer could not read {source}; pass a NIfTI or NRRD CT volume")
                added.append(volumeNode)
                segmentation = self._segmentWith(segmenter, volumeNode, subset, None, step, cancel)
                added.append(segmentation)
                self.saveSegmentation(segmentation, output)
                return output, f"{segmentation.GetSegmentation().GetNumberOfSegments()} segments"
            finally:
                for node in added:
                    _removeWithDependents(node)
        items = segment_batch(pairs, work, name=lambda pair: pair[0].name, progress=progress)
        return [(item.source[0], item.output, item.message) for item in items]

    # --- compression -------------------------------------------------------------------------------
    def startCompression(self, modelFolder, outputFolder, policy: str = "flops", target: float = 0.5,
                         calibrationNodes=(), device: str = "auto", measure: bool = True):
        """Compress an nnU-Net v2 model folder into ``outputFolder`` in a background thread, then review it
        against the original (``TuckerSegmentLib.compress.review``): returns the ``BackgroundJob``.
        ``calibrationNodes``: scene CT volumes for activation-aware ranks and the agreement figure. The
        output appears whole or not at all; a cancel or error leaves nothing and the source untouched."""
        import shutil

        from TuckerSegmentLib.atomic import check_output_dir
        from TuckerSegmentLib.background import BackgroundJob
        from TuckerSegmentLib.progress import check_cancel
        from TuckerSegmentLib.compress.folder import compress_model_folder
        from TuckerSegmentLib.compress.review import review_compression
        from TuckerSegmentLib.errors import Cancelled
        from TuckerSegmentLib.nnunet.model_folder import ModelFolder
        from TuckerSegmentLib.policies.methods import method, policy_for
        rankPolicy = policy_for(policy, target if method(policy).target else None, device=device)
        source = ModelFolder.open(modelFolder).path
        output = check_output_dir(Path(outputFolder).expanduser(), protected=source)
        volumes = [self._readVolume(node) for node in calibrationNodes]

        def work(progress, cancelled):
            def layer(done, total, name):
                check_cancel(cancelled, "compression")
                progress(0.6 * done / total, f"compressing layer {done}/{total}: {name}")
            progress(0.0, "reading the model" + (" and calibration volumes" if volumes else ""))
            compress_model_folder(source, output, rankPolicy, progress=layer, calibration=volumes or None)
            try:
                return review_compression(source, output, volumes, device, measure,
                                          lambda fraction, message: progress(0.6 + 0.4 * fraction, message), cancelled)
            except Cancelled:
                shutil.rmtree(output, ignore_errors=True)
                raise
        return BackgroundJob(work, "compression")

    @staticmethod
    def finishCompression(job):
        """A finished compression job's ``CompressionReview`` (its error re-raised)."""
        return job.outcome()

    def showReview(self, review, tableNode=None, chartNode=None) -> tuple:
        """Fill a table node with the review (quantity, original, compressed, ratio) and a plot chart with
        the Pareto plot of agreement against FLOPs for every compressed model of the same original you
        added (and this one); returns (table, chart)."""
        from TuckerSegmentLib.compress.review import pareto_front
        from TuckerSegmentLib.variants.user_variants import comparison_points, user_variants
        scene = slicer.mrmlScene
        table = tableNode or scene.AddNewNodeByClass("vtkMRMLTableNode", "TuckerSegment compression report")
        _fillTable(table, ("Quantity", "Original", "Compressed", "Ratio"), review.rows())
        measured = comparison_points(review, user_variants())
        frontier = pareto_front(measured)
        data = scene.AddNewNodeByClass("vtkMRMLTableNode", "TuckerSegment Pareto data")
        data.SetHideFromEditors(True)
        _fillTable(data, ("FLOPs fraction", "Dice vs original", "Frontier FLOPs fraction", "Frontier Dice"),
                   [(*m, *(frontier[i] if i < len(frontier) else (float("nan"),) * 2)) for i, m in enumerate(measured)])
        chart = chartNode or scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "TuckerSegment Pareto plot")
        previous = [chart.GetNthPlotSeriesNode(i) for i in range(chart.GetNumberOfPlotSeriesNodes())]
        chart.RemoveAllPlotSeriesNodeIDs()
        for series in previous:  # the last review's series and their data
            for node in (series.GetTableNode(), series):
                if node is not None and scene.IsNodePresent(node):
                    scene.RemoveNode(node)
        chart.SetTitle("Agreement with the original against compute")
        chart.SetXAxisTitle("FLOPs per patch (fraction of the original)")
        chart.SetYAxisTitle("Dice vs original (calibration volumes)")
        for name, (x, y), style in (("models", (0, 1), "points"), ("Pareto front", (2, 3), "line")):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"TuckerSegment {name}")
            series.SetAndObserveTableNodeID(data.GetID())
            series.SetXColumnName(data.GetColumnName(x))
            series.SetYColumnName(data.GetColumnName(y))
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            if style == "points":
                series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle)
            else:
                series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return table, chart

    @staticmethod
    def addToMyVariants(review):
        """Record a reviewed compressed model so the task and variant choices offer it."""
        from TuckerSegmentLib.variants.user_variants import add_user_variant
        return add_user_variant(review)

    # --- statistics ---------------------------------------------------------------------------------
    def showStatistics(self, segmentationNode, volumeNode, tableNode=None):
        """Volume and CT intensity of every segment in a table node (returned): Slicer's Segment Statistics
        when the application has it, otherwise the same figures computed by the engine."""
        from TuckerSegmentLib.errors import VolumeError
        if segmentationNode is None or volumeNode is None:
            raise VolumeError("segment a CT volume first; statistics need the segmentation and its volume")
        scene = slicer.mrmlScene
        table = tableNode or scene.AddNewNodeByClass("vtkMRMLTableNode", f"{segmentationNode.GetName()} statistics")
        try:
            from SegmentStatistics import SegmentStatisticsLogic
        except ImportError:
            SegmentStatisticsLogic = None
        if SegmentStatisticsLogic is not None:
            logic = SegmentStatisticsLogic()
            parameters = logic.getParameterNode()
            parameters.SetParameter("Segmentation", segmentationNode.GetID())
            parameters.SetParameter("ScalarVolume", volumeNode.GetID())
            parameters.SetParameter("LabelmapSegmentStatisticsPlugin.enabled", "True")
            parameters.SetParameter("ScalarVolumeSegmentStatisticsPlugin.enabled", "True")
            parameters.SetParameter("ClosedSurfaceSegmentStatisticsPlugin.enabled", "False")
            logic.computeStatistics()
            logic.exportToTable(table)
            return table
        from TuckerSegmentLib.segment.statistics import COLUMNS, segment_statistics
        segmentation = segmentationNode.GetSegmentation()
        ids = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
        labels = _exportLabels(segmentationNode, ids, volumeNode)
        values = {segmentation.GetSegment(segmentId).GetName(): index for index, segmentId in enumerate(ids, start=1)}
        spacing = volumeNode.GetSpacing()
        rows = segment_statistics(labels, slicer.util.arrayFromVolume(volumeNode), spacing[0] * spacing[1] * spacing[2],
                                  values)
        _fillTable(table, COLUMNS, rows)
        return table

    def segmentVolumeNodes(self, volumeNodes=None, model="auto", device: str = "auto", subset=None, progress=None,
                           cancel=None, task: str = "auto", save: bool = True, overwrite: bool = False) -> list:
        """Segment every CT volume node of the scene (or ``volumeNodes``) with one model load; with ``save``
        each segmentation is written as ``<volume file name>.seg.nrrd`` beside its volume's file (an existing
        file is kept, and reported, unless ``overwrite``). Returns
        ``(volume node, segmentation node or None, saved path or None, message)`` per volume: a volume that
        cannot be segmented is reported and the rest go on; a cancel ends the loop; a task or memory error
        stops it (raised)."""
        from TuckerSegmentLib.atomic import refuse_existing
        from TuckerSegmentLib.errors import OutputPathError
        from TuckerSegmentLib.segment.batch import segment_batch
        from TuckerSegmentLib.segment.output import plan_outputs
        if volumeNodes is None:
            volumeNodes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                           if not node.IsA("vtkMRMLLabelMapVolumeNode")]
        segmenter = self.task(model, device, task)
        segmenter.check_subset(subset)
        saved = {}

        def work(volumeNode, step):
            segmentation = self._segmentWith(segmenter, volumeNode, subset, None, step, cancel)
            storage = volumeNode.GetStorageNode()
            source = Path(storage.GetFileName()) if storage is not None and storage.GetFileName() else None
            message = f"{segmentation.GetSegmentation().GetNumberOfSegments()} segments"
            if save and source is None:
                message += "; not saved: the volume has no file (save it with File > Save Data)"
            elif save:
                try:
                    target = plan_outputs([source], source.parent)[0][1]
                    refuse_existing(target, overwrite)
                    saved[volumeNode.GetID()] = self.saveSegmentation(segmentation, target)
                except OutputPathError as exc:
                    message += f"; not saved: {exc}"
            return segmentation, message
        items = segment_batch(volumeNodes, work, name=lambda node: node.GetName(), progress=progress)
        return [(item.source, item.output, saved.get(item.source.GetID()), item.message) for item in items]

    def _readVolume(self, volumeNode):
        """The node's voxels (k, j, i) and its IJK-to-world matrix as an engine ``Volume``."""
        from TuckerSegmentLib.errors import VolumeError
        from TuckerSegmentLib.image.volume import Volume
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
        from TuckerSegmentLib.segment.provenance import provenance
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


def _fillTable(table, columns, rows) -> None:
    """Replace ``table``'s contents: a string column where the first row holds text, else a double column."""
    import numbers
    table.RemoveAllColumns()
    for index, name in enumerate(columns):
        numeric = bool(rows) and isinstance(rows[0][index], numbers.Number)
        column = vtk.vtkDoubleArray() if numeric else vtk.vtkStringArray()
        column.SetName(name)
        for row in rows:
            column.InsertNextValue(float(row[index]) if numeric else str(row[index]))
        table.AddColumn(column)
    table.Modified()


def _exportLabels(segmentationNode, segmentIds, volumeNode):
    """The segments as one label map (value = position in ``segmentIds`` + 1) on the volume's grid."""
    scene = slicer.mrmlScene
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "TuckerSegment export")
    try:
        ids = vtk.vtkStringArray()
        for segmentId in segmentIds:
            ids.InsertNextValue(segmentId)
        if not slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(segmentationNode, ids, labelmap,
                                                                                 volumeNode):
            raise RuntimeError("Slicer could not export the segments to a label map")
        return slicer.util.arrayFromVolume(labelmap).copy()
    finally:
        _removeWithDependents(labelmap)


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
    """Self-test (Slicer's generic module tests, and pytest with slicer-core): real inference with the
    bundled demo model on the bundled chest CT, and a real compression of the demo model."""

    SAMPLE = Path(__file__).parent / "Resources" / "SampleData" / "CTChest4.nrrd"
    DEMO_MODEL = Path(__file__).parent / "Resources" / "Models" / "chest-demo"

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_segments_the_bundled_sample_with_the_demo_model()
        self.setUp()
        self.test_compresses_the_demo_model_and_reports()

    def _sample(self):
        node = slicer.modules.volumes.logic().AddArchetypeVolume(str(self.SAMPLE), "CTChest")
        self.assertIsNotNone(node, f"could not read {self.SAMPLE}")
        return node

    def test_segments_the_bundled_sample_with_the_demo_model(self):
        from TuckerSegmentLib.background import DONE
        self.delayDisplay("Segmenting the bundled chest CT with the demo model on the CPU")
        volume = self._sample()
        logic = TuckerSegmentLogic()
        job = logic.startSegmentation(volume, model="auto", task="demo", device="cpu")
        self.assertEqual(job.wait(300), DONE, job.error)
        segmentation = logic.finishSegmentation(job, volume)
        segments = segmentation.GetSegmentation()
        names = {segments.GetNthSegment(i).GetName() for i in range(segments.GetNumberOfSegments())}
        self.assertTrue({"right lung", "left lung", "ribs"} <= names, names)
        labels = _exportLabels(segmentation, [segments.GetSegmentIdBySegmentName("right lung"),
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
        import tempfile

        from TuckerSegmentLib.background import DONE
        from TuckerSegmentLib.nnunet.model_folder import ModelFolder
        self.delayDisplay("Compressing the demo model to a FLOP budget of 0.5, calibrated on the sample")
        volume = self._sample()
        logic = TuckerSegmentLogic()
        source = ModelFolder.open(self.DEMO_MODEL / "Dataset901_ChestDemo").path
        with tempfile.TemporaryDirectory() as folder:
            output = Path(folder) / "chest-demo-selftest"
            job = logic.startCompression(source, output, policy="flops", target=0.5, calibrationNodes=[volume],
                                         device="cpu", measure=False)
            self.assertEqual(job.wait(600), DONE, job.error)
            review = logic.finishCompression(job)
            self.assertTrue((output / "fold_0" / "tucker.json").is_file())
            self.assertLessEqual(review.compressed.flops, 0.55 * review.original.flops)
            self.assertLess(review.compressed.params, review.original.params)
            self.assertGreater(review.agreement, 0.8)
            table, chart = logic.showReview(review)
            self.assertGreaterEqual(table.GetNumberOfRows(), 4)
            self.assertEqual(chart.GetNumberOfPlotSeriesNodes(), 2)
        self.delayDisplay(f"Compressed: {review.compressed.flops / review.original.flops:.2f} of the FLOPs, "
                          f"Dice vs original {review.agreement:.3f}")
