"""Structure subsets segmented only where a coarse pass finds them: the whole CT's geometry, the uncropped run's
labels inside the box, nothing outside, and a plain answer when the subset is not in the CT."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from TuckerSegmentLib.image.volume import Volume
from TuckerSegmentLib.nnunet.layout import CHECKPOINT_NAME
from TuckerSegmentLib.segment.crop import Box, bounding_box, decimated, model_grid_box
from TuckerSegmentLib.segment.task import TaskSegmenter
from TuckerSegmentLib.testing.demo_data import chest_sample
from TuckerSegmentLib.testing.example_models import write_example_model, write_totalsegmentator_task
from TuckerSegmentLib.variants.catalogue import catalogue
from TuckerSegmentLib.variants.choice import bundled_models, choose_model
from TuckerSegmentLib.variants.guard import SafeTask
from TuckerSegmentLib.runtime.hardware import GB, DeviceInfo

CPU = DeviceInfo("cpu", "CPU", 32 * GB, 16 * GB, cores=8)


@pytest.fixture(scope="module")
def demo_task() -> TaskSegmenter:
    """The demo model, located by itself (standing in for TotalSegmentator's 6 mm model): real anatomy."""
    demo = next(Path(e["path"]) for e in bundled_models() if e["policy"] == "original")
    return TaskSegmenter([demo], device="cpu", coarse=TaskSegmenter([demo], device="cpu"))


def oblique(volume: Volume, degrees: float = 20.0) -> Volume:
    """``volume`` with its grid turned about the S axis: an oblique scan of the same voxels."""
    angle = np.radians(degrees)
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    return Volume(volume.array, turn @ volume.ijk_to_ras)


def compare(task: TaskSegmenter, ct: Volume, subset: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    cropped = task.segment(ct, subset=subset)
    whole = task.segment(ct, subset=subset, crop=False)
    assert cropped.labels.shape == whole.labels.shape == ct.array.shape
    assert np.array_equal(cropped.volume.ijk_to_ras, ct.ijk_to_ras)  # the CT's own grid, oblique or not
    return cropped.labels, whole.labels, cropped.warnings


@pytest.mark.parametrize("subset", [["lumbar vertebral column"], ["left lung"]])
def test_a_cropped_subset_is_the_uncropped_run_inside_its_box_on_an_oblique_ct(demo_task, subset):
    ct = oblique(chest_sample().ct)
    cropped, whole, notes = compare(demo_task, ct, subset)
    assert any("segmented inside voxels" in note for note in notes)
    found = whole > 0
    assert found.sum() > 100
    assert (cropped[found] == whole[found]).mean() >= 0.999  # the structure is inside the box, labelled alike
    assert (cropped[cropped > 0] == whole[cropped > 0]).mean() >= 0.999


def test_a_subset_at_the_edge_of_the_volume_is_cropped_within_it(demo_task):
    sample = chest_sample().ct
    cut = Volume(np.ascontiguousarray(sample.array[:, :, 64:]), sample.ijk_to_ras.copy())  # the left half only
    cut.ijk_to_ras[:3, 3] = (sample.ijk_to_ras @ [64, 0, 0, 1])[:3]
    cropped, whole, _ = compare(demo_task, cut, ["left lung"])
    found = whole > 0
    assert found.sum() > 100 and (cropped[found] == whole[found]).mean() >= 0.999


def test_a_subset_absent_from_the_ct_gives_an_empty_label_map_and_says_so(demo_task, tmp_path):
    """A coarse model that finds only background (its background logit raised far above the rest) finds no lung."""
    folder = write_example_model(tmp_path, "tiny", names=["left lung", "right lung", "ribs"])
    checkpoint_file = folder / "fold_0" / CHECKPOINT_NAME
    checkpoint = torch.load(checkpoint_file, weights_only=False)
    head = max(k for k in checkpoint["network_weights"] if k.startswith("decoder.seg_layers.") and k.endswith(".bias"))
    checkpoint["network_weights"][head][0] = 1e4
    torch.save(checkpoint, checkpoint_file)
    fine = TaskSegmenter([demo_task._members[0].folder], device="cpu", coarse=TaskSegmenter([folder], device="cpu"))
    result = fine.segment(chest_sample().ct, subset=["left lung"])
    assert result.labels.shape == chest_sample().ct.array.shape and not result.labels.any()
    assert [s.name for s in result.segments] == ["left lung"]
    assert any("found none of left lung" in note and "--no-crop" in note for note in result.warnings)


def test_without_a_coarse_task_a_subset_runs_on_the_whole_ct(demo_task):
    plain = TaskSegmenter([demo_task._members[0].folder], device="cpu")
    result = plain.segment(chest_sample().ct, subset=["left lung"])
    assert not any("segmented inside" in note for note in result.warnings)


def test_boxes_keep_a_margin_within_the_volume_and_a_patch_on_the_model_grid():
    volume = Volume(np.zeros((10, 40, 40)), np.diag([2.0, 2.0, 5.0, 1.0]))  # i, j 2 mm, k 5 mm
    found = np.zeros((10, 40, 40), dtype=bool)
    found[0, 20, 39] = True  # at an edge: the margin stops at the volume
    box = bounding_box(found, volume, margin_mm=10)
    assert box == Box((0, 15, 34), (3, 26, 40))
    assert bounding_box(np.zeros_like(found), volume) is None
    small, factors = decimated(Volume(np.zeros((20, 80, 80)), np.diag([0.5, 0.5, 1.0, 1.0])), 2.0)
    assert factors == (2, 4, 4) and small.array.shape == (10, 20, 20)
    assert np.allclose(small.spacing, [2.0, 2.0, 2.0])
    region = box.region(volume)
    assert model_grid_box(region, (10, 40, 40), (4, 4, 4)) == (slice(0, 4), slice(15, 26), slice(34, 40))  # k grown


def test_totalsegmentator_tasks_are_located_by_the_6mm_model_when_it_is_installed(ts_home):
    write_totalsegmentator_task(ts_home, "fast", divisor=8)
    variants = catalogue(weights_roots=[ts_home])
    alone = SafeTask(choose_model("fast", devices=[CPU], variants=variants), variants, [CPU])
    assert alone.task.coarse is None  # no 6 mm model: a subset runs on the whole CT
    write_totalsegmentator_task(ts_home, "fastest", divisor=8)
    variants = catalogue(weights_roots=[ts_home])
    located = SafeTask(choose_model("fast", devices=[CPU], variants=variants), variants, [CPU])
    assert located.task.coarse is not None and "liver" in {s.name for s in located.task.coarse.segments}
    fastest = SafeTask(choose_model("fastest", devices=[CPU], variants=variants), variants, [CPU])
    assert fastest.task.coarse is None  # the 6 mm task itself is not located again
