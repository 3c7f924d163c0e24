"""Where TuckerSegment's files live: the bundled resources and the user cache. Imports nothing of the engine but
errors."""
from __future__ import annotations

import os
import re
import sys
import warnings
from pathlib import Path

from .errors import CacheWarning, OutputPathError

RESOURCES = Path(__file__).resolve().parents[1] / "Resources"
BUNDLED_MODELS = RESOURCES / "Models"
CATALOGUE_JSON = RESOURCES / "variants.json"
TASKS_JSON = RESOURCES / "Tasks" / "totalsegmentator.json"
TERMINOLOGY_DIR = RESOURCES / "Terminology"


def checked_path(path: str | Path, error: type[Exception], role: str) -> Path:
    """``path`` made absolute with its symbolic links resolved, refusing with ``error`` (naming the ``role``:
    "input", "output", "model folder") what the libraries below cannot open: a name that is not valid UTF-8
    (SimpleITK aborts the process on it) and a symbolic link loop."""
    path = Path(path).expanduser()
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise error(f"the {role} {str(path)!r} has a name that is not valid UTF-8, which the imaging libraries "
                    "cannot open; rename it") from None
    try:
        return path.resolve()
    except (RuntimeError, OSError) as exc:  # Python 3.11 reports a loop as RuntimeError, 3.13 as OSError
        raise error(f"the {role} {path} cannot be resolved ({exc}): it is a symbolic link loop or unreadable; "
                    "give the real file or folder") from None


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,199}")


def is_plain_name(value: object) -> bool:
    """Whether ``value`` is a string that is one harmless path component (``Dataset123_Name``, ``nnUNetPlans``,
    ``3d_fullres``): letters, digits and ``_.+-``, not starting with a dot, no separator, at most 200 characters."""
    return isinstance(value, str) and PLAIN_NAME.fullmatch(value) is not None


def plain_relative(value: object) -> bool:
    """Whether ``value`` is a relative path of plain names (``fold_0/weights.safetensors``): never absolute,
    never ``..``, so joined to a folder it stays inside it."""
    return isinstance(value, str) and all(is_plain_name(part) for part in value.split("/"))


def cache_dir() -> Path:
    """The user cache (built variants, latency tables, my variants): ``TUCKERSEGMENT_CACHE``, else the
    platform's user cache folder."""
    if os.environ.get("TUCKERSEGMENT_CACHE"):
        return Path(os.environ["TUCKERSEGMENT_CACHE"]).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "TuckerSegment" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "TuckerSegment"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tuckersegment"


CACHE_FIX = "set TUCKERSEGMENT_CACHE to a writable folder"
_SAID: set[Path] = set()  # unusable cache folders already warned about in this process


def _unusable(root: Path, folder: Path) -> tuple[Path, str] | None:
    """Which of the cache ``root`` and its subfolder ``folder`` (each created when missing) cannot hold files, and
    why; None when both can. The cache is checked first, so a cache that cannot be created is the one named."""
    for level in (root, folder):
        try:
            level.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            return level, "is a file, not a folder"
        except OSError as exc:
            return level, f"cannot be created ({exc.strerror or exc})"
        if not os.access(level, os.W_OK | os.X_OK):
            return level, "is not writable"
    return None


def cache_folder(*parts: str, cache: Path | None = None) -> Path | None:
    """``<cache>/<parts>``, created, for what the cache only speeds up (converted networks, latency tables,
    evaluations); None when it cannot hold files, said once per folder in a one-line ``CacheWarning``: the caller
    then works without a cache."""
    root = cache or cache_dir()
    folder = root.joinpath(*parts)
    problem = _unusable(root, folder)
    if problem is None:
        _SAID.difference_update((root, folder))
        return folder
    where, why = problem
    if where not in _SAID:
        _SAID.add(where)
        cache_warning(f"the cache folder {where} {why}: working without a cache; {CACHE_FIX}")
    return None


def cache_warning(message: str) -> None:
    """Warn ``message`` as a ``CacheWarning`` placed at no source line, so that a terminal shows it in one line."""
    warnings.warn_explicit(CacheWarning(message), CacheWarning, "tuckersegment", 0, module=__name__)


def product_folder(what: str, *parts: str, cache: Path | None = None) -> Path:
    """``<cache>/<parts>``, created, for ``what`` is kept only in the cache (built variants, the list of the user's
    variants); refused with an ``OutputPathError`` naming the folder and the fix when it cannot hold files."""
    root = cache or cache_dir()
    folder = root.joinpath(*parts)
    problem = _unusable(root, folder)
    if problem is not None:
        where, why = problem
        raise OutputPathError(f"cannot keep {what}: the cache folder {where} {why}; {CACHE_FIX}")
    return folder


def state_folder(output: str | Path, method: str) -> Path:
    """Where a training run (``distill``, ``finetune``) writing ``output`` keeps its state: ``<output>.<method>-state``
    beside it."""
    output = Path(output).expanduser().resolve()
    return output.with_name(f"{output.name}.{method}-state")


def distill_source_folder(output: str | Path) -> Path:
    """Where a compressed model waits for its distillation: ``<output>.distill-source`` beside ``output``."""
    output = Path(output).expanduser().resolve()
    return output.with_name(f"{output.name}.distill-source")
