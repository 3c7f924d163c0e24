"""The worker process and its protocol without Slicer: answers, errors by class, hostile input (option
values, request lines of any size, nesting, id or args, a second request while one is in hand, segment files,
voxel files, answers), stdout kept for the protocol, idle exit and restart, clean exits."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import process_ended
from TuckerSegmentLib.errors import ModelFolderError, OutputPathError, TuckerSegmentError, VolumeError
from TuckerSegmentLib.segment.labels import SegmentLabel, Terminology
from TuckerSegmentLib.worker import protocol
from TuckerSegmentLib.worker.client import DONE, FAILED, ENGINE_FOLDER, WorkerClient, worker_command, worker_environment
from TuckerSegmentLib.worker.process import SubprocessChild


def client(idle_seconds: float | None = None) -> WorkerClient:
    return WorkerClient(SubprocessChild, *worker_command(idle_seconds=idle_seconds))


def test_answers_carry_results_and_errors_by_class_and_the_worker_goes_on(tmp_path):
    (tmp_path / "v.npz").touch()  # the model is what is missing
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


def strict(line: bytes) -> dict[str, Any]:
    """A protocol line read as strict JSON (NaN and infinities are not JSON) that fits the protocol's line limit."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")
    message = json.loads(line, parse_constant=refuse)
    assert isinstance(message, dict) and len(line.rstrip(b"\n")) <= protocol.MAX_LINE
    return message


def talk(tmp_path: Path, lines: list[bytes], answers: int, *options: str,
         close: bool = True) -> tuple[list[dict[str, Any]], str, int | None]:
    """Run a worker on ``lines``: wait for its ready line and ``answers`` more, then close its stdin (``close``) or let
    it end by itself. (Everything it wrote, each line strict JSON; its stderr; its exit code.)"""
    errors, messages = tmp_path / "worker stderr.txt", []
    with errors.open("wb") as sink, subprocess.Popen([sys.executable, "-m", "TuckerSegmentLib.worker", *options],
                                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=sink,
                                                     env=worker_environment(), cwd=ENGINE_FOLDER) as run:
        timer = threading.Timer(120, run.kill)  # a worker that hangs fails the test rather than stalling it
        timer.start()
        try:
            run.stdin.write(b"".join(lines))
            run.stdin.flush()
            while len(messages) <= answers and (line := run.stdout.readline()):
                messages.append(strict(line))
            if close:
                run.stdin.close()
            messages += [strict(line) for line in run.stdout]
            run.wait()
        finally:
            timer.cancel()
            run.kill()
    return messages, errors.read_text(), run.returncode


def request(ident: Any, command: str = "status", **fields: Any) -> bytes:
    """One request line (NaN and infinities written as a hostile client would)."""
    return json.dumps({"id": ident, "command": command, **fields}).encode() + b"\n"


DEEP = b"[" * 100_000 + b"]" * 100_000 + b"\n"
SLOW = request(1, args={"machine": True})  # imports torch to find the devices: seconds


def test_a_deeply_nested_line_is_one_error_answer_and_the_worker_goes_on(tmp_path):
    messages, errors, code = talk(tmp_path, [DEEP, request(3)], 2)
    assert messages[1]["id"] is None and messages[1]["error"]["type"] == "ProtocolError"
    assert messages[1]["error"]["message"].startswith("the worker got a request nested too deeply to read; ")
    assert messages[2]["id"] == 3 and messages[2]["result"]["loads"] == 0
    assert code == 0 and len(messages) == 3 and "Fatal Python error" not in errors


def test_args_that_are_not_an_object_are_refused_in_one_line_naming_them(tmp_path):
    wrong = [[1, 2], 5, "machine", None, True]
    lines = [request(ident, "segment" if ident % 2 else "status", args=args) for ident, args in enumerate(wrong, 1)]
    messages, errors, code = talk(tmp_path, [*lines, request(9)], len(wrong) + 1)
    for ident, message in enumerate(messages[1:-1], 1):
        assert message["id"] == ident and message["error"]["type"] == "ProtocolError"
        assert message["error"]["message"].startswith("args must be a JSON object") and "\n" not in message["error"]["message"]
    assert messages[-1]["id"] == 9 and "result" in messages[-1]
    assert code == 0 and "Traceback" not in errors


def test_request_ids_must_be_a_number_or_a_short_string_and_every_answer_is_strict_json(tmp_path):
    nested: Any = 0
    for _ in range(300):
        nested = {"id": nested}
    bad = [float("nan"), float("inf"), -float("inf"), True, False, 1.5, 2 ** 70, "x" * 65, [1], nested]
    messages, _, code = talk(tmp_path, [*(request(ident) for ident in bad), request("job-7")], len(bad) + 1)
    for message in messages[1:-1]:
        assert message["id"] is None and message["error"]["message"].startswith("a request's id must be ")
        assert len(message["error"]["message"]) < 200  # a huge id is not echoed
    assert messages[-1]["id"] == "job-7" and "result" in messages[-1] and code == 0
    with pytest.raises(protocol.ProtocolError, match="strict JSON"):
        protocol.encode({"id": 1, "fraction": float("nan")})
    with pytest.raises(protocol.ProtocolError, match="longer than"):
        protocol.encode({"id": 1, "message": "x" * protocol.MAX_LINE})


def test_a_line_longer_than_the_protocol_allows_is_refused_unread_and_the_worker_goes_on(tmp_path):
    def padded(ident: int, size: int) -> bytes:
        """A status request line of ``size`` bytes before its newline."""
        line = request(ident, args={"pad": ""})
        return line[:-4] + b"x" * (size - len(line) + 1) + line[-4:]
    lines = [padded(4, protocol.MAX_LINE), padded(5, protocol.MAX_LINE + 1), padded(6, 3 * protocol.MAX_LINE + 5), request(7)]
    messages, errors, code = talk(tmp_path, lines, 4)
    assert messages[1]["id"] == 4 and "result" in messages[1]  # as long as a line may be
    for message in messages[2:4]:
        assert message["id"] is None and message["error"]["type"] == "ProtocolError"
        assert message["error"]["message"].startswith(f"the worker got a request line longer than {protocol.MAX_LINE} bytes")
    assert messages[4]["id"] == 7 and "result" in messages[4] and len(messages) == 5 and code == 0


def test_a_request_while_another_is_in_hand_is_refused_at_once(tmp_path):
    messages, _, code = talk(tmp_path, [SLOW, request(2)], 3)
    busy = {"id": 2, "error": {"type": "TuckerSegmentError",
                               "message": "the worker is busy with request 1; wait for it or cancel it"}}
    results = [index for index, message in enumerate(messages) if "result" in message]
    assert busy in messages and [messages[i]["id"] for i in results] == [1] and messages.index(busy) < results[0]
    assert code == 0


def test_an_error_answer_always_fits_a_protocol_line(tmp_path):
    field = "f" * (protocol.MAX_LINE - 100)  # the error names the unknown field, then every known one
    messages, _, code = talk(tmp_path, [request(1, "segment", args={field: 1})], 1)
    assert messages[1]["id"] == 1 and messages[1]["error"]["message"].startswith("a segment request has no field fff")
    assert code == 0


def test_segment_files_are_checked_before_any_model_loads(tmp_path):
    from TuckerSegmentLib.paths import BUNDLED_MODELS
    protocol.save_volume(tmp_path / "v.npz", np.random.default_rng(0).integers(-1000, 1000, (8, 8, 8), np.int16), np.eye(4))
    volume, labels = str(tmp_path / "v.npz"), str(tmp_path / "l.npy")
    cases = [({"volume": volume, "labels": str(tmp_path / "no folder" / "l.npy")}, OutputPathError,
              "^labels must name a file in an existing folder, not .*no folder"),
             ({"volume": volume, "labels": str(tmp_path)}, OutputPathError, "^labels must name a file"),
             ({"volume": str(tmp_path / "none.npz"), "labels": labels}, VolumeError, "^volume .*none.npz does not exist"),
             ({"volume": 5, "labels": labels}, TuckerSegmentError, "^volume must be the path of a file"),
             ({"volume": volume}, TuckerSegmentError, "^labels must be the path of a file")]
    worker = client()
    try:
        for files, kind, message in cases:
            with pytest.raises(kind, match=message):
                worker.run("segment", {**files, "model": [str(BUNDLED_MODELS / "chest-demo")], "device": "cpu"})
        assert worker.run("status", {})["loads"] == 0 and worker.starts == 1
    finally:
        worker.shutdown()


HOSTILE = [DEEP, request(2, args=[1]), request(float("nan")), b"x" * (protocol.MAX_LINE + 10) + b"\n", SLOW,
           request(3), b"not json\n"]
ENDINGS = {"an idle timeout": ([], 0, ("--idle-seconds", "0.5"), False),
           "stdin closed while idle": ([request(1)], 1, (), True),
           "stdin closed mid-request": ([SLOW], 1, (), True),  # once it said it works on it
           "hostile lines": (HOSTILE, len(HOSTILE) + 1, (), True)}  # each answered, and the slow one's progress


@pytest.mark.parametrize("ending", ENDINGS)
def test_a_worker_ends_cleanly_after(ending, tmp_path):
    lines, answers, options, close = ENDINGS[ending]
    messages, errors, code = talk(tmp_path, lines, answers, *options, close=close)
    assert len(messages) == answers + 1  # its ready line too, and nothing after the slow request it was told to drop
    assert code == 0 and "Fatal Python error" not in errors and "Traceback" not in errors, errors


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
        with pytest.raises(TuckerSegmentError):  # a request that cannot travel (NaN is not JSON) starts no job
            worker.submit("status", {"machine": float("nan")})
        assert not worker.busy and worker.submit("status", {}).wait(60) == DONE
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
