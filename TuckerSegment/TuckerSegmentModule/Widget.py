"""The panel: binds Qt widgets to the parameter node and to Logic calls, and polls the running job from a
timer (the GUI thread never waits on the worker). Decisions live in the Logic and the engine."""
from __future__ import annotations

import traceback

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from .InstallLogic import TuckerSegmentInstallLogic
from .Logic import (TuckerSegmentLogic, compressionOutput, forgetPackages, platformProblem, segmentRequest,
                    suggestedOutputName)
from .Parameters import TuckerSegmentParameterNode

POLL_MS = 200
CHOOSE_FOLDER = "choose-folder"
DEVICES = (("auto", "Auto"), ("cpu", "CPU"), ("cuda", "GPU (CUDA)"), ("mps", "Apple GPU (MPS)"))
RUNTIMES = (("auto", "Auto"), ("torch", "PyTorch"), ("openvino", "OpenVINO (CPU)"))  # the .ui's tooltips explain Auto
PRECISIONS = (("auto", "Auto"), ("f32", "float32"), ("bf16", "bfloat16 (CPU with native bf16)"), ("fp16", "float16 (GPU)"),
              ("int8", "int8 (CPU with VNNI or AMX)"))


class TuckerSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Task, variant, device and structure choices live in the parameter node; the widgets show it
    (``updateGUIFromParameterNode``) and user actions write to it, never both at once."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = self._guiTag = None
        self._job = self._jobKind = self._review = None
        self._updating = False
        self._shown = {}  # what the combos and the structure list were filled for
        self._structureNames = []
        self._missing = self._installable = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = platformProblem()
        if problem:  # an old Slicer: say what is needed instead of failing on the engine's syntax
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            self.layout.addStretch(1)
            return
        panel = slicer.util.loadUI(self.resourcePath("UI/TuckerSegment.ui"))
        self.layout.addWidget(panel)
        self.ui = slicer.util.childWidgetVariables(panel)
        panel.setMRMLScene(slicer.mrmlScene)
        self.logic = TuckerSegmentLogic()
        self.installLogic = TuckerSegmentInstallLogic()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_MS)
        self._timer.connect("timeout()", self.onPoll)
        for combo, entries in ((self.ui.deviceComboBox, DEVICES), (self.ui.runtimeComboBox, RUNTIMES),
                               (self.ui.precisionComboBox, PRECISIONS)):
            for key, label in entries:
                combo.addItem(label, key)
        from TuckerSegmentLib.policies.methods import DEFAULT_METHOD, METHODS
        for method in METHODS:
            if not method.needs_labels:  # the panel takes no label maps (Taylor pruning: the command line)
                self.ui.policyComboBox.addItem(method.label, method.key)
        self.ui.taskComboBox.connect("currentIndexChanged(int)", self.onTaskChanged)
        for field, combo, default in (("variant", self.ui.variantComboBox, "auto"),
                                      ("device", self.ui.deviceComboBox, "auto"),
                                      ("runtime", self.ui.runtimeComboBox, "auto"),
                                      ("precision", self.ui.precisionComboBox, "auto"),
                                      ("policy", self.ui.policyComboBox, DEFAULT_METHOD)):
            combo.connect("currentIndexChanged(int)",
                          lambda index, f=field, c=combo, d=default: self.onChoiceChanged(f, c, d))
        self.ui.structureSearchBox.connect("textChanged(QString)", self.onStructureFilter)
        self.ui.structureListWidget.connect("itemChanged(QListWidgetItem*)", self.onStructureChecked)
        self.ui.clearStructuresButton.connect("clicked(bool)", self.onClearStructures)
        self.ui.modelFolderPathLineEdit.connect("currentPathChanged(QString)", self.onModelFolderChanged)
        self.ui.outputParentPathLineEdit.connect("currentPathChanged(QString)", self.onOutputParentChanged)
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.compressButton.connect("clicked(bool)", self.onCompress)
        self.ui.buildButton.connect("clicked(bool)", self.onBuild)
        self.ui.compressCancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.showStatisticsButton.connect("clicked(bool)", self.onShowStatistics)
        self.ui.addVariantButton.connect("clicked(bool)", self.onAddVariant)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.initializeParameterNode()
        self.checkDependencies()
        self.detectDevices()

    def onReload(self) -> None:
        """The developer Reload: the shared worker ends first (it runs the old engine), then the module's own
        packages are read again too, not only ``TuckerSegment.py``."""
        self.cleanup()
        TuckerSegmentLogic.shutdownSharedWorker()
        forgetPackages()
        ScriptedLoadableModuleWidget.onReload(self)

    def cleanup(self) -> None:
        """The module closes (or Slicer exits): stop a running job and the worker."""
        self.removeObservers()
        if self.logic is None:
            return
        self._timer.stop()
        if self._job is not None:
            self._job.cancel()
        self.logic.shutdownWorker()

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()
            self.checkDependencies()
            self.detectDevices()  # free memory changes: the facts are refreshed each time the module is shown

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller=None, event=None) -> None:
        if self._job is not None:  # its nodes are going away
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller=None, event=None) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller=None, event=None) -> None:
        if self.parent.isEntered:  # a loaded scene brings its own parameter node values
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameters = TuckerSegmentParameterNode(self.logic.getParameterNode())
        if not parameters.inputVolume:
            parameters.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.setParameterNode(parameters)

    def setParameterNode(self, parameters) -> None:
        if self._parameterNode is not None:
            self._parameterNode.disconnectGui(self._guiTag)
            self.removeObserver(self._parameterNode.parameterNode, vtk.vtkCommand.ModifiedEvent,
                                self.updateGUIFromParameterNode)
        self._parameterNode, self._shown = parameters, {}
        if parameters is not None:
            self._guiTag = parameters.connectGui(self.ui)
            self.addObserver(parameters.parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
            self.updateGUIFromParameterNode()

    # --- parameter node -> widgets -------------------------------------------------------------------
    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node is None or self._updating:
            return
        self._updating = True
        try:
            _select(self.ui.deviceComboBox, node.device)
            _select(self.ui.runtimeComboBox, node.runtime)
            _select(self.ui.precisionComboBox, node.precision)
            _select(self.ui.policyComboBox, node.policy)
            if self._shown.get("tasks") != node.task:
                self._fill(self.ui.taskComboBox, self.logic.taskChoices(node.task))
                self.ui.taskComboBox.addItem(_("Choose an nnU-Net model folder..."), CHOOSE_FOLDER)
                self._shown["tasks"] = node.task
            _select(self.ui.taskComboBox, node.task)
            if self._shown.get("variants") != (node.task, node.device):
                self._fill(self.ui.variantComboBox, self.logic.variantChoices(node.task, node.device))
                self._shown["variants"] = (node.task, node.device)
            _select(self.ui.variantComboBox, node.variant)
            combo = self.ui.variantComboBox
            self.ui.variantReasonLabel.text = combo.itemData(combo.currentIndex, qt.Qt.ToolTipRole) or ""
            if self._shown.get("structures") != (node.task, node.variant, node.device):
                self._fillStructures(node)
                self._shown["structures"] = (node.task, node.variant, node.device)
            self._checkStructures(node.structures)
            for widget, path in ((self.ui.modelFolderPathLineEdit, node.modelFolder),
                                 (self.ui.outputParentPathLineEdit, node.outputParent)):
                if widget.currentPath != path:
                    widget.blockSignals(True)
                    widget.currentPath = path
                    widget.blockSignals(False)
            from TuckerSegmentLib.policies.methods import method
            policy = _currentData(self.ui.policyComboBox)  # a method the engine knows, whatever a scene saved
            self.ui.targetSpinBox.enabled = bool(method(policy).target)
            self.ui.targetSpinBox.toolTip = method(policy).target or _("this method chooses its ranks itself")
            self.ui.outputNameLineEdit.placeholderText = suggestedOutputName(node.modelFolder, policy, node.target)
            shown = {name: _currentData(combo) for name, combo in (
                ("task", self.ui.taskComboBox), ("variant", self.ui.variantComboBox),
                ("device", self.ui.deviceComboBox), ("policy", self.ui.policyComboBox),
                ("runtime", self.ui.runtimeComboBox), ("precision", self.ui.precisionComboBox))}
        finally:
            self._updating = False
        corrections = {name: key for name, key in shown.items() if key is not None and key != getattr(node, name)}
        if corrections:  # a saved choice this computer does not offer: the node follows what is shown
            with slicer.util.NodeModify(node.parameterNode):
                for name, key in corrections.items():
                    setattr(node, name, key)
        self.updateButtons()

    @staticmethod
    def _fill(combo, choices) -> None:
        combo.blockSignals(True)
        combo.clear()
        for index, choice in enumerate(choices):
            combo.addItem(choice.label, choice.key)
            combo.setItemData(index, choice.tooltip, qt.Qt.ToolTipRole)
        combo.blockSignals(False)

    def _fillStructures(self, node) -> None:
        try:
            self._structureNames = self.logic.structureNames(node.task, node.variant, node.device)
        except Exception as error:  # a task that is not installed has no structure list yet
            self._structureNames, self.ui.statusLabel.text = [], str(error)
        widget = self.ui.structureListWidget
        widget.blockSignals(True)
        widget.clear()
        for name in self._structureNames:
            item = qt.QListWidgetItem(name)
            item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
            widget.addItem(item)
        widget.blockSignals(False)
        self.onStructureFilter(self.ui.structureSearchBox.text)

    def _checkStructures(self, wanted) -> None:
        wanted, widget = set(wanted), self.ui.structureListWidget
        widget.blockSignals(True)
        for row in range(widget.count):
            item = widget.item(row)
            item.setCheckState(qt.Qt.Checked if item.text() in wanted else qt.Qt.Unchecked)
        widget.blockSignals(False)
        chosen, total = len(self._subset() or []), len(self._structureNames)
        self.ui.structureCountLabel.text = (_("{chosen} of {total} structures").format(chosen=chosen, total=total)
                                            if chosen else _("All {total} structures").format(total=total))

    def _subset(self):
        """The checked structures the current task has (None: all)."""
        names = set(self._structureNames)
        return [s for s in self._parameterNode.structures if s in names] or None

    # --- widgets -> parameter node (user actions only) ----------------------------------------------
    def onTaskChanged(self, index=None) -> None:
        if self._updating or self._parameterNode is None:
            return
        key = _currentData(self.ui.taskComboBox)
        if key == CHOOSE_FOLDER:
            folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("nnU-Net v2 model folder"))
            if not folder:
                self.updateGUIFromParameterNode()  # back to the task that was chosen
                return
            key = "folder:" + folder
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.task, self._parameterNode.variant = key or "auto", "auto"

    def onChoiceChanged(self, field, combo, default) -> None:
        """A combo the user changed: its key goes to the parameter node field ``field``."""
        if not self._updating and self._parameterNode is not None:
            setattr(self._parameterNode, field, _currentData(combo) or default)

    def onStructureChecked(self, item=None) -> None:
        if self._updating or self._parameterNode is None:
            return
        widget = self.ui.structureListWidget
        self._parameterNode.structures = [widget.item(r).text() for r in range(widget.count)
                                          if widget.item(r).checkState() == qt.Qt.Checked]

    def onClearStructures(self) -> None:
        if self._parameterNode is not None:
            self._parameterNode.structures = []

    def onStructureFilter(self, text) -> None:
        widget, text = self.ui.structureListWidget, text.strip().lower()
        for row in range(widget.count):
            item = widget.item(row)
            item.setHidden(bool(text) and text not in item.text().lower())

    def onModelFolderChanged(self, path) -> None:
        if not self._updating and self._parameterNode is not None:
            self._parameterNode.modelFolder = path.strip()

    def onOutputParentChanged(self, path) -> None:
        if not self._updating and self._parameterNode is not None:
            self._parameterNode.outputParent = path.strip()

    def updateButtons(self, *args) -> None:
        node, idle = self._parameterNode, self._job is None
        ready = idle and node is not None and not self._missing
        self.ui.applyButton.enabled = ready and node.inputVolume is not None
        self.ui.compressButton.enabled = ready and bool(node.modelFolder) and bool(node.outputParent)
        self.ui.buildButton.enabled = ready
        self.ui.cancelButton.enabled = not idle and self._jobKind in ("segment", "build")
        self.ui.compressCancelButton.enabled = not idle and self._jobKind == "compress"
        self.ui.addVariantButton.enabled = idle and self._review is not None
        for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.taskComboBox,
                       self.ui.variantComboBox, self.ui.deviceComboBox, self.ui.structureListWidget,
                       self.ui.runtimeComboBox, self.ui.precisionComboBox,
                       self.ui.clearStructuresButton, self.ui.advancedCollapsibleButton,
                       self.ui.buildCalibrationSelector, self.ui.buildHoldoutSelector,
                       self.ui.modelFolderPathLineEdit, self.ui.policyComboBox, self.ui.calibrationVolumesSelector,
                       self.ui.distillSpinBox,
                       self.ui.outputParentPathLineEdit, self.ui.outputNameLineEdit, self.ui.installButton):
            widget.enabled = idle  # a running job keeps what it started with

    # --- dependencies --------------------------------------------------------------------------------
    def checkDependencies(self) -> None:
        """List what is missing; only required packages block Apply and Compress (OpenVINO only speeds the CPU)."""
        problems = self.installLogic.problems()
        self._missing = [p for p in problems if p.blocking]
        lines = []
        if self._missing:
            lines.append(_("TuckerSegment needs Python packages that are missing: {listed}.").format(
                listed="; ".join(str(p) for p in self._missing)))
        recommended = [p for p in problems if not p.blocking]
        if recommended:
            lines.append(_("Recommended, for speed on the CPU: {listed} (PyTorch runs meanwhile).").format(
                listed="; ".join(str(p) for p in recommended)))
        self.ui.dependenciesLabel.text = "\n".join(lines)
        self.ui.installButton.visible = bool(problems)
        self._installable = problems
        self.updateButtons()

    def onInstall(self) -> None:
        if not self._installable or not slicer.util.confirmOkCancelDisplay(
                _("Install these Python packages into Slicer? This takes a few minutes and downloads PyTorch when "
                  "it is missing.\n\n{listed}").format(listed="\n".join(f"- {p}" for p in self._installable))):
            return
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            outcome = self.installLogic.install(self._installable)
        except Exception as error:
            slicer.app.restoreOverrideCursor()
            self._showError(_("Installing TuckerSegment's dependencies failed."), error)
            return
        slicer.app.restoreOverrideCursor()
        self.checkDependencies()
        text = "\n".join(outcome.messages)
        if outcome.needsRestart:
            text += "\n\n" + _("Restart Slicer to finish the installation.")
        slicer.util.infoDisplay(text or _("Nothing needed installing."))

    # --- devices (the worker detects them: this process never imports torch) ----------------------------
    def detectDevices(self) -> None:
        """Ask the worker for this computer's devices unless a job runs; Auto says "detecting devices…" meanwhile."""
        if self._job is not None:
            return
        try:
            job = self.logic.startDeviceDetection()
        except Exception as error:  # no worker can start: Auto goes on assuming the CPU
            self.ui.statusLabel.text = _("Devices could not be detected: {error}").format(error=error)
            return
        self._startJob("devices", job)
        self._status(_("Detecting devices..."))

    def _finishDeviceDetection(self, job) -> None:
        try:
            job.outcome()
        except Exception as error:
            self._status(_("Devices could not be detected ({error}); Auto assumes the CPU.").format(error=error), 0)
            return
        self.ui.deviceComboBox.toolTip = self.logic.machineFacts().describe()
        self._shown = {}  # Auto's choice and the structures depend on the devices: refill
        self.updateGUIFromParameterNode()
        self._status("", 0)

    # --- jobs ----------------------------------------------------------------------------------------
    def onApply(self) -> None:
        node = self._parameterNode
        try:
            job = self.logic.startSegmentation(node.inputVolume, request=segmentRequest(node, self._subset()),
                                               segmentationNode=node.outputSegmentation)
        except Exception as error:
            self._showError(_("Segmentation could not start."), error)
            return
        self._startJob("segment", job)

    def onCompress(self) -> None:
        node = self._parameterNode
        try:
            output = compressionOutput(node.outputParent, node.outputName, node.modelFolder, node.policy, node.target)
            job = self.logic.startCompression(node.modelFolder, output, policy=node.policy, target=node.target,
                                              calibrationNodes=list(self.ui.calibrationVolumesSelector.checkedNodes()),
                                              device=node.device, measure=node.measureSpeed,
                                              runtime=node.runtime, distill=node.distillIterations)
        except Exception as error:
            self._showError(_("Compression could not start."), error)
            return
        self._review = None
        self._startJob("compress", job)

    def onBuild(self) -> None:
        node = self._parameterNode
        try:
            job = self.logic.startVariantBuild(self.logic.buildTargets(node.task, node.variant),
                                               calibrationNodes=list(self.ui.buildCalibrationSelector.checkedNodes()),
                                               holdoutNodes=list(self.ui.buildHoldoutSelector.checkedNodes()))
        except Exception as error:
            self._showError(_("The build could not start."), error)
            return
        self._startJob("build", job)

    def _startJob(self, kind, job) -> None:
        self._job, self._jobKind = job, kind
        self._status(_("Starting..."), 0)
        self._timer.start()
        self.updateButtons()

    def onCancel(self) -> None:
        if self._job is not None:
            self._job.cancel()
            self._status(_("Cancelling..."))

    def onPoll(self) -> None:
        job = self._job
        state = job.poll()  # a poll that fails ends the job with its error (shown below) and frees the worker
        if state == "running":
            self._status(job.message, job.fraction)
            return
        self._timer.stop()
        try:
            if state == "cancelled":
                self._status(_("Cancelled; nothing was changed."), 0)
            elif self._jobKind == "segment":
                self._finishSegmentation(job)
            elif self._jobKind == "build":
                self._finishBuild(job)
            elif self._jobKind == "devices":
                self._finishDeviceDetection(job)
            else:
                self._finishCompression(job)
        except Exception as error:
            self._showError(_("Failed:"), error)
        finally:
            self._job = None
            self.updateButtons()

    def _status(self, text, fraction=None) -> None:
        label, bar = ((self.ui.statusLabel, self.ui.progressBar) if self._jobKind in ("segment", "build", "devices")
                      else (self.ui.compressStatusLabel, self.ui.compressProgressBar))
        label.text = text
        if fraction is not None:
            bar.value = int(round(100 * fraction))

    def _showError(self, message, error) -> None:
        from TuckerSegmentLib.errors import TuckerSegmentError
        self._status(f"{message} {error}", 0)
        details = None if isinstance(error, TuckerSegmentError) else "".join(
            traceback.format_exception(type(error), error, error.__traceback__))
        slicer.util.errorDisplay(f"{message}\n\n{error}", detailedText=details)

    def _parameters(self):
        """The parameter node, also while the module is not shown (a job may end then)."""
        return self._parameterNode or TuckerSegmentParameterNode(self.logic.getParameterNode())

    def _finishSegmentation(self, job) -> None:
        segmentation = self.logic.finishSegmentation(job)
        self._parameters().outputSegmentation = segmentation
        self.ui.showStatisticsButton.enabled = True
        run = self.logic.lastRun
        text = _("Done in {seconds:.1f} s with {model} on {device}, {runtime}: {count} segments").format(
            seconds=job.seconds, model=run["model"], device=run["device"], runtime=run["runtime"],
            count=segmentation.GetSegmentation().GetNumberOfSegments())
        self._status("\n".join([text, self.logic.modelReason, *self.logic.notices]), 1)

    def _finishBuild(self, job) -> None:
        built = job.outcome()["built"]
        self._shown = {}  # availability and measured figures changed: refill the task and variant lists
        self.updateGUIFromParameterNode()
        self._status(_("Built and measured: {ids}. Auto's choice and its figures are shown under Variant.").format(
            ids=", ".join(built) or _("nothing new")), 1)

    def _finishCompression(self, job) -> None:
        node = self._parameters()
        self._review = self.logic.finishCompression(job)
        node.reportTable, node.paretoChart = self.logic.showReview(self._review, node.reportTable, node.paretoChart)
        self.ui.reportTableView.setMRMLTableNode(node.reportTable)
        view = self.ui.paretoPlotWidget.mrmlPlotViewNode()
        if view is None or not slicer.mrmlScene.IsNodePresent(view):
            view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "TuckerSegment Pareto view")
            self.ui.paretoPlotWidget.setMRMLPlotViewNode(view)
        view.SetPlotChartNodeID(node.paretoChart.GetID())
        self._status("\n".join([_("Compressed in {seconds:.0f} s: {folder}").format(
            seconds=job.seconds, folder=self._review.output), *self._review.notes]), 1)

    def onAddVariant(self) -> None:
        try:
            added = self.logic.addToMyVariants(self._review)
        except Exception as error:
            self._showError(_("Could not add the variant."), error)
            return
        self._shown = {}  # the task and variant lists changed
        with slicer.util.NodeModify(self._parameterNode.parameterNode):
            self._parameterNode.task, self._parameterNode.variant = "folder:" + added.source, added.folder
        self._status(_("Added {name}: choose it under Task and Variant.").format(name=added.id))

    def onShowStatistics(self) -> None:
        node = self._parameterNode
        try:
            table = self.logic.showStatistics(node.outputSegmentation, node.inputVolume)
        except Exception as error:
            self._showError(_("Segment statistics failed."), error)
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()


def _currentData(combo):
    return combo.itemData(combo.currentIndex) if combo.currentIndex >= 0 else None


def _select(combo, key) -> None:
    """Show ``key`` in ``combo`` without emitting a change (the first entry when it is not there)."""
    index = combo.findData(key)
    combo.blockSignals(True)
    combo.currentIndex = index if index >= 0 else 0
    combo.blockSignals(False)
