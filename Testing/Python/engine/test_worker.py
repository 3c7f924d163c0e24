"""The worker process and its protocol without Slicer: answers, errors by class, hostile input (option
values, request lines, voxel files, answers), stdout kept for the protocol, idle exit and restart."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import process_ended
from TuckerSegmentLib.errors import ModelFolderError, TuckerSegmentError, VolumeError
from TuckerSegmentLib.segment.labels import SegmentLabel, Terminology
from TuckerSegmentLib.worker import protocol
from TuckerSegmentLib.worker.client import DONE, FAILED, ENGINE_FOLDER, WorkerClient, worker_command, worker_environment
from TuckerSegmentLib.worker.process import SubprocessChild


def client(idle_seconds: float | None = None) -> WorkerClient:
    return WorkerClient(SubprocessChild, *worker_command(idle_seconds=idle_seconds))


def test_answers_carry_results_and_errors_by_class_and_the_worker_goes_on(tmp_path):
    worker = client()
    try:
        status = worker.run("status", {})
        assert status["loads"] == 0 and status["pid"] == worker.worker_pid
        with pytest.raises(TuckerSegmentError, match="^the worker has no command 'format_disk'$"):
            worker.run("format_disk", {})
        with pytest.raises(ModelFolderError, match="does not exist"):
            worker.run("segment", {"volume": str(tmp_path / "v.npz"), "labels": str(tmp_path / "l.npy"),
                                   "model": [str(tmp_path / "no model")], "device": "cpu"})
        with pytest.raises(TuckerSegmentError, match="^crop must be true or false, not 'yes'$"):  # before any load
            worker.run("segment", {"volume": str(tmp_path / "v.npz"), "labels": str(tmp_path / "l.npy"),
                                   "model": [str(tmp_path / "no model")], "crop": "yes"})
        job = worker.submit("compress", {"source": str(tmp_path / "none"), "output": str(tmp_path / "out")})
        assert job.wait(60) == FAILED and isinstance(job.error, ModelFolderError)
        assert worker.run("status", {})["pid"] == status["pid"] and worker.starts == 1  # one process throughout
    finally:
        worker.shutdown()
    assert not worker.alive()


def test_hostile_request_lines_get_an_error_answer_and_library_prints_never_reach_the_protocol():
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.worker"], input=b'not json\n{"id": 1}\n[]\n'
                         b'{"id": 2, "command": "status", "args": {}}\n', capture_output=True, timeout=120,
                         env=worker_environment(), cwd=ENGINE_FOLDER)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.decode().splitlines()
    messages = [protocol.decode(line) for line in lines]
    assert all(messages) and len(messages) == 5  # ready, three refusals, one answer: nothing else on stdout
    assert messages[0]["event"] == protocol.READY
    assert [m["error"]["message"] for m in messages[1:4]] == [
        "the worker got a request that is not JSON with id and command"] * 3
    assert messages[4] == {"id": 2, "result": {"pid": messages[0]["pid"], "loads": 0, "version": messages[0]["version"]}}


@pytest.mark.parametrize("value", ["0", "-5", "soon", "nan"])
def test_a_bad_idle_option_is_refused_in_one_line(value):
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.worker", "--idle-seconds", value], input="",
                         capture_output=True, text=True, timeout=60, env=worker_environment(), cwd=ENGINE_FOLDER)
    assert run.returncode == 2 and "--idle-seconds" in run.stderr.strip().splitlines()[-1]


def test_an_idle_worker_exits_by_itself_and_the_next_request_starts_another():
    worker = client(idle_seconds=1)
    try:
        first = worker.run("status", {})["pid"]
        deadline = time.monotonic() + 30
        while worker.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not worker.alive()
        assert worker.run("status", {})["pid"] != first and worker.starts == 2
    finally:
        worker.shutdown()


def test_voxel_files_hold_arrays_only_and_labels_must_fit_the_volume(tmp_path):
    voxels, matrix = np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.diag([0.5, 0.5, 2.0, 1.0])
    protocol.save_volume(tmp_path / "v.npz", voxels, matrix)
    read, read_matrix = protocol.load_volume(tmp_path / "v.npz")
    assert np.array_equal(read, voxels) and read.dtype == np.int16 and np.array_equal(read_matrix, matrix)
    np.savez(tmp_path / "pickled.npz", voxels=np.array([object()], dtype=object), ijk_to_ras=matrix)
    with pytest.raises(ValueError, match="allow_pickle"):
        protocol.load_volume(tmp_path / "pickled.npz")
    np.savez(tmp_path / "flat.npz", voxels=np.zeros(5), ijk_to_ras=matrix)
    with pytest.raises(protocol.ProtocolError, match="does not hold a 3D volume"):
        protocol.load_volume(tmp_path / "flat.npz")
    protocol.save_labels(tmp_path / "l.npy", np.ones((2, 3, 4), np.uint8))
    assert protocol.load_labels(tmp_path / "l.npy", (2, 3, 4)).sum() == 24
    for shape in ((2, 3, 5), (24,)):
        with pytest.raises(protocol.ProtocolError, match="do not fit the volume"):
            protocol.load_labels(tmp_path / "l.npy", shape)
    protocol.save_labels(tmp_path / "f.npy", np.ones((2, 3, 4), np.float32))
    with pytest.raises(protocol.ProtocolError):
        protocol.load_labels(tmp_path / "f.npy", (2, 3, 4))


def test_segments_and_errors_travel_as_json_and_unknown_error_names_stay_generic():
    right = Terminology("ctx", ("SCT", "123037004", "Anatomical Structure"), ("SCT", "39607008", "Lung"),
                        ("SCT", "24028007", "Right"))
    segments = [SegmentLabel(5, "right lung", (0.5, 0.25, 1.0), right), SegmentLabel(7, "tissue", (0, 0, 0), None)]
    assert protocol.segments_from_json(protocol.segments_to_json(segments)) == segments
    with pytest.raises(protocol.ProtocolError, match="no RGB colour"):
        protocol.segments_from_json([{"value": 1, "name": "x", "color": [1, "nan", 0], "terminology": None}])
    assert isinstance(protocol.error_from_json(protocol.error_to_json(VolumeError("empty"))), VolumeError)
    assert str(protocol.error_from_json(protocol.error_to_json(KeyError("k")))) == "KeyError: 'k'"
    for name in ("Path", "__builtins__", "Interrupted", "Exception", None):
        error = protocol.error_from_json({"type": name, "message": "m"})
        assert type(error) is TuckerSegmentError and str(error) == "m"


def test_only_protocol_lines_are_messages():
    assert protocol.decode(protocol.encode({"id": 1, "fraction": 0.5})) == {"id": 1, "fraction": 0.5}
    for line in (b"", b"Loading checkpoint...\n", b"[1, 2]\n", b"{broken\n", b"{" + b" " * protocol.MAX_LINE + b"}\n"):
        assert protocol.decode(line) is None


def test_a_job_that_is_not_finished_has_no_outcome_and_a_busy_worker_takes_no_second_job():
    worker = client()
    try:
        job = worker.submit("status", {})
        with pytest.raises(TuckerSegmentError, match="has not finished"):
            job.outcome()
        with pytest.raises(TuckerSegmentError, match="still busy with the status"):
            worker.submit("status", {})
        assert job.wait(60) == DONE
    finally:
        worker.shutdown()


def test_a_python_that_cannot_start_is_one_clear_error(tmp_path):
    missing = str(tmp_path / "no-python")
    children = [SubprocessChild]
    qtcore = pytest.importorskip("PySide6.QtCore")
    qtcore.QCoreApplication.instance() or qtcore.QCoreApplication([])
    from TuckerSegmentLib.worker.process import qt_child_factory
    children.append(qt_child_factory(qtcore.QProcess))
    for child in children:
        worker = WorkerClient(child, missing, ["-m", "TuckerSegmentLib.worker"])
        with pytest.raises(TuckerSegmentError, match=f"^could not start {missing}: "):
            worker.run("status", {})
        assert not worker.busy


def test_a_cache_file_changed_in_place_reaches_the_panel_as_a_notice(tmp_path, monkeypatch):
    """The worker's segment answer names a cached OpenVINO file that failed its check (and was rebuilt)."""
    from TuckerSegmentLib.image.volume import read_volume
    from TuckerSegmentLib.paths import BUNDLED_MODELS
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))  # the worker inherits it
    volume = read_volume(BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd")
    protocol.save_volume(tmp_path / "v.npz", volume.array, volume.ijk_to_ras)
    request = {"volume": str(tmp_path / "v.npz"), "labels": str(tmp_path / "l.npy"), "device": "cpu",
               "model": [str(BUNDLED_MODELS / "chest-demo")], "runtime": "openvino"}
    answers = []
    for damage in (False, True):
        if damage:
            blob = next((tmp_path / "cache" / "openvino").glob("*/f32-*.blob"))
            data = bytearray(blob.read_bytes())
            data[len(data) // 2] ^= 0xFF
            blob.write_bytes(bytes(data))
        worker = client()
        try:
            answers.append(worker.run("segment", dict(request)))
            answers[-1]["labels"] = protocol.load_labels(tmp_path / "l.npy", volume.array.shape)
        finally:
            worker.shutdown()
    clean, rebuilt = answers
    assert not any("OpenVINO cache" in notice for notice in clean["notices"])
    assert [n for n in rebuilt["notices"] if "OpenVINO cache" in n] == [
        f"the OpenVINO cache's {blob} changed since it was written (sha256 mismatch); it is not used: building it again"]
    assert np.array_equal(rebuilt["labels"], clean["labels"])


LAUNCHER = Path(__file__).resolve().parents[1] / "launcher_stand_in.py"
CLIENT_SCRIPT = """
import sys, time
from TuckerSegmentLib.worker.client import WorkerClient, worker_command
from TuckerSegmentLib.worker.process import SubprocessChild
program, arguments = worker_command()
client = WorkerClient(SubprocessChild, sys.executable, [{launcher!r}, program, *arguments])
print(client.run("status", {{}})["pid"], client._child.pid(), flush=True)
{then}
"""


def gone_within(pid: int, seconds: float) -> bool:
    """Whether process ``pid`` ends within ``seconds``."""
    deadline = time.monotonic() + seconds
    while not process_ended(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.mark.parametrize("then, ends", [
    ("client.shutdown()", "the client closes it (module exit)"),
    ("time.sleep(600)", "the client's process is killed with SIGKILL"),
    ("client.submit('status', {}); client._child.terminate(); time.sleep(600)", "the launcher alone is terminated"),
])
def test_a_worker_under_a_launcher_leaves_no_process_behind_when(then, ends, tmp_path):
    run = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT.format(launcher=str(LAUNCHER), then=then)],
                           stdout=subprocess.PIPE, text=True, env=worker_environment())
    worker_pid, launcher_pid = map(int, run.stdout.readline().split())
    assert worker_pid != launcher_pid  # the worker is the launcher's child, as in an installed Slicer
    if "SIGKILL" in ends:
        run.kill()
    try:
        assert gone_within(worker_pid, 5.0), f"the worker outlived {ends}"
        assert gone_within(launcher_pid, 5.0), f"the launcher outlived {ends}"
    finally:
        run.kill()
        run.wait()


def test_a_variable_set_after_start_reaches_the_next_worker(tmp_path, monkeypatch):
    from TuckerSegmentLib.image.volume import read_volume
    from TuckerSegmentLib.paths import BUNDLED_MODELS
    volume = read_volume(BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd")
    protocol.save_volume(tmp_path / "v.npz", volume.array, volume.ijk_to_ras)
    startup = {key: value for key, value in os.environ.items() if key != "TUCKERSEGMENT_CACHE"}  # as Slicer started
    worker = WorkerClient(SubprocessChild, *worker_command(), startup)
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "set later"))  # e.g. by a script in Slicer's console
    try:
        worker.run("segment", {"volume": str(tmp_path / "v.npz"), "labels": str(tmp_path / "l.npy"), "device": "cpu",
                               "model": [str(BUNDLED_MODELS / "chest-demo")], "runtime": "openvino"})
    finally:
        worker.shutdown()
    assert any((tmp_path / "set later" / "openvino").iterdir())  # the worker used the cache the variable names


def test_a_poll_that_fails_or_a_wait_that_times_out_ends_the_job_and_leaves_a_usable_worker(monkeypatch):
    worker = client()
    try:
        first_pid = worker.run("status", {})["pid"]
        job = worker.submit("status", {})
        monkeypatch.setattr(worker._child, "read_output", lambda: (_ for _ in ()).throw(OSError("pipe broke")))
        assert job.poll() == FAILED and str(job.error) == "pipe broke"  # the error is the job's, shown by the panel
        assert not worker.busy
        assert worker.run("status", {})["pid"] != first_pid  # a new worker answers; nothing is "still busy"
        slow = worker.submit("status", {})
        monkeypatch.setattr(worker._child, "read_output", lambda: b"")  # the answer never arrives
        assert slow.wait(0.5) == FAILED and str(slow.error) == "the status did not finish within 0.5 s; it was stopped"
        assert worker.run("status", {})["loads"] == 0 and worker.starts == 3
    finally:
        worker.shutdown()
