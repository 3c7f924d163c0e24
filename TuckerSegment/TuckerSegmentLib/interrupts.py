"""SIGINT (Ctrl-C) and SIGTERM for the long commands: ``signals_cancel`` turns them into ``Interrupted``, like
Cancel in Slicer; ``held_interrupts`` holds one back until a unit of work whose state must stay consistent (a
training iteration) has finished, so that what is saved on the way out is whole. Main thread only (Python
delivers signals there); elsewhere both do nothing."""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from .errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_cancel() -> Iterator[None]:
    """Within the block SIGINT and SIGTERM raise ``Interrupted`` (the caller says what was kept)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _handling(_interrupt):
        yield


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Within ``signals_cancel``: a signal that arrives inside the block is raised as ``Interrupted`` once the block
    has finished (a unit of work takes seconds). Elsewhere signals keep their usual effect (a worker process
    that Slicer terminates dies at once)."""
    if threading.current_thread() is not threading.main_thread() or \
            any(signal.getsignal(s) is not _interrupt for s in SIGNALS):
        yield
        return
    caught: list[int] = []
    with _handling(lambda signum, frame: caught.append(signum)):
        yield
    if caught:
        raise Interrupted(caught[0])


@contextlib.contextmanager
def _handling(handler: Callable[[int, object], None]) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM within the block; the handlers before it again afterwards."""
    previous = {number: signal.signal(number, handler) for number in SIGNALS}
    try:
        yield
    finally:
        for number, before in previous.items():
            signal.signal(number, before)
