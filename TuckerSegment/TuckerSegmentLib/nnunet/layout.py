"""The file layout of an nnU-Net v2 trained model folder, read without torch or nnU-Net.

An original folder holds ``plans.json``, ``dataset.json`` and ``fold_N/checkpoint_final.pth``; a
compressed one holds the same two JSON files and ``fold_N/tucker.json`` + ``weights.safetensors``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ModelFolderError
from ..paths import checked_path

TUCKER_JSON = "tucker.json"
WEIGHTS_FILE = "weights.safetensors"
TERMINOLOGY_CSV = "terminology.csv"  # a model's own structure names, colours and SNOMED CT codes
CHECKPOINT_NAME = "checkpoint_final.pth"
LAYOUT_HINT = ("an nnU-Net v2 trained model folder (Trainer__Plans__Configuration) holds plans.json, dataset.json "
               f"and fold_N/{CHECKPOINT_NAME}")

Fold = int | str  # a fold number, or "all"
DATASET_FOLDER = re.compile(r"Dataset\d{3,}_.+")  # nnU-Net's data set folders: Dataset123_Name


def read_json(path: Path, error: type[Exception] = ModelFolderError,
              fix: str = "restore it from the trained model") -> dict[str, Any]:
    """A JSON object from ``path``; ``error`` (saying ``fix``) when unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise error(f"{path} is not readable JSON ({exc}); {fix}") from exc
    if not isinstance(data, dict):
        raise error(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data


def locate_model(path: Path) -> Path:
    """The folder holding plans.json: ``path`` itself, its only trainer subfolder, or the only trainer
    folder of its only dataset (an nnU-Net results folder holding one model)."""
    path = checked_path(path, ModelFolderError, "model folder")
    if not path.exists():
        raise ModelFolderError(f"model folder {path} does not exist; {LAYOUT_HINT}")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is a file, not a model folder; {LAYOUT_HINT}")
    if (path / "plans.json").is_file():
        return path
    candidates = sorted(p.parent for p in path.glob("*/plans.json")) or sorted(p.parent for p in path.glob("*/*/plans.json"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        names = ", ".join(p.name for p in candidates)
        raise ModelFolderError(f"{path} holds several trained models ({names}); pass one of them")
    raise ModelFolderError(f"{path} is not an nnU-Net v2 trained model folder: no plans.json; {LAYOUT_HINT}")


def model_inputs(role: str, given: str | Path) -> list[tuple[str, Path]]:
    """A model folder as inputs an output must stay clear of: the path given, the folder holding plans.json and,
    for a ``Trainer__Plans__Configuration`` folder in an nnU-Net data set folder (``DatasetNNN_Name``), that data
    set folder (another model written there would make it hold several)."""
    folder = locate_model(Path(given))
    inputs = [(role, Path(given)), (role, folder)]
    if folder.name.count("__") == 2 and DATASET_FOLDER.fullmatch(folder.parent.name):
        inputs.append((f"data set folder of the {role}", folder.parent))
    return inputs


def label_differences(expected: dict[str, Any], found: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``name=value`` of the labels ``found`` lacks or numbers otherwise, and of those ``expected`` does not hold."""
    return ([f"{k}={v}" for k, v in expected.items() if found.get(k) != v],
            [f"{k}={v}" for k, v in found.items() if expected.get(k) != v])


def fold_dir_name(fold: Fold) -> str:
    return f"fold_{fold}"
