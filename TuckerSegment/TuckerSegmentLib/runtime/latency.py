"""Measured latencies of single convolutions on the device and runtime at hand, cached per device.

Speed on a real device is not proportional to FLOPs: small-channel and 1×1×1 convolutions run far
below peak on oneDNN and cuDNN. So every decision about how a layer runs is taken from timings of the
exact operation (type, channels, geometry, input shape) measured on the device, in the runtime that
will run it (PyTorch, or OpenVINO on a CPU), and kept in a JSON table per device and runtime
(``<cache>/latency/<device>.json``, sealed with its checksum) so each is measured once. A table that is damaged
(unreadable, changed since written, of another shape, a timing that is not a number of seconds) is said in a
``CacheWarning`` and measured again; without a usable cache, timings are measured and not kept.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..atomic import atomic_output_file
from ..checksums import sealed, unsealed
from ..errors import CacheWarning, TuckerSegmentError
from ..paths import cache_folder, cache_warning
from ..tucker.layers import ConvOp
from .inference import RuntimeChoice

TABLE_VERSION = 1
OPENVINO_TABLE_VERSION = 2  # 1: wall time of operations alone, reorders included
_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


class ChannelMatmul(nn.Module):
    """A 1×…×1 convolution executed as one matrix product over the channel axis.

    Same function as the pointwise convolution it replaces; on CPUs it is often several times faster
    for few channels on large volumes (oneDNN runs such convolutions far below peak)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().reshape(weight.shape[0], weight.shape[1]).clone(),
                                   requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        if self.bias is None:
            out = torch.matmul(self.weight, flat)
        else:
            out = torch.baddbmm(self.bias.view(1, -1, 1), self.weight.expand(flat.shape[0], -1, -1), flat)
        return out.view(x.shape[0], self.weight.shape[0], *x.shape[2:])


class PatchMatmul(nn.Module):
    """A transposed convolution whose kernel equals its stride (no overlap, no padding; nnU-Net's
    upsampling) executed as one matrix product and a reshuffle of the kernel taps into space.

    Same function as the ``ConvTranspose`` it replaces; PyTorch runs those on a slow generic path
    on CPUs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.kernel_size = tuple(weight.shape[2:])
        self.out_channels, self.in_channels = weight.shape[1], weight.shape[0]
        taps = math.prod(self.kernel_size)
        self.weight = nn.Parameter(weight.detach().reshape(weight.shape[0], -1).T.contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().repeat_interleave(taps), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, spatial = x.shape[0], x.shape[2:]
        flat = x.flatten(2)
        if self.bias is None:
            out = torch.matmul(self.weight, flat)
        else:
            out = torch.baddbmm(self.bias.view(1, -1, 1), self.weight.expand(n, -1, -1), flat)
        dims = len(spatial)
        out = out.view(n, self.out_channels, *self.kernel_size, *spatial)
        order = [0, 1, *(axis for i in range(dims) for axis in (2 + dims + i, 2 + i))]
        return out.permute(order).reshape(n, self.out_channels, *(s * k for s, k in zip(spatial, self.kernel_size,
                                                                                       strict=True)))


def build_op(op: ConvOp, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """``op`` with random weights (timing does not depend on the values)."""
    dims = len(op.kernel_size)
    bias = torch.randn(op.c_out) if op.bias else None
    if op.kind == "matmul":
        return ChannelMatmul(torch.randn(op.c_out, op.c_in), bias).to(device, dtype)
    if op.kind == "patchmatmul":
        return PatchMatmul(torch.randn(op.c_in, op.c_out, *op.kernel_size), bias).to(device, dtype)
    common = dict(stride=op.stride, padding=op.padding, dilation=op.dilation, bias=op.bias,
                  device=device, dtype=dtype)
    if op.kind == "convtranspose":
        return _CONV_T[dims](op.c_in, op.c_out, op.kernel_size, output_padding=op.output_padding, **common)
    return _CONV[dims](op.c_in, op.c_out, op.kernel_size, **common)




def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: torch.device, runtime: RuntimeChoice | None = None) -> str:
    """A human-readable description of what runs on ``device`` (model, threads, runtime and its version;
    ``runtime`` None or PyTorch: torch)."""
    if runtime is not None and runtime.runtime == "openvino":
        import openvino as ov
        version = ov.__version__.split("-")[0]  # 2026.4.1, not the build string after it
        return f"{_cpu_model()} ({os.cpu_count()} CPUs, OpenVINO {version} {runtime.precision})"
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__}, autocast fp16)"
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()}, torch {torch.__version__})"
    return f"{_cpu_model()} ({torch.get_num_threads()} threads, torch {torch.__version__})"


def _is_seconds(value: object) -> bool:
    """Whether ``value`` is a timing: a finite, non-negative number (not a boolean, not text)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()[:120]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device: torch.device):
    """The precision inference uses on ``device``: fp16 autocast on CUDA (as nnU-Net), float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def time_call(call: Callable[[], object], device: torch.device, repeats: int = 3, warmup: int = 1,
              enough: float | None = None) -> float:
    """Median seconds of ``call()`` over ``repeats`` runs after ``warmup`` runs, device synchronised;
    with ``enough``, fewer runs once they add up to that many seconds (slow operations)."""
    with torch.inference_mode(), autocast(device):
        for _ in range(warmup):
            call()
        synchronize(device)
        times: list[float] = []
        while len(times) < repeats and (enough is None or len(times) < min(3, repeats) or sum(times) < enough):
            start = time.perf_counter()
            call()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


class LatencyTable:
    """Seconds per ``ConvOp`` on one device in one runtime: looked up, or measured once and remembered.

    ``runtime``: OpenVINO times each operation compiled alone by OpenVINO (``openvino_timing``), and its
    networks run as stored (``stored_form_only``); None or PyTorch times PyTorch's modules. ``measure``
    may be replaced (e.g. by a fixed table in tests); ``path`` persists the table."""

    def __init__(self, device: torch.device | str = "cpu", path: Path | None = None, repeats: int = 3,
                 measure: Callable[[ConvOp], float] | None = None, runtime: RuntimeChoice | None = None) -> None:
        self.device = torch.device(device)
        self.path = path
        self.repeats = repeats
        self.runtime = runtime if runtime is not None and runtime.runtime == "openvino" else None
        self.name = device_name(self.device, self.runtime)
        self.version = OPENVINO_TABLE_VERSION if self.runtime else TABLE_VERSION
        self.measured = 0
        self._measure = measure or (self._time_openvino_op if self.runtime else self._time_op)
        self._seconds = self._stored()

    @property
    def stored_form_only(self) -> bool:
        """Whether networks run as stored here (OpenVINO compiles the stored form; PyTorch can run each layer
        in its fastest execution, see ``execution``)."""
        return self.runtime is not None

    @classmethod
    def for_device(cls, device: torch.device | str, cache: Path | None = None,
                   runtime: RuntimeChoice | None = None) -> LatencyTable:
        """The persistent table of ``device`` (in ``runtime``) in the user cache (see ``paths.cache_folder``); kept
        nowhere when the cache cannot hold it."""
        device = torch.device(device)
        folder = cache_folder("latency", cache=cache)
        return cls(device, folder / f"{_slug(device_name(device, runtime))}.json" if folder else None, runtime=runtime)

    def seconds(self, op: ConvOp) -> float:
        key = op.key()
        if key not in self._seconds:
            self._seconds[key] = float(self._measure(op))
            self.measured += 1
        return self._seconds[key]

    def recorded(self, key: str) -> float | None:
        """A timing stored under a free-form ``key`` (e.g. a layer timed inside its network), if any."""
        return self._seconds.get(key)

    def record(self, key: str, seconds: float) -> float:
        self._seconds[key] = float(seconds)
        self.measured += 1
        return self._seconds[key]

    def _time_op(self, op: ConvOp) -> float:
        module = build_op(op, self.device).eval()
        x = torch.randn(op.input_shape, device=self.device)
        # fast operations get more warm-up and runs: their times swing with allocator state
        first = time_call(lambda: module(x), self.device, repeats=1)
        quick = first < 0.05
        return time_call(lambda: module(x), self.device, self.repeats * (3 if quick else 1),
                         warmup=2 if quick else 0, enough=0.5)

    def _time_openvino_op(self, op: ConvOp) -> float:
        from .openvino_timing import openvino_op_seconds, reduced
        part, scale = reduced(op)
        return openvino_op_seconds(part, self.runtime.precision, self.repeats) * scale

    def _stored(self) -> dict[str, float]:
        """The timings in ``path`` for this device (none when missing, another device's or version's, or damaged:
        said in a ``CacheWarning``, and measured again)."""
        if self.path is None or not self.path.is_file():
            return {}
        try:
            record = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return self._damaged("cannot be read")
        if not isinstance(record, dict):
            return self._damaged("is not a latency table")
        data = unsealed(record, self.path)  # a changed table is said there, and measured again
        if data is None or data.get("version") != self.version or data.get("device") != self.name:
            return {}
        seconds = data.get("seconds")
        if not isinstance(seconds, dict) or not all(_is_seconds(value) for value in seconds.values()):
            return self._damaged("holds a timing that is not a number of seconds")
        return {str(key): float(value) for key, value in seconds.items()}

    def _damaged(self, why: str) -> dict[str, float]:
        cache_warning(f"the latency table {self.path} {why}; it is not used: measuring again")
        return {}

    def save(self) -> None:
        """Merge this table into ``path`` (another process may have added timings) and write it atomically;
        a no-op without ``path``; unwritable caches are not an error."""
        if self.path is None:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CacheWarning)  # a damaged table was said when it was loaded
            self._seconds = self._stored() | self._seconds
        with contextlib.suppress(OSError, TuckerSegmentError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_output_file(self.path) as staging:
                staging.write_text(json.dumps(sealed({"version": self.version, "device": self.name,
                                                      "seconds": self._seconds}), indent=0, sort_keys=True))
