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

from collections.abc import Callable, Iterable, Sequence, Sized
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional

from ..errors import PolicyError
from ..progress import stage

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


def image_and_mask(item: CalibrationInput) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A calibration input's image and its mask (None: every voxel counts)."""
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
                       calibration: Iterable[CalibrationInput], max_voxels: int = MAX_VOXELS,
                       labels: list[torch.Tensor] | None = None) -> dict[str, LayerStatistics]:
    """Run ``network`` on each calibration input and return each called layer's ``LayerStatistics``; a
    masked input counts only its marked voxels, and not at all for a layer where none is left. ``labels``, when
    given, receives each input's arg-max label map from the same pass (as ``predicted_labels`` gives it)."""
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
        with torch.no_grad(), stage("calibration statistics", len(calibration) if isinstance(calibration, Sized)
                                    else 0) as step:
            for item in calibration:
                image, current[0] = image_and_mask(item)
                output = network(image)
                if labels is not None:
                    labels.append(_masked_voxels(output.argmax(1, keepdim=True), current[0])[0])
                count += 1
                step()
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


def cropped(item: CalibrationInput, edges: Sequence[int]) -> CalibrationInput:
    """A window of ``edges`` voxels of ``item`` (whole where it is not larger), centred on its mask's voxels (on
    the image without one), holding at least one of them."""
    image, mask = image_and_mask(item)
    spatial = image.shape[2:]
    if all(size <= edge for size, edge in zip(spatial, edges, strict=True)):
        return item
    marked = (mask[0, 0] if mask is not None else torch.ones(spatial, dtype=torch.bool)).nonzero().to(torch.float64)
    starts = [min(max(0, round(float(centre) - edge / 2)), max(0, size - edge))
              for centre, edge, size in zip(marked.mean(0), edges, spatial, strict=True)]
    window = (..., *(slice(start, start + edge) for start, edge in zip(starts, edges, strict=True)))
    if mask is not None and not bool(mask[window].any()):  # a mask spread around its centre: start at a voxel of it
        starts = [min(int(first), max(0, size - edge)) for first, edge, size in zip(marked[0], edges, spatial, strict=True)]
        window = (..., *(slice(start, start + edge) for start, edge in zip(starts, edges, strict=True)))
    return CalibrationPatch(image[window], None if mask is None else mask[window])


def output_sensitivity(network: nn.Module, layers: Sequence[tuple[str, nn.Module]], inputs: Sequence[CalibrationInput],
                       seed: int = 0) -> dict[str, float]:
    """How strongly each layer's errors reach the network's output: the relative change of the output's energy
    per relative energy of white noise added to the layer's output, to first order σ²‖J‖²_F / ‖y‖² (σ the
    standard deviation of the layer's output, J the Jacobian of the output y with respect to it; for a masked
    input, y and σ on its masked voxels), averaged over ``inputs``.

    ‖J‖²_F comes for every layer at once from one backward pass per input: for a standard Gaussian v on the
    output, E‖Jᵀv‖² = ‖J‖²_F (Hutchinson's estimator). Perturbing one layer at a time took a forward pass per
    layer and input: on a 3 mm TotalSegmentator network (35 layers) still unfinished after 12 minutes here."""
    generator = torch.Generator().manual_seed(seed)
    gains = {name: 0.0 for name, _ in layers}
    needs_grad = [(p, p.requires_grad) for p in network.parameters()]
    was_training = network.training
    network.eval()
    try:
        for p, _ in needs_grad:
            p.requires_grad_(False)  # gradients reach the activations only
        with stage("layer sensitivity", len(inputs)) as step:
            for item in inputs:
                for name, gain in _input_sensitivity(network, layers, item, generator).items():
                    gains[name] += gain / len(inputs)
                step()
    finally:
        for p, needed in needs_grad:
            p.requires_grad_(needed)
        network.train(was_training)
    return gains


def _input_sensitivity(network: nn.Module, layers: Sequence[tuple[str, nn.Module]], item: CalibrationInput,
                       generator: torch.Generator) -> dict[str, float]:
    """Each layer's σ²‖Jᵀv‖² / ‖y‖² on one input (see ``output_sensitivity``), from one forward and backward pass."""
    x, mask = image_and_mask(item)
    energy: dict[str, float] = {}

    def hook_for(name: str):
        def hook(mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            voxels = _masked_voxels(output.detach(), mask)
            spread = float(voxels.var()) if voxels.shape[1] > 1 else 0.0

            def gradient(grad: torch.Tensor) -> None:
                energy[name] = energy.get(name, 0.0) + spread * float(grad.to(torch.float64).pow(2).sum())
            output.register_hook(gradient)
        return hook
    handles = [module.register_forward_hook(hook_for(name)) for name, module in layers]
    try:
        with torch.enable_grad():
            y = network(x.detach().clone().requires_grad_(True))
            probe = torch.randn(y.shape, generator=generator).to(y)
            if mask is not None:
                probe = probe * _mask_for(mask, y.shape[2:]).to(y)
            reference = float(_masked_voxels(y.detach(), mask).to(torch.float64).pow(2).sum())
            y.backward(probe)
    finally:
        for handle in handles:
            handle.remove()
    return {name: value / max(reference, 1e-12) for name, value in energy.items()}


def predicted_labels(network: Callable[[torch.Tensor], torch.Tensor],
                     inputs: Sequence[CalibrationInput]) -> list[torch.Tensor]:
    """``network``'s arg-max label map of each input (of its masked voxels for a masked input), flattened."""
    with torch.no_grad():
        return [_masked_voxels(network(x).argmax(1, keepdim=True), mask)[0] for x, mask in map(image_and_mask, inputs)]


def label_agreement(labels: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Mean Dice, over the foreground classes either predicts, between ``labels`` and ``reference`` (pairs of
    ``predicted_labels``); 1.0 when neither predicts any foreground."""
    scores = []
    for a, b in zip(labels, reference, strict=True):
        for value in torch.unique(torch.cat([a.unique(), b.unique()])).tolist():
            if value != 0:
                both = int(((a == value) & (b == value)).sum())
                scores.append(2 * both / (int((a == value).sum()) + int((b == value).sum())))
    return sum(scores) / len(scores) if scores else 1.0


def prediction_agreement(network: Callable[[torch.Tensor], torch.Tensor],
                         reference: Callable[[torch.Tensor], torch.Tensor], inputs: Sequence[CalibrationInput]) -> float:
    """Label-free agreement of two segmentation networks on ``inputs``: mean Dice, over the foreground
    classes either predicts, between their arg-max label maps (on the masked voxels of a masked input)."""
    return label_agreement(predicted_labels(network, inputs), predicted_labels(reference, inputs))
