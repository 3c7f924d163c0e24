"""Volume and intensity of each segment, from a label map and the image on the same grid.

What Slicer's Segment Statistics reports for labelmap and scalar-volume statistics, for use where
that module is not available (headless Slicer, plain Python)."""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

COLUMNS = ("Segment", "Number of voxels", "Volume [cm3]", "Mean [HU]", "Standard deviation [HU]",
           "Minimum [HU]", "Maximum [HU]")


def segment_statistics(labels: np.ndarray, image: np.ndarray, voxel_mm3: float,
                       values: Mapping[str, int]) -> list[tuple[str, int, float, float, float, float, float]]:
    """One row per named label value (see ``COLUMNS``); intensities are NaN for an empty segment."""
    if labels.shape != image.shape:
        raise ValueError(f"label map {labels.shape} and image {image.shape} are not on one grid")
    flat_labels, flat_image = labels.ravel(), image.ravel().astype(np.float64)
    order = np.argsort(flat_labels, kind="stable")
    sorted_labels = flat_labels[order]
    rows = []
    for name, value in values.items():
        start, stop = np.searchsorted(sorted_labels, [value, value + 1])
        inside = flat_image[order[start:stop]]
        count = int(inside.size)
        stats = ((float(inside.mean()), float(inside.std()), float(inside.min()), float(inside.max())) if count
                 else (float("nan"),) * 4)
        rows.append((name, count, count * voxel_mm3 / 1000.0, *stats))
    return rows
