"""The last evaluation of each original model, kept in the user cache so that the compression panel can
draw its method curves beside a new review (no torch: the Slicer Logic reads it)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_output_file
from ..checksums import sealed, unsealed
from ..errors import ModelFolderError
from ..nnunet.layout import locate_model
from ..paths import cache_dir

FOLDER = "evaluations"


def saved_path(original: str | Path, cache: Path | None = None) -> Path:
    """Where the evaluation of the original model folder ``original`` (the folder holding its plans) is kept."""
    key = hashlib.sha256(str(locate_model(Path(original))).encode("utf-8")).hexdigest()[:16]
    return (cache or cache_dir()) / FOLDER / f"{key}.json"


def save_evaluation(data: dict[str, Any], cache: Path | None = None) -> Path:
    """Keep ``data`` (``Evaluation.to_json()``) as the latest evaluation of its original model."""
    target = saved_path(data["models"][0]["path"], cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_file(target) as staging:
        staging.write_text(json.dumps(sealed(data), allow_nan=False))
    return target


def evaluation_curves(original: str | Path, cache: Path | None = None) -> dict[str, list[tuple[float, float]]]:
    """Per method curve of the last evaluation of ``original``: (FLOPs fraction, pooled agreement with the
    original) points, cheapest first; empty when none was run or the record is unreadable."""
    try:
        path = saved_path(original, cache)
        record = unsealed(json.loads(path.read_text()), path)
        models = record["models"] if record is not None else []
        curves: dict[str, list[tuple[float, float]]] = {}
        for model in models[1:]:
            x, y = float(model["flops_fraction"]), model["pooled_agreement"]
            if y is not None and math.isfinite(x) and math.isfinite(float(y)):
                curves.setdefault(str(model["curve"]), []).append((x, float(y)))
    except (OSError, ValueError, KeyError, TypeError, IndexError, ModelFolderError):
        return {}
    return {curve: sorted(points) for curve, points in curves.items()}
