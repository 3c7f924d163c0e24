"""The real chest CT that ``slicerio`` ships, with its seven-structure segmentation, and the held-out
region the bundled demo model never trained on.

``CTChest4.nrrd``: 128×128×34 voxels at 3.05×3.05×10 mm. ``Segmentation.seg.nrrd``: ribs, cervical,
thoracic and lumbar vertebral column, right lung, left lung, tissue (one layer, labels 1-7).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import slicerio

from ..compress.calibration_source import SAMPLE_CT, sample_ct
from ..image.geometry import resample_image, resampled_matrix
from ..image.holdout import holdout_mask  # noqa: F401 (scripts and tests import it from here)
from ..image.volume import Volume, read_volume

SAMPLE_SEGMENTATION = "Segmentation.seg.nrrd"


@dataclass
class ChestSample:
    ct: Volume
    labels: np.ndarray  # (k, j, i) on the CT grid, 0 = background
    segments: list[dict[str, Any]]  # slicerio segment entries (name, colour, terminology, labelValue)


def chest_sample() -> ChestSample:
    """The sample CT and its reference labels on the CT grid."""
    ct = read_volume(sample_ct())
    segmentation = slicerio.read_segmentation(slicerio.get_testdata_file(SAMPLE_SEGMENTATION))
    labels = np.ascontiguousarray(np.asarray(segmentation["voxels"]).T)  # slicerio gives (i, j, k)
    offset = np.asarray(segmentation.get("referenceImageExtentOffset", [0, 0, 0]))
    if labels.shape != ct.array.shape or np.any(offset != 0):
        raise RuntimeError(f"{SAMPLE_SEGMENTATION} is not on the grid of {SAMPLE_CT}; slicerio's sample data changed")
    return ChestSample(ct=ct, labels=labels, segments=segmentation["segments"])


def large_chest_ct(sample: ChestSample | None = None) -> Volume:
    """The sample CT resampled (trilinear) to 0.75 × 0.75 × 1.5 mm, 512 × 512 × 227 voxels: the size of a
    clinical chest CT, for timing whole volumes."""
    ct = (sample or chest_sample()).ct
    shape = (227, 512, 512)
    return Volume(resample_image(ct.array, shape).round().astype(np.int16),
                  resampled_matrix(ct.ijk_to_ras, ct.array.shape, shape))


def training_half_ct(sample: ChestSample, held: np.ndarray) -> Volume:
    """The sample CT with each ``held`` voxel replaced by its left-right mirror voxel, which lies in the training
    half (the checkerboard alternates along i): what recovery on the training half may see. The held-out
    blocks are never seen, as labels or as images, and the image stays anatomy (blocks set to air instead
    taught the network air holes: distilled on them the 30 % point lost Dice, 0.734 -> 0.712)."""
    mirrored = held[:, :, ::-1]
    if (held & mirrored).any():
        raise ValueError("the held-out mask is not mirror-alternating along i; no training voxel mirrors it")
    array = sample.ct.array
    return Volume(np.where(held, array[:, :, ::-1], array).astype(np.float32), sample.ct.ijk_to_ras)


def held_out_dice(labels: np.ndarray, sample: ChestSample, held: np.ndarray) -> float:
    """Mean Dice over the sample's structures of ``labels`` (on the CT grid) within the ``held`` mask."""
    scores = []
    for value in np.unique(sample.labels[sample.labels > 0]):
        a, b = labels[held] == value, sample.labels[held] == value
        if a.sum() + b.sum():
            scores.append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
    return float(np.mean(scores))
