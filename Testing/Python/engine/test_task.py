"""Tasks of several models: labels merged by structure, models that hold no requested structure skipped."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import bundled, renamed_copy
from TuckerSegmentLib.errors import TaskError
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.segment.task import TaskSegmenter
from TuckerSegmentLib.testing.demo_data import chest_sample


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> list[Path]:
    first = bundled("chest-demo-tucker-0.7")
    return [first, renamed_copy(first, tmp_path_factory.mktemp("task") / "second", "copy ")]


@pytest.fixture(scope="module")
def ct():
    return chest_sample().ct


def test_labels_of_two_models_are_merged_with_one_value_per_structure(two_models, ct):
    task = TaskSegmenter(two_models, device="cpu")
    assert [s.value for s in task.segments] == list(range(1, 15))
    assert [s.name for s in task.segments][7:9] == ["copy ribs", "copy cervical vertebral column"]
    alone = Segmenter(two_models[0], device="cpu").segment(ct).labels
    result = task.segment(ct)
    # both models predict the same voxels; the second (same weights, renamed) overwrites with values 8..14
    assert np.array_equal(result.labels, np.where(alone > 0, alone + 7, 0))
    assert task.loaded() == [True, True]
    assert result.policy == "UniformPolicy(factor=0.7, rank_min=8); UniformPolicy(factor=0.7, rank_min=8)"


def test_subset_runs_only_the_models_that_hold_a_requested_structure(two_models, ct):
    task = TaskSegmenter(two_models, device="cpu")
    messages = []
    result = task.segment(ct, progress=lambda f, m: messages.append(m), subset=["left lung", "ribs"])
    assert task.loaded() == [True, False]  # the second model was never loaded
    assert [s.name for s in result.segments] == ["ribs", "left lung"]
    assert set(np.unique(result.labels)) <= {0, 1, 6} and (result.labels == 6).sum() > 1000
    assert not any(m.startswith("model 2") for m in messages)
    result = task.segment(ct, subset=["copy tissue"])
    assert task.loaded() == [True, True]
    assert set(np.unique(result.labels)) == {0, 14}


def test_task_refuses_unknown_structures_and_duplicate_names(two_models, ct):
    task = TaskSegmenter(two_models, device="cpu")
    with pytest.raises(TaskError, match="unknown structure.*liver.*this model segments: ribs"):
        task.segment(ct, subset=["liver"])
    assert task.loaded() == [False, False]
    with pytest.raises(TaskError, match="'ribs' is segmented by two models"):
        TaskSegmenter([two_models[0], two_models[0]])
