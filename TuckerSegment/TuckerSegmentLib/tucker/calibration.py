"""Activation statistics from unlabeled calibration inputs: what data-aware compression minimises against.

For every decomposable layer, one pass over the calibration inputs accumulates the second moment of
its input channels (E[x xᵀ], Cin×Cin) and of its output channels before the bias (Cout×Cout), over
a deterministic subsample of voxels. The output error of a factorised kernel Ŵ is then
E‖(W − Ŵ) x‖² = tr((W − Ŵ) E[x xᵀ] (W − Ŵ)ᵀ) per kernel tap, which ``output_aware_factors`` minimises.
No labels, no training.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import PolicyError

MAX_VOXELS = 16384  # voxels per layer and input used for the statistics


@dataclass
class LayerStatistics:
    """Second moments of one layer's input and output channels (float64), the voxels and calls they come from."""

    in_cov: torch.Tensor
    out_cov: torch.Tensor
    voxels: int = 0
    calls: int = 0
    gain: float | None = None  # output sensitivity (see ``output_sensitivity``), when measured


def _channels_by_voxels(tensor: torch.Tensor, limit: int) -> torch.Tensor:
    """(C, N) float64 view of a (B, C, ...) activation, N ≤ ``limit`` evenly spaced voxels."""
    flat = tensor.detach().movedim(1, 0).reshape(tensor.shape[1], -1)
    if flat.shape[1] > limit:
        flat = flat[:, torch.linspace(0, flat.shape[1] - 1, limit, device=flat.device).long()]
    return flat.to(torch.float64)


def collect_statistics(network: nn.Module, layers: Sequence[tuple[str, nn.Module]],
                       calibration: Iterable[torch.Tensor], max_voxels: int = MAX_VOXELS) -> dict[str, LayerStatistics]:
    """Run ``network`` on each calibration input and return each called layer's ``LayerStatistics``."""
    stats: dict[str, LayerStatistics] = {}
    handles = []

    def hook_for(name: str):
        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = _channels_by_voxels(args[0], max_voxels)
            y = output.detach()
            if mod.bias is not None:
                y = y - mod.bias.detach().reshape(1, -1, *([1] * (y.dim() - 2)))
            y = _channels_by_voxels(y, max_voxels)
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = LayerStatistics(torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64),
                                                      torch.zeros(y.shape[0], y.shape[0], dtype=torch.float64))
            entry.in_cov += (x @ x.T).cpu()
            entry.out_cov += (y @ y.T).cpu()
            entry.voxels += x.shape[1]
            entry.calls += 1
        return hook

    seen: set[int] = set()
    for name, module in layers:
        if id(module) not in seen:
            seen.add(id(module))
            handles.append(module.register_forward_hook(hook_for(name)))
    count = 0
    was_training = network.training
    try:
        network.eval()
        with torch.no_grad():
            for batch in calibration:
                network(batch)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        network.train(was_training)
    if count == 0:
        raise PolicyError("calibration gave no input; pass at least one volume (or leave calibration out)")
    for entry in stats.values():
        entry.in_cov /= max(entry.voxels, 1)
        entry.out_cov /= max(entry.voxels, 1)
    return stats


def output_sensitivity(network: nn.Module, layers: Sequence[tuple[str, nn.Module]], inputs: Sequence[torch.Tensor],
                       noise: float = 0.1, seed: int = 0) -> dict[str, float]:
    """How strongly each layer's errors reach the network's output: the relative output energy change per
    relative energy of Gaussian noise added to the layer's output (``noise`` times its standard deviation)."""
    generator = torch.Generator().manual_seed(seed)
    was_training = network.training
    network.eval()
    gains: dict[str, float] = {}
    try:
        with torch.no_grad():
            references = [network(x) for x in inputs]
            for name, module in layers:
                def perturb(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                    scale = noise * float(output.std())
                    return output + scale * torch.randn(output.shape, generator=generator).to(output)
                handle = module.register_forward_hook(perturb)
                try:
                    changes = [float((network(x) - ref).norm() ** 2 / ref.norm().clamp_min(1e-12) ** 2)
                               for x, ref in zip(inputs, references, strict=True)]
                finally:
                    handle.remove()
                gains[name] = sum(changes) / len(changes) / noise ** 2
    finally:
        network.train(was_training)
    return gains


def prediction_agreement(network: nn.Module, reference: nn.Module, inputs: Sequence[torch.Tensor]) -> float:
    """Label-free agreement of two segmentation networks on ``inputs``: mean Dice, over the foreground
    classes either predicts, between their arg-max label maps."""
    scores = []
    with torch.no_grad():
        for x in inputs:
            a, b = network(x).argmax(1), reference(x).argmax(1)
            for value in torch.unique(torch.cat([a.unique(), b.unique()])).tolist():
                if value != 0:
                    both = int(((a == value) & (b == value)).sum())
                    scores.append(2 * both / (int((a == value).sum()) + int((b == value).sum())))
    return sum(scores) / len(scores) if scores else 1.0
