"""An int8 form stored in a model folder, so that it runs without converting or quantizing again.

``<model>/int8/fold_<f>/`` holds the quantized network as OpenVINO IR (``model.xml``, ``model.bin``: data, never
code) and ``int8.json``: the sha256 of both files, the source it was quantized from (the sha256 of the fold's
files and ``plans.json`` with the patch shape, ``source_digest``), the calibration, the label-free agreement
with the float network and the convolutions kept in float. ``compress.int8_form`` writes it (build-variants,
``compress --int8``); the Segmenter reads it for precision int8. A form whose files or source differ is refused
in one line; the bytes checked are the bytes OpenVINO reads.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_output_dir
from ..checksums import sha256_bytes, sha256_file
from ..errors import TuckerSegmentError

FOLDER = "int8"
RECORD = "int8.json"
FORMAT = 1
IR_FILES = ("model.xml", "model.bin")


@dataclass(frozen=True)
class StoredInt8:
    """A verified stored int8 form: its IR bytes and its record."""

    xml: bytes
    weights: bytes
    record: dict[str, Any]

    @property
    def digest(self) -> str:
        return self.record["files"]["model.bin"]

    def describe(self) -> str:
        kept = self.record["float_layers"]
        agreement = self.record.get("agreement")
        return (f"quantized when built on {self.record['calibration']}, {len(kept)} convolution(s) in float"
                + (f", agreement with f32 {agreement:.4f} on validation patches" if agreement is not None else ""))


def form_folder(model: Path, fold: str) -> Path:
    return model / FOLDER / f"fold_{fold}"


def source_digest(files: list[Path], patch: tuple[int, ...] | list[int]) -> str:
    """What a stored form was made from: the sha256 of ``files``' contents and the patch shape."""
    digests = sorted(sha256_file(f) for f in files)
    return hashlib.sha256(json.dumps([digests, [int(p) for p in patch]]).encode()).hexdigest()


def _checked_record(path: Path) -> dict[str, Any]:
    """``int8.json`` with every field of the right type; one line naming the file otherwise."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TuckerSegmentError(f"{path} cannot be read ({exc}); rebuild the int8 form or delete {path.parent}") from exc
    files = record.get("files") if isinstance(record, dict) else None
    ok = (isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("source"), str)
          and isinstance(files, dict) and all(isinstance(files.get(name), str) for name in IR_FILES)
          and isinstance(record.get("float_layers"), list) and all(isinstance(n, str) for n in record["float_layers"])
          and isinstance(record.get("calibration"), str)
          and (record.get("agreement") is None or type(record["agreement"]) in (int, float)))
    if not ok:
        raise TuckerSegmentError(f"{path} is not an int8 form record of format {FORMAT}; rebuild the int8 form or "
                                 f"delete {path.parent}")
    return record


def stored_int8(model: Path, fold: str, source: str) -> StoredInt8 | None:
    """The int8 form stored in ``model`` for ``fold`` (None: none stored), verified against its record and
    against ``source`` (``source_digest`` of what the fold holds now)."""
    folder = form_folder(model, fold)
    if not (folder / RECORD).exists():
        return None
    record = _checked_record(folder / RECORD)
    fix = f"rebuild it (tuckersegment build-variants, or compress --int8) or delete {folder}"
    if record["source"] != source:
        raise TuckerSegmentError(f"the int8 form in {folder} was quantized from other weights or plans than "
                                 f"{model.name} holds now; {fix}")
    contents = {}
    for name in IR_FILES:
        path = folder / name
        data = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        if data is None or sha256_bytes(data) != record["files"][name]:
            raise TuckerSegmentError(f"{path} is missing or changed since it was quantized (sha256 mismatch); {fix}")
        contents[name] = data
    return StoredInt8(contents["model.xml"], contents["model.bin"], record)


def write_int8(folder: Path, ov: Any, model: Any, record: dict[str, Any]) -> dict[str, Any]:
    """Write the quantized OpenVINO ``model`` and its ``record`` (without ``files``, added here) into the form
    ``folder`` whole: staged beside it, moved into place last. Returns the record written."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output_dir(folder, overwrite=True) as staging:
        ov.save_model(model, staging / "model.xml", compress_to_fp16=False)
        full = {"format": FORMAT, **record, "files": {name: sha256_file(staging / name) for name in IR_FILES}}
        (staging / RECORD).write_text(json.dumps(full, indent=1))
    return full
