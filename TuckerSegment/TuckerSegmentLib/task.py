"""A segmentation task: one model, or several whose structures together make one label map.

TotalSegmentator's 1.5 mm ``total`` task runs five nnU-Net models (Datasets 291-295), each with its
own structures. ``TaskSegmenter`` loads each model once, on first use, runs only the models that
hold a requested structure (as TotalSegmentator's ``roi_subset`` does), and merges their labels by
structure into one label map with one value per structure.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import VolumeError
from .inference import Cancel, Progress, SegmentationResult, Segmenter
from .labels import SegmentLabel, label_values, segment_labels
from .model_folder import ModelFolder
from .volume import Volume, checked_volume


@dataclass
class _Member:
    folder: ModelFolder
    segments: list[SegmentLabel]  # the model's own label values
    values: dict[int, int]  # model value -> task value
    segmenter: Segmenter | None = None


class TaskSegmenter:
    """Segment with one or more models; models are loaded lazily and kept for the next volume."""

    def __init__(self, models: Sequence[str | Path | ModelFolder], name: str | None = None, **segmenter_options) -> None:
        if not models:
            raise VolumeError("a segmentation task needs at least one model folder")
        folders = [m if isinstance(m, ModelFolder) else ModelFolder.open(m) for m in models]
        self._options = segmenter_options
        self._members: list[_Member] = []
        self.segments: list[SegmentLabel] = []
        for folder in folders:
            own = segment_labels(folder.dataset_json, folder.path)
            values = {}
            for segment in own:
                if any(s.name == segment.name for s in self.segments):
                    raise VolumeError(f"structure {segment.name!r} is segmented by two models of the task "
                                      f"(second: {folder.path}); a task's models must hold distinct structures")
                value = segment.value if len(folders) == 1 else len(self.segments) + 1
                values[segment.value] = value
                self.segments.append(replace(segment, value=value))
            self._members.append(_Member(folder, own, values))
        self.name = name or "+".join(f.name for f in folders)

    def loaded(self) -> list[bool]:
        """Which models have been loaded so far."""
        return [m.segmenter is not None for m in self._members]

    def check_subset(self, subset: Sequence[str] | None) -> None:
        label_values(self.segments, subset or [])

    def segment(self, volume: Volume | str | Path, progress: Progress | None = None, cancel: Cancel | None = None,
                subset: Sequence[str] | None = None) -> SegmentationResult:
        """Labels of every model that holds a wanted structure, merged on the input grid."""
        start = time.perf_counter()
        self.check_subset(subset)
        volume = checked_volume(volume)  # once, not once per model
        wanted = set(subset) if subset else None
        members = [m for m in self._members if wanted is None or wanted & {s.name for s in m.segments}]
        report = progress or (lambda fraction, message: None)
        largest = max((s.value for s in self.segments), default=0)
        labels = np.zeros(volume.array.shape, dtype=np.uint8 if largest < 256 else np.uint16)
        results = []
        for index, member in enumerate(members):
            def part(fraction: float, message: str, index: int = index) -> None:
                prefix = f"model {index + 1}/{len(members)}: " if len(members) > 1 else ""
                report((index + fraction) / len(members), prefix + message)
            if member.segmenter is None:
                part(0.0, f"loading {member.folder.name}")
                member.segmenter = Segmenter(member.folder, **self._options)
            names = [s.name for s in member.segments if wanted is None or s.name in wanted]
            result = member.segmenter.predict(volume, part, cancel, names if wanted is not None else None)
            lookup = np.zeros(max(member.values) + 1, dtype=labels.dtype)
            for own, value in member.values.items():
                lookup[own] = value
            found = result.labels > 0
            labels[found] = lookup[result.labels[found]]
            results.append(result)
        segments = [s for s in self.segments if wanted is None or s.name in wanted]
        devices = sorted({r.device for r in results})
        return SegmentationResult(volume.with_array(labels), segments, self.name, ",".join(devices) or "none",
                                  time.perf_counter() - start, sum(r.tiles for r in results),
                                  policy="; ".join(r.policy for r in results))
