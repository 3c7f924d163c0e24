"""Segment a structure subset only where it is: a coarse pass finds the structures' bounding box, the fine pass runs
its network only inside it (as TotalSegmentator's ``roi_subset``), and the labels come back on the whole CT's grid,
empty outside.

The coarse pass runs on the CT decimated by whole voxels along each axis, never coarser than the model's finest
spacing (``decimated``); its box is widened by a margin and drawn on that grid (``Box.region``), whatever the CT's
direction. The fine pass resamples the whole CT as it always does and runs the sliding window on the part of its
model grid the box covers (``model_grid_box``), so inside the box the network sees the very voxels of an uncropped
run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..image.geometry import resample_labels_nearest, to_canonical
from ..image.volume import Volume

CROP_MARGIN_MM = 20.0  # context kept around the coarse pass's bounding box, on every side


@dataclass(frozen=True)
class Box:
    """Voxels ``start[a]`` … ``stop[a] - 1`` along each array axis (k, j, i) of a volume."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(a, b) for a, b in zip(self.start, self.stop, strict=True))  # type: ignore[return-value]

    def describe(self, factors: tuple[int, int, int] = (1, 1, 1)) -> str:
        """The box as voxel ranges of a grid ``factors`` times finer, e.g. "voxels k 3-40, j 10-200, i 0-511"."""
        ranges = (f"{axis} {a * f}-{b * f - 1}" for axis, a, b, f in zip("kji", self.start, self.stop, factors,
                                                                          strict=True))
        return "voxels " + ", ".join(ranges)

    def region(self, volume: Volume) -> Volume:
        """The box as a label map on ``volume``'s grid (1 inside, 0 outside)."""
        mask = np.zeros(volume.array.shape, dtype=np.uint8)
        mask[self.slices] = 1
        return volume.with_array(mask)


def model_grid_box(region: Volume, shape: tuple[int, ...], patch: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The index box, on a model grid of ``shape`` (canonical k, j, i, as ``Segmenter`` resamples a CT), of the
    voxels ``region`` marks (any grid over the same CT), widened about its centre to at least one ``patch`` where
    the grid allows (a smaller box would be padded, and the network would see padding where an uncropped run sees
    the CT); None when it marks none."""
    canonical, _ = to_canonical(region)
    marked = resample_labels_nearest(canonical.array, shape) > 0
    if not marked.any():
        return None
    box = []
    for axis, (size, least) in enumerate(zip(shape, patch, strict=True)):
        found = np.flatnonzero(marked.any(axis=tuple(a for a in range(3) if a != axis)))
        start, stop = int(found[0]), int(found[-1]) + 1
        grow = max(0, min(least, size) - (stop - start))
        start = min(max(0, start - grow // 2), size - max(stop - start, min(least, size)))
        box.append(slice(start, start + max(stop - start, min(least, size))))
    return tuple(box)


def decimated(volume: Volume, finest_spacing: float) -> tuple[Volume, tuple[int, int, int]]:
    """``volume`` keeping every f-th voxel along each array axis, f the largest whole number that keeps its spacing
    at most ``finest_spacing`` mm (the model's finest), and the factors f (k, j, i)."""
    spacing_kji = volume.spacing[::-1]
    factors = tuple(max(1, int(finest_spacing // s)) for s in spacing_kji)
    matrix = volume.ijk_to_ras.copy()
    matrix[:3, :3] = matrix[:3, :3] * np.array(factors[::-1], dtype=float)  # columns i, j, k scaled
    array = volume.array[::factors[0], ::factors[1], ::factors[2]]
    return Volume(np.ascontiguousarray(array), matrix), factors  # type: ignore[return-value]


def bounding_box(found: np.ndarray, volume: Volume, margin_mm: float = CROP_MARGIN_MM) -> Box | None:
    """The box of ``volume``'s voxels around the True voxels of ``found`` (on its grid) with ``margin_mm`` on every
    side, within the volume; None when nothing was found."""
    if not found.any():
        return None
    spacing_kji = volume.spacing[::-1]
    start, stop = [], []
    for axis, size in enumerate(volume.array.shape):
        along = np.flatnonzero(found.any(axis=tuple(a for a in range(3) if a != axis)))
        margin = math.ceil(margin_mm / spacing_kji[axis])
        start.append(max(0, int(along[0]) - margin))
        stop.append(min(size, int(along[-1]) + 1 + margin))
    return Box(tuple(start), tuple(stop))  # type: ignore[arg-type]
