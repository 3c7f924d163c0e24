"""Parameters, FLOPs and weight bytes of a network, measured on shapes only (meta tensors).

FLOPs follow ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-add, convolutions
and matrix products only. Parameters count what takes part in inference: the parameters of the
modules that a forward pass actually calls (nnU-Net's unused deep-supervision heads stay in the
model but not in the count).
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

FLOP_CONVENTION = "FlopCounterMode: 2 FLOPs per multiply-add, convolutions and matmuls only"


@dataclass(frozen=True)
class NetworkStats:
    """Size and cost of one network for one forward pass of ``input_shape``."""

    params: int
    flops: int
    weight_bytes: int
    input_shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self) | {"input_shape": list(self.input_shape), "flop_convention": FLOP_CONVENTION}


@dataclass
class Trace:
    """What one forward pass touched: total FLOPs, the modules called and each one's input and output shape."""

    flops: int
    called: set[int] = field(default_factory=set)
    input_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    output_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    return torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")


def meta_copy(module: nn.Module) -> nn.Module:
    """A structural copy of ``module`` whose tensors live on the meta device (no data copied).

    Module aliasing is preserved, and ``module.modules()`` and ``meta_copy(module).modules()``
    list corresponding modules in the same order.
    """
    memo: dict[int, object] = {}
    for tensor in (*module.parameters(), *module.buffers()):
        meta = _meta_like(tensor)
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def trace(module: nn.Module, example_input: torch.Tensor) -> Trace:
    """Run a meta copy of ``module`` once on an input shaped like ``example_input``.

    Nothing is computed: the cost is independent of the input size. Module ids in the result
    refer to ``module`` itself.
    """
    result = Trace(flops=0)
    shadow = meta_copy(module)
    original_id = {id(m): id(o) for m, o in zip(shadow.modules(), module.modules(), strict=True)}

    def hook(mod: nn.Module, args: tuple) -> None:
        key = original_id[id(mod)]
        result.called.add(key)
        if args and isinstance(args[0], torch.Tensor):
            result.input_shapes.setdefault(key, tuple(args[0].shape))

    def after(mod: nn.Module, args: tuple, output: object) -> None:
        if isinstance(output, torch.Tensor):
            result.output_shapes.setdefault(original_id[id(mod)], tuple(output.shape))

    for sub in shadow.modules():
        sub.register_forward_pre_hook(hook)
        sub.register_forward_hook(after)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        shadow(_meta_like(example_input))
    result.flops = int(counter.get_total_flops())
    return result


def count_flops(module: nn.Module, input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> int:
    """FLOPs of one call of ``module`` on an input of ``input_shape``."""
    return trace(module, torch.empty(input_shape, dtype=dtype, device="meta")).flops


def inference_parameters(module: nn.Module, called: set[int]) -> list[torch.Tensor]:
    """Unique parameters owned by the modules in ``called`` (ids from a ``Trace``)."""
    unique: dict[int, torch.Tensor] = {}
    for sub in module.modules():
        if id(sub) in called:
            for param in sub.parameters(recurse=False):
                unique.setdefault(id(param), param)
    return list(unique.values())


def stats_from_trace(network: nn.Module, result: Trace, input_shape: tuple[int, ...]) -> NetworkStats:
    """``NetworkStats`` of ``network`` from a ``trace`` of it on an input of ``input_shape``."""
    params = inference_parameters(network, result.called)
    buffers = {id(b): b for sub in network.modules() if id(sub) in result.called for b in sub.buffers(recurse=False)}
    weight_bytes = sum(t.numel() * t.element_size() for t in (*params, *buffers.values()))
    return NetworkStats(params=sum(p.numel() for p in params), flops=result.flops,
                        weight_bytes=weight_bytes, input_shape=input_shape)


def network_stats(network: nn.Module, example_input: torch.Tensor) -> NetworkStats:
    """Parameters and weight bytes used in inference, and FLOPs of one forward of ``example_input``."""
    return stats_from_trace(network, trace(network, example_input), tuple(example_input.shape))
