"""TotalSegmentator's tasks as data, where its weights live, and its own download when installed.

``Resources/Tasks/totalsegmentator.json`` (from TotalSegmentator 2.18.0, Apache-2.0) describes the
tasks: ``total`` = five 1.5 mm models whose local labels map to the 117 global structure ids,
``fast`` (3 mm) and ``fastest`` (6 mm) = one model with all 117. Weights are looked up where
TotalSegmentator and its Slicer extension keep them; nothing here downloads by itself.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from ..errors import ModelFolderError
from ..nnunet.layout import CHECKPOINT_NAME, fold_dir_name
from ..paths import TASKS_JSON


@dataclass(frozen=True)
class TaskModel:
    """One nnU-Net model of a task and how its label values map to the task's structures."""

    task_id: int
    dataset: str
    trainer: str
    plans: str
    configuration: str
    fold: int
    labels: dict[int, str]  # the model's own label value -> structure name

    @property
    def relative_path(self) -> Path:
        """The trained-model folder below an nnU-Net results folder."""
        return Path(self.dataset) / f"{self.trainer}__{self.plans}__{self.configuration}"


@dataclass(frozen=True)
class Task:
    """A TotalSegmentator task: its models and the structures they segment together."""

    name: str
    description: str
    spacing_mm: float
    release: str
    models: tuple[TaskModel, ...]
    structures: tuple[str, ...]  # global ids 1..117 in order

    def label_maps(self) -> list[dict[int, tuple[int, str]]]:
        """Per model: own label value -> (task value, structure name), as TotalSegmentator merges them."""
        ids = {name: index for index, name in enumerate(self.structures, start=1)}
        return [{value: (ids[name], name) for value, name in m.labels.items()} for m in self.models]


@cache
def tasks() -> dict[str, Task]:
    """The TotalSegmentator tasks by name (``total``, ``fast``, ``fastest``)."""
    data = json.loads(TASKS_JSON.read_text())
    structures = tuple(data["structures"])
    return {name: Task(name, t["description"], float(t["spacing_mm"]), t["release"],
                       tuple(TaskModel(m["task_id"], m["dataset"], m["trainer"], m["plans"], m["configuration"],
                                       int(m["fold"]), {int(k): v for k, v in m["labels"].items()})
                             for m in t["models"]), structures)
            for name, t in data["tasks"].items()}


def weights_dirs() -> list[Path]:
    """nnU-Net results folders that may hold TotalSegmentator weights, in lookup order:
    ``TOTALSEG_WEIGHTS_PATH``, then ``TOTALSEG_HOME_DIR/nnunet/results`` (default ``~/.totalsegmentator``,
    which the TotalSegmentator Slicer extension fills too)."""
    dirs = []
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        dirs.append(Path(os.environ["TOTALSEG_WEIGHTS_PATH"]).expanduser())
    home = Path(os.environ.get("TOTALSEG_HOME_DIR") or Path.home() / ".totalsegmentator").expanduser()
    dirs.append(home / "nnunet" / "results")
    return dirs


def find_model(model: TaskModel, roots: list[Path] | None = None) -> Path | None:
    """The first trained-model folder of ``model`` with plans, dataset.json and its fold's checkpoint."""
    for root in roots if roots is not None else weights_dirs():
        folder = root / model.relative_path
        if all((folder / name).is_file() for name in ("plans.json", "dataset.json")) and \
                (folder / fold_dir_name(model.fold) / CHECKPOINT_NAME).is_file():
            return folder
    return None


def find_task(task: Task, roots: list[Path] | None = None) -> list[Path] | None:
    """The model folders of every model of ``task``, or ``None`` when any is missing."""
    found = [find_model(m, roots) for m in task.models]
    return None if any(f is None for f in found) else found  # type: ignore[return-value]


def totalsegmentator_installed() -> bool:
    """Whether the TotalSegmentator package (whose downloader we call) can be imported."""
    try:
        from totalsegmentator.libs import download_pretrained_weights  # noqa: F401
    except ImportError:
        return False
    return True


def download_task(task: Task) -> list[Path]:
    """Fetch ``task``'s weights with TotalSegmentator's own downloader (its licence terms, its folders)."""
    try:
        from totalsegmentator.libs import download_pretrained_weights
    except ImportError as exc:
        raise ModelFolderError(
            f"TotalSegmentator weights for task {task.name!r} were not found in "
            f"{', '.join(str(d) for d in weights_dirs())} and the TotalSegmentator package is not installed to "
            "download them; install it (pip install TotalSegmentator) or copy the weights folders "
            f"({', '.join(m.dataset for m in task.models)}) there, or set TOTALSEG_WEIGHTS_PATH") from exc
    for model in task.models:
        if find_model(model) is None:
            with contextlib.redirect_stdout(io.StringIO()):
                download_pretrained_weights(model.task_id)
    found = find_task(task)
    if found is None:
        missing = [m.dataset for m in task.models if find_model(m) is None]
        raise ModelFolderError(f"TotalSegmentator's download finished but {', '.join(missing)} is still missing from "
                               f"{weights_dirs()[0]}; check the network connection and free disk space, then retry")
    return found
