"""The caller's side of the worker process: start it, send a request, follow its progress by polling,
cancel it (terminate at once, kill after ``KILL_AFTER`` seconds), and turn a crash into a clear error.

Nothing here waits on the worker unless ``WorkerJob.wait`` is called (the Python console); Slicer's panel
polls ``WorkerJob.poll`` from a timer. The worker outlives a request with its model loaded; a worker that
died (crash, kill, idle timeout) is replaced by a new one on the next request.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import Cancelled, TuckerSegmentError
from .process import ChildProcess
from .protocol import READY, decode, encode, error_from_json

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"
KILL_AFTER = 5.0  # seconds a terminated worker gets before it is killed
ERROR_LINES = 6  # lines of the worker's stderr quoted when it dies
ENGINE_FOLDER = Path(__file__).resolve().parents[2]  # the folder holding TuckerSegmentLib


def worker_command(python: str | None = None, idle_seconds: float | None = None) -> tuple[str, list[str]]:
    """(program, arguments) that start a worker with ``python`` (default: this interpreter)."""
    arguments = ["-m", "TuckerSegmentLib.worker"]
    if idle_seconds is not None:
        arguments += ["--idle-seconds", str(idle_seconds)]
    return python or sys.executable, arguments


# Variables the engine and its dependencies read (the cache, TotalSegmentator's weights, nnU-Net's folders, the GPUs
# to use): the worker gets their current values, also when the rest of its environment is Slicer's startup one
# (SlicerTotalSegmentator, a user or a script may set them after Slicer started).
CURRENT_VARIABLES = ("TUCKERSEGMENT_", "TOTALSEG_", "nnUNet_", "XDG_CACHE_HOME", "CUDA_VISIBLE_DEVICES")


def worker_environment(base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default: the caller's environment) with the current values of ``CURRENT_VARIABLES``, the engine
    importable and output unbuffered."""
    environment = dict(os.environ if base is None else base)
    for key in [key for key in environment if key.startswith(CURRENT_VARIABLES) and key not in os.environ]:
        del environment[key]  # unset since
    environment.update({key: value for key, value in os.environ.items() if key.startswith(CURRENT_VARIABLES)})
    paths = [str(ENGINE_FOLDER)] + [p for p in environment.get("PYTHONPATH", "").split(os.pathsep) if p]
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


LAUNCHER_CRASH_CODE = 1  # what CTK's AppLauncher (PythonSlicer) exits with when the Python it started was killed


def _ended_message(code: int | None, errors: str, launched: bool = False) -> str:
    """Why the worker ended before it answered; ``launched``: its process was started by a launcher (the child we
    see), whose exit code is all that is left of a signal."""
    if launched and code == LAUNCHER_CRASH_CODE and "Traceback" not in errors:
        how = "was killed (by a signal its launcher does not name; out of memory is the usual cause)"
    elif code is not None and code < 0:
        try:
            how = f"was killed ({signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed (signal {-code}"
        how += "; out of memory is the usual cause)" if -code == getattr(signal, "SIGKILL", 9) else ")"
    else:
        how = f"stopped (exit code {code})"
    lines = [line for line in errors.strip().splitlines() if line.strip()][-ERROR_LINES:]
    last = ("; its last messages: " + " | ".join(lines)) if lines else ""
    return f"the TuckerSegment worker process {how} before it finished{last}"


class WorkerJob:
    """One request to the worker. ``poll()`` (or ``wait()``) moves it on; ``state`` is RUNNING until it is
    DONE (``result``), FAILED (``error``) or CANCELLED. ``on_end`` callbacks run once it has ended and the
    worker no longer works on it (for the caller's clean-up)."""

    def __init__(self, client: WorkerClient, ident: int, name: str) -> None:
        self.client, self.ident, self.name = client, ident, name
        self.state = RUNNING
        self.fraction, self.message = 0.0, "starting the worker"
        self.result: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.seconds: float | None = None
        self.cancelling_since: float | None = None
        self.on_end: list[Callable[[WorkerJob], None]] = []
        self.on_progress: Callable[[float, str], None] | None = None

    def progress(self) -> tuple[float, str]:
        return self.fraction, self.message

    def poll(self) -> str:
        """Move the job on; a poll that fails ends it with that error, its worker stopped (the next request starts
        a new one), so nothing stays busy for ever."""
        try:
            self.client.pump()
        except Exception as error:
            self.client.abandon(self, error)
        return self.state

    def wait(self, timeout: float | None = None, between: Callable[[], None] | None = None) -> str:
        """Pump until the job ends or ``timeout`` seconds pass; ``between()`` runs after each step (e.g. Qt's
        ``processEvents``). Returns the state."""
        return self.follow(between=between, timeout=timeout)

    def follow(self, progress: Callable[[float, str], None] | None = None, cancel: Callable[[], bool] | None = None,
               between: Callable[[], None] | None = None, timeout: float | None = None) -> str:
        """Wait for the job to end (the Python console's way): ``progress(fraction, message)`` gets each
        report, ``cancel()`` returning True stops the worker, and so does an error raised by ``progress``
        (re-raised once the worker has gone). After ``timeout`` seconds the job is stopped and fails saying so.
        Returns the state."""
        if progress is not None:
            self.on_progress = progress
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while self.poll() == RUNNING and (deadline is None or time.monotonic() < deadline):
                if cancel is not None and cancel():
                    self.cancel()
                self.client.wait_for_output(0.1)
                if between is not None:
                    between()
        except BaseException:
            self.on_progress = None
            self.cancel()
            self.wait(KILL_AFTER + 5)
            raise
        if self.state == RUNNING:
            self.client.abandon(self, TuckerSegmentError(f"the {self.name} did not finish within {timeout:g} s; it "
                                                         "was stopped"))
        return self.state

    def cancel(self) -> None:
        """Stop the work now: the worker is terminated (and killed if it lingers); ``poll`` ends the job."""
        if self.state == RUNNING and self.cancelling_since is None:
            self.cancelling_since = time.monotonic()
            self.message = "cancelling"
            self.client.stop_worker()

    def outcome(self) -> dict[str, Any]:
        """The result, or the job's error raised (``Cancelled`` for a cancelled job)."""
        if self.state == RUNNING:
            raise TuckerSegmentError(f"the {self.name} has not finished")
        if self.state == CANCELLED:
            raise Cancelled(f"{self.name} cancelled")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def _end(self, state: str, result: dict[str, Any] | None = None, error: BaseException | None = None) -> None:
        if self.state != RUNNING:
            return
        self.state, self.result, self.error = state, result, error
        self.seconds = time.perf_counter() - self.started
        callbacks, self.on_end = self.on_end, []
        for callback in callbacks:
            callback(self)


class WorkerClient:
    """Owns at most one worker process and at most one running job on it."""

    def __init__(self, child_factory: Callable[[], ChildProcess], program: str, arguments: Sequence[str],
                 environment: dict[str, str] | None = None, folder: str | None = None) -> None:
        self._factory, self._program, self._arguments = child_factory, program, list(arguments)
        self._environment = environment  # the base; each worker starts with the current values on top
        self._folder = folder or str(Path.home())
        self._child: ChildProcess | None = None
        self._buffer = b""
        self._errors: deque[str] = deque(maxlen=200)
        self._job: WorkerJob | None = None
        self._next_id = 1
        self.worker_pid: int | None = None  # from the worker's ready line
        self.starts = 0  # how many worker processes this client started

    @property
    def busy(self) -> bool:
        return self._job is not None and self._job.state == RUNNING

    def alive(self) -> bool:
        return self._child is not None and self._child.running()

    def submit(self, command: str, args: dict[str, Any], name: str | None = None) -> WorkerJob:
        """Send a request (starting a worker when none is alive) and return its job; never waits."""
        if self.busy:
            raise TuckerSegmentError(f"the worker is still busy with the {self._job.name}; wait for it or cancel it")
        line = encode({"id": self._next_id, "command": command, "args": args})  # args that cannot travel: no job
        if not self.alive():
            self._start()
        job = WorkerJob(self, self._next_id, name or command)
        self._next_id += 1
        self._job = job
        assert self._child is not None
        self._child.write(line)
        return job

    def run(self, command: str, args: dict[str, Any], progress: Callable[[float, str], None] | None = None,
            cancel: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Submit and ``follow``: the result, or the error raised."""
        job = self.submit(command, args)
        job.follow(progress, cancel)
        return job.outcome()

    def wait_for_output(self, seconds: float) -> None:
        if self.alive():
            self._child.wait_for_output(seconds)  # type: ignore[union-attr]
        else:
            time.sleep(min(seconds, 0.05))

    def _start(self) -> None:
        self._child = self._factory()
        self._buffer = b""
        self._errors.clear()
        self.worker_pid = None
        self._child.start(self._program, self._arguments, worker_environment(self._environment), self._folder)
        self.starts += 1

    def stop_worker(self) -> None:
        """Terminate the worker now (its job, if any, ends as cancelled once it has gone)."""
        if self._child is not None:
            self._child.terminate()
            self._signal_worker(signal.SIGTERM)
            if os.name == "nt":  # Windows has no polite stop for a console process
                self._child.kill()

    def abandon(self, job: WorkerJob, error: BaseException) -> None:
        """End ``job`` with ``error`` now: its worker is stopped and let go, so the next request starts a new one."""
        if job.state != RUNNING:
            return
        self.stop_worker()
        self._child = None
        job._end(FAILED, error=error)

    def _launched(self) -> bool:
        """Whether our child is a launcher that started the worker (an installed Slicer's PythonSlicer): the pid the
        worker reported is not the child's."""
        return self.worker_pid is not None and self._child is not None and self.worker_pid != self._child.pid()

    def _signal_worker(self, number: int) -> None:
        """Signal the worker process itself when a launcher started it (the launcher forwards no signal)."""
        if self._launched():
            with contextlib.suppress(OSError):  # gone already
                os.kill(self.worker_pid, number)  # type: ignore[arg-type]

    def shutdown(self, seconds: float = 2.0) -> None:
        """End the worker: a running job is cancelled; an idle worker is asked to exit (stdin closed), and
        terminated if it has not within ``seconds``."""
        if self._child is None:
            return
        if self.busy:
            self._job.cancel()  # type: ignore[union-attr]
            self._job.wait(KILL_AFTER + 5)  # type: ignore[union-attr]
        if self._child is None:  # the job's worker was let go
            return
        self._child.close_input()
        deadline = time.monotonic() + seconds
        while self._child.running() and time.monotonic() < deadline:
            self._child.wait_for_output(0.05)
        if self._child.running():
            self._child.terminate()
            self._signal_worker(signal.SIGTERM)
        self._child = None

    def pump(self) -> None:
        """Read what the worker wrote, hand it to the running job, and notice a worker that has gone."""
        child = self._child
        if child is None:
            if self.busy:
                self._job._end(FAILED, error=TuckerSegmentError("the worker process is gone"))  # type: ignore[union-attr]
            return
        running = child.running()  # read before the output, so nothing written before it ended is missed
        self._buffer += child.read_output()
        errors = child.read_errors()
        if errors:
            self._errors.extend(errors.decode(errors="replace").splitlines())
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            message = decode(line)
            if message is None:
                if line.strip():
                    self._errors.append(line.decode(errors="replace"))
                continue
            self._dispatch(message)
        job = self._job
        if job is None or job.state != RUNNING:
            return
        if not running:
            if job.cancelling_since is not None:
                job._end(CANCELLED)
            else:
                job._end(FAILED, error=TuckerSegmentError(_ended_message(child.exit_code(), "\n".join(self._errors),
                                                                         self._launched())))
            self._child = None
        elif job.cancelling_since is not None and time.monotonic() - job.cancelling_since > KILL_AFTER:
            child.kill()
            self._signal_worker(getattr(signal, "SIGKILL", signal.SIGTERM))

    def _dispatch(self, message: dict[str, Any]) -> None:
        if message.get("event") == READY:
            self.worker_pid = message.get("pid") if isinstance(message.get("pid"), int) else None
            return
        job = self._job
        if job is None or message.get("id") != job.ident or job.cancelling_since is not None:
            return
        if "result" in message:
            job._end(DONE, result=message["result"])
        elif "error" in message:
            job._end(FAILED, error=error_from_json(message["error"] if isinstance(message["error"], dict) else {}))
        elif "fraction" in message:
            job.fraction = float(message["fraction"])
            job.message = str(message.get("message", ""))
            if job.on_progress is not None:
                job.on_progress(job.fraction, job.message)
