"""Reading nnU-Net checkpoints without executing arbitrary pickled code."""
from __future__ import annotations

import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

_NUMPY_MODULES = ("numpy._core.multiarray", "numpy.core.multiarray")
DATA_MODULES = ("torch", "numpy", "collections", "_codecs")  # what globals of a checkpoint that holds only data name
_STRING_OPS = ("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8")
_NUMPY_DTYPES = (np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
                 np.float16, np.float32, np.float64)


def _numpy_globals() -> list[Any]:
    """Numpy types found in nnU-Net checkpoints (its ``logging`` entry holds numpy scalars).

    Listed under numpy 2's and numpy 1's module names, so checkpoints written with either load.
    """
    core = np._core.multiarray
    allowed: list[Any] = [np.dtype, np.ndarray, *(type(np.dtype(t)) for t in _NUMPY_DTYPES)]
    for module in _NUMPY_MODULES:
        allowed += [(core.scalar, f"{module}.scalar"), (core._reconstruct, f"{module}._reconstruct")]
    return allowed


def _data_names() -> set[str]:
    """``module.name`` of the globals a pickle holding only data may name: numpy's arrays, dtypes and scalars."""
    names = {"collections.OrderedDict"}
    for entry in _numpy_globals():
        names.add(entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}")
    return names


class _DataUnpickler(pickle.Unpickler):
    """An unpickler that looks up no global outside ``_data_names`` (so nothing it reads can run code)."""

    def find_class(self, module: str, name: str) -> Any:
        if f"{module}.{name}" not in _data_names():
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        return super().find_class(module, name)


def check_data_pickle(path: Path) -> str | None:
    """Why the pickle ``path`` (e.g. nnU-Net's preprocessed case properties, which nnU-Net unpickles fully) is not
    plain data (numbers, text, lists, dicts, numpy arrays), read without running anything; None when it is."""
    try:
        with open(path, "rb") as handle:
            _DataUnpickler(handle).load()
    except pickle.UnpicklingError as exc:
        return f"it is not plain data ({exc})"
    except (EOFError, ValueError, TypeError, OSError, MemoryError) as exc:
        return f"it is not a readable pickle ({type(exc).__name__})"
    return None


def load_checkpoint(path: Path, trust: bool = False) -> dict[str, Any]:
    """Load an nnU-Net checkpoint dict on the CPU.

    Uses ``weights_only=True`` with the numpy types nnU-Net writes allowed. A checkpoint holding
    other objects is refused unless ``trust`` is set, in which case it is fully unpickled (which
    can run code from the file) with a warning.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(_numpy_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        foreign = [name for name in pickled_globals(path) if name.split(".")[0] not in DATA_MODULES]
        refused = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), None)
        if not trust and foreign:
            raise CheckpointError(
                f"checkpoint {path} holds code: unpickling it would call {', '.join(dict.fromkeys(foreign))}; it was "
                "refused and nothing ran. Use the checkpoint_final.pth your nnU-Net training wrote; only if you trust "
                "this file's source, --trust-checkpoint (trust=True) unpickles it fully, running that code") from exc
        if refused is None and not foreign:  # not a refused type: the bytes themselves are not a valid pickle
            raise _corrupt(path, exc) from exc
        if not trust:
            raise CheckpointError(
                f"checkpoint {path} holds objects that a weights-only load refuses ({refused}). "
                "If you trust where this file comes from, pass --trust-checkpoint (trust=True) to unpickle it "
                "fully; unpickling can run code from the file") from exc
        warnings.warn(f"fully unpickling {path} because trust=True: this can run code from the file", stacklevel=2)
        checkpoint = _unpickle_trusted(path)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise _corrupt(path, exc) from exc
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise CheckpointError(f"{path} is not an nnU-Net checkpoint: it has no 'network_weights' entry "
                              "(expected the checkpoint_final.pth that nnU-Net v2 training writes)")
    return checkpoint


def _pickle_bytes(path: Path) -> bytes:
    """The pickle of a checkpoint: the ``data.pkl`` member of torch's zip format, else the file itself."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            return archive.read(member) if member else b""
    return path.read_bytes()


def pickled_globals(path: Path) -> list[str]:
    """``module.name`` of every global the checkpoint's pickle would look up when unpickled, read from its
    opcodes without executing anything (a truncated pickle gives what was read before the end)."""
    names: list[str] = []
    strings: list[str] = []  # string constants pushed so far (STACK_GLOBAL takes module and name from them)
    memo: dict[int, str | None] = {}
    last: str | None = None  # the string the previous opcode pushed, if it pushed one
    try:
        for op, arg, _ in pickletools.genops(_pickle_bytes(path)):
            pushed = None
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name in _STRING_OPS:
                pushed = arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
            elif op.name == "MEMOIZE":
                memo[len(memo)] = last
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = last
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(int(arg))
            if pushed is not None:
                strings.append(pushed)
            last = pushed if op.name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT") else last
    except (ValueError, EOFError, OSError, zipfile.BadZipFile, KeyError):
        pass
    return names


def _unpickle_trusted(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        raise _corrupt(path, exc) from exc


def _corrupt(path: Path, exc: BaseException) -> CheckpointError:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # torch's weights-only errors start with advice; the actual reason is on a later line
    reason = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else type(exc).__name__)
    return CheckpointError(f"checkpoint {path} is corrupt or truncated ({reason}); "
                           "download or copy it again from the trained model")


def non_finite(weights: Mapping[str, torch.Tensor]) -> str | None:
    """The first weight tensor holding NaN or infinite values, or ``None`` (such a network segments nothing)."""
    return next((name for name, tensor in weights.items()
                 if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())), None)


def state_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor]) -> str | None:
    """What differs between two state dicts (missing/unexpected keys, shapes), or None if they fit."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
                   if k in found and tuple(found[k].shape) != tuple(v.shape)]
    problems = [f"{label}: {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("shape (file vs expected)", wrong_shape)) if items]
    return "; ".join(problems) or None
