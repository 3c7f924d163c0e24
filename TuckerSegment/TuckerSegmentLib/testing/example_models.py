"""nnU-Net v2 model folders with real architectures and random weights, for tests, demos and benchmarks.

TotalSegmentator's weights cannot be downloaded everywhere; its architectures can be rebuilt from
their plans. ``write_example_model`` writes a folder exactly as nnU-Net v2 training does
(plans.json, dataset.json, fold_N/checkpoint_final.pth with nnU-Net's checkpoint entries), with
He-initialised random weights: right shapes and costs, meaningless predictions.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..nnunet.layout import CHECKPOINT_NAME, fold_dir_name
from ..nnunet.model_folder import ModelFolder

TRAINER = "nnUNetTrainerNoMirroring"
PLANS_NAME = "nnUNetPlans"
CONFIGURATION = "3d_fullres"


@dataclass(frozen=True)
class UNetSpec:
    """A PlainConvUNet as nnU-Net plans describe it (isotropic kernels and strides per stage)."""

    dataset_name: str
    features: tuple[int, ...]
    strides: tuple[int, ...]
    patch_size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    num_foreground: int
    kernel: int = 3
    convs_per_stage: int = 2
    trainer: str = TRAINER

    def scaled(self, divisor: int) -> UNetSpec:
        """The same plans with every stage's width divided by ``divisor`` (at least 2 channels): fast tests."""
        return replace(self, features=tuple(max(2, f // divisor) for f in self.features))

    def arch_kwargs(self) -> dict[str, Any]:
        n = len(self.features)
        return {
            "n_stages": n, "features_per_stage": list(self.features),
            "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[self.kernel] * 3] * n, "strides": [[s] * 3 for s in self.strides],
            "n_conv_per_stage": [self.convs_per_stage] * n, "n_conv_per_stage_decoder": [self.convs_per_stage] * (n - 1),
            "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None, "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
        }


_TS_15MM = dict(features=(32, 64, 128, 256, 320, 320), strides=(1, 2, 2, 2, 2, 2), patch_size=(128, 128, 128),
                spacing=(1.5, 1.5, 1.5))
_TS_FAST_TRAINER = "nnUNetTrainer_4000epochs_NoMirroring"
EXAMPLE_SPECS: dict[str, UNetSpec] = {
    # TotalSegmentator v2 1.5 mm part models: Dataset291 reproduces the published 31.19 M inference parameters;
    # the other four parts are planned alike (same planner, spacing and patch) and differ in their outputs.
    "Dataset291": UNetSpec("Dataset291_TotalSegmentator_part1_organs_1559subj", num_foreground=24, **_TS_15MM),
    "Dataset292": UNetSpec("Dataset292_TotalSegmentator_part2_vertebrae_1532subj", num_foreground=26, **_TS_15MM),
    "Dataset293": UNetSpec("Dataset293_TotalSegmentator_part3_cardiac_1559subj", num_foreground=18, **_TS_15MM),
    "Dataset294": UNetSpec("Dataset294_TotalSegmentator_part4_muscles_1559subj", num_foreground=23, **_TS_15MM),
    "Dataset295": UNetSpec("Dataset295_TotalSegmentator_part5_ribs_1559subj", num_foreground=26, **_TS_15MM),
    # TotalSegmentator v2 3 mm model, all 117 classes (about 16.55 M parameters, as published).
    "Dataset297": UNetSpec("Dataset297_TotalSegmentator_total_3mm_1559subj", (32, 64, 128, 256, 320),
                           (1, 2, 2, 2, 2), (112, 112, 128), (3.0, 3.0, 3.0), 117, trainer=_TS_FAST_TRAINER),
    # TotalSegmentator v2 6 mm model, all 117 classes. Its plans were not available to this project: this is
    # an assumption (the 3 mm network on a 6 mm grid with a smaller patch); built variants record the real figures.
    "Dataset298": UNetSpec("Dataset298_TotalSegmentator_total_6mm_1559subj", (32, 64, 128, 256, 320),
                           (1, 2, 2, 2, 2), (64, 64, 64), (6.0, 6.0, 6.0), 117, trainer=_TS_FAST_TRAINER),
    # A small network for fast tests.
    "tiny": UNetSpec("Dataset900_Tiny", (8, 16, 32), (1, 2, 2), (32, 32, 32), (3.0, 3.0, 3.0), 3),
}


def _ct_intensity_properties() -> dict[str, float]:
    """Plausible CT foreground statistics (HU) for CTNormalization; synthetic, not from a data set."""
    return {"max": 3071.0, "mean": 98.0, "median": 79.0, "min": -1024.0,
            "percentile_00_5": -965.0, "percentile_99_5": 1480.0, "std": 353.0}


# nnU-Net's default resampling entries of a plans configuration (3rd-order data, separate z when anisotropic).
NNUNET_RESAMPLING: dict[str, Any] = {
    "resampling_fn_data": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}


def example_plans(spec: UNetSpec, old_format: bool = False) -> dict[str, Any]:
    """nnU-Net v2 plans for ``spec``; ``old_format`` writes the pre-2.3 layout (UNet_class_name …)."""
    config: dict[str, Any] = {
        "data_identifier": f"{PLANS_NAME}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2, "patch_size": list(spec.patch_size),
        "median_image_size_in_voxels": [2 * s for s in spec.patch_size], "spacing": list(spec.spacing),
        "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False], **NNUNET_RESAMPLING,
        "batch_dice": False,
    }
    kwargs = spec.arch_kwargs()
    if old_format:
        n = len(spec.features)
        config |= {"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": spec.features[0],
                   "unet_max_num_features": max(spec.features),
                   "n_conv_per_stage_encoder": kwargs["n_conv_per_stage"],
                   "n_conv_per_stage_decoder": kwargs["n_conv_per_stage_decoder"],
                   "num_pool_per_axis": [n - 1] * 3, "pool_op_kernel_sizes": kwargs["strides"],
                   "conv_kernel_sizes": kwargs["kernel_sizes"]}
    else:
        config["architecture"] = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                  "arch_kwargs": kwargs,
                                  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return {
        "dataset_name": spec.dataset_name, "plans_name": PLANS_NAME,
        "original_median_spacing_after_transp": list(spec.spacing),
        "original_median_shape_after_transp": [2 * s for s in spec.patch_size],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: config},
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": _ct_intensity_properties()},
    }


def example_dataset_json(spec: UNetSpec, names: Sequence[str] | None = None) -> dict[str, Any]:
    """dataset.json with ``names`` as labels 1..N (default ``structure_i``)."""
    names = list(names) if names is not None else [f"structure_{i}" for i in range(1, spec.num_foreground + 1)]
    if len(names) != spec.num_foreground:
        raise ValueError(f"{spec.dataset_name} has {spec.num_foreground} foreground labels, {len(names)} names given")
    labels = {"background": 0} | {name: i for i, name in enumerate(names, start=1)}
    return {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 0, "file_ending": ".nii.gz"}


def _training_log(epochs: int, num_classes: int, rng: np.random.Generator) -> dict[str, list]:
    """A training log shaped like nnU-Net's LocalLogger checkpoint entry (numpy scalars included)."""
    dice = [np.float64(d) for d in np.linspace(0.3, 0.8, epochs)]
    start = time.time()
    return {"mean_fg_dice": dice, "ema_fg_dice": list(dice),
            "dice_per_class_or_region": [[np.float64(v) for v in rng.uniform(0, 1, num_classes)] for _ in dice],
            "train_losses": [np.float32(-d) for d in dice], "val_losses": [np.float32(-d) for d in dice],
            "lrs": [0.01 * (1 - e / epochs) ** 0.9 for e in range(epochs)],
            "epoch_start_timestamps": [start + e for e in range(epochs)],
            "epoch_end_timestamps": [start + e + 0.5 for e in range(epochs)]}


def example_model(spec: str | UNetSpec, old_format: bool = False, root: Path = Path(),
                  names: Sequence[str] | None = None) -> ModelFolder:
    """``spec`` (or ``EXAMPLE_SPECS[spec]``) as a ``ModelFolder`` held in memory (plans only, nothing on disk)."""
    spec = EXAMPLE_SPECS[spec] if isinstance(spec, str) else spec
    folder = root / spec.dataset_name / f"{spec.trainer}__{PLANS_NAME}__{CONFIGURATION}"
    return ModelFolder(path=folder, plans=example_plans(spec, old_format),
                       dataset_json=example_dataset_json(spec, names), configuration=CONFIGURATION)


def write_example_model(root: str | Path, spec: str | UNetSpec = "tiny", seed: int = 0, folds: tuple[int, ...] = (0,),
                        old_format: bool = False, names: Sequence[str] | None = None) -> Path:
    """Write ``root/<dataset>/<trainer>__nnUNetPlans__3d_fullres`` for ``spec``; return it."""
    spec = EXAMPLE_SPECS[spec] if isinstance(spec, str) else spec
    model = example_model(spec, old_format, Path(root), names)
    folder = model.path
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(model.plans, indent=4))
    (folder / "dataset.json").write_text(json.dumps(model.dataset_json, indent=4))
    rng = np.random.default_rng(seed)
    for fold in folds:
        torch.manual_seed(seed + fold)
        (folder / fold_dir_name(fold)).mkdir(exist_ok=True)
        network = model.build_network()
        network.apply(network.initialize)  # nnU-Net's He initialisation
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
        checkpoint = {
            "network_weights": network.state_dict(), "optimizer_state": optimizer.state_dict(),
            "grad_scaler_state": None, "logging": _training_log(3, spec.num_foreground, rng),
            "_best_ema": np.float64(0.8), "current_epoch": 3,
            "init_args": {"plans": model.plans, "configuration": CONFIGURATION, "fold": fold,
                          "dataset_json": model.dataset_json, "device": torch.device("cpu")},
            "trainer_name": spec.trainer, "inference_allowed_mirroring_axes": None,
        }
        torch.save(checkpoint, folder / fold_dir_name(fold) / CHECKPOINT_NAME)
    return folder


def write_totalsegmentator_task(results: str | Path, task: str, divisor: int = 1, seed: int = 0) -> list[Path]:
    """TotalSegmentator-shaped model folders for ``task`` (``total``, ``fast``, ``fastest``) under an nnU-Net
    results folder, as TotalSegmentator installs them: the real plans (widths divided by ``divisor``),
    the real label names, random weights."""
    from ..variants.totalsegmentator import tasks
    folders = []
    for index, model in enumerate(tasks()[task].models):
        spec = EXAMPLE_SPECS[f"Dataset{model.task_id}"]
        spec = spec.scaled(divisor) if divisor > 1 else spec
        names = [model.labels[value] for value in sorted(model.labels)]
        folders.append(write_example_model(results, spec, seed=seed + index, folds=(model.fold,), names=names))
    return folders
