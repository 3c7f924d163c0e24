"""What this machine can run on: CUDA GPUs (name, memory, compute capability), Apple MPS, the CPU.

Without PyTorch (a fresh Slicer) only the CPU is known; GPUs are found once PyTorch is installed."""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path

GB = 1024 ** 3  # memory is reported in GiB
NO_TORCH_NOTE = "GPU unknown until PyTorch is installed"


@dataclass(frozen=True)
class DeviceInfo:
    """A device as selection sees it; tests describe simulated ones the same way."""

    kind: str  # "cuda", "mps" or "cpu"
    name: str
    total_bytes: int
    free_bytes: int
    capability: tuple[int, int] | None = None
    cores: int | None = None
    index: int = 0
    note: str = ""  # what is not known yet (e.g. GPUs before PyTorch is installed)

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind

    def describe(self) -> str:
        extra = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
        extra += f", {self.cores} cores" if self.cores else ""
        extra += f"; {self.note}" if self.note else ""
        return f"{self.name} ({self.free_bytes / GB:.1f} GiB free of {self.total_bytes / GB:.1f} GiB{extra})"


def _linux_meminfo() -> tuple[int, int] | None:
    try:
        text = Path("/proc/meminfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def _windows_memory() -> tuple[int, int] | None:
    class MemoryStatus(ctypes.Structure):
        _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                    ("available", ctypes.c_ulonglong), ("page_total", ctypes.c_ulonglong),
                    ("page_available", ctypes.c_ulonglong), ("virtual_total", ctypes.c_ulonglong),
                    ("virtual_available", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]
    status = MemoryStatus()
    status.length = ctypes.sizeof(MemoryStatus)
    if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
        return None
    return int(status.total), int(status.available)


def system_memory() -> tuple[int, int]:
    """Total and available RAM in bytes (available: what can be allocated without swapping)."""
    found = _windows_memory() if sys.platform == "win32" else _linux_meminfo()
    if found is not None:
        return found
    pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * size
    except (ValueError, OSError):
        free = pages * size // 2  # macOS has no such counter: assume half is usable
    return pages * size, free


def cpu_device() -> DeviceInfo:
    total, free = system_memory()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return DeviceInfo("cpu", "CPU", total, free, cores=cores)


def detect_devices() -> list[DeviceInfo]:
    """Every usable device, preferred first: CUDA GPUs (most free memory first), MPS, then the CPU."""
    try:
        import torch
    except ImportError:
        return [replace(cpu_device(), note=NO_TORCH_NOTE)]
    devices = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(DeviceInfo("cuda", torch.cuda.get_device_name(index), total, free,
                                      torch.cuda.get_device_capability(index), index=index))
        devices.sort(key=lambda d: -d.free_bytes)
    mps = getattr(torch.backends, "mps", None)
    cpu = cpu_device()
    if mps is not None and mps.is_available():
        # unified memory: the GPU shares the system RAM
        devices.append(DeviceInfo("mps", "Apple GPU (MPS)", cpu.total_bytes, cpu.free_bytes))
    devices.append(cpu)
    return devices
