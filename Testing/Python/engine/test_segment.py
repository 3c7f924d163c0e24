"""Segmenting volumes through nnU-Net's predictor: progress, cancel, slabs, subsets and bad input."""
from __future__ import annotations

import os
import shutil
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import torch
from TuckerSegmentLib.errors import CheckpointError, ModelFolderError, OutputPathError, SegmentationCancelled, TaskError, VolumeError
from TuckerSegmentLib.image.volume import IntensityWarning, Volume, read_volume, volume_to_image
from TuckerSegmentLib.paths import BUNDLED_MODELS
from TuckerSegmentLib.segment.output import plan_outputs, write_result
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.segment.statistics import segment_statistics

DEMO_SOURCE = BUNDLED_MODELS / "chest-demo" / "Dataset901_ChestDemo"


def ct_phantom(shape=(20, 40, 36), spacing=(3.0, 3.0, 3.0), seed=0) -> Volume:
    """Air around a soft-tissue body with a dense block off to one side (HU)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    array = np.full(shape, -1000.0)
    array[(j / 0.8) ** 2 + (i / 0.9) ** 2 < 1] = 40.0
    array[(np.abs(i - 0.4) < 0.2) & (np.abs(j) < 0.3)] = 700.0
    array += rng.normal(0, 10, shape)
    return Volume(array.astype(np.float32), np.diag([*spacing[::-1], 1.0]))


@pytest.fixture(scope="module")
def segmenter(tiny_model) -> Segmenter:
    return Segmenter(tiny_model, device="cpu")


def test_labels_on_the_input_grid_with_progress_to_the_end(segmenter):
    volume = ct_phantom()
    steps = []
    result = segmenter.segment(volume, progress=lambda fraction, message: steps.append((fraction, message)))
    assert result.labels.shape == volume.array.shape
    assert set(np.unique(result.labels)) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(result.volume.ijk_to_ras, volume.ijk_to_ras)
    fractions = [f for f, _ in steps]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert sum("tile" in m for _, m in steps) == result.tiles > 1
    assert [s.name for s in result.segments] == ["structure_1", "structure_2", "structure_3"]
    assert sum(result.voxel_counts().values()) == np.count_nonzero(result.labels)


def test_one_loaded_model_segments_many_volumes_identically(segmenter):
    first = segmenter.segment(ct_phantom(seed=1)).labels
    segmenter.segment(ct_phantom(shape=(16, 30, 30), seed=2))
    assert np.array_equal(segmenter.segment(ct_phantom(seed=1)).labels, first)


def test_a_volume_smaller_than_the_patch_is_padded_not_refused(segmenter):
    volume = ct_phantom(shape=(6, 10, 12))  # the tiny model's patch is 32³ at 3 mm
    assert segmenter.segment(volume).labels.shape == (6, 10, 12)


def test_anisotropic_input_is_resampled_and_mapped_back(segmenter):
    volume = ct_phantom(shape=(8, 50, 44), spacing=(7.5, 1.8, 2.1))
    assert segmenter.segment(volume).labels.shape == (8, 50, 44)


def test_cancel_between_tiles_raises_and_the_predictor_stays_usable(segmenter):
    volume = ct_phantom()
    tiles = []

    def cancel() -> bool:
        return len(tiles) >= 2

    with pytest.raises(SegmentationCancelled):
        segmenter.segment(volume, progress=lambda f, m: tiles.append(m) if "tile" in m else None, cancel=cancel)
    assert len(tiles) == 2  # no tile ran after the flag was seen
    assert segmenter.segment(volume).labels.shape == volume.array.shape


def test_large_volumes_are_predicted_in_overlapping_slabs(tiny_model):
    volume = ct_phantom(shape=(60, 40, 36))
    whole = Segmenter(tiny_model, device="cpu").segment(volume)
    split = Segmenter(tiny_model, device="cpu", max_voxels=60 * 40 * 36 // 3 + 1).segment(volume)
    assert split.tiles > whole.tiles  # three slabs of 20 (+20 context) slices tile more than one volume
    # slabs see 20 voxels of context on each side: labels agree almost everywhere with a whole-volume run
    assert np.mean(split.labels == whole.labels) > 0.95


def test_subset_keeps_only_the_named_structures(segmenter):
    result = segmenter.segment(ct_phantom(), subset=["structure_2"])
    assert set(np.unique(result.labels)) <= {0, 2}
    assert [s.name for s in result.segments] == ["structure_2"]
    with pytest.raises(TaskError, match="unknown structure.*liver.*structure_1"):
        segmenter.segment(ct_phantom(), subset=["liver"])


@pytest.mark.parametrize("array, problem", [
    (np.zeros((1, 32, 32), np.float32), "single slice"),
    (np.zeros((32, 32), np.float32), "2 dimensions"),
    (np.zeros((0, 4, 4), np.float32), "empty"),
    (np.full((8, 8, 8), -1000.0, np.float32), "constant"),
    (np.array([[[np.nan, 0.0], [1.0, 2.0]]] * 2, np.float32), "NaN or infinite"),
])
def test_unusable_volumes_are_refused_with_the_reason(segmenter, array, problem):
    with pytest.raises(VolumeError, match=problem):
        segmenter.segment(Volume(array, np.eye(4)))


def test_non_ct_intensities_warn_but_still_segment(segmenter):
    volume = ct_phantom()
    volume.array = (volume.array + 1000) / 3000  # 0 … 0.6: not Hounsfield units
    with pytest.warns(IntensityWarning, match="not CT in Hounsfield units"):
        result = segmenter.segment(volume)
    assert result.labels.shape == volume.array.shape


def test_ct_in_hounsfield_units_does_not_warn(segmenter):
    with warnings.catch_warnings():
        warnings.simplefilter("error", IntensityWarning)
        segmenter.segment(ct_phantom())


def test_missing_or_corrupt_models_are_clear_errors(tiny_model, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        Segmenter(tmp_path / "nowhere", device="cpu")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "fold_0" / "checkpoint_final.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="checkpoint_final.pth"):
        Segmenter(broken, fold=0, device="cpu")


def test_seg_nrrd_carries_names_colours_terminology_and_geometry(segmenter, tmp_path):
    volume = ct_phantom()
    volume.ijk_to_ras = np.array([[-3.0, 0, 0, 12.0], [0, -3.0, 0, 40.0], [0, 0, 3.0, -7.0], [0, 0, 0, 1]])  # LPS-stored
    result = segmenter.segment(volume)
    path = write_result(result, tmp_path / "out.seg.nrrd")
    seg = slicerio.read_segmentation(str(path))
    assert [s["name"] for s in seg["segments"]] == ["structure_1", "structure_2", "structure_3"]
    assert [s["labelValue"] for s in seg["segments"]] == [1, 2, 3]
    np.testing.assert_allclose(seg["ijkToLPS"], np.diag([-1, -1, 1, 1]) @ volume.ijk_to_ras)
    np.testing.assert_array_equal(np.asarray(seg["voxels"]).T, result.labels)
    assert [f.name for f in tmp_path.iterdir()] == ["out.seg.nrrd"]  # no temporary file left


def test_nifti_label_map_has_the_input_geometry(segmenter, tmp_path):
    source = tmp_path / "ct.nii.gz"
    sitk.WriteImage(volume_to_image(ct_phantom()), str(source))
    result = segmenter.segment(source)
    path = write_result(result, tmp_path / "labels.nii.gz")
    labels, ct = read_volume(path, check=False), read_volume(source)
    np.testing.assert_array_equal(labels.array, result.labels)
    np.testing.assert_allclose(labels.ijk_to_ras, ct.ijk_to_ras, atol=1e-5)


def test_unwritable_or_clashing_outputs_are_refused_before_segmenting(tmp_path):
    source = tmp_path / "ct.nrrd"
    sitk.WriteImage(volume_to_image(ct_phantom()), str(source))
    with pytest.raises(OutputPathError, match="is the input"):
        plan_outputs([source], source.with_name("ct.nrrd"))
    with pytest.raises(OutputPathError, match="does not exist"):
        plan_outputs([source], tmp_path / "no" / "out.seg.nrrd")
    with pytest.raises(VolumeError, match=r"input\(s\) not found"):
        plan_outputs([tmp_path / "missing.nii.gz"], tmp_path / "out.seg.nrrd")
    other = tmp_path / "b"
    other.mkdir()
    sitk.WriteImage(volume_to_image(ct_phantom()), str(other / "ct.nrrd"))
    with pytest.raises(OutputPathError, match="distinct file names"):
        plan_outputs([source, other / "ct.nrrd"], tmp_path / "batch")
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(OutputPathError, match="no write permission"):
            plan_outputs([source], locked / "out.seg.nrrd")


def test_a_failed_write_leaves_no_file(segmenter, tmp_path, monkeypatch):
    result = segmenter.segment(ct_phantom())

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(slicerio, "write_segmentation", full_disk)
    with pytest.raises(OutputPathError, match="No space left"):
        write_result(result, tmp_path / "out.seg.nrrd")
    assert list(tmp_path.iterdir()) == []


def test_precision_switch_sets_the_autocast_of_the_torch_runtime():
    segmenter = Segmenter(DEMO_SOURCE, device="cpu", runtime="torch", precision="f32", execution="reference")
    predictor = segmenter._predictor
    dtypes = []
    first_conv = next(m for m in predictor.network.modules() if isinstance(m, torch.nn.Conv3d))
    first_conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    x = torch.randn(1, 1, 16, 32, 32)  # a small input: fp16 convolutions on a CPU are slow (40 s for a whole patch)
    for precision in ("f32", "fp16", "bf16"):
        predictor.precision = precision
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.float16):  # as nnU-Net's CUDA autocast
            predictor._internal_maybe_mirror_and_predict(x)
    assert dtypes == [torch.float32, torch.float16, torch.bfloat16]


def test_segment_statistics_on_a_known_label_map():
    labels = np.zeros((2, 3, 4), dtype=np.uint8)
    labels[0, :, :2] = 1
    labels[1, 0, 0] = 2
    image = np.arange(24, dtype=np.int16).reshape(2, 3, 4) - 100
    rows = segment_statistics(labels, image, voxel_mm3=2.0, values={"a": 1, "b": 2, "empty": 3})
    a = image[0, :, :2]
    assert rows[0] == ("a", 6, 0.012, pytest.approx(a.mean()), pytest.approx(a.std()), -100.0, -91.0)
    assert rows[1] == ("b", 1, 0.002, -88.0, 0.0, -88.0, -88.0)
    assert rows[2][:3] == ("empty", 0, 0.0) and np.isnan(rows[2][3])
    with pytest.raises(ValueError, match="not on one grid"):
        segment_statistics(labels, image[:1], 1.0, {"a": 1})
