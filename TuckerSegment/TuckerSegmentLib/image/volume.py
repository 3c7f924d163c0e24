"""CT volumes in Slicer's convention: voxels in (k, j, i) order and a 4×4 IJK→RAS matrix.

``read_volume`` accepts NIfTI and NRRD (SimpleITK reads both, in LPS; we convert to RAS).
``check_volume`` refuses what cannot be segmented and warns about what looks wrong.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import VolumeError
from ..paths import checked_path
from .integrity import NIFTI_SUFFIXES, nifti_problem

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
AIR_BELOW_HU = -500.0  # a CT field of view contains air; its minimum lies below this


class IntensityWarning(UserWarning):
    """The volume's intensities do not look like CT in Hounsfield units."""


@dataclass
class Volume:
    """A scalar 3D image. ``array[k, j, i]`` is the voxel at IJK (i, j, k); ``ijk_to_ras`` maps
    homogeneous IJK indices to RAS millimetres (what Slicer's ``GetIJKToRASMatrix`` gives)."""

    array: np.ndarray
    ijk_to_ras: np.ndarray

    def __post_init__(self) -> None:
        self.ijk_to_ras = np.asarray(self.ijk_to_ras, dtype=np.float64)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in mm."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    def with_array(self, array: np.ndarray) -> Volume:
        """Another image on the same grid (e.g. a label map)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the grid {self.array.shape}")
        return Volume(array, self.ijk_to_ras.copy())


def check_volume(volume: Volume, name: str = "volume") -> None:
    """Raise ``VolumeError`` for input that cannot be segmented; warn when it does not look like CT."""
    array, matrix = volume.array, volume.ijk_to_ras
    if array.ndim != 3:
        raise VolumeError(f"{name} has {array.ndim} dimensions; segmentation needs a 3D scalar CT volume")
    if array.size == 0:
        raise VolumeError(f"{name} is empty (shape {array.shape}); load a CT volume with voxels")
    if min(array.shape) < 2:
        raise VolumeError(f"{name} is a single slice (shape {array.shape}, k j i); segmentation needs a 3D CT "
                          "volume with several slices, not a 2D image")
    if not (np.issubdtype(array.dtype, np.number) and not np.iscomplexobj(array)) or array.dtype == np.bool_:
        raise VolumeError(f"{name} has voxel type {array.dtype}; a CT volume holds real numbers (HU)")
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)) or abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
        raise VolumeError(f"{name} has no valid IJK→RAS matrix (spacing zero or geometry not finite); "
                          "fix the image header")
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise VolumeError(f"{name} has {bad} NaN or infinite voxels; replace them (e.g. with -1024 HU) "
                              "before segmenting")
    low, high = float(array.min()), float(array.max())
    if high - low < 1e-6:
        raise VolumeError(f"{name} is constant ({low}); there is nothing to segment")
    if low > AIR_BELOW_HU or high < 100 or low < -10000 or high > 40000:
        warnings.warn(f"{name} intensities span {low:g} … {high:g}: not CT in Hounsfield units (air near -1000, "
                      "bone above 300); the models expect HU and may segment nothing useful (MR, PET or CT "
                      "without its rescale slope/intercept?)", IntensityWarning, stacklevel=2)


def _image_to_volume(image: sitk.Image, source: str) -> Volume:
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{source} has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
                          "segmentation needs a scalar CT volume")
    if image.GetDimension() != 3:
        raise VolumeError(f"{source} is a {image.GetDimension()}D image; segmentation needs a 3D CT volume")
    direction = np.array(image.GetDirection()).reshape(3, 3)
    ijk_to_lps = np.eye(4)
    ijk_to_lps[:3, :3] = direction * np.array(image.GetSpacing())
    ijk_to_lps[:3, 3] = image.GetOrigin()
    return Volume(sitk.GetArrayFromImage(image), LPS_TO_RAS @ ijk_to_lps)


def itk_reason(error: RuntimeError) -> str:
    """The reason in a SimpleITK/ITK exception, without its source location and object address."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    itk = next((line for line in lines if "ITK ERROR" in line), None)
    if itk is None:
        return lines[-1] if lines else "unreadable"
    reason = re.sub(r"^.*ITK ERROR: [^:]*: ", "", itk).split(". Refusing")[0].rstrip(".")
    if "direction" in reason.lower():
        reason += ": the file's orientation (direction matrix) is singular, fix its header"
    return reason


def read_volume(path: str | Path, check: bool = True) -> Volume:
    """A NIfTI or NRRD file as a ``Volume``; ``check`` applies ``check_volume`` (for CT input)."""
    path = checked_path(path, VolumeError, "input")
    if not path.is_file():
        raise VolumeError(f"input {path} does not exist or is not a file; pass a NIfTI (.nii.gz) or NRRD CT volume")
    if path.name.lower().endswith(NIFTI_SUFFIXES) and (problem := nifti_problem(path)) is not None:
        raise VolumeError(f"cannot read {path}: {problem}; copy or export it again")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise VolumeError(f"cannot read {path} as an image ({itk_reason(exc)}); pass a NIfTI (.nii.gz) or NRRD CT "
                          "volume") from exc
    volume = _image_to_volume(image, str(path))
    if check:
        check_volume(volume, str(path))
    return volume


def volume_to_image(volume: Volume) -> sitk.Image:
    """A SimpleITK image (LPS geometry) of ``volume``."""
    image = sitk.GetImageFromArray(volume.array)
    ijk_to_lps = LPS_TO_RAS @ volume.ijk_to_ras
    spacing = np.linalg.norm(ijk_to_lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((ijk_to_lps[:3, :3] / spacing).flatten().tolist())
    image.SetOrigin(ijk_to_lps[:3, 3].tolist())
    return image


VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SEG_NRRD = ".seg.nrrd"


def checked_volume(volume: Volume | str | Path) -> Volume:
    """``volume`` after ``check_volume``, or the file read (and checked) by ``read_volume``."""
    if isinstance(volume, Volume):
        check_volume(volume)
        return volume
    return read_volume(volume)


def volume_files(inputs: str | Path | list[str | Path]) -> list[Path]:
    """The CT files to segment: the paths given, or the volume files of a folder (``.seg.nrrd`` excluded)."""
    paths = [checked_path(p, VolumeError, "input") for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)]
    if len(paths) == 1 and paths[0].is_dir():
        folder = paths[0]
        paths = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
                       and not p.name.lower().endswith(SEG_NRRD))
        if not paths:
            raise VolumeError(f"{folder} holds no NIfTI or NRRD volume; pass CT files or a folder of them")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing or not paths:
        raise VolumeError(f"input(s) not found: {', '.join(missing) or 'none given'}; pass existing NIfTI or NRRD "
                          "CT files or a folder of them")
    return paths
