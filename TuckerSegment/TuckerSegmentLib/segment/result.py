"""A segmentation's outcome: labels on the input grid and what produced them (no torch: the Slicer
Logic reads it back from the worker process)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..image.volume import Volume
from .labels import SegmentLabel


@dataclass
class SegmentationResult:
    """Labels on the input grid (``volume.array``, (k, j, i)) and the model's segment descriptions."""

    volume: Volume
    segments: list[SegmentLabel]
    model: str
    device: str
    seconds: float
    tiles: int
    policy: str = "original"  # how the model was compressed, e.g. "UniformPolicy(factor=0.7, rank_min=8)"
    warnings: list[str] = field(default_factory=list)
    runtime: str = "PyTorch"  # which runtime ran the network, at which precision, and why

    @property
    def labels(self) -> np.ndarray:
        return self.volume.array

    def voxel_counts(self) -> dict[str, int]:
        """Voxels per segment name (zero for segments the model did not find)."""
        counts = np.bincount(self.labels.ravel(), minlength=max((s.value for s in self.segments), default=0) + 1)
        return {s.name: int(counts[s.value]) for s in self.segments}

    def found(self) -> list[SegmentLabel]:
        counts = self.voxel_counts()
        return [s for s in self.segments if counts[s.name] > 0]
