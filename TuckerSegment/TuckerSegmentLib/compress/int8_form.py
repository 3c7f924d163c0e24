"""A model folder's int8 form, quantized once and stored in the folder (``runtime.stored_int8``): build-variants
makes one for every variant on a CPU with int8 support, ``compress --int8`` for its output.

Activation statistics come from patches of the calibration CTs (the same unlabeled inputs the ranks were
calibrated on, never the scored held-out blocks); label-free accuracy control (``runtime.quantization``) checks
the agreement with the float network on other patches of those CTs, the odd ones, and keeps in float the layers
that cost it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..image.volume import Volume
from ..nnunet.model_folder import ModelFolder
from ..runtime.inference import converted_network
from ..runtime.quantization import quantize
from ..runtime.stored_int8 import form_folder, source_digest, stored_int8, write_int8
from ..segment.predictor import network_source_files
from ..errors import TuckerSegmentError
from .calibration_data import CalibrationVolume, calibration_patches

PATCHES_PER_VOLUME = 8  # statistics and validation patches together, per calibration CT


def _network(model: ModelFolder, fold: str) -> Any:
    return model.load_network(fold) if model.is_compressed_fold(fold) else model.load_original(fold)[0]


def has_int8_form(folder: Path, fold: str) -> bool:
    """Whether ``folder`` holds a valid int8 form of ``fold``'s network as it is now."""
    model = ModelFolder.open(folder)
    try:
        return stored_int8(model.path, fold, source_digest(network_source_files(model, fold), model.patch_size)) \
            is not None
    except TuckerSegmentError:
        return False


def build_int8_form(folder: Path, fold: str, calibration: Sequence[CalibrationVolume | Volume | str | Path],
                    calibrated_on: str) -> dict[str, Any]:
    """Quantize ``fold``'s network in the model ``folder`` to int8 on ``calibration`` (described as
    ``calibrated_on``) and store it there; returns the form's record."""
    import nncf
    import openvino as ov
    model = ModelFolder.open(folder)
    patches = [p.image.numpy() for p in calibration_patches(model, calibration, PATCHES_PER_VOLUME)]
    converted = converted_network(_network(model, fold).eval(), tuple(model.example_input("cpu").shape))
    quantized = quantize(converted, patches[0::2], patches[1::2])
    record = {"source": source_digest(network_source_files(model, fold), model.patch_size),
              "calibration": calibrated_on, "float_layers": quantized.float_layers,
              "agreement": None if quantized.agreement is None else round(quantized.agreement, 5),
              "patches": {"statistics": len(patches[0::2]), "validation": len(patches[1::2])},
              "openvino": ov.__version__, "nncf": nncf.__version__}
    return write_int8(form_folder(model.path, fold), ov, quantized.model, record)
