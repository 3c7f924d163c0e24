"""The user's own models ("my variants"): compressed folders added from the compression panel.

Kept in ``<cache>/my_variants.json`` (written whole or not at all); each entry names the compressed
folder, its original, and the reviewed figures. Entries whose folder has gone are not offered. The list is kept
nowhere else: a cache that cannot hold it, or a list that is not one, is an error naming the fix.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_output_file
from ..errors import ModelFolderError
from ..paths import cache_dir, product_folder

if TYPE_CHECKING:
    from ..compress.figures import CompressionReview

REGISTRY = "my_variants.json"


@dataclass(frozen=True)
class UserVariant:
    """A compressed model the user added, with what its review measured."""

    id: str
    folder: str
    source: str
    policy: dict[str, Any]
    params: int
    flops: int
    flops_ratio: float
    agreement: float | None
    time_ratio: float | None
    added: str

    def label(self) -> str:
        dice = f", Dice vs original {self.agreement:.3f}" if self.agreement is not None else ""
        speed = f", {self.time_ratio:.2f}× the time" if self.time_ratio is not None else ""
        return f"{self.id}: {self.flops_ratio:.0%} of the FLOPs{speed}{dice}"


def registry_path(cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / REGISTRY


def _is_entry(entry: object) -> bool:
    """Whether ``entry`` holds a ``UserVariant``'s fields, its id and folder as text."""
    return (isinstance(entry, dict) and set(entry) == set(UserVariant.__dataclass_fields__)
            and isinstance(entry["id"], str) and isinstance(entry["folder"], str))


def _read(cache: Path | None) -> list[dict[str, Any]]:
    path = registry_path(cache)
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())["variants"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelFolderError(f"{path} is unreadable ({exc}); delete it to start a new list of your variants") from exc
    if not isinstance(entries, list) or not all(_is_entry(entry) for entry in entries):
        raise ModelFolderError(f"{path} is not a list of your variants; delete it to start a new one")
    return entries


def user_variants(cache: Path | None = None) -> list[UserVariant]:
    """The added variants whose folder still exists, oldest first."""
    return [UserVariant(**entry) for entry in _read(cache) if Path(entry["folder"]).is_dir()]


def comparison_points(review: CompressionReview, mine: Sequence[UserVariant]) -> list[tuple[float, float]]:
    """(FLOPs fraction, Dice vs the original) of the reviewed model and of each of ``mine`` compressed from the
    same original, and the original itself at (1, 1); models whose agreement was not measured are left out."""
    points = {review.output: (review.compressed.flops / review.original.flops, review.agreement)}
    for variant in mine:
        if Path(variant.source) == Path(review.source) and variant.folder not in points:
            points[variant.folder] = (variant.flops_ratio, variant.agreement)
    return sorted((flops, dice) for flops, dice in points.values() if dice is not None) + [(1.0, 1.0)]


def add_user_variant(review: CompressionReview, cache: Path | None = None) -> UserVariant:
    """Record the reviewed compressed folder (again: its entry is replaced) and return its entry; refused (an
    ``OutputPathError``) when the cache cannot hold the list."""
    product_folder("the list of your variants", cache=cache)
    entries = [e for e in _read(cache) if Path(e["folder"]) != Path(review.output)]
    taken = {e["id"] for e in entries}
    name = base = Path(review.output).name
    suffix = 2
    while name in taken:
        name, suffix = f"{base}-{suffix}", suffix + 1
    original, compressed = review.original, review.compressed
    variant = UserVariant(
        id=name, folder=str(Path(review.output).resolve()), source=str(Path(review.source).resolve()),
        policy=review.policy, params=compressed.params, flops=compressed.flops,
        flops_ratio=compressed.flops / original.flops, agreement=review.agreement,
        time_ratio=(compressed.seconds / original.seconds if compressed.seconds and original.seconds else None),
        added=time.strftime("%Y-%m-%dT%H:%M:%S"))
    with atomic_output_file(registry_path(cache)) as staging:
        staging.write_text(json.dumps({"variants": [*entries, asdict(variant)]}, indent=1))
    return variant
