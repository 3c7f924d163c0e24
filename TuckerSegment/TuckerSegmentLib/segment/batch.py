"""The one batch loop (CLI, Slicer's batch over files and over volume nodes): one model load, many inputs.

A bad input volume or an output that cannot be written is reported and the batch goes on; a cancel
ends it after the items already done; any other error (the task cannot run, memory ran out with nothing
to fall back to) stops it with that error, naming the item and how many were done.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ..errors import Cancelled, OutputPathError, TuckerSegmentError, VolumeError
from ..progress import Progress

T = TypeVar("T")
SKIPPED = (VolumeError, OutputPathError)  # this item only: the next one may well succeed


@dataclass(frozen=True)
class BatchItem(Generic[T]):
    """What happened to one input: ``output`` is ``None`` when it failed or was cancelled."""

    source: T
    output: Any
    message: str

    @property
    def ok(self) -> bool:
        return self.output is not None


def item_progress(progress: Progress | None, index: int, count: int, name: str) -> Progress:
    """Progress of item ``index`` of ``count`` as a fraction of the whole batch, the item named."""
    def step(fraction: float, message: str) -> None:
        if progress is not None:
            progress((index + fraction) / count, f"{index + 1}/{count} {name}: {message}")
    return step


def segment_batch(sources: Sequence[T], work: Callable[[T, Progress], tuple[Any, str]],
                  name: Callable[[T], str] = str, progress: Progress | None = None,
                  done: Callable[[BatchItem[T]], None] | None = None) -> list[BatchItem[T]]:
    """Run ``work(source, progress)`` → ``(output, message)`` for each source, in order (see the module
    docstring); ``done`` hears each item as it ends. Returns every item that ran."""
    items: list[BatchItem[T]] = []

    def record(item: BatchItem[T]) -> None:
        items.append(item)
        if done is not None:
            done(item)
    for index, source in enumerate(sources):
        try:
            output, message = work(source, item_progress(progress, index, len(sources), name(source)))
        except SKIPPED as error:
            record(BatchItem(source, None, str(error)))
            continue
        except Cancelled as error:
            record(BatchItem(source, None, str(error)))
            break
        except TuckerSegmentError as error:
            if len(sources) == 1:
                raise
            raise type(error)(f"{name(source)}: {error} (batch stopped after {index} of {len(sources)} inputs; "
                              "the ones done are kept)") from error
        record(BatchItem(source, output, message))
    return items
