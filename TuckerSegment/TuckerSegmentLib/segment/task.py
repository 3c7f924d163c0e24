"""A segmentation task: one model, or several whose structures together make one label map.

TotalSegmentator's 1.5 mm ``total`` task runs five nnU-Net models (Datasets 291-295), each with its
own structures. ``TaskSegmenter`` loads each model once, on first use, runs only the models that
hold a requested structure (as TotalSegmentator's ``roi_subset`` does), and merges their labels by
structure into one label map with one value per structure.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..defaults import TILE_STEP, check_tile_step
from ..errors import TaskError
from ..image.volume import Volume, checked_volume
from ..nnunet.model_folder import ModelFolder
from ..progress import Cancel, Progress
from .crop import bounding_box, decimated
from .labels import SegmentLabel, label_values, segment_labels
from .predictor import TOTALSEGMENTATOR_MAX_VOXELS, SegmentationResult, Segmenter


@dataclass
class _Member:
    folder: ModelFolder
    segments: list[SegmentLabel]  # the model's own label values
    values: dict[int, int]  # model value -> task value
    segmenter: Segmenter | None = None


class TaskSegmenter:
    """Segment with one or more models; models are loaded lazily and kept for the next volume."""

    def __init__(self, models: Sequence[str | Path | ModelFolder], name: str | None = None,
                 label_maps: Sequence[Mapping[int, tuple[int, str]]] | None = None,
                 coarse: TaskSegmenter | None = None, **segmenter_options) -> None:
        """``label_maps``: per model, its own label value -> (task value, structure name); names and values
        then come from the task (as TotalSegmentator's class maps), not from each dataset.json. ``coarse``: the
        task that finds a structure subset's region before this one segments it (see ``segment``)."""
        if not models:
            raise TaskError("a segmentation task needs at least one model folder")
        check_tile_step(segmenter_options.get("tile_step", TILE_STEP))  # before any model is opened
        folders = [m if isinstance(m, ModelFolder) else ModelFolder.open(m) for m in models]
        if segmenter_options.get("fold") is not None:
            for folder in folders:
                folder.require_fold(segmenter_options["fold"])
        if label_maps is not None and len(label_maps) != len(folders):
            raise TaskError(f"{len(label_maps)} label maps for {len(folders)} models; give one per model")
        self._options = segmenter_options
        self.coarse = coarse
        self.max_voxels: int | None = None  # set to predict in smaller slabs (see runner.cpu_slab_voxels)
        self._members: list[_Member] = []
        self.segments: list[SegmentLabel] = []
        for index, folder in enumerate(folders):
            mapping = label_maps[index] if label_maps is not None else None
            own = segment_labels(_mapped_dataset(folder, mapping) if mapping else folder.dataset_json, folder.path)
            values = {}
            for segment in own:
                if any(s.name == segment.name for s in self.segments):
                    raise TaskError(f"structure {segment.name!r} is segmented by two models of the task "
                                      f"(second: {folder.path}); a task's models must hold distinct structures")
                own_order = segment.value if len(folders) == 1 else len(self.segments) + 1
                value = mapping[segment.value][0] if mapping else own_order
                values[segment.value] = value
                self.segments.append(replace(segment, value=value))
            self._members.append(_Member(folder, own, values))
        self.segments.sort(key=lambda s: s.value)
        self.name = name or "+".join(f.name for f in folders)

    def loaded(self) -> list[bool]:
        """Which models have been loaded so far."""
        return [m.segmenter is not None for m in self._members]

    def load(self) -> None:
        """Load every model now (converted and compiled where the runtime needs it) instead of on first use."""
        for member in self._members:
            if member.segmenter is None:
                member.segmenter = Segmenter(member.folder, **self._options)

    def check_subset(self, subset: Sequence[str] | None) -> None:
        label_values(self.segments, subset or [])

    def finest_spacing(self) -> float:
        """The finest voxel spacing (mm) of the task's models."""
        return min(min(m.folder.configuration_manager.spacing) for m in self._members)

    def segment(self, volume: Volume | str | Path, progress: Progress | None = None, cancel: Cancel | None = None,
                subset: Sequence[str] | None = None, crop: bool = True) -> SegmentationResult:
        """Labels of every model that holds a wanted structure, merged on the input grid. With a ``subset`` and
        ``crop`` and a ``coarse`` task that knows every structure of it, the models run only inside the box the
        coarse task finds the subset in (``_cropped``)."""
        start = time.perf_counter()
        self.check_subset(subset)
        volume = checked_volume(volume)  # once, not once per model
        if subset and crop and self.coarse is not None and set(subset) <= {s.name for s in self.coarse.segments}:
            return self._cropped(volume, list(subset), progress or (lambda fraction, message: None), cancel, start)
        return self._segment(volume, progress, cancel, subset, start)

    def _cropped(self, volume: Volume, subset: list[str], report: Progress, cancel: Cancel | None,
                 start: float) -> SegmentationResult:
        """``subset`` segmented inside the bounding box (plus a margin) where the ``coarse`` task (e.g.
        TotalSegmentator's 6 mm model) finds it on the CT decimated to its spacing (``crop.decimated``). Labels on
        the whole grid, empty outside the box; nothing found: an empty label map, said in its warnings. (Without a
        coarse task there is no crop: this task's own coarse pass would run its network on the same model grid, costing
        about what the crop saves.)"""
        coarse = self.coarse
        assert coarse is not None
        small, factors = decimated(volume, coarse.finest_spacing())
        located = coarse._segment(small, lambda f, m: report(0.3 * f, f"locating {', '.join(subset)}: {m}"), cancel,
                                  subset, start)
        box = bounding_box(located.labels > 0, small)
        if box is None:
            empty = self._segment_nothing(volume, subset, start, located.tiles)
            empty.warnings.append(f"the coarse pass found none of {', '.join(subset)} in this CT, so nothing was "
                                  "segmented; segment without cropping (--no-crop) to run the full model everywhere")
            return empty
        fine = self._segment(volume, lambda f, m: report(0.3 + 0.7 * f, m), cancel, subset, start, box.region(small))
        return replace(fine, seconds=time.perf_counter() - start, tiles=located.tiles + fine.tiles,
                       warnings=[*fine.warnings, f"segmented inside {box.describe(factors)} of the CT, where a coarse "
                                 f"pass found {', '.join(subset)}"])

    def _empty_labels(self, volume: Volume) -> np.ndarray:
        """A label map of zeros on ``volume``'s grid, wide enough for the task's largest label value."""
        largest = max((s.value for s in self.segments), default=0)
        return np.zeros(volume.array.shape, dtype=np.uint8 if largest < 256 else np.uint16)

    def _segment_nothing(self, volume: Volume, subset: list[str], start: float, tiles: int) -> SegmentationResult:
        """An empty label map of ``subset`` on ``volume``'s grid."""
        segments = [s for s in self.segments if s.name in subset]
        labels = self._empty_labels(volume)
        return SegmentationResult(volume.with_array(labels), segments, self.name, "none", time.perf_counter() - start,
                                  tiles)

    def _segment(self, volume: Volume, progress: Progress | None, cancel: Cancel | None,
                 subset: Sequence[str] | None, start: float, region: Volume | None = None) -> SegmentationResult:
        """``segment`` of a checked volume, the networks run only where ``region`` marks (None: everywhere)."""
        wanted = set(subset) if subset else None
        members = [m for m in self._members if wanted is None or wanted & {s.name for s in m.segments}]
        report = progress or (lambda fraction, message: None)
        labels = self._empty_labels(volume)
        results = []
        for index, member in enumerate(members):
            def part(fraction: float, message: str, index: int = index) -> None:
                prefix = f"model {index + 1}/{len(members)}: " if len(members) > 1 else ""
                report((index + fraction) / len(members), prefix + message)
            if member.segmenter is None:
                part(0.0, f"loading {member.folder.name}")
                member.segmenter = Segmenter(member.folder, **self._options)
            member.segmenter.max_voxels = self.max_voxels or self._options.get("max_voxels", TOTALSEGMENTATOR_MAX_VOXELS)
            result = member.segmenter.predict(volume, part, cancel, region=region)
            lookup = np.zeros(max(member.values) + 1, dtype=labels.dtype)
            for segment in member.segments:
                if wanted is None or segment.name in wanted:
                    lookup[segment.value] = member.values[segment.value]
            mapped = lookup[result.labels]
            found = mapped > 0  # a later model overwrites an earlier one where both claim a voxel (as TotalSegmentator)
            labels[found] = mapped[found]
            results.append(result)
        segments = [s for s in self.segments if wanted is None or s.name in wanted]
        devices = sorted({r.device for r in results})
        return SegmentationResult(volume.with_array(labels), segments, self.name, ",".join(devices) or "none",
                                  time.perf_counter() - start, sum(r.tiles for r in results),
                                  policy="; ".join(r.policy for r in results),
                                  runtime="; ".join(dict.fromkeys(r.runtime for r in results)) or "none")


def _mapped_dataset(folder: ModelFolder, mapping: Mapping[int, tuple[int, str]]) -> dict:
    """``folder``'s dataset.json with its labels named by the task's class map; every label must be mapped."""
    own = {v for v in folder.dataset_json.get("labels", {}).values() if isinstance(v, int) and v != 0}
    unmapped = sorted(own - set(mapping))
    if unmapped or not own:
        raise TaskError(f"{folder.path}: label values {unmapped or 'none'} of dataset.json are not in the task's class "
                          "map; the folder holds another model than the task expects (check the dataset id)")
    return {**folder.dataset_json, "labels": {"background": 0} | {mapping[v][1]: v for v in sorted(own)}}
