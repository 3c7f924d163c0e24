"""nnU-Net v2 trained model folders, original or compressed (``layout``), read with nnU-Net's own plans
handling, and their networks built and loaded."""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from ..checksums import sha256_file
from ..errors import CheckpointError, ModelFolderError
from ..image.geometry import Reorientation, resample_image, resampled_shape, to_canonical
from ..image.volume import Volume
from ..tucker.layers import apply_plans
from .checkpoint import load_checkpoint, non_finite, state_mismatch
from .plans_check import check_plans
from .pruned_format import apply_pruning_record, is_pruned
from .layout import CHECKPOINT_NAME, LAYOUT_HINT, TUCKER_JSON, WEIGHTS_FILE, Fold, fold_dir_name, locate_model, read_json
from .tucker_format import layer_plans, load_weights, read_tucker_json


@dataclass
class ModelFolder:
    """An opened model folder. Use ``ModelFolder.open``."""

    path: Path
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    configuration: str

    @classmethod
    def open(cls, path: str | Path, configuration: str | None = None) -> ModelFolder:
        folder = locate_model(Path(path))
        if not (folder / "dataset.json").is_file():
            raise ModelFolderError(f"{folder} has plans.json but no dataset.json; {LAYOUT_HINT}")
        plans = read_json(folder / "plans.json")
        dataset_json = read_json(folder / "dataset.json")
        configurations = plans.get("configurations")
        available = sorted(configurations) if isinstance(configurations, dict) else []
        if not available:
            raise ModelFolderError(f"{folder / 'plans.json'} has no 'configurations': it is not nnU-Net v2 plans")
        name_parts = folder.name.split("__")
        if configuration is None:
            if len(name_parts) == 3 and name_parts[2] in available:
                configuration = name_parts[2]
            elif len(available) == 1:
                configuration = available[0]
            elif "3d_fullres" in available:
                configuration = "3d_fullres"
        if configuration not in available:
            raise ModelFolderError(f"configuration {configuration!r} is not in {folder / 'plans.json'}; "
                                   f"choose one of: {', '.join(available)}")
        try:
            check_plans(plans, dataset_json, configuration)  # before nnU-Net reads (and imports) anything
        except ModelFolderError as error:
            raise ModelFolderError(f"{folder}{os.sep}{error}") from None
        model = cls(path=folder, plans=plans, dataset_json=dataset_json, configuration=configuration)
        model._check_plans()
        if not model.folds:
            raise ModelFolderError(f"{folder} has no trained fold: expected fold_N/{CHECKPOINT_NAME} "
                                   f"(original) or fold_N/{TUCKER_JSON} (compressed)")
        return model

    def _check_plans(self) -> None:
        try:
            self.configuration_manager.network_arch_class_name  # noqa: B018 (validates the architecture entry)
            self.num_input_channels  # noqa: B018
            self.num_outputs  # noqa: B018
        except (KeyError, TypeError, RuntimeError, AssertionError) as exc:
            raise ModelFolderError(f"plans.json/dataset.json in {self.path} are not valid nnU-Net v2 files "
                                   f"({type(exc).__name__}: {exc}); restore them from the trained model") from exc

    @cached_property
    def plans_manager(self) -> PlansManager:
        return PlansManager(self.plans)

    @cached_property
    def configuration_manager(self) -> ConfigurationManager:
        return self.plans_manager.get_configuration(self.configuration)

    @property
    def name(self) -> str:
        """The dataset folder's name for a ``Trainer__Plans__Configuration`` folder, else the folder's own."""
        return self.path.parent.name if self.path.name.count("__") == 2 else self.path.name

    @property
    def trainer_name(self) -> str | None:
        parts = self.path.name.split("__")
        return parts[0] if len(parts) == 3 else None

    @property
    def patch_size(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.configuration_manager.patch_size)

    @cached_property
    def num_input_channels(self) -> int:
        return determine_num_input_channels(self.plans_manager, self.configuration_manager, self.dataset_json)

    @cached_property
    def num_outputs(self) -> int:
        return self.plans_manager.get_label_manager(self.dataset_json).num_segmentation_heads

    @property
    def target_spacing(self) -> np.ndarray:
        """The model spacing along the (k, j, i) axes of a canonical array (nnU-Net's original axis order)."""
        spacing = np.asarray(self.configuration_manager.spacing, dtype=float)
        return spacing[list(self.plans_manager.transpose_backward)]

    def onto_grid(self, volume: Volume) -> ModelGrid:
        """``volume`` as the network sees it before normalisation: canonical RAS, trilinear at the model spacing
        (the one place inference and calibration put a CT on a model's grid)."""
        canonical, reorientation = to_canonical(volume)
        shape = resampled_shape(canonical.array.shape, canonical.spacing[::-1], self.target_spacing)
        return ModelGrid(canonical, resample_image(canonical.array, shape), reorientation, self.target_spacing)

    def fold_path(self, fold: Fold) -> Path:
        return self.path / fold_dir_name(fold)

    def is_compressed_fold(self, fold: Fold) -> bool:
        return (self.fold_path(fold) / TUCKER_JSON).is_file()

    @property
    def folds(self) -> list[str]:
        """Fold names (``"0"``, ``"all"`` …) that hold a checkpoint or a compressed decomposition."""
        return [p.name.removeprefix("fold_") for p in sorted(self.path.glob("fold_*"))
                if (p / CHECKPOINT_NAME).is_file() or (p / TUCKER_JSON).is_file()]

    @property
    def compressed(self) -> bool:
        return any(self.is_compressed_fold(f) for f in self.folds)

    def example_input(self, device: str | torch.device = "meta") -> torch.Tensor:
        """A batch-1 input of the configuration's patch size (meta: shape only, no memory)."""
        return torch.empty((1, self.num_input_channels, *self.patch_size), device=device)

    def build_network(self) -> nn.Module:
        """The architecture the plans describe, as nnU-Net builds it for inference (no deep supervision)."""
        cm = self.configuration_manager
        try:
            return get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                          cm.network_arch_init_kwargs_req_import, self.num_input_channels,
                                          self.num_outputs, allow_init=False, deep_supervision=False)
        except (ImportError, TypeError, KeyError, ValueError) as exc:
            raise ModelFolderError(f"cannot build the network that {self.path / 'plans.json'} describes "
                                   f"({type(exc).__name__}: {exc})") from exc

    def checkpoint_path(self, fold: Fold) -> Path:
        return self.fold_path(fold) / CHECKPOINT_NAME

    def require_fold(self, fold: Fold) -> None:
        """Refuse a fold this folder does not hold, naming the ones it does."""
        if str(fold) not in self.folds:
            raise ModelFolderError(f"{self.path} has no fold {fold}; available folds: {', '.join(self.folds)}")

    def tucker_record(self, fold: Fold) -> dict[str, Any]:
        """The validated ``tucker.json`` of a compressed fold."""
        self.require_fold(fold)
        return read_tucker_json(self.fold_path(fold) / TUCKER_JSON)

    def compressed_from(self, original: ModelFolder, fold: Fold) -> tuple[dict[str, Any], str]:
        """This compressed fold's record and ``original``'s checkpoint sha256, after checking that the fold was
        compressed from exactly that checkpoint (plans and labels alike are not enough: another training run has
        them too)."""
        record = self.tucker_record(fold)
        original.require_fold(fold)
        checkpoint = original.checkpoint_path(fold)
        digest = sha256_file(checkpoint)
        if record["source"]["sha256"] != digest:
            raise ModelFolderError(f"{self.path} was compressed from another checkpoint than {checkpoint} (sha256 "
                                   f"differs); pass the original it was made from ({record['source'].get('folder')})")
        return record, digest

    def load_checkpoint(self, fold: Fold, trust: bool = False) -> dict[str, Any]:
        self.require_fold(fold)
        return load_checkpoint(self.checkpoint_path(fold), trust=trust)

    def fold_structure(self, fold: Fold) -> tuple[nn.Module, dict[str, Any] | None]:
        """The network of ``fold`` with its factorised layers (or pruned channel counts) in place (weights not loaded), and its
        ``tucker.json`` record (``None`` for an original fold)."""
        self.require_fold(fold)
        network = self.build_network()
        if not self.is_compressed_fold(fold):
            return network, None
        record = self.tucker_record(fold)
        source = str(self.fold_path(fold) / TUCKER_JSON)
        if is_pruned(record):
            apply_pruning_record(network, record["pruning"], source, self.example_input())
        else:
            apply_plans(network, layer_plans(record), source=source)
        return network, record

    def load_original(self, fold: Fold, trust: bool = False) -> tuple[nn.Module, dict[str, Any]]:
        """The eval-mode network of an original fold and its checkpoint (for the training metadata)."""
        checkpoint = self.load_checkpoint(fold, trust)
        network = self.build_network()
        load_original_weights(network, checkpoint["network_weights"], self.checkpoint_path(fold))
        return network.eval(), checkpoint

    def load_network(self, fold: Fold = 0, trust: bool = False) -> nn.Module:
        """The ready, eval-mode network of ``fold`` on the CPU, original or compressed."""
        if not self.is_compressed_fold(fold):
            return self.load_original(fold, trust)[0]
        network, record = self.fold_structure(fold)
        load_weights(network, self.fold_path(fold) / WEIGHTS_FILE, record.get("weights_sha256"))
        return network.eval()


@dataclass(frozen=True)
class ModelGrid:
    """A CT on a model's grid: the canonical volume it came from, the resampled image, how to restore the input's
    orientation, and the spacing (mm, array order)."""

    canonical: Volume
    image: np.ndarray
    reorientation: Reorientation
    spacing: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.image.shape)


def load_original_weights(network: nn.Module, weights: dict[str, torch.Tensor], source: Path) -> None:
    """Strictly load an nnU-Net state dict, naming the mismatch when it does not fit the plans."""
    problem = state_mismatch(network.state_dict(), weights)
    if problem:
        raise CheckpointError(f"weights in {source} do not fit the architecture in plans.json ({problem}); "
                              "the checkpoint belongs to other plans")
    if (name := non_finite(weights)) is not None:
        raise CheckpointError(f"weights in {source} hold NaN or infinite values ({name}); the training diverged or "
                              "the file is damaged: use a checkpoint of a successful training")
    network.load_state_dict(weights, strict=True)


def load_network(folder: str | Path, fold: Fold = 0, trust: bool = False) -> nn.Module:
    """The ready, eval-mode network of an original or compressed nnU-Net v2 model folder."""
    return ModelFolder.open(folder).load_network(fold, trust=trust)
