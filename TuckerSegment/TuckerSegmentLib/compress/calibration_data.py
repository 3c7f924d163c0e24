"""Calibration inputs from the user's own CT volumes: network-ready patches, as inference would see them.

Each volume is reoriented to canonical RAS, resampled to the model spacing and normalised by the
model's own scheme (nnU-Net's ``CTNormalization`` with the plans' intensity statistics), then cut
into patch-sized windows on nnU-Net's sliding-window grid, of which an evenly spread subset is kept.
No labels are read.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window
from nnunetv2.preprocessing.normalization import default_normalization_schemes

from ..errors import ModelFolderError
from ..image.geometry import resample_image, resampled_shape, to_canonical
from ..image.volume import Volume, checked_volume
from ..nnunet.model_folder import ModelFolder


def _normalised(model: ModelFolder, image: np.ndarray) -> np.ndarray:
    scheme_name = model.configuration_manager.normalization_schemes[0]
    scheme = getattr(default_normalization_schemes, scheme_name, None)
    if scheme is None:
        raise ModelFolderError(f"{model.path}: normalisation {scheme_name!r} is not one of nnU-Net's default schemes; "
                               "calibration supports those (CT, z-score, rescaling)")
    properties = model.plans_manager.foreground_intensity_properties_per_channel["0"]
    return scheme(use_mask_for_norm=False, intensityproperties=properties).run(image.astype(np.float32))


def calibration_patches(model: ModelFolder, volumes: Sequence[Volume | str | Path],
                        patches_per_volume: int = 4) -> Iterator[torch.Tensor]:
    """(1, 1, *patch) float tensors from ``volumes`` for ``compress_network(calibration=...)``."""
    patch = tuple(model.patch_size)
    spacing = np.asarray(model.configuration_manager.spacing, dtype=float)
    target = spacing[list(model.plans_manager.transpose_backward)]
    for item in volumes:
        canonical, _ = to_canonical(checked_volume(item))
        shape = resampled_shape(canonical.array.shape, canonical.spacing[::-1], target)
        image = _normalised(model, resample_image(canonical.array, shape))
        padded = np.pad(image, [(0, max(0, p - s)) for p, s in zip(patch, image.shape, strict=True)],
                        constant_values=float(image.min()))
        steps = compute_steps_for_sliding_window(padded.shape, patch, 0.5)
        corners = [(a, b, c) for a in steps[0] for b in steps[1] for c in steps[2]]
        chosen = np.linspace(0, len(corners) - 1, min(patches_per_volume, len(corners))).round().astype(int)
        for index in chosen:
            a, b, c = corners[index]
            window = padded[a:a + patch[0], b:b + patch[1], c:c + patch[2]]
            yield torch.from_numpy(np.ascontiguousarray(window))[None, None]
