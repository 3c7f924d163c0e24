"""Reorientation, resampling and label mapping keep every voxel at its physical place."""
from __future__ import annotations

import numpy as np
import pytest
from TuckerSegmentLib.image.geometry import (
    nearest_indices,
    resample_image,
    resample_labels_nearest,
    resampled_matrix,
    resampled_shape,
    to_canonical,
)
from TuckerSegmentLib.image.volume import Volume


def rotation(axis: int, degrees: float) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def matrix(directions: np.ndarray, spacing: tuple[float, float, float], origin=(10.0, -20.0, 30.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = directions * np.array(spacing)
    m[:3, 3] = origin
    return m


ORIENTATIONS = {
    "RAS": np.eye(3),
    "LPS": np.diag([-1.0, -1.0, 1.0]),
    "PIL (permuted)": np.array([[0.0, 0, -1], [-1, 0, 0], [0, -1, 0]]),
    "oblique": rotation(2, 25) @ rotation(0, -15),
}


def ras_of(volume: Volume, kji: np.ndarray) -> np.ndarray:
    """RAS coordinates of (k, j, i) voxel indices."""
    ijk = np.c_[kji[:, ::-1], np.ones(len(kji))]
    return (volume.ijk_to_ras @ ijk.T).T[:, :3]


@pytest.mark.parametrize("name", ORIENTATIONS)
def test_canonical_axes_point_to_ras_and_voxels_keep_their_position(name):
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(size=(5, 6, 7)), matrix(ORIENTATIONS[name], (0.8, 1.2, 2.5)))
    canonical, reorientation = to_canonical(volume)
    directions = canonical.ijk_to_ras[:3, :3]
    assert np.all(np.argmax(np.abs(directions), axis=0) == [0, 1, 2])  # i→R/L, j→A/P, k→S/I
    assert np.all(np.diag(directions) > 0)  # … towards R, A and S
    # the same value sits at the same RAS point in both grids
    value = float(volume.array[1, 2, 3])
    where = np.argwhere(canonical.array == value)
    assert len(where) == 1
    np.testing.assert_allclose(ras_of(canonical, where), ras_of(volume, np.array([[1, 2, 3]])), atol=1e-9)
    np.testing.assert_array_equal(reorientation.restore(canonical.array), volume.array)


def test_resampled_grid_covers_the_same_extent_with_centres_in_place():
    spacing = np.array([10.0, 3.0, 3.0])  # k j i
    shape = (30, 64, 50)
    target = np.array([3.0, 1.5, 1.5])
    new_shape = resampled_shape(shape, spacing, target)
    assert new_shape == (100, 128, 100)
    ijk_to_ras = np.diag([3.0, 3.0, 10.0, 1.0])
    new = resampled_matrix(ijk_to_ras, shape, new_shape)
    np.testing.assert_allclose(np.linalg.norm(new[:3, :3], axis=0), [1.5, 1.5, 3.0])
    # first voxel's outer corner stays the volume's outer corner (half a voxel before the first centre)
    np.testing.assert_allclose(new[:3, 3] - np.array([0.75, 0.75, 1.5]), ijk_to_ras[:3, 3] - np.array([1.5, 1.5, 5.0]))
    ramp = np.broadcast_to(np.arange(shape[2], dtype=np.float32), shape)  # linear in i
    out = resample_image(ramp, new_shape)
    # trilinear resampling of a linear ramp is exact away from the edges: value = physical i position
    centre_i = (np.arange(new_shape[2]) + 0.5) * shape[2] / new_shape[2] - 0.5
    np.testing.assert_allclose(out[5, 5, 2:-2], centre_i[2:-2], atol=1e-4)


def test_labels_go_back_by_nearest_neighbour_exactly_for_integer_ratios():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, size=(6, 8, 10)).astype(np.uint8)
    up = resample_labels_nearest(labels, (12, 16, 30))
    assert np.array_equal(resample_labels_nearest(up, labels.shape), labels)
    assert set(np.unique(up)) <= set(np.unique(labels))  # no interpolated label values


def test_nearest_indices_pick_the_voxel_holding_each_centre():
    np.testing.assert_array_equal(nearest_indices(4, 8), [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(nearest_indices(3, 2), [0, 2])
    np.testing.assert_array_equal(nearest_indices(5, 5), np.arange(5))
