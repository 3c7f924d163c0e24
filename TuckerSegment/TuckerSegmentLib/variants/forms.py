"""Precision as a measured axis of variants: the same weights run by OpenVINO on the CPU in bf16 or int8.

A build makes and measures, besides f32, each precision this CPU runs natively (``cpu_forms``: bf16 with
AVX-512 BF16 or AMX, int8 with VNNI or AMX and NNCF installed); int8 is quantized once and stored in the variant
folder (``compress.int8_form``). Each form is measured like the variant itself (agreement per structure with the
original in f32, seconds per volume, peak memory, in this runtime on this CPU) and recorded under the
measurement's ``forms``. ``auto`` (``selection``) then weighs every form of every ready variant by the same
rule: the fastest one that qualifies. A CPU without a precision never gets it, whatever was measured elsewhere.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..dependencies import openvino_missing
from ..errors import ModelFolderError
from ..runtime.hardware import DeviceInfo, cpu_capabilities
from ..runtime.quantization import int8_problem
from ..runtime.stored_int8 import FOLDER as INT8_FOLDER
from ..runtime.stored_int8 import RECORD as INT8_RECORD
from .catalogue import Variant

FORMS = ("bf16", "int8")  # the precisions besides f32 a variant can be measured in
CAPABILITY = {"bf16": "BF16", "int8": "INT8"}  # what OpenVINO's CPU plugin must report for each


@dataclass(frozen=True)
class Form:
    """A variant in one precision: "auto" (as the runtime runs it by default: f32 on the CPU) or a measured form."""

    variant: Variant
    precision: str
    measured: dict[str, Any] | None  # the form's figures (None for "auto": the variant's own measurement)


def runs_here(precision: str, device: DeviceInfo) -> str | None:
    """Why ``precision`` cannot run on ``device`` here, or None."""
    if device.kind != "cpu" or openvino_missing():
        return "bf16 and int8 forms run in OpenVINO on the CPU"
    if CAPABILITY[precision] not in (cpu_capabilities() if device.precisions is None else device.precisions):
        return f"this CPU has no native {precision} in OpenVINO"
    return None


def cpu_forms(device: DeviceInfo, asked: Sequence[str] | None = None) -> tuple[str, ...]:
    """The forms a build makes for ``device``: ``asked`` (each refused in one line when it cannot run here), or
    by default every one this CPU runs natively."""
    if asked is None:
        return tuple(p for p in FORMS if runs_here(p, device) is None and (p != "int8" or int8_problem() is None))
    for precision in asked:
        why = runs_here(precision, device) or (int8_problem() if precision == "int8" else None)
        if why:
            raise ModelFolderError(f"cannot build the {precision} form: {why}; leave --precisions out to build "
                                   "what this CPU runs")
    return tuple(p for p in FORMS if p in asked)


def _stored(variant: Variant, precision: str) -> bool:
    """An int8 form runs only where it was stored (built variants, bundled ones): never quantized by ``auto``."""
    return precision != "int8" or all(any(folder.rglob(f"{INT8_FOLDER}/fold_*/{INT8_RECORD}"))
                                      for folder in variant.folders)


def forms_of(variant: Variant, device: DeviceInfo) -> list[Form]:
    """``variant`` as ``auto`` may run it on ``device``: as the runtime runs it, and each measured form that runs
    here."""
    measured = (variant.measured or {}).get("forms") or {}
    return [Form(variant, "auto", None)] + [
        Form(variant, precision, figures) for precision, figures in measured.items()
        if precision in FORMS and isinstance(figures, dict) and runs_here(precision, device) is None
        and _stored(variant, precision)]
