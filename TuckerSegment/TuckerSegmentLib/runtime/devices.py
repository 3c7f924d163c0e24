"""Which torch device runs inference: ``auto`` picks CUDA, then Apple MPS, then the CPU (torch is imported
only when a device is resolved, so the device names are known before it is installed)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TuckerSegmentError

if TYPE_CHECKING:
    import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name``; a requested accelerator that is missing is an error, not a silent CPU run."""
    import torch
    name = name.lower()
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise TuckerSegmentError(f"unknown device {name!r}; choose one of {', '.join(DEVICE_CHOICES)} (or cuda:N)")
    mps = getattr(torch.backends, "mps", None)
    mps_ok = bool(mps and mps.is_available())
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TuckerSegmentError(f"device {name} requested but PyTorch sees no CUDA GPU (torch {torch.__version__}, "
                                 f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu or install a CUDA "
                                 "build of PyTorch that matches the driver")
    if name == "mps" and not mps_ok:
        raise TuckerSegmentError("device mps requested but Apple MPS is not available; use --device cpu")
    return torch.device(name)
