"""Writing a model folder: the original's plans and labels copied, a fold's weights and ``tucker.json`` record,
the whole folder appearing at once (compressed, pruned, distilled or fine-tuned models alike)."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__
from ..atomic import atomic_output_dir
from .layout import TERMINOLOGY_CSV, TUCKER_JSON, WEIGHTS_FILE, fold_dir_name
from .model_folder import ModelFolder
from .tucker_format import save_weights, write_tucker_json

COPIED_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json", TERMINOLOGY_CSV)


def copy_model_files(model: ModelFolder, staging: Path) -> None:
    """The model's plans, labels and terminology, copied into a new model folder."""
    for name in COPIED_FILES:
        if (model.path / name).is_file():
            shutil.copy2(model.path / name, staging / name)


def write_retrained_model(model: ModelFolder, fold: str, network: nn.Module, record: dict[str, Any], target: Path,
                          overwrite: bool, extra: Callable[[Path], None] | None = None) -> None:
    """A retrained fold of ``model`` (distilled, fine-tuned) as a new model folder, whole or not at all: the model's
    plans and labels, ``record`` (the fold's ``tucker.json`` entries) stamped with this version and the new weights'
    sha256, the weights; ``extra(fold_dir)`` adds files to the fold before the folder appears."""
    with atomic_output_dir(target, overwrite) as staging:
        copy_model_files(model, staging)
        fold_dir = staging / fold_dir_name(fold)
        fold_dir.mkdir()
        weights_sha256 = save_weights(network, fold_dir / WEIGHTS_FILE)
        write_tucker_json(fold_dir / TUCKER_JSON, {**record, "tuckersegment_version": __version__,
                                                   "weights_sha256": weights_sha256})
        if extra is not None:
            extra(fold_dir)
