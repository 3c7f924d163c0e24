"""What the Segment panel offers: tasks, their variants (Auto first, with its choice and reason), the
structures of a choice, and how a (task, variant) pair maps to the Logic's ``model`` and ``task``.

Keys are plain strings (kept in the parameter node): a task key is ``auto``, a task name
(``total``, ``fast``, ``fastest``, ``demo``) or ``folder:<original model folder>`` for the user's own
models; a variant key is ``auto``, a catalogue variant id, or a model folder path.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import TuckerSegmentError
from ..nnunet.layout import locate_model, read_json
from ..nnunet.plans_check import check_dataset_json
from ..segment.labels import segment_labels
from .catalogue import BUILDABLE, READY, Variant
from .choice import choose_model
from ..runtime.hardware import DeviceInfo
from .totalsegmentator import tasks
from .user_variants import UserVariant

AUTO = "auto"
FOLDER = "folder:"
DEMO_TITLE = "Demo: chest CT (bundled, 3 mm)"
DETECTING = "Auto: detecting devices…"


@dataclass(frozen=True)
class Choice:
    """One combo-box entry: the key stored, the text shown, and a tooltip."""

    key: str
    label: str
    tooltip: str = ""


def model_name(folder: str | Path) -> str:
    """A short name for a model folder: ``Dataset901_ChestDemo (3d_fullres)`` for a trainer folder."""
    path = Path(folder)
    if "__" in path.name:
        return f"{path.parent.name} ({path.name.rsplit('__', 1)[-1]})"
    return path.name


def task_choices(variants: Sequence[Variant], mine: Sequence[UserVariant], folders: Sequence[str] = ()) -> list[Choice]:
    """Auto, each catalogue task (how many variants are ready here), then the originals of the user's
    variants and any other model ``folders`` the user chose."""
    known = tasks()
    choices = [Choice(AUTO, "Auto", "TotalSegmentator total on a GPU, fast on a CPU; the demo model when neither "
                                    "is ready")]
    for name in dict.fromkeys(v.task for v in variants):
        ready = sum(v.task == name and v.availability in READY for v in variants)
        title = f"{name}: {known[name].description}" if name in known else DEMO_TITLE
        choices.append(Choice(name, f"{title} ({ready} ready)" if ready else f"{title} (not installed)",
                              "" if ready else "tuckersegment variants shows how to get it"))
    for source in dict.fromkeys([*(v.source for v in mine), *folders]):
        choices.append(Choice(FOLDER + source, f"{model_name(source)}: my model", source))
    return choices


def variant_choices(task: str, variants: Sequence[Variant], devices: Sequence[DeviceInfo] | None, device: str,
                    mine: Sequence[UserVariant]) -> list[Choice]:
    """``Auto: <what it picks>`` first (its reason as tooltip), then the task's variants; with ``devices`` None (the
    worker has not said yet) ``Auto: detecting devices…``."""
    if task.startswith(FOLDER):
        source = task[len(FOLDER):]
        own = [v for v in mine if v.source == source]
        return [Choice(AUTO, f"Auto: the original ({model_name(source)})",
                       "your models run as chosen: pick a compressed variant to use it"),
                Choice(source, "original", source),
                *(Choice(v.folder, v.label(), v.folder) for v in own)]
    if devices is None:
        auto = Choice(AUTO, DETECTING, "Auto's choice depends on this computer's GPUs and memory, which the worker is "
                                       "detecting")
        return [auto, *(_variant_choice(v) for v in variants if task in (AUTO, v.task))]
    try:
        picked = choose_model(AUTO, task, device, variants, devices)
        auto = Choice(AUTO, f"Auto: {picked.id}", picked.reason)
    except TuckerSegmentError as error:
        auto = Choice(AUTO, "Auto: nothing ready", str(error))
    return [auto, *(_variant_choice(v) for v in variants if task in (AUTO, v.task))]


def _variant_choice(variant: Variant) -> Choice:
    """A catalogue variant's entry: id and availability, and whether its build distilled it."""
    if not variant.distilled:
        return Choice(variant.id, f"{variant.id} ({variant.availability})", variant.detail)
    return Choice(variant.id, f"{variant.id} ({variant.availability}, distilled)",
                  f"{variant.detail}; distilled {variant.distilled} iterations from the original after compression "
                  "(label-free)")


def build_targets(task: str, variant: str, variants: Sequence[Variant]) -> list[str]:
    """The catalogue variants "Build and measure" builds for a panel choice: the chosen compressed variant,
    or with Auto the task's default-policy variants (balanced and fast) whose weights are here."""
    chosen = next((v for v in variants if v.id == variant), None)
    if chosen is not None and not chosen.original and not chosen.bundled:
        return [chosen.id]
    name = task if chosen is None else chosen.task
    defaults = [v for v in variants if (name == AUTO or v.task == name) and not v.bundled and not v.original
                and isinstance(v.policy, dict) and v.policy.get("name") == "budget"
                and v.availability in BUILDABLE]
    if task.startswith(FOLDER) or task == "demo" or not defaults:
        raise TuckerSegmentError("choose a TotalSegmentator task whose weights are installed (or a compressed variant "
                                 "of it): the bundled demo and your own models are not built here")
    return [v.id for v in defaults]


def model_and_task(task: str, variant: str) -> tuple[str, str]:
    """The Logic's (``model``, ``task``) for a panel choice."""
    if task.startswith(FOLDER):
        return (task[len(FOLDER):] if variant == AUTO else variant), AUTO
    return variant, task


def structure_names(task: str, variant: str, device: str, devices: Sequence[DeviceInfo]) -> list[str]:
    """The structures a panel choice segments on ``devices``, in label order (only JSON files are read): a
    TotalSegmentator task's from the task, installed or not; other models' from their dataset.json."""
    model, task = model_and_task(task, variant)
    known = tasks()
    if task in known:
        return list(known[task].structures)
    choice = choose_model(model, task, device, devices=devices)
    if choice.label_maps is not None:
        values = {value: name for mapping in choice.label_maps for value, name in mapping.values()}
        return [values[v] for v in sorted(values)]
    names: list[str] = []
    for folder in choice.folders:
        path = locate_model(Path(folder))
        dataset_json = read_json(path / "dataset.json")
        check_dataset_json(dataset_json)
        names += [s.name for s in segment_labels(dataset_json, path)]
    return names
