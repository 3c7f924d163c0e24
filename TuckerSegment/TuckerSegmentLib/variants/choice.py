"""Which model segments: ``--model`` and ``--task`` resolved against the variants catalogue and this machine.

``auto`` picks the task first (on a GPU TotalSegmentator's 1.5 mm ``total``, on a CPU its 3 mm
``fast``, as TotalSegmentator advises; then the others; the bundled demo last), then the variant and
device with ``selection.select_variant``. A catalogue id runs that variant; a folder path runs that
nnU-Net model folder as it is.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import DeviceError, ModelFolderError
from ..paths import BUNDLED_MODELS
from ..runtime.devices import parse_device
from .catalogue import DAMAGED, READY, Variant, catalogue, task_of
from ..runtime.hardware import DeviceInfo, detect_devices
from .selection import Selection, select_variant

BUNDLED_CATALOGUE = BUNDLED_MODELS / "models.json"
TASK_ORDER = {"cuda": ("total", "fast", "fastest", "demo"), "mps": ("fast", "total", "fastest", "demo"),
              "cpu": ("fast", "fastest", "total", "demo")}


@dataclass(frozen=True)
class ModelChoice:
    """What to run (one or more model folders), where, and why."""

    id: str
    folders: tuple[Path, ...]
    device: str  # torch device: "cpu", "cuda:0", "mps"
    reason: str
    label_maps: list[dict[int, tuple[int, str]]] | None = None  # the task's class maps (TotalSegmentator)
    selection: Selection | None = None  # catalogue choices only
    precision: str = "auto"  # the measured precision form auto chose (see ``forms``), or the runtime's own


def bundled_models(record: Path = BUNDLED_CATALOGUE) -> list[dict[str, Any]]:
    """The bundled demo models' build record (id, folder, policy, size, held-out Dice per structure)."""
    if not record.is_file():
        return []
    entries = json.loads(record.read_text())["models"]
    for entry in entries:
        entry["path"] = record.parent / entry["folder"]
    return entries


def usable_devices(device: str, devices: Sequence[DeviceInfo]) -> list[DeviceInfo]:
    """The described devices that ``--device`` allows, preferred first."""
    kind, index = parse_device(device)
    if kind == "auto":
        return list(devices)
    chosen = [d for d in devices if d.kind == kind and (index is None or d.index == index)]
    if not chosen:
        found = ", ".join(d.name for d in devices)
        raise DeviceError(f"device {device} requested but not found (found: {found}); use --device auto or cpu, "
                               "or install a PyTorch build that sees the GPU")
    return chosen


def from_selection(selection: Selection) -> ModelChoice:
    variant = selection.variant
    task = task_of(variant)
    return ModelChoice(variant.id, variant.folders, selection.device.torch_device, selection.reason,
                       task.label_maps() if task is not None else None, selection, selection.precision)


def auto_task(variants: Sequence[Variant], device: DeviceInfo) -> str:
    """The first task, in the order for this kind of device, that has a ready variant."""
    for task in TASK_ORDER[device.kind]:
        if any(v.task == task and v.availability in READY for v in variants):
            return task
    raise ModelFolderError("no model is ready on this machine (not even the bundled demo model): reinstall "
                           "TuckerSegment, or pass --model with an nnU-Net model folder")


def choose_model(model: str | Path | None = "auto", task: str = "auto", device: str = "auto",
                 variants: Sequence[Variant] | None = None, devices: Sequence[DeviceInfo] | None = None) -> ModelChoice:
    """Resolve ``--model`` (auto, a variant id, or a model folder) and ``--task`` (auto or a task name)."""
    model = "auto" if model is None else str(model)
    variants = catalogue() if variants is None else variants
    devices = usable_devices(device, detect_devices() if devices is None else devices)
    ids = {v.id: v for v in variants}
    if model in ids:
        variant = ids[model]
        return from_selection(select_variant(variants, devices, variant.task, preference=model))
    if model != "auto":
        path = Path(model).expanduser()
        if not path.exists():
            raise ModelFolderError(f"--model {model}: no such folder and no variant of that id (variants: "
                                   f"{', '.join(ids)}); pass an nnU-Net model folder, a variant id, or auto")
        return ModelChoice(path.name, (path,), devices[0].torch_device, f"model folder named on the command line, "
                                                                        f"on {devices[0].name}")
    if task == "auto":
        task = auto_task(variants, devices[0])
        selection = select_variant(variants, devices, task)
        first = TASK_ORDER[devices[0].kind][0]
        why = "" if task == first else f" ({first} is not ready here: tuckersegment variants shows how to get it)"
        return from_selection(Selection(selection.variant, selection.device,
                                        selection.reason + why + _damaged(variants, task)))
    selection = select_variant(variants, devices, task)
    return from_selection(replace(selection, reason=selection.reason + _damaged(variants, task)))


def _damaged(variants: Sequence[Variant], task: str) -> str:
    """What ``auto`` passed over because its build here is damaged, said instead of falling back silently."""
    damaged = [v.id for v in variants if v.task == task and v.availability == DAMAGED]
    return (f"; not {', '.join(damaged)}: {'its build is' if len(damaged) == 1 else 'their builds are'} incomplete "
            f"or damaged here (run tuckersegment build-variants --variant {damaged[0]} to rebuild)") if damaged else ""
