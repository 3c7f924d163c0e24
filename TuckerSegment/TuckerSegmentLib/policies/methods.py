"""The one vocabulary of compression methods, shared by the CLI, the Slicer Logic and ``tucker.json``.

A method is what a user picks (a FLOP, parameter or time budget, the paper's uniform factor, an energy
threshold, VBMF; or, as baselines, filter pruning to a FLOP budget by L1 norm, geometric median or Taylor
importance on labelled CTs) with one number, its target; ``policy_for`` turns a rank method and its target
into the engine's rank policy (pruning methods are no rank policies: ``compress.folder.prune_model_folder``)
and ``policy_from_dict`` rebuilds a policy recorded in ``tucker.json``. Importing this module
needs no torch: the policies are imported when one is made.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PolicyError

if TYPE_CHECKING:
    from .base import RankPolicy


@dataclass(frozen=True)
class Method:
    """One compression method: its key, how it is shown, and what its target means."""

    key: str
    label: str
    target: str  # what the number means; "" when the method takes none
    default: float | None = None  # the target when none is given (None: it must be given)
    prunes: bool = False  # removes whole filters (compress.pruning) instead of setting Tucker ranks
    needs_labels: bool = False  # needs labelled CTs (label maps beside the calibration CTs)

    @property
    def criterion(self) -> str | None:
        """The pruning criterion of a pruning method (``l1``, ``fpgm``, ``taylor``), else ``None``."""
        return self.key.removeprefix(PRUNE_PREFIX) if self.prunes else None


METHODS = (
    Method("flops", "FLOP budget", "fraction of the original FLOPs kept", 0.5),
    Method("params", "Parameter budget", "fraction of the original parameters kept", 0.5),
    Method("latency", "Time budget (this device)", "fraction of the original's time per patch kept, measured", 0.5),
    Method("uniform", "Uniform factor (paper)", "fraction of channels each factor keeps (the paper's DF, e.g. 0.7)"),
    Method("energy", "Energy kept", "fraction of each layer's spectral energy kept", 0.95),
    Method("vbmf", "VBMF (automatic ranks)", ""),
    Method("prune-l1", "Filter pruning, L1 norm (baseline)", "fraction of the original FLOPs kept", 0.5, prunes=True),
    Method("prune-fpgm", "Filter pruning, geometric median (baseline)", "fraction of the original FLOPs kept", 0.5,
           prunes=True),
    Method("prune-taylor", "Filter pruning, Taylor on labelled CTs (baseline)", "fraction of the original FLOPs kept",
           0.5, prunes=True, needs_labels=True),
)
DEFAULT_METHOD = "flops"
PRUNE_PREFIX = "prune-"
RANK_METHODS = tuple(m for m in METHODS if not m.prunes)  # the methods that choose Tucker ranks
PRUNING_METHODS = tuple(m for m in METHODS if m.prunes)


def method(key: str) -> Method:
    """The method called ``key``; ``PolicyError`` naming the known ones otherwise."""
    for candidate in METHODS:
        if candidate.key == key:
            return candidate
    raise PolicyError(f"unknown compression method {key!r}; choose one of {', '.join(m.key for m in METHODS)}")


def policy_for(key: str = DEFAULT_METHOD, target: float | None = None, *, device: str = "auto",
               runtime: str = "auto", rank_min: int = 8) -> RankPolicy:
    """The rank policy for method ``key`` and its ``target`` (``None``: the method's default).
    ``device`` and ``runtime`` are where a time budget is measured; ``rank_min`` the uniform rule's
    smallest rank."""
    from .budget import BudgetPolicy
    from .spectral import EnergyPolicy, VBMFPolicy
    from .uniform import UniformPolicy
    chosen = method(key)
    if chosen.prunes:
        raise PolicyError(f"{chosen.key} prunes filters, it sets no Tucker ranks: it is not a rank policy; prune with "
                          f"prune_model_folder(..., criterion={chosen.criterion!r}) or tuckersegment compress "
                          f"--method {chosen.key}")
    if not chosen.target:
        if target is not None:
            raise PolicyError(f"the {chosen.key} method chooses its ranks itself; give it no target")
        return VBMFPolicy()
    target = chosen.default if target is None else target
    if target is None:
        raise PolicyError(f"the {chosen.key} method needs a target: the {chosen.target}")
    if chosen.key == "flops":
        return BudgetPolicy(target_flops=target)
    if chosen.key == "params":
        return BudgetPolicy(target_params=target)
    if chosen.key == "latency":
        return BudgetPolicy(target_latency=target, device=device, runtime=runtime)
    if chosen.key == "uniform":
        return UniformPolicy(target, rank_min=rank_min)
    return EnergyPolicy(target)


def describe_policy(data: Mapping[str, Any]) -> str:
    """One line for a policy recorded in ``tucker.json``: the rank policy's repr, or e.g.
    ``prune-l1(target_flops=0.5)`` for a pruned model."""
    name = data.get("name")
    if isinstance(name, str) and name.startswith(PRUNE_PREFIX):
        params = data.get("params") if isinstance(data.get("params"), dict) else {}
        return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in params.items()) + ")"
    return repr(policy_from_dict(data))


def policy_in_words(data: Mapping[str, Any]) -> str:
    """A recorded policy (``RankPolicy.to_dict``, or a pruning record) as a user would say it, e.g. "ranks for 70 %
    of the original's time per patch (measured on this machine)"."""
    name = data.get("name")
    params = data.get("params") if isinstance(data.get("params"), dict) else {}
    if isinstance(name, str) and name.startswith(PRUNE_PREFIX):
        return f"filters pruned by {name.removeprefix(PRUNE_PREFIX)} to {params.get('target_flops', 0.5):.0%} of the FLOPs"
    if name == "budget":
        for key, what in (("target_latency", "the original's time per patch (measured on this machine)"),
                          ("target_flops", "the original's FLOPs"), ("target_params", "the original's parameters")):
            if params.get(key) is not None:
                return f"ranks for {params[key]:.0%} of {what}"
    if name == "uniform":
        return f"every rank {params.get('factor')} of the original's (the paper's uniform rule)"
    if name == "energy":
        return f"ranks keeping {params.get('keep'):.0%} of each layer's energy"
    return describe_policy(data)


def policy_from_dict(data: Mapping[str, Any]) -> RankPolicy:
    """Rebuild a policy recorded by ``RankPolicy.to_dict`` (as in ``tucker.json``)."""
    from .budget import BudgetPolicy
    from .spectral import EnergyPolicy, VBMFPolicy
    from .uniform import UniformPolicy
    known = {cls.name: cls for cls in (UniformPolicy, EnergyPolicy, VBMFPolicy, BudgetPolicy)}
    try:
        cls = known[data["name"]]
    except KeyError as exc:
        raise PolicyError(f"unknown rank policy {data.get('name')!r}; known policies: {', '.join(sorted(known))}") from exc
    return cls(**data.get("params", {}))
