"""The worker dies with whoever started it. In an installed Slicer ``PythonSlicer`` is a launcher that starts the
real Python as its child and forwards no signal: when Slicer ends the launcher (Cancel, exit) or dies itself, the
worker must not keep the CPU or GPU busy. On Linux the kernel sends it SIGKILL when its parent ends
(``PR_SET_PDEATHSIG``); everywhere a watchdog thread ends it once its parent has changed or its stdin has closed
while it works."""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

WATCH_SECONDS = 0.25  # how often the watchdog looks
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Have this process end as soon as its parent does (see the module docstring)."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # without it the watchdog below still ends it
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent ended before the request took effect
        os._exit(1)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent watchdog").start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(WATCH_SECONDS)
    os._exit(1)  # orphaned: nobody reads our answers any more


def end_now(code: int = 0) -> None:
    """Leave at once with exit ``code``, without waiting for the work in hand (its outputs are the client's to remove)
    or for a thread blocked in a read (which would abort the interpreter's own shutdown): the client closed our stdin,
    which it does only when it has gone or wants us gone, or the worker idled out or cannot go on."""
    sys.stderr.flush()
    os._exit(code)
