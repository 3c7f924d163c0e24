"""The Slicer module's Logic against Slicer's real MRML (slicer-core, headless): coded segments on the
volume's geometry, transforms, re-runs, subsets, cancel and errors leaving the scene as it was, saving
with Slicer's storage node, batches of files."""
from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from conftest import bundled, renamed_copy
from TuckerSegmentLib.errors import CheckpointError, ModelFolderError, OutputPathError, SegmentationCancelled, VolumeError
from TuckerSegmentLib.image.volume import IntensityWarning, Volume
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.segment.labels import segment_labels
from TuckerSegmentLib.segment.provenance import RESEARCH_NOTICE

slicer = pytest.importorskip("slicer")
vtk = pytest.importorskip("vtk")
CT_PATH = slicerio.get_testdata_file("CTChest4.nrrd")
RIGHT_LUNG_TERMINOLOGY = ("Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure"
                          "~SCT^39607008^Lung~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^")


def engine_task(model="auto", task: str = "auto"):
    """The engine's segmenter for what the Logic's worker picks, run in this process to compare with."""
    from TuckerSegmentLib.usecases.requests import SegmentRequest
    from TuckerSegmentLib.worker.server import LoadedModel
    return LoadedModel().get(SegmentRequest(model=tuple(model) if isinstance(model, list) else model, task=task))


def matrix_of(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def exported_labels(segmentation_node, volume_node, segments) -> np.ndarray:
    """The segmentation node's labels on the volume's grid, with the model's label values."""
    scene = slicer.mrmlScene
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(max(s.value for s in segments) + 1)
    for value in range(colors.GetNumberOfColors()):
        colors.SetColor(value, f"unused {value}", 0, 0, 0, 0)
    for s in segments:
        colors.SetColor(s.value, s.name, *s.color, 1)
    ids = vtk.vtkStringArray()
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(i))
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.modules.segmentations.logic().ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap, volume_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, colors)
    assert np.allclose(matrix_of(labelmap), matrix_of(volume_node))
    labels = slicer.util.arrayFromVolume(labelmap).copy()
    scene.RemoveNode(labelmap)
    scene.RemoveNode(colors)
    return labels


def tag(segment, key: str) -> str:
    value = vtk.reference("")
    assert segment.GetTag(key, value), key
    return str(value)


def segments_by_name(node) -> dict:
    segmentation = node.GetSegmentation()
    return {s.GetName(): s for s in (segmentation.GetNthSegment(i) for i in range(segmentation.GetNumberOfSegments()))}


def world_centre(node, volume_node, segment_name: str, segments) -> np.ndarray:
    """Mean world (RAS) position of a segment's voxels, through the volume's parent transform."""
    labels = exported_labels(node, volume_node, segments)
    value = next(s.value for s in segments if s.name == segment_name)
    kji = np.argwhere(labels == value)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))]
    to_world = np.eye(4)
    if volume_node.GetParentTransformNode() is not None:
        matrix = vtk.vtkMatrix4x4()
        volume_node.GetParentTransformNode().GetMatrixTransformToWorld(matrix)
        to_world = slicer.util.arrayFromVTKMatrix(matrix)
    return (to_world @ matrix_of(volume_node) @ ijk1.T).T[:, :3].mean(axis=0)


def test_segments_the_loaded_ct_into_named_coloured_coded_segments(logic, scene, ct_node):
    hierarchy = scene.GetSubjectHierarchyNode()
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    hierarchy.CreateItem(study, ct_node)
    messages = []
    node = logic.segment(ct_node, model="chest-demo", progress=lambda f, m: messages.append((f, m)))
    assert node.GetName() == "CT segmentation" and node.GetDisplayNode() is not None
    assert "chest-demo" in logic.modelReason
    segments = segments_by_name(node)
    folder = ModelFolder.open(bundled("chest-demo"))
    expected = segment_labels(folder.dataset_json, folder.path)
    assert list(segments) == [s.name for s in expected]
    right = segments["right lung"]
    assert right.GetLabelValue() == 5
    assert tag(right, "TerminologyEntry") == RIGHT_LUNG_TERMINOLOGY
    assert right.GetColor() == pytest.approx(next(s.color for s in expected if s.name == "right lung"))
    assert node.GetAttribute("TuckerSegment.Model") == "chest-demo"
    assert node.GetAttribute("TuckerSegment.Policy") == "original"
    assert node.GetAttribute("TuckerSegment.Notice") == RESEARCH_NOTICE
    assert float(node.GetAttribute("TuckerSegment.Seconds")) > 0
    assert node.GetAttribute("TuckerSegment.Runtime") == "OpenVINO f32 (auto on the CPU)"
    assert logic.lastRun["runtime"] == "OpenVINO f32 (auto on the CPU)"
    assert tag(right, "TuckerSegment.Model") == "chest-demo"
    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(node)) == study
    assert messages[-1] == (1.0, "done") and all(0 <= f <= 1 for f, _ in messages)
    # no temporary node is left behind
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_node_labels_equal_the_engine_output_on_the_volume_geometry(logic, scene, ct_node):
    node = logic.segment(ct_node)
    task = engine_task()
    engine = task.segment(Volume(slicer.util.arrayFromVolume(ct_node).copy(), matrix_of(ct_node)))
    assert np.array_equal(exported_labels(node, ct_node, task.segments), engine.labels)
    # the reference geometry is the volume's: spacing, origin and directions
    geometry = slicer.vtkOrientedImageData()
    assert slicer.vtkSegmentationConverter.DeserializeImageGeometry(
        node.GetSegmentation().GetConversionParameter("Reference image geometry"), geometry)
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    assert np.allclose(slicer.util.arrayFromVTKMatrix(matrix), matrix_of(ct_node))
    assert geometry.GetDimensions() == ct_node.GetImageData().GetDimensions()


def rotation(degrees: float, axis: int) -> np.ndarray:
    a = np.deg2rad(degrees)
    i, j = [n for n in range(3) if n != axis]
    m = np.eye(4)
    m[i, i] = m[j, j] = np.cos(a)
    m[i, j], m[j, i] = -np.sin(a), np.sin(a)
    return m


@pytest.mark.parametrize("storage", ["LPS", "oblique", "transformed"])
def test_left_and_right_survive_lps_oblique_and_transformed_volumes(logic, scene, ct_node, storage):
    array, ras = slicer.util.arrayFromVolume(ct_node).copy(), matrix_of(ct_node)
    task = engine_task()
    if storage == "LPS":  # the same patient, voxels stored with i towards L and j towards P
        flipped = array[:, ::-1, ::-1].copy()
        m = ras.copy()
        m[:3, 3] = (ras @ np.array([array.shape[2] - 1, array.shape[1] - 1, 0, 1]))[:3]
        m[:3, 0], m[:3, 1] = -ras[:3, 0], -ras[:3, 1]
        node = slicer.util.addVolumeFromArray(flipped, ijkToRAS=m, name="CT LPS")
        same_as_original = lambda labels: labels[:, ::-1, ::-1]  # noqa: E731
    elif storage == "oblique":  # grid rotated 20° about S and 10° about A
        m = rotation(20, 2) @ rotation(10, 1) @ ras
        node = slicer.util.addVolumeFromArray(array, ijkToRAS=m, name="CT oblique")
        same_as_original = None
    else:  # the volume shown rotated by 30° about S through a parent transform
        node = ct_node
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rotation")
        transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(rotation(30, 2)))
        node.SetAndObserveTransformNodeID(transform.GetID())
        same_as_original = None
    segmentation = logic.segment(node)
    labels = exported_labels(segmentation, node, task.segments)
    to_world = rotation(30, 2) if storage == "transformed" else np.eye(4)
    engine = task.segment(Volume(slicer.util.arrayFromVolume(node).copy(), to_world @ matrix_of(node)))
    assert np.array_equal(labels, engine.labels)
    if same_as_original is not None:
        original = task.segment(Volume(array, ras)).labels
        assert np.array_equal(same_as_original(labels), original)
    assert segmentation.GetTransformNodeID() == node.GetTransformNodeID()
    right = world_centre(segmentation, node, "right lung", task.segments)
    left = world_centre(segmentation, node, "left lung", task.segments)
    # the patient's right lies towards +R in the world, whatever the storage or the transform
    towards_right = to_world[:3, :3] @ np.array([1.0, 0.0, 0.0])
    assert (right - left) @ towards_right > 80


def test_rerun_replaces_segments_and_subset_limits_them(logic, scene, ct_node):
    node = logic.segment(ct_node)
    assert node.GetSegmentation().GetNumberOfSegments() == 7
    again = logic.segment(ct_node, model="chest-demo-tucker-0.7", subset=["left lung", "ribs"], segmentationNode=node)
    assert again is node
    assert list(segments_by_name(node)) == ["ribs", "left lung"]
    assert node.GetAttribute("TuckerSegment.Policy") == "UniformPolicy(factor=0.7, rank_min=8)"
    task = engine_task("chest-demo-tucker-0.7")
    labels = exported_labels(node, ct_node, task.segments)
    engine = task.segment(Volume(slicer.util.arrayFromVolume(ct_node).copy(), matrix_of(ct_node)),
                          subset=["left lung", "ribs"])
    assert np.array_equal(labels, engine.labels) and set(np.unique(labels)) == {0, 1, 6}
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_subset_skips_models_of_a_task_that_hold_none_of_the_structures(scene, ct_node, tmp_path):
    import TuckerSegment
    first = bundled("chest-demo-tucker-0.3")
    models = [first, renamed_copy(first, tmp_path / "second", "copy ")]
    logic = TuckerSegment.TuckerSegmentLogic()
    node = logic.segment(ct_node, model=models, subset=["copy left lung"])
    engine = engine_task([str(m) for m in models])
    labels = engine.segment(Volume(slicer.util.arrayFromVolume(ct_node).copy(), matrix_of(ct_node)),
                            subset=["copy left lung"]).labels
    assert engine.loaded() == [False, True]  # the first model holds none of the structures: never loaded
    assert np.array_equal(exported_labels(node, ct_node, engine.segments), labels)
    assert list(segments_by_name(node)) == ["copy left lung"]
    assert segments_by_name(node)["copy left lung"].GetLabelValue() == 13


def snapshot(scene, node=None) -> tuple:
    segments = () if node is None else tuple(segments_by_name(node))
    return tuple(node_ids(scene)), segments


def test_cancel_and_errors_midway_leave_the_scene_as_it_was(logic, scene, ct_node, monkeypatch):
    node = logic.segment(ct_node, subset=["ribs"])
    before = snapshot(scene, node)
    with pytest.raises(SegmentationCancelled):
        logic.segment(ct_node, segmentationNode=node, cancel=lambda: True)
    assert snapshot(scene, node) == before

    def fail_at_second_tile(fraction, message):
        if message.startswith("tile 2/"):
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError, match="disk full"):
        logic.segment(ct_node, progress=fail_at_second_tile)
    with pytest.raises(RuntimeError, match="disk full"):
        logic.segment(ct_node, segmentationNode=node, progress=fail_at_second_tile)
    assert snapshot(scene, node) == before

    import TuckerSegmentLib.segment.provenance
    def broken(result):  # fails after the staging segmentation, labelmap and colour nodes exist
        raise RuntimeError("broken provenance")
    monkeypatch.setattr(TuckerSegmentLib.segment.provenance, "provenance", broken)
    for target in (None, node):
        with pytest.raises(RuntimeError, match="broken provenance"):
            logic.segment(ct_node, segmentationNode=target)
        assert snapshot(scene, node) == before


def test_saved_seg_nrrd_reads_back_with_slicerio(logic, scene, ct_node, tmp_path):
    node = logic.segment(ct_node, model="chest-demo")
    path = logic.saveSegmentation(node, tmp_path / "chest.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chest.seg.nrrd", "slicer_home"]  # no temporary file left
    seg = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in seg["segments"]}
    assert list(by_name) == list(segments_by_name(node))
    right = by_name["right lung"]
    assert right["labelValue"] == 5 and right["terminology"]["typeModifier"] == ["SCT", "24028007", "Right"]
    assert right["tags"]["TuckerSegment.Model"] == "chest-demo"
    assert right["tags"]["TuckerSegment.Notice"] == RESEARCH_NOTICE
    # voxels and geometry: the file holds the node's labels on the volume's grid (cropped, with its offset)
    task = engine_task()
    labels = exported_labels(node, ct_node, task.segments)
    full = np.zeros(labels.shape[::-1], dtype=np.int32)
    offset = np.array(seg["referenceImageExtentOffset"])
    voxels = seg["voxels"]
    full[tuple(slice(o, o + n) for o, n in zip(offset, voxels.shape, strict=True))] = voxels
    assert np.array_equal(full.T, labels)
    expected = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix_of(ct_node)
    expected[:3, 3] += expected[:3, :3] @ offset
    assert np.allclose(seg["ijkToLPS"], expected)
    assert node.GetStorageNode().GetFileName() == str(path)


@pytest.mark.parametrize("case", ["none", "labelmap", "2D", "NaN", "nonlinear"])
def test_bad_volumes_are_refused_before_the_scene_changes(logic, scene, ct_node, case):
    if case == "none":
        node = None
    elif case == "labelmap":
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
        slicer.util.updateVolumeFromArray(node, np.zeros((4, 8, 8), np.uint8))
    elif case == "2D":
        node = slicer.util.addVolumeFromArray(np.zeros((1, 64, 64), np.int16) - 1000, name="slice")
    elif case == "NaN":
        array = slicer.util.arrayFromVolume(ct_node).astype(np.float32)
        array[3, 4, 5] = np.nan
        node = slicer.util.addVolumeFromArray(array, ijkToRAS=matrix_of(ct_node), name="nan")
    else:
        node = ct_node
        transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "warp")
        spline = vtk.vtkThinPlateSplineTransform()
        source, target = vtk.vtkPoints(), vtk.vtkPoints()
        for p in ((0, 0, 0), (100, 0, 0), (0, 100, 0), (0, 0, 100), (50, 50, 50)):
            source.InsertNextPoint(*p)
            target.InsertNextPoint(p[0] + 3 * (p == (50, 50, 50)), p[1], p[2])
        spline.SetSourceLandmarks(source)
        spline.SetTargetLandmarks(target)
        transform.SetAndObserveTransformToParent(spline)
        node.SetAndObserveTransformNodeID(transform.GetID())
    before = snapshot(scene)
    expected = {"none": "no CT volume selected", "labelmap": "is a label map", "2D": "single slice",
                "NaN": "NaN", "nonlinear": "non-linear transform; harden"}[case]
    with pytest.raises(VolumeError, match=expected):
        logic.segment(node)
    assert snapshot(scene) == before


def test_unusual_but_valid_volumes_warn_or_pad(logic, scene, ct_node):
    array, m = slicer.util.arrayFromVolume(ct_node), matrix_of(ct_node)
    small = slicer.util.addVolumeFromArray(array[10:14, 40:70, 30:60].copy(), ijkToRAS=m, name="small")
    node = logic.segment(small)  # 4x30x30 voxels, smaller than the 16x128x128 patch: padded
    assert node.GetSegmentation().GetNumberOfSegments() >= 1
    mr_like = slicer.util.addVolumeFromArray(np.clip(array, -1000, 3000).astype(np.float32) + 1000, ijkToRAS=m,
                                             name="without rescale intercept")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logic.segment(mr_like)
    assert any(issubclass(w.category, IntensityWarning) for w in caught)


def test_missing_or_corrupt_model_and_unwritable_output_fail_clearly(logic, scene, ct_node, tmp_path):
    before = snapshot(scene)
    with pytest.raises(ModelFolderError, match="no such folder and no variant of that id"):
        logic.segment(ct_node, model=str(tmp_path / "missing"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bundled("chest-demo"), corrupt)
    checkpoint = next(corrupt.rglob("checkpoint_final.pth"))
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="checkpoint_final.pth"):
        logic.segment(ct_node, model=str(corrupt))
    assert snapshot(scene) == before
    node = logic.segment(ct_node, subset=["ribs"])
    before = snapshot(scene, node)
    with pytest.raises(OutputPathError, match="does not exist"):
        logic.saveSegmentation(node, tmp_path / "no" / "such" / "x.seg.nrrd")
    with pytest.raises(OutputPathError, match=".seg.nrrd"):
        logic.saveSegmentation(node, tmp_path / "x.nii.gz")
    assert snapshot(scene, node) == before and node.GetStorageNode() is None
    assert not list(tmp_path.glob("*.seg.nrrd")) and not list(tmp_path.glob(".*partial*"))


def test_batch_over_a_folder_loads_the_model_once_and_saves_beside_each_volume(logic, scene, tmp_path):
    folder = tmp_path / "cases"
    folder.mkdir()
    shutil.copy(CT_PATH, folder / "a.nrrd")
    image = sitk.ReadImage(CT_PATH)
    sitk.WriteImage(sitk.DICOMOrient(image, "LPS"), str(folder / "b.nii.gz"))
    sitk.WriteImage(image[:, :, 5], str(folder / "c_slice.nrrd"))  # a 2D image: reported, the rest go on
    baseline = node_ids(scene)
    worker = logic.workerStatus()
    progress = []
    outcomes = logic.segmentFiles(folder, model="chest-demo", progress=lambda f, m: progress.append((f, m)))
    after = logic.workerStatus()  # the same worker, and at most one model load for all the files
    assert after["pid"] == worker["pid"] and after["loads"] - worker["loads"] <= 1
    assert [(o[0].name, o[1].name if o[1] else None) for o in outcomes] == [
        ("a.nrrd", "a.seg.nrrd"), ("b.nii.gz", "b.seg.nrrd"), ("c_slice.nrrd", None)]
    assert outcomes[0][2] == "7 segments" and "single slice" in outcomes[2][2]
    assert sorted(p.name for p in folder.iterdir()) == ["a.nrrd", "a.seg.nrrd", "b.nii.gz", "b.seg.nrrd", "c_slice.nrrd"]
    a, b = (slicerio.read_segmentation(str(folder / f"{n}.seg.nrrd")) for n in "ab")
    assert [s["name"] for s in a["segments"]] == [s["name"] for s in b["segments"]]
    assert progress[0][1].startswith("1/3 a.nrrd") and progress[-1][0] <= 1
    assert node_ids(scene) == baseline  # loaded volumes and segmentations are removed again
    before = (folder / "a.seg.nrrd").read_bytes()
    again = logic.segmentFiles([folder / "a.nrrd"], model="chest-demo")  # an existing result is kept
    assert again[0][1] is None and "a.seg.nrrd exists; pass --overwrite (overwrite=True)" in again[0][2]
    assert (folder / "a.seg.nrrd").read_bytes() == before and node_ids(scene) == baseline
    replaced = logic.segmentFiles([folder / "a.nrrd"], model="chest-demo", overwrite=True)
    assert replaced[0][1] == folder / "a.seg.nrrd" and replaced[0][2] == "7 segments"


def test_batch_cancel_keeps_finished_files_and_writes_nothing_more(logic, scene, tmp_path):
    for name in ("a", "b", "c"):
        shutil.copy(CT_PATH, tmp_path / f"{name}.nrrd")
    baseline = node_ids(scene)
    started = []
    cancel = lambda: len(started) > 1  # noqa: E731 (cancel once the second file has started)
    outcomes = logic.segmentFiles([tmp_path / f"{n}.nrrd" for n in "abc"], model="chest-demo",
                                  progress=lambda f, m: started.append(m.split(":")[0]) if m.startswith("2/") else None,
                                  cancel=cancel)
    assert [(o[0].name, o[1] is not None) for o in outcomes] == [("a.nrrd", True), ("b.nrrd", False)]
    assert "cancelled" in outcomes[1][2]
    assert sorted(p.name for p in tmp_path.glob("*.seg.nrrd")) == ["a.seg.nrrd"]
    assert node_ids(scene) == baseline
