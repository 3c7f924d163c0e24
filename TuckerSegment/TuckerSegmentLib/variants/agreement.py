"""How far a compressed variant's labels agree with its original's, per structure, and the rule ``auto``
applies to that agreement.

Agreement is Dice between the variant's and the original's label maps for each structure, pooled over
the scored region of every scored volume (sums of overlaps and sizes, so a small volume does not weigh
as much as a large one). A structure counts towards the per-structure floor when the original labels
at least ``MIN_VOXELS`` voxels of it in the scored region (fewer: a handful of voxels decide its Dice).
Thresholds: docs/guide/variants.md; the evidence for them: docs/guide/demo-model.md ("Evidence for the agreement thresholds").
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

MEAN_FLOOR = 0.97  # mean agreement over the structures either model labels
STRUCTURE_FLOOR = 0.90  # every structure with at least MIN_VOXELS voxels
MIN_VOXELS = 1000


@dataclass
class Overlap:
    """Pooled voxel counts per structure name: the original's, the variant's, and both."""

    original: dict[str, int] = field(default_factory=dict)
    variant: dict[str, int] = field(default_factory=dict)
    both: dict[str, int] = field(default_factory=dict)

    def add(self, variant: np.ndarray, original: np.ndarray, names: Mapping[int, str],
            region: np.ndarray | None = None) -> None:
        """Count one volume's labels (same grid), inside ``region`` (bool, same shape) when given."""
        if variant.shape != original.shape:
            raise ValueError(f"label maps of shapes {variant.shape} and {original.shape} cannot be compared")
        if region is not None:
            variant, original = variant[region], original[region]
        size = max(names, default=0) + 1
        a, b = np.bincount(variant.ravel(), minlength=size), np.bincount(original.ravel(), minlength=size)
        same = np.bincount(variant.ravel()[variant.ravel() == original.ravel()], minlength=size)
        for value, name in names.items():
            self.variant[name] = self.variant.get(name, 0) + int(a[value])
            self.original[name] = self.original.get(name, 0) + int(b[value])
            self.both[name] = self.both.get(name, 0) + int(same[value])

    def structures(self) -> dict[str, dict[str, Any]]:
        """Per structure either model labels: its Dice and the original's voxel count."""
        return {name: {"dice": round(2 * self.both[name] / (self.original[name] + self.variant[name]), 4),
                       "voxels": self.original[name]}
                for name in self.original if self.original[name] + self.variant[name] > 0}


def mean_agreement(structures: Mapping[str, Mapping[str, Any]]) -> float | None:
    values = [float(s["dice"]) for s in structures.values()]
    return round(float(np.mean(values)), 4) if values else None


def weakest(structures: Mapping[str, Mapping[str, Any]], min_voxels: int = MIN_VOXELS) -> tuple[str, float] | None:
    """The structure with the lowest agreement among those with at least ``min_voxels`` voxels."""
    counted = [(name, float(s["dice"])) for name, s in structures.items() if s["voxels"] >= min_voxels]
    return min(counted, key=lambda item: item[1]) if counted else None


def verdict(structures: Mapping[str, Mapping[str, Any]], mean_floor: float = MEAN_FLOOR,
            structure_floor: float = STRUCTURE_FLOOR, min_voxels: int = MIN_VOXELS) -> tuple[bool, str]:
    """Whether the agreement passes ``auto``'s rule, and a short text with the figures."""
    mean = mean_agreement(structures)
    if mean is None:
        return False, "no structure labelled in the scored region: agreement unknown"
    low = weakest(structures, min_voxels)
    text = f"agreement {mean:.3f}" + (f" (lowest {low[1]:.3f}, {low[0]})" if low else "")
    failures = [f"mean below {mean_floor:.2f}"] if mean < mean_floor else []
    if low is not None and low[1] < structure_floor:
        failures.append(f"{low[0]} below {structure_floor:.2f}")
    return not failures, f"{text}: {'; '.join(failures)}" if failures else text



def ground_truth_verdict(structures: Mapping[str, Mapping[str, Any]], dice_limit: float,
                         min_voxels: int = MIN_VOXELS) -> tuple[bool, str]:
    """Where reference labels exist (the bundled demo): the mean Dice loss against the original within
    ``dice_limit`` and no structure with at least ``min_voxels`` reference voxels losing more than
    ``1 - STRUCTURE_FLOOR``. ``structures``: name -> {"dice", "original_dice", "voxels"}."""
    losses = {name: float(s["original_dice"]) - float(s["dice"]) for name, s in structures.items()
              if s.get("dice") is not None and s.get("original_dice") is not None}
    if not losses:
        return False, "no structure scored against the reference"
    mean = float(np.mean(list(losses.values())))
    counted = [(loss, name) for name, loss in losses.items() if structures[name]["voxels"] >= min_voxels]
    worst = max(counted) if counted else None
    text = f"held-out Dice loss {100 * mean:.1f} points" + (
        f" (largest {100 * worst[0]:.1f}, {worst[1]})" if worst else "")
    failures = [f"over the {100 * dice_limit:.0f}-point limit"] if mean > dice_limit + 1e-9 else []
    if worst is not None and worst[0] > 1 - STRUCTURE_FLOOR + 1e-9:
        failures.append(f"{worst[1]} loses more than {100 * (1 - STRUCTURE_FLOOR):.0f} points")
    return not failures, f"{text}: {'; '.join(failures)}" if failures else text
