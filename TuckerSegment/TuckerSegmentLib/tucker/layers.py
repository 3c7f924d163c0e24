"""What compression works on: the decomposable layers of a network, each described once
(``LayerInfo``, with its convolution as an operation ``ConvOp``), and layer plans applied to a network."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import astuple, dataclass, replace
from typing import Literal

import torch
from torch import nn

from ..errors import RankMismatchError
from .decomposition import LayerPlan, channel_dims, factorized_like, is_decomposable, replace_modules
from .network_stats import count_flops

OpKind = Literal["conv", "convtranspose", "matmul", "patchmatmul"]


@dataclass(frozen=True)
class ConvOp:
    """One convolution-like operation as it is timed: kind, channels, geometry and input shape (N, C, ...)."""

    kind: OpKind
    c_in: int
    c_out: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    bias: bool
    input_shape: tuple[int, ...]

    @classmethod
    def pointwise(cls, kind: OpKind, c_in: int, c_out: int, bias: bool, input_shape: tuple[int, ...]) -> ConvOp:
        """A 1×…×1 channel map (``kind`` "conv" or "matmul") on an input of ``input_shape`` (channels replaced)."""
        ones, zeros = (1,) * (len(input_shape) - 2), (0,) * (len(input_shape) - 2)
        return cls(kind, c_in, c_out, ones, ones, zeros, ones, zeros, bias, (input_shape[0], c_in, *input_shape[2:]))

    def with_channels(self, c_in: int, c_out: int, bias: bool) -> ConvOp:
        return replace(self, c_in=c_in, c_out=c_out, bias=bias, input_shape=(self.input_shape[0], c_in,
                                                                             *self.input_shape[2:]))

    def as_matmul(self) -> ConvOp:
        """The same operation executed as a matrix product (see ``matmul_applies``)."""
        return replace(self, kind="patchmatmul" if self.kind == "convtranspose" else "matmul")

    def key(self) -> str:
        return "|".join(str(field) for field in astuple(self))


def conv_op(conv: nn.Module, input_shape: tuple[int, ...]) -> ConvOp:
    """The ``ConvOp`` of a dense convolution module called on an input of ``input_shape``."""
    return ConvOp("convtranspose" if conv.transposed else "conv", conv.in_channels, conv.out_channels,
                  tuple(conv.kernel_size), tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation),
                  tuple(conv.output_padding), conv.bias is not None, tuple(input_shape))


def matmul_applies(op: ConvOp) -> bool:
    """Whether ``op`` can run as a matrix product: a pointwise convolution, or a transposed one whose
    kernel equals its stride (no padding, dilation or output padding)."""
    ones, zeros = (1,) * len(op.kernel_size), (0,) * len(op.kernel_size)
    plain = op.padding == zeros and op.dilation == ones and op.output_padding == zeros
    if op.kind == "conv":
        return plain and op.kernel_size == ones and op.stride == ones
    return op.kind == "convtranspose" and plain and op.kernel_size == op.stride


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


def layer_info(name: str, module: nn.Module, input_shape: tuple[int, ...] | None,
               output_shape: tuple[int, ...] | None) -> LayerInfo:
    """What a policy knows of ``module`` called on ``input_shape`` (``None``: no example input)."""
    c_out, c_in = channel_dims(module)
    flops = count_flops(module, input_shape, module.weight.dtype) if input_shape else None
    return LayerInfo(name=name, weight=module.weight.detach(), layer_type=type(module).__name__,
                     c_out=c_out, c_in=c_in, kernel_size=tuple(module.kernel_size),
                     flops=flops, input_shape=input_shape, output_shape=output_shape,
                     op=conv_op(module, input_shape) if input_shape else None)


def downsampling(network: nn.Module) -> tuple[int, ...] | None:
    """A U-Net's total downsampling per spatial axis: the product of its transposed convolutions' strides (one per
    decoder stage in nnU-Net's networks, dense or factorised); None for a network without transposed convolutions."""
    factors: tuple[int, ...] | None = None
    for module in network.modules():
        if isinstance(module, nn.modules.conv._ConvTransposeNd):
            stride = tuple(module.stride)
            factors = stride if factors is None else tuple(f * s for f, s in zip(factors, stride, strict=True))
    return factors


def smallest_same_input(network: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The smallest input shape on which a U-Net like ``network`` runs the same operations as on ``shape``: each
    spatial axis twice its total downsampling (``downsampling``: the bottleneck keeps two voxels per axis, as
    instance normalisation needs), never more than ``shape`` itself; ``shape`` for a network without a decoder."""
    factors = downsampling(network)
    if factors is None or len(factors) != len(shape) - 2:
        return shape
    return (*shape[:2], *(min(size, 2 * factor) for size, factor in zip(shape[2:], factors, strict=True)))


def crop_edges(network: nn.Module, spatial: tuple[int, ...], voxels: int) -> tuple[int, ...]:
    """The largest window of at most ``voxels`` voxels within ``spatial`` that ``network`` runs as it runs
    ``spatial``: the longest axis shortened by one downsampling step (``downsampling``) at a time, never below
    two steps; ``spatial`` itself when it is small enough or the network has no decoder."""
    factors = downsampling(network)
    if factors is None or len(factors) != len(spatial):
        return tuple(spatial)
    edges = list(spatial)
    while math.prod(edges) > voxels:
        shorter = [axis for axis in range(len(edges)) if edges[axis] - factors[axis] >= 2 * factors[axis]]
        if not shorter:
            break
        axis = max(shorter, key=lambda a: edges[a])
        edges[axis] -= factors[axis]
    return tuple(edges)


def decomposable_layers(network: nn.Module) -> list[tuple[str, nn.Module]]:
    """Each decomposable layer once, under its first qualified name (aliases are skipped)."""
    return [(name, module) for name, module in network.named_modules() if is_decomposable(module)]


def apply_plans(network: nn.Module, plans: Mapping[str, LayerPlan], source: str = "tucker.json") -> None:
    """Give ``network`` the factorised structure that ``plans`` record, weights uninitialised.

    Used to rebuild a compressed network from its plans before loading its weights. Every named
    layer must exist, be a convolution and admit the ranks, else ``RankMismatchError``.
    """
    replacements: dict[int, nn.Module] = {}
    for name, plan in plans.items():
        try:
            module = network.get_submodule(name)
        except AttributeError:
            raise RankMismatchError(f"{source}: layer {name!r} does not exist in the network built from plans.json; "
                                    "the compressed folder belongs to other plans: compress the model again") from None
        if not is_decomposable(module):
            raise RankMismatchError(f"{source}: {name!r} is a {type(module).__name__}, not a convolution, in the "
                                    "network built from plans.json: compress the model again")
        c_out, c_in = channel_dims(module)
        for label, rank, channels in (("rank_out", plan.rank_out, c_out), ("rank_in", plan.rank_in, c_in)):
            if rank is not None and not 1 <= rank <= channels:
                raise RankMismatchError(f"{source}: layer {name!r} has {label}={rank} but the plans give it {channels} "
                                        "channels there; the file does not match plans.json: compress the model again")
        replacements[id(module)] = factorized_like(module, plan)
    replace_modules(network, replacements)
