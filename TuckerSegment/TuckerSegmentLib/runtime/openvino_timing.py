"""Time convolutions and whole networks in OpenVINO, so that compression decisions on a CPU are taken
from the runtime that will run the result there.

A single convolution is built directly in OpenVINO's operation set (a few hundredths of a second; a
conversion from PyTorch takes about two) and compiled as inference compiles networks (latency hint,
the chosen precision); whole networks are timed by ``execution.openvino_interleaved_seconds``. Alone, an operation also
reorders its input and output between the plain layout and the one its kernel uses, which inside a
network happens once, not around every convolution; so its time is read from OpenVINO's per-node
performance counters with those reorders left out (timed with them, the demo network's smallest
ranks everywhere seemed to take 76 % of the original's time, without them 50 %; as a whole network
its uniform 0.5 variant, with larger ranks, takes 63 %: docs/speed.md).
"""
from __future__ import annotations

import math
import statistics
from dataclasses import replace

import numpy as np

from ..tucker.layers import ConvOp


LAYOUT_NODES = ("Parameter", "Result", "Reorder")  # not the operation's own work (see the module docstring)


def compile_op(op: ConvOp, precision: str, weight: np.ndarray | None = None, bias: np.ndarray | None = None,
               profile: bool = False):  # noqa: ANN201 (openvino is imported lazily)
    """An infer request running ``op`` in OpenVINO on the CPU, with PyTorch's ``weight`` and ``bias`` layout
    (random when not given: timing does not depend on them); ``profile``: with per-node performance
    counters. The execution forms PyTorch needs (matmul, patchmatmul) are the same operation to
    OpenVINO: built as the convolution."""
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
                                                                         "PERFORMANCE_HINT": "LATENCY",
                                                                         "PERF_COUNT": profile})
    return compiled.create_infer_request()


TIMING_VOXELS = 64 ** 3  # larger operations are timed on a part of their input and scaled (see ``reduced``)


def reduced(op: ConvOp, voxels: int = TIMING_VOXELS) -> tuple[ConvOp, float]:
    """``op`` on an input halved along its longest axes until at most ``voxels`` voxels remain (an axis only while
    it stays a whole number of strides), and the factor its time scales by (the voxels it lost): a convolution's
    time grows in proportion to its voxels once they are this many, and timing the 112×112×128 layers of a 3 mm
    TotalSegmentator network whole took most of a build's candidate timing."""
    spatial = list(op.input_shape[2:])
    while math.prod(spatial) > voxels:
        halvable = [axis for axis, size in enumerate(spatial) if size % (2 * op.stride[axis]) == 0]
        if not halvable:
            break
        spatial[max(halvable, key=lambda axis: spatial[axis])] //= 2
    scale = math.prod(op.input_shape[2:]) / math.prod(spatial)
    return replace(op, input_shape=(*op.input_shape[:2], *spatial)), scale


SLOW_SECONDS = 0.3  # an operation this slow is timed by fewer runs: its own noise is small beside its time


def openvino_op_seconds(op: ConvOp, precision: str, repeats: int = 3) -> float:
    """Median seconds of ``op``'s own nodes, compiled alone by OpenVINO on the CPU, by its performance
    counters (layout reorders left out): fast operations get more runs, slow ones (``SLOW_SECONDS``) runs until
    they add up to a second."""
    request = compile_op(op, precision, profile=True)
    x = np.random.default_rng(1).standard_normal(op.input_shape, dtype=np.float32)

    def run() -> float:
        request.infer([x], share_inputs=True, share_outputs=True)
        return sum(node.real_time.total_seconds() for node in request.profiling_info
                   if node.node_type not in LAYOUT_NODES)
    run()  # warm-up
    times = [run()]
    count = repeats * (3 if times[0] < 0.05 else 1)
    at_least = 1 if times[0] >= SLOW_SECONDS else min(3, count)
    while len(times) < count and (len(times) < at_least or sum(times) < (1.0 if at_least == 1 else 0.5)):
        times.append(run())
    return statistics.median(times)
