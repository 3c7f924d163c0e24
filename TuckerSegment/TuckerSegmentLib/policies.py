"""Rank policies: given every decomposable layer of a network at once, decide each layer's plan.

A policy sees the whole network (so global budgets fit the same interface), may read calibration
statistics (per-layer activation statistics keyed by layer name), and returns a ``LayerPlan`` per layer:
dense, Tucker-2, or one-sided (input or output factor only). Policies are recorded in
``tucker.json`` as ``{"name": ..., "params": {...}}`` and rebuilt with ``policy_from_dict``.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .decomposition import LayerPlan
from .errors import PolicyError


@dataclass(frozen=True)
class LayerInfo:
    """What a policy knows about one decomposable layer.

    ``flops`` is the layer's dense cost for one forward pass of the example input (``None`` when
    no example input was given); ``input_shape`` is the shape it receives in that pass.
    """

    name: str
    weight: torch.Tensor
    layer_type: str
    c_out: int
    c_in: int
    kernel_size: tuple[int, ...]
    flops: int | None = None
    input_shape: tuple[int, ...] | None = None


class RankPolicy(ABC):
    """Decides a ``LayerPlan`` for every layer. Subclasses set ``name`` and implement ``plan``."""

    name: ClassVar[str]
    _registry: ClassVar[dict[str, type[RankPolicy]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            RankPolicy._registry[cls.name] = cls

    @abstractmethod
    def params(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: ``type(self)(**self.params())`` rebuilds it."""

    @abstractmethod
    def plan(self, layers: Sequence[LayerInfo], calibration: Mapping[str, Any] | None = None) -> dict[str, LayerPlan]:
        """A plan for each layer name; layers left out stay dense."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def policy_from_dict(data: Mapping[str, Any]) -> RankPolicy:
    """Rebuild a policy recorded by ``RankPolicy.to_dict``."""
    try:
        cls = RankPolicy._registry[data["name"]]
    except KeyError as exc:
        known = ", ".join(sorted(RankPolicy._registry))
        raise PolicyError(f"unknown rank policy {data.get('name')!r}; known policies: {known}") from exc
    return cls(**data.get("params", {}))


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
