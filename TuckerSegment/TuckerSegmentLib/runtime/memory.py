"""Peak memory of a piece of work: this process's resident memory above its level at the start, sampled
in a thread (Linux ``/proc``; elsewhere unknown)."""
from __future__ import annotations

import os
import threading
from pathlib import Path

SAMPLE_SECONDS = 0.005


def resident_bytes() -> int | None:
    """This process's resident memory now (Linux), or None where /proc is missing."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak resident memory above the level at entry while the block runs, sampled every 5 ms in a thread
    (``peak`` None where it cannot be read)."""

    def __enter__(self) -> PeakMemory:
        self.base = resident_bytes()
        self.peak: int | None = 0 if self.base is not None else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while self.base is not None and not self._stop.wait(SAMPLE_SECONDS):
            self.peak = max(self.peak or 0, (resident_bytes() or 0) - self.base)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.base is not None:  # a block shorter than one sample still counts its end state
            self.peak = max(self.peak or 0, (resident_bytes() or 0) - self.base)
