"""The on-disk form of a compressed fold: ``tucker.json`` (what was done) + ``weights.safetensors``.

No pickle is involved: the architecture comes from plans.json, the factorised structure from the
per-layer plans in tucker.json, the tensors from safetensors. nnU-Net aliases modules (a conv is
both ``.conv`` and ``.all_modules[0]``), so the state dict has several keys per tensor; only one
name per tensor is stored and the aliases are restored on load.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError, OutputPathError, RankMismatchError
from ..tucker.decomposition import LayerPlan
from ..checksums import sha256_file
from .checkpoint import non_finite, state_mismatch
from .layout import TUCKER_JSON

FORMAT_NAME = "tuckersegment.tucker"
FORMAT_VERSION = 2  # 2: pruned folds ("pruning" record, no layers); version-1 records are still read


def canonical_tensors(network: nn.Module) -> dict[str, torch.Tensor]:
    """The live state tensors, one key per tensor (the first name under which the module holds it)."""
    state_keys = set(network.state_dict(keep_vars=True))
    return {n: t for n, t in (*network.named_parameters(), *network.named_buffers()) if n in state_keys}


def save_weights(network: nn.Module, path: Path) -> str:
    """Write the de-duplicated weights as safetensors; returns the file's sha256."""
    tensors = {name: t.detach().contiguous() for name, t in canonical_tensors(network).items()}
    try:
        save_file(tensors, str(path), metadata={"format": "pt", "writer": FORMAT_NAME})
    except (SafetensorError, OSError) as exc:
        raise OutputPathError(f"cannot write {path} ({exc}); check free disk space, nothing was written") from exc
    return sha256_file(path)


def load_weights(network: nn.Module, path: Path, expected_sha256: str | None = None) -> None:
    """Load weights written by ``save_weights`` into a network of the same structure, aliases included."""
    if path.is_symlink():
        raise CheckpointError(f"{path} is a link to {os.readlink(path)}; a compressed folder holds its own weights: "
                              "copy the folder with its files (cp -rL), or compress the model again")
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the compressed folder is incomplete: compress the model again")
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        raise CheckpointError(f"{path} does not match the sha256 recorded in {TUCKER_JSON}: the file is corrupt "
                              "or was replaced; compress the model again")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); compress the model again") from exc
    expected = canonical_tensors(network)
    problem = state_mismatch(expected, tensors)
    if problem:
        raise RankMismatchError(f"{path} does not fit the layers recorded in {TUCKER_JSON} ({problem}); "
                                "compress the model again")
    cast = next((f"{name} is {tensors[name].dtype}, the network needs {tensor.dtype}" for name, tensor in expected.items()
                 if tensors[name].dtype != tensor.dtype), None)
    bad = cast or (f"{name} holds NaN or infinite values" if (name := non_finite(tensors)) else None)
    if bad:
        raise CheckpointError(f"{path} holds weights TuckerSegment did not write ({bad}); compress the model again")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(tensors[name])


def layer_plans(record: dict[str, Any]) -> dict[str, LayerPlan]:
    """The non-dense per-layer plans recorded in a tucker.json."""
    plans = {}
    for layer in record["layers"]:
        try:
            plan = LayerPlan.from_dict(layer)
        except (ValueError, TypeError) as exc:
            raise RankMismatchError(f"{TUCKER_JSON}: layer {layer.get('name')!r}: {exc}") from exc
        if plan.form != "dense":
            plans[layer["name"]] = plan
    return plans


def read_tucker_json(path: Path) -> dict[str, Any]:
    """Read and check a tucker.json (format, version, per-layer entries)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RankMismatchError(f"{path} is not readable JSON ({exc}); compress the model again") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT_NAME:
        raise RankMismatchError(f"{path} is not a TuckerSegment decomposition record (format {FORMAT_NAME!r})")
    version = record.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise RankMismatchError(f"{path} has format_version {version!r}, not a whole number from 1: the record is "
                                "damaged or was edited; compress the model again")
    if version > FORMAT_VERSION:
        raise RankMismatchError(f"{path} has format_version {version}; this TuckerSegment reads up to "
                                f"{FORMAT_VERSION}: upgrade TuckerSegment")
    _check_hashes(path, record)
    layers = record.get("layers")
    if not isinstance(layers, list) or not all(isinstance(x, dict) and isinstance(x.get("name"), str) for x in layers):
        raise RankMismatchError(f"{path} has no valid 'layers' list; compress the model again")
    for layer in layers:
        for key in ("rank_out", "rank_in"):
            rank = layer.get(key)
            if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
                raise RankMismatchError(f"{path}: layer {layer['name']!r} has {key}={rank!r}, not an integer rank")
    if "pruning" in record and version < 2:
        raise RankMismatchError(f"{path} records pruned channels under format_version {version}, which has none; "
                                "compress the model again")
    if "pruning" in record and layers:
        raise RankMismatchError(f"{path} records both pruned channels and factorised layers; compress the model again")
    return record


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _check_hashes(path: Path, record: dict[str, Any]) -> None:
    """The record names the sha256 of its weights and of the checkpoint it was made from: without them nothing
    proves the weights are the ones written, or which original they belong to."""
    source = record.get("source")
    for name, value in (("weights_sha256", record.get("weights_sha256")),
                        ("source.sha256", source.get("sha256") if isinstance(source, dict) else None)):
        if not is_sha256(value):
            raise RankMismatchError(f"{path} has no valid {name} (a sha256 TuckerSegment records): the record is "
                                    "damaged or was edited; compress the model again")


def write_tucker_json(path: Path, record: dict[str, Any]) -> None:
    path.write_text(json.dumps({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **record}, indent=1) + "\n")
