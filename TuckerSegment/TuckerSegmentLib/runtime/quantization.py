"""INT8 for OpenVINO on the CPU: a converted network quantized after training by NNCF (OpenVINO's own quantizer),
its statistics collected on unlabeled CT patches, its first and last convolutions kept in float (the CT's
Hounsfield range enters through the first, the class logits leave through the last). The CPU plugin then runs
the int8 convolutions on VNNI or AMX; ``precision="int8"`` asks for it."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import TuckerSegmentError
from .hardware import cpu_capabilities

NNCF_MISSING = "INT8 needs NNCF, OpenVINO's quantizer (pip install nncf)"
INT8_FORM = "quantized on the sample CT, first and last convolution in float"  # what every output line says of int8


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


def quantize(model: Any, patches: Sequence[np.ndarray]) -> Any:
    """``model`` (OpenVINO, f32) with its convolutions in int8, statistics from ``patches`` ((1, C, *patch) float32
    arrays, normalised as the network takes them); NNCF's progress bars and log kept off the terminal."""
    if not patches:
        raise TuckerSegmentError("INT8 quantization needs at least one calibration patch")
    import nncf
    logging.getLogger("nncf").setLevel(logging.ERROR)
    ignored = nncf.IgnoredScope(names=kept_in_float(model), validate=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return nncf.quantize(model, nncf.Dataset([np.ascontiguousarray(p, dtype=np.float32) for p in patches]),
                             subset_size=len(patches), target_device=nncf.TargetDevice.CPU, ignored_scope=ignored)
