"""The Logic's worker process on real MRML (slicer-core), started through ``subprocess`` and through Qt's
QProcess (PySide6's, the class Slicer's ``qt.QProcess`` wraps): progress while the main thread only polls
(as the panel's timer does), Cancel mid-tile, a worker killed from outside, the live worker reused with
its model loaded, one model load for a console batch."""
from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import headless_slicer
import pytest
from conftest import process_ended
from test_slicer_logic import CT_PATH, node_ids, snapshot
from TuckerSegmentLib.errors import SegmentationCancelled, TuckerSegmentError
from TuckerSegmentLib.worker.client import CANCELLED, DONE, FAILED, RUNNING

headless_slicer.setup()
import TuckerSegment  # noqa: E402
from TuckerSegmentModule.Logic import TEMPORARY_PREFIX  # noqa: E402

CHILDREN = ["subprocess", "qprocess", "launcher"]
LAUNCHER = Path(__file__).resolve().parents[1] / "launcher_stand_in.py"


def launcher_python(folder: Path) -> str:
    """A ``python`` for the Logic that runs like an installed Slicer's PythonSlicer: a launcher whose child is the
    real Python (``launcher_stand_in.py``)."""
    script = folder / "PythonSlicer"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {LAUNCHER} {sys.executable} \"$@\"\n")
    script.chmod(0o755)
    return str(script)


@pytest.fixture(params=CHILDREN)
def worker(request, tmp_path):
    """(Logic with its own worker started the given way, the event pump a GUI would run)."""
    from TuckerSegmentLib.worker.process import SubprocessChild, qt_child_factory
    if request.param == "subprocess":
        logic, pump = TuckerSegment.TuckerSegmentLogic(childFactory=SubprocessChild), (lambda: None)
    elif request.param == "launcher":
        logic = TuckerSegment.TuckerSegmentLogic(childFactory=SubprocessChild, python=launcher_python(tmp_path))
        pump = lambda: None  # noqa: E731
    else:
        qtcore = pytest.importorskip("PySide6.QtCore")
        app = qtcore.QCoreApplication.instance() or qtcore.QCoreApplication([])
        logic, pump = TuckerSegment.TuckerSegmentLogic(childFactory=qt_child_factory(qtcore.QProcess)), app.processEvents
    yield logic, pump
    logic.shutdownWorker()


def poll(job, pump, until=lambda job: False, timeout: float = 600) -> list[tuple[float, str]]:
    """What the panel's timer does: poll the job, let the event loop run, never wait on the worker; stops
    when the job ends or ``until(job)``. Returns the (fraction, message) pairs seen."""
    seen, deadline = [], time.monotonic() + timeout
    while job.poll() == RUNNING and not until(job) and time.monotonic() < deadline:
        if not seen or seen[-1] != job.progress():
            seen.append(job.progress())
        pump()
        time.sleep(0.02)
    return seen


def temporary_folders() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob(TEMPORARY_PREFIX + "*")}


def alive(pid: int) -> bool:
    return not process_ended(pid)


def test_progress_arrives_while_polling_and_a_second_run_reuses_the_live_worker(worker, scene, ct_node):
    logic, pump = worker
    other = headless_slicer.load_volume(CT_PATH, "CT again")
    timings = []
    for volume in (ct_node, other):
        started = time.perf_counter()
        job = logic.startSegmentation(volume, task="demo", device="cpu")
        seen = poll(job, pump)
        assert job.state == DONE, job.error
        node = logic.finishSegmentation(job)
        timings.append((time.perf_counter() - started, dict(logic.lastRun)))
        assert node.GetSegmentation().GetNumberOfSegments() == 7
        messages = [m for _, m in seen]
        assert any(m.startswith("tile 1/") for m in messages) and any(m.startswith("tile 2/") for m in messages)
        fractions = [f for f, _ in seen]
        assert fractions == sorted(fractions) and len(set(fractions)) >= 3
    (first, run1), (second, run2) = timings
    assert logic.worker().starts == 1 and run1["loads"] == run2["loads"] == 1  # one process, one model load
    assert run1["load_seconds"] > 0 and run2["load_seconds"] == 0
    assert second < first - 0.5 * run1["load_seconds"], timings  # the second run did not pay for loading


def test_cancel_mid_tile_ends_the_worker_within_two_seconds_and_leaves_nothing(worker, scene, ct_node, dataset291_model):
    logic, pump = worker
    folders, before = temporary_folders(), snapshot(scene)
    job = logic.startSegmentation(ct_node, model=[str(dataset291_model)], device="cpu")  # TotalSegmentator-size tiles
    poll(job, pump, until=lambda job: job.message.startswith("tile "), timeout=300)
    assert job.state == RUNNING and job.message.startswith("tile "), job.message
    pid = logic.worker().worker_pid
    time.sleep(0.3)  # inside the next tile's forward pass
    cancelled = time.perf_counter()
    job.cancel()
    poll(job, pump, timeout=10)
    assert job.state == CANCELLED and time.perf_counter() - cancelled < 2.0
    while alive(pid) and time.perf_counter() - cancelled < 2.0:  # a process of some GB takes a moment to go
        time.sleep(0.02)
    assert not alive(pid)  # the worker itself, also when a launcher started it
    with pytest.raises(SegmentationCancelled):
        logic.finishSegmentation(job)
    assert snapshot(scene) == before and temporary_folders() == folders


KILLED = {"subprocess": r"\(SIGKILL; out of memory is the usual cause\)", "qprocess": r"\(SIGKILL; out of memory is the usual cause\)",
          "launcher": r"\(by a signal its launcher does not name; out of memory is the usual cause\)"}


def test_a_worker_killed_from_outside_is_a_clear_error_and_the_next_run_starts_a_new_one(worker, scene, ct_node,
                                                                                          request):
    logic, pump = worker
    killed = KILLED[request.node.callspec.params["worker"]]
    node = logic.segment(ct_node, task="demo", device="cpu", subset=["ribs"])
    folders, before = temporary_folders(), snapshot(scene, node)
    job = logic.startSegmentation(ct_node, task="demo", device="cpu", segmentationNode=node)
    poll(job, pump, until=lambda job: job.message.startswith("tile "))
    os.kill(logic.worker().worker_pid, signal.SIGKILL)  # as the kernel's out-of-memory killer does
    poll(job, pump, timeout=10)
    assert job.state == FAILED
    with pytest.raises(TuckerSegmentError, match=rf"^the TuckerSegment worker process was killed {killed} before it "
                                                 "finished"):
        logic.finishSegmentation(job)
    assert snapshot(scene, node) == before and temporary_folders() == folders
    again = logic.segment(ct_node, task="demo", device="cpu", segmentationNode=node)
    assert again is node and node.GetSegmentation().GetNumberOfSegments() == 7
    assert logic.worker().starts == 2


def test_a_console_batch_over_three_volumes_loads_the_model_once(worker, scene, ct_node):
    logic, _ = worker
    volumes = [ct_node] + [headless_slicer.load_volume(CT_PATH, f"CT {n}") for n in (2, 3)]
    ids = node_ids(scene)
    outcomes = logic.segmentVolumeNodes(volumes, model="chest-demo", device="cpu", save=False)
    assert [o[3] for o in outcomes] == ["7 segments"] * 3
    assert logic.workerStatus()["loads"] == 1 and logic.worker().starts == 1
    assert len(node_ids(scene)) == len(ids) + 3 * 2  # a segmentation and its display node per volume


def test_variant_builds_run_in_the_worker_calibrated_and_measured_on_scene_volumes(tmp_path, monkeypatch, ct_node):
    from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task
    from TuckerSegmentLib.variants.catalogue import catalogue, find_variant
    from TuckerSegmentLib.worker.process import SubprocessChild
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "totalseg"))
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))  # the worker starts with this environment
    weights = tmp_path / "weights"
    write_totalsegmentator_task(weights, "fastest", divisor=8)
    logic = TuckerSegment.TuckerSegmentLogic(childFactory=SubprocessChild)
    try:
        with pytest.raises(TuckerSegmentError, match="^choose the variants to build"):
            logic.startVariantBuild([])
        with pytest.raises(TuckerSegmentError, match="^choose calibration volumes too"):
            logic.startVariantBuild(["fastest-tucker-0.5"], holdoutNodes=[ct_node])
        twin = headless_slicer.load_volume(CT_PATH, "CT twin")
        twin.SetName(ct_node.GetName())  # another node of the same name and scan
        job = logic.startVariantBuild(["fastest-tucker-0.5"], weightsFolder=weights, calibrationNodes=[ct_node],
                                      holdoutNodes=[twin])
        assert job.wait(120) == FAILED and "is the same CT as" in str(job.error)  # refused by content, not name
        job = logic.startVariantBuild(["fastest-tucker-9"], weightsFolder=weights)
        assert job.wait(120) == FAILED and "fastest-tucker-9" in str(job.error)
        import slicer
        slicer.util.arrayFromVolume(twin)[:] += 50  # same name, another scan: scored, not mistaken for the first
        slicer.util.arrayFromVolumeModified(twin)
        job = logic.startVariantBuild(["fastest-tucker-0.5"], weightsFolder=weights, calibrationNodes=[ct_node],
                                      holdoutNodes=[twin])
        messages = []
        job.on_progress = lambda fraction, message: messages.append(message)
        poll(job, lambda: None)
        assert job.state == DONE, job.error
        built = Path(job.outcome()["built"]["fastest-tucker-0.5"])
        assert built.is_relative_to(tmp_path / "cache") and messages[0] == "building fastest-tucker-0.5"
        variant = find_variant(catalogue(weights_roots=[weights]), "fastest-tucker-0.5")
        assert variant.availability == "built"
        assert variant.measured["how"] == "1 of your CTs never used for calibration"
        assert 0 <= variant.measured["mean_agreement"] <= 1 and variant.measured["speedup"] > 0
        assert any(m.startswith(f"measuring on CT ({twin.GetID()}) (1/1)") for m in messages)
        stages = [m for m in messages if " › " in m]  # each stage of the build, with its progress and time
        assert any("› compressing › decomposing: done in" in m for m in stages)
        assert any("measuring › segmenting with the original and the variant: 1/3" in m for m in stages)
    finally:
        logic.shutdownWorker()
