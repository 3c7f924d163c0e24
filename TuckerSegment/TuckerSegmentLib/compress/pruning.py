"""Structured filter pruning of an nnU-Net network, post-training and without fine-tuning: a baseline
beside Tucker decomposition.

Whole output channels (filters) are removed from every convolution together with everything that reads
them (the next convolution's inputs, the InstanceNorm between, the skip concatenation into the decoder,
the transposed convolution's partners), as Torch-Pruning's dependency graph (DepGraph) couples them; the
network stays an ordinary dense nnU-Net of narrower layers. Criteria rank each coupled group's channels:
``l1`` (the L1 norm of each filter, Li et al. 2017), ``fpgm`` (distance to the geometric median, He et al.
2019), ``taylor`` (first-order Taylor estimate of the loss change, Molchanov et al. 2019: gradients of a
cross-entropy loss on labelled patches). The segmentation heads' outputs and the network's input channels
are never pruned.

Every layer prunes the same fraction of its channels; that fraction is bisected to meet a FLOP budget (the
project's own count, ``network_stats``) within one channel: the result costs at most the target, and
pruning one channel less in every layer would exceed it. The dependency graph is traced on a small CPU
input, so it is fast on TotalSegmentator-size networks; FLOPs are counted at the model's patch size.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional

from ..errors import PolicyError
from ..tucker.network_stats import NetworkStats, network_stats, stats_from_trace, trace

CRITERIA = ("l1", "fpgm", "taylor")
IGNORE_INDEX = -100  # calibration_data.IGNORE_LABEL: voxels the Taylor loss leaves out (masked, padding, ignore label)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
PRUNABLE_NORMS = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True, eq=False)
class LabelledPatch:
    """A network-ready image patch (1, C, *spatial) float and its labels (1, *spatial) int64, ``IGNORE_INDEX``
    where the loss must not look."""

    image: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.labels.dtype != torch.int64 or tuple(self.labels.shape) != (self.image.shape[0], *self.image.shape[2:]):
            raise PolicyError(f"labels of shape {tuple(self.labels.shape)} ({self.labels.dtype}) do not fit an image "
                              f"patch of shape {tuple(self.image.shape)}; cut the labels with the image")


@dataclass
class PruningPlan:
    """Each prunable group of a network, named by its root convolution (whose output channels it prunes):
    its channels ordered from least to most important."""

    criterion: str
    rankings: dict[str, torch.Tensor]

    @property
    def widest(self) -> int:
        return max((len(r) for r in self.rankings.values()), default=1)

    def counts(self, ratio: float) -> dict[str, int]:
        """Channels each group prunes at a uniform ``ratio`` (floor, at least one channel kept)."""
        return {name: min(len(r) - 1, math.floor(len(r) * ratio + 1e-9)) for name, r in self.rankings.items()}


@dataclass
class PruningReport:
    """What ``prune_network`` did: criterion, budget, the uniform ratio found, each group's channels and each
    module's channel counts, the network before/after."""

    criterion: str
    target_flops: float
    ratio: float
    before: NetworkStats
    after: NetworkStats
    groups: dict[str, tuple[int, int]]  # root convolution → (output channels before, after)
    modules: dict[str, dict[str, int]]  # every conv/norm of the pruned network → its channel counts
    trials: int = 0
    seconds: float = 0.0
    calibration_inputs: int = 0  # labelled patches the Taylor gradients came from (0: weights alone)
    calibration: dict[str, Any] | None = None  # where they came from (set by prune_model_folder)
    unused_layers: list[str] = field(default_factory=list)

    @property
    def policy(self) -> dict[str, Any]:
        return {"name": f"prune-{self.criterion}", "params": {"target_flops": self.target_flops}}

    def to_dict(self) -> dict[str, Any]:
        return {"policy": self.policy, "calibration": self.calibration, "calibration_inputs": self.calibration_inputs,
                "agreement": None, "latency": None,
                "before": self.before.to_dict(), "after": self.after.to_dict(),
                "unused_layers": self.unused_layers,
                "pruning": {"criterion": self.criterion, "target_flops": self.target_flops, "ratio": self.ratio,
                            "groups": {name: {"before": a, "after": b} for name, (a, b) in self.groups.items()},
                            "modules": self.modules},
                "layers": []}


def trace_input(patch_size: Sequence[int], strides: Sequence[Sequence[int]], channels: int) -> torch.Tensor:
    """A small CPU input for tracing the dependency graph: per axis twice the product of the strides (the
    bottleneck then keeps two voxels, which InstanceNorm needs), or the patch if smaller."""
    size = [min(int(p), 2 * math.prod(int(s[axis]) for s in strides)) for axis, p in enumerate(patch_size)]
    return torch.zeros((1, channels, *size))


def _importance(criterion: str) -> Callable:
    if criterion == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if criterion == "fpgm":
        return tp.importance.FPGMImportance()
    if criterion == "taylor":
        return tp.importance.TaylorImportance()
    raise PolicyError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")


def _heads(network: nn.Module) -> list[nn.Module]:
    """The segmentation heads, whose outputs are the classes (never pruned)."""
    decoder = getattr(network, "decoder", None)
    heads = getattr(decoder, "seg_layers", None)
    if heads is None:
        raise PolicyError(f"{type(network).__name__} has no decoder.seg_layers; filter pruning supports nnU-Net's "
                          "U-Nets (PlainConvUNet, ResidualEncoderUNet)")
    return list(heads.modules())


def _graph(network: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    """The dependency graph of ``network``, traced once in eval mode. In-place activations (nnU-Net's
    LeakyReLU) hide the channel counts of the skip concatenations from the tracer, so they run out of place
    while it traces (the same values)."""
    was_training = network.training
    inplace = [m for m in network.modules() if getattr(m, "inplace", False) is True]
    network.eval()
    for module in inplace:
        module.inplace = False
    try:
        with torch.enable_grad():  # the tracer follows autograd
            return tp.DependencyGraph().build_dependency(network, example_inputs=example, verbose=False)
    finally:
        for module in inplace:
            module.inplace = True
        network.train(was_training)


def _groups(graph: tp.DependencyGraph, network: nn.Module) -> list[tuple[str, nn.Module, Any]]:
    names = {id(m): n for n, m in network.named_modules()}
    return [(names[id(group[0].dep.target.module)], group[0].dep.target.module, group)
            for group in graph.get_all_groups(ignored_layers=_heads(network), root_module_types=list(CONV_TYPES))]


def _taylor_gradients(network: nn.Module, patches: Sequence[LabelledPatch]) -> int:
    """Accumulate the gradients of the mean cross-entropy over the labelled voxels of ``patches``."""
    network.zero_grad(set_to_none=True)
    total = sum(int((p.labels != IGNORE_INDEX).sum()) for p in patches)
    if total == 0:
        raise PolicyError("the labels mark no voxel to learn from (all masked out or ignored); give labelled CTs")
    device = next(network.parameters()).device
    with torch.enable_grad():
        for patch in patches:
            logits = network(patch.image.to(device))
            if isinstance(logits, (list, tuple)):
                logits = logits[0]
            loss = functional.cross_entropy(logits, patch.labels.to(device), ignore_index=IGNORE_INDEX,
                                            reduction="sum") / total
            loss.backward()
    return len(patches)


def plan_pruning(network: nn.Module, criterion: str, example: torch.Tensor,
                 labelled: Sequence[LabelledPatch] | None = None) -> PruningPlan:
    """Rank every prunable group's channels of ``network`` by ``criterion`` (``taylor`` needs ``labelled``
    patches; the gradients are cleared again). ``example``: the small tracing input."""
    importance = _importance(criterion)
    if criterion == "taylor":
        if not labelled:
            raise PolicyError("the taylor criterion needs labelled patches (CTs with their label maps)")
        _taylor_gradients(network, labelled)
    elif labelled:
        raise PolicyError(f"the {criterion} criterion ranks filters by their weights alone; it takes no labelled data")
    try:
        graph = _graph(network, example)
        rankings = {}
        for name, _module, group in _groups(graph, network):
            scores = importance(group)
            if scores is None:
                continue
            rankings[name] = torch.argsort(scores.detach().cpu(), stable=True)
    finally:
        if criterion == "taylor":
            network.zero_grad(set_to_none=True)
    return PruningPlan(criterion=criterion, rankings=rankings)


def apply_pruning(network: nn.Module, plan: PruningPlan, pruned: Mapping[str, int], example: torch.Tensor) -> None:
    """Prune ``pruned[name]`` channels (the least important by ``plan``) from each group of ``network``, in place:
    every module stays the same object, so nnU-Net's aliases follow."""
    graph = _graph(network, example)
    for name, module, _group in _groups(graph, network):
        count = pruned.get(name, 0)
        if count <= 0 or name not in plan.rankings:
            continue
        idxs = plan.rankings[name][:count].tolist()
        group = graph.get_pruning_group(module, graph.get_pruner_of_module(module).prune_out_channels, idxs)
        if not graph.check_pruning_group(group):
            raise PolicyError(f"pruning {count} channels of {name} would leave a layer empty; ask for a larger target")
        group.prune()


def channel_counts(network: nn.Module) -> dict[str, dict[str, int]]:
    """Every convolution's in/out channels and every prunable norm's features, by first module name."""
    counts: dict[str, dict[str, int]] = {}
    for name, module in network.named_modules():
        if isinstance(module, CONV_TYPES):
            counts[name] = {"in_channels": int(module.in_channels), "out_channels": int(module.out_channels)}
        elif isinstance(module, PRUNABLE_NORMS):
            counts[name] = {"num_features": int(module.num_features)}
    return counts


def _flops(network: nn.Module, example_input: torch.Tensor) -> int:
    return network_stats(network, example_input).flops


def prune_network(network: nn.Module, criterion: str, target_flops: float, example_input: torch.Tensor,
                  small: torch.Tensor | None = None, labelled: Sequence[LabelledPatch] | None = None,
                  progress: Callable[[int, int, str], None] | None = None) -> PruningReport:
    """Prune ``network`` in place by ``criterion`` until it keeps at most ``target_flops`` of its FLOPs (a
    fraction in (0, 1]), within one channel per layer; report what changed.

    ``example_input``: the model's input shape (any device, meta included), at which FLOPs are counted.
    ``small``: the small CPU input the dependency graph is traced with (default: ``example_input`` on the CPU;
    ``trace_input`` makes a small one). ``labelled``: patches with labels, for ``taylor`` only.
    ``progress(done, total, message)`` is told of each trial of the bisection.
    """
    start = time.perf_counter()
    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not 0 < target_flops <= 1:
        raise PolicyError(f"target_flops is the fraction of the original FLOPs kept, in (0, 1], not {target_flops!r}")
    if small is None:
        small = torch.zeros(example_input.shape)
    probe = trace(network, example_input)
    before = stats_from_trace(network, probe, tuple(example_input.shape))
    unused = [name for name, module in network.named_modules() if isinstance(module, CONV_TYPES)
              and id(module) not in probe.called]  # nnU-Net's deep-supervision heads at inference: kept whole
    plan = plan_pruning(network, criterion, small, labelled)
    budget = target_flops * before.flops
    trials = 0
    steps = max(1, math.ceil(math.log2(plan.widest))) + 2

    def cost(ratio: float) -> int:
        nonlocal trials
        trials += 1
        trial = copy.deepcopy(network)
        apply_pruning(trial, plan, plan.counts(ratio), small)
        flops = _flops(trial, example_input)
        if progress is not None:
            progress(min(trials, steps), steps, f"{ratio:.3f} of each layer's channels pruned: "
                                                f"{flops / before.flops:.3f} of the FLOPs")
        return flops

    low, high = 0.0, 1.0  # cost(low) > budget (unless nothing needs pruning), cost(high) <= budget
    if before.flops <= budget:
        high = 0.0
    else:
        fewest = cost(1.0)
        if fewest > budget:
            raise PolicyError(f"even one channel per layer keeps {fewest / before.flops:.3f} of the FLOPs, more than "
                              f"the target {target_flops}; ask for a larger target")
        while high - low > 1.0 / plan.widest:
            middle = (low + high) / 2
            if cost(middle) <= budget:
                high = middle
            else:
                low = middle
    counts = plan.counts(high)
    widths = {name: len(r) for name, r in plan.rankings.items()}
    apply_pruning(network, plan, counts, small)
    after = network_stats(network, example_input)
    assert after.flops <= budget, (after.flops, budget)
    return PruningReport(criterion=criterion, target_flops=float(target_flops), ratio=high, before=before, after=after,
                         groups={name: (widths[name], widths[name] - counts[name]) for name in plan.rankings},
                         modules=channel_counts(network), trials=trials, seconds=time.perf_counter() - start,
                         calibration_inputs=len(labelled) if criterion == "taylor" and labelled else 0,
                         unused_layers=unused)
