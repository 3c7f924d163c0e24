"""What a variant measurement depends on, so that a changed machine, runtime or engine retires it.

A build measures each variant on this machine (``measure.py``) and records, with the figures, the
context it measured in: the runtime ``auto`` runs there (OpenVINO and its version on a CPU, PyTorch
and its version elsewhere), the device (CPU model or GPU name) and this engine's version. When any of
them differs now, the figures no longer describe what would run: ``auto`` ignores the variant until
``tuckersegment build-variants`` measures it again. Importable without PyTorch.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from .. import __version__
from ..dependencies import openvino_missing
from ..runtime.hardware import DeviceInfo

CONTEXT_KEYS = ("runtime", "device", "engine")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution).split("+")[0]
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what the platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def measurement_context(device: DeviceInfo) -> dict[str, str]:
    """The runtime ``auto`` runs on ``device`` here, the device itself, and this engine's version."""
    if device.kind == "cpu":
        runtime = (f"PyTorch {_version('torch')} f32" if openvino_missing()
                   else f"OpenVINO {_version('openvino')} f32")
        name = f"{cpu_model()} ({device.cores or os.cpu_count()} cores)"
    else:
        runtime, name = f"PyTorch {_version('torch')} {'fp16 autocast' if device.kind == 'cuda' else 'f32'}", device.name
    return {"runtime": runtime, "device": name, "engine": __version__}


def changed(measurement: dict[str, Any], device: DeviceInfo) -> str | None:
    """What differs between the context ``measurement`` was taken in and ``device`` now, or None."""
    now = measurement_context(device)
    was = measurement.get("context") or {}
    differences = [f"{key} {was.get(key, 'unknown')} -> {now[key]}" for key in CONTEXT_KEYS if was.get(key) != now[key]]
    return "; ".join(differences) or None
