"""The scans an evaluation segments and the cases it scores, from folders of images and labels.

Images and labels are paired by nnU-Net's naming (``case_0000.nii.gz`` is channel 0 of case ``case``, its
label ``case.nii.gz``) or by identical file names. A scan is segmented once per model; each of its
cases is a region scored on its own (a whole file is one case; the bundled demo scores the held-out
blocks of its one CT as cases).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VolumeError
from ..image.volume import SEG_NRRD, VOLUME_SUFFIXES, Volume, read_volume
from ..paths import checked_path

CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
WHOLE = "whole"


def _stem(path: Path) -> tuple[str, str]:
    """(name without its volume suffix, the suffix)."""
    lower = path.name.lower()
    suffix = next(s for s in VOLUME_SUFFIXES if lower.endswith(s))
    return path.name[: -len(suffix)], suffix


def _volume_files(folder: Path, role: str) -> list[Path]:
    folder = checked_path(folder, VolumeError, f"{role} folder")
    if not folder.is_dir():
        raise VolumeError(f"the {role} folder {folder} does not exist or is not a folder; pass a folder of NIfTI or "
                          "NRRD files")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)
                   and not p.name.lower().endswith(SEG_NRRD))
    if not files:
        raise VolumeError(f"the {role} folder {folder} holds no NIfTI or NRRD file; pass the folder of your "
                          f"{role} (nnU-Net naming: case_0000.nii.gz images, case.nii.gz labels)")
    return files


@dataclass
class Scan:
    """One image to segment, its reference labels (file or label map on the image grid, or ``None``) and the
    cases scored in it: ``regions`` maps a case name to a bool mask (k, j, i); empty: the whole scan."""

    name: str
    image: Path | Volume
    reference: Path | np.ndarray | None = None
    regions: dict[str, np.ndarray] = field(default_factory=dict)

    def volume(self) -> Volume:
        return self.image if isinstance(self.image, Volume) else read_volume(self.image)

    def cases(self, shape: tuple[int, ...]) -> dict[str, np.ndarray | None]:
        """Case name -> region (``None``: every voxel)."""
        for name, mask in self.regions.items():
            if mask.shape != shape or mask.dtype != np.bool_:
                raise VolumeError(f"case {name!r} of {self.name} is not a bool mask of the scan's shape {shape}")
        return dict(self.regions) if self.regions else {self.name: None}


def pair_scans(images: str | Path, labels: str | Path | None = None, channels: int = 1) -> list[Scan]:
    """Scans from an image folder (and a label folder), paired by nnU-Net's naming or by identical names."""
    if channels != 1:
        raise VolumeError(f"the model takes {channels} input channels; TuckerSegment evaluates single-channel CT "
                          "models")
    files = _volume_files(Path(images), "images")
    stems = {path: _stem(path)[0] for path in files}
    nnunet = all(CHANNEL.match(stem) for stem in stems.values())
    scans: dict[str, Path] = {}
    for path, stem in stems.items():
        if nnunet:
            match = CHANNEL.match(stem)
            assert match is not None
            if int(match["channel"]) != 0:
                raise VolumeError(f"{path.name} is input channel {int(match['channel'])}, but the model takes one "
                                  "(CT); remove it from the images folder")
            stem = match["case"]
        if stem in scans:
            raise VolumeError(f"case {stem!r} has two images ({scans[stem].name}, {path.name}); keep one")
        scans[stem] = path
    if labels is None:
        return [Scan(name, path) for name, path in scans.items()]
    label_files = _volume_files(Path(labels), "labels")
    by_name = {path.name: path for path in label_files}
    by_stem = {_stem(path)[0]: path for path in label_files}
    paired, missing = [], []
    for name, path in scans.items():
        label = by_name.get(path.name) or by_stem.get(name)
        if label is None:
            missing.append(name)
        paired.append(Scan(name, path, label))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise VolumeError(f"no label file for {shown} in {Path(labels)}; name each label like its image, or "
                          "case.nii.gz for case_0000.nii.gz (nnU-Net)")
    return paired


def label_classes(dataset_json: Mapping[str, Any]) -> tuple[dict[int, str], int | None]:
    """The classes a model's dataset.json defines (value -> name, background and ``ignore`` left out) and
    the ignore label's value (``None`` without one)."""
    classes, ignore = {}, None
    for name, value in dataset_json["labels"].items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise VolumeError(f"dataset.json label {name!r} is {value!r}: region-based labels cannot be evaluated")
        if name == "ignore":
            ignore = value
        elif value != 0:
            classes[value] = name
    return classes, ignore


def reference_labels(scan: Scan, volume: Volume, classes: Mapping[int, str], ignore: int | None) -> np.ndarray:
    """The scan's reference label map, checked against its image and the model's label values."""
    if isinstance(scan.reference, np.ndarray):
        labels, source = scan.reference, f"the reference labels of {scan.name}"
    else:
        assert scan.reference is not None
        reference = read_volume(scan.reference, check=False)
        labels, source = reference.array, str(scan.reference)
        if reference.array.shape == volume.array.shape and not np.allclose(reference.ijk_to_ras, volume.ijk_to_ras,
                                                                            atol=1e-3):
            raise VolumeError(f"{source} is not on the grid of its image {scan.name} (origin, spacing or "
                              "orientation differ); resample the labels onto the image")
    if labels.shape != volume.array.shape:
        raise VolumeError(f"{source} has {labels.shape} voxels (k, j, i), its image {volume.array.shape}; "
                          "give the labels on the image's grid")
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            raise VolumeError(f"{source} holds non-integer values; give a label map (0 = background)")
        labels = labels.astype(np.int64)
    known = {0, *classes, *(() if ignore is None else (ignore,))}
    unknown = sorted(set(np.unique(labels).tolist()) - known)
    if unknown:
        raise VolumeError(f"{source} holds label values {unknown[:5]} that the model's dataset.json does not define; "
                          "give labels numbered as the model's dataset.json")
    return labels.astype(np.int64, copy=False)
