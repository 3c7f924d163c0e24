"""How factorised layers run: for each ``TuckerConv``, the fastest exact execution on the device at hand.

A Tucker layer is stored as three convolutions (input factor → core → output factor), but the same
function can be executed in several ways: each 1×…×1 factor as a convolution or as a matrix product
over channels, or folded into the core (no nonlinearity separates them), down to the dense kernel
when both are folded. All are equal up to float rounding; their speed differs a lot by device and
shape. ``optimise_execution`` times each way's operations on the device (``latency.LatencyTable``)
and keeps the fastest per layer. Because folding both factors gives the original layer's
operation, no layer is chosen slower than the original's, so a compressed network is never slower
than the original network (up to timing noise). Saved models are untouched: this runs after loading.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..tucker.decomposition import LayerPlan, TuckerConv, conv_like, is_decomposable, reconstruct_weight, replace_modules
from ..tucker.layers import ConvOp, LayerInfo, conv_op, matmul_applies
from ..tucker.network_stats import trace
from .inference import OpenVINONetwork
from .latency import ChannelMatmul, LatencyTable, PatchMatmul, autocast, synchronize

Impl = Literal["folded", "conv", "matmul"]
_IMPLS: tuple[Impl, ...] = ("folded", "conv", "matmul")


@dataclass(frozen=True)
class Execution:
    """How each factor of a layer runs: ``"folded"`` into the core, as a ``"conv"``, or as a ``"matmul"``
    (``None`` where the layer has no such factor); and the core as a ``"conv"`` or, where its geometry
    allows (``latency.matmul_applies``), as a ``"matmul"``."""

    input: Impl | None = None
    output: Impl | None = None
    core: Literal["conv", "matmul"] = "conv"

    @property
    def label(self) -> str:
        parts = [f"{side} {impl}" for side, impl in (("in", self.input), ("out", self.output)) if impl is not None]
        return ", ".join([*parts, f"core {self.core}"])


def reference_execution(plan: LayerPlan) -> Execution:
    """The stored form: every factor and the core a convolution."""
    return Execution("conv" if plan.rank_in is not None else None, "conv" if plan.rank_out is not None else None)


def executions(plan: LayerPlan, dense: ConvOp) -> list[Execution]:
    """Every exact execution of a layer with ``plan`` whose dense operation is ``dense``."""
    inputs = _IMPLS if plan.rank_in is not None else (None,)
    outputs = _IMPLS if plan.rank_out is not None else (None,)
    cores = ("conv", "matmul") if matmul_applies(dense) else ("conv",)
    return [Execution(i, o, c) for i in inputs for o in outputs for c in cores]


def primitives(dense: ConvOp, output_shape: tuple[int, ...], plan: LayerPlan, execution: Execution) -> list[ConvOp]:
    """The operations a layer whose dense operation is ``dense`` runs under ``plan`` executed as ``execution``."""
    r_in = plan.rank_in if execution.input in ("conv", "matmul") else None
    r_out = plan.rank_out if execution.output in ("conv", "matmul") else None
    ops = []
    if r_in is not None:
        ops.append(ConvOp.pointwise(execution.input, dense.c_in, r_in, False, dense.input_shape))
    core = dense.with_channels(r_in or dense.c_in, r_out or dense.c_out, dense.bias and r_out is None)
    ops.append(core.as_matmul() if execution.core == "matmul" else core)
    if r_out is not None:
        ops.append(ConvOp.pointwise(execution.output, r_out, dense.c_out, dense.bias, output_shape))
    return ops


def primitive_channels(dense: ConvOp, plan: LayerPlan, execution: Execution) -> list[tuple[int, int]]:
    """For each of ``primitives``, the dense layer's channels its input and its output side are ranks of."""
    sides = [(dense.c_in, dense.c_in)] if plan.rank_in is not None and execution.input != "folded" else []
    sides.append((dense.c_in, dense.c_out))
    return sides + ([(dense.c_out, dense.c_out)] if plan.rank_out is not None and execution.output != "folded" else [])


def latency_grid(channels: int) -> list[int]:
    """Candidate ranks when each must be timed: multiples of 8 (vector-friendly), at most 8 per mode."""
    if channels <= 8:
        return list(range(1, channels + 1))
    step = 8 * max(1, math.ceil(channels / 64))
    return sorted({*range(step, channels, step), channels})


def rank_anchors(channels: int) -> list[int]:
    """The ranks of a side with ``channels`` at which operations are timed for a latency budget: the smallest and
    the middle candidate (``latency_grid``) and all channels; ``anchored_seconds`` interpolates between them."""
    grid = latency_grid(channels)
    return sorted({grid[0], grid[len(grid) // 2], channels})


def _bracket(value: int, anchors: list[int]) -> list[tuple[int, float]]:
    """The anchors around ``value`` with their linear interpolation weights (the nearest one outside them)."""
    if value <= anchors[0] or value >= anchors[-1] or value in anchors:
        return [(min(anchors, key=lambda a: abs(a - value)), 1.0)]
    high = next(a for a in anchors if a > value)
    low = max(a for a in anchors if a < value)
    weight = (value - low) / (high - low)
    return [(low, 1.0 - weight), (high, weight)]


def anchored_seconds(seconds: Callable[[ConvOp], float], op: ConvOp, channels: tuple[int, int]) -> float:
    """``seconds(op)`` from timings at anchor ranks only (``rank_anchors`` of the dense ``channels`` each side of
    ``op`` is a rank of), bilinear in between. A convolution's time is close to a + b·c_in + c·c_out + d·c_in·c_out
    (memory traffic on either side, multiply-adds of both), which bilinear interpolation reproduces; for a layer
    of 8 candidate ranks per side it times 15 operations instead of 80."""
    ins, outs = _bracket(op.c_in, rank_anchors(channels[0])), _bracket(op.c_out, rank_anchors(channels[1]))
    return sum(w_in * w_out * seconds(op.with_channels(c_in, c_out, op.bias))
               for c_in, w_in in ins for c_out, w_out in outs)


def execution_seconds(dense: ConvOp, output_shape: tuple[int, ...], plan: LayerPlan, execution: Execution,
                      seconds: Callable[[ConvOp], float], anchored: bool = False) -> float:
    """The summed ``seconds`` of the operations of ``plan`` executed as ``execution`` (``anchored``: each from the
    timings at anchor ranks, ``anchored_seconds``)."""
    ops = primitives(dense, output_shape, plan, execution)
    if not anchored:
        return sum(seconds(op) for op in ops)
    return sum(anchored_seconds(seconds, op, sides)
               for op, sides in zip(ops, primitive_channels(dense, plan, execution), strict=True))


def fastest(dense: ConvOp, output_shape: tuple[int, ...], plan: LayerPlan,
            seconds: Callable[[ConvOp], float], anchored: bool = False) -> tuple[Execution, float]:
    """The execution of ``plan`` with the least summed time by ``seconds``, and that time. Ties keep the
    earlier in ``executions`` order (the reference first). Never above the dense operation's time
    (both factors folded, core as a convolution)."""
    timed = [(execution_seconds(dense, output_shape, plan, e, seconds, anchored), e) for e in executions(plan, dense)]
    best = min(timed, key=lambda pair: pair[0])
    return best[1], best[0]


def dense_op(module: nn.Module, input_shape: tuple[int, ...]) -> ConvOp:
    """The operation of the original dense layer (``module`` itself, or the one a ``TuckerConv`` factorises)."""
    if not isinstance(module, TuckerConv):
        return conv_op(module, input_shape)
    parts = module._modules
    c_in = parts.get("input_factor", module.core).in_channels
    last = parts.get("output_factor", module.core)
    return conv_op(module.core, input_shape).with_channels(c_in, last.out_channels, last.bias is not None)


class ExecutedConv(nn.Sequential):
    """A ``TuckerConv`` rebuilt for speed: its ``execution`` and the ``plan`` it computes."""

    def __init__(self, parts: OrderedDict[str, nn.Module], plan: LayerPlan, execution: Execution) -> None:
        super().__init__(parts)
        self.plan = plan
        self.execution = execution


def _factor(conv: nn.Module, impl: Impl) -> nn.Module:
    return conv if impl == "conv" else ChannelMatmul(conv.weight, conv.bias)


def _plan(module: nn.Module) -> LayerPlan:
    return module.plan if isinstance(module, TuckerConv) else LayerPlan()


def execute_as(module: nn.Module, execution: Execution) -> ExecutedConv:
    """``module`` (a ``TuckerConv`` or a dense convolution) executed as ``execution``, same function
    (folded kernels computed in float64)."""
    plan = _plan(module)
    parts = module._modules if isinstance(module, TuckerConv) else {"core": module}
    fold_in = execution.input == "folded"
    fold_out = execution.output == "folded"
    core = parts["core"]
    if fold_in or fold_out:
        weight = reconstruct_weight(module, inputs=fold_in, outputs=fold_out)
        has_out = "output_factor" in parts and not fold_out
        c_in = parts["input_factor"].in_channels if fold_in else core.in_channels
        c_out = parts["output_factor"].out_channels if fold_out else core.out_channels
        bias = (parts["output_factor"] if fold_out else core).bias
        core = conv_like(parts["core"], c_in, c_out, bias=bias is not None and not has_out)
        with torch.no_grad():
            core.weight.copy_(weight.to(core.weight.dtype))
            if core.bias is not None:
                core.bias.copy_(bias.detach())
    if execution.core == "matmul":
        core = (PatchMatmul if core.transposed else ChannelMatmul)(core.weight, core.bias)
    new: OrderedDict[str, nn.Module] = OrderedDict()
    if execution.input in ("conv", "matmul"):
        new["input_factor"] = _factor(parts["input_factor"], execution.input)
    new["core"] = core
    if execution.output in ("conv", "matmul"):
        new["output_factor"] = _factor(parts["output_factor"], execution.output)
    return ExecutedConv(new, plan, execution)


@dataclass(frozen=True)
class LayerExecution:
    """One factorised layer's chosen execution and the timings it was chosen by."""

    name: str
    plan: LayerPlan
    execution: Execution
    seconds: float
    reference_seconds: float  # stored three-convolution form
    dense_seconds: float  # both factors folded back: the original layer's cost


@dataclass
class ExecutionReport:
    """What ``optimise_execution`` chose, on which device, and how many operations it had to time."""

    device: str
    layers: list[LayerExecution] = field(default_factory=list)
    measured: int = 0

    @property
    def seconds(self) -> float:
        return sum(layer.seconds for layer in self.layers)

    @property
    def reference_seconds(self) -> float:
        return sum(layer.reference_seconds for layer in self.layers)

    @property
    def dense_seconds(self) -> float:
        return sum(layer.dense_seconds for layer in self.layers)


def optimise_execution(network: nn.Module, example_input: torch.Tensor, table: LatencyTable,
                       progress: Callable[[int, int, str], None] | None = None, verify: bool = True) -> ExecutionReport:
    """Replace, in place, every convolution (factorised or dense) that a forward pass of ``example_input``
    (its shape: meta is fine) calls by its fastest exact execution on ``table``'s device.

    Each layer's candidates are the fastest by the operation table, the stored form and the folded
    (original-cost) form. With ``verify`` the candidates are then timed where they run, inside forward
    passes of the whole network (operations timed alone miss allocation and cache effects between
    layers), and each layer keeps the one fastest there; so no layer ends slower than its folded form,
    i.e. than the original layer. All timings are cached in ``table`` (saved when new)."""
    probe = trace(network, example_input)
    containers = tuple(f"{name}." for name, module in network.named_modules()
                       if isinstance(module, (TuckerConv, ExecutedConv)))
    layers = [(name, module) for name, module in network.named_modules()
              if id(module) in probe.called and not name.startswith(containers)
              and (isinstance(module, TuckerConv) or (is_decomposable(module) and module.groups == 1))]
    before = table.measured
    candidates: dict[str, list[Execution]] = {}
    folded: dict[str, Execution] = {}
    keys: dict[str, str] = {}
    estimated: dict[str, dict[Execution, float]] = {}
    for name, module in layers:
        dense = dense_op(module, probe.input_shapes[id(module)])
        out_shape, plan = probe.output_shapes[id(module)], _plan(module)
        times = {e: execution_seconds(dense, out_shape, plan, e, table.seconds) for e in executions(plan, dense)}
        folded[name] = min((e for e in times if e.input in (None, "folded") and e.output in (None, "folded")),
                           key=times.__getitem__)  # the original layer's cost, core in its faster form
        ranked = [min(times, key=times.__getitem__), reference_execution(plan), folded[name]]
        candidates[name] = list(dict.fromkeys(ranked))
        estimated[name] = {e: times[e] for e in candidates[name]}
        keys[name] = f"in-network|{dense.key()}|{plan.rank_out}|{plan.rank_in}"
    timed = in_network_seconds(network, example_input, table, candidates, keys, progress) if verify else estimated
    report = ExecutionReport(device=table.name)
    replacements: dict[int, nn.Module] = {}
    for name, module in layers:
        times, plan = timed[name], _plan(module)
        chosen = min(candidates[name], key=times.__getitem__)  # ties keep the table's pick
        report.layers.append(LayerExecution(name=name, plan=plan, execution=chosen, seconds=times[chosen],
                                            reference_seconds=times[reference_execution(plan)],
                                            dense_seconds=times[folded[name]]))
        if chosen != reference_execution(plan) and id(module) not in replacements:
            replacements[id(module)] = execute_as(module, chosen)
    report.measured = table.measured - before
    if report.measured:
        table.save()
    replace_modules(network, replacements)
    return report


def in_network_seconds(network: nn.Module, example_input: torch.Tensor, table: LatencyTable,
                       candidates: Mapping[str, list[Execution]], keys: Mapping[str, str],
                       progress: Callable[[int, int, str], None] | None = None,
                       repeats: int = 2) -> dict[str, dict[Execution, float]]:
    """Seconds each layer's candidate executions take inside forward passes of ``network`` (a copy per
    round, round i running every layer's i-th candidate), looked up in ``table`` under ``keys`` or
    measured (median of ``repeats`` passes after a warm-up)."""
    found = {name: {e: table.recorded(f"{keys[name]}|{e.label}") for e in options}
             for name, options in candidates.items()}
    rounds = max((len(options) for name, options in candidates.items()
                  if any(t is None for t in found[name].values())), default=0)
    device = table.device
    x = torch.randn(example_input.shape, device=device)
    for index in range(rounds):
        copy_ = copy.deepcopy(network)
        config = {name: options[min(index, len(options) - 1)] for name, options in candidates.items()}
        modules = {name: copy_.get_submodule(name) for name in config}
        replace_modules(copy_, {id(modules[name]): execute_as(modules[name], e) for name, e in config.items()
                                if e != reference_execution(_plan(modules[name]))})
        _, per_pass = time_passes(copy_.to(device).eval(), x, device, repeats, [*config])
        spent = {name: statistics.median(p[name] for p in per_pass) for name in config}
        for name, execution in config.items():
            found[name][execution] = table.record(f"{keys[name]}|{execution.label}", spent[name])
        if progress is not None:
            progress(index + 1, rounds, "timing executions inside the network")
    return found


def time_passes(network: nn.Module, x: torch.Tensor, device: torch.device, repeats: int,
                names: Sequence[str] = ()) -> tuple[list[float], list[dict[str, float]]]:
    """Seconds of each of ``repeats`` forward passes of ``network`` on ``x`` (after a warm-up pass) and,
    per pass, the seconds spent inside each named submodule (hooks, device synchronised)."""
    inside: dict[str, float] = {}
    started: dict[str, float] = {}
    handles = []
    for name in names:
        module = network.get_submodule(name)

        def before(mod: nn.Module, args: tuple, name: str = name) -> None:
            synchronize(device)
            started[name] = time.perf_counter()

        def after(mod: nn.Module, args: tuple, output: object, name: str = name) -> None:
            synchronize(device)
            inside[name] = inside.get(name, 0.0) + time.perf_counter() - started[name]

        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    totals, per_pass = [], []
    try:
        with torch.inference_mode(), autocast(device):
            network(x)
            for _ in range(repeats):
                inside.clear()
                synchronize(device)
                start = time.perf_counter()
                network(x)
                synchronize(device)
                totals.append(time.perf_counter() - start)
                per_pass.append({name: inside.get(name, 0.0) for name in names})
    finally:
        for handle in handles:
            handle.remove()
    return totals, per_pass


@dataclass(frozen=True)
class NetworkLatency:
    """What a latency budget is allocated by: per-operation timings, and the measured time of one
    forward pass of the original network outside its convolutions (norms, activations, copies)."""

    table: LatencyTable
    network_seconds: float
    other_seconds: float
    scale: float = 1.0  # correction of the layer budget after a measured miss (see compression._meet_latency)

    def layer_seconds(self, info: LayerInfo, plan: LayerPlan) -> float:
        """The time of ``info``'s layer under ``plan`` (interpolated between anchor ranks, ``anchored_seconds``)."""
        if self.table.stored_form_only:
            return execution_seconds(info.op, info.output_shape, plan, reference_execution(plan), self.table.seconds,
                                     anchored=True)
        return fastest(info.op, info.output_shape, plan, self.table.seconds, anchored=True)[1]

    def original_seconds(self, info: LayerInfo) -> float:
        return self.table.seconds(info.op)


def measure_network_latency(network: nn.Module, example_input: torch.Tensor, table: LatencyTable,
                            repeats: int = 3) -> NetworkLatency:
    """Time forward passes of ``network`` (unchanged) on ``table``'s device, and, in the same runs, the
    time spent inside its convolutions, so that the rest (norms, activations, copies) is known. In
    OpenVINO, which cannot hook into a compiled network, the rest is the whole network's time less its
    convolutions' own times from the table (``openvino_timing``; at least zero)."""
    probe = trace(network, example_input)
    before = table.measured
    convs, conv_seconds = [], 0.0
    for name, module in network.named_modules():  # each module once, under its first name
        if is_decomposable(module) and id(module) in probe.called:
            conv_seconds += table.seconds(conv_op(module, probe.input_shapes[id(module)]))
            convs.append(name)
    if table.measured > before:
        table.save()
    if table.runtime is not None:
        total = statistics.median(openvino_interleaved_seconds([network], torch.zeros(example_input.shape),
                                                               table.runtime.precision, repeats)[0])
        return NetworkLatency(table, total, max(0.0, total - conv_seconds))
    device = table.device
    runner = network if next(network.parameters()).device == device else copy.deepcopy(network).to(device)
    x = torch.randn(example_input.shape, device=device)
    totals, per_pass = time_passes(runner, x, device, repeats, convs)
    others = [total - sum(inside.values()) for total, inside in zip(totals, per_pass, strict=True)]
    return NetworkLatency(table, statistics.median(totals), max(0.0, statistics.median(others)))


def compare_latency(original: nn.Module, compressed: nn.Module, example_input: torch.Tensor, table: LatencyTable,
                    repeats: int = 3) -> tuple[float, float]:
    """Median seconds per forward pass of ``original`` as it is and of ``compressed`` in its fastest
    execution (on copies; in OpenVINO both as stored), timed interleaved on ``table``'s device."""
    if table.runtime is not None:
        times = openvino_interleaved_seconds([original, compressed], torch.zeros(example_input.shape),
                                             table.runtime.precision, repeats)
        return statistics.median(times[0]), statistics.median(times[1])
    device = table.device
    fast = copy.deepcopy(compressed)
    optimise_execution(fast, example_input, table)
    networks = [copy.deepcopy(original).to(device).eval(), fast.to(device).eval()]
    times = interleaved_seconds(networks, torch.randn(example_input.shape, device=device), device, repeats)
    return statistics.median(times[0]), statistics.median(times[1])


def interleaved_seconds(networks: Sequence[nn.Module], x: torch.Tensor, device: torch.device,
                        rounds: int) -> list[list[float]]:
    """Per network, the seconds of one forward pass in each of ``rounds`` rounds (each round runs every
    network once, so slow drifts of the machine hit all alike), after a warm-up pass of each."""
    times: list[list[float]] = [[] for _ in networks]
    with torch.inference_mode(), autocast(device):
        for network in networks:
            network(x)
        for _ in range(rounds):
            for network, spent in zip(networks, times, strict=True):
                synchronize(device)
                start = time.perf_counter()
                network(x)
                synchronize(device)
                spent.append(time.perf_counter() - start)
    return times


def openvino_interleaved_seconds(networks: Sequence[nn.Module], example: torch.Tensor, precision: str,
                                 rounds: int) -> list[list[float]]:
    """``interleaved_seconds`` of ``networks`` each converted and compiled by OpenVINO on the CPU for
    ``example``'s shape, as inference runs them."""
    converted = [OpenVINONetwork(network, torch.zeros(example.shape), precision) for network in networks]
    return interleaved_seconds(converted, torch.randn(example.shape), torch.device("cpu"), rounds)
