"""Which runtime runs the network, at which precision: PyTorch (CUDA, MPS, CPU) or OpenVINO (CPU).

nnU-Net's predictor stays the inference engine either way (sliding window, Gaussian weighting,
aggregation); with OpenVINO it calls an ``OpenVINONetwork``, a module that runs the network compiled
once for the patch shape (static shapes). The converted network and its compiled blobs are kept in the
user cache, checked against their recorded sha256 on every load (``openvino_cache``), so a second load
converts and compiles nothing.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..dependencies import openvino_missing
from ..errors import TuckerSegmentError
from ..paths import cache_folder
from ..progress import stage
from ..tucker.layers import smallest_same_input
from .devices import PRECISIONS, RUNTIMES
from .openvino_cache import NetworkCache, blob_name, remove_old_layout
from .stored_int8 import StoredInt8, source_digest
from .quantization import INT8_FORM, calibration_key, int8_problem, quantize

# f32 for a model with no measured precision form: bf16 and int8 moved held-out Dice by up to 0.0094 on demo
# variants (docs/precision.md), so no precision is a global default; auto's variant choice picks a measured
# bf16 or int8 form of a variant by its own figures (variants/forms.py) and passes it as the asked precision
CPU_DEFAULT_PRECISION = "f32"


@dataclass(frozen=True)
class RuntimeChoice:
    """The runtime and precision that run a network on ``device``, and why."""

    runtime: str  # "torch" or "openvino"
    precision: str  # "f32", "bf16" or "fp16"
    reason: str

    def describe(self) -> str:
        name = "OpenVINO" if self.runtime == "openvino" else "PyTorch"
        return f"{name} {self.precision} ({self.reason})"


def cpu_has_native_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX-512 BF16 or AMX)."""
    from .hardware import cpu_capabilities
    return "BF16" in cpu_capabilities()


def choose_runtime(runtime: str, precision: str, device: torch.device) -> RuntimeChoice:
    """``runtime`` (auto|torch|openvino) and ``precision`` (auto|f32|bf16|fp16) for ``device``; auto is
    OpenVINO on a CPU when it is installed, PyTorch elsewhere. A combination that cannot run is refused."""
    if runtime not in RUNTIMES:
        raise TuckerSegmentError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if precision not in PRECISIONS:
        raise TuckerSegmentError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if device.type != "cpu":
        if runtime == "openvino":
            raise TuckerSegmentError(f"OpenVINO runs on the CPU here, not on {device.type}; choose the CPU device "
                                     "or the torch runtime")
        if device.type == "mps" and precision == "bf16":
            raise TuckerSegmentError("bf16 is not offered on Apple GPUs; choose f32 or fp16")
        if precision == "int8":
            raise TuckerSegmentError(f"int8 runs in OpenVINO on the CPU, not on {device.type}; choose the CPU device, "
                                     "or fp16 on the GPU")
        chosen = "fp16" if precision == "auto" else precision
        reason = ("fp16 autocast as nnU-Net does" if precision == "auto" else "asked") + f", on {device.type}"
        return RuntimeChoice("torch", chosen, reason)
    missing = openvino_missing()
    if runtime == "openvino" and missing:
        raise TuckerSegmentError(f"{missing}; or choose the torch runtime")
    if runtime == "torch" or missing:
        if precision not in ("auto", "f32"):
            raise TuckerSegmentError(f"PyTorch runs {precision} slowly or not at all on the CPU; choose f32, or the "
                                     "openvino runtime for bf16 or int8")
        why = "asked" if runtime == "torch" else f"auto on the CPU, but {missing}"
        return RuntimeChoice("torch", "f32", why)
    if precision == "fp16":
        raise TuckerSegmentError("OpenVINO on this CPU runs f32, bf16 or int8; choose one of those")
    if precision == "bf16" and not cpu_has_native_bf16():
        raise TuckerSegmentError("this CPU has no native bf16 (AVX-512 BF16 or AMX); choose f32")
    if precision == "int8":
        if problem := int8_problem():
            raise TuckerSegmentError(problem)
        return RuntimeChoice("openvino", "int8", f"asked; {INT8_FORM}")
    if precision == "auto":
        return RuntimeChoice("openvino", CPU_DEFAULT_PRECISION, "auto on the CPU")
    return RuntimeChoice("openvino", precision, "asked")


def cache_key(source: str) -> str:
    """The cache key of a network whose ``stored_int8.source_digest`` is ``source`` (its files' contents, never
    their names, sizes or dates, and the patch shape), with the OpenVINO version: a changed file or another
    OpenVINO converts again."""
    import openvino as ov
    return hashlib.sha256(json.dumps([source, ov.__version__]).encode()).hexdigest()


def folder_key(files: list[Path], patch: tuple[int, ...]) -> str:
    """The cache key of a network read from ``files`` for inputs of ``patch`` (see ``cache_key``)."""
    return cache_key(source_digest(files, patch))


class OpenVINONetwork(nn.Module):
    """``network`` converted and compiled by OpenVINO for inputs shaped like ``example``; called like the
    PyTorch module (nnU-Net's predictor feeds it whole patches). ``key`` names the converted network in
    the user cache (None: converted every time, e.g. for a network changed in memory). ``share_output``:
    return OpenVINO's output buffer itself, overwritten by the next call (see ``forward``); False for
    callers that hold one output while computing the next (nnU-Net's test-time mirroring). ``calibration``: for
    int8, the network-ready patches it is quantized on (``quantization.quantize``; the int8 form is cached under
    their hash, so they are made on each load but quantized on once). ``stored``: the int8 form stored in the
    model folder, run as it is (neither converted nor quantized)."""

    def __init__(self, network: nn.Module, example: torch.Tensor, precision: str = "f32",
                 key: str | None = None, share_output: bool = True,
                 calibration: Callable[[], Sequence[np.ndarray]] | None = None, stored: StoredInt8 | None = None) -> None:
        super().__init__()
        import openvino as ov
        if precision not in ("f32", "bf16", "int8"):
            raise TuckerSegmentError(f"OpenVINO runs f32, bf16 or int8 here, not {precision}")
        if precision == "int8" and calibration is None and stored is None:
            raise TuckerSegmentError("int8 needs calibration patches to quantize the network on")
        self.input_shape, self.precision, self.share_output = tuple(example.shape), precision, share_output
        core = ov.Core()
        # int8: the quantized IR's int8 convolutions, the float ones it kept in f32
        config = {"INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision, "PERFORMANCE_HINT": "LATENCY"}
        root = cache_folder("openvino") if key else None  # None: no usable cache, said once
        cache = NetworkCache(root / key[:32], key, self.input_shape) if root and key else None
        if cache:
            remove_old_layout(cache.folder.parent)
        stored = stored if precision == "int8" else None
        patches = calibration() if calibration is not None and precision == "int8" and stored is None else None
        form = ("int8-stored-" + stored.digest[:16] if stored else
                "int8-" + calibration_key(patches)[:16] if patches is not None else precision)
        blob = blob_name(core, form, config)
        compiled = cache.compiled(core, blob, config) if cache else None
        if compiled is None and stored is not None:
            model = core.read_model(stored.xml.decode(), ov.Tensor(np.frombuffer(stored.weights, dtype=np.uint8)))
        elif compiled is None:
            model = _network_model(ov, core, network, self.input_shape, cache)
            if patches is not None:
                model = _quantized(ov, core, model, patches, cache, form)
        if compiled is None:
            with stage(f"compiling for OpenVINO {precision}", announce=bool(cache)):
                compiled = core.compile_model(model, "CPU", config)
            if cache:
                cache.save_compiled(blob, compiled)
        self._request = compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits; with ``share_output`` in OpenVINO's output buffer itself, valid until the next call
        (the sliding window weights and adds each tile into its sum before it predicts the next; copying
        every tile's logits cost more than a tenth of a whole volume's time for 118 classes)."""
        if tuple(x.shape) != self.input_shape:
            raise TuckerSegmentError(f"the OpenVINO network was compiled for {self.input_shape}, not {tuple(x.shape)}")
        patch = np.ascontiguousarray(x.detach().to(torch.float32).cpu().numpy())
        result = self._request.infer([patch], share_inputs=True, share_outputs=self.share_output)
        return torch.from_numpy(result[0])


def converted_network(network: nn.Module, shape: tuple[int, ...]):  # noqa: ANN201 (openvino is imported lazily)
    """``network`` converted to OpenVINO (f32 IR) for inputs of ``shape``, nothing cached."""
    import openvino as ov
    return _convert(ov, network, shape)


def _network_model(ov, core, network: nn.Module, shape: tuple[int, ...], cache: NetworkCache | None):  # noqa: ANN001, ANN202
    """The converted network: from the cache when it holds it whole, else converted (and kept there)."""
    model = cache.converted(core) if cache else None
    if model is None:
        with stage("converting for OpenVINO" + (", once for this model" if cache else ""), announce=bool(cache)):
            model = _convert(ov, network, shape)
        if cache:
            cache.save_converted(ov, model)
    return model


def _quantized(ov, core, model, patches: Sequence[np.ndarray], cache: NetworkCache | None, form: str):  # noqa: ANN001, ANN202
    """``model`` in int8 (its IR ``form`` in the cache, made from these ``patches``): from the cache when it holds it
    whole, else quantized on them (and kept there)."""
    quantized = cache.converted(core, form) if cache else None
    if quantized is None:
        with stage(f"quantizing to int8 on {len(patches)} calibration patches" + (", once for this model" if cache
                                                                                   else ""), announce=bool(cache)):
            quantized = quantize(model, patches[0::2], patches[1::2]).model  # statistics, validation apart
        if cache:
            cache.save_converted(ov, quantized, form)
    return quantized


def _without_telemetry() -> None:
    """Have OpenVINO's converter use its own no-op telemetry stub, also when OpenVINO was imported before the engine
    (``TuckerSegmentLib/__init__`` keeps its telemetry out otherwise). Unless a user opted out, the converter writes
    a client id under the home folder and sends usage statistics without asking, and offline its sender can hang in
    a forked process for ever (after one test run here: 74 orphaned worker processes of 0.3–0.9 GB each; every one
    inspected was stuck in OpenVINO's telemetry sender)."""
    from openvino.tools.ovc import convert_impl, telemetry_stub, telemetry_utils
    for module in (convert_impl, telemetry_utils):
        module.tm = telemetry_stub


def _convert(ov, network: nn.Module, shape: tuple[int, ...]):  # noqa: ANN001, ANN202 (openvino is imported lazily)
    """``network`` converted to OpenVINO for inputs of ``shape``, sending nothing anywhere. It is traced once on the
    smallest input of the same operations (``smallest_same_input``) with free spatial sizes, then fixed to ``shape``: traced
    on a 3 mm TotalSegmentator patch (112×112×128) the conversion took 53 s here, on 32³ 2.3 s, with the same
    compiled network (identical outputs). A network whose graph does not take ``shape`` is traced on ``shape``."""
    _without_telemetry()
    small = smallest_same_input(network, shape)
    free = [*shape[:2], *(-1 for _ in shape[2:])]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks traced as constants: intended
        warnings.filterwarnings("ignore", r"`torch\.jit\.trace", DeprecationWarning)  # OpenVINO's tracer
        if small != shape:
            model = ov.convert_model(network.eval(), example_input=torch.zeros(small), input=[free])
            try:
                model.reshape({model.inputs[0]: list(shape)})
                return model
            except RuntimeError:
                pass  # shape inference refused the patch shape: trace on it instead
        return ov.convert_model(network.eval(), example_input=torch.zeros(shape), input=[shape])
