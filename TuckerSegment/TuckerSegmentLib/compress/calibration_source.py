"""Where a compression's calibration comes from: the user's CT volumes, the bundled sample chest CT (the
default for CT models: weight-only ranks collapse on real networks, see docs/policies.md), or nothing
(weight-only, the paper's data-free rule, only when asked for)."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import slicerio

from ..errors import ModelFolderError, PolicyError
from ..image.volume import Volume, read_volume
from ..nnunet.model_folder import ModelFolder
from .calibration_data import CalibrationVolume, checked_calibration

SAMPLE_CT = "CTChest4.nrrd"  # slicerio's chest CT, 128×128×34 voxels at 3.05×3.05×10 mm
CT_NORMALIZATION = "CTNormalization"


def sample_ct() -> Path:
    """The sample chest CT that ``slicerio`` ships."""
    try:
        return Path(slicerio.get_testdata_file(SAMPLE_CT))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"the bundled sample CT {SAMPLE_CT} is missing ({exc}); reinstall slicerio, or pass "
                               "calibration volumes (--calibration CT...)") from exc


def calibration_name(item: CalibrationVolume | Volume | str | Path, number: int) -> str:
    if isinstance(item, (str, Path)):
        return Path(item).name
    if isinstance(item, CalibrationVolume) and item.mask is not None:
        return f"volume {number} ({item.mask.mean():.0%} of its voxels)"
    return f"volume {number}"


def resolve_calibration(model: ModelFolder, calibration: Sequence[CalibrationVolume | Volume | str | Path] | None,
                        weight_only: bool = False) -> tuple[list[CalibrationVolume] | None, dict[str, Any]]:
    """The volumes ``model`` is calibrated on (``None``: weight-only) and their record for ``tucker.json``
    (source ``user``, ``sample`` or ``none``, short volume names, one line of description). Without
    ``calibration`` a CT model is calibrated on the sample CT; any other model needs volumes or ``weight_only``."""
    if not isinstance(weight_only, bool):
        raise PolicyError(f"weight_only is true or false, not {weight_only!r}")
    if calibration and weight_only:
        raise PolicyError("weight-only compression uses no calibration volumes; pass calibration volumes "
                          "(--calibration CT...) or ask for weight-only (--weight-only), not both")
    if calibration:
        volumes = [checked_calibration(item) for item in calibration]  # bad files fail before any work
        return volumes, {"source": "user", "volumes": [calibration_name(item, n) for n, item in enumerate(calibration, start=1)],
                         "description": f"your {len(volumes)} CT volume(s)"}
    if weight_only:
        return None, {"source": "none", "volumes": [],
                      "description": "weight-only: ranks and factors from the weights alone (the paper's data-free rule)"}
    scheme = model.configuration_manager.normalization_schemes[0]
    if scheme != CT_NORMALIZATION:
        raise PolicyError(f"{model.path}: calibration volumes are required for this model (its normalisation is "
                          f"{scheme}, not CT, so the bundled sample CT does not fit); pass images like the ones it "
                          "segments (--calibration CT...) or ask for weight-only (--weight-only)")
    return [CalibrationVolume(read_volume(sample_ct()))], {
        "source": "sample", "volumes": [SAMPLE_CT],
        "description": "the bundled sample chest CT (no calibration volumes given)"}


INT8_PATCHES_PER_VOLUME = 8  # int8 statistics: patches of the sample CT (every one the grid gives, up to this)


def int8_calibration(model: ModelFolder) -> list[Any]:
    """Network-ready patches of the bundled sample CT that ``model``'s int8 form is quantized on (as its ranks are
    calibrated by default): (1, 1, *patch) float32 arrays."""
    from .calibration_data import calibration_patches
    return [patch.image.numpy() for patch in calibration_patches(model, [sample_ct()], INT8_PATCHES_PER_VOLUME)]
