"""The bundled demo model on the real chest CT: accuracy on the held-out half, left and right kept in
every storage orientation, the default ``segment`` command on a fresh machine."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import slicerio
from TuckerSegmentLib.image.volume import Volume
from TuckerSegmentLib.nnunet.checkpoint import load_checkpoint
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import SAMPLE_CT, chest_sample, holdout_mask, training_half_ct
from TuckerSegmentLib.variants.choice import bundled_models

RIGHT_LUNG, LEFT_LUNG = 5, 6


@pytest.fixture(scope="module")
def original() -> dict:
    return next(e for e in bundled_models() if e["policy"] == "original")


@pytest.fixture(scope="module")
def segmenter(original) -> Segmenter:
    return Segmenter(original["path"], device="cpu")


@pytest.fixture(scope="module")
def sample():
    return chest_sample()


def stored_as(volume: Volume, how: str) -> tuple[Volume, callable]:
    """The same physical CT stored with other voxel axes; returns it and a map of its label arrays
    back onto the original grid."""
    array, m = volume.array, volume.ijk_to_ras.copy()
    if how == "RAS":
        return volume, lambda a: a
    if how == "LPS":  # i and j reversed: i runs towards L, j towards P
        n = np.array(array.shape[::-1]) - 1
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = n[:2]
        return Volume(array[:, ::-1, ::-1].copy(), m @ flip), lambda a: a[:, ::-1, ::-1]
    if how == "permuted":  # voxel axes (i, j, k) -> (k, i, j): array order reversed accordingly
        swap = np.zeros((4, 4))
        swap[3, 3] = 1
        swap[[1, 2, 0], [0, 1, 2]] = 1  # new i = old j, new j = old k, new k = old i
        return Volume(array.transpose(2, 0, 1).copy(), m @ swap), lambda a: a.transpose(1, 2, 0)
    if how == "oblique":  # same voxels, scanner axes rotated 20° about S: the closest canonical is still RAS
        c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
        rotate = np.eye(4)
        rotate[:2, :2] = [[c, -s], [s, c]]
        return Volume(array, rotate @ m), lambda a: a
    raise ValueError(how)


def test_bundled_checkpoint_is_nnunet_format_and_loads_without_trusting_pickles(original):
    model = ModelFolder.open(original["path"])
    checkpoint = load_checkpoint(model.checkpoint_path(0), trust=False)
    assert {"network_weights", "init_args", "trainer_name", "inference_allowed_mirroring_axes"} <= set(checkpoint)
    assert checkpoint["trainer_name"] == "nnUNetTrainerNoMirroring"
    files = [p for p in original["path"].parent.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10e6  # the whole bundle stays below 10 MB


def test_held_out_dice_reproduces_the_catalogue(segmenter, sample, original):
    labels = segmenter.segment(sample.ct).labels
    held = holdout_mask(sample.labels.shape)
    for segment in segmenter.segments:
        a, b = labels[held] == segment.value, sample.labels[held] == segment.value
        dice = 2 * np.sum(a & b) / (a.sum() + b.sum())
        assert dice == pytest.approx(original["held_out_dice"][segment.name], abs=0.005), segment.name
    assert original["mean_dice"] > 0.7  # a useful model, not noise


def test_the_training_half_ct_shows_no_held_out_voxel(sample):
    """What recovery sees of the sample CT: the training half as it is; each held-out voxel replaced by its
    left-right mirror, a training voxel; so the held-out blocks' values appear nowhere unless a training
    voxel has the same value."""
    held = holdout_mask(sample.labels.shape)
    shown = training_half_ct(sample, held).array
    ct = sample.ct.array
    assert np.array_equal(shown[~held], ct[~held])
    assert np.array_equal(shown[held], ct[:, :, ::-1][held]) and not held[:, :, ::-1][held].any()
    assert not np.array_equal(shown[held], ct[held])  # the held-out image really is replaced
    with pytest.raises(ValueError, match="mirror"):
        training_half_ct(sample, held[:, :, ::-1] | held)


@pytest.mark.parametrize("how", ["RAS", "LPS", "permuted", "oblique"])
def test_left_and_right_survive_every_storage_orientation(segmenter, sample, how):
    volume, back = stored_as(sample.ct, how)
    labels = segmenter.segment(volume).labels
    reference = segmenter.segment(sample.ct).labels
    assert np.array_equal(back(labels), reference)  # voxel for voxel the same physical answer
    # and the right lung lies on the patient's right (larger RAS x) in the stored geometry
    centres = {}
    for value in (RIGHT_LUNG, LEFT_LUNG):
        kji = np.argwhere(labels == value)
        ras = volume.ijk_to_ras @ np.c_[kji[:, ::-1], np.ones(len(kji))].T
        centres[value] = ras[:3].mean(axis=1)
    assert centres[RIGHT_LUNG][0] > centres[LEFT_LUNG][0] + 80


def test_segment_with_no_options_on_a_fresh_machine(tmp_path, original):
    out = tmp_path / "chest.seg.nrrd"
    result = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "segment",
                             slicerio.get_testdata_file(SAMPLE_CT), str(out)], capture_output=True, text=True,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "model: demo / chest-demo-tucker-balanced: CPU" in result.stderr and "fast is not ready here" in result.stderr
    seg = slicerio.read_segmentation(str(out))
    by_name = {s["name"]: s for s in seg["segments"]}
    assert by_name["right lung"]["terminology"]["type"] == ["SCT", "39607008", "Lung"]
    assert by_name["right lung"]["terminology"]["typeModifier"] == ["SCT", "24028007", "Right"]
    assert by_name["left lung"]["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    assert by_name["ribs"]["color"] == pytest.approx([253 / 255, 232 / 255, 158 / 255], abs=1e-3)
    assert len(seg["segments"]) == 7
    tags = by_name["tissue"]["tags"]  # provenance on every segment
    assert tags["TuckerSegment.Model"] == "chest-demo-tucker-balanced"  # auto: measured faster, Dice within 1 point
    assert tags["TuckerSegment.Policy"].startswith("BudgetPolicy(")
    assert tags["TuckerSegment.Device"] == "cpu" and float(tags["TuckerSegment.Seconds"]) > 0
    assert tags["TuckerSegment.Runtime"] == "OpenVINO f32 (auto on the CPU)"  # the CLI's default on a CPU
    assert "research use only" in tags["TuckerSegment.Notice"]


def test_overlay_png_shows_the_right_lung_on_the_image_left(segmenter, sample, tmp_path):
    import SimpleITK as sitk
    from TuckerSegmentLib.testing.overlay import write_overlay_png
    result = segmenter.segment(sample.ct)
    path = write_overlay_png(sample.ct, result, tmp_path / "overlay.png")
    rgb = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert rgb.ndim == 3 and rgb.shape[2] == 3 and rgb.dtype == np.uint8
    width = rgb.shape[1] // 4  # four panels of equal width here (128 x 3 mm in-plane, 4 px gap)
    panel = rgb[:, width : 2 * width - 4]  # the mid axial slice: both lungs, well segmented
    colors = {s.value: np.array(s.color) for s in result.segments}
    gray = (panel[..., 0] == panel[..., 1]) & (panel[..., 1] == panel[..., 2])
    tinted = ~gray
    assert tinted.any()
    # the right lung's colour (green, from the sample's segmentation) dominates the image's left half
    green = tinted & (panel[..., 1].astype(int) > panel[..., 0].astype(int) + 50)  # tissue tints by ~20
    assert colors[RIGHT_LUNG][1] > colors[RIGHT_LUNG][0]
    columns = np.nonzero(green)[1]
    assert columns.size and np.mean(columns < panel.shape[1] / 2) > 0.9
    # and the left lung's (purple) the image's right half
    purple = tinted & (panel[..., 0].astype(int) > panel[..., 1].astype(int) + 50)
    assert colors[LEFT_LUNG][0] > colors[LEFT_LUNG][1]
    columns = np.nonzero(purple)[1]
    assert columns.size and np.mean(columns > panel.shape[1] / 2) > 0.9
