"""Write a whole output folder or nothing: build it beside the target, then rename it into place."""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputPathError
from .paths import checked_path

DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # no space, file too large, quota
# what the longest name written beside an output adds to the output's name: the staging folder of a training
# state, ".<name>.distill-state.<pid>.<8 random>.partial" (a 250-byte name failed there with an OSError)
SIBLING_ROOM = 48


Input = tuple[str, "str | Path"]  # what a command reads: (what it is, e.g. "teacher model folder"; its path)


def path_inputs(role: str, items: Iterable[object] | None) -> list[Input]:
    """The entries of ``items`` that are paths (file names given by the user), each as an input to protect;
    in-memory volumes are skipped."""
    return [(role, item) for item in items or () if isinstance(item, (str, Path))]


def refuse_overlap(output: Path, inputs: Iterable[Input]) -> None:
    """Refuse an output that is, lies inside or contains any input the command reads (model folders, data sets,
    images, label maps, variants, CTs), ``--overwrite`` or not: writing it would replace or hide that input."""
    for role, given in inputs:
        path = checked_path(given, OutputPathError, role)
        relation = ("is" if output == path else "lies inside" if path in output.parents
                    else "contains" if output in path.parents else None)
        if relation:
            raise OutputPathError(f"output {output} {relation} the {role} {path}, which this command reads; choose "
                                  "an output outside every input (inputs are never modified)")


def _refuse_long_name(target: Path) -> None:
    """Refuse a name too long for the files written beside it (staging copies, locks, training states)."""
    try:
        most = os.pathconf(target.parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    except OSError:  # a parent that does not exist is named by the checks after this one
        most = 255
    size = len(os.fsencode(target.name))
    if size > most - SIBLING_ROOM:
        raise OutputPathError(f"output name {target.name[:40]}... is {size} bytes long; at most {most - SIBLING_ROOM} "
                              "leave room for the files written beside it: choose a shorter name")


def check_output_dir(target: Path, overwrite: bool = False, inputs: Iterable[Input] = ()) -> Path:
    """Resolve ``target`` and refuse, before any work, what could not be written or would destroy data: an output
    over any of ``inputs`` (see ``refuse_overlap``), an existing one without ``overwrite``, an unwritable one, a
    name too long."""
    target = checked_path(target, OutputPathError, "output")
    _refuse_long_name(target)
    refuse_overlap(target, inputs)
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
    """Yield a temporary folder beside ``target``; on success it replaces ``target``, on error it vanishes.
    The target is claimed for the whole run (a second run writing it at once is refused)."""
    target = check_output_dir(target, overwrite)
    with _claimed(target):
        target = check_output_dir(target, overwrite)  # again, now that no other run can create it meanwhile
        remove_stale(target)
        try:
            staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(target), suffix=".partial", dir=target.parent))
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
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            _raise_if_disk_full(error, target)
            raise


def _staging_prefix(target: Path) -> str:
    """Staging names carry the writer's process id, so a later run can tell a dead run's leftovers."""
    return f".{target.name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (always assumed on Windows, where probing could end it)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the partial files and folders, retired ``.old-*`` copies and ``.lock`` claims that runs which no
    longer exist left beside ``target``; never a live run's. Returns what was removed."""
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(?:(\d+)\.[^.]+\.partial.*|old-(\d+))$")
    removed = []
    for path in target.parent.iterdir() if target.parent.is_dir() else ():
        match = pattern.match(path.name)
        if match and not _alive(int(match.group(1) or match.group(2))):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    lock = target.with_name(f".{target.name}.lock")
    if lock.is_file() and not _alive(_lock_owner(lock) or 0):
        lock.unlink(missing_ok=True)
        removed.append(lock)
    return removed


def _lock_owner(lock: Path) -> int | None:
    """The process id a ``.lock`` claim holds (None when it cannot be read)."""
    try:
        return int(lock.read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


@contextmanager
def _claimed(target: Path) -> Iterator[None]:
    """Hold ``.<name>.lock`` beside ``target`` (holding the process id) for the duration; a lock whose process
    has gone is taken over."""
    lock = target.with_name(f".{target.name}.lock")
    for _attempt in range(2):
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner and _alive(owner):
                raise OutputPathError(f"another TuckerSegment run (process {owner}) is writing {target}; wait for it "
                                      "to finish or choose another output") from None
            lock.unlink(missing_ok=True)  # its run has gone
            continue
        except OSError as exc:
            raise OutputPathError(f"cannot write in {target.parent} ({exc.strerror}); choose a writable location") from exc
        with os.fdopen(handle, "w") as file:
            file.write(str(os.getpid()))
        break
    else:
        raise OutputPathError(f"cannot claim {target} (its lock {lock} keeps reappearing); try again")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def refuse_existing(target: Path, overwrite: bool = False) -> None:
    """An existing output is replaced only when asked (and then only once the new file is complete)."""
    if not overwrite and Path(target).exists():
        raise OutputPathError(f"{target} exists; pass --overwrite (overwrite=True) to replace it; the old file is kept "
                              "until the new one is completely written")


def check_output_file(target: Path, inputs: Iterable[Input] = ()) -> Path:
    """Resolve an output file path and refuse, before any work, one that cannot be written or is an input."""
    target = checked_path(target, OutputPathError, "output")
    _refuse_long_name(target)
    refuse_overlap(target, inputs)
    if target.is_dir():
        raise OutputPathError(f"output {target} is a folder; give a file name (.seg.nrrd or .nii.gz)")
    if target.exists() and not target.is_file():
        raise OutputPathError(f"output {target} is not a regular file (a device or socket); give a file name "
                              "(.seg.nrrd or .nii.gz) in a folder")
    if not target.parent.is_dir():
        raise OutputPathError(f"cannot write {target}: its folder {target.parent} does not exist; create it first")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {target}: no write permission in {target.parent}; choose a writable location")
    return target


@contextmanager
def atomic_output_file(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target`` (same suffixes); on success it replaces ``target``."""
    target = check_output_file(target)
    remove_stale(target)
    suffix = "".join(target.suffixes[-2:])
    try:
        handle, name = tempfile.mkstemp(prefix=_staging_prefix(target), suffix=f".partial{suffix}", dir=target.parent)
    except OSError as exc:
        raise OutputPathError(f"cannot write in {target.parent} ({exc.strerror}); choose a writable location") from exc
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        os.chmod(staging, 0o644)
        os.replace(staging, target)
    except BaseException as error:
        staging.unlink(missing_ok=True)
        _raise_if_disk_full(error, target)
        raise


def _raise_if_disk_full(error: BaseException, target: Path) -> None:
    """A write that failed for want of space, whatever library wrote, as one clear error."""
    if isinstance(error, OSError) and error.errno in DISK_FULL:
        raise OutputPathError(f"cannot write {target}: {error.strerror}; free disk space (or raise the file size "
                              "limit) and run again; nothing was written") from error
