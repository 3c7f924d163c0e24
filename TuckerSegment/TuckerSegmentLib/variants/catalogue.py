"""The variants catalogue (``Resources/variants.json``): every model TuckerSegment can run, by task.

Each entry says what it is (task, source weights, policy), what it costs (params, FLOPs per patch,
weight bytes, peak memory, relative speed per device class; a latency-target variant's size is known
only once built on the machine it targets) and how good it is (published, measured here, or
unmeasured). ``measured`` holds a measurement against the original (``measure.py``): the bundled demo
variants carry this project's; a built variant carries the one its build took on the user's machine.
``distillation`` says whether a build trained the variant towards its original after compressing it
(``build-variants --distill N``: iterations, device, per-model held-out agreement before and after).
``with_availability`` adds where it stands on this machine:

- ``bundled``: shipped in ``Resources/Models`` (the demo model and its variants);
- ``built``: ready on this machine: a TotalSegmentator original in its weights folder, or a
  compressed variant whose build in the user cache completed (manifest written last);
- ``damaged``: a build is in the user cache but its manifest is missing or changed, or a file it names is
  missing or of another size: not run, said so, and rebuilt by ``build-variants``;
- ``buildable``: its source weights are here, or TotalSegmentator is installed and can fetch them;
- ``missing``: neither.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..checksums import sha256_file, unsealed
from ..errors import CheckpointError, ModelFolderError
from ..paths import BUNDLED_MODELS, CATALOGUE_JSON, cache_dir, is_plain_name, plain_relative
from .totalsegmentator import Task, find_task, tasks, totalsegmentator_installed

SCHEMA = 1
MANIFEST = "variant.json"
READY = ("bundled", "built")
DAMAGED = "damaged"
BUILDABLE = ("buildable", "built", DAMAGED)  # what build-variants (re)builds when the source weights are here
# A common abdominal CT (512 x 512 x 300 voxels of 0.8 x 0.8 x 1.5 mm): the volume peak memory is quoted for.
STANDARD_VOLUME_MM = (409.6, 409.6, 450.0)


@dataclass(frozen=True)
class Variant:
    """One catalogue entry (see the module docstring); ``availability``/``folders`` describe this machine."""

    id: str
    task: str
    policy: str | dict[str, Any]  # "original" or {"name", "params"}
    source: dict[str, Any]
    spacing_mm: float
    outputs: int  # largest number of network outputs among the task's models
    params: int | None  # None: depends on the machine (latency targets), known once built
    flops: int | None
    weights_bytes: int | None
    peak_memory: dict[str, Any]
    quality: dict[str, Any]
    speed: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    measured: dict[str, Any] | None = None
    distillation: dict[str, Any] | None = None
    availability: str = "missing"
    folders: tuple[Path, ...] = ()
    detail: str = ""

    @property
    def original(self) -> bool:
        return self.policy == "original"

    @property
    def bundled(self) -> bool:
        """Shipped in ``Resources/Models`` (nothing to build or download)."""
        return "bundled" in self.source

    @property
    def distilled(self) -> int:
        """Distillation iterations its build ran after compression (0: none)."""
        return int((self.distillation or {}).get("iterations", 0))

    def dice_loss(self) -> float | None:
        """Mean Dice lost against the original (same source), or ``None`` when unmeasured."""
        if self.original:
            return 0.0
        q = self.quality
        if q.get("mean_dice") is None or q.get("original_dice") is None:
            return None
        return float(q["original_dice"]) - float(q["mean_dice"])

    def memory_bytes(self, kind: str, voxels: int | None = None) -> tuple[int | None, str]:
        """Expected peak memory on a ``kind`` device ("cpu", "cuda", "mps") for a volume of ``voxels`` at the
        model spacing (default: the standard volume), and how it was obtained."""
        entry = self.peak_memory.get(kind) or {}
        how = "measured"
        if entry.get("tile_bytes") is None:
            entry, how = self.peak_memory.get("cpu") or {}, "estimated from the CPU measurement"
        if entry.get("tile_bytes") is None:
            return None, "unmeasured"
        voxels = standard_voxels(self.spacing_mm) if voxels is None else voxels
        return int(entry["tile_bytes"] + entry["bytes_per_voxel"] * voxels), how



def standard_voxels(spacing_mm: float) -> int:
    """Voxels of the standard volume resampled to ``spacing_mm``."""
    return math.prod(math.ceil(extent / spacing_mm) for extent in STANDARD_VOLUME_MM)


def load_catalogue(path: Path = CATALOGUE_JSON) -> list[Variant]:
    """The catalogue's entries (availability not yet known: see ``with_availability``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelFolderError(f"cannot read the variants catalogue {path} ({exc}); reinstall TuckerSegment") from exc
    if data.get("schema") != SCHEMA:
        raise ModelFolderError(f"{path} has catalogue schema {data.get('schema')!r}, this TuckerSegment reads schema "
                               f"{SCHEMA}; update TuckerSegment or rebuild the catalogue")
    fields = set(Variant.__dataclass_fields__) - {"availability", "folders", "detail"}
    if not all(is_plain_name(entry.get("id")) for entry in data["variants"]):  # ids name cache folders
        raise ModelFolderError(f"{path} has a variant id that is not a plain name; reinstall TuckerSegment")
    return [Variant(**{k: v for k, v in entry.items() if k in fields}) for entry in data["variants"]]


def variant_dir(variant: Variant, cache: Path | None = None) -> Path:
    return (cache or cache_dir()) / "variants" / variant.id


def task_of(variant: Variant) -> Task | None:
    """The TotalSegmentator task a variant belongs to (``None`` for bundled models)."""
    return None if variant.bundled else tasks().get(variant.task)


def read_manifest(variant: Variant, cache: Path | None = None) -> dict[str, Any] | None:
    """The manifest of a completed build whose files are all present with their recorded sizes."""
    folder = variant_dir(variant, cache)
    try:
        manifest = unsealed(json.loads((folder / MANIFEST).read_text()), folder / MANIFEST)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if manifest is None or manifest.get("id") != variant.id or manifest.get("policy") != variant.policy:
        return None
    for model in manifest.get("models", []):
        inside = isinstance(model, dict) and is_plain_name(model.get("folder")) and \
            all(plain_relative(name) for name in model["files"])
        if not inside:
            return None  # a manifest naming files outside its variant's folder is not a build of ours
        for name, record in model["files"].items():
            path = folder / model["folder"] / name
            if not path.is_file() or path.stat().st_size != record["bytes"]:
                return None
    return manifest


def verify_built(variant: Variant, cache: Path | None = None) -> None:
    """Recompute every built file's sha256 against the manifest; name the corrupt file and the fix."""
    manifest = read_manifest(variant, cache)
    folder = variant_dir(variant, cache)
    if manifest is None:
        raise ModelFolderError(f"{variant.id} is not (completely) built in {folder}; run: tuckersegment build-variants "
                               f"--variant {variant.id}")
    for model in manifest["models"]:
        for name, record in model["files"].items():
            path = folder / model["folder"] / name
            if sha256_file(path) != record["sha256"]:
                (folder / MANIFEST).unlink(missing_ok=True)  # no longer counts as built; the next build redoes it
                raise CheckpointError(f"{path} changed since it was built (sha256 mismatch): it is corrupt; run "
                                      f"tuckersegment build-variants --variant {variant.id} to rebuild it")


def with_availability(variant: Variant, weights_roots: list[Path] | None = None, cache: Path | None = None) -> Variant:
    """``variant`` with its availability on this machine, the folders to run, and a short explanation."""
    if variant.bundled:
        folder = BUNDLED_MODELS / variant.source["bundled"]
        if folder.is_dir():
            return replace(variant, availability="bundled", folders=(folder,), detail=str(folder))
        return replace(variant, availability="missing", detail=f"{folder} is missing: reinstall TuckerSegment")
    task = task_of(variant)
    if task is None:
        return replace(variant, availability="missing", detail=f"unknown task {variant.task!r}")
    sources = find_task(task, weights_roots)
    if variant.original and sources is not None:
        return replace(variant, availability="built", folders=tuple(sources),
                       detail=f"TotalSegmentator weights in {sources[0].parents[1]}")
    if not variant.original:
        manifest = read_manifest(variant, cache)
        if manifest is not None:
            folder = variant_dir(variant, cache)
            models = manifest["models"]
            return replace(variant, availability="built", folders=tuple(folder / m["folder"] for m in models),
                           detail=str(folder), measured=manifest.get("measurement"),
                           distillation=manifest.get("distillation"),
                           **{key: sum(m[key] for m in models) if all(key in m for m in models) else getattr(variant, key)
                              for key in ("params", "flops", "weights_bytes")})
        if variant_dir(variant, cache).exists():
            return replace(variant, availability=DAMAGED,
                           detail=f"the build in {variant_dir(variant, cache)} is incomplete or damaged (interrupted, "
                                  "or its manifest or a file it names is missing or changed): run tuckersegment "
                                  f"build-variants --variant {variant.id} to finish or rebuild it")
    if sources is not None:
        return replace(variant, availability="buildable",
                       detail=f"run: tuckersegment build-variants --variant {variant.id}")
    if weights_roots:  # the folders the user named, and only those
        return replace(variant, availability="missing",
                       detail=f"its TotalSegmentator weights ({', '.join(m.dataset for m in task.models)}) are not in "
                              f"{', '.join(map(str, weights_roots))}; point --ts-weights at the folder that holds them")
    if totalsegmentator_installed():
        return replace(variant, availability="buildable",
                       detail="TotalSegmentator is installed and can download the source weights: "
                              f"tuckersegment build-variants --variant {variant.id}")
    return replace(variant, availability="missing",
                   detail="no TotalSegmentator weights found (TOTALSEG_WEIGHTS_PATH, TOTALSEG_HOME_DIR, "
                          "~/.totalsegmentator) and TotalSegmentator is not installed")


def catalogue(weights_roots: list[Path] | None = None, cache: Path | None = None,
              path: Path = CATALOGUE_JSON) -> list[Variant]:
    """Every catalogue entry with its availability on this machine."""
    return [with_availability(v, weights_roots, cache) for v in load_catalogue(path)]


def find_variant(variants: list[Variant], variant_id: str) -> Variant:
    for variant in variants:
        if variant.id == variant_id:
            return variant
    raise ModelFolderError(f"no variant {variant_id!r}; known: {', '.join(v.id for v in variants)} "
                           "(tuckersegment variants lists them)")
