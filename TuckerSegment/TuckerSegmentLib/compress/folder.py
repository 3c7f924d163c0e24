"""Compress an nnU-Net v2 model folder into a new folder; describe any model folder."""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_output_dir, check_output_dir
from ..errors import ModelFolderError
from ..image.volume import Volume
from ..nnunet.checkpoint import sha256_file
from ..nnunet.layout import TUCKER_JSON, WEIGHTS_FILE, Fold, fold_dir_name
from ..nnunet.model_folder import ModelFolder
from ..nnunet.tucker_format import save_weights, write_tucker_json
from ..policies.base import RankPolicy
from ..progress import LayerProgress
from ..segment.labels import TERMINOLOGY_CSV
from ..tucker.network_stats import FLOP_CONVENTION, network_stats
from .calibration_data import CalibrationVolume, calibration_patches
from .calibration_source import resolve_calibration
from .network import CompressionReport, compress_network

COPIED_FILES = ("plans.json", "dataset.json", "dataset_fingerprint.json", TERMINOLOGY_CSV)


def compress_model_folder(source: str | Path, output: str | Path, policy: RankPolicy, folds: Sequence[Fold] = (0,),
                          configuration: str | None = None, trust: bool = False, overwrite: bool = False,
                          progress: LayerProgress | None = None,
                          calibration: Sequence[CalibrationVolume | Volume | str | Path] | None = None,
                          weight_only: bool = False) -> dict[str, CompressionReport]:
    """Write a compressed copy of ``source`` to ``output``: all or nothing, the source untouched.
    ``calibration``: unlabeled CT volumes (or files, or masked ``CalibrationVolume``s) for activation-aware
    compression; without them a CT model is calibrated on the bundled sample CT, and ``weight_only`` asks
    for the paper's data-free rule instead (see ``resolve_calibration``; each report records which)."""
    model = ModelFolder.open(source, configuration)
    if model.compressed:
        raise ModelFolderError(f"{model.path} is already compressed; compress the original nnU-Net model folder")
    volumes, record = resolve_calibration(model, calibration, weight_only)
    fold_names = [str(f) for f in folds]
    twice = sorted({f for f in fold_names if fold_names.count(f) > 1})
    if twice:
        raise ModelFolderError(f"fold {', '.join(twice)} is named more than once; name each fold once")
    for fold in fold_names:
        model.require_fold(fold)
    target = check_output_dir(Path(output), overwrite, protected=model.path)
    reports: dict[str, CompressionReport] = {}
    with atomic_output_dir(target, overwrite) as staging:
        for name in COPIED_FILES:
            if (model.path / name).is_file():
                shutil.copy2(model.path / name, staging / name)
        for fold in fold_names:
            network, checkpoint = model.load_original(fold, trust)
            patches = list(calibration_patches(model, volumes)) if volumes else None
            report = compress_network(network, policy, model.example_input(), calibration=patches, progress=progress)
            report.calibration = record
            fold_dir = staging / fold_dir_name(fold)
            fold_dir.mkdir()
            weights_sha256 = save_weights(network, fold_dir / WEIGHTS_FILE)
            axes = checkpoint.get("inference_allowed_mirroring_axes")
            write_tucker_json(fold_dir / TUCKER_JSON, {
                "tuckersegment_version": __version__,
                "configuration": model.configuration,
                "fold": fold,
                "trainer_name": checkpoint.get("trainer_name", model.trainer_name),
                "inference_allowed_mirroring_axes": list(axes) if axes is not None else None,
                "source": {"folder": str(model.path), "checkpoint": f"{fold_dir_name(fold)}/{model.checkpoint_path(fold).name}",
                           "sha256": sha256_file(model.checkpoint_path(fold))},
                "weights": WEIGHTS_FILE,
                "weights_sha256": weights_sha256,
                **report.to_dict(),
            })
            reports[fold] = report
    return reports


def describe_model(folder: str | Path, fold: Fold | None = None, configuration: str | None = None) -> dict[str, Any]:
    """Size and cost of a model folder's fold (default: its first), from its structure alone."""
    model = ModelFolder.open(folder, configuration)
    fold = str(fold) if fold is not None else model.folds[0]
    network, record = model.fold_structure(fold)
    stats = network_stats(network, model.example_input())
    compressed = record is not None
    weights_file = model.fold_path(fold) / (WEIGHTS_FILE if compressed else model.checkpoint_path(fold).name)
    if not weights_file.is_file():
        raise ModelFolderError(f"{weights_file} is missing: the model folder is incomplete; compress the model again")
    return {
        "path": str(model.path),
        "configuration": model.configuration,
        "fold": fold,
        "folds": model.folds,
        "architecture": model.configuration_manager.network_arch_class_name,
        "patch_size": list(model.patch_size),
        "input_channels": model.num_input_channels,
        "outputs": model.num_outputs,
        "params": stats.params,
        "flops": stats.flops,
        "flop_convention": FLOP_CONVENTION,
        "weights_bytes": stats.weight_bytes,
        "file_bytes": weights_file.stat().st_size,
        "compressed": compressed,
        "policy": record["policy"] if record else "original",
        "source": record["source"] if record else None,
    }
