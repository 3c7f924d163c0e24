"""Segment: open the segmenter a ``SegmentRequest`` asks for (the auto choice, a variant, model folders), the
one way the CLI, the worker and the Python API do it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..image.volume import Volume
from ..progress import Cancel, Progress
from ..segment.result import SegmentationResult
from ..segment.task import TaskSegmenter
from ..runtime.hardware import detect_devices
from ..variants.catalogue import catalogue
from ..variants.choice import choose_model, usable_devices
from ..variants.guard import SafeTask
from .requests import SegmentRequest

Segmenter = SafeTask | TaskSegmenter


@dataclass(frozen=True)
class SegmenterPlan:
    """Which models a request runs, on which device, and why; ``open()`` loads them. Two plans with the same
    ``key`` run the same models the same way (a worker keeps the loaded one)."""

    key: tuple
    reason: str
    label: str  # the model as results name it: a variant id or the folders' names
    open: Callable[[], Segmenter]


def plan_segmenter(request: SegmentRequest, notify: Callable[[str], None] = lambda message: None) -> SegmenterPlan:
    """The models ``request`` runs: model folders as one task, or the catalogue's choice (a variant id, a folder,
    ``auto``) guarded against running out of memory (``SafeTask``; its notices go to ``notify``)."""
    options = request.segmenter_options()
    key_options = tuple(sorted(options.items()))
    if request.precision == "int8":  # quantized on the sample CT's patches, as ranks are calibrated by default
        from ..compress.calibration_source import int8_calibration
        options["calibration"] = int8_calibration
    if isinstance(request.model, tuple):
        paths = tuple(Path(m).expanduser().resolve() for m in request.model)
        return SegmenterPlan((paths, request.device, key_options), "model folders given",
                             " + ".join(p.name for p in paths),
                             lambda: TaskSegmenter(list(paths), device=request.device, **options))
    variants, devices = catalogue(), detect_devices()
    choice = choose_model(request.model, request.task, request.device, variants, devices)
    usable = usable_devices(request.device, devices)
    return SegmenterPlan((choice.folders, choice.device, choice.precision, key_options), choice.reason, choice.id,
                         lambda: SafeTask(choice, variants, usable, notify=notify, **options))


def segment_with(segmenter: Segmenter, request: SegmentRequest, volume: Volume | str | Path,
                 progress: Progress | None = None, cancel: Cancel | None = None) -> SegmentationResult:
    """``volume`` segmented as ``request`` asks (its subset, cropped to it unless ``crop`` is off)."""
    return segmenter.segment(volume, progress, cancel, request.subset, request.crop)
