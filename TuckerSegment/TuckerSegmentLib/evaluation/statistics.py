"""Per-class Dice and the paired statistics that judge a compressed model against its original.

A class absent from both label maps of a case has no Dice there (``nan``) and that case does not count
for it. The paired test is Wilcoxon's signed-rank test over cases (scipy; exact p for small samples
without ties), two-sided, zero differences dropped (Wilcoxon's own rule); p-values of all classes are
corrected together with Holm's step-down method. Below ``MIN_CASES`` paired cases no test is made: with
five cases even the most extreme outcome has an exact two-sided p of 0.0625.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

MIN_CASES = 6
ALPHA = 0.05
TOO_FEW = "too few cases"


def overlaps(prediction: np.ndarray, reference: np.ndarray, classes: Mapping[int, str],
             region: np.ndarray | None = None) -> dict[str, tuple[int, int]]:
    """Per class (twice the voxels both label maps give it, the voxels each gives it summed): Dice's numerator
    and denominator, inside ``region`` when given; sums of these over cases give the pooled Dice."""
    if prediction.shape != reference.shape:
        raise ValueError(f"label maps of shapes {prediction.shape} and {reference.shape} cannot be compared")
    if region is not None:
        prediction, reference = prediction[region], reference[region]
    size = max(max(classes, default=0), int(prediction.max(initial=0)), int(reference.max(initial=0))) + 1
    a = np.bincount(prediction.ravel(), minlength=size)
    b = np.bincount(reference.ravel(), minlength=size)
    both = np.bincount(prediction.ravel()[prediction.ravel() == reference.ravel()], minlength=size)
    return {name: (2 * int(both[value]), int(a[value] + b[value])) for value, name in classes.items()}


def dice(counts: tuple[int, int]) -> float:
    """Dice from ``overlaps`` counts; ``nan`` for a class neither label map holds."""
    return counts[0] / counts[1] if counts[1] else float("nan")


def dice_per_class(prediction: np.ndarray, reference: np.ndarray, classes: Mapping[int, str],
                   region: np.ndarray | None = None) -> dict[str, float]:
    """Dice of each class between two label maps of one grid (inside ``region`` when given); ``nan`` for a
    class neither map holds."""
    return {name: dice(counts) for name, counts in overlaps(prediction, reference, classes, region).items()}


@dataclass(frozen=True)
class PairedTest:
    """Wilcoxon's signed-rank test of one class over paired cases: ``statistic`` is W (the smaller of the
    positive and negative rank sums), ``p`` two-sided (``None`` below ``MIN_CASES`` cases), ``n`` the paired
    cases, ``median_difference`` the median of (compressed - original)."""

    n: int
    statistic: float | None
    p: float | None
    median_difference: float | None
    note: str = ""


def wilcoxon(compressed: Sequence[float], original: Sequence[float]) -> PairedTest:
    """Wilcoxon's signed-rank test of paired values; pairs with a ``nan`` are left out."""
    a, b = np.asarray(compressed, dtype=float), np.asarray(original, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values must be two sequences of one length, got {a.shape} and {b.shape}")
    keep = ~(np.isnan(a) | np.isnan(b))
    differences = a[keep] - b[keep]
    n = int(differences.size)
    median = float(np.median(differences)) if n else None
    if n < MIN_CASES:
        return PairedTest(n, None, None, median, TOO_FEW)
    if not np.any(differences):
        return PairedTest(n, 0.0, 1.0, median, "identical on every case")
    result = stats.wilcoxon(differences, zero_method="wilcox", alternative="two-sided")
    return PairedTest(n, float(result.statistic), float(result.pvalue), median)


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values (``None`` stays ``None`` and does not count)."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m = len(indexed)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted
