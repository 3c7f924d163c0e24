"""Calibration inputs from the user's own CT volumes: network-ready patches, as inference would see them.

Each volume is reoriented to canonical RAS, resampled to the model spacing and normalised by the
model's own scheme (nnU-Net's ``CTNormalization`` with the plans' intensity statistics), then cut
into patch-sized windows on nnU-Net's sliding-window grid, of which an evenly spread subset is kept.
A ``CalibrationVolume`` may restrict calibration to part of its volume (e.g. the training half of
``image.holdout.holdout_mask``): its mask follows the image (nearest neighbour), windows without a usable
voxel are passed over, and each patch carries its part of the mask. Calibration reads no labels;
``labelled_patches`` (Taylor pruning) cuts label maps at the same windows.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.preprocessing.normalization import default_normalization_schemes

from ..errors import ModelFolderError, VolumeError
from ..image.geometry import resample_labels_nearest, to_canonical
from ..image.volume import Volume, check_volume, read_volume
from ..nnunet.model_folder import ModelFolder
from ..tucker.calibration import CalibrationPatch


LABEL_MAP_MAX = 1024  # a label map: whole values from 0, below this, few distinct ones (a CT holds air at -1000)


@dataclass(frozen=True, eq=False)
class CalibrationVolume:
    """A CT volume and the voxels calibration may use: ``mask`` (k, j, i) bool on the volume's grid, True =
    usable; ``None``: all of them."""

    volume: Volume
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.volume, Volume):
            raise VolumeError(f"a CalibrationVolume holds a Volume, not {type(self.volume).__name__}; read files "
                              "with read_volume")
        if self.mask is None:
            return
        if not isinstance(self.mask, np.ndarray) or self.mask.dtype != np.bool_:
            raise VolumeError(f"a calibration mask must be a bool array, not {getattr(self.mask, 'dtype', type(self.mask))}"
                              "; pass True where calibration may use the voxel")
        if self.mask.shape != self.volume.array.shape:
            raise VolumeError(f"a calibration mask has shape {self.mask.shape}, its volume {self.volume.array.shape} "
                              "(k, j, i); pass a mask on the volume's grid")
        if not self.mask.any():
            raise VolumeError("a calibration mask selects no voxel; mark the voxels calibration may use with True")


def checked_calibration(item: CalibrationVolume | Volume | str | Path) -> CalibrationVolume:
    """``item`` as a ``CalibrationVolume`` whose volume passed ``check_volume`` (files are read) and is not a label
    map (calibrating or distilling on one only warned, then shaped the ranks to class numbers)."""
    name = str(item) if isinstance(item, (str, Path)) else "a calibration volume"
    volume = item.volume if isinstance(item, CalibrationVolume) else \
        item if isinstance(item, Volume) else read_volume(item, check=False)
    array = volume.array
    if array.size and array.min() >= 0 and array.max() < LABEL_MAP_MAX \
            and len(np.unique(array[::4, ::4, ::4])) <= LABEL_MAP_MAX // 4 \
            and (np.issubdtype(array.dtype, np.integer) or bool(np.all(array == np.round(array)))):
        raise VolumeError(f"{name} looks like a label map (whole values {array.min():g} … {array.max():g}, none "
                          "below 0), not a CT in Hounsfield units; pass CT volumes for calibration (label maps are "
                          "for --labels)")
    check_volume(volume, name)
    return item if isinstance(item, CalibrationVolume) else CalibrationVolume(volume)


def _normalised(model: ModelFolder, image: np.ndarray) -> np.ndarray:
    scheme_name = model.configuration_manager.normalization_schemes[0]
    scheme = getattr(default_normalization_schemes, scheme_name, None)
    if scheme is None:
        raise ModelFolderError(f"{model.path}: normalisation {scheme_name!r} is not one of nnU-Net's default schemes; "
                               "calibration supports those (CT, z-score, rescaling)")
    properties = model.plans_manager.foreground_intensity_properties_per_channel["0"]
    return scheme(use_mask_for_norm=False, intensityproperties=properties).run(image.astype(np.float32))


def _padded(array: np.ndarray, patch: tuple[int, ...], value: float | bool) -> np.ndarray:
    return np.pad(array, [(0, max(0, p - s)) for p, s in zip(patch, array.shape, strict=True)], constant_values=value)


def _on_model_grid(model: ModelFolder, source: CalibrationVolume) -> tuple[np.ndarray, tuple[int, ...], np.ndarray]:
    """The volume as inference sees it (canonical RAS, trilinear at the model spacing, normalised), its shape,
    and the model spacing in array order."""
    grid = model.onto_grid(source.volume)
    return _normalised(model, grid.image), grid.shape, grid.spacing


def _mask_on_model_grid(source: CalibrationVolume, shape: tuple[int, ...]) -> np.ndarray:
    oriented, _ = to_canonical(Volume(source.mask, source.volume.ijk_to_ras))
    return resample_labels_nearest(oriented.array, shape)


def network_ready_volume(model: ModelFolder, item: CalibrationVolume | Volume | str | Path,
                         number: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """One whole volume as the network sees it (the grid and normalisation of ``calibration_patches``), padded
    to at least the patch size, and the voxels that may be used (bool, same shape: the mask followed by
    nearest neighbour, or every voxel; padding never): for training on random patches."""
    source = checked_calibration(item)
    patch = tuple(model.patch_size)
    image, shape, target = _on_model_grid(model, source)
    usable = np.ones(shape, dtype=bool) if source.mask is None else _mask_on_model_grid(source, shape)
    if not usable.any():
        raise VolumeError(f"the calibration mask of volume {number} keeps no voxel at the model's spacing "
                          f"({'×'.join(f'{s:g}' for s in target)} mm); mark a larger region")
    return _padded(image, patch, float(image.min())), _padded(usable, patch, False)


def _windows(model: ModelFolder, source: CalibrationVolume, number: int, patches_per_volume: int,
             labels: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]:
    """(image, mask, labels) patches of one volume on nnU-Net's sliding-window grid at the model spacing: the
    image trilinear and normalised, the mask and ``labels`` (on the volume's grid) nearest neighbour."""
    patch = tuple(model.patch_size)
    image, shape, target = _on_model_grid(model, source)
    padded = _padded(image, patch, float(image.min()))
    steps = compute_steps_for_sliding_window(padded.shape, patch, 0.5)
    corners = [(a, b, c) for a in steps[0] for b in steps[1] for c in steps[2]]
    mask = label_array = None
    if source.mask is not None:
        mask = _padded(_mask_on_model_grid(source, shape), patch, False)
        corners = [(a, b, c) for a, b, c in corners if mask[a:a + patch[0], b:b + patch[1], c:c + patch[2]].any()]
        if not corners:
            raise VolumeError(f"the calibration mask of volume {number} keeps no voxel at the model's spacing "
                              f"({'×'.join(f'{s:g}' for s in target)} mm); mark a larger region")
    if labels is not None:
        oriented, _ = to_canonical(Volume(labels, source.volume.ijk_to_ras))
        label_array = _padded(resample_labels_nearest(oriented.array, shape), patch, IGNORE_LABEL)
        if mask is not None:
            label_array = np.where(mask, label_array, IGNORE_LABEL)
    chosen = np.linspace(0, len(corners) - 1, min(patches_per_volume, len(corners))).round().astype(int)
    for index in chosen:
        a, b, c = corners[index]
        window = (slice(a, a + patch[0]), slice(b, b + patch[1]), slice(c, c + patch[2]))
        yield (padded[window], None if mask is None else mask[window],
               None if label_array is None else label_array[window])


def calibration_patches(model: ModelFolder, volumes: Sequence[CalibrationVolume | Volume | str | Path],
                        patches_per_volume: int = 4) -> Iterator[CalibrationPatch]:
    """Patches of (1, 1, *patch) float images (and bool masks, for masked volumes) from ``volumes`` for
    ``compress_network(calibration=...)``."""
    for number, item in enumerate(volumes, start=1):
        for image, mask, _ in _windows(model, checked_calibration(item), number, patches_per_volume):
            yield CalibrationPatch(torch.from_numpy(np.ascontiguousarray(image))[None, None],
                                   None if mask is None else torch.from_numpy(np.ascontiguousarray(mask))[None, None])


IGNORE_LABEL = -100  # voxels a labelled patch leaves out of the loss (outside the mask, padding, the ignore label)


def _label_array(model: ModelFolder, item: Volume | np.ndarray | str | Path, source: CalibrationVolume,
                 number: int) -> np.ndarray:
    """A label map on ``source``'s grid as int64 class indices (the dataset's ignore label as ``IGNORE_LABEL``),
    every value checked against dataset.json."""
    if isinstance(item, (str, Path)):
        item = read_volume(item, check=False)
    if isinstance(item, Volume):
        if item.array.shape != source.volume.array.shape or not np.allclose(item.ijk_to_ras, source.volume.ijk_to_ras,
                                                                            atol=1e-3):
            raise VolumeError(f"label map {number} is not on the grid of calibration CT {number} (shape "
                              f"{item.array.shape} vs {source.volume.array.shape}); pass each CT's own label map")
        array = item.array
    elif isinstance(item, np.ndarray):
        array = item
    else:
        raise VolumeError(f"label map {number} is a {type(item).__name__}; pass a label-map Volume, file or array")
    if array.shape != source.volume.array.shape:
        raise VolumeError(f"label map {number} has shape {array.shape}, its CT {source.volume.array.shape} (k, j, i); "
                          "pass each CT's own label map")
    if not np.issubdtype(array.dtype, np.integer) and not np.all(np.equal(np.mod(array, 1), 0)):
        raise VolumeError(f"label map {number} holds fractional values; pass a label map (whole numbers)")
    manager = model.plans_manager.get_label_manager(model.dataset_json)
    if manager.has_regions:
        raise ModelFolderError(f"{model.path} is trained on regions; Taylor pruning needs one class per voxel")
    classes = set(range(model.num_outputs))
    ignore = manager.ignore_label
    values = np.unique(array).astype(np.int64)
    unknown = sorted(set(values.tolist()) - classes - ({int(ignore)} if ignore is not None else set()))
    if unknown:
        raise VolumeError(f"label map {number} holds value(s) {', '.join(map(str, unknown[:5]))}, not labels of "
                          f"{model.path.name} (dataset.json labels 0..{model.num_outputs - 1}); pass label maps of "
                          "this model's structures")
    result = array.astype(np.int64)
    if ignore is not None:
        result[result == int(ignore)] = IGNORE_LABEL
    return result


def labelled_patches(model: ModelFolder, volumes: Sequence[CalibrationVolume | Volume | str | Path],
                     labels: Sequence[Volume | np.ndarray | str | Path],
                     patches_per_volume: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(image (1, 1, *patch) float, labels (1, *patch) int64) pairs cut from ``volumes`` and their label maps (one
    per volume, on its grid, values from dataset.json) at the windows ``calibration_patches`` cuts; voxels outside
    a ``CalibrationVolume``'s mask, padding and the dataset's ignore label become ``IGNORE_LABEL``."""
    if len(labels) != len(volumes):
        raise VolumeError(f"{len(labels)} label map(s) for {len(volumes)} calibration CT(s); pass one label map per CT, "
                          "in the same order")
    sources = [checked_calibration(item) for item in volumes]
    arrays = [_label_array(model, item, source, number)
              for number, (item, source) in enumerate(zip(labels, sources, strict=True), start=1)]
    pairs = []
    for number, (source, array) in enumerate(zip(sources, arrays, strict=True), start=1):
        for image, _, label_patch in _windows(model, source, number, patches_per_volume, array):
            pairs.append((torch.from_numpy(np.ascontiguousarray(image))[None, None],
                          torch.from_numpy(np.ascontiguousarray(label_patch))[None]))
    return pairs
