"""Which variant runs where: a pure function of (catalogue, devices, task, user preference).

Rule: among the task's ready variants, the original and the compressed ones whose measurement
passes (``agreement.verdict``: mean agreement with the original >= 0.97 and every structure with
>= 1000 voxels >= 0.90; for the bundled demo, whose measurement has reference labels, the ground
truth decides instead, ``agreement.ground_truth_verdict``: held-out Dice loss within the limit,
default 1 point, and no structure with >= 1000 voxels losing more than 10 points), those whose peak
memory fits the device's free memory with a margin; of those, the fastest expected on this device (the measured speed-up, else the
catalogue's relative time for the device class; with neither a variant counts as fast as the
original, so ties go to the original). Each variant is weighed in every precision form measured for it that
runs here (``forms``: bf16, int8 on a CPU with them), each form by its own figures and the same rule.
A published figure alone (the paper's uniform variants) or a
measurement taken with another runtime, device or engine version (``measured.changed``) never
qualifies a compressed variant. Devices are tried in order (GPUs first, the CPU last), so a model too
big for the GPU runs on the CPU, and the reason says so.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..dependencies import openvino_missing
from ..errors import ModelFolderError
from .agreement import ground_truth_verdict, verdict
from .catalogue import READY, Variant
from .forms import Form, forms_of
from ..runtime.hardware import GB, DeviceInfo
from .measured import changed

DICE_LIMIT = 0.01
MEMORY_MARGIN = 0.15  # keep this fraction of the free memory unused


@dataclass(frozen=True)
class Selection:
    """A variant, the device to run it on, and why."""

    variant: Variant
    device: DeviceInfo
    reason: str
    precision: str = "auto"  # a measured form ("bf16", "int8") that auto chose, or the runtime's own


def device_class(device: DeviceInfo, classes: Sequence[str]) -> str | None:
    """The catalogue speed class of ``device``: "cpu", "mps", or the GPU class named in its name (e.g. "RTX 3090")."""
    if device.kind != "cuda":
        return device.kind
    name = device.name.lower().replace("-", " ")
    return next((c for c in classes if c not in ("cpu", "mps") and c.lower() in name), None)


def measurement(variant: Variant, device: DeviceInfo) -> tuple[dict[str, Any] | None, str]:
    """The variant's measurement against its original that holds on ``device``, or None and why not."""
    found = variant.measured
    if found is None:
        how = "only a published figure" if variant.quality.get("kind") == "published" else "unmeasured"
        if variant.availability == "built":
            how += f"; run: tuckersegment build-variants --variant {variant.id}"
        return None, f"not measured on this machine ({how})"
    change = None if variant.bundled else changed(found, device)
    if change is not None:
        return None, (f"measured with another setup ({change}): run tuckersegment build-variants --variant "
                      f"{variant.id} to measure it again")
    return found, ""


def qualifies(variant: Variant, device: DeviceInfo, dice_limit: float = DICE_LIMIT) -> tuple[bool, str]:
    """Whether ``auto`` may choose ``variant`` on ``device`` for its quality, and the figures or why not."""
    if variant.original:
        return True, ""
    found, why = measurement(variant, device)
    if found is None:
        return False, why
    reference = variant.quality.get("structures") if variant.quality.get("kind") == "measured" else None
    if reference:  # ground truth decides where it exists; the agreement is shown beside it
        ok, truth = ground_truth_verdict(reference, dice_limit)
        return ok, f"{truth}; agreement with the original {found['mean_agreement']:.3f}; on {found['how']}"
    agrees, text = verdict(found["structures"])
    return agrees, f"{text} on {found['how']}"


def form_qualifies(form: Form, device: DeviceInfo, dice_limit: float = DICE_LIMIT) -> tuple[bool, str]:
    """``qualifies`` for one precision form: its own figures decide, the same rule as for variants (the
    variant's measurement must hold here too)."""
    if form.measured is None:
        return qualifies(form.variant, device, dice_limit)
    if form.variant.measured is None or measurement(form.variant, device)[0] is None:
        return False, f"{form.precision} form: " + measurement(form.variant, device)[1]
    reference = (form.measured.get("quality") or {}).get("structures")
    if reference:
        ok, truth = ground_truth_verdict(reference, dice_limit)
        return ok, f"{form.precision} form: {truth}; agreement with the original {form.measured['mean_agreement']:.3f}"
    agrees, text = verdict(form.measured["structures"])
    return agrees, f"{form.precision} form: {text} on {form.variant.measured['how']}"


def form_time(form: Form, device: DeviceInfo) -> tuple[float | None, str | None]:
    """``expected_time`` of one precision form."""
    if form.measured is None:
        return expected_time(form.variant, device)
    where = f"on {form.variant.measured['context']['device']}" if form.variant.bundled else "here"
    return 1 / float(form.measured["speedup"]), f"measured {where} in {form.measured['runtime']}"


def expected_time(variant: Variant, device: DeviceInfo) -> tuple[float | None, str | None]:
    """Time relative to the original on ``device``, and where the figure comes from: the variant's
    measurement when it holds here, else the catalogue's time for the device class (None: unknown, also
    for a time measured in OpenVINO where OpenVINO is missing: PyTorch would run it, and a factorisation
    that pays in one runtime can cost in another)."""
    if variant.original:
        return 1.0, None
    found, _ = measurement(variant, device)
    if found is not None and found.get("speedup") and found.get("device_kind") == device.kind:
        context = found["context"]
        if not (str(context["runtime"]).startswith("OpenVINO") and openvino_missing()):
            where = f"on {context['device']}" if variant.bundled else "here"
            return 1 / float(found["speedup"]), f"measured {where} in {context['runtime']}"
    cls = device_class(device, list(variant.speed))
    entry = variant.speed.get(cls) if cls else None
    if entry and cls == "cpu" and str(entry.get("runtime", "")).startswith("OpenVINO") and openvino_missing():
        return None, None
    return (float(entry["relative_time"]), entry.get("source")) if entry else (None, None)


def fits(variant: Variant, device: DeviceInfo, voxels: int | None = None) -> tuple[bool, int | None, str]:
    """Whether ``variant`` fits ``device``'s free memory with the margin; its need and how it is known."""
    need, how = variant.memory_bytes(device.kind, voxels)
    return need is not None and need <= device.free_bytes * (1 - MEMORY_MARGIN), need, how


def _speed_text(form: Form, device: DeviceInfo) -> str:
    time, source = form_time(form, device)
    where = "on this CPU class" if device.kind == "cpu" else f"on this class of {device.kind.upper()} device"
    if form.variant.original and form.measured is None:
        return "the original (no ready variant whose measurement passes is expected to run faster here)"
    if time is None:
        return f"no timing {where}; chosen for memory"
    pace = f"{1 / time:.2f}x faster than the original" if time < 1 else f"{time:.2f}x the original's time"
    return f"{pace} ({source})" if source and source.startswith("measured") else f"{pace} {where} ({source})"


def _quality_text(form: Form, device: DeviceInfo, dice_limit: float) -> str:
    if form.variant.original and form.measured is None:
        return ""
    ok, text = form_qualifies(form, device, dice_limit)
    return f"; {text}" if ok else f"; quality NOT within auto's limits: {text}"


def _fastest_form(variant: Variant, device: DeviceInfo, dice_limit: float) -> Form:
    """The fastest form of ``variant`` on ``device`` that qualifies (the runtime's own when none does)."""
    good = [f for f in forms_of(variant, device)[1:] if form_qualifies(f, device, dice_limit)[0]]
    auto = Form(variant, "auto", None)
    return min([auto, *good], key=lambda f: (form_time(f, device)[0] or 1.0, f.precision != "auto"))


def _name(form: Form) -> str:
    return form.variant.id + ("" if form.precision == "auto" else f" in {form.precision}")


def _chosen(form: Form, device: DeviceInfo, reason: str) -> Selection:
    return Selection(form.variant, device, reason, form.precision)


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
        form = _fastest_form(chosen, device, dice_limit)
        return _chosen(form, device, f"{task} / {_name(form)}: chosen by the user, on {device.name}"
                                     f"{_quality_text(form, device, dice_limit)}{memory}")
    ready = [v for v in mine if v.availability in READY]
    if not ready:
        hints = "; ".join(f"{v.id}: {v.availability} ({v.detail})" for v in mine)
        raise ModelFolderError(f"no model of task {task!r} is ready on this machine: {hints}")
    notes, skipped = [], set()
    for device in devices:
        good = [f for v in ready for f in forms_of(v, device) if form_qualifies(f, device, dice_limit)[0]]
        skipped |= {v.id for v in ready if all(f.variant is not v for f in good)}
        checked = [(form, *fits(form.variant, device, voxels)) for form in good]
        candidates = [(form_time(form, device)[0] or 1.0, not form.variant.original, form.precision != "auto", form,
                       need, how) for form, ok, need, how in checked if ok]
        if not candidates:
            needs = [need for _, _, need, _ in checked if need is not None]
            smallest = f"the smallest needs {min(needs) / GB:.1f} GiB" if needs else "no memory figure"
            notes.append(f"{device.name}: nothing fits in {device.free_bytes / GB:.1f} GiB free with a "
                         f"{MEMORY_MARGIN:.0%} margin ({smallest})")
            continue
        *_, best, need, how = min(candidates, key=lambda c: c[:3])  # fastest, then the original, then f32
        note = f" [{'; '.join(notes)}]" if notes else ""
        need_text = f"needs {need / GB:.1f} GiB ({how})"
        return _chosen(best, device, f"{task} / {_name(best)}: {device.name}, {device.free_bytes / GB:.1f} GiB free, "
                                     f"{need_text}; {_speed_text(best, device)}"
                                     f"{_quality_text(best, device, dice_limit)}{note}")
    raise ModelFolderError(f"no ready {task} model fits in free memory: {'; '.join(notes)}"
                           + (f" (not considered for quality: {', '.join(sorted(skipped))})" if skipped else "")
                           + "; close other programs, choose a lighter task (fastest) or a structure subset")


def fallback_chain(selection: Selection, variants: Sequence[Variant], devices: Sequence[DeviceInfo],
                   dice_limit: float = DICE_LIMIT) -> list[Selection]:
    """What to try when ``selection`` runs out of GPU memory: smaller ready variants of the task on the same
    GPU (those whose measurement qualifies, next smaller first), then the best choice on the CPU."""
    chain = [selection]
    device = selection.device
    if device.kind == "cpu":
        return chain
    current = selection.variant.memory_bytes(device.kind)[0]
    smaller = [v for v in variants if v.task == selection.variant.task and v.availability in READY
               and qualifies(v, device, dice_limit)[0] and (m := v.memory_bytes(device.kind)[0]) is not None
               and current is not None and m < current]
    for variant in sorted(smaller, key=lambda v: (-v.memory_bytes(device.kind)[0], not v.original)):
        if chain[-1].variant.memory_bytes(device.kind)[0] == variant.memory_bytes(device.kind)[0]:
            continue  # no smaller than the one before: it would run out of memory too
        chain.append(Selection(variant, device, f"{variant.task} / {variant.id}: next smaller variant on {device.name} "
                                                f"after running out of GPU memory"
                                                f"{_quality_text(Form(variant, 'auto', None), device, dice_limit)}"))
    cpus = [d for d in devices if d.kind == "cpu"]
    try:
        cpu = select_variant(variants, cpus, selection.variant.task, dice_limit=dice_limit) if cpus else None
    except ModelFolderError:
        cpu = None  # nothing fits the RAM either: the chain ends with the GPU variants
    if cpu is not None:
        chain.append(Selection(cpu.variant, cpu.device, f"on the CPU after running out of GPU memory: {cpu.reason}"))
    return chain
