"""Progress of a long command on stderr, as people expect it: on a terminal a progress bar with elapsed time and
ETA (tqdm, which nnU-Net installs); otherwise (logs, CI, a pipe, no tqdm) plain lines, a few per stage."""
from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from ..progress import LayerProgress, Progress
from ..runtime.stage_log import StageLog

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}]{postfix}"
PERCENT_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| [{elapsed} elapsed, ETA {remaining}]"


class Terminal:
    """Where a command's progress goes: ``say`` for messages, ``counted(label)`` for steps of a known count,
    ``fraction()`` for work that reports how far it is; ``stages()`` for the engine's named stages. Quiet: nothing."""

    def __init__(self, quiet: bool = False, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bars = not quiet and _is_terminal(self.stream) and importlib.util.find_spec("tqdm") is not None
        self._open: list[Any] = []  # the bars showing, innermost last
        self._own: dict[str, Any] = {}  # the bar each progress callback draws on, by its label

    def say(self, message: str, always: bool = False) -> None:
        """``message`` on its own line (above a bar that is showing); ``always``: even when quiet (a warning)."""
        if self.quiet and not always:
            return
        if self._open:
            self._open[-1].write(message, file=self.stream)  # above the bar, which stays
        else:
            print(message, file=self.stream, flush=True)

    def counted(self, label: str) -> LayerProgress | None:
        """``progress(done, total, name)``: a bar named ``label``; without a terminal a line per step whose name is
        new (each layer; a training run's loss each time it is logged), so a log file stays readable."""
        if self.quiet:
            return None
        if not self.bars:
            said = [""]

            def line(done: int, total: int, name: str) -> None:
                if name != said[0] or done >= total:
                    said[0] = name
                    print(f"{label} [{done:>3}/{total}] {name}", file=self.stream, flush=True)
            return line

        def report(done: int, total: int, name: str) -> None:
            bar = self._reused(label, total, BAR_FORMAT)
            bar.set_postfix_str(name, refresh=False)
            bar.update(done - bar.n)
            if done >= total:
                self._close(bar)
        return report

    def fraction(self, label: str = "progress", every_message: bool = False) -> Progress | None:
        """``progress(fraction, message)``: a bar in per cent; without a terminal a line per tenth of the work (or
        per message: ``every_message``, when each says something worth keeping, e.g. an epoch's losses)."""
        if self.quiet:
            return None
        if not self.bars:
            return _deciles(self.stream, every_message)

        def report(fraction: float, message: str) -> None:
            bar = self._reused(label, 100, PERCENT_FORMAT)
            bar.set_description_str(f"{label}: {message}"[:60], refresh=False)
            bar.update(max(0, round(100 * fraction) - bar.n))
        return report

    def stages(self) -> StageLog:
        """A listener for the engine's named stages: their messages through ``say``; with bars, a bar for each
        counted stage instead of its time-left lines."""
        return _BarStages(self) if self.bars else StageLog(None if self.quiet else self._prefixed)

    def close(self) -> None:
        while self._open:
            self._close(self._open[-1])

    def _prefixed(self, message: str) -> None:
        self.say(f"tuckersegment: {message}")

    def _reused(self, label: str, total: int, bar_format: str) -> Any:
        """The bar ``label`` a callback drew last, while it is open; else a new one."""
        bar = self._own.get(label)
        if bar is None or bar not in self._open or bar.total != total:
            bar = self._own[label] = self._bar(label, total, bar_format)
        return bar

    def _bar(self, label: str, total: int, bar_format: str) -> Any:
        from tqdm import tqdm
        columns, rows = _screen(self.stream)
        bar = tqdm(total=total, desc=label, file=self.stream, bar_format=bar_format, leave=True, ncols=columns,
                   nrows=rows, position=len(self._open))
        self._open.append(bar)
        return bar

    def _close(self, bar: Any) -> None:
        if bar in self._open:
            bar.close()
            self._open.remove(bar)


class _BarStages(StageLog):
    """Stage records as ``StageLog`` keeps them; counted stages shown as bars with ETA, the others as lines."""

    def __init__(self, terminal: Terminal) -> None:
        super().__init__(terminal._prefixed)
        self.terminal = terminal
        self.bars: list[Any] = []

    def begin(self, name: str, steps: int, announce: bool = False) -> None:
        super().begin(name, steps, announce)
        self.bars.append(self.terminal._bar(self._path(name), steps, BAR_FORMAT) if steps else None)

    def step(self, name: str, done: int, steps: int) -> None:
        bar = self.bars[-1]
        if bar is not None:
            bar.update(done - bar.n)

    def end(self, name: str) -> None:
        bar = self.bars.pop()
        if bar is not None:
            self.terminal._close(bar)
        super().end(name)


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _screen(stream: TextIO) -> tuple[int, int]:
    """The terminal's columns and rows (100 × 24 where it reports none, as a new pseudo-terminal does: tqdm would
    hide every bar below a height of 0)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, ValueError, OSError):
        return 100, 24
    return size.columns or 100, size.lines or 24


def _deciles(stream: TextIO, every_message: bool = False) -> Progress:
    """Progress lines, once per tenth of the work (or for every message)."""
    last = [-1]

    def report(fraction: float, message: str) -> None:
        decile = int(fraction * 10)
        if every_message or decile != last[0]:
            last[0] = decile
            print(f"{fraction:4.0%} {message}", file=stream, flush=True)
    return report


@contextmanager
def terminal(quiet: bool = False) -> Iterator[Terminal]:
    """A ``Terminal`` on stderr whose bars are closed when the command ends, however it ends."""
    out = Terminal(quiet)
    try:
        yield out
    finally:
        out.close()
