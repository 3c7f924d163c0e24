"""Build compressed TotalSegmentator variants from the user's own weights into the user cache.

A build is resumable and never half-used: each model of a variant is compressed atomically into
``<cache>/variants/<id>/<dataset>`` (a model already there from an interrupted build is kept when its
source checksum and files still match), and the manifest ``variant.json``, which records the sha256
of every built file, is written last. Without a manifest a variant is not available.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__
from ..atomic import atomic_output_file
from ..compress.folder import compress_model_folder, describe_model
from ..errors import CheckpointError, ModelFolderError
from ..nnunet.checkpoint import sha256_file
from ..nnunet.layout import CHECKPOINT_NAME, TUCKER_JSON, fold_dir_name
from ..policies.methods import policy_from_dict
from .catalogue import MANIFEST, Variant, read_manifest, task_of, variant_dir
from .totalsegmentator import download_task, find_task, weights_dirs

Report = Callable[[str], None]


def _files(folder: Path) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file()}


def source_folders(variant: Variant, weights_roots: list[Path] | None = None, download: bool = True) -> list[Path]:
    """The TotalSegmentator model folders ``variant`` is built from; downloaded with TotalSegmentator when allowed."""
    task = task_of(variant)
    if task is None:
        raise ModelFolderError(f"{variant.id} is bundled with TuckerSegment; there is nothing to build")
    found = find_task(task, weights_roots)
    if found is not None:
        return found
    if not download:
        raise ModelFolderError(f"TotalSegmentator weights for {variant.id} ({', '.join(m.dataset for m in task.models)}) "
                               f"are not in {', '.join(str(r) for r in weights_roots or weights_dirs())}; point "
                               "--ts-weights at the folder that holds them")
    return download_task(task)  # without TotalSegmentator installed, an error says where we looked and what to do


def check_source(folder: Path, fold: int, expected_sha256: str | None) -> str:
    """Refuse a source checkpoint whose sha256 differs from the release's (when known); return its sha256.
    Shapes are checked against plans.json when the checkpoint is loaded for compression."""
    checkpoint = folder / fold_dir_name(fold) / CHECKPOINT_NAME
    digest = sha256_file(checkpoint)
    if expected_sha256 and digest != expected_sha256:
        raise CheckpointError(f"{checkpoint} has sha256 {digest[:12]}…, the release's is {expected_sha256[:12]}…: the "
                              "download is corrupt or from another release; delete the folder and download it again")
    return digest


def _reusable(target: Path, source_sha256: str) -> bool:
    """A model folder left by an interrupted build that is complete and was made from the same source."""
    try:
        record = json.loads(next(target.glob(f"fold_*/{TUCKER_JSON}")).read_text())
    except (StopIteration, OSError, json.JSONDecodeError):
        return False
    weights = target / f"fold_{record.get('fold')}" / str(record.get("weights"))
    return record["source"]["sha256"] == source_sha256 and weights.is_file() and \
        sha256_file(weights) == record.get("weights_sha256")


def build_variant(variant: Variant, weights_roots: list[Path] | None = None, cache: Path | None = None,
                  report: Report | None = None, download: bool = True) -> Path:
    """Build ``variant`` (a compressed TotalSegmentator entry) into the cache; return its folder."""
    say = report or (lambda message: None)
    if variant.original:
        raise ModelFolderError(f"{variant.id} is an original model: nothing to compress (its weights are used as "
                               "TotalSegmentator installed them)")
    if read_manifest(variant, cache) is not None:
        say(f"{variant.id}: already built")
        return variant_dir(variant, cache)
    task = task_of(variant)
    assert task is not None
    sources = source_folders(variant, weights_roots, download)
    known = variant.source.get("sha256") or {}
    folder = variant_dir(variant, cache)
    folder.mkdir(parents=True, exist_ok=True)
    policy = policy_from_dict(variant.policy)
    models = []
    for index, (model, source) in enumerate(zip(task.models, sources, strict=True)):
        prefix = f"{variant.id} [{index + 1}/{len(task.models)}] {model.dataset}"
        say(f"{prefix}: checking source weights in {source}")
        digest = check_source(source, model.fold, known.get(model.dataset))
        target = folder / model.dataset
        if _reusable(target, digest):
            say(f"{prefix}: kept from an earlier, interrupted build")
        else:
            say(f"{prefix}: compressing ({policy!r})")
            compress_model_folder(source, target, policy, folds=(model.fold,), overwrite=True)
        built = describe_model(target)  # the real figures of these weights' plans (the catalogue's may be assumed)
        models.append({"dataset": model.dataset, "folder": model.dataset, "source": str(source),
                       "source_sha256": digest, "params": built["params"], "flops": built["flops"],
                       "files": _files(target)})
    manifest = {"id": variant.id, "task": variant.task, "policy": variant.policy, "tuckersegment_version": __version__,
                "models": models}
    with atomic_output_file(folder / MANIFEST) as staging:
        staging.write_text(json.dumps(manifest, indent=1))
    say(f"{variant.id}: built in {folder}")
    return folder


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
