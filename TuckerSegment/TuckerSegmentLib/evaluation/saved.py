"""The last evaluation of each original model, kept in the user cache so that the compression panel can
draw its method curves beside a new review (no torch: the Slicer Logic reads it).

The record is sealed with its checksum and holds the sha256 of each evaluated model's files: a record that is
damaged (unreadable, changed, of another shape) is said in a ``CacheWarning`` and not used, and the results of a
model whose files changed since (the original's: all of them) are not drawn. Without a usable cache the
evaluation is simply not kept.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_output_file
from ..checksums import sealed, sha256_bytes, sha256_file, unsealed
from ..errors import ModelFolderError, OutputPathError
from ..nnunet.layout import locate_model
from ..paths import cache_dir, cache_folder, cache_warning

FOLDER = "evaluations"
SOURCES = "model_sha256"  # the key the record keeps each evaluated model's sha256 under, by its path


def _name(original: str | Path) -> str:
    return hashlib.sha256(str(locate_model(Path(original))).encode("utf-8")).hexdigest()[:16] + ".json"


def saved_path(original: str | Path, cache: Path | None = None) -> Path:
    """Where the evaluation of the original model folder ``original`` (the folder holding its plans) is kept."""
    return (cache or cache_dir()) / FOLDER / _name(original)


def model_sha256(path: str | Path) -> str | None:
    """The sha256 of the files a model is (plans.json, dataset.json, each fold's files); None when ``path`` is no
    longer a model folder."""
    try:
        folder = locate_model(Path(path))
        files = [folder / "plans.json", folder / "dataset.json",
                 *sorted(f for fold in folder.glob("fold_*") if fold.is_dir() for f in fold.iterdir() if f.is_file())]
        return sha256_bytes(json.dumps([[str(f.relative_to(folder)), sha256_file(f)] for f in files]).encode())
    except (OSError, ValueError, ModelFolderError):  # ValueError: a path with a NUL character
        return None


def save_evaluation(data: dict[str, Any], cache: Path | None = None) -> Path | None:
    """Keep ``data`` (``Evaluation.to_json()``) as the latest evaluation of its original model, with the sha256 of
    each model evaluated; None, said in a ``CacheWarning``, when the cache cannot keep it."""
    folder = cache_folder(FOLDER, cache=cache)
    if folder is None:
        return None
    target = folder / _name(data["models"][0]["path"])
    sources = {model["path"]: model_sha256(model["path"]) for model in data["models"]}
    try:
        with atomic_output_file(target) as staging:
            staging.write_text(json.dumps(sealed({**data, SOURCES: sources}), allow_nan=False))
    except OutputPathError as exc:
        cache_warning(f"the evaluation is not kept for the compression panel: {exc}")
        return None
    return target


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _shaped(record: dict[str, Any]) -> bool:
    """Whether ``record`` is an evaluation with its models' sha256 and each variant's figures of the right type."""
    models, sources = record.get("models"), record.get(SOURCES)
    return (isinstance(models, list) and bool(models) and isinstance(sources, dict)
            and all(isinstance(m, dict) and isinstance(m.get("path"), str) and m["path"] in sources for m in models)
            and all(_number(m.get("flops_fraction")) and isinstance(m.get("curve"), str)
                    and (m.get("pooled_agreement") is None or _number(m["pooled_agreement"])) for m in models[1:]))


def _record(path: Path) -> dict[str, Any] | None:
    """The evaluation kept in ``path``; None when there is none, or when it is damaged (said in a ``CacheWarning``)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        record = None
    if isinstance(record, dict):
        record = unsealed(record, path)  # a record changed since it was written is said there
        if record is None or _shaped(record):
            return record
    cache_warning(f"the saved evaluation {path} is unreadable, or not an evaluation with the sha256 of its models; "
                  "it is not used")
    return None


def _unchanged(record: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The models of ``record`` whose files are still those evaluated (none when the original's changed); the
    others are said in a ``CacheWarning``."""
    models = record["models"]
    changed = [m["path"] for m in models if model_sha256(m["path"]) != record[SOURCES][m["path"]]]
    if changed:
        cache_warning(f"the saved evaluation {path} was made from models that changed or went since "
                      f"({', '.join(changed)}); their results are not used")
    return [] if models[0]["path"] in changed else [m for m in models if m["path"] not in changed]


def evaluation_curves(original: str | Path, cache: Path | None = None) -> dict[str, list[tuple[float, float]]]:
    """Per method curve of the last evaluation of ``original``: (FLOPs fraction, pooled agreement with the
    original) points, cheapest first, of the variants whose files are unchanged; empty when none was run, the
    record is damaged, or the original changed since."""
    try:
        path = saved_path(original, cache)
    except ModelFolderError:
        return {}
    record = _record(path)
    curves: dict[str, list[tuple[float, float]]] = {}
    for model in (_unchanged(record, path) if record else [])[1:]:
        if model["pooled_agreement"] is not None:
            curves.setdefault(model["curve"], []).append((float(model["flops_fraction"]),
                                                          float(model["pooled_agreement"])))
    return {curve: sorted(points) for curve, points in curves.items()}
