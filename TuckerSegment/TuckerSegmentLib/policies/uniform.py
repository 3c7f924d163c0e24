"""The paper's rank rule (Weber et al. 2024): one factor for every layer and channel mode."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import PolicyError
from ..tucker.decomposition import LayerPlan
from ..tucker.layers import LayerInfo
from .base import RankPolicy


class UniformPolicy(RankPolicy):
    """The paper's rule: r = min(C, max(rank_min, ceil(C · factor))) on both channel modes of every layer."""

    name = "uniform"

    def __init__(self, factor: float, rank_min: int = 8) -> None:
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
            raise PolicyError(f"factor must be a number in (0, 1], got {factor!r}: "
                              "it is the fraction of channels each factor keeps (the paper uses 0.9 … 0.05)")
        if isinstance(rank_min, bool) or not isinstance(rank_min, int) or rank_min < 1:
            raise PolicyError(f"rank_min must be a positive integer, got {rank_min!r} (the paper uses 8 or 16)")
        self.factor = float(factor)
        self.rank_min = rank_min

    def params(self) -> dict[str, Any]:
        return {"factor": self.factor, "rank_min": self.rank_min}

    def rank(self, channels: int) -> int:
        # round() first so that e.g. 320 · 0.7 = 223.99999999999997 counts as 224, not 225 or 223
        return min(channels, max(self.rank_min, math.ceil(round(channels * self.factor, 9))))

    def plan(self, layers: Sequence[LayerInfo], calibration: Mapping[str, Any] | None = None) -> dict[str, LayerPlan]:
        return {layer.name: LayerPlan(rank_out=self.rank(layer.c_out), rank_in=self.rank(layer.c_in))
                for layer in layers}
