"""The one batch loop: a bad input or output is skipped, a cancel ends the batch, a task or memory error
stops it with the item named; the CLI on real files (demo model, CPU) behaves the same."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from TuckerSegmentLib.cli import main
from TuckerSegmentLib.errors import (NotEnoughMemoryError, OutputPathError, SegmentationCancelled, TaskError,
                                     VolumeError)
from TuckerSegmentLib.segment.batch import item_progress, segment_batch
from TuckerSegmentLib.variants import guard

FAILURES = {"bad": VolumeError("bad is not a CT"), "full": OutputPathError("disk full"),
            "stop": SegmentationCancelled("segmentation cancelled"), "task": TaskError("no model for this task"),
            "memory": NotEnoughMemoryError("out of GPU memory, nothing smaller")}


def work(name, progress):
    progress(0.5, "half")
    if name in FAILURES:
        raise FAILURES[name]
    return f"{name}.seg.nrrd", "7 segments"


def test_bad_inputs_and_outputs_are_skipped_and_the_rest_go_on():
    heard, reports = [], []
    items = segment_batch(["a", "bad", "full", "b"], work, progress=lambda f, m: reports.append((f, m)),
                          done=heard.append)
    assert [(i.source, i.output, i.message, i.ok) for i in items] == [
        ("a", "a.seg.nrrd", "7 segments", True), ("bad", None, "bad is not a CT", False),
        ("full", None, "disk full", False), ("b", "b.seg.nrrd", "7 segments", True)]
    assert heard == items
    assert reports == [(0.125, "1/4 a: half"), (0.375, "2/4 bad: half"), (0.625, "3/4 full: half"),
                       (0.875, "4/4 b: half")]


def test_a_cancel_ends_the_batch_after_the_items_done():
    items = segment_batch(["a", "stop", "b"], work)
    assert [(i.source, i.ok) for i in items] == [("a", True), ("stop", False)]
    assert items[1].message == "segmentation cancelled"


@pytest.mark.parametrize("failing", ["task", "memory"])
def test_a_task_or_memory_error_stops_the_batch_naming_the_item(failing):
    heard = []
    with pytest.raises(type(FAILURES[failing])) as raised:
        segment_batch(["a", "bad", failing, "b"], work, name=str.upper, done=heard.append)
    assert str(raised.value) == (f"{failing.upper()}: {FAILURES[failing]} (batch stopped after 2 of 4 inputs; "
                                 "the ones done are kept)")
    assert [i.source for i in heard] == ["a", "bad"]  # "b" never ran


def test_item_progress_without_a_listener_is_silent():
    item_progress(None, 0, 1, "x")(0.5, "half")  # no error, nothing to call


def test_cli_stops_a_batch_when_memory_runs_out_and_writes_nothing_more(tmp_path, monkeypatch, capsys):
    ct = tmp_path / "ct.nii.gz"
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(-500, 300, (20, 40, 40)).astype(np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(image, str(ct))
    other = tmp_path / "other.nii.gz"
    sitk.WriteImage(image, str(other))
    monkeypatch.setattr(guard, "system_memory", lambda: (8 << 30, 1 << 20))  # 1 MiB of RAM free
    out = tmp_path / "out"
    assert main(["segment", str(ct), str(other), str(out), "--task", "demo", "--device", "cpu", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "ct.nii.gz: chest-demo-tucker-balanced needs about" in error and "too little even in slabs" in error
    assert "batch stopped after 0 of 2 inputs" in error
    assert not out.exists() or list(out.iterdir()) == []
