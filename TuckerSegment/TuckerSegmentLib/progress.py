"""How long work reports progress and learns of a cancel: the callback types every stage shares, and named stages
(``stage``) that whoever runs the work may listen to (``listening``) without passing a callback down."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

from .errors import Cancelled

Progress = Callable[[float, str], None]
"""Called as ``progress(fraction, message)``: how far the whole work is (0 … 1) and what it does now."""
LayerProgress = Callable[[int, int, str], None]
"""Called as ``progress(done, total, layer_name)`` after each layer a compression decomposed."""
Cancel = Callable[[], bool]
"""Returns True once the user asked to stop; the work stops at its next check."""


def check_cancel(cancelled: Cancel | None, what: str) -> None:
    """Raise ``Cancelled`` naming ``what`` when ``cancelled()`` is true."""
    if cancelled is not None and cancelled():
        raise Cancelled(f"{what} cancelled; nothing was written")


class StageListener(Protocol):
    """Hears of the named stages of the work under ``listening`` (see ``stage``)."""

    def begin(self, name: str, steps: int, announce: bool = False) -> None: ...

    def step(self, name: str, done: int, steps: int) -> None: ...

    def end(self, name: str) -> None: ...


_listener: ContextVar[StageListener | None] = ContextVar("stage_listener", default=None)


def listener() -> StageListener | None:
    """The listener the stages begun here are told about, if any."""
    return _listener.get()


@contextmanager
def listening(listener: StageListener) -> Iterator[StageListener]:
    """Make ``listener`` hear of every ``stage`` begun inside the block (in this thread)."""
    token = _listener.set(listener)
    try:
        yield listener
    finally:
        _listener.reset(token)


@contextmanager
def stage(name: str, steps: int = 0, announce: bool = False) -> Iterator[Callable[[], None]]:
    """A named stage of a long piece of work (e.g. "calibration statistics"), told to the listener, if any; yields
    ``step()``, to be called after each of its ``steps`` steps (0: not counted). ``announce``: the user should hear
    of it as it begins (e.g. a first conversion they did not ask for)."""
    heard = _listener.get()
    if heard is None:
        yield lambda: None
        return
    done = [0]

    def step() -> None:
        done[0] += 1
        heard.step(name, done[0], steps)
    heard.begin(name, steps, announce)
    try:
        yield step
    finally:
        heard.end(name)
