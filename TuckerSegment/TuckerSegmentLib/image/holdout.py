"""Held-out blocks: one CT split into two interleaved halves, so that compression can be calibrated on
one half and scored on the other without leakage when only one volume is at hand."""
from __future__ import annotations

import numpy as np

HOLDOUT_BLOCKS = (4, 2, 2)  # checkerboard blocks along k, j, i


def holdout_mask(shape: tuple[int, int, int], blocks: tuple[int, int, int] = HOLDOUT_BLOCKS) -> np.ndarray:
    """True on the held-out half of a checkerboard of ``blocks`` along k, j, i (``~mask`` is the other half):
    every z slab keeps two diagonal quadrants, so each structure of a chest CT (cervical at the top, lumbar
    at the bottom, left and right lung) appears in both halves."""
    if len(shape) != 3 or len(blocks) != 3:
        raise ValueError(f"holdout_mask takes a (k, j, i) shape and three block counts, got {shape} and {blocks}")
    if any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= n
           for n, b in zip(shape, blocks, strict=True)):
        raise ValueError(f"blocks {tuple(blocks)} must be whole numbers between 1 and the voxels along each axis "
                         f"{tuple(shape)}")
    k, j, i = _block_index(shape, blocks)
    return (k + j + i) % 2 == 1


def holdout_blocks(shape: tuple[int, int, int], blocks: tuple[int, int, int] = HOLDOUT_BLOCKS) -> list[np.ndarray]:
    """The held-out half of ``holdout_mask`` as its separate blocks (bool masks), k-major: the cases an
    evaluation on one CT scores one by one."""
    held = holdout_mask(shape, blocks)
    k, j, i = _block_index(shape, blocks)
    flat = (k * blocks[1] + j) * blocks[2] + i
    return [held & (flat == number) for number in range(blocks[0] * blocks[1] * blocks[2])
            if (held & (flat == number)).any()]


def _block_index(shape: tuple[int, int, int], blocks: tuple[int, int, int]) -> list[np.ndarray]:
    index = [np.minimum(np.arange(n) * b // n, b - 1) for n, b in zip(shape, blocks, strict=True)]
    return np.meshgrid(*index, indexing="ij")
