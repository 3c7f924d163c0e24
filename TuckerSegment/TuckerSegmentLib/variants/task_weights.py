"""Is a folder found under a TotalSegmentator data set name really that TotalSegmentator model?

A folder is used as TotalSegmentator's only when its ``dataset.json`` labels are the task's, names and values (a
foreign model's structures would otherwise be written under TotalSegmentator's names), and when its checkpoint's
sha256 is the one known for the release, or, where none is known (the catalogue ships none), the one recorded the
first time these weights were verified on this machine (``<cache>/totalsegmentator/weights.json``; without a usable
cache nothing is recorded, as a ``CacheWarning`` says).
"""
from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

from ..atomic import atomic_output_file
from ..checksums import sha256_file
from ..errors import CacheWarning, CheckpointError, ModelFolderError
from ..nnunet.layout import CHECKPOINT_NAME, fold_dir_name, label_differences, read_json
from ..paths import cache_dir, cache_folder
from .totalsegmentator import TaskModel

SHOWN = 4  # differing labels named in an error
FOLDER = "totalsegmentator"  # in the cache: the record of verified weights


def weights_record(cache: Path | None = None) -> Path:
    """Where the sha256 of each TotalSegmentator checkpoint verified on this machine is recorded."""
    return (cache or cache_dir()) / FOLDER / "weights.json"


def check_task_labels(model: TaskModel, folder: Path) -> None:
    """Refuse ``folder`` unless its dataset.json labels are ``model``'s (names and values, background aside)."""
    labels = read_json(folder / "dataset.json").get("labels")
    theirs = {name: value for name, value in labels.items() if value != 0} if isinstance(labels, dict) else {}
    ours = {name: value for value, name in model.labels.items()}
    if theirs == ours:
        return
    missing, foreign = label_differences(ours, theirs)

    def listed(items: list[str]) -> str:
        return (", ".join(items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN else "")) or "none"
    raise ModelFolderError(f"{folder} is named as TotalSegmentator's {model.dataset} but its dataset.json labels are "
                           f"not that model's: TotalSegmentator's missing or renumbered: {listed(missing)}; not "
                           f"TotalSegmentator's: {listed(foreign)}; it is another model: move it out of the "
                           "TotalSegmentator weights folder (run it with --model FOLDER) and reinstall the weights")


def _recorded(record_file: Path) -> dict[str, Any]:
    """The recorded checksums; an unreadable record is said and started again."""
    if not record_file.is_file():
        return {}
    try:
        data = json.loads(record_file.read_text())
        if isinstance(data, dict) and all(isinstance(v, dict) and isinstance(v.get("sha256"), str)
                                          for v in data.values()):
            return data
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    warnings.warn(CacheWarning(f"{record_file} is not a record of TotalSegmentator checksums; it is started again"),
                  stacklevel=3)
    return {}


def check_task_weights(model: TaskModel, folder: Path, known_sha256: str | None = None,
                       cache: Path | None = None) -> str:
    """The checkpoint's sha256, refused when it differs from ``known_sha256`` (the release's) or, without one, from
    the sha256 recorded when these weights were first verified here (recorded now when this is the first time)."""
    checkpoint = folder / fold_dir_name(model.fold) / CHECKPOINT_NAME
    digest = sha256_file(checkpoint)
    if known_sha256:
        if digest != known_sha256:
            raise CheckpointError(f"{checkpoint} has sha256 {digest[:12]}…, the release's is {known_sha256[:12]}…: the "
                                  "download is corrupt or from another release; delete the folder and download it again")
        return digest
    record_file = weights_record(cache)
    record = _recorded(record_file)
    first = record.get(model.dataset)
    if first is None:
        if cache_folder(FOLDER, cache=cache) is None:
            return digest  # nowhere to record it: checked against nothing, as the first time
        record[model.dataset] = {"sha256": digest, "checkpoint": str(checkpoint),
                                 "recorded": time.strftime("%Y-%m-%d %H:%M:%S")}
        with atomic_output_file(record_file) as staging:
            staging.write_text(json.dumps(record, indent=1))
    elif first["sha256"] != digest:
        raise CheckpointError(f"{checkpoint} has sha256 {digest[:12]}…, not the {first['sha256'][:12]}… recorded when "
                              f"these weights were first verified here ({first.get('recorded')}): the file changed; "
                              "restore TotalSegmentator's weights (download them again), or, if you replaced them on "
                              f"purpose, delete {record_file} to record the new ones")
    return digest


def check_task_model(model: TaskModel, folder: Path, known_sha256: str | None = None,
                     cache: Path | None = None) -> str:
    """``folder`` checked as TotalSegmentator's ``model``: labels, then checkpoint; returns the checkpoint's sha256."""
    check_task_labels(model, folder)
    return check_task_weights(model, folder, known_sha256, cache)
