"""Volumes handed between processes (Slicer's Logic and the worker) as ``.npz`` files: voxels and their
IJK-to-RAS matrix, never pickles."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ProtocolError
from .volume import Volume, read_volume

TRANSFER_SUFFIX = ".npz"


def save_volume(path: Path, voxels: np.ndarray, ijk_to_ras: np.ndarray) -> None:
    """Voxels (k, j, i) and their IJK-to-RAS matrix, as the worker reads them (``load_volume``)."""
    np.savez(path, voxels=np.ascontiguousarray(voxels), ijk_to_ras=np.asarray(ijk_to_ras, dtype=np.float64))


def load_volume(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(voxels, ijk_to_ras) from ``save_volume``'s file; no pickled objects are read."""
    with np.load(Path(path), allow_pickle=False) as data:
        voxels, matrix = data["voxels"], data["ijk_to_ras"]
    if voxels.ndim != 3 or matrix.shape != (4, 4):
        raise ProtocolError(f"{path} does not hold a 3D volume and a 4x4 matrix")
    return voxels, matrix


def read_ct(path: str | Path) -> Volume | Path:
    """A CT named in a request: a transfer file read into a ``Volume``; any other file stays a path (the engine
    reads NIfTI/NRRD itself)."""
    path = Path(path).expanduser()
    return Volume(*load_volume(path)) if path.suffix == TRANSFER_SUFFIX else path


def as_volume(ct: Volume | Path) -> Volume:
    """What ``read_ct`` gave, read into a ``Volume`` (a NIfTI/NRRD file is read here)."""
    return ct if isinstance(ct, Volume) else read_volume(ct)
