"""Geometry as TotalSegmentator handles it: closest canonical RAS, image resampled to the model
spacing, labels mapped back to the input grid by nearest neighbour (never per-class probabilities).

Arrays are in (k, j, i) order throughout (SimpleITK, Slicer, nnU-Net's SimpleITKIO). After
``to_canonical`` axis i runs towards R, j towards A, k towards S.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform
from torch.nn import functional

from .volume import Volume

CANONICAL = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass(frozen=True)
class Reorientation:
    """How the input's voxel axes were permuted and flipped to reach canonical RAS."""

    orientation: np.ndarray  # nibabel ornt of the input grid (per axis i, j, k: RAS axis, direction)
    input_shape_ijk: tuple[int, int, int]

    def restore(self, array_kji: np.ndarray) -> np.ndarray:
        """An array on the canonical grid put back on the input grid (exact: permutation and flips)."""
        back = ornt_transform(CANONICAL, self.orientation)
        restored = apply_orientation(array_kji.T, back)
        assert restored.shape == self.input_shape_ijk
        return np.ascontiguousarray(restored.T)


def to_canonical(volume: Volume) -> tuple[Volume, Reorientation]:
    """``volume`` with its axes permuted/flipped to the closest canonical RAS orientation (no resampling)."""
    orientation = io_orientation(volume.ijk_to_ras)
    shape_ijk = volume.array.T.shape
    array = np.ascontiguousarray(apply_orientation(volume.array.T, orientation).T)
    matrix = volume.ijk_to_ras @ inv_ornt_aff(orientation, shape_ijk)
    return Volume(array, matrix), Reorientation(orientation, tuple(int(s) for s in shape_ijk))


def resampled_shape(shape: tuple[int, ...], spacing: np.ndarray, target: np.ndarray) -> tuple[int, ...]:
    """Voxels per axis covering the same extent at ``target`` spacing (at least one)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target, strict=True))


def resample_image(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Trilinear resampling of a (k, j, i) image to ``shape``; voxel centres keep their physical place
    (the grid's outer edges are preserved, ``align_corners=False``)."""
    if tuple(array.shape) == tuple(shape):
        return array.astype(np.float32, copy=False)
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None, None]
    return functional.interpolate(tensor, size=shape, mode="trilinear", align_corners=False)[0, 0].numpy()


def resampled_matrix(ijk_to_ras: np.ndarray, shape_kji: tuple[int, ...], new_shape_kji: tuple[int, ...]) -> np.ndarray:
    """IJK→RAS of the grid ``resample_image`` produces."""
    scale = np.array(shape_kji[::-1], dtype=float) / np.array(new_shape_kji[::-1], dtype=float)
    step = np.eye(4)
    step[:3, :3] = np.diag(scale)
    step[:3, 3] = (scale - 1) / 2
    return ijk_to_ras @ step


def nearest_indices(source: int, target: int) -> np.ndarray:
    """For each of ``target`` voxels, the index of the ``source`` voxel whose extent holds its centre."""
    centres = (np.arange(target) + 0.5) * (source / target)
    return np.clip(np.floor(centres).astype(np.int64), 0, source - 1)


def resample_labels_nearest(labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A label array taken to ``shape`` (same extent) by nearest neighbour; no probabilities involved."""
    if tuple(labels.shape) == tuple(shape):
        return labels
    for axis, (source, target) in enumerate(zip(labels.shape, shape, strict=True)):  # one axis at a time: a
        if source != target:  # third of the time of one 3D gather on a clinical CT
            labels = np.take(labels, nearest_indices(source, target), axis=axis)
    return labels
