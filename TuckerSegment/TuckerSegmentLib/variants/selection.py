"""Which variant runs where: a pure function of (catalogue, devices, task, user preference).

Rule: among the task's ready variants whose quality loss (published or measured) is within the
limit (default 1 Dice point; an unmeasured variant is never chosen automatically), those whose peak
memory fits the device's free memory with a margin; of those, the fastest expected on this device
class (relative times from the catalogue; with no timing for the class a variant counts as fast as
the original, so ties go to the better quality). Devices are tried in order (GPUs first, the CPU
last), so a model too big for the GPU runs on the CPU, and the reason says so.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..dependencies import openvino_missing
from ..errors import ModelFolderError
from .catalogue import READY, Variant
from .hardware import GB, DeviceInfo

DICE_LIMIT = 0.01
MEMORY_MARGIN = 0.15  # keep this fraction of the free memory unused


@dataclass(frozen=True)
class Selection:
    """A variant, the device to run it on, and why."""

    variant: Variant
    device: DeviceInfo
    reason: str


def device_class(device: DeviceInfo, classes: Sequence[str]) -> str | None:
    """The catalogue speed class of ``device``: "cpu", "mps", or the GPU class named in its name (e.g. "RTX 3090")."""
    if device.kind != "cuda":
        return device.kind
    name = device.name.lower().replace("-", " ")
    return next((c for c in classes if c not in ("cpu", "mps") and c.lower() in name), None)


def expected_time(variant: Variant, device: DeviceInfo) -> tuple[float | None, str | None]:
    """Time relative to the original on ``device``'s class, and where the figure comes from (None: unknown,
    also for a CPU time measured in OpenVINO where OpenVINO is missing: PyTorch would run it, and a
    factorisation that pays in one runtime can cost in another)."""
    if variant.original:
        return 1.0, None
    cls = device_class(device, list(variant.speed))
    entry = variant.speed.get(cls) if cls else None
    if entry and cls == "cpu" and str(entry.get("runtime", "")).startswith("OpenVINO") and openvino_missing():
        return None, None
    return (float(entry["relative_time"]), entry.get("source")) if entry else (None, None)


def fits(variant: Variant, device: DeviceInfo, voxels: int | None = None) -> tuple[bool, int | None, str]:
    """Whether ``variant`` fits ``device``'s free memory with the margin; its need and how it is known."""
    need, how = variant.memory_bytes(device.kind, voxels)
    return need is not None and need <= device.free_bytes * (1 - MEMORY_MARGIN), need, how


def _speed_text(variant: Variant, device: DeviceInfo) -> str:
    time, source = expected_time(variant, device)
    where = "on this CPU class" if device.kind == "cpu" else f"on this class of {device.kind.upper()} device"
    if variant.original:
        return "the original (no ready variant within the quality limit is expected to run faster here)"
    if time is None:
        return f"no timing {where}; chosen for memory"
    pace = f"{1 / time:.2f}x faster than the original" if time < 1 else f"{time:.2f}x the original's time"
    return f"{pace} {where} ({source})"


def _quality_text(variant: Variant, dice_limit: float) -> str:
    loss = variant.dice_loss()
    if variant.original:
        return ""
    if loss is None:
        return "; quality UNMEASURED"
    kind = variant.quality.get("kind", "measured")
    note = f"; {kind} Dice loss {100 * loss:.1f} points"
    return note + (f" (over the {100 * dice_limit:.0f}-point limit)" if loss > dice_limit + 1e-9 else "")


def select_variant(variants: Sequence[Variant], devices: Sequence[DeviceInfo], task: str,
                   preference: str | None = None, dice_limit: float = DICE_LIMIT,
                   voxels: int | None = None) -> Selection:
    """The variant of ``task`` to run and the device, with a human-readable reason (see the module docstring).
    ``preference``: a variant id the user asked for (always honoured when ready, with its caveats in the
    reason). ``voxels``: the volume at the model spacing (default: the catalogue's standard volume)."""
    if not devices:
        raise ModelFolderError("no device to run on was described")
    mine = [v for v in variants if v.task == task]
    if not mine:
        raise ModelFolderError(f"no variant for task {task!r}; tasks: {', '.join(sorted({v.task for v in variants}))}")
    if preference is not None:
        chosen = next((v for v in mine if v.id == preference), None)
        if chosen is None:
            raise ModelFolderError(f"task {task!r} has no variant {preference!r}; its variants: "
                                   f"{', '.join(v.id for v in mine)}")
        if chosen.availability not in READY:
            raise ModelFolderError(f"variant {chosen.id} is {chosen.availability} here: {chosen.detail}")
        device = devices[0]
        ok, need, how = fits(chosen, device, voxels)
        memory = "" if ok or need is None else f"; WARNING: needs {need / GB:.1f} GiB, {device.free_bytes / GB:.1f} GiB free"
        return Selection(chosen, device, f"{task} / {chosen.id}: chosen by the user, on {device.name}"
                                         f"{_quality_text(chosen, dice_limit)}{memory}")
    ready = [v for v in mine if v.availability in READY]
    if not ready:
        hints = "; ".join(f"{v.id}: {v.availability} ({v.detail})" for v in mine)
        raise ModelFolderError(f"no model of task {task!r} is ready on this machine: {hints}")
    good = [v for v in ready if (loss := v.dice_loss()) is not None and loss <= dice_limit + 1e-9]
    notes = []
    for device in devices:
        checked = [(variant, *fits(variant, device, voxels)) for variant in good]
        candidates = [(expected_time(variant, device)[0] or 1.0, variant.dice_loss(), not variant.original,
                       variant, need, how) for variant, ok, need, how in checked if ok]
        if not candidates:
            needs = [need for _, _, need, _ in checked if need is not None]
            smallest = f"the smallest needs {min(needs) / GB:.1f} GiB" if needs else "no memory figure"
            notes.append(f"{device.name}: nothing fits in {device.free_bytes / GB:.1f} GiB free with a "
                         f"{MEMORY_MARGIN:.0%} margin ({smallest})")
            continue
        *_, best, need, how = min(candidates, key=lambda c: c[:3])  # fastest, then best Dice, then the original
        note = f" [{'; '.join(notes)}]" if notes else ""
        need_text = f"needs {need / GB:.1f} GiB ({how})"
        return Selection(best, device, f"{task} / {best.id}: {device.name}, {device.free_bytes / GB:.1f} GiB free, "
                                       f"{need_text}; {_speed_text(best, device)}"
                                       f"{_quality_text(best, dice_limit)}{note}")
    skipped = [v.id for v in ready if v not in good]
    raise ModelFolderError(f"no ready {task} model fits in free memory: {'; '.join(notes)}"
                           + (f" (not considered for quality: {', '.join(skipped)})" if skipped else "")
                           + "; close other programs, choose a lighter task (fastest) or a structure subset")


def fallback_chain(selection: Selection, variants: Sequence[Variant], devices: Sequence[DeviceInfo],
                   dice_limit: float = DICE_LIMIT) -> list[Selection]:
    """What to try when ``selection`` runs out of GPU memory: smaller ready variants of the task on the same
    GPU (measured quality only, next smaller first), then the best choice on the CPU."""
    chain = [selection]
    device = selection.device
    if device.kind == "cpu":
        return chain
    current = selection.variant.memory_bytes(device.kind)[0]
    smaller = [v for v in variants if v.task == selection.variant.task and v.availability in READY
               and v.dice_loss() is not None and (m := v.memory_bytes(device.kind)[0]) is not None
               and current is not None and m < current]
    for variant in sorted(smaller, key=lambda v: -v.memory_bytes(device.kind)[0]):
        chain.append(Selection(variant, device, f"{variant.task} / {variant.id}: next smaller variant on {device.name} "
                                                f"after running out of GPU memory{_quality_text(variant, dice_limit)}"))
    cpus = [d for d in devices if d.kind == "cpu"]
    try:
        cpu = select_variant(variants, cpus, selection.variant.task, dice_limit=dice_limit) if cpus else None
    except ModelFolderError:
        cpu = None  # nothing fits the RAM either: the chain ends with the GPU variants
    if cpu is not None:
        chain.append(Selection(cpu.variant, cpu.device, f"on the CPU after running out of GPU memory: {cpu.reason}"))
    return chain
