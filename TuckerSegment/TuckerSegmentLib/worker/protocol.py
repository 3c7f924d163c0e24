"""What the worker process and its client say to each other; no torch, so Slicer's side can import it.

Requests go to the worker's stdin and answers come from its stdout, one JSON object per line:
``{"id": 3, "command": "segment", "args": {...}}`` in; ``{"id": 3, "fraction": 0.42, "message": "tile 5/12"}``
while it works, then ``{"id": 3, "result": {...}}`` or ``{"id": 3, "error": {"type": ..., "message": ...}}``.
The first line a worker writes is ``{"event": "ready", "pid": ..., "version": ...}``. Voxels travel in
``.npz`` files (never pickles) in a folder the client owns.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from .. import errors
from ..errors import ProtocolError, TuckerSegmentError
from ..image.transfer import load_volume, save_volume
from ..segment.labels import SegmentLabel, Terminology

READY = "ready"
MAX_LINE = 1 << 20  # a protocol line longer than this is not ours


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line."""
    return (json.dumps(message, separators=(",", ":"), default=_plain) + "\n").encode()


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} cannot travel to the worker")


def decode(line: bytes | str) -> dict[str, Any] | None:
    """The message on one stdout line, or None for a line that is not a protocol message (a library's
    print that reached stdout)."""
    text = line.decode(errors="replace") if isinstance(line, bytes) else line
    text = text.strip()
    if not text.startswith("{") or len(text) > MAX_LINE:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def save_labels(path: Path, labels: np.ndarray) -> None:
    np.save(path, np.ascontiguousarray(labels), allow_pickle=False)


def load_labels(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """The label map the worker wrote, checked against the grid it must lie on."""
    labels = np.load(Path(path), allow_pickle=False)
    if labels.shape != tuple(shape) or labels.dtype.kind not in "ui":
        raise ProtocolError(f"the worker's labels ({labels.shape}, {labels.dtype}) do not fit the volume {shape}")
    return labels


def segments_to_json(segments: list[SegmentLabel]) -> list[dict[str, Any]]:
    return [{"value": s.value, "name": s.name, "color": list(s.color),
             "terminology": None if s.terminology is None else {
                 "context": s.terminology.context,
                 **{part: None if getattr(s.terminology, part) is None else list(getattr(s.terminology, part))
                    for part in ("category", "type", "type_modifier", "region", "region_modifier")}}}
            for s in segments]


def segments_from_json(items: list[dict[str, Any]]) -> list[SegmentLabel]:
    def code(value: list[str] | None) -> tuple[str, str, str] | None:
        return None if value is None else (str(value[0]), str(value[1]), str(value[2]))
    segments = []
    for item in items:
        term = item.get("terminology")
        terminology = None if term is None else Terminology(
            str(term["context"]), code(term["category"]), code(term["type"]), code(term["type_modifier"]),
            code(term["region"]), code(term["region_modifier"]))
        color = tuple(float(c) for c in item["color"])
        if len(color) != 3 or not all(math.isfinite(c) for c in color):
            raise ProtocolError(f"segment {item.get('name')!r} has no RGB colour")
        segments.append(SegmentLabel(int(item["value"]), str(item["name"]), color, terminology))  # type: ignore[arg-type]
    return segments


def error_to_json(error: BaseException) -> dict[str, str]:
    """An error as the client re-raises it: TuckerSegment's own classes by name, anything else by its text."""
    kind = type(error).__name__ if isinstance(error, TuckerSegmentError) else "TuckerSegmentError"
    text = str(error) if isinstance(error, TuckerSegmentError) else f"{type(error).__name__}: {error}"
    return {"type": kind, "message": text}


def error_from_json(data: dict[str, Any]) -> TuckerSegmentError:
    kind = getattr(errors, str(data.get("type")), TuckerSegmentError)
    if not (isinstance(kind, type) and issubclass(kind, TuckerSegmentError)):
        kind = TuckerSegmentError
    return kind(str(data.get("message", "the worker failed without a message")))


__all__ = ["ProtocolError", "decode", "encode", "error_from_json", "error_to_json", "load_labels", "load_volume",
           "save_labels", "save_volume", "segments_from_json", "segments_to_json"]
