"""Compress a whole network in place: every decomposable layer replaced once, by object identity."""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..errors import PolicyError
from ..policies.base import RankPolicy
from ..progress import LayerProgress, stage
from ..runtime.devices import resolve_device
from ..runtime.execution import compare_latency, measure_network_latency
from ..dependencies import openvino_missing
from ..runtime.inference import OpenVINONetwork, choose_runtime
from ..runtime.latency import LatencyTable
from ..tucker.calibration import (
    CalibrationInput,
    LayerStatistics,
    collect_statistics,
    cropped,
    image_and_mask,
    label_agreement,
    output_sensitivity,
    predicted_labels,
)
from ..tucker.decomposition import LayerPlan, decompose_conv, relative_error, replace_modules
from ..tucker.layers import LayerInfo, crop_edges, decomposable_layers, layer_info
from ..tucker.network_stats import NetworkStats, count_flops, network_stats, stats_from_trace, trace


@dataclass(frozen=True)
class LayerRecord:
    """One layer in a ``CompressionReport``. FLOPs are ``None`` without an example input."""

    name: str
    layer_type: str
    weight_shape: tuple[int, ...]
    plan: LayerPlan
    rel_error: float
    params_before: int
    params_after: int
    flops_before: int | None
    flops_after: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.layer_type, "weight_shape": list(self.weight_shape),
                **self.plan.to_dict(), "rel_error": self.rel_error,
                "params_before": self.params_before, "params_after": self.params_after,
                "flops_before": self.flops_before, "flops_after": self.flops_after}


@dataclass
class CompressionReport:
    """What ``compress_network`` did: the policy, each layer, and the network before/after."""

    policy: dict[str, Any]
    layers: list[LayerRecord] = field(default_factory=list)
    before: NetworkStats | None = None
    after: NetworkStats | None = None
    unused_layers: list[str] = field(default_factory=list)
    calibration_inputs: int = 0  # unlabeled inputs the layer statistics came from (0: weight-only)
    agreement: float | None = None  # label-free Dice agreement with the original on the calibration inputs
    latency: dict[str, Any] | None = None  # latency budgets: measured time of original and compressed per patch
    calibration: dict[str, Any] | None = None  # where the calibration inputs came from (set by compress_model_folder)

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "calibration": self.calibration, "calibration_inputs": self.calibration_inputs,
                "agreement": self.agreement, "latency": self.latency,
                "before": self.before.to_dict() if self.before else None,
                "after": self.after.to_dict() if self.after else None,
                "unused_layers": self.unused_layers,
                "layers": [layer.to_dict() for layer in self.layers]}

    @property
    def plans(self) -> dict[str, LayerPlan]:
        return {layer.name: layer.plan for layer in self.layers if layer.plan.form != "dense"}


def _param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Survey:
    """The layers a policy is asked about, and the network's cost before compression."""

    layers: list[tuple[str, nn.Module]]
    infos: list[LayerInfo]
    unused_layers: list[str]
    before: NetworkStats | None


def survey(network: nn.Module, example_input: torch.Tensor | None = None) -> Survey:
    """Every decomposable layer with what a policy may know of it.

    With ``example_input`` (any device, meta included: only its shape is used) each layer's FLOPs
    and input shape are measured, and layers that a forward pass never calls (e.g. nnU-Net's
    deep-supervision heads at inference) are set apart as unused.
    """
    layers = decomposable_layers(network)
    before, unused, input_shapes, output_shapes = None, [], {}, {}
    if example_input is not None:
        probe = trace(network, example_input)
        before = stats_from_trace(network, probe, tuple(example_input.shape))
        input_shapes, output_shapes = probe.input_shapes, probe.output_shapes
        unused = [name for name, module in layers if id(module) not in probe.called]
        layers = [(name, module) for name, module in layers if id(module) in probe.called]
    infos = [layer_info(name, module, input_shapes.get(id(module)), output_shapes.get(id(module)))
             for name, module in layers]
    return Survey(layers=layers, infos=infos, unused_layers=unused, before=before)


def plan_layers(network: nn.Module, policy: RankPolicy, example_input: torch.Tensor | None = None) -> dict[str, LayerPlan]:
    """What ``policy`` would do to each layer of ``network``, without decomposing anything."""
    return policy.plan(survey(network, example_input).infos)


SENSITIVITY_EXPONENTS = (0.0, 0.25, 0.5, 0.75, 1.0)
SENSITIVITY_INPUTS = 4  # calibration inputs sensitivity is measured on (one forward and backward pass each)
SENSITIVITY_VOXELS = 64 ** 3  # each cropped to at most this many voxels: a backward pass holds the activations
# (a 3 mm TotalSegmentator patch, 112×112×128, took 4.9 GB here, a 64³ window 0.6 GB)


def compress_network(network: nn.Module, policy: RankPolicy, example_input: torch.Tensor | None = None,
                     calibration: Iterable[CalibrationInput] | None = None,
                     progress: LayerProgress | None = None) -> CompressionReport:
    """Decompose ``network``'s layers in place as ``policy`` plans and report what changed.

    ``example_input`` is as for ``survey``: with it, FLOPs are reported (and budgets can be planned)
    and unused layers stay dense. ``calibration`` (unlabeled input tensors, or ``CalibrationPatch``es whose
    masks restrict it to some voxels; e.g. patches of the user's own CTs) makes compression
    activation-aware: the policy sees each layer's input/output statistics (of the masked voxels) and
    every factorised layer minimises its output error on them instead of the kernel error. A
    budget policy with ``sensitivity="auto"`` also gets each layer's output sensitivity, and the
    weighting exponent whose compressed network agrees best with the original's predictions on the
    calibration inputs is kept (``report.policy`` records it; ``report.agreement`` is that agreement).
    A budget with ``target_latency`` is timed on its device in its runtime
    (``execution.measure_network_latency``), and the result is checked against the original's measured
    time there (``report.latency``).
    """
    found = survey(network, example_input)
    if getattr(policy, "target_latency", None) is not None:
        if example_input is None:
            raise PolicyError("a latency budget needs example_input (the network's input shape) to time the layers")
        device = resolve_device(policy.device)
        table = LatencyTable.for_device(device, runtime=choose_runtime(policy.runtime, "auto", device))
        with stage("timing the original for the latency target"):
            policy = policy.with_latency(measure_network_latency(network, example_input, table))
    stats: dict[str, LayerStatistics] = {}
    inputs = list(calibration) if calibration is not None else None
    sensitivity = getattr(policy, "sensitivity", None)
    timed = getattr(policy, "latency", None) is not None
    original = copy.deepcopy(network) if inputs is not None or timed else None
    reference: list[torch.Tensor] = []  # the original's labels on the calibration inputs
    if inputs is not None:
        stats = collect_statistics(network, found.layers, inputs, labels=reference)
        if sensitivity is not None:
            measured = [(name, module) for name, module in found.layers if name in stats]
            for name, gain in output_sensitivity(network, measured, _sensitivity_inputs(network, inputs)).items():
                stats[name].gain = gain
            if sensitivity == "auto":
                policy = _best_weighting(original, policy, stats, inputs, reference, example_input)
    elif sensitivity == "auto":
        policy = policy.weighted(None)  # nothing to weigh by without calibration
    with stage("decomposing"):
        report = _apply(network, policy, found, stats, example_input, progress)
    if timed:
        with stage("checking the latency target"):
            report = _meet_latency(network, original, policy, report, stats, example_input)
    if inputs is not None:
        report.agreement = label_agreement(predicted_labels(network, inputs), reference)
    return report


def _sensitivity_inputs(network: nn.Module, inputs: list[CalibrationInput]) -> list[CalibrationInput]:
    """The first ``SENSITIVITY_INPUTS`` calibration inputs, each cropped to ``SENSITIVITY_VOXELS`` (``crop_edges``)."""
    chosen = inputs[:SENSITIVITY_INPUTS]
    image, _ = image_and_mask(chosen[0])
    edges = crop_edges(network, tuple(image.shape[2:]), SENSITIVITY_VOXELS)
    return [cropped(item, edges) for item in chosen]


LATENCY_ATTEMPTS = 3  # plans tried for a latency target, each budget corrected by the last measured miss
LATENCY_TOLERANCE = 0.05  # a measured ratio within 5 % of the target counts as met (timing noise)


def _meet_latency(network: nn.Module, original: nn.Module, policy: RankPolicy, report: CompressionReport,
                  stats: Mapping[str, LayerStatistics], example_input: torch.Tensor) -> CompressionReport:
    """Measure the compressed network against the original (interleaved, in the timing table's runtime);
    while it misses the latency target by more than the tolerance either way (slower: the target is not
    met; faster: more accuracy given away than asked), re-plan with the layer budget scaled by the miss.
    ``network`` ends up with the slowest plan that met the target (the last one when none did), and
    ``report.latency`` records its measurement."""
    target, table = policy.target_latency, policy.latency.table
    table.save()  # the options timed while planning (the first budget of a large network takes minutes)
    tried: list[tuple[float, CompressionReport, tuple]] = []
    for attempt in range(1, LATENCY_ATTEMPTS + 1):
        base, seconds = compare_latency(original, network, example_input, table)
        report.latency = {"device": table.name, "target": target, "original_seconds": base,
                          "compressed_seconds": seconds, "ratio": seconds / base}
        tried.append((seconds / base, report, (network._modules, network._parameters, network._buffers)))
        if abs(seconds / base / target - 1) <= LATENCY_TOLERANCE or attempt == LATENCY_ATTEMPTS:
            break
        latency = policy.latency
        policy = policy.with_latency(replace(latency, scale=latency.scale * target * base / seconds))
        trial = copy.deepcopy(original)
        report = _apply(trial, policy, survey(trial, example_input), stats, example_input, None)
        table.save()
        network._modules, network._parameters, network._buffers = trial._modules, trial._parameters, trial._buffers
    met = [t for t in tried if t[0] <= target * (1 + LATENCY_TOLERANCE)]
    _, report, state = max(met, key=lambda t: t[0]) if met else tried[-1]
    network._modules, network._parameters, network._buffers = state
    report.latency["attempts"] = len(tried)
    return report


def _best_weighting(original: nn.Module, policy: RankPolicy, stats: Mapping[str, LayerStatistics],
                    inputs: list[CalibrationInput], reference: list[torch.Tensor],
                    example_input: torch.Tensor | None) -> RankPolicy:
    """``policy`` weighted by the sensitivity exponent (``SENSITIVITY_EXPONENTS``) whose compressed network agrees
    best with the original's labels ``reference`` (the first of equals)."""
    scored = []
    with stage("choosing the sensitivity weighting", len(SENSITIVITY_EXPONENTS)) as step:
        for exponent in SENSITIVITY_EXPONENTS:
            trial = policy.weighted(exponent)
            scored.append((_trial_agreement(original, trial, stats, inputs, reference, example_input), trial))
            step()
    return max(scored, key=lambda pair: pair[0])[1]


def _trial_agreement(original: nn.Module, policy: RankPolicy, stats: Mapping[str, LayerStatistics],
                     inputs: list[CalibrationInput], reference: list[torch.Tensor],
                     example_input: torch.Tensor | None) -> float:
    """Agreement with the original's labels ``reference`` of ``original`` compressed as ``policy`` plans; run in
    OpenVINO where it runs on the CPU (converted in about 2 s, then about 3 times as fast as PyTorch for a 3 mm
    TotalSegmentator network: the trials were the longest stage of a build)."""
    trial = copy.deepcopy(original)
    _apply(trial, policy, survey(trial, example_input), stats, example_input, None)
    return label_agreement(predicted_labels(_fast_runner(trial, inputs), inputs), reference)


def _fast_runner(network: nn.Module, inputs: list[CalibrationInput]) -> nn.Module:
    """``network`` in OpenVINO f32 when it and ``inputs`` (all of one shape) are on a CPU with OpenVINO; else itself."""
    images = [image_and_mask(item)[0] for item in inputs]
    shapes = {tuple(image.shape) for image in images}
    on_cpu = all(image.device.type == "cpu" for image in images) and \
        all(p.device.type == "cpu" for p in network.parameters())
    if len(shapes) != 1 or not on_cpu or openvino_missing():
        return network
    return OpenVINONetwork(network, torch.zeros(shapes.pop()), "f32")


def _apply(network: nn.Module, policy: RankPolicy, found: Survey, stats: Mapping[str, LayerStatistics],
           example_input: torch.Tensor | None, progress: LayerProgress | None) -> CompressionReport:
    plans = policy.plan(found.infos, stats or None)
    unknown = sorted(set(plans) - {name for name, _ in found.layers})
    if unknown:
        raise PolicyError(f"{policy!r} planned layers that are not decomposable layers of this network: "
                          f"{', '.join(unknown[:3])}")
    report = CompressionReport(policy=policy.to_dict(), before=found.before, unused_layers=found.unused_layers,
                               calibration_inputs=max((s.calls for s in stats.values()), default=0))
    replacements: dict[int, nn.Module] = {}
    for done, ((name, module), info) in enumerate(zip(found.layers, found.infos, strict=True), start=1):
        plan = plans.get(name, LayerPlan())
        if plan.form == "dense":
            new, error, flops_after = module, 0.0, info.flops
        else:
            layer_stats = stats.get(name)
            new = decompose_conv(module, plan.rank_out, plan.rank_in,
                                 in_cov=layer_stats.in_cov if layer_stats else None,
                                 out_cov=layer_stats.out_cov if layer_stats else None)
            replacements[id(module)] = new
            error = relative_error(module, new)
            flops_after = count_flops(new, info.input_shape, module.weight.dtype) if info.input_shape else None
        report.layers.append(LayerRecord(
            name=name, layer_type=info.layer_type, weight_shape=tuple(module.weight.shape), plan=plan,
            rel_error=error, params_before=_param_count(module), params_after=_param_count(new),
            flops_before=info.flops, flops_after=flops_after))
        if progress is not None:
            progress(done, len(found.layers), name)
    replace_modules(network, replacements)
    if example_input is not None:
        report.after = network_stats(network, example_input)
    return report
