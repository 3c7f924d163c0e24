"""How long work reports progress and learns of a cancel: the callback types every stage shares."""
from __future__ import annotations

from collections.abc import Callable

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
