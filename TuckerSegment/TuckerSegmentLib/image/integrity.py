"""Whether an image file holds all the data its header promises.

SimpleITK reads a truncated NIfTI (``.nii`` cut short, or a ``.nii.gz`` whose stream ends early) without
complaint and fills the missing voxels with zeros; a segmentation of that is silently wrong. Here the
stream is read to its end (a gzip stream must end properly) and its length compared with the header's
data offset plus voxel count times voxel size. Other formats are read back whole (their readers refuse
truncated data), which is also how every written image is checked before it is renamed into place.
"""
from __future__ import annotations

import gzip
import io
import math
import zlib
from pathlib import Path

import nibabel as nib
import SimpleITK as sitk

CHUNK = 1 << 22
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nifti_header(head: bytes) -> nib.Nifti1Header | None:
    """The NIfTI-1 or NIfTI-2 header at the start of ``head`` (either byte order), or ``None``."""
    for cls, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        for order in ("<", ">"):
            if len(head) >= size and int.from_bytes(head[:4], "little" if order == "<" else "big") == size:
                return cls.from_fileobj(io.BytesIO(head[:size]), check=False)
    return None


def nifti_problem(path: Path) -> str | None:
    """Why the NIfTI file ``path`` is incomplete or unreadable, or ``None`` when its data is whole."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as stream:
            head = stream.read(540)
            total = len(head)
            while chunk := stream.read(CHUNK):
                total += len(chunk)
    except EOFError:
        return "its compressed stream ends early: the file was cut short"
    except (OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        return f"it cannot be decompressed ({exc})"
    header = _nifti_header(head)
    if header is None:
        return "it has no NIfTI header"
    try:
        expected = int(header.get_data_offset()) + math.prod(header.get_data_shape()) * header.get_data_dtype().itemsize
    except (ValueError, TypeError) as exc:  # nibabel rejects an impossible header
        return f"its header is invalid ({exc})"
    if total < expected:
        return f"it holds {total} bytes where its header announces {expected}: the file was cut short"
    return None


def image_problem(path: Path) -> str | None:
    """Why the image file ``path`` cannot be read whole, or ``None``."""
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return nifti_problem(path)
    try:
        sitk.ReadImage(str(path))
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        return f"it cannot be read back ({lines[-1] if lines else 'unreadable'})"
    return None
