"""Rank policies: given every decomposable layer of a network at once, decide each layer's plan.

A policy sees the whole network (so global budgets fit the same interface), may read calibration
statistics (per-layer activation statistics keyed by layer name), and returns a ``LayerPlan`` per layer:
dense, Tucker-2, or one-sided (input or output factor only). Policies are recorded in
``tucker.json`` as ``{"name": ..., "params": {...}}`` and rebuilt with ``methods.policy_from_dict``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from ..tucker.decomposition import LayerPlan
from ..tucker.layers import LayerInfo


class RankPolicy(ABC):
    """Decides a ``LayerPlan`` for every layer. Subclasses set ``name`` and implement ``plan``."""

    name: ClassVar[str]

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
