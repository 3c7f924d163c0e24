"""Which model segments: a folder the user names, a bundled model by id, or ``auto``.

``auto`` takes TotalSegmentator's single-model 3 mm task (all 117 structures) when its weights are
installed where TotalSegmentator keeps them, and otherwise the bundled demo variant with the
fewest FLOPs whose measured held-out Dice is within ``DICE_TOLERANCE`` of the original's.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelFolderError
from .labels import RESOURCES

BUNDLED_DIR = RESOURCES / "Models"
BUNDLED_CATALOGUE = BUNDLED_DIR / "models.json"
DICE_TOLERANCE = 0.01
TOTALSEGMENTATOR_FAST = ("Dataset297_TotalSegmentator_total_3mm_1559subj",
                         "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres")


@dataclass(frozen=True)
class ModelChoice:
    """A model folder to run and why it was chosen."""

    id: str
    path: Path
    reason: str


def bundled_models(catalogue: Path = BUNDLED_CATALOGUE) -> list[dict[str, Any]]:
    """The bundled models' catalogue entries (id, folder, policy, params, flops, measured quality)."""
    if not catalogue.is_file():
        return []
    entries = json.loads(catalogue.read_text())["models"]
    for entry in entries:
        entry["path"] = catalogue.parent / entry["folder"]
    return entries


def totalsegmentator_results_dirs() -> list[Path]:
    """Where TotalSegmentator (and its Slicer extension) keep nnU-Net results, in lookup order."""
    dirs = []
    if os.environ.get("TOTALSEG_WEIGHTS_PATH"):
        dirs.append(Path(os.environ["TOTALSEG_WEIGHTS_PATH"]))
    home = Path(os.environ.get("TOTALSEG_HOME_DIR", Path.home() / ".totalsegmentator"))
    dirs.append(home / "nnunet" / "results")
    return dirs


def find_totalsegmentator_fast() -> Path | None:
    """TotalSegmentator's 3 mm model folder when its fold 0 weights are present."""
    dataset, trainer = TOTALSEGMENTATOR_FAST
    for root in totalsegmentator_results_dirs():
        folder = root / dataset / trainer
        if (folder / "plans.json").is_file() and (folder / "fold_0" / "checkpoint_final.pth").is_file():
            return folder
    return None


def auto_bundled(entries: list[dict[str, Any]]) -> ModelChoice:
    """The bundled variant with the fewest FLOPs whose held-out Dice is within tolerance of the original."""
    original = next((e for e in entries if e["policy"] == "original"), None)
    if original is None:
        raise ModelFolderError(f"no bundled model in {BUNDLED_DIR}; the installation is incomplete (reinstall "
                               "TuckerSegment) or pass --model with an nnU-Net model folder")
    floor = original["mean_dice"] - DICE_TOLERANCE
    good = [e for e in entries if e.get("mean_dice") is not None and e["mean_dice"] >= floor]
    best = min(good, key=lambda e: e["flops"])
    if best is original:
        reason = (f"no TotalSegmentator weights found; bundled demo model, original: no compressed variant keeps "
                  f"held-out Dice within {DICE_TOLERANCE:.2f} of {original['mean_dice']:.3f}")
    else:
        reason = (f"no TotalSegmentator weights found; bundled demo model, fewest FLOPs ({best['flops'] / 1e9:.1f} vs "
                  f"{original['flops'] / 1e9:.1f} G per patch) with held-out Dice {best['mean_dice']:.3f} within "
                  f"{DICE_TOLERANCE:.2f} of the original's {original['mean_dice']:.3f}")
    return ModelChoice(best["id"], best["path"], reason)


def choose_model(model: str | Path | None = "auto") -> ModelChoice:
    """Resolve ``--model``: ``auto``, a bundled model id, or a model folder path."""
    model = "auto" if model is None else str(model)
    entries = bundled_models()
    if model == "auto":
        fast = find_totalsegmentator_fast()
        if fast is not None:
            return ModelChoice("totalsegmentator-fast", fast, f"TotalSegmentator 3 mm weights found in {fast.parents[1]}")
        return auto_bundled(entries)
    by_id = {e["id"]: e for e in entries}
    if model in by_id:
        return ModelChoice(model, by_id[model]["path"], "bundled model named on the command line")
    path = Path(model).expanduser()
    if path.exists():
        return ModelChoice(path.name, path, "model folder named on the command line")
    ids = ", ".join(by_id) or "none installed"
    raise ModelFolderError(f"--model {model}: no such folder and no bundled model of that id (bundled: {ids}); "
                           "pass an nnU-Net model folder, a bundled id, or auto")
