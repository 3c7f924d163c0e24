"""What the Slicer panel does, through the Logic on real MRML (slicer-core): jobs in the worker process
with progress and cancel, task/variant/structure choices, Segment Statistics figures, compression with its
report table, Pareto plot and "my variants", dependency checks, batches of volume nodes from the
console; and the module's own self-test (TuckerSegmentTest) run by pytest."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import headless_slicer
import numpy as np
import pytest
from conftest import hostile_copy, hub_payload, tree_digest
from test_slicer_logic import CT_PATH, node_ids, segments_by_name, snapshot
from TuckerSegmentLib import dependencies
from TuckerSegmentLib.worker.client import CANCELLED, DONE
from TuckerSegmentLib.errors import ModelFolderError, OutputPathError, SegmentationCancelled, TuckerSegmentError, VolumeError
from TuckerSegmentLib.image.volume import read_volume
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.segment.predictor import Segmenter

headless_slicer.setup()
from TuckerSegment import TuckerSegmentTest  # noqa: E402,F401 (collected: the module's self-test under pytest)

ROOT = Path(__file__).resolve().parents[3]
DEMO_SOURCE = ROOT / "TuckerSegment" / "Resources" / "Models" / "chest-demo" / "Dataset901_ChestDemo"
DEMO_STRUCTURES = ["ribs", "cervical vertebral column", "thoracic vertebral column", "lumbar vertebral column",
                   "right lung", "left lung", "tissue"]


def test_background_segmentation_equals_the_direct_one_and_cancel_or_removal_change_nothing(logic, scene, ct_node):
    direct = logic.segment(ct_node, task="demo", device="cpu")
    expected = {name: segment.GetLabelValue() for name, segment in segments_by_name(direct).items()}
    from TuckerSegmentLib.variants.choice import choose_model
    auto = choose_model("auto", task="demo", device="cpu").folders[0]  # what task="demo" runs here
    reference = Segmenter(auto, device="cpu").segment(read_volume(CT_PATH)).labels
    job = logic.startSegmentation(ct_node, task="demo", device="cpu", tileStep=0.8)
    assert job.wait(300) == DONE, job.error
    assert np.array_equal(job.labels, reference)  # the same engine result as a direct run
    node = logic.finishSegmentation(job)
    assert {name: s.GetLabelValue() for name, s in segments_by_name(node).items()} == expected

    before = snapshot(scene, node)
    job = logic.startSegmentation(ct_node, task="demo", device="cpu", segmentationNode=node)
    job.cancel()
    assert job.wait(300) == CANCELLED
    with pytest.raises(SegmentationCancelled):
        logic.finishSegmentation(job)
    assert snapshot(scene, node) == before

    job = logic.startSegmentation(ct_node, task="demo", device="cpu", subset=["left lung"])
    scene.RemoveNode(ct_node)  # the user closed the volume while it was segmented
    assert job.wait(300) == DONE
    ids = node_ids(scene)
    with pytest.raises(VolumeError, match="removed while it was segmented"):
        logic.finishSegmentation(job)
    assert node_ids(scene) == ids
    with pytest.raises(VolumeError, match="no CT volume selected"):
        logic.startSegmentation(None)


def test_task_variant_and_structure_choices(logic, monkeypatch):
    from TuckerSegmentLib.dependencies import installed_version
    from TuckerSegmentModule.Logic import TuckerSegmentLogic
    monkeypatch.setattr(TuckerSegmentLogic, "_machine", None)  # as when the panel opens
    tasks = {choice.key: choice for choice in logic.taskChoices()}
    assert list(tasks)[:1] == ["auto"] and {"total", "fast", "fastest", "demo"} <= set(tasks)
    assert "not installed" in tasks["total"].label and "ready" in tasks["demo"].label
    before = logic.variantChoices("demo", "cpu")  # the worker has not said which devices there are
    assert before[0].label == "Auto: detecting devices…" and before[1].key == "chest-demo"
    assert logic.structureNames("demo", "auto", "cpu") == DEMO_STRUCTURES  # listed meanwhile
    facts = logic.detectDevices()
    assert logic.machineFacts() is facts and [d.kind for d in facts.devices] == ["cpu"]  # no GPU on this machine
    assert facts.devices[0].cores == len(os.sched_getaffinity(0)) and facts.devices[0].total_bytes > 2 ** 30
    assert facts.openvino == installed_version("openvino") and "FP32" in facts.cpu_capabilities
    assert facts.describe().splitlines()[-1].startswith(f"OpenVINO {facts.openvino} on the CPU (")
    variants = logic.variantChoices("demo", "cpu")
    assert variants[0].key == "auto" and variants[0].label == "Auto: chest-demo-tucker-balanced"
    assert "CPU" in variants[0].tooltip and "faster than the original (measured" in variants[0].tooltip
    assert [v.key for v in variants[1:]] == ["chest-demo", "chest-demo-tucker-balanced", "chest-demo-tucker-fast",
                                             "chest-demo-tucker-0.7", "chest-demo-tucker-0.5", "chest-demo-tucker-0.3"]
    assert logic.variantChoices("fast", "cpu")[0].label == "Auto: nothing ready"
    assert logic.structureNames("demo", "auto", "cpu") == DEMO_STRUCTURES
    assert logic.structureNames("demo", "chest-demo-tucker-0.5", "cpu") == DEMO_STRUCTURES
    fast = logic.structureNames("fast")  # a TotalSegmentator task lists its structures before it is installed
    assert len(fast) == 117 and fast[:3] == ["spleen", "kidney_right", "kidney_left"]
    picked = "folder:" + str(DEMO_SOURCE)  # a model folder chosen in the panel
    assert (picked, "Dataset901_ChestDemo: my model") in [(c.key, c.label) for c in logic.taskChoices(picked)]
    assert logic.structureNames(picked, "auto", "cpu") == DEMO_STRUCTURES
    assert logic.modelAndTask("fast", "auto") == ("auto", "fast")
    assert logic.modelAndTask("folder:/m/original", "auto") == ("/m/original", "auto")
    assert logic.modelAndTask("folder:/m/original", "/m/small") == ("/m/small", "auto")


GUI_PROCESS = """
import json, sys, types
sys.path[:0] = [{module!r}, {testing!r}]
import headless_slicer, slicerio
headless_slicer.setup()
import TuckerSegment
from TuckerSegmentModule.Logic import segmentRequest
logic = TuckerSegment.TuckerSegmentLogic()
logic.taskChoices(), logic.variantChoices("auto", "auto"), logic.structureNames("auto", "auto", "auto")  # panel opens
logic.detectDevices()  # its refresh
choices = [logic.variantChoices(task, "auto") for task in ("auto", "demo")]
names = logic.structureNames("demo", choices[1][2].key, "auto")  # a variant and structures chosen
ct = headless_slicer.load_volume(slicerio.get_testdata_file("CTChest4.nrrd"), "CT")
panel = types.SimpleNamespace(task="demo", variant="auto", device="auto", tileStep=0.8, runtime="auto", precision="auto")
job = logic.startSegmentation(ct, request=segmentRequest(panel, names[-2:]))  # Apply
job.wait(600)
node = logic.finishSegmentation(job)
table = logic.showStatistics(node, ct)
logic.shutdownWorker()
print(json.dumps({{"auto": choices[0][0].label, "segments": node.GetSegmentation().GetNumberOfSegments(),
                   "rows": table.GetNumberOfRows(), "worker_loads": logic.lastRun["loads"],
                   "loaded": sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "openvino", "nnunetv2",
                                                                                "tensorly", "torch_pruning"}})}}))
"""


def test_the_gui_process_never_imports_torch_openvino_or_nnunet_through_a_whole_segmentation():
    """With every engine package installed, what the panel does (open, device refresh, choices, Apply, statistics)
    runs them in the worker only: Slicer's own process stays free of them (and of a CUDA context)."""
    script = GUI_PROCESS.format(module=str(ROOT / "TuckerSegment"), testing=str(ROOT / "Testing" / "Python"))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == []
    assert seen["auto"].startswith("Auto: chest-demo")  # the worker's devices made Auto's choice
    assert seen["segments"] == 2 and seen["rows"] == 2 and seen["worker_loads"] == 1


def test_statistics_give_each_segments_volume_and_mean_hu(logic, scene, ct_node):
    job = logic.startSegmentation(ct_node, task="demo", device="cpu")
    assert job.wait(300) == DONE
    node = logic.finishSegmentation(job)
    table = logic.showStatistics(node, ct_node)
    columns = [table.GetColumnName(i) for i in range(table.GetNumberOfColumns())]
    assert columns[:4] == ["Segment", "Number of voxels", "Volume [cm3]", "Mean [HU]"]
    ct = read_volume(CT_PATH).array
    voxel_cm3 = float(np.prod(ct_node.GetSpacing())) / 1000
    labels = job.labels
    rows = {table.GetCellText(r, 0): r for r in range(table.GetNumberOfRows())}
    assert set(rows) == set(segments_by_name(node))
    count, cm3, mean = (table.GetTable().GetColumn(i) for i in (1, 2, 3))
    for name, segment in segments_by_name(node).items():
        row, inside = rows[name], labels == segment.GetLabelValue()
        if not inside.any():
            continue
        assert count.GetValue(row) == int(inside.sum())
        assert cm3.GetValue(row) == pytest.approx(inside.sum() * voxel_cm3, rel=1e-9)
        assert mean.GetValue(row) == pytest.approx(ct[inside].mean(), rel=1e-9)
    assert mean.GetValue(rows["left lung"]) < -600  # air-filled
    with pytest.raises(VolumeError, match="segment a CT volume first"):
        logic.showStatistics(None, ct_node)


def test_compression_job_reports_plots_and_adds_to_my_variants(logic, scene, ct_node, tmp_path):
    source_before = tree_digest(DEMO_SOURCE)
    first = tmp_path / "demo-uniform-0.5"
    job = logic.startCompression(DEMO_SOURCE, first, policy="uniform", target=0.5, calibrationNodes=[ct_node],
                                 device="cpu", measure=True)
    assert job.wait(600) == DONE, job.error
    review = logic.finishCompression(job)
    assert (first / "fold_0" / "tucker.json").is_file() and review.output == str(first.resolve())
    structure = json.loads((first / "fold_0" / "tucker.json").read_text())
    assert review.compressed.params == structure["after"]["params"] < review.original.params
    assert review.compressed.flops == structure["after"]["flops"]
    assert review.original.seconds > 0 and review.compressed.seconds > 0
    assert review.compressed.peak_bytes < review.original.peak_bytes  # fewer, thinner activations
    assert 0.5 < review.agreement <= 1.0 and review.agreement_volumes == 1
    table, chart = logic.showReview(review)
    quantities = [table.GetCellText(r, 0) for r in range(table.GetNumberOfRows())]
    assert quantities[:3] == ["Parameters (M)", "GFLOPs per patch", "Weights (MB)"]
    assert any(q.startswith("Time per patch") for q in quantities) and any(q.startswith("Peak memory") for q in quantities)
    assert quantities[-1] == "Dice vs original (1 volumes)" and table.GetCellText(len(quantities) - 1, 2) == \
        f"{review.agreement:.3f}"
    assert chart.GetNumberOfPlotSeriesNodes() == 2

    added = logic.addToMyVariants(review)
    assert added.id == "demo-uniform-0.5" and added.agreement == review.agreement
    source = ModelFolder.open(DEMO_SOURCE).path  # the trainer folder
    task_key = "folder:" + str(source)
    tasks = {c.key: c.label for c in logic.taskChoices()}
    assert tasks[task_key] == "Dataset901_ChestDemo (3d_fullres): my model"
    variants = logic.variantChoices(task_key, "cpu")
    assert [v.key for v in variants] == ["auto", str(source), str(first.resolve())]
    assert variants[2].label.startswith("demo-uniform-0.5: ") and "Dice vs original" in variants[2].label
    model, task = logic.modelAndTask(task_key, variants[2].key)
    node = logic.segment(ct_node, model=model, task=task, device="cpu", subset=["left lung"])
    assert list(segments_by_name(node)) == ["left lung"]

    second = tmp_path / "demo-uniform-0.3"
    job = logic.startCompression(DEMO_SOURCE, second, policy="uniform", target=0.3, calibrationNodes=[ct_node],
                                 device="cpu", measure=False)
    assert job.wait(600) == DONE, job.error
    review2 = logic.finishCompression(job)
    assert review2.compressed.seconds is None and len(review2.rows()) == 4
    table2, chart2 = logic.showReview(review2, table, chart)
    assert (table2, chart2) == (table, chart)  # the panel's nodes are reused
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    data = chart.GetNthPlotSeriesNode(0).GetTableNode()
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotSeriesNode") == 2  # the first review's series were replaced
    columns = np.array([[data.GetTable().GetColumn(c).GetValue(r) for c in range(4)]
                        for r in range(data.GetNumberOfRows())])
    expected = sorted([(review.compressed.flops / review.original.flops, review.agreement),
                       (review2.compressed.flops / review2.original.flops, review2.agreement), (1.0, 1.0)])
    np.testing.assert_allclose(columns[:, :2], expected)  # this compression, the added one, and the original
    frontier = columns[~np.isnan(columns[:, 2]), 2:]
    assert tuple(frontier[0]) == pytest.approx(expected[0]) and tuple(frontier[-1]) == (1.0, 1.0)
    assert np.all(np.diff(frontier[:, 1]) > 0)  # more compute only where it buys agreement
    assert tree_digest(DEMO_SOURCE) == source_before



def test_the_pareto_plot_gains_the_curves_of_an_evaluation_of_the_same_original(logic, scene, tmp_path, monkeypatch):
    from TuckerSegmentLib.compress.figures import CompressionReview, ModelFigures
    from TuckerSegmentLib.evaluation.saved import save_evaluation
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    source = ModelFolder.open(DEMO_SOURCE).path
    review = CompressionReview(str(source), str(tmp_path / "out"), {"name": "uniform", "params": {"factor": 0.5}}, "cpu",
                               ModelFigures(1000, 100, 4000), ModelFigures(500, 40, 2000), agreement=0.8)
    _, chart = logic.showReview(review)
    assert chart.GetNumberOfPlotSeriesNodes() == 2  # no evaluation yet: models and front only
    model = {"path": "x", "flops_fraction": 1.0, "pooled_agreement": 1.0, "curve": "original"}
    save_evaluation({"models": [{**model, "path": str(source)},
                                {**model, "curve": "prune-l1", "flops_fraction": 0.5, "pooled_agreement": 0.7},
                                {**model, "curve": "prune-l1", "flops_fraction": 0.3, "pooled_agreement": 0.4},
                                {**model, "curve": "budget policy, activation-aware", "flops_fraction": 0.3,
                                 "pooled_agreement": 0.9}]})
    _, chart = logic.showReview(review, chartNode=chart)
    names = [chart.GetNthPlotSeriesNode(i).GetName() for i in range(chart.GetNumberOfPlotSeriesNodes())]
    assert names == ["TuckerSegment models", "TuckerSegment Pareto front", "TuckerSegment evaluated: prune-l1",
                     "TuckerSegment evaluated: budget policy, activation-aware"]
    pruned = chart.GetNthPlotSeriesNode(2).GetTableNode().GetTable()
    assert [(pruned.GetValue(r, 0).ToDouble(), pruned.GetValue(r, 1).ToDouble()) for r in range(2)] == [(0.3, 0.4),
                                                                                                       (0.5, 0.7)]

def test_compression_refuses_bad_input_before_starting_and_cancel_leaves_nothing(logic, ct_node, tmp_path):
    source_before = tree_digest(DEMO_SOURCE)
    with pytest.raises(ModelFolderError):
        logic.startCompression(tmp_path / "nothing here", tmp_path / "out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("keep")
    with pytest.raises(OutputPathError):
        logic.startCompression(DEMO_SOURCE, tmp_path / "taken")
    with pytest.raises(OutputPathError):
        logic.startCompression(DEMO_SOURCE, ModelFolder.open(DEMO_SOURCE).path / "inside")
    with pytest.raises(Exception, match="unknown compression method 'magic'; choose one of flops"):
        logic.startCompression(DEMO_SOURCE, tmp_path / "out", policy="magic")
    with pytest.raises(TuckerSegmentError, match="^unknown runtime 'tensorrt'; choose one of"):  # before it starts
        logic.startCompression(DEMO_SOURCE, tmp_path / "out", policy="uniform", target=0.5, device="cpu",
                               runtime="tensorrt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slicer_home", "taken"]  # nothing written
    job = logic.startCompression(DEMO_SOURCE, tmp_path / "out", policy="uniform", target=0.5, device="cpu")
    job.on_progress = lambda fraction, message: job.cancel() if message.startswith("compressing layer 3/") else None
    assert job.wait(600) == CANCELLED  # killed mid-compression: its staging folder and claim are removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slicer_home", "taken"]  # no output, no staging
    assert tree_digest(DEMO_SOURCE) == source_before


def test_compression_with_distillation_resumes_after_a_cancel_and_refuses_bad_counts(logic, ct_node, tmp_path):
    source_before = tree_digest(DEMO_SOURCE)
    for bad in (-1, 1.5, "3"):  # refused before anything starts
        with pytest.raises(TuckerSegmentError, match=r"^distillation takes a whole number of iterations from 0 \(none\) "
                                                     "to 100000"):
            logic.startCompression(DEMO_SOURCE, tmp_path / "out", policy="uniform", target=0.5, device="cpu",
                                   measure=False, distill=bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slicer_home"]
    out = tmp_path / "out"
    job = logic.startCompression(DEMO_SOURCE, out, policy="uniform", target=0.5, calibrationNodes=[ct_node],
                                 device="cpu", measure=False, distill=3)
    job.on_progress = lambda fraction, message: job.cancel() if message.startswith("distilling, iteration 1/3") else None
    assert job.wait(600) == CANCELLED  # killed after the first iteration's state was saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.distill-source", "out.distill-state", "slicer_home"]
    job = logic.startCompression(DEMO_SOURCE, out, policy="uniform", target=0.5, calibrationNodes=[ct_node],
                                 device="cpu", measure=False, distill=3)
    assert job.wait(600) == DONE, job.error
    review = logic.finishCompression(job)
    recovery = json.loads((out / "fold_0" / "tucker.json").read_text())["recovery"]
    assert recovery["iterations"] == 3 and recovery["resumed"] == 1
    assert review.notes[0].startswith("distilled 3 iterations from the original (label-free")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "slicer_home"]
    assert tree_digest(DEMO_SOURCE) == source_before


def test_the_logic_refuses_a_model_folder_whose_plans_name_code(logic, scene, ct_node, tiny_model, tmp_path):
    folder = hostile_copy(tiny_model, tmp_path, hub_payload)
    before, nodes = tree_digest(folder), node_ids(scene)

    def outcome(job):
        job.wait(300)
        return job.outcome()
    for run in (lambda: outcome(logic.startCompression(folder, tmp_path / "out")),
                lambda: outcome(logic.startSegmentation(ct_node, model=str(folder), device="cpu")),
                lambda: logic.segmentVolumeNodes([ct_node], model=str(folder), device="cpu", save=False)):
        with pytest.raises(ModelFolderError, match="network_class_name names 'torch.hub.load'.*nothing from the folder"):
            run()
    assert not (folder / "PWNED").exists() and tree_digest(folder) == before and node_ids(scene) == nodes
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_console_batch_over_the_scenes_volumes_loads_the_model_once_and_saves_beside_each(logic, scene, tmp_path):
    import shutil
    for name in ("first", "second"):
        shutil.copy(CT_PATH, tmp_path / f"{name}.nrrd")
    nodes = [headless_slicer.load_volume(tmp_path / f"{name}.nrrd", name) for name in ("first", "second")]
    unsaved = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unsaved")
    unsaved.SetAndObserveImageData(nodes[0].GetImageData())
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")  # no voxels: reported
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")  # not a CT: skipped
    worker = logic.workerStatus()
    progress = []
    outcomes = logic.segmentVolumeNodes(model="chest-demo", progress=lambda f, m: progress.append((f, m)))
    after = logic.workerStatus()
    assert after["pid"] == worker["pid"] and after["loads"] - worker["loads"] <= 1  # one model load at most
    assert [(o[0].GetName(), o[2].name if o[2] else None) for o in outcomes] == [
        ("first", "first.seg.nrrd"), ("second", "second.seg.nrrd"), ("unsaved", None), ("empty", None)]
    assert outcomes[2][3] == "7 segments; not saved: the volume has no file (save it with File > Save Data)"
    assert outcomes[3][1] is None and "has no voxels" in outcomes[3][3]
    assert sorted(p.name for p in tmp_path.glob("*.*")) == ["first.nrrd", "first.seg.nrrd", "second.nrrd",
                                                            "second.seg.nrrd"]
    assert progress[0][1].startswith("1/4 first:") and any(m.startswith("2/4 second:") for _, m in progress)
    assert [f for f, _ in progress] == sorted(f for f, _ in progress) and progress[-1][0] <= 1


def test_console_batch_stops_when_the_worker_dies_and_keeps_what_was_done(logic, scene):
    import os
    import signal
    first = headless_slicer.load_volume(CT_PATH, "first")
    second = headless_slicer.load_volume(CT_PATH, "second")
    before = node_ids(scene)

    def kill_during_the_second(fraction, message):  # as the kernel does when memory runs out
        if message.startswith("2/2 second: tile 2/"):
            os.kill(logic.worker().worker_pid, signal.SIGKILL)
    with pytest.raises(TuckerSegmentError, match=r"^second: the TuckerSegment worker process was killed \(SIGKILL; "
                                                 r"out of memory is the usual cause\).*\(batch stopped after 1 of 2"):
        logic.segmentVolumeNodes([first, second], model="chest-demo", device="cpu", save=False,
                                 progress=kill_during_the_second)
    added = [i for i in node_ids(scene) if i not in before]
    assert [scene.GetNodeByID(i).GetClassName() for i in added] == [  # the first volume's segmentation only
        "vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode"]
    assert logic.segment(second, model="chest-demo", device="cpu").GetSegmentation().GetNumberOfSegments() == 7


def test_dependency_check_names_missing_and_untested_versions():
    versions = {"torch": None, "tensorly": "0.9.0", "nnunetv2": "2.8.1", "acvl-utils": "0.2.6",
                "dynamic-network-architectures": "0.4.4", "safetensors": "0.8.0", "nibabel": "5.4.2",
                "SimpleITK": "2.4.1", "slicerio": "1.4.0", "numpy": "1.26.4", "openvino": "2026.4.1",
                "scipy": "1.17.1", "matplotlib": "3.11.2", "torch-pruning": "1.6.1", "nncf": "3.4.0"}
    problems = dependencies.problems(versions.get)
    assert [str(p) for p in problems] == ["torch is not installed",
                                          "tensorly 0.9.0 is installed; TuckerSegment needs tensorly>=0.10,<0.11"]
    assert all(p.blocking for p in problems)
    assert not dependencies.problems({**versions, "torch": "2.13.0+cpu", "tensorly": "0.10.0"}.get)
    assert dependencies.problems({**versions, "torch": "2.13.0", "tensorly": "0.10.0", "nnunetv2": "2.9.0rc1"}.get)
    assert [str(p) for p in dependencies.problems({**versions, "torch": "2.9.0", "tensorly": "0.10.0"}.get)] == [
        "torch 2.9.0 is installed; TuckerSegment needs torch>=2.5,!=2.9.*"]
    without_openvino = dependencies.problems({**versions, "torch": "2.13.0", "tensorly": "0.10.0", "openvino": None}.get)
    assert [(str(p), p.blocking) for p in without_openvino] == [("openvino is not installed", False)]


class StandInInstallers:
    """Slicer's installers as the install logic calls them (PyTorch extension, NNUNet extension, pip), recording
    each call and changing ``versions`` as the real ones would; the NNUNet installer leaves acvl_utils 0.2
    behind, as versions of it were seen to."""

    def __init__(self, versions: dict, monkeypatch) -> None:
        self.versions, self.calls = versions, []
        torch_utils = types.ModuleType("PyTorchUtils")
        torch_utils.PyTorchUtilsLogic = lambda: types.SimpleNamespace(installTorch=self.install_torch)
        nnunet = types.ModuleType("SlicerNNUNetLib")
        nnunet.InstallLogic = self.nnunet_installer
        monkeypatch.setitem(sys.modules, "PyTorchUtils", torch_utils)
        monkeypatch.setitem(sys.modules, "SlicerNNUNetLib", nnunet)
        import slicer
        monkeypatch.setattr(slicer.util, "pip_install", self.pip, raising=False)

    def install_torch(self, **kwargs):
        self.calls.append(("torch", kwargs))
        self.versions["torch"] = "2.13.0+cu128"
        return "torch module"

    def nnunet_installer(self, doAskConfirmation=True):
        def setup(requirement):  # returns None, as SlicerNNUnet's declares (some versions return a bool)
            self.calls.append(("nnunet", requirement, doAskConfirmation))
            if self.nnunet_works:
                self.versions.update({"nnunetv2": requirement.split("==")[1], "acvl-utils": "0.2"})
        return types.SimpleNamespace(setupPythonRequirements=setup, needsRestart=False)

    nnunet_works = True

    def pip(self, arguments):
        assert arguments[0] == "--constraint"  # every pip call pins what pip must not change
        self.calls.append(("pip", arguments[2:], Path(arguments[1]).read_text().split()))
        for requirement in arguments[2:]:
            name, low = requirement.split(">=")[0], requirement.split(">=")[1].split(",")[0]
            self.versions[name] = low


def test_install_uses_slicers_installers_then_checks_and_repairs_what_they_left(monkeypatch):
    from TuckerSegmentModule.InstallLogic import TuckerSegmentInstallLogic
    versions = {"torch": None, "tensorly": "0.9.0", "nnunetv2": None, "acvl-utils": "0.2.6",
                "dynamic-network-architectures": "0.4.4", "safetensors": "0.8.0", "nibabel": "5.4.2",
                "SimpleITK": "2.4.1", "slicerio": "1.4.0", "numpy": "1.26.4", "scipy": "1.17.1",
                "matplotlib": "3.11.2", "torch-pruning": "1.6.1"}
    installers = StandInInstallers(versions, monkeypatch)
    logic = TuckerSegmentInstallLogic(versionOf=versions.get)
    outcome = logic.install(logic.problems())
    pinned = ["SimpleITK==2.4.1", "numpy==1.26.4", "torch==2.13.0+cu128"]  # Slicer's own, and the PyTorch extension's
    assert installers.calls == [
        ("torch", {"askConfirmation": False, "torchVersionRequirement": ">=2.5,!=2.9.*"}),
        ("nnunet", "nnunetv2==2.8.1", False),
        ("pip", ["nncf>=3.4,<4", "openvino>=2026.0,<2027", "tensorly>=0.10,<0.11"], pinned),
        ("pip", ["acvl-utils>=0.2.6,<0.3"], pinned),  # the NNUNet installer left acvl_utils 0.2: repaired
    ]
    assert logic.problems() == [] and not outcome.needsRestart
    assert outcome.messages[-1] == ("repaired with pip, as an installer had left it: acvl-utils 0.2 is installed; "
                                    "TuckerSegment needs acvl-utils>=0.2.6,<0.3")

    versions["nnunetv2"], installers.nnunet_works, installers.calls = None, False, []  # its installer failed quietly
    with pytest.raises(TuckerSegmentError, match="^still missing after the install: nnunetv2 is not installed"):
        logic.install(logic.problems())
    installers.nnunet_works, versions["nnunetv2"] = True, "2.8.1"

    for name, version in (("numpy", "1.24.4"), ("SimpleITK", None)):  # Slicer's own packages: reported, not touched
        versions[name], installers.calls = version, []
        with pytest.raises(TuckerSegmentError, match=f"^{name} .*is.* installed.*: it comes with Slicer, and "
                                                     "TuckerSegment does not change Slicer's own packages with pip"):
            logic.install(logic.problems())
        assert installers.calls == [] and versions[name] == version
        versions[name] = {"numpy": "1.26.4", "SimpleITK": "2.4.1"}[name]

    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # PyTorch extension not installed
    versions["torch"] = None
    with pytest.raises(TuckerSegmentError, match="^PyTorch is missing: install the PyTorch extension"):
        logic.install(logic.problems())
    monkeypatch.setitem(sys.modules, "SlicerNNUNetLib", None)
    versions.update(torch="2.13.0", nnunetv2=None)
    with pytest.raises(TuckerSegmentError, match="^the NNUNet extension is missing: install it"):
        logic.install(logic.problems())


def test_dependency_check_and_module_import_work_without_torch():
    script = ("import sys; sys.modules['torch'] = None; sys.modules['nnunetv2'] = None\n"
              f"sys.path[:0] = [{str(ROOT / 'TuckerSegment')!r}, {str(ROOT / 'Testing' / 'Python')!r}]\n"
              "import headless_slicer; headless_slicer.setup()\n"
              "import TuckerSegment\n"  # the module file imports nothing of the engine at import time
              "from TuckerSegmentLib import dependencies\n"
              "print(len(dependencies.REQUIREMENTS))\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(len(dependencies.REQUIREMENTS))


def test_the_output_folder_is_an_existing_parent_and_a_new_plain_name(logic, tmp_path):
    from TuckerSegmentModule.Logic import compressionOutput, suggestedOutputName
    assert suggestedOutputName("/m/Dataset291/nnUNetTrainer__nnUNetPlans__3d_fullres", "flops", 0.5) == \
        "nnUNetTrainer__nnUNetPlans__3d_fullres-tucker-flops-0.5"
    assert suggestedOutputName("", "vbmf", 0.5) == "model-tucker-vbmf"  # a method without a target
    assert compressionOutput(str(tmp_path), "", "/m/demo", "uniform", 0.7) == tmp_path / "demo-tucker-uniform-0.7"
    assert compressionOutput(str(tmp_path), "  mine ", "/m/demo", "uniform", 0.7) == tmp_path / "mine"
    for name in ("a/b", "..", ".", "x\\y", "nul\0"):
        with pytest.raises(OutputPathError, match="is not a folder name; type a new name without"):
            compressionOutput(str(tmp_path), name, "/m/demo", "flops", 0.5)
    with pytest.raises(OutputPathError, match="^choose the folder the compressed model goes in"):
        compressionOutput("  ", "name", "/m/demo", "flops", 0.5)
    with pytest.raises(ModelFolderError, match="^choose the nnU-Net model folder"):
        logic.startCompression("", tmp_path / "out")
    with pytest.raises(OutputPathError, match="^choose where the compressed model goes"):
        logic.startCompression(DEMO_SOURCE, " ")
    assert not logic.worker().busy and sorted(p.name for p in tmp_path.iterdir()) == []


def test_module_files_parse_on_python_3_9_so_an_old_slicer_can_say_what_it_needs():
    import ast

    from TuckerSegmentLib.dependencies import platform_problem
    module = ROOT / "TuckerSegment"
    files = [module / "TuckerSegment.py", *sorted((module / "TuckerSegmentModule").glob("*.py")),
             module / "TuckerSegmentLib" / "__init__.py", module / "TuckerSegmentLib" / "dependencies.py"]
    for path in files:
        ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 9))
    assert platform_problem((3, 9, 10), (5, 8)) == (
        "TuckerSegment needs 3D Slicer 5.10 or newer (Python 3.11+); this is Slicer 5.8 with Python 3.9: install a "
        "current Slicer from download.slicer.org")
    assert platform_problem((3, 12, 10), (5, 10)) is None and platform_problem((3, 11, 7)) is None
    assert platform_problem((3, 10, 4)) == "TuckerSegment needs Python 3.11 or newer; this is Python 3.10"


def test_the_self_test_skips_and_says_why_without_its_dependencies(monkeypatch, capsys):
    from TuckerSegmentLib import dependencies
    missing = [dependencies.Problem(dependencies.TORCH, None)]
    monkeypatch.setattr(dependencies, "problems", lambda *args: missing)
    started = []
    monkeypatch.setattr(TuckerSegmentTest, "test_segments_the_bundled_sample_with_the_demo_model",
                        lambda self: started.append("segment"))
    TuckerSegmentTest("runTest").runTest()
    assert started == []
    assert capsys.readouterr().out.strip() == ("TuckerSegment self-test skipped: missing Python packages (torch is not "
                                               "installed); install them from the panel")


def test_the_self_test_is_skipped_not_failed_when_slicer_runs_it_as_runUnitTest_does(monkeypatch):
    import io
    import unittest

    from TuckerSegmentLib import dependencies
    monkeypatch.setattr(dependencies, "problems", lambda *args: [dependencies.Problem(dependencies.TORCH, None)])
    suite = unittest.TestLoader().loadTestsFromName("TuckerSegment")  # slicer.testing.runUnitTest's loader
    result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=2).run(suite)
    assert result.wasSuccessful() and result.testsRun == 2 and not result.failures and not result.errors
    assert [reason for _, reason in result.skipped] == 2 * [
        "TuckerSegment self-test skipped: missing Python packages (torch is not installed); install them from the panel"]


RELOAD = """
import json, os, sys
sys.path[:0] = {paths!r}
import headless_slicer
headless_slicer.setup()
import TuckerSegment
from TuckerSegmentModule.Logic import TuckerSegmentLogic, forgetPackages
import TuckerSegmentLib.cli  # an engine module the panel does not load itself
pid = TuckerSegmentLogic().workerStatus()["pid"]  # the shared worker, running the engine as loaded
TuckerSegmentLogic.shutdownSharedWorker()
dropped = forgetPackages()
import TuckerSegmentModule.Logic as again
print(json.dumps({{"pid": pid, "dropped": dropped, "fresh": again.TuckerSegmentLogic is not TuckerSegmentLogic}}))
"""


def test_the_developer_reload_ends_the_worker_and_reads_the_module_s_packages_again():
    from conftest import process_ended
    root = Path(__file__).resolve().parents[3]
    script = RELOAD.format(paths=[str(root / "TuckerSegment"), str(root / "Testing" / "Python")])
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert process_ended(seen["pid"])
    assert {"TuckerSegmentModule.Widget", "TuckerSegmentModule.Logic", "TuckerSegmentLib.cli",
            "TuckerSegmentLib.worker.client"} <= set(seen["dropped"])
    assert seen["fresh"]  # the Logic imported after the reload is read again, not the old module
