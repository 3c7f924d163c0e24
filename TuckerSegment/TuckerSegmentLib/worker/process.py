"""One interface to a child process with pipes, three ways: Python's ``subprocess`` (consoles, tests),
and Qt's ``QProcess`` as Slicer's PythonQt (``qt.QProcess``) or PySide6 (``PySide6.QtCore.QProcess``)
offer it. Nothing here blocks unless asked to (``wait_for_output``).
"""
from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..errors import TuckerSegmentError

CHUNK = 1 << 16
START_MS = 20000  # how long Qt may take to start the worker


class ChildProcess(Protocol):
    """What the worker client needs from a process with stdin, stdout and stderr pipes."""

    def start(self, program: str, arguments: Sequence[str], environment: dict[str, str], folder: str) -> None: ...
    def write(self, data: bytes) -> None: ...
    def close_input(self) -> None: ...
    def read_output(self) -> bytes: ...
    def read_errors(self) -> bytes: ...
    def wait_for_output(self, seconds: float) -> None: ...
    def running(self) -> bool: ...
    def pid(self) -> int | None: ...
    def exit_code(self) -> int | None: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


class SubprocessChild:
    """``subprocess.Popen``; two reader threads move stdout and stderr into queues, so reads never block."""

    def __init__(self) -> None:
        self._popen: subprocess.Popen | None = None
        self._output: queue.Queue[bytes] = queue.Queue()
        self._errors: queue.Queue[bytes] = queue.Queue()
        self._arrived = threading.Event()

    def start(self, program: str, arguments: Sequence[str], environment: dict[str, str], folder: str) -> None:
        try:
            self._popen = subprocess.Popen([program, *arguments], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=environment, cwd=folder, bufsize=0)
        except OSError as error:
            raise TuckerSegmentError(f"could not start {program}: {error.strerror or error}") from error
        for stream, chunks in ((self._popen.stdout, self._output), (self._popen.stderr, self._errors)):
            threading.Thread(target=self._pump, args=(stream, chunks), daemon=True).start()

    def _pump(self, stream: Any, chunks: queue.Queue[bytes]) -> None:
        for chunk in iter(lambda: os.read(stream.fileno(), CHUNK), b""):
            chunks.put(chunk)
            self._arrived.set()
        self._arrived.set()

    def write(self, data: bytes) -> None:
        assert self._popen is not None and self._popen.stdin is not None
        try:
            self._popen.stdin.write(data)
            self._popen.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass  # the worker has gone; the client sees it end

    def close_input(self) -> None:
        if self._popen is not None and self._popen.stdin is not None:
            with contextlib.suppress(OSError):
                self._popen.stdin.close()

    @staticmethod
    def _drain(chunks: queue.Queue[bytes]) -> bytes:
        parts = []
        while True:
            try:
                parts.append(chunks.get_nowait())
            except queue.Empty:
                return b"".join(parts)

    def read_output(self) -> bytes:
        self._arrived.clear()
        return self._drain(self._output)

    def read_errors(self) -> bytes:
        return self._drain(self._errors)

    def wait_for_output(self, seconds: float) -> None:
        self._arrived.wait(seconds)

    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    def pid(self) -> int | None:
        return None if self._popen is None else self._popen.pid

    def exit_code(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def terminate(self) -> None:
        if self.running():
            self._popen.terminate()  # type: ignore[union-attr]

    def kill(self) -> None:
        if self.running():
            self._popen.kill()  # type: ignore[union-attr]


class QtChild:
    """A ``QProcess`` of Slicer's ``qt`` module or of PySide6 (``process_class``). Output arrives while the Qt
    event loop runs (Slicer's, or the caller's ``processEvents``), or inside ``wait_for_output``."""

    def __init__(self, process_class: Any) -> None:
        self._class = process_class
        self._process: Any = None
        self._not_running = (process_class.NotRunning if hasattr(process_class, "NotRunning")
                             else process_class.ProcessState.NotRunning)
        self._crash_exit = (process_class.CrashExit if hasattr(process_class, "CrashExit")
                            else process_class.ExitStatus.CrashExit)

    def start(self, program: str, arguments: Sequence[str], environment: dict[str, str], folder: str) -> None:
        process = self._class()
        process.setProgram(program)
        process.setArguments(list(arguments))
        process.setEnvironment([f"{key}={value}" for key, value in environment.items()])
        process.setWorkingDirectory(folder)
        process.start()
        if not process.waitForStarted(START_MS):  # milliseconds normally; a missing program fails here
            raise TuckerSegmentError(f"could not start {program}: {process.errorString()}")
        self._process = process

    def write(self, data: bytes) -> None:
        self._process.write(data)

    def close_input(self) -> None:
        if self._process is not None:
            self._process.closeWriteChannel()

    @staticmethod
    def _bytes(array: Any) -> bytes:
        data = array.data()
        return data if isinstance(data, bytes) else bytes(data, "utf-8") if isinstance(data, str) else bytes(data)

    def read_output(self) -> bytes:
        return b"" if self._process is None else self._bytes(self._process.readAllStandardOutput())

    def read_errors(self) -> bytes:
        return b"" if self._process is None else self._bytes(self._process.readAllStandardError())

    def wait_for_output(self, seconds: float) -> None:
        if self.running():
            self._process.waitForReadyRead(max(1, int(seconds * 1000)))

    def running(self) -> bool:
        return self._process is not None and self._process.state() != self._not_running

    def pid(self) -> int | None:
        return None if self._process is None else int(self._process.processId()) or None

    def exit_code(self) -> int | None:
        if self._process is None or self.running():
            return None
        if self._process.exitStatus() == self._crash_exit:
            return -9  # killed or crashed: Qt does not give the signal
        return int(self._process.exitCode())

    def terminate(self) -> None:
        if self.running():
            self._process.terminate()

    def kill(self) -> None:
        if self.running():
            self._process.kill()


def qt_child_factory(process_class: Any) -> Callable[[], QtChild]:
    return lambda: QtChild(process_class)
