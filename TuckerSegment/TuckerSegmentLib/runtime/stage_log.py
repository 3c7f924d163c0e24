"""What a long piece of work tells its user about its stages (``progress.stage``), and what it keeps of them.

``StageLog`` listens to the stages of the work run under ``progress.listening(log)``. A stage is said when it
begins only when it is announced (a step the user did not ask for, such as a first conversion); a stage that
runs longer than ``quiet_seconds`` says how far it is, with an estimate of the time left, and how long it took;
short stages say nothing. Every stage, said or not, is kept with its time and the process's peak resident memory
while it ran (``records``): what a build benchmark reports per stage.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from .memory import PeakMemory

Say = Callable[[str], None]
SEPARATOR = " › "


@dataclass(frozen=True)
class StageRecord:
    """One stage that ran: its path of names (outer stages first), seconds, and peak resident bytes (None where
    the memory cannot be read)."""

    name: str
    seconds: float
    peak_bytes: int | None

    def to_dict(self) -> dict[str, object]:
        return {"stage": self.name, "seconds": round(self.seconds, 2), "peak_bytes": self.peak_bytes}


def time_left(done: int, steps: int, elapsed: float) -> str:
    """``done``/``steps`` and the time the rest should take at the pace so far, e.g. "3/5, about 40 s left"."""
    if done <= 0 or steps <= 0:
        return f"{done}/{steps}" if steps else f"{done}"
    left = elapsed / done * max(0, steps - done)
    return f"{done}/{steps}, about {left:.0f} s left" if left >= 1 else f"{done}/{steps}"


class StageLog:
    """A ``progress.StageListener`` that tells ``say`` about long or announced stages and keeps every stage's time
    and peak memory (see the module docstring)."""

    def __init__(self, say: Say | None = None, quiet_seconds: float = 5.0) -> None:
        self.say, self.quiet_seconds = say or (lambda message: None), quiet_seconds
        self.records: list[StageRecord] = []
        self._open: list[tuple[str, float, PeakMemory, list[float]]] = []  # name, start, memory, last said

    def _path(self, name: str) -> str:
        return SEPARATOR.join([*(entry[0] for entry in self._open[:-1]), name])

    def begin(self, name: str, steps: int, announce: bool = False) -> None:
        memory = PeakMemory().__enter__()
        self._open.append((name, time.perf_counter(), memory, [time.perf_counter()]))
        if announce:
            self.say(f"{self._path(name)}…")

    def step(self, name: str, done: int, steps: int) -> None:
        _, started, _, said = self._open[-1]
        now = time.perf_counter()
        if now - said[0] >= self.quiet_seconds:
            said[0] = now
            self.say(f"{self._path(name)}: {time_left(done, steps, now - started)}")

    def end(self, name: str) -> None:
        _, started, memory, _ = self._open[-1]
        memory.__exit__(None, None, None)
        seconds = time.perf_counter() - started
        peak = None if memory.peak is None or memory.base is None else memory.base + memory.peak
        self.records.append(StageRecord(self._path(name), seconds, peak))
        if seconds >= self.quiet_seconds:
            self.say(f"{self._path(name)}: done in {seconds:.0f} s")
        self._open.pop()
