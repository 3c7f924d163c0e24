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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from .decomposition import LayerPlan, contract_mode, sqrt_and_inverse, unfold_mode
from .errors import PolicyError

if TYPE_CHECKING:
    from .latency import ConvOp


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
    output_shape: tuple[int, ...] | None = None
    op: ConvOp | None = None  # the dense operation as it is timed (with ``input_shape``)

    @property
    def transposed(self) -> bool:
        return self.layer_type.startswith("ConvTranspose")


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


def _modes(info: LayerInfo) -> tuple[int, int]:
    """Weight modes holding (output, input) channels."""
    return (1, 0) if info.transposed else (0, 1)


def _kernel(info: LayerInfo) -> torch.Tensor:
    return info.weight.detach().to("cpu", torch.float64)


def mode_energies(info: LayerInfo, stats: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Per channel mode, the energy of each rank-one direction in descending order: (output, input).

    Without statistics these are the squared singular values of the kernel's mode unfoldings (what a
    truncation removes from the kernel); with calibration ``stats`` they are what a truncation removes
    from the layer's output: eigenvalues of the output covariance, and squared singular values of the
    kernel whitened by the input covariance (see ``decomposition.output_aware_factors``).
    """
    mode_out, mode_in = _modes(info)
    weight = _kernel(info)
    if stats is None:
        out = torch.linalg.svdvals(unfold_mode(weight, mode_out)) ** 2
        inp = torch.linalg.svdvals(unfold_mode(weight, mode_in)) ** 2
    else:
        out = torch.linalg.eigvalsh(stats.out_cov).flip(0).clamp_min(0)
        root = sqrt_and_inverse(stats.in_cov.to(torch.float64))[0]
        inp = torch.linalg.svdvals(unfold_mode(contract_mode(weight, mode_in, root), mode_in)) ** 2
    return out.numpy(), inp.numpy()


def _discarded(energies: np.ndarray) -> np.ndarray:
    """Fraction of the total energy lost when keeping rank r, for r = 0 … len(energies)."""
    total = float(energies.sum())
    tail = np.concatenate([np.cumsum(energies[::-1])[::-1], [0.0]])
    return tail / total if total > 0 else np.zeros_like(tail)


def _plan(r_out: int, r_in: int, info: LayerInfo) -> LayerPlan:
    return LayerPlan(rank_out=r_out if r_out < info.c_out else None, rank_in=r_in if r_in < info.c_in else None)


class EnergyPolicy(RankPolicy):
    """Per layer and channel mode, the smallest rank keeping a fraction ``keep`` of the energy: of the
    kernel (weight-only) or, with calibration, of the layer's output."""

    name = "energy"

    def __init__(self, keep: float = 0.95) -> None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise PolicyError(f"keep must be a fraction in (0, 1], got {keep!r} (e.g. 0.95 keeps 95 % of the energy)")
        self.keep = float(keep)

    def params(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def rank(self, energies: np.ndarray) -> int:
        kept = 1.0 - _discarded(energies)
        return int(np.argmax(kept >= self.keep - 1e-12)) or 1

    def plan(self, layers: Sequence[LayerInfo], calibration: Mapping[str, Any] | None = None) -> dict[str, LayerPlan]:
        plans = {}
        for layer in layers:
            out, inp = mode_energies(layer, (calibration or {}).get(layer.name))
            plans[layer.name] = _plan(self.rank(out), self.rank(inp), layer)
        return plans


def _evb_objective(noise: float, rows: int, cols: int, s2: np.ndarray, residual: float, x_bar: float) -> float:
    """Nakajima et al. (2013) free energy of empirical VBMF as a function of the noise variance."""
    alpha = rows / cols
    x = s2 / (cols * noise)
    big, small = x[x > x_bar], x[x <= x_bar]
    tau = 0.5 * (big - (1 + alpha) + np.sqrt((big - (1 + alpha)) ** 2 - 4 * alpha))
    return float(np.sum(small - np.log(small)) + np.sum(big - tau) + np.sum(np.log((tau + 1) / big))
                 + alpha * np.sum(np.log(tau / alpha + 1)) + residual / (cols * noise)
                 + (rows - len(s2)) * np.log(noise))


def evbmf_rank(matrix: np.ndarray) -> int:
    """The rank empirical variational Bayesian matrix factorisation keeps (Nakajima et al. 2013, global
    analytic solution): singular values above the EVB threshold for the estimated noise variance."""
    from scipy.optimize import minimize_scalar
    rows, cols = matrix.shape
    if rows > cols:
        matrix, (rows, cols) = matrix.T, (cols, rows)
    s = np.linalg.svd(matrix, compute_uv=False)
    s2 = s ** 2
    alpha = rows / cols
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = max(float((matrix ** 2).sum() - s2.sum()), 0.0)
    h_bar = min(int(np.ceil(rows / (1 + alpha))) - 1, len(s) - 1)
    upper = (s2.sum() + residual) / (rows * cols)
    lower = max(s2[h_bar] / (cols * x_bar) if h_bar >= 0 else 0.0, float(np.mean(s2[h_bar:])) / cols if h_bar >= 0 else 0.0)
    if not 0 < lower < upper:
        return len(s)
    noise = minimize_scalar(_evb_objective, args=(rows, cols, s2, residual, x_bar), bounds=(lower, upper),
                            method="bounded").x
    threshold = np.sqrt(cols * noise * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))


class VBMFPolicy(RankPolicy):
    """Ranks from empirical VBMF on each channel-mode unfolding of the kernel, as Kim et al. (2016) and
    MUSCO choose Tucker-2 ranks."""

    name = "vbmf"

    def params(self) -> dict[str, Any]:
        return {}

    def plan(self, layers: Sequence[LayerInfo], calibration: Mapping[str, Any] | None = None) -> dict[str, LayerPlan]:
        plans = {}
        for layer in layers:
            mode_out, mode_in = _modes(layer)
            r_out = evbmf_rank(unfold_mode(_kernel(layer), mode_out).numpy())
            r_in = evbmf_rank(unfold_mode(_kernel(layer), mode_in).numpy())
            plans[layer.name] = _plan(r_out, r_in, layer)
        return plans


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


def latency_grid(channels: int) -> list[int]:
    """Candidate ranks when each must be timed: multiples of 8 (vector-friendly), at most 8 per mode."""
    if channels <= 8:
        return list(range(1, channels + 1))
    step = 8 * max(1, math.ceil(channels / 64))
    return sorted({*range(step, channels, step), channels})


def layer_options(info: LayerInfo, stats: Any = None, latency: LatencyModel | None = None) -> list[_Option]:
    """Every form and rank pair of a layer with its FLOPs, parameters and relative error (energy lost in
    each channel mode; of the output when ``stats`` is given). With ``latency``, ranks come from the
    coarser ``latency_grid`` and each option also carries its measured time."""
    if info.flops is None or info.input_shape is None or info.output_shape is None:
        raise PolicyError("a budget needs each layer's FLOPs: pass example_input (the network's input shape)")
    out_e, in_e = mode_energies(info, stats)
    lost_out, lost_in = _discarded(out_e), _discarded(in_e)
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
    device inference would use); each option's cost is the measured time of its fastest execution
    (``execution.fastest``), so layers where factorising does not pay in time stay dense.
    ``compress_network`` measures and binds the timings (``with_latency``)."""

    name = "budget"

    def __init__(self, target_flops: float | None = None, target_params: float | None = None,
                 sensitivity: float | str | None = "auto", target_latency: float | None = None,
                 device: str = "auto") -> None:
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
        self.device = device
        self.latency: LatencyModel | None = None

    def params(self) -> dict[str, Any]:
        params = {"target_flops": self.target_flops, "target_params": self.target_params,
                  "sensitivity": self.sensitivity}
        if self.target_latency is not None:
            params |= {"target_latency": self.target_latency, "device": self.device}
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
        for layer in layers:
            stats = (calibration or {}).get(layer.name)
            found = layer_options(layer, stats, latency)
            gain = getattr(stats, "gain", None)
            if isinstance(self.sensitivity, float) and gain is not None:
                found = [replace(o, error=o.error * max(gain, 1e-12) ** self.sensitivity) for o in found]
            options[layer.name] = found
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
