"""Compress, then distil, into one output folder: ``compress --distill N``, the compression panel and
``build-variants --distill N``.

``compress_and_distill(compress, teacher, output, calibration, iterations, settings)`` has ``compress(folder)`` write
the compressed (or pruned) model into ``<OUT>.distill-source/`` beside ``output``, trains it towards the original
``teacher`` on the same calibration CTs (``distill.distill_model_folder``) into ``output`` (whole or not at all),
then removes the source folder. Without calibration CTs a CT model uses the bundled sample CT, as compression does.

Resumable: the source folder holds ``request.json`` (what decides the result: the caller's compression
``settings``, the teacher checkpoint's sha256, the calibration's content, fold, iterations, device), written once
the compressed folder is complete. A run stopped during distillation leaves the source folder and the distillation
state ``<OUT>.distill-state/``; a rerun with the same request reuses the compressed model and resumes; a rerun with
another request removes both first. A run that fails before distillation has saved any state leaves nothing.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ..atomic import Input, atomic_output_file, check_output_dir, path_inputs
from ..compress.calibration_data import CalibrationVolume
from ..compress.calibration_source import CT_NORMALIZATION, sample_ct
from ..defaults import distill_iterations
from ..errors import PolicyError
from ..image.volume import Volume
from ..checksums import sha256_file
from ..nnunet.layout import Fold, model_inputs
from ..nnunet.model_folder import ModelFolder
from ..progress import LayerProgress
from .distill import distill_model_folder
from ..paths import distill_source_folder, state_folder
from .resume import remove_state

REQUEST = "request.json"
Calibration = Sequence[CalibrationVolume | Volume | str | Path]
Result = TypeVar("Result")


def content_digest(item: CalibrationVolume | Volume | str | Path) -> str:
    """sha256 of a file, or of a volume's voxels, geometry and mask (a missing file: its path, refused later)."""
    if isinstance(item, (str, Path)):
        path = Path(item).expanduser()
        return sha256_file(path) if path.is_file() else f"missing {path}"
    volume, mask = (item.volume, item.mask) if isinstance(item, CalibrationVolume) else (item, None)
    digest = hashlib.sha256()
    for array in (volume.array, volume.ijk_to_ras, mask):
        if array is not None:
            digest.update(f"{array.shape} {array.dtype}".encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def distillation_data(model: ModelFolder, calibration: Calibration | None) -> list[CalibrationVolume | Volume | str | Path]:
    """The CTs distillation trains on: ``calibration``, or the bundled sample CT for a CT model (as compression)."""
    if calibration:
        return list(calibration)
    scheme = model.configuration_manager.normalization_schemes[0]
    if scheme != CT_NORMALIZATION:
        raise PolicyError(f"{model.path}: distillation needs images like the ones the model segments (its "
                          f"normalisation is {scheme}, not CT, so the bundled sample CT does not fit); pass "
                          "--calibration CT...")
    return [sample_ct()]


def _reuse_or_clear(source: Path, output: Path, request: dict[str, Any]) -> bool:
    """Whether ``source`` holds the compressed model ``request`` asks for; if it holds another (or an unfinished
    one), it goes, with the distillation state it was training (ours: its request says so)."""
    if not source.exists():
        return False
    try:
        found = json.loads((source / REQUEST).read_text())
    except (OSError, ValueError):
        found = None
    if found == request:
        return True
    shutil.rmtree(source, ignore_errors=True)
    if found is not None:
        remove_state(state_folder(output, "distill"))
    return False


def compress_and_distill(compress: Callable[[Path], Result], teacher: str | Path, output: str | Path,
                         calibration: Calibration | None, iterations: int, settings: Mapping[str, Any],
                         device: str = "auto", fold: Fold = 0, configuration: str | None = None,
                         overwrite: bool = False, trust: bool = False, progress: LayerProgress | None = None,
                         say: Callable[[str], None] | None = None,
                         inputs: Sequence[Input] = ()) -> tuple[Result | None, dict[str, Any] | None]:
    """Write ``output``: the model ``compress(folder)`` writes (compressed from ``teacher``, one ``fold``), distilled
    ``iterations`` times from ``teacher`` on ``calibration`` (default: the sample CT) on ``device``; with 0
    iterations, that model as it is. ``settings`` (JSON) is whatever else decides the compressed model; ``inputs``,
    whatever else ``compress`` reads (kept clear of the outputs like the teacher and the CTs). Returns
    ``compress``'s result (``None`` when an interrupted run's compressed model was reused) and the ``recovery``
    record (``None`` without distillation). See the module docstring."""
    iterations = distill_iterations(iterations)
    if not iterations:
        return compress(Path(output)), None
    original = ModelFolder.open(teacher, configuration)
    original.require_fold(fold)
    inputs = [*model_inputs("original model folder", teacher), *path_inputs("calibration CT", calibration), *inputs]
    target = check_output_dir(Path(output), overwrite, inputs)
    volumes = distillation_data(original, calibration)
    request = json.loads(json.dumps({
        "settings": settings, "teacher_sha256": sha256_file(original.checkpoint_path(fold)), "fold": str(fold),
        "calibration": [content_digest(item) for item in volumes], "iterations": iterations, "device": device}))
    source = distill_source_folder(target)
    check_output_dir(source, overwrite=True, inputs=inputs)
    report = say or (lambda message: None)
    result = None
    if _reuse_or_clear(source, target, request):
        report(f"compressed model kept from an interrupted run ({source}); distilling")
    else:
        result = compress(source)
        with atomic_output_file(source / REQUEST) as staging:
            staging.write_text(json.dumps(request, indent=1))
    try:
        recovery = distill_model_folder(source, original.path, volumes, target, iterations=iterations, device=device,
                                        fold=fold, overwrite=overwrite, trust=trust, progress=progress)
    except BaseException:
        if not state_folder(target, "distill").exists():  # nothing to resume: nothing stays
            shutil.rmtree(source, ignore_errors=True)
        raise
    shutil.rmtree(source, ignore_errors=True)
    return result, recovery
