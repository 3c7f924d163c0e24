"""What this machine can run on: CUDA GPUs (name, memory, compute capability), Apple MPS, the CPU, and
what OpenVINO offers on the CPU.

Without PyTorch (a fresh Slicer) only the CPU is known; GPUs are found once PyTorch is installed. Slicer's
GUI process never detects (that imports torch and opens a CUDA context): the worker does
(``detect_machine``) and sends the facts as JSON (``MachineFacts.to_json``/``from_json``)."""
from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import TuckerSegmentError

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
    # a CPU's native precisions in OpenVINO as the worker reported them; None: not reported, look them up here
    precisions: tuple[str, ...] | None = None

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


def cpu_capabilities() -> tuple[str, ...]:
    """What OpenVINO's CPU plugin can run natively here (``FP32``, ``BF16``, ``INT8``, ...); empty without
    OpenVINO."""
    try:
        import openvino as ov
    except ImportError:
        return ()
    return tuple(str(c) for c in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


@dataclass(frozen=True)
class MachineFacts:
    """What the worker found: the devices (preferred first), OpenVINO's version and its CPU capabilities."""

    devices: tuple[DeviceInfo, ...]
    openvino: str | None = None  # the installed version; None when OpenVINO is missing
    cpu_capabilities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """The CPU device carries the capabilities, so that selection never looks them up (imports OpenVINO) in
        the process that asked the worker."""
        object.__setattr__(self, "devices", tuple(replace(d, precisions=self.cpu_capabilities) if d.kind == "cpu"
                                                  else d for d in self.devices))

    def cpu_runtime(self) -> str:
        """What runs the network on the CPU, and the precisions its kernels run natively."""
        return (f"OpenVINO {self.openvino} on the CPU ({', '.join(self.cpu_capabilities) or 'capabilities unknown'})"
                if self.openvino else "OpenVINO not installed: PyTorch runs the network on the CPU")

    def describe(self) -> str:
        """One line per device, then the CPU runtime."""
        return "\n".join([*(d.describe() for d in self.devices), self.cpu_runtime()])

    def to_json(self) -> dict[str, Any]:
        return {"devices": [{**{k: v for k, v in d.__dict__.items() if k != "precisions"},  # the CPU's: derived
                             "capability": list(d.capability) if d.capability else None} for d in self.devices],
                "openvino": self.openvino, "cpu_capabilities": list(self.cpu_capabilities)}

    @classmethod
    def from_json(cls, data: Any) -> MachineFacts:
        """Facts from the worker's answer, every field checked (a damaged answer is refused, not half read)."""
        try:
            devices = tuple(_device_from_json(item) for item in data["devices"])
            openvino, capabilities = data["openvino"], data["cpu_capabilities"]
        except (KeyError, TypeError, ValueError) as error:
            raise TuckerSegmentError(f"the worker's device facts are damaged ({error}); restart Slicer") from error
        if not devices or devices[-1].kind != "cpu" or not (openvino is None or isinstance(openvino, str)) \
                or not isinstance(capabilities, list) or not all(isinstance(c, str) for c in capabilities):
            raise TuckerSegmentError("the worker's device facts are damaged (no CPU, or a field of the wrong type); "
                                     "restart Slicer")
        return cls(devices, openvino, tuple(capabilities))


def _device_from_json(item: dict[str, Any]) -> DeviceInfo:
    kind, name, note = item["kind"], item["name"], item["note"]
    total, free, index, cores = item["total_bytes"], item["free_bytes"], item["index"], item["cores"]
    capability = item["capability"]
    numbers = [total, free, index] + ([cores] if cores is not None else []) + list(capability or [])
    if kind not in ("cuda", "mps", "cpu") or not isinstance(name, str) or not isinstance(note, str) \
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers) \
            or (capability is not None and len(capability) != 2):
        raise ValueError(f"not a device: {item!r:.200}")
    return DeviceInfo(kind, name, total, free, tuple(capability) if capability else None, cores, index, note)


def detect_machine() -> MachineFacts:
    """Detect everything (imports torch and OpenVINO: the worker's job, never Slicer's GUI process)."""
    from ..dependencies import installed_version
    version = installed_version("openvino")
    return MachineFacts(tuple(detect_devices()), version, cpu_capabilities() if version else ())


def undetected_devices() -> list[DeviceInfo]:
    """What is known before the worker has answered: the CPU (its memory and cores read without torch)."""
    return [replace(cpu_device(), note="other devices not detected yet", precisions=())]
