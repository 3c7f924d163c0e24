"""Shared fixtures: nnU-Net v2 model folders with real architectures and random weights; an isolated
TotalSegmentator home and variant cache, so no test sees (or writes) the user's own."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from TuckerSegmentLib.testing.example_models import write_example_model
from TuckerSegmentLib.variants.choice import bundled_models

# one thread per test process when pytest-xdist runs two of them on this project's two cores
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, torch.get_num_threads())))
# beside the system's temporary folder (the same for pytest-xdist's processes, which inherit TMPDIR set below)
_ISOLATED = Path(tempfile.mkdtemp(prefix="tuckersegment-tests-",
                                  dir=os.environ.setdefault("TUCKERSEGMENT_TESTS_TMP_ROOT", tempfile.gettempdir())))
os.environ.pop("TOTALSEG_WEIGHTS_PATH", None)
os.environ["TOTALSEG_HOME_DIR"] = str(_ISOLATED / "totalsegmentator")  # empty: no TotalSegmentator weights
os.environ["TUCKERSEGMENT_CACHE"] = str(_ISOLATED / "cache")
# temporary folders of this test process apart from another's (pytest-xdist): tests that check the Logic leaves
# none behind look at this process's own
(_ISOLATED / "tmp").mkdir()
os.environ["TMPDIR"] = tempfile.tempdir = str(_ISOLATED / "tmp")


def process_ended(pid: int) -> bool:
    """Whether process ``pid`` has ended: gone, or a zombie nobody has reaped yet (an orphan's parent here may be a
    container's init that does not reap)."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (ProcessLookupError, FileNotFoundError):
        return True


def bundled(model_id: str) -> Path:
    """The folder of a bundled demo model."""
    return next(e["path"] for e in bundled_models() if e["id"] == model_id)


def renamed_copy(source: Path, target: Path, prefix: str) -> Path:
    """A copy of a model whose structures carry other names (a second model of the same task)."""
    shutil.copytree(source, target)
    dataset = json.loads((target / "dataset.json").read_text())
    dataset["labels"] = {(k if k == "background" else prefix + k): v for k, v in dataset["labels"].items()}
    (target / "dataset.json").write_text(json.dumps(dataset))
    (target / "terminology.csv").unlink()
    return target


CONFIG = "3d_fullres"


def arch(plans: dict[str, Any]) -> dict[str, Any]:
    return plans["configurations"][CONFIG]["architecture"]


def hub_payload(plans: dict[str, Any], folder: Path) -> None:
    """torch.hub.load of a local "repository" (the folder itself) runs its hubconf.py."""
    (folder / "hubconf.py").write_text(f"open({str(folder / 'PWNED')!r}, 'w').write('code ran')\n"
                                       "def model(**kwargs):\n    return None\n")
    arch(plans)["network_class_name"] = "torch.hub.load"
    arch(plans)["arch_kwargs"] = {"repo_or_dir": str(folder), "model": "model", "source": "local"}
    arch(plans)["_kw_requires_import"] = []


def hostile_copy(tiny_model: Path, tmp_path: Path, edit: Callable[[dict[str, Any], Path], None]) -> Path:
    folder = tmp_path / "models" / tiny_model.name
    shutil.copytree(tiny_model, folder)
    plans = json.loads((folder / "plans.json").read_text())
    edit(plans, folder)
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` (to prove a folder was left untouched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def ts_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty TotalSegmentator home and build cache for one test; returns its nnU-Net results folder. Builds
    there make the bf16 and int8 forms only when a test asks for them (``precisions``; test_int8 does): on
    full-size random weights every form costs a quantization and three more segmentations per volume."""
    from TuckerSegmentLib.variants import build, forms
    monkeypatch.setattr(build, "cpu_forms", lambda device, asked=None: forms.cpu_forms(device, asked or ()))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "totalseg"))
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "totalseg" / "nnunet" / "results"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small PlainConvUNet (8-16-32 features, 3 foreground classes), nnU-Net checkpoint, folds 0 and 1."""
    return write_example_model(tmp_path_factory.mktemp("tiny"), "tiny", seed=1, folds=(0, 1))


@pytest.fixture(scope="session")
def tiny_compressed(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``tiny_model`` compressed by the paper's uniform rule at factor 0.5, weight-only (tests only read it)."""
    from TuckerSegmentLib.compress.folder import compress_model_folder
    from TuckerSegmentLib.policies.methods import policy_for
    out = tmp_path_factory.mktemp("tiny-compressed") / "tiny-uniform-0.5"
    compress_model_folder(tiny_model, out, policy_for("uniform", 0.5), weight_only=True)
    return out


@pytest.fixture(scope="session")
def dataset291_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TotalSegmentator's Dataset291 architecture (31.19 M parameters) with random weights."""
    return write_example_model(tmp_path_factory.mktemp("ts291"), "Dataset291", seed=0)


@pytest.fixture
def scene(tmp_path):
    """A fresh headless Slicer scene (real MRML, slicer-core) as ``slicer.mrmlScene``."""
    import headless_slicer
    return headless_slicer.setup(tmp_path / "slicer_home")


@pytest.fixture(scope="module")
def logic():
    """The module's Logic (the model it loads is kept for the module's tests)."""
    import headless_slicer
    headless_slicer.setup()
    import TuckerSegment
    return TuckerSegment.TuckerSegmentLogic()


@pytest.fixture
def ct_node(scene):
    """The sample chest CT loaded with Slicer's volumes logic."""
    import headless_slicer
    import slicerio
    return headless_slicer.load_volume(slicerio.get_testdata_file("CTChest4.nrrd"), "CT")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """This test process's isolated home, cache and temporary folders go with it; multiprocessing's own folders it
    removes itself as the interpreter exits, after this."""
    for path in [*(_ISOLATED.iterdir()), *((_ISOLATED / "tmp").iterdir())]:
        if path.name != "tmp" and not path.name.startswith("pymp-"):
            shutil.rmtree(path, ignore_errors=True)
