"""Run long work (segmentation, compression) off the caller's thread, with progress and cancel.

Slicer's panel starts a ``BackgroundJob`` and polls it from a timer on the GUI thread, so the
application stays responsive; the work itself never touches MRML or Qt (the Logic reads the
scene before and writes it after, on the GUI thread).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from .errors import Cancelled
from .progress import Cancel, Progress

T = TypeVar("T")
RUNNING, DONE, FAILED, CANCELLED = "running", "done", "failed", "cancelled"


class BackgroundJob(Generic[T]):
    """``work(progress, cancelled)`` in a daemon thread. ``progress(fraction, message)`` records the latest
    report; ``cancelled()`` tells the work that Cancel was pressed (it should stop at its next check and
    raise ``Cancelled``)."""

    def __init__(self, work: Callable[[Progress, Cancel], T], name: str = "job") -> None:
        self.name = name
        self.fraction, self.message = 0.0, "starting"
        self.result: T | None = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.seconds: float | None = None
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, args=(work,), name=f"TuckerSegment {name}", daemon=True)
        self._thread.start()

    def _progress(self, fraction: float, message: str) -> None:
        with self._lock:
            self.fraction, self.message = min(max(float(fraction), 0.0), 1.0), message

    def _run(self, work: Callable[..., T]) -> None:
        try:
            self.result = work(self._progress, self._cancel.is_set)
        except BaseException as error:  # handed to the polling thread, which reports it
            self.error = error
        self.seconds = time.perf_counter() - self.started

    def cancel(self) -> None:
        """Ask the work to stop at its next check."""
        self._cancel.set()

    @property
    def state(self) -> str:
        if self._thread.is_alive():
            return RUNNING
        if isinstance(self.error, Cancelled) or (self.error is not None and self._cancel.is_set()):
            return CANCELLED
        return FAILED if self.error is not None else DONE

    def progress(self) -> tuple[float, str]:
        with self._lock:
            return self.fraction, self.message

    def wait(self, timeout: float | None = None) -> str:
        """Block until the work ends (or ``timeout`` seconds pass); the state."""
        self._thread.join(timeout)
        return self.state

    def outcome(self) -> T:
        """The work's result; its error re-raised; only once it has ended."""
        if self._thread.is_alive():
            raise RuntimeError(f"{self.name} is still running")
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]
