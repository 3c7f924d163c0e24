"""INT8 for OpenVINO on the CPU: a converted network quantized after training by NNCF (OpenVINO's own quantizer),
its statistics collected on unlabeled CT patches, its first and last convolutions kept in float (the CT's
Hounsfield range enters through the first, the class logits leave through the last). The CPU plugin then runs
the int8 convolutions on VNNI or AMX; ``precision="int8"`` asks for it.

Accuracy control is label-free: NNCF's ``quantize_with_accuracy_control`` scores each candidate by the argmax
agreement of its labels with the float network's on validation patches (patches apart from the statistics
ones), and puts the layers that cost agreement back into float, most costly first, until the agreement is
within ``MAX_AGREEMENT_DROP`` of the float network's or ``MAX_REVERTED`` layers are back in float (each one
costs a compilation and a validation: at 117 classes an unbounded search ran over 17 minutes here)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import TuckerSegmentError
from .hardware import cpu_capabilities

NNCF_MISSING = "INT8 needs NNCF, OpenVINO's quantizer (pip install nncf)"
INT8_FORM = ("quantized on the sample CT with label-free accuracy control, first and last convolution and any "
             "layer that cost agreement in float")  # what every output line says of an int8 run quantized on use
MAX_AGREEMENT_DROP = 0.01  # int8 labels may agree with the float network's this much less than float itself
MAX_REVERTED = 6  # layers accuracy control may put back into float


@dataclass(frozen=True)
class Quantized:
    """An int8 network, how its labels agree with the float network's on the validation patches, and which of its
    convolutions stayed in float (module names)."""

    model: Any
    agreement: float | None  # None: no validation patches
    float_layers: list[str]


def int8_problem() -> str | None:
    """Why INT8 cannot run here, or None."""
    if importlib.util.find_spec("nncf") is None:
        return NNCF_MISSING
    if "INT8" not in cpu_capabilities():
        return "this CPU has no int8 support in OpenVINO (VNNI or AMX); choose f32"
    return None


def kept_in_float(model: Any) -> list[str]:
    """The names of the first and last convolutions of the OpenVINO ``model``, which stay in float."""
    convolutions = [op.get_friendly_name() for op in model.get_ordered_ops()
                    if op.get_type_name() in ("Convolution", "ConvolutionBackpropData")]
    return list(dict.fromkeys([convolutions[0], convolutions[-1]])) if convolutions else []


def calibration_key(patches: Sequence[np.ndarray]) -> str:
    """What a quantized network depends on besides its source: the calibration patches and NNCF's version."""
    import nncf
    digest = hashlib.sha256(nncf.__version__.encode())
    for patch in patches:
        digest.update(str(patch.shape).encode())
        digest.update(np.ascontiguousarray(patch, dtype=np.float32).tobytes())
    return digest.hexdigest()


def _module_name(friendly: str) -> str:
    """``__module.encoder.stages.0.conv/aten::_convolution/Convolution`` -> ``encoder.stages.0.conv``."""
    return friendly.split("/", 1)[0].removeprefix("__module.")


def float_layers(model: Any) -> list[str]:
    """The convolutions of a quantized OpenVINO ``model`` that run in float (their input is not quantized)."""
    return [_module_name(op.get_friendly_name()) for op in model.get_ordered_ops()
            if op.get_type_name() in ("Convolution", "ConvolutionBackpropData")
            and op.input_value(0).get_node().get_type_name() != "FakeQuantize"]


def _agreement(compiled: Any, patches: Sequence[np.ndarray], references: Sequence[np.ndarray]) -> list[float]:
    return [float((np.asarray(compiled(patch)[0]).argmax(1) == reference).mean())
            for patch, reference in zip(patches, references, strict=True)]


def quantize(model: Any, statistics: Sequence[np.ndarray], validation: Sequence[np.ndarray] = ()) -> Quantized:
    """``model`` (OpenVINO, f32) with its convolutions in int8, activation statistics from ``statistics`` ((1, C,
    *patch) float32 arrays, normalised as the network takes them), under label-free accuracy control on
    ``validation`` (see the module docstring; none: no control); NNCF's progress bars and log kept off the
    terminal."""
    if not statistics:
        raise TuckerSegmentError("INT8 quantization needs at least one calibration patch")
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters
    logging.getLogger("nncf").setLevel(logging.ERROR)
    options = {"subset_size": len(statistics), "target_device": nncf.TargetDevice.CPU,
               "ignored_scope": nncf.IgnoredScope(names=kept_in_float(model), validate=False)}
    data = nncf.Dataset([np.ascontiguousarray(p, dtype=np.float32) for p in statistics])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        if not validation:
            return Quantized(q := nncf.quantize(model, data, **options), None, float_layers(q))
        checked = [np.ascontiguousarray(p, dtype=np.float32) for p in validation]
        reference = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        references = [np.asarray(reference(patch)[0]).argmax(1) for patch in checked]

        def agreement(compiled: Any, items: Any) -> tuple[float, list[float]]:
            indices = list(items)
            each = _agreement(compiled, [checked[i] for i in indices], [references[i] for i in indices])
            return float(np.mean(each)), each
        restorer = AdvancedAccuracyRestorerParameters(max_num_iterations=MAX_REVERTED,
                                                      ranking_subset_size=len(checked), num_ranking_workers=1)
        quantized = nncf.quantize_with_accuracy_control(
            model, data, nncf.Dataset(list(range(len(checked))), checked.__getitem__), agreement, max_drop=MAX_AGREEMENT_DROP,
            advanced_accuracy_restorer_parameters=restorer, **options)
        compiled = ov.Core().compile_model(quantized, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})  # as int8 runs
        score = float(np.mean(_agreement(compiled, checked, references)))
    return Quantized(quantized, score, float_layers(quantized))
