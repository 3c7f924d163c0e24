"""The OpenVINO cache: each network converted once (IR ``model.xml``/``model.bin``) and compiled once per precision
and CPU (an exported blob), in ``<cache>/openvino/<key>/``, where ``key`` is the checksum of the network's source
files (see ``inference.folder_key``).

Nothing in the cache is trusted by name, size or date: ``record.json`` beside the files holds the source checksum
and the sha256 of every file written, and each file is checked against it whenever it is loaded (a blob is checked
in memory, on the very bytes OpenVINO imports). A file that fails, that the record does not name, that OpenVINO
cannot read, or that reads as another network than one input of the patch shape and one output, is not used: the
network is converted or compiled again, a one-line ``CacheWarning`` says so (never OpenVINO's parser message), and
the rebuilt file replaces it.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..checksums import sha256_bytes, sha256_file
from ..paths import cache_warning

RECORD = "record.json"
STEM = "model"  # the converted network's IR: model.xml, model.bin
FORMAT = 1


class NetworkCache:
    """One network's folder in the OpenVINO cache (see the module docstring), for inputs of ``shape``."""

    def __init__(self, folder: Path, source: str, shape: tuple[int, ...]) -> None:
        self.folder, self.source, self.shape = folder, source, tuple(shape)

    def _record(self) -> dict[str, str]:
        """The recorded sha256 of each file; empty when the record is missing, unreadable or for another source."""
        try:
            record = json.loads((self.folder / RECORD).read_text())
        except (OSError, UnicodeDecodeError, ValueError):
            return {}
        ok = isinstance(record, dict) and record.get("format") == FORMAT and record.get("source") == self.source
        files = record.get("files") if ok else None
        return {k: v for k, v in files.items() if isinstance(v, str)} if isinstance(files, dict) else {}

    def _remember(self, name: str, digest: str) -> None:
        """Record ``name``'s sha256 (the record is replaced whole)."""
        record = {"format": FORMAT, "source": self.source, "files": {**self._record(), name: digest}}
        _write_whole(self.folder / RECORD, json.dumps(record, indent=1).encode())

    def _failed(self, name: str, why: str) -> None:
        cache_warning(f"the OpenVINO cache's {self.folder / name} {why}; it is not used: building it again")

    def _verified(self, name: str, digest: str | None) -> bool:
        """Whether ``name``'s ``digest`` (None: the file is missing) matches the record; warns when it does not."""
        expected = self._record().get(name)
        if digest is None:
            return False
        if expected != digest:
            self._failed(name, "is not in the cache's record" if expected is None else
                         "changed since it was written (sha256 mismatch)")
            return False
        return True

    def converted(self, core: Any, stem: str = STEM) -> Any | None:
        """The converted network (``stem``: another IR of it, e.g. its int8 form), when its IR files are there and
        match the record."""
        xml, weights = self.folder / f"{stem}.xml", self.folder / f"{stem}.bin"
        for path in (xml, weights):
            if not self._verified(path.name, sha256_file(path) if path.is_file() else None):
                return None
        try:
            model = core.read_model(xml, weights)
        except RuntimeError:  # its text is OpenVINO's parser message: the warning says which file, in one line
            model = None
        if model is None or not self._fits(model):
            self._failed(xml.name, "cannot be read as the converted network")
            return None
        return model

    def save_converted(self, ov: Any, model: Any, stem: str = STEM) -> None:
        """Write the converted network's IR ``stem``.xml/.bin (each file whole) and record their sha256."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            return  # e.g. a file in its place: converted again next time
        staging = self.folder / f".{os.getpid()}.partial.xml"
        try:
            ov.save_model(model, staging, compress_to_fp16=False)
            for name, part in ((f"{stem}.bin", staging.with_suffix(".bin")), (f"{stem}.xml", staging)):
                digest = sha256_file(part)
                os.replace(part, self.folder / name)
                self._remember(name, digest)
        except (OSError, RuntimeError):  # OpenVINO reports a failed write (e.g. a full disk) as a RuntimeError
            pass  # the cache is an optimisation: converted again next time
        finally:
            for part in (staging, staging.with_suffix(".bin")):
                part.unlink(missing_ok=True)

    def compiled(self, core: Any, name: str, config: dict[str, Any]) -> Any | None:
        """The compiled network ``name`` imported from its blob, when the blob's bytes match the record."""
        try:
            data = (self.folder / name).read_bytes()
        except OSError:
            data = None
        if not self._verified(name, None if data is None else sha256_bytes(data)):
            return None
        try:
            compiled = core.import_model(data, "CPU", config)
        except RuntimeError:
            compiled = None
        if compiled is None or not self._fits(compiled):
            self._failed(name, "cannot be imported as the compiled network")
            return None
        return compiled

    def _fits(self, network: Any) -> bool:
        """Whether ``network`` (read or imported) takes one input of the patch shape and gives one output."""
        inputs = network.inputs
        if len(inputs) != 1 or len(network.outputs) != 1 or not inputs[0].get_partial_shape().is_static:
            return False
        return tuple(inputs[0].get_partial_shape().to_shape()) == self.shape

    def save_compiled(self, name: str, compiled: Any) -> None:
        """Export the compiled network as blob ``name`` (whole) and record its sha256."""
        exported = compiled.export_model()
        data = exported.getvalue() if hasattr(exported, "getvalue") else bytes(exported)  # BytesIO in OpenVINO 2026
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_whole(self.folder / name, data)
            self._remember(name, sha256_bytes(data))
        except OSError:
            pass  # the cache is an optimisation: compiled again next time


def _write_whole(path: Path, data: bytes) -> None:
    """``data`` into ``path`` under a temporary name, then renamed: whole or absent."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        staging.write_bytes(data)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


def remove_old_layout(root: Path) -> None:
    """Remove what earlier versions kept unverified in ``root`` (``<key>.xml``/``.bin`` and OpenVINO's own
    ``compiled/`` folder): never read again, only taking space."""
    for path in [*root.glob("*.xml"), *root.glob("*.bin")]:
        path.unlink(missing_ok=True)
    shutil.rmtree(root / "compiled", ignore_errors=True)


def blob_name(core: Any, precision: str, config: dict[str, Any]) -> str:
    """The compiled blob's name for this precision, compile settings and CPU (a blob compiled on another CPU, or
    by another OpenVINO, is never imported)."""
    import openvino as ov
    machine = [core.get_property("CPU", "FULL_DEVICE_NAME"), core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
               os.cpu_count(), ov.__version__, sorted(config.items())]
    return f"{precision}-{sha256_bytes(json.dumps(machine, default=str).encode())[:16]}.blob"
