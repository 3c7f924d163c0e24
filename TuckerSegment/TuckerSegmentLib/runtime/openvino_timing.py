"""Time convolutions and whole networks in OpenVINO, so that compression decisions on a CPU are taken
from the runtime that will run the result there.

A single convolution is built directly in OpenVINO's operation set (a few hundredths of a second; a
conversion from PyTorch takes about two) and compiled as inference compiles networks (latency hint,
the chosen precision); whole networks go through ``OpenVINONetwork``. Timed alone, an operation also
pays for reordering its input and output into OpenVINO's blocked layout, which a network does once:
callers use these times to rank options and correct the total by timing whole networks.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..tucker.layers import ConvOp
from .inference import OpenVINONetwork


def compile_op(op: ConvOp, precision: str, weight: np.ndarray | None = None,
               bias: np.ndarray | None = None):  # noqa: ANN201 (openvino is imported lazily)
    """An infer request running ``op`` in OpenVINO on the CPU, with PyTorch's ``weight`` and ``bias`` layout
    (random when not given: timing does not depend on them). The execution forms PyTorch needs (matmul,
    patchmatmul) are the same operation to OpenVINO: built as the convolution."""
    import openvino as ov
    import openvino.opset13 as ops
    rng = np.random.default_rng(0)
    dims = len(op.kernel_size)
    data = ops.parameter(list(op.input_shape), np.float32)
    pads = list(op.padding)
    transposed = op.kind in ("convtranspose", "patchmatmul")
    if weight is None:
        channels = (op.c_in, op.c_out) if transposed else (op.c_out, op.c_in)
        weight = rng.standard_normal((*channels, *op.kernel_size), dtype=np.float32)
    if transposed:
        out = ops.convolution_backprop_data(data, ops.constant(weight), list(op.stride), pads_begin=pads,
                                            pads_end=pads, dilations=list(op.dilation),
                                            output_padding=list(op.output_padding))
    else:
        out = ops.convolution(data, ops.constant(weight), list(op.stride), pads, pads, list(op.dilation))
    if op.bias:
        if bias is None:
            bias = rng.standard_normal(op.c_out, dtype=np.float32)
        out = ops.add(out, ops.constant(bias.reshape(1, op.c_out, *(1,) * dims)))
    compiled = ov.Core().compile_model(ov.Model([out], [data]), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                         "PERFORMANCE_HINT": "LATENCY"})
    return compiled.create_infer_request()


def median_seconds(call: Callable[[], object], repeats: int, warmup: int = 1, enough: float = 0.5) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs after ``warmup`` runs; fewer than ``repeats``
    (at least three) once they add up to ``enough`` seconds."""
    for _ in range(warmup):
        call()
    times: list[float] = []
    while len(times) < repeats and (len(times) < min(3, repeats) or sum(times) < enough):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def openvino_op_seconds(op: ConvOp, precision: str, repeats: int = 3) -> float:
    """Median seconds of ``op`` compiled alone by OpenVINO on the CPU (fast ones get more runs)."""
    request = compile_op(op, precision)
    x = np.random.default_rng(1).standard_normal(op.input_shape, dtype=np.float32)
    first = median_seconds(lambda: request.infer([x], share_inputs=True, share_outputs=True), 1)
    quick = first < 0.05
    return median_seconds(lambda: request.infer([x], share_inputs=True, share_outputs=True),
                          repeats * (3 if quick else 1), warmup=2 if quick else 0)


def openvino_interleaved_seconds(networks: Sequence[nn.Module], example: torch.Tensor, precision: str,
                                 rounds: int) -> list[list[float]]:
    """Per network (each converted and compiled for ``example``'s shape as inference runs it), the seconds
    of one forward pass in each of ``rounds`` rounds, networks taking turns, after a warm-up pass each."""
    converted = [OpenVINONetwork(network, example, precision) for network in networks]
    x = torch.randn(example.shape)
    times: list[list[float]] = [[] for _ in converted]
    for network in converted:
        network(x)
    for _ in range(rounds):
        for network, spent in zip(converted, times, strict=True):
            start = time.perf_counter()
            network(x)
            spent.append(time.perf_counter() - start)
    return times
