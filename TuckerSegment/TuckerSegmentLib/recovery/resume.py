"""Resumable training state, kept beside a recovery run's output until the output is written.

A run that trains a network writes its state every few iterations to ``state_folder(output, method)``,
``<OUT_DIR>.<method>-state/`` beside the output: a visible name that the hostile-input clean-up
(``atomic.remove_stale``, which removes ``.<name>.<pid>.*.partial*`` and ``.<name>.old-*``) never
touches. The folder is written whole or not at all (``atomic.atomic_output_dir``) and holds no pickle:

- ``state.json``: format, the run's ``fingerprint`` (whatever decides the result: input checksums,
  hyper-parameters), the caller's JSON ``record`` (iteration, log, seconds, ...) and the sha256 of each file;
- ``network.safetensors``: the trained network's weights (one name per tensor, as ``tucker_format.save_weights``);
- ``optimizer.safetensors``: the optimiser's per-parameter state (``<index>.<key>``; hyper-parameters come
  from the fingerprint, so they are not stored);
- ``extra.safetensors``: any other tensors the caller keeps (e.g. random generator states).

Use: ``found = load_state(folder, fingerprint, network, optimizer)`` before training (``None``: start
fresh; otherwise the network and optimiser are restored and ``found`` holds the record and extra
tensors), ``save_state(...)`` every few iterations, ``remove_state(folder)`` once the output is written.
A state made for other inputs, or a file that does not match its recorded checksum, is refused with
one line naming the folder (``ResumeStateError``); nothing is loaded then.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_output_dir
from ..errors import CheckpointError, RankMismatchError, RecoveryError
from ..checksums import sha256_file
from ..nnunet.checkpoint import non_finite
from ..nnunet.tucker_format import canonical_tensors, load_weights

STATE_FORMAT = "tuckersegment.training-state"
STATE_VERSION = 1
STATE_JSON = "state.json"
NETWORK_FILE = "network.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
EXTRA_FILE = "extra.safetensors"


class ResumeStateError(RecoveryError):
    """A saved training state cannot be resumed: unreadable, altered, or made for other inputs."""


@dataclass
class SavedState:
    """What ``load_state`` found: the caller's record and extra tensors (network and optimiser already restored)."""

    record: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def _json_roundtrip(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {}
    for index, entry in optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{index}.{key}"] = tensor.detach().cpu().contiguous()
    return tensors


def save_state(folder: Path, fingerprint: dict[str, Any], record: dict[str, Any], network: nn.Module,
               optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write the state folder whole (replacing the previous one only once the new one is complete)."""
    with atomic_output_dir(Path(folder), overwrite=True) as staging:
        files = {}
        weights = {name: t.detach().cpu().contiguous() for name, t in canonical_tensors(network).items()}
        for name, content in ((NETWORK_FILE, weights), (OPTIMIZER_FILE, _optimizer_tensors(optimizer)),
                              (EXTRA_FILE, {k: v.detach().cpu().contiguous() for k, v in (tensors or {}).items()})):
            save_file(content, str(staging / name), metadata={"format": STATE_FORMAT})
            files[name] = sha256_file(staging / name)
        (staging / STATE_JSON).write_text(json.dumps({
            "format": STATE_FORMAT, "format_version": STATE_VERSION, "fingerprint": fingerprint,
            "record": record, "files": files}, indent=1) + "\n")


def _refuse(folder: Path, problem: str) -> ResumeStateError:
    return ResumeStateError(f"training state {folder} {problem}; delete that folder to start over (its progress is "
                            "lost)")


def load_state(folder: Path, fingerprint: dict[str, Any], network: nn.Module,
               optimizer: torch.optim.Optimizer) -> SavedState | None:
    """Restore ``network`` and ``optimizer`` from the state folder and return its record (``None`` when there is
    no state). Refused (``ResumeStateError``, nothing loaded) when the folder is unreadable, a file does not
    match its checksum, or the state was made for another ``fingerprint``."""
    folder = Path(folder)
    if not folder.exists():
        return None
    try:
        saved = json.loads((folder / STATE_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _refuse(folder, f"has no readable {STATE_JSON} ({type(exc).__name__})") from None
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT or saved.get("format_version") != STATE_VERSION:
        raise _refuse(folder, f"is not a TuckerSegment training state (format {STATE_FORMAT!r} {STATE_VERSION})")
    if not isinstance(saved.get("record"), dict) or not isinstance(saved.get("files"), dict):
        raise _refuse(folder, f"has an incomplete {STATE_JSON}")
    expected = _json_roundtrip(fingerprint)
    found = saved.get("fingerprint")
    if found != expected:
        keys = sorted(k for k in set(expected) | set(found if isinstance(found, dict) else {})
                      if not isinstance(found, dict) or found.get(k) != expected.get(k))
        raise _refuse(folder, f"was made for other inputs or settings (differs in: {', '.join(keys)})")
    for name in (NETWORK_FILE, OPTIMIZER_FILE, EXTRA_FILE):
        path = folder / name
        if not path.is_file() or sha256_file(path) != saved["files"].get(name):
            raise _refuse(folder, f"has a missing or altered {name} (its sha256 is not the one recorded)")
    try:
        optimizer_tensors = load_file(str(folder / OPTIMIZER_FILE))
        extra = load_file(str(folder / EXTRA_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise _refuse(folder, f"holds an unreadable safetensors file ({exc})") from None
    bad = non_finite(optimizer_tensors)
    if bad is not None:
        raise _refuse(folder, f"holds NaN or infinite optimiser values ({bad})")
    state = _optimizer_state(folder, optimizer, optimizer_tensors)
    backup = {name: t.detach().clone() for name, t in network.state_dict().items()}
    try:
        load_weights(network, folder / NETWORK_FILE, saved["files"][NETWORK_FILE])
    except (CheckpointError, RankMismatchError) as exc:
        network.load_state_dict(backup)
        raise _refuse(folder, f"holds weights that do not fit the network ({str(exc).split(';')[0]})") from None
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return SavedState(record=saved["record"], tensors=extra)


def _optimizer_state(folder: Path, optimizer: torch.optim.Optimizer,
                     tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """The optimiser's per-parameter state from ``<index>.<key>`` tensors, every shape checked against its
    parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        index, _, key = name.partition(".")
        if not index.isdigit() or int(index) >= len(params) or not key:
            raise _refuse(folder, f"holds optimiser state {name!r} for no parameter of this network")
        param = params[int(index)]
        if tensor.dim() > 0 and tuple(tensor.shape) != tuple(param.shape):
            raise _refuse(folder, f"holds optimiser state {name!r} of shape {tuple(tensor.shape)} for a parameter of "
                                  f"shape {tuple(param.shape)}")
        state.setdefault(int(index), {})[key] = tensor.to(param.device) if tensor.dim() > 0 else tensor
    return state


def remove_state(folder: Path) -> None:
    """Remove a finished run's state folder."""
    shutil.rmtree(folder, ignore_errors=True)
