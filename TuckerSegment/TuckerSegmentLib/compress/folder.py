"""Compress (Tucker) or prune (filters) an nnU-Net v2 model folder into a new folder; describe any model folder."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from torch import nn

from .. import __version__
from ..atomic import atomic_output_dir, check_output_dir, path_inputs
from ..errors import ModelFolderError, PolicyError
from ..image.volume import Volume
from ..checksums import sha256_file
from ..nnunet.layout import TUCKER_JSON, WEIGHTS_FILE, Fold, fold_dir_name, model_inputs
from ..nnunet.model_folder import ModelFolder
from ..nnunet.tucker_format import save_weights, write_tucker_json
from ..nnunet.writing import copy_model_files
from ..policies.base import RankPolicy
from ..progress import LayerProgress
from ..tucker.network_stats import FLOP_CONVENTION, network_stats
from .calibration_data import CalibrationVolume, calibration_patches, checked_calibration, labelled_patches
from .calibration_source import calibration_name, resolve_calibration
from .network import CompressionReport, compress_network
from .pruning import CRITERIA, LabelledPatch, PruningReport, prune_network, trace_input

def _open_source(source: str | Path, configuration: str | None, folds: Sequence[Fold], output: str | Path,
                 overwrite: bool, calibration: Sequence[object] | None = None,
                 labels: Sequence[object] | None = None) -> tuple[ModelFolder, list[str]]:
    """The original model folder to compress or prune, and its folds (each named once, each present), once
    ``output`` is known to be writable and clear of every input (the model, calibration CTs, label maps)."""
    model = ModelFolder.open(source, configuration)
    check_output_dir(Path(output), overwrite, [*model_inputs("model folder", source),
                                               *path_inputs("calibration CT", calibration),
                                               *path_inputs("label map", labels)])
    if model.compressed:
        raise ModelFolderError(f"{model.path} is already compressed or pruned; start from the original nnU-Net model "
                               "folder")
    fold_names = [str(f) for f in folds]
    twice = sorted({f for f in fold_names if fold_names.count(f) > 1})
    if twice:
        raise ModelFolderError(f"fold {', '.join(twice)} is named more than once; name each fold once")
    for fold in fold_names:
        model.require_fold(fold)
    return model, fold_names


Report = TypeVar("Report", CompressionReport, PruningReport)


def _write_model_folder(model: ModelFolder, fold_names: Sequence[str], output: str | Path, trust: bool,
                        overwrite: bool, transform: Callable[[nn.Module], Report]) -> dict[str, Report]:
    """Write ``output`` all or nothing: the source's plans and labels, and per fold the network that
    ``transform`` made of the original (in place) as ``tucker.json`` (its ``report.to_dict()`` plus where it came
    from) + ``weights.safetensors``."""
    reports: dict[str, Report] = {}
    with atomic_output_dir(Path(output), overwrite) as staging:
        copy_model_files(model, staging)
        for fold in fold_names:
            network, checkpoint = model.load_original(fold, trust)
            report = transform(network)
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


def compress_model_folder(source: str | Path, output: str | Path, policy: RankPolicy, folds: Sequence[Fold] = (0,),
                          configuration: str | None = None, trust: bool = False, overwrite: bool = False,
                          progress: LayerProgress | None = None,
                          calibration: Sequence[CalibrationVolume | Volume | str | Path] | None = None,
                          weight_only: bool = False) -> dict[str, CompressionReport]:
    """Write a compressed copy of ``source`` to ``output``: all or nothing, the source untouched.
    ``calibration``: unlabeled CT volumes (or files, or masked ``CalibrationVolume``s) for activation-aware
    compression; without them a CT model is calibrated on the bundled sample CT, and ``weight_only`` asks
    for the paper's data-free rule instead (see ``resolve_calibration``; each report records which)."""
    model, fold_names = _open_source(source, configuration, folds, output, overwrite, calibration)
    volumes, record = resolve_calibration(model, calibration, weight_only)

    def compress(network: nn.Module) -> CompressionReport:
        patches = list(calibration_patches(model, volumes)) if volumes else None
        report = compress_network(network, policy, model.example_input(), calibration=patches, progress=progress)
        report.calibration = record
        return report
    return _write_model_folder(model, fold_names, output, trust, overwrite, compress)


def prune_model_folder(source: str | Path, output: str | Path, criterion: str, target_flops: float = 0.5,
                       folds: Sequence[Fold] = (0,), configuration: str | None = None, trust: bool = False,
                       overwrite: bool = False,
                       calibration: Sequence[CalibrationVolume | Volume | str | Path] | None = None,
                       labels: Sequence[Volume | np.ndarray | str | Path] | None = None,
                       progress: LayerProgress | None = None) -> dict[str, PruningReport]:
    """Write a filter-pruned copy of ``source`` to ``output`` (all or nothing, the source untouched): every layer
    keeps the same fraction of its output channels, the fewest that keep at most ``target_flops`` of the FLOPs
    (see ``pruning.prune_network``). ``criterion``: ``l1`` or ``fpgm`` rank filters by their weights alone and
    take no data; ``taylor`` needs ``calibration`` CTs (or masked ``CalibrationVolume``s: voxels outside the
    mask are left out of the loss) and their ``labels`` (one label map per CT, on its grid, values from
    dataset.json). ``progress(done, total, message)`` hears of each trial of the budget search."""
    if criterion not in CRITERIA:
        raise PolicyError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if isinstance(target_flops, bool) or not isinstance(target_flops, (int, float)) or not 0 < target_flops <= 1:
        raise PolicyError(f"the FLOP target is the fraction of the original FLOPs kept, in (0, 1], not {target_flops!r}")
    model, fold_names = _open_source(source, configuration, folds, output, overwrite, calibration, labels)
    if criterion == "taylor":
        if not calibration or not labels:
            raise PolicyError("prune-taylor needs labelled CTs: calibration CT volumes and one label map per CT "
                              "(--calibration CT... --labels LABELMAP...)")
        sources = [checked_calibration(item) for item in calibration]
        patches = [LabelledPatch(image, label) for image, label in labelled_patches(model, sources, labels)]
        record = {"source": "user", "volumes": [calibration_name(item, n) for n, item in enumerate(calibration, start=1)],
                  "labels": [calibration_name(item, n) for n, item in enumerate(labels, start=1)],
                  "description": f"your {len(sources)} labelled CT volume(s)"}
    else:
        if calibration or labels:
            raise PolicyError(f"prune-{criterion} ranks filters by their weights alone and uses no calibration CTs or "
                              "labels; leave them out (prune-taylor uses labelled CTs)")
        patches = None
        record = {"source": "none", "volumes": [],
                  "description": f"weight-only: filters ranked by {criterion} of their weights"}
    strides = model.configuration_manager.network_arch_init_kwargs.get("strides")
    example = (trace_input(model.patch_size, strides, model.num_input_channels) if strides
               else model.example_input("cpu"))

    def prune(network: nn.Module) -> PruningReport:
        report = prune_network(network, criterion, float(target_flops), model.example_input(), example,
                               labelled=patches, progress=progress)
        report.calibration = record
        return report
    return _write_model_folder(model, fold_names, output, trust, overwrite, prune)


def model_writer(source: str | Path, how: RankPolicy | str,
                 calibration: Sequence[CalibrationVolume | Volume | str | Path] | None = None,
                 target_flops: float | None = None, labels: Sequence[Volume | np.ndarray | str | Path] | None = None,
                 weight_only: bool = False, **common: Any) -> Callable[[Path], dict[str, Any]]:
    """``write(folder)``: ``source`` compressed with the rank policy ``how``, or pruned with the criterion ``how``
    (``l1``, ``fpgm``, ``taylor``) to ``target_flops`` (default 0.5), into ``folder``; its reports per fold.
    ``common``: ``folds``, ``configuration``, ``trust``, ``overwrite``, ``progress``, as both take them."""
    if isinstance(how, str):
        budget = {} if target_flops is None else {"target_flops": target_flops}
        return lambda folder: prune_model_folder(source, folder, how, calibration=calibration, labels=labels,
                                                 **budget, **common)
    return lambda folder: compress_model_folder(source, folder, how, calibration=calibration,
                                                weight_only=weight_only, **common)


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
