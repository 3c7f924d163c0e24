"""Global budgets: FLOPs, parameters and/or measured time kept, allocated across layers with the least error."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

from ..errors import PolicyError
from ..progress import stage
from ..runtime.execution import latency_grid
from ..tucker.decomposition import LayerPlan
from ..tucker.layers import LayerInfo
from .base import RankPolicy
from .spectral import discarded_energy, mode_energies


@dataclass(frozen=True)
class _Option:
    plan: LayerPlan
    flops: float
    params: float
    error: float
    latency: float = 0.0  # seconds of the fastest execution on the target device (latency budgets only)


class LatencyModel(Protocol):
    """Measured time of one layer's plan in its fastest execution, and of the rest of the network
    (see ``execution.NetworkLatency``)."""

    other_seconds: float
    scale: float

    def layer_seconds(self, info: LayerInfo, plan: LayerPlan) -> float: ...

    def original_seconds(self, info: LayerInfo) -> float: ...


def _rank_grid(channels: int, steps: int = 64) -> list[int]:
    """Candidate ranks 1 … channels: all of them for narrow layers, ``steps`` evenly spaced otherwise."""
    if channels <= steps:
        return list(range(1, channels + 1))
    return sorted({max(1, round(channels * (i + 1) / steps)) for i in range(steps)})


def layer_options(info: LayerInfo, stats: Any = None, latency: LatencyModel | None = None) -> list[_Option]:
    """Every form and rank pair of a layer with its FLOPs, parameters and relative error (energy lost in
    each channel mode; of the output when ``stats`` is given). With ``latency``, ranks come from the
    coarser ``latency_grid`` and each option also carries its measured time."""
    if info.flops is None or info.input_shape is None or info.output_shape is None:
        raise PolicyError("a budget needs each layer's FLOPs: pass example_input (the network's input shape)")
    out_e, in_e = mode_energies(info, stats)
    lost_out, lost_in = discarded_energy(out_e), discarded_energy(in_e)
    taps = math.prod(info.kernel_size)
    in_vox, out_vox = math.prod(info.input_shape[2:]), math.prod(info.output_shape[2:])
    grid = _rank_grid if latency is None else latency_grid
    options = []
    for r_out in [*grid(info.c_out)[:-1], None]:
        for r_in in [*grid(info.c_in)[:-1], None]:
            a, b = r_in or info.c_in, r_out or info.c_out
            flops = info.flops * a * b / (info.c_in * info.c_out) + 2 * (r_in or 0) * info.c_in * in_vox \
                + 2 * (r_out or 0) * info.c_out * out_vox
            params = taps * a * b + (r_in or 0) * info.c_in + (r_out or 0) * info.c_out
            error = (lost_out[min(r_out, len(out_e))] if r_out else 0.0) + (lost_in[min(r_in, len(in_e))] if r_in else 0.0)
            plan = LayerPlan(rank_out=r_out, rank_in=r_in)
            seconds = latency.layer_seconds(info, plan) if latency is not None else 0.0
            options.append(_Option(plan, flops, params, float(error), seconds))
    return options


def _hull(options: list[_Option], cost: str) -> list[_Option]:
    """Lower convex hull of (cost saved, error) from the dense option towards cheaper ones: along it the
    error added per unit of cost saved only grows (Andrew's monotone chain)."""
    dense = next(o for o in options if o.plan.form == "dense")
    base = getattr(dense, cost)
    points = sorted(((base - getattr(o, cost), o.error, o) for o in options if getattr(o, cost) < base),
                    key=lambda p: (p[0], p[1]))
    hull = [(0.0, 0.0, dense)]
    for x, y, option in points:
        if x == hull[-1][0]:
            continue  # same saving, no better error
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            if (x1 - x0) * (y - y0) - (y1 - y0) * (x - x0) <= 0:
                hull.pop()
            else:
                break
        hull.append((x, y, option))
    return [option for *_, option in hull]


class BudgetPolicy(RankPolicy):
    """A global allocator: keep ``target_flops``, ``target_params`` and/or ``target_latency`` of the
    original, each a fraction, with the least total error. Every layer's options lie on the convex hull
    of (cost, relative error); starting from the dense network, the move that adds the least error per
    unit of cost saved is taken until the budget is met, so the budget holds within one rank step and
    a layer stays dense where decomposing it does not pay. With calibration statistics the error is the
    layer's output error (activation-aware), weighted by how strongly the layer's errors reach the
    network output (its measured gain to the power ``sensitivity``); ``"auto"`` lets
    ``compress_network`` pick the exponent whose compressed network best agrees with the original's
    predictions on the calibration inputs (no labels).

    A latency budget is a fraction of the original network's measured time on ``device`` ("auto": the
    device inference would use) in ``runtime`` ("auto": the one inference would use there, OpenVINO on a
    CPU when installed; see ``runtime.inference.choose_runtime``); each option's cost is its measured time
    there (in PyTorch its fastest execution, ``execution.fastest``; in OpenVINO the stored form), so layers
    where factorising does not pay in time stay dense. ``compress_network`` measures and binds the
    timings (``with_latency``)."""

    name = "budget"

    def __init__(self, target_flops: float | None = None, target_params: float | None = None,
                 sensitivity: float | str | None = "auto", target_latency: float | None = None,
                 device: str = "auto", runtime: str = "auto") -> None:
        for label, value in (("target_flops", target_flops), ("target_params", target_params),
                             ("target_latency", target_latency)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1):
                raise PolicyError(f"{label} must be a fraction of the original in (0, 1], got {value!r} "
                                  "(e.g. 0.3 keeps 30 %)")
        if target_flops is None and target_params is None and target_latency is None:
            raise PolicyError("a budget needs target_flops, target_params or target_latency "
                              "(fractions of the original to keep)")
        if not (sensitivity is None or sensitivity == "auto" or
                (isinstance(sensitivity, (int, float)) and not isinstance(sensitivity, bool) and 0 <= sensitivity <= 2)):
            raise PolicyError(f"sensitivity must be 'auto', None or an exponent in [0, 2], got {sensitivity!r}")
        self.target_flops = None if target_flops is None else float(target_flops)
        self.target_params = None if target_params is None else float(target_params)
        self.target_latency = None if target_latency is None else float(target_latency)
        self.sensitivity = sensitivity if sensitivity in (None, "auto") else float(sensitivity)
        self.device, self.runtime = device, runtime
        self.latency: LatencyModel | None = None

    def params(self) -> dict[str, Any]:
        params = {"target_flops": self.target_flops, "target_params": self.target_params,
                  "sensitivity": self.sensitivity}
        if self.target_latency is not None:
            params |= {"target_latency": self.target_latency, "device": self.device, "runtime": self.runtime}
        return params

    def weighted(self, sensitivity: float | None) -> BudgetPolicy:
        """The same budget with layer errors weighted by output sensitivity to the power ``sensitivity``."""
        return replace_fields(self, sensitivity=sensitivity)

    def with_latency(self, latency: LatencyModel) -> BudgetPolicy:
        """The same budget with the timings a latency target is allocated by."""
        return replace_fields(self, latency=latency)

    def plan(self, layers: Sequence[LayerInfo], calibration: Mapping[str, Any] | None = None) -> dict[str, LayerPlan]:
        latency = None
        if self.target_latency is not None:
            if self.latency is None:
                raise PolicyError("a latency budget needs measured timings: compress with compress_network(..., "
                                  "example_input=...) so that they are measured on the device")
            latency = self.latency
        options = {}
        with stage("timing candidate layers" if latency else "layer options", len(layers)) as step:
            for layer in layers:
                stats = (calibration or {}).get(layer.name)
                found = layer_options(layer, stats, latency)
                gain = getattr(stats, "gain", None)
                if isinstance(self.sensitivity, float) and gain is not None:
                    found = [replace(o, error=o.error * max(gain, 1e-12) ** self.sensitivity) for o in found]
                options[layer.name] = found
                step()
        dense = {name: next(o for o in opts if o.plan.form == "dense") for name, opts in options.items()}
        chosen = dict(dense)
        for cost, target in (("flops", self.target_flops), ("params", self.target_params)):
            if target is not None:
                self._allocate(options, chosen, cost, target * sum(getattr(o, cost) for o in dense.values()))
        if latency is not None:
            original = latency.other_seconds + sum(latency.original_seconds(layer) for layer in layers)
            budget = self.target_latency * original - latency.other_seconds
            fastest = latency.other_seconds + sum(min(o.latency for o in opts) for opts in options.values())
            if budget < fastest - latency.other_seconds:
                raise PolicyError(f"a latency of {self.target_latency:.0%} of the original cannot be reached on "
                                  f"{self.device}: even the smallest ranks everywhere take {fastest / original:.0%} of "
                                  f"its time (operations other than convolutions alone "
                                  f"{latency.other_seconds / original:.0%}); choose a larger target_latency")
            self._allocate(options, chosen, "latency", max(budget * latency.scale, fastest - latency.other_seconds))
        return {name: option.plan for name, option in chosen.items()}

    @staticmethod
    def _allocate(options: Mapping[str, list[_Option]], chosen: dict[str, _Option], cost: str, budget: float) -> None:
        """Greedy descent along each layer's hull until the summed ``cost`` is within ``budget``."""
        hulls = {}
        for name, opts in options.items():
            current = chosen[name]
            hulls[name] = [o for o in _hull(opts, cost) if getattr(o, cost) <= getattr(current, cost)]
            if not hulls[name] or hulls[name][0] is not current:
                hulls[name].insert(0, current)
        position = dict.fromkeys(hulls, 0)
        total = sum(getattr(o, cost) for o in chosen.values())
        while total > budget:
            best, best_slope = None, math.inf
            for name, hull in hulls.items():
                i = position[name]
                if i + 1 < len(hull):
                    saved = getattr(hull[i], cost) - getattr(hull[i + 1], cost)
                    slope = (hull[i + 1].error - hull[i].error) / saved if saved > 0 else math.inf
                    if slope < best_slope:
                        best, best_slope = name, slope
            if best is None:
                raise PolicyError(f"the {cost} budget cannot be met even at the smallest ranks everywhere; "
                                  "choose a larger target")
            position[best] += 1
            nxt = hulls[best][position[best]]
            total += getattr(nxt, cost) - getattr(chosen[best], cost)
            chosen[best] = nxt


def replace_fields(policy: BudgetPolicy, **changes: Any) -> BudgetPolicy:
    """A copy of a budget policy with some constructor arguments or its bound ``latency`` changed."""
    latency = changes.pop("latency", policy.latency)
    copy = BudgetPolicy(**(policy.params() | changes))
    copy.latency = latency
    return copy
