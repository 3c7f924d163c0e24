"""Which torch device runs inference: ``auto`` picks CUDA, then Apple MPS, then the CPU (torch is imported
only when a device is resolved, so the device, runtime and precision names are known before it is installed).
``parse_device`` is the one reader of a device name."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DeviceError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
RUNTIMES = ("auto", "torch", "openvino")
PRECISIONS = ("auto", "f32", "bf16", "fp16", "int8")
EXECUTIONS = ("fastest", "reference")  # for PyTorch: each layer's fastest exact form, or as stored


def parse_device(name: str) -> tuple[str, int | None]:
    """``name`` (auto, cpu, cuda, cuda:N or mps, any case) as its kind and CUDA index, or a one-line refusal."""
    kind, colon, index = str(name).lower().partition(":")
    if not isinstance(name, str) or kind not in DEVICE_CHOICES or (colon and (kind != "cuda" or not index.isdigit())):
        raise DeviceError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")
    return kind, int(index) if colon else None


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``; a requested accelerator that is missing is an error, not a silent CPU run."""
    parse_device(name)
    import torch
    name = name.lower()
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name} requested but PyTorch sees no CUDA GPU (torch {torch.__version__}, "
                                 f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or install a CUDA "
                                 "build of PyTorch that matches the driver")
    if name == "mps" and not mps_ok:
        raise DeviceError("device mps requested but Apple MPS is not available; use --device cpu")
    return torch.device(name)
