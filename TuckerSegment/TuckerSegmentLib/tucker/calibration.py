"""Activation statistics from unlabeled calibration inputs: what data-aware compression minimises against.

For every decomposable layer, one pass over the calibration inputs accumulates the second moment of
its input channels (E[x xᵀ], Cin×Cin) and of its output channels before the bias (Cout×Cout), over
a deterministic subsample of voxels. The output error of a factorised kernel Ŵ is then
E‖(W − Ŵ) x‖² = tr((W − Ŵ) E[x xᵀ] (W − Ŵ)ᵀ) per kernel tap, which ``output_aware_factors`` minimises.
No labels, no training.

An input may carry a mask (``CalibrationPatch``): then only the voxels it marks count, in the
statistics, the output sensitivity and the agreement, so one part of a CT can calibrate while the
other part scores the result. An activation of another resolution reads the mask by nearest
neighbour (PyTorch's ``nearest``: voxel o of an activation s times coarser reads mask voxel s·o, the
centre of nnU-Net's stride-s convolution).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from ..errors import PolicyError

MAX_VOXELS = 16384  # voxels per layer and input used for the statistics


@dataclass(frozen=True, eq=False)
class CalibrationPatch:
    """A calibration input (``image``: (B, C, *spatial) float) and the voxels it may contribute
    (``mask``: (B, 1, *spatial) bool, True = usable; ``None``: all)."""

    image: torch.Tensor
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mask is None:
            return
        expected = (self.image.shape[0], 1, *self.image.shape[2:])
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool:
            raise PolicyError(f"a calibration mask must be a bool tensor, not {getattr(self.mask, 'dtype', type(self.mask))}"
                              "; pass True where calibration may use the voxel")
        if tuple(self.mask.shape) != expected:
            raise PolicyError(f"a calibration mask has shape {tuple(self.mask.shape)}, its image needs {expected} "
                              "(batch, 1, spatial); cut the mask with the image")
        if not bool(self.mask.any()):
            raise PolicyError("a calibration mask selects no voxel; leave such a patch out")


CalibrationInput = torch.Tensor | CalibrationPatch


def _parts(item: CalibrationInput) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (item.image, item.mask) if isinstance(item, CalibrationPatch) else (item, None)


def _mask_for(mask: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """``mask`` (B, 1, *spatial) on an activation's grid, by nearest neighbour."""
    if tuple(mask.shape[2:]) == tuple(spatial):
        return mask
    return functional.interpolate(mask.to(torch.float32), size=tuple(spatial), mode="nearest") > 0.5


def _channels_by_voxels(tensor: torch.Tensor, mask: torch.Tensor | None, limit: int) -> torch.Tensor:
    """(C, N) float64 view of a (B, C, ...) activation's voxels (those ``mask`` marks, when given), N ≤ ``limit``
    evenly spaced ones."""
    flat = tensor.detach().movedim(1, 0).reshape(tensor.shape[1], -1)
    if mask is not None:
        flat = flat[:, _mask_for(mask, tensor.shape[2:]).reshape(-1).to(flat.device)]
    if flat.shape[1] > limit:
        flat = flat[:, torch.linspace(0, flat.shape[1] - 1, limit, device=flat.device).long()]
    return flat.to(torch.float64)


@dataclass
class LayerStatistics:
    """Second moments of one layer's input and output channels (float64), the voxels and calls they come from."""

    in_cov: torch.Tensor
    out_cov: torch.Tensor
    voxels: int = 0  # input voxels
    calls: int = 0
    gain: float | None = None  # output sensitivity (see ``output_sensitivity``), when measured
    out_voxels: int = 0


def collect_statistics(network: nn.Module, layers: Sequence[tuple[str, nn.Module]],
                       calibration: Iterable[CalibrationInput], max_voxels: int = MAX_VOXELS) -> dict[str, LayerStatistics]:
    """Run ``network`` on each calibration input and return each called layer's ``LayerStatistics``; a
    masked input counts only its marked voxels, and not at all for a layer where none is left."""
    stats: dict[str, LayerStatistics] = {}
    handles = []
    current: list[torch.Tensor | None] = [None]  # the mask of the input being run

    def hook_for(name: str):
        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = _channels_by_voxels(args[0], current[0], max_voxels)
            y = output.detach()
            if mod.bias is not None:
                y = y - mod.bias.detach().reshape(1, -1, *([1] * (y.dim() - 2)))
            y = _channels_by_voxels(y, current[0], max_voxels)
            if x.shape[1] == 0 or y.shape[1] == 0:
                return
            entry = stats.get(name)
            if entry is None:
                entry = stats[name] = LayerStatistics(torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64),
                                                      torch.zeros(y.shape[0], y.shape[0], dtype=torch.float64))
            entry.in_cov += (x @ x.T).cpu()
            entry.out_cov += (y @ y.T).cpu()
            entry.voxels += x.shape[1]
            entry.out_voxels += y.shape[1]
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
            for item in calibration:
                image, current[0] = _parts(item)
                network(image)
                count += 1
    finally:
        for handle in handles:
            handle.remove()
        network.train(was_training)
    if count == 0:
        raise PolicyError("calibration gave no input; pass at least one volume (or leave calibration out)")
    for entry in stats.values():
        entry.in_cov /= entry.voxels
        entry.out_cov /= entry.out_voxels
    return stats


def _masked_voxels(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A (B, C, *spatial) network output's channels by the voxels ``mask`` marks (all without one)."""
    flat = tensor.movedim(1, 0).reshape(tensor.shape[1], -1)
    return flat if mask is None else flat[:, _mask_for(mask, tensor.shape[2:]).reshape(-1).to(flat.device)]


def output_sensitivity(network: nn.Module, layers: Sequence[tuple[str, nn.Module]], inputs: Sequence[CalibrationInput],
                       noise: float = 0.1, seed: int = 0) -> dict[str, float]:
    """How strongly each layer's errors reach the network's output: the relative output energy change per
    relative energy of Gaussian noise added to the layer's output (``noise`` times its standard deviation);
    for a masked input both energies are those of its masked voxels."""
    generator = torch.Generator().manual_seed(seed)
    was_training = network.training
    network.eval()
    gains: dict[str, float] = {}
    parts = [_parts(item) for item in inputs]
    current: list[torch.Tensor | None] = [None]  # the mask of the input being run

    def perturb(mod: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        scale = noise * float(_masked_voxels(output, current[0]).std())
        return output + scale * torch.randn(output.shape, generator=generator).to(output)

    def change(x: torch.Tensor, mask: torch.Tensor | None, reference: torch.Tensor) -> float:
        current[0] = mask
        return float((_masked_voxels(network(x), mask) - reference).norm() ** 2 / reference.norm().clamp_min(1e-12) ** 2)
    try:
        with torch.no_grad():
            references = [_masked_voxels(network(x), mask) for x, mask in parts]
            for name, module in layers:
                handle = module.register_forward_hook(perturb)
                try:
                    changes = [change(x, mask, ref) for (x, mask), ref in zip(parts, references, strict=True)]
                finally:
                    handle.remove()
                gains[name] = sum(changes) / len(changes) / noise ** 2
    finally:
        network.train(was_training)
    return gains


def prediction_agreement(network: nn.Module, reference: nn.Module, inputs: Sequence[CalibrationInput]) -> float:
    """Label-free agreement of two segmentation networks on ``inputs``: mean Dice, over the foreground
    classes either predicts, between their arg-max label maps (on the masked voxels of a masked input)."""
    scores = []
    with torch.no_grad():
        for item in inputs:
            x, mask = _parts(item)
            a = _masked_voxels(network(x).argmax(1, keepdim=True), mask)
            b = _masked_voxels(reference(x).argmax(1, keepdim=True), mask)
            for value in torch.unique(torch.cat([a.unique(), b.unique()])).tolist():
                if value != 0:
                    both = int(((a == value) & (b == value)).sum())
                    scores.append(2 * both / (int((a == value).sum()) + int((b == value).sum())))
    return sum(scores) / len(scores) if scores else 1.0
