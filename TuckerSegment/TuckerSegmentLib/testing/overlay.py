"""A PNG of a few slices with the labels drawn over the CT (for reports and the demo; no plotting library)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..atomic import atomic_output_file
from ..image.geometry import resample_image, resample_labels_nearest, to_canonical
from ..image.volume import Volume
from ..segment.result import SegmentationResult

WINDOW_HU = (-1000.0, 600.0)
ALPHA = 0.45
PIXEL_MM = 1.5  # every panel is drawn at this resolution, whatever the voxel size


def _panel(ct: np.ndarray, labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    gray = np.clip((ct - WINDOW_HU[0]) / (WINDOW_HU[1] - WINDOW_HU[0]), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    mask = labels > 0
    rgb[mask] = (1 - ALPHA) * rgb[mask] + ALPHA * colors[labels[mask]]
    return rgb


def _to_screen(plane: np.ndarray, mm: tuple[float, float], is_labels: bool) -> np.ndarray:
    shape = tuple(max(1, int(round(n * s / PIXEL_MM))) for n, s in zip(plane.shape, mm, strict=True))
    if is_labels:
        return resample_labels_nearest(plane[None], (1, *shape))[0]
    return resample_image(plane[None], (1, *shape))[0]


def overlay_slices(ct: Volume, result: SegmentationResult, axial_fractions=(0.3, 0.5, 0.7)) -> np.ndarray:
    """RGB uint8 image: axial slices at ``axial_fractions`` of the S extent, then the mid-coronal slice,
    in radiological convention (patient's right on the image's left, anterior up, superior up)."""
    canonical_ct, _ = to_canonical(ct)
    canonical_labels, _ = to_canonical(result.volume)
    array, labels = canonical_ct.array.astype(np.float32), canonical_labels.array
    sk, sj, si = canonical_ct.spacing[::-1]
    colors = np.zeros((int(labels.max()) + 1 if labels.size else 1, 3))
    for segment in result.segments:
        if segment.value < len(colors):
            colors[segment.value] = segment.color
    panels = []
    for fraction in axial_fractions:
        k = min(array.shape[0] - 1, int(fraction * array.shape[0]))
        # axial (j, i): j runs towards A and i towards R; flip both for anterior up, patient's right on the left
        ct_plane, label_plane = array[k, ::-1, ::-1], labels[k, ::-1, ::-1]
        panels.append(_panel(_to_screen(ct_plane, (sj, si), False), _to_screen(label_plane, (sj, si), True), colors))
    j = array.shape[1] // 2
    coronal_ct, coronal_labels = array[::-1, j, ::-1], labels[::-1, j, ::-1]  # superior up, right on the left
    panels.append(_panel(_to_screen(coronal_ct, (sk, si), False), _to_screen(coronal_labels, (sk, si), True), colors))
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    return (np.concatenate(padded, axis=1) * 255).round().astype(np.uint8)


def write_overlay_png(ct: Volume, result: SegmentationResult, path: str | Path) -> Path:
    """Write ``overlay_slices`` as a PNG, atomically."""
    image = sitk.GetImageFromArray(overlay_slices(ct, result), isVector=True)
    with atomic_output_file(Path(path)) as staging:
        sitk.WriteImage(image, str(staging))
    return Path(path).resolve()
