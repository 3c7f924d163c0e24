"""Write a whole output folder or nothing: build it beside the target, then rename it into place."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError


def check_output_dir(target: Path, overwrite: bool = False, protected: Path | None = None) -> Path:
    """Resolve ``target`` and refuse, before any work, what could not be written or would destroy data."""
    target = Path(target).expanduser().resolve()
    if protected is not None:
        protected = protected.resolve()
        if target == protected or protected in target.parents or target in protected.parents:
            raise OutputPathError(f"output {target} overlaps the source model folder {protected}; "
                                  "choose an output folder outside it (the source is never modified)")
    if target.exists() and not overwrite:
        raise OutputPathError(f"output {target} already exists; choose a new folder or pass --overwrite")
    if target.exists() and not target.is_dir():
        raise OutputPathError(f"output {target} exists and is a file; choose a folder path")
    parent = target.parent
    if not parent.is_dir():
        raise OutputPathError(f"cannot write {target}: its parent folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {target}: no write permission in {parent}; choose a writable location")
    return target


@contextmanager
def atomic_output_dir(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``target``; on success it replaces ``target``, on error it vanishes."""
    target = check_output_dir(target, overwrite)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise OutputPathError(f"cannot write in {target.parent} ({exc.strerror}); choose a writable location") from exc
    try:
        yield staging
        os.chmod(staging, 0o755)
        if target.exists():
            retired = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.rename(target, retired)
            try:
                os.rename(staging, target)
            except OSError:
                os.rename(retired, target)
                raise
            shutil.rmtree(retired)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
