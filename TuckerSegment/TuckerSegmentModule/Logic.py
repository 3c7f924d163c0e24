"""TuckerSegment's Logic: MRML in and out on Slicer's GUI thread; every segmentation, compression and
variant build runs in a worker process (``TuckerSegmentLib.worker``) that keeps its model loaded.

The Logic writes the input's voxels (a copy, with the parent transform applied to the geometry) to a
temporary folder, starts a ``WorkerJob`` and returns at once; the panel polls the job from a timer and
then calls ``finishSegmentation`` / ``finishCompression``. The console methods (``segment``,
``segmentFiles``, ``segmentVolumeNodes``) do the same and wait. Nothing here imports torch.
"""
from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .SceneNodes import exportLabels, fillTable, readVolume, removeWithDependents, writeSegmentation

TEMPORARY_PREFIX = "TuckerSegment-"
PACKAGES = ("TuckerSegmentModule", "TuckerSegmentLib")  # what Slicer's developer Reload must read again


def forgetPackages() -> list:
    """Drop the module's packages from ``sys.modules``, so that the next import reads them from disk again (Slicer's
    Reload re-executes ``TuckerSegment.py`` only); the names dropped."""
    names = [name for name in sys.modules if name.split(".")[0] in PACKAGES]
    for name in names:
        del sys.modules[name]
    return names


def _defaultChild():
    """(child process factory, Python, environment) for this application: Qt's QProcess and PythonSlicer
    with Slicer's startup environment (PythonSlicer sets its own paths, as for
    ``slicer.util.launchConsoleProcess``) inside Slicer; ``subprocess``, this interpreter and this
    environment elsewhere (the console of a plain Python, headless tests)."""
    from TuckerSegmentLib.errors import TuckerSegmentError
    from TuckerSegmentLib.worker.process import SubprocessChild, qt_child_factory
    if hasattr(slicer, "app"):
        import qt
        python = shutil.which("PythonSlicer")
        if python is None:
            raise TuckerSegmentError("PythonSlicer was not found on Slicer's PATH; reinstall Slicer")
        return qt_child_factory(qt.QProcess), python, slicer.util.startupEnvironment()
    return SubprocessChild, sys.executable, None


def platformProblem():
    """Why this Slicer (or Python) cannot run TuckerSegment, or None."""
    from TuckerSegmentLib.dependencies import platform_problem
    version = (int(slicer.app.majorVersion), int(slicer.app.minorVersion)) if hasattr(slicer, "app") else None
    return platform_problem(tuple(sys.version_info), version)


def suggestedOutputName(modelFolder: str, policy: str, target: float) -> str:
    """The compressed model's folder name when the user typed none: ``<model>-tucker-<method>[-<target>]``, or
    ``<model>-<prune method>-<target>`` for a pruned one."""
    from TuckerSegmentLib.policies.methods import method
    stem = Path(modelFolder).name if str(modelFolder or "").strip() else "model"
    chosen = method(policy)
    return f"{stem}-{'' if chosen.prunes else 'tucker-'}{policy}" + (f"-{float(target):g}" if chosen.target else "")


def compressionOutput(parent: str, name: str, modelFolder: str, policy: str, target: float) -> Path:
    """The new folder for a compressed model: an existing ``parent`` and a new ``name`` (the suggested one
    when empty); a name that is a path is refused."""
    from TuckerSegmentLib.errors import OutputPathError
    if not str(parent or "").strip():
        raise OutputPathError("choose the folder the compressed model goes in (Output folder)")
    name = str(name or "").strip() or suggestedOutputName(modelFolder, policy, target)
    if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise OutputPathError(f"{name!r} is not a folder name; type a new name without / or \\")
    return Path(parent).expanduser() / name


def _removeUnresumable(output: Path) -> None:
    """After a compress-and-distil job that did not finish: the partial files the stopped worker left beside
    ``<output>.distill-source`` (the compressed model waiting for its distillation, see ``recovery.compress_distill``)
    and ``<output>.distill-state`` go, and so does the source folder unless a saved state can resume from it."""
    from TuckerSegmentLib.atomic import remove_stale
    from TuckerSegmentLib.paths import distill_source_folder, state_folder
    source, state = distill_source_folder(output), state_folder(output, "distill")
    for folder in (source, state):
        remove_stale(folder)
    if not state.exists():
        shutil.rmtree(source, ignore_errors=True)


def segmentRequest(parameterNode, subset=None):
    """The ``SegmentRequest`` the panel's parameters make (task and variant keys, device, tile step, runtime,
    precision) for the structures ``subset`` (None: all)."""
    from TuckerSegmentLib.variants.panel import model_and_task
    model, task = model_and_task(parameterNode.task, parameterNode.variant)
    return _segmentRequest(model, parameterNode.device, subset, task, parameterNode.tileStep, parameterNode.runtime,
                           parameterNode.precision)


def _segmentRequest(model, device, subset, task, tileStep, runtime, precision):
    """A ``SegmentRequest`` from the Logic's arguments; ``None`` leaves a field at the request's default."""
    from TuckerSegmentLib.usecases.requests import SegmentRequest
    given = {"model": tuple(str(m) for m in model) if isinstance(model, (list, tuple)) else model, "device": device,
             "subset": tuple(subset) if subset else None, "task": task, "tile_step": tileStep, "runtime": runtime,
             "precision": precision}
    return SegmentRequest(**{key: value for key, value in given.items() if value is not None})


def compressRequest(source, output, policy="flops", target=0.5, device="auto", measure=True, runtime="auto",
                    distill=0):
    """The ``CompressRequest`` the panel's compression makes: reviewed against the original, with the target only
    for a method that takes one (the panel's spin box always holds a number)."""
    from TuckerSegmentLib.policies.methods import method
    from TuckerSegmentLib.usecases.requests import CompressRequest
    takes_target = method(policy).target  # an unknown method is named here, before anything starts
    return CompressRequest(str(source), str(output), policy=policy, target=float(target) if takes_target else None,
                           device=device, measure=bool(measure), runtime=runtime, distill=distill, review=True)


def _processEvents() -> None:
    """Keep Slicer's window responsive while a console call waits for the worker."""
    if hasattr(slicer, "app"):
        slicer.app.processEvents()


class TuckerSegmentLogic(ScriptedLoadableModuleLogic):
    """Segments volume nodes into segmentation nodes and compresses model folders, through one worker.

    ``childFactory`` / ``python`` choose how the worker is started (default: ``_defaultChild``);
    ``idleSeconds`` is how long an idle worker waits before it exits (default 10 minutes)."""

    def __init__(self, parent=None, childFactory=None, python=None, idleSeconds=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self, parent)
        self._childFactory, self._python, self._idleSeconds = childFactory, python, idleSeconds
        self._client = None
        self.modelReason = ""
        self.notices = []
        self.lastRun = {}  # the worker's figures for the last segmentation: loads, load_seconds, seconds, tiles

    # --- the worker --------------------------------------------------------------------------------
    _sharedClient = None  # the panel's and the console's Logic objects share one worker

    def worker(self):
        """The ``WorkerClient``: one per application unless this Logic was given its own ``childFactory``
        (created on first use; its process starts with the first request)."""
        if self._client is None:
            from TuckerSegmentLib.worker.client import WorkerClient, worker_command
            if self._childFactory is None:
                if TuckerSegmentLogic._sharedClient is None:
                    factory, python, environment = _defaultChild()
                    TuckerSegmentLogic._sharedClient = WorkerClient(factory, *worker_command(python, self._idleSeconds),
                                                                    environment)
                self._client = TuckerSegmentLogic._sharedClient
            else:
                self._client = WorkerClient(self._childFactory, *worker_command(self._python, self._idleSeconds))
        return self._client

    @classmethod
    def shutdownSharedWorker(cls) -> None:
        """End the worker the panel and the console share (it runs the engine as it was when it started)."""
        if cls._sharedClient is not None:
            cls._sharedClient.shutdown()
            cls._sharedClient = None

    def shutdownWorker(self) -> None:
        """End the worker (a running job is cancelled); the next request starts a new one."""
        if self._client is not None:
            self._client.shutdown()

    def workerStatus(self) -> dict:
        """The live worker's process id and how many models it has loaded (starts one if none runs)."""
        return self.worker().run("status", {})

    # --- this computer's devices, as the worker sees them ---------------------------------------------
    _machine = None  # the last MachineFacts a worker reported, shared by the panel's and the console's Logic

    def startDeviceDetection(self):
        """Ask the worker which devices this computer has (finding GPUs imports torch, which this process never
        does) and return the job at once; when it ends well, ``machineFacts()`` has the answer."""
        from TuckerSegmentLib.runtime.hardware import MachineFacts
        job = self.worker().submit("status", {"machine": True}, name="device detection")

        def keep(job) -> None:
            if job.state != "done":
                return
            try:
                TuckerSegmentLogic._machine = MachineFacts.from_json(job.result.get("machine"))
            except Exception as error:  # a damaged answer is the job's error; the facts known before stay
                job.state, job.error = "failed", error
        job.on_end.append(keep)
        return job

    def detectDevices(self, timeout: float = 300):
        """Detect this computer's devices in the worker and wait (the Python console's way); the ``MachineFacts``."""
        job = self.startDeviceDetection()
        job.wait(timeout, _processEvents)
        job.outcome()
        return self.machineFacts()

    @staticmethod
    def machineFacts():
        """The devices the worker last reported (``MachineFacts``), or None before it has answered."""
        return TuckerSegmentLogic._machine

    # --- what the panel offers (no torch here; the devices are the worker's report) ------------------------
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
        from TuckerSegmentLib.variants.panel import variant_choices
        from TuckerSegmentLib.variants.user_variants import user_variants
        facts = self.machineFacts()
        return variant_choices(task, catalogue(), facts and facts.devices, device, user_variants())

    @staticmethod
    def buildTargets(task: str = "auto", variant: str = "auto") -> list:
        """The variant ids "Build and measure" builds for the panel's task and variant."""
        from TuckerSegmentLib.variants.catalogue import catalogue
        from TuckerSegmentLib.variants.panel import build_targets
        return build_targets(task, variant, catalogue())

    @staticmethod
    def modelAndTask(task: str, variant: str) -> tuple:
        """``segment``'s (model, task) for a task and variant key of the panel."""
        from TuckerSegmentLib.variants.panel import model_and_task
        return model_and_task(task, variant)

    def structureNames(self, task: str = "auto", variant: str = "auto", device: str = "auto") -> list:
        """The structures the panel's choice segments, in label order (nothing is loaded); before the worker has
        reported the devices, as the CPU would run it."""
        from TuckerSegmentLib.runtime.hardware import undetected_devices
        from TuckerSegmentLib.variants.panel import structure_names
        facts = self.machineFacts()
        return structure_names(task, variant, device, facts.devices if facts else undetected_devices())

    # --- segmentation ------------------------------------------------------------------------------
    def startSegmentation(self, volumeNode, model=None, device=None, subset=None, task=None, tileStep=None,
                          runtime=None, precision=None, segmentationNode=None, request=None):
        """Start segmenting ``volumeNode`` in the worker and return its ``WorkerJob`` at once: as ``request`` (a
        ``SegmentRequest``, e.g. ``segmentRequest(parameterNode)``) says, or as the arguments say (``None``: the
        request's default: auto model, task and device, TotalSegmentator's tile step). The job keeps the volume and
        segmentation node it started with; poll it, then call ``finishSegmentation``. ``job.cancel()`` stops the
        worker at once; the temporary folder goes when the job ends."""
        from TuckerSegmentLib.worker.protocol import load_labels, save_volume
        if request is None:  # checked here, before anything is written or started
            request = _segmentRequest(model, device, subset, task, tileStep, runtime, precision)
        volume = readVolume(volumeNode)
        folder = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX))
        try:
            save_volume(folder / "volume.npz", volume.array, volume.ijk_to_ras)
            job = self.worker().submit("segment", {"volume": folder / "volume.npz", "labels": folder / "labels.npy",
                                                   **request.to_json()}, name="segmentation")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job.volumeNode, job.segmentationNode, job.ijkToWorld, job.labels = (
            volumeNode, segmentationNode, volume.ijk_to_ras, None)

        def collect(job) -> None:
            try:
                if job.state == "done":
                    job.labels = load_labels(folder / "labels.npy", volume.array.shape)
            except Exception as error:  # a result that cannot be read is the job's error
                job.state, job.error = "failed", error
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        job.on_end.append(collect)
        return job

    def finishSegmentation(self, job):
        """Write a finished job's labels into the segmentation node it started with (or a new node) on the
        volume it started with, and return the node; a failed or cancelled job raises its error
        (``SegmentationCancelled`` for a cancel) and the scene stays as it was."""
        from TuckerSegmentLib.errors import Cancelled, SegmentationCancelled, VolumeError
        from TuckerSegmentLib.image.volume import IntensityWarning, Volume
        from TuckerSegmentLib.segment.result import SegmentationResult
        from TuckerSegmentLib.worker.protocol import segments_from_json
        try:
            outcome = job.outcome()
        except Cancelled as error:
            raise SegmentationCancelled("segmentation cancelled; nothing was changed") from error
        self.modelReason, self.notices = outcome["reason"], list(outcome["notices"])
        for message in outcome["intensity_warnings"]:  # the worker's warnings, raised here as the engine raises them
            warnings.warn(message, IntensityWarning, stacklevel=2)
            self.notices.append(message)
        self.lastRun = {key: outcome[key] for key in ("loads", "load_seconds", "seconds", "tiles", "model", "device",
                                                      "runtime")}
        volumeNode, segmentationNode = job.volumeNode, job.segmentationNode
        if volumeNode is None or not slicer.mrmlScene.IsNodePresent(volumeNode):
            raise VolumeError("the input volume was removed while it was segmented; nothing was added")
        if segmentationNode is not None and not slicer.mrmlScene.IsNodePresent(segmentationNode):
            segmentationNode = None
        result = SegmentationResult(Volume(job.labels, job.ijkToWorld), segments_from_json(outcome["segments"]),
                                    outcome["model"], outcome["device"], outcome["seconds"], outcome["tiles"],
                                    outcome["policy"], list(outcome["warnings"]), outcome["runtime"])
        return writeSegmentation(result, volumeNode, segmentationNode)

    def segment(self, volumeNode, model=None, device=None, subset=None, segmentationNode=None,
                progress=None, cancel=None, task=None, tileStep=None, runtime=None, precision=None):
        """Segment ``volumeNode`` where it is shown (parent linear transform included) and return the
        segmentation node: ``segmentationNode`` with its segments replaced, or a new node. Waits for the
        worker (the console's way). ``progress`` gets (fraction, message); ``cancel()`` returning True stops
        the worker at once. On any error the scene is left as it was."""
        job = self.startSegmentation(volumeNode, model, device, subset, task, tileStep, runtime, precision,
                                     segmentationNode=segmentationNode)
        job.follow(progress, cancel, _processEvents)
        return self.finishSegmentation(job)

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
        """Segment CT files (a list, or a folder's NIfTI/NRRD files) with one model load in the worker, saving
        ``<name>.seg.nrrd`` beside each input (or in ``outputFolder``); an existing file is reported and kept
        unless ``overwrite``. The loaded nodes are removed again.
        Returns ``(input, output or None, message)`` per file: a bad file or output is reported and the rest
        go on; a cancel ends the batch after the files already done; a task or memory error, or a worker
        that died, stops it (raised)."""
        from TuckerSegmentLib.atomic import refuse_existing
        from TuckerSegmentLib.errors import VolumeError
        from TuckerSegmentLib.image.volume import volume_files
        from TuckerSegmentLib.segment.batch import segment_batch
        from TuckerSegmentLib.segment.output import plan_outputs
        files = volume_files(inputs)
        pairs = (plan_outputs(files, Path(outputFolder)) if outputFolder is not None
                 else [plan_outputs([f], f.parent)[0] for f in files])

        def work(pair, step):
            source, output = pair
            refuse_existing(output, overwrite)
            added = []
            try:
                volumeNode = slicer.modules.volumes.logic().AddArchetypeVolume(str(source), source.name)
                if volumeNode is None:
                    raise VolumeError(f"Slicer could not read {source}; pass a NIfTI or NRRD CT volume")
                added.append(volumeNode)
                segmentation = self.segment(volumeNode, model, device, subset, None, step, cancel, task)
                added.append(segmentation)
                self.saveSegmentation(segmentation, output)
                return output, f"{segmentation.GetSegmentation().GetNumberOfSegments()} segments"
            finally:
                for node in added:
                    removeWithDependents(node)
        items = segment_batch(pairs, work, name=lambda pair: pair[0].name, progress=progress)
        return [(item.source[0], item.output, item.message) for item in items]

    def segmentVolumeNodes(self, volumeNodes=None, model="auto", device: str = "auto", subset=None, progress=None,
                           cancel=None, task: str = "auto", save: bool = True, overwrite: bool = False) -> list:
        """Segment every CT volume node of the scene (or ``volumeNodes``) with one model load in the worker;
        with ``save`` each segmentation is written as ``<volume file name>.seg.nrrd`` beside its volume's file
        (an existing file is kept, and reported, unless ``overwrite``). Returns
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
        saved = {}

        def work(volumeNode, step):
            segmentation = self.segment(volumeNode, model, device, subset, None, step, cancel, task)
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

    # --- compression and variant builds ------------------------------------------------------------
    def startCompression(self, modelFolder, outputFolder, policy: str = "flops", target: float = 0.5,
                         calibrationNodes=(), device: str = "auto", measure: bool = True, runtime: str = "auto",
                         distill=0):
        """Compress an nnU-Net v2 model folder into the new folder ``outputFolder`` in the worker, then review
        it against the original; returns the ``WorkerJob`` at once (``finishCompression`` gives the review).
        ``policy``: a method of ``policies.methods.METHODS``; the pruning baselines ``prune-l1``/``prune-fpgm`` prune
        to the FLOP ``target`` from the weights alone (``prune-taylor`` needs labels: the command line).
        ``calibrationNodes``: scene CT volumes for activation-aware ranks and the agreement figure; ``runtime``
        what time (a latency target, the review) is measured in. ``distill`` N > 0: the compressed model is then
        trained N iterations, label-free, to reproduce the original on the same volumes (the sample CT without
        them) on ``device`` (the worker checks the number). The output appears whole or not at all: after a
        cancel, error or crash what the worker left is removed, except a distillation's saved state (and the
        compressed model it trains), from which the same compression into the same folder resumes."""
        from TuckerSegmentLib.atomic import check_output_dir, remove_stale
        from TuckerSegmentLib.errors import ModelFolderError, OutputPathError
        from TuckerSegmentLib.nnunet.layout import locate_model, model_inputs
        from TuckerSegmentLib.worker.protocol import save_volume
        if not str(modelFolder or "").strip():
            raise ModelFolderError("choose the nnU-Net model folder to compress")
        if not str(outputFolder or "").strip():
            raise OutputPathError("choose where the compressed model goes (a parent folder and a new name)")
        source = locate_model(Path(modelFolder).expanduser())  # the worker checks the folder's contents
        output = check_output_dir(Path(outputFolder).expanduser(), inputs=model_inputs("model folder", modelFolder))
        # checked before anything starts (an unknown method, labels it would need, a distillation count)
        request = compressRequest(source, output, policy, target, device, measure, runtime, distill)
        volumes = [readVolume(node) for node in calibrationNodes]
        folder = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX))
        try:
            calibration = []
            for index, volume in enumerate(volumes):
                calibration.append(folder / f"calibration{index}.npz")
                save_volume(calibration[-1], volume.array, volume.ijk_to_ras)
            request = request.replace(calibration=tuple(str(path) for path in calibration))
            job = self.worker().submit("compress", request.to_json(), name="compression")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

        def tidy(job) -> None:
            shutil.rmtree(folder, ignore_errors=True)
            if job.state != "done":
                remove_stale(output)
                _removeUnresumable(output)
        job.on_end.append(tidy)
        job.output = output
        return job

    @staticmethod
    def finishCompression(job):
        """A finished compression job's ``CompressionReview`` (its error re-raised)."""
        from TuckerSegmentLib.compress.figures import CompressionReview
        return CompressionReview.from_json(job.outcome())

    def startVariantBuild(self, variantIds, weightsFolder=None, calibrationNodes=(), holdoutNodes=()):
        """Build catalogue variants (ids from the Variant list) into the user cache in the worker, calibrated on
        ``calibrationNodes`` (scene CT volumes; default: the bundled sample CT) and measured against the
        original on ``holdoutNodes`` (default: held-out blocks of the calibration volumes); returns the
        ``WorkerJob`` (result: ``{"built": {id: folder}}``). A build cut short resumes next time."""
        from TuckerSegmentLib.errors import TuckerSegmentError
        from TuckerSegmentLib.usecases.requests import BuildRequest
        from TuckerSegmentLib.worker.protocol import save_volume
        ids = [str(v) for v in variantIds]
        if not ids:
            raise TuckerSegmentError("choose the variants to build")
        if holdoutNodes and not calibrationNodes:
            raise TuckerSegmentError("choose calibration volumes too: held-out volumes are only scored")
        roles = {"calibration": list(calibrationNodes), "holdout": list(holdoutNodes)}
        names = [node.GetName() for nodes in roles.values() for node in nodes]
        # two scene volumes may share a name; the engine tells CTs apart by name and content
        label = {node.GetID(): node.GetName() if names.count(node.GetName()) == 1 else f"{node.GetName()} ({node.GetID()})"
                 for nodes in roles.values() for node in nodes}
        volumes = {role: [(label[node.GetID()], readVolume(node)) for node in nodes] for role, nodes in roles.items()}
        folder = Path(tempfile.mkdtemp(prefix=TEMPORARY_PREFIX))
        try:
            saved, names = {}, []
            for role, named in volumes.items():
                saved[role] = []
                for index, (name, volume) in enumerate(named):
                    path = folder / f"{role}{index}.npz"
                    save_volume(path, volume.array, volume.ijk_to_ras)
                    saved[role].append(str(path))
                    names.append(name)
            request = BuildRequest(tuple(ids), weights=str(weightsFolder) if weightsFolder else None,
                                   calibration=tuple(saved["calibration"]), holdout=tuple(saved["holdout"]),
                                   names=tuple(names))
            job = self.worker().submit("build", request.to_json(), name="variant build")
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        job.on_end.append(lambda job: shutil.rmtree(folder, ignore_errors=True))
        return job

    def showReview(self, review, tableNode=None, chartNode=None) -> tuple:
        """Fill a table node with the review (quantity, original, compressed, ratio) and a plot chart with
        the Pareto plot of agreement against FLOPs for every compressed model of the same original you
        added (and this one), plus one curve per method of the last ``tuckersegment evaluate`` run on that
        original (uniform rule, budget policy, pruning criteria, precisions); returns (table, chart)."""
        from TuckerSegmentLib.compress.figures import pareto_front
        from TuckerSegmentLib.evaluation.saved import evaluation_curves
        from TuckerSegmentLib.variants.user_variants import comparison_points, user_variants
        scene = slicer.mrmlScene
        table = tableNode or scene.AddNewNodeByClass("vtkMRMLTableNode", "TuckerSegment compression report")
        fillTable(table, ("Quantity", "Original", "Compressed", "Ratio"), review.rows())
        measured = comparison_points(review, user_variants())
        frontier = pareto_front(measured)
        data = scene.AddNewNodeByClass("vtkMRMLTableNode", "TuckerSegment Pareto data")
        data.SetHideFromEditors(True)
        fillTable(data, ("FLOPs fraction", "Dice vs original", "Frontier FLOPs fraction", "Frontier Dice"),
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
        chart.SetYAxisTitle("Dice vs original")
        _addSeries(chart, "models", data, 0, 1, line=False)
        _addSeries(chart, "Pareto front", data, 2, 3, line=True, marker=False)
        for curve, points in evaluation_curves(review.source).items():
            curveData = scene.AddNewNodeByClass("vtkMRMLTableNode", f"TuckerSegment evaluated: {curve}")
            curveData.SetHideFromEditors(True)
            fillTable(curveData, ("FLOPs fraction", "Dice vs original"), points)
            _addSeries(chart, f"evaluated: {curve}", curveData, 0, 1, line=True)
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
        labels = exportLabels(segmentationNode, ids, volumeNode)
        values = {segmentation.GetSegment(segmentId).GetName(): index for index, segmentId in enumerate(ids, start=1)}
        spacing = volumeNode.GetSpacing()
        rows = segment_statistics(labels, slicer.util.arrayFromVolume(volumeNode), spacing[0] * spacing[1] * spacing[2],
                                  values)
        fillTable(table, COLUMNS, rows)
        return table


def _addSeries(chart, name, table, x, y, line, marker=True):
    """Add a scatter series of ``table``'s columns ``x``, ``y`` to ``chart`` (with a line, markers or both)."""
    scene = slicer.mrmlScene
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"TuckerSegment {name}")
    series.SetAndObserveTableNodeID(table.GetID())
    series.SetXColumnName(table.GetColumnName(x))
    series.SetYColumnName(table.GetColumnName(y))
    series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
    if not line:
        series.SetLineStyle(slicer.vtkMRMLPlotSeriesNode.LineStyleNone)
    series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleCircle if marker
                          else slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
    chart.AddAndObservePlotSeriesNodeID(series.GetID())
