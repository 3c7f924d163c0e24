"""sha256 of files and bytes, and JSON records sealed with the sha256 of their own content, so that a cached
figure or manifest changed in place is noticed instead of believed. Imports nothing of the engine but errors."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

from .errors import CacheWarning

SEAL = "sha256"  # the key a sealed record keeps its own checksum under


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _content_digest(body: dict[str, Any]) -> str:
    """The sha256 of ``body`` as JSON writes and reads it back (keys as text, sorted), so it survives a round trip."""
    normal = json.loads(json.dumps(body, allow_nan=False))
    return sha256_bytes(json.dumps(normal, sort_keys=True, allow_nan=False).encode())


def sealed(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with the sha256 of its content added under ``SEAL``."""
    return {**body, SEAL: _content_digest(body)}


def unsealed(record: Any, where: Path) -> dict[str, Any] | None:
    """``record`` without its seal when the seal matches its content; None otherwise, with a ``CacheWarning`` naming
    ``where`` (a record without a seal, or changed since it was written, is not used)."""
    if not isinstance(record, dict):
        return None
    body = {key: value for key, value in record.items() if key != SEAL}
    try:
        matches = record.get(SEAL) == _content_digest(body)
    except ValueError:  # NaN or infinity: nothing the engine writes
        matches = False
    if not matches:
        why = "has no checksum" if SEAL not in record else "changed since it was written (checksum mismatch)"
        warnings.warn(CacheWarning(f"{where} {why}; it is not used"), stacklevel=3)
        return None
    return body
