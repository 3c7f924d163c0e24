"""A compression review's figures and the Pareto front, without torch (the Slicer Logic shows them)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class ModelFigures:
    """One model's costs for one forward pass of a patch."""

    params: int
    flops: int
    weight_bytes: int
    seconds: float | None = None
    peak_bytes: int | None = None


@dataclass
class CompressionReview:
    """Original and compressed model compared (see the module docstring)."""

    source: str
    output: str
    policy: dict[str, Any]
    device: str
    original: ModelFigures
    compressed: ModelFigures
    agreement: float | None = None  # mean Dice of compressed vs original labels on the calibration volumes
    agreement_volumes: int = 0
    peak_memory: str = ""  # how peak memory was measured
    runtime: str = "PyTorch"  # what ran the timed patches (the runtime segmentation uses on this device)
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(quantity, original, compressed, compressed/original) as text, for a table."""
        def ratio(a: float | None, b: float | None) -> str:
            return f"{b / a:.3f}" if a and b is not None else ""
        a, b = self.original, self.compressed
        rows = [("Parameters (M)", f"{a.params / 1e6:.2f}", f"{b.params / 1e6:.2f}", ratio(a.params, b.params)),
                ("GFLOPs per patch", f"{a.flops / 1e9:.1f}", f"{b.flops / 1e9:.1f}", ratio(a.flops, b.flops)),
                ("Weights (MB)", f"{a.weight_bytes / 1e6:.1f}", f"{b.weight_bytes / 1e6:.1f}",
                 ratio(a.weight_bytes, b.weight_bytes))]
        if a.peak_bytes is not None and b.peak_bytes is not None:
            rows.append(("Peak memory per patch (MB)", f"{a.peak_bytes / 1e6:.0f}", f"{b.peak_bytes / 1e6:.0f}",
                         ratio(a.peak_bytes, b.peak_bytes)))
        if a.seconds is not None and b.seconds is not None:
            rows.append((f"Time per patch (s, {self.device}, {self.runtime})", f"{a.seconds:.3f}", f"{b.seconds:.3f}",
                         ratio(a.seconds, b.seconds)))
        if self.agreement is not None:
            rows.append((f"Dice vs original ({self.agreement_volumes} volumes)", "1.000", f"{self.agreement:.3f}", ""))
        return rows

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CompressionReview:
        """The review a worker process sent (``to_json``)."""
        return cls(**{**data, "original": ModelFigures(**data["original"]),
                      "compressed": ModelFigures(**data["compressed"])})


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (cost, quality) points no other point beats, cheapest first: each is of higher quality than
    every cheaper point (of equal cost, only the best counts)."""
    front: list[tuple[float, float]] = []
    for cost, quality in sorted(points, key=lambda point: (point[0], -point[1])):
        if not front or quality > front[-1][1]:
            front.append((cost, quality))
    return front
