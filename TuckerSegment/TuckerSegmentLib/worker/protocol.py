"""What the worker process and its client say to each other; no torch, so Slicer's side can import it.

Requests go to the worker's stdin and answers come from its stdout, one JSON object per line:
``{"id": 3, "command": "segment", "args": {...}}`` in; ``{"id": 3, "fraction": 0.42, "message": "tile 5/12"}``
while it works, then ``{"id": 3, "result": {...}}`` or ``{"id": 3, "error": {"type": ..., "message": ...}}``.
The first line a worker writes is ``{"event": "ready", "pid": ..., "version": ...}``. Every line is strict JSON
(no NaN) of at most ``MAX_LINE`` characters; the worker reads each request line as untrusted input
(``read_request``). Voxels travel in ``.npz`` files (never pickles) in a folder the client owns.
"""
from __future__ import annotations

import json
import math
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import errors
from ..errors import ProtocolError, TuckerSegmentError
from ..image.transfer import load_volume, save_volume
from ..segment.labels import SegmentLabel, Terminology

READY = "ready"
MAX_LINE = 1 << 20  # a protocol line longer than this is not ours
MAX_ID = 64  # characters in a request id that is a string
MAX_MESSAGE = 4000  # characters of an error message that travel (a longer one loses its middle)
NOT_A_REQUEST = "the worker got a request that is not JSON with id and command"


@dataclass(frozen=True)
class Request:
    """A request line as the worker takes it."""

    ident: int | str
    command: str
    args: dict[str, Any]


class BadRequest(ProtocolError):
    """A request line the worker refuses; ``ident`` is the id its answer carries (None when it had no usable one)."""

    def __init__(self, message: str, ident: int | str | None = None) -> None:
        super().__init__(message)
        self.ident = ident


def encode(message: dict[str, Any]) -> bytes:
    """One protocol line, strict JSON: a ProtocolError for NaN or an infinity (JSON has none) or for a line longer
    than the other side reads."""
    try:
        text = json.dumps(message, separators=(",", ":"), default=_plain, allow_nan=False)
    except ValueError as error:
        raise ProtocolError(f"a protocol message must be strict JSON ({error}); send NaN and infinities as null") from None
    if len(text) > MAX_LINE:  # ASCII (json escapes the rest): characters are bytes
        raise ProtocolError(f"a protocol message is longer than {MAX_LINE} characters; pass large data in files")
    return (text + "\n").encode()


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


def read_request(line: bytes) -> Request:
    """The request on one stdin line, read as untrusted input: a ``BadRequest`` for a line too long (refused unparsed),
    not JSON, nested too deeply, or with an id, command or args the protocol has not."""
    if len(line.strip()) > MAX_LINE:
        raise BadRequest(f"the worker got a request line longer than {MAX_LINE} bytes; pass large data in files")
    try:
        message = json.loads(line)
    except RecursionError:
        raise BadRequest("the worker got a request nested too deeply to read; a request is a JSON object a few "
                         "levels deep") from None
    except ValueError:
        raise BadRequest(NOT_A_REQUEST) from None
    if not isinstance(message, dict) or "id" not in message or "command" not in message:
        raise BadRequest(NOT_A_REQUEST)
    ident, command, args = message["id"], message["command"], message.get("args", {})
    if not (isinstance(ident, str) and len(ident) <= MAX_ID or type(ident) is int and abs(ident) < 2 ** 63):
        raise BadRequest(f"a request's id must be a whole number or a string of at most {MAX_ID} characters, not "
                         f"{quoted(ident)}")
    if not isinstance(command, str):
        raise BadRequest(f"a request's command must be a name, not {quoted(command)}", ident)
    if not isinstance(args, dict):
        raise BadRequest(f"args must be a JSON object (the command's fields by name), not {quoted(args)}", ident)
    return Request(ident, command, args)


def quoted(value: Any) -> str:
    """``value`` as an error message quotes it: its repr, shortened however large or deeply nested it is."""
    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 2, 40, 40
    return short.repr(value)


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
    """An error as the client re-raises it: TuckerSegment's own by the nearest class ``errors`` defines, anything else
    by its text; a message longer than ``MAX_MESSAGE`` loses its middle, so that the answer fits a line."""
    if isinstance(error, TuckerSegmentError):
        kind = next(k.__name__ for k in type(error).__mro__ if getattr(errors, k.__name__, None) is k)
        text = str(error)
    else:
        kind, text = "TuckerSegmentError", f"{type(error).__name__}: {error}"
    if len(text) > MAX_MESSAGE:
        text = f"{text[:MAX_MESSAGE // 2]} … {text[-MAX_MESSAGE // 2:]}"
    return {"type": kind, "message": text}


def error_from_json(data: dict[str, Any]) -> TuckerSegmentError:
    kind = getattr(errors, str(data.get("type")), TuckerSegmentError)
    if not (isinstance(kind, type) and issubclass(kind, TuckerSegmentError)):
        kind = TuckerSegmentError
    return kind(str(data.get("message", "the worker failed without a message")))


__all__ = ["BadRequest", "ProtocolError", "Request", "decode", "encode", "error_from_json", "error_to_json",
           "load_labels", "load_volume", "quoted", "read_request", "save_labels", "save_volume", "segments_from_json",
           "segments_to_json"]
