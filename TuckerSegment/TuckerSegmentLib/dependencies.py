"""Which Python packages the engine needs, and which are missing or of an untested version.

The one source of version ranges: ``pyproject.toml`` lists the same ranges and
``requirements/constraints.txt`` pins versions inside them (``test_versions`` fails when they drift).
Importable without any of them (the package's ``__init__`` imports nothing eagerly), so Slicer can
check before the first use and offer to install; nothing is ever installed at import time.
"""
from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata


@dataclass(frozen=True)
class Requirement:
    """A distribution (pip name), the module it provides, and the versions the engine is tested with."""

    distribution: str
    module: str
    minimum: str
    below: str | None = None
    excluded: str | None = None  # a release series left out, e.g. "2.9" for every 2.9.x
    recommended: bool = False  # installed with the others, but the engine runs without it

    @property
    def specifier(self) -> str:
        """The version range as pip writes it, e.g. ``>=0.10,<0.11``."""
        return (f">={self.minimum}" + (f",<{self.below}" if self.below else "")
                + (f",!={self.excluded}.*" if self.excluded else ""))

    @property
    def pip(self) -> str:
        """The pip requirement string."""
        return self.distribution + self.specifier


PYTHON_MINIMUM = "3.11"  # tensorly 0.10 needs it (nnU-Net 2.8 needs 3.10); Slicer 5.10 ships 3.12
SLICER_MINIMUM = (5, 10)  # the first Slicer with a Python >= PYTHON_MINIMUM (5.8 ships 3.9.10)
# torch: a recent build (CPU, or the CUDA build matching the GPU, which Slicer's PyTorch extension picks),
# without the 2.9 series that nnU-Net 2.8.1 excludes; the others bounded to the versions tested
# (nnU-Net's predictor internals change between minor releases).
TORCH = Requirement("torch", "torch", "2.5", excluded="2.9")
REQUIREMENTS = (
    TORCH,
    Requirement("tensorly", "tensorly", "0.10", "0.11"),
    NNUNET := Requirement("nnunetv2", "nnunetv2", "2.8.1", "2.9"),
    # nnU-Net 2.8.1 asks this range; installers were seen to leave acvl_utils 0.2 behind
    Requirement("acvl-utils", "acvl_utils", "0.2.6", "0.3"),
    Requirement("dynamic-network-architectures", "dynamic_network_architectures", "0.4.4", "0.5"),
    Requirement("safetensors", "safetensors", "0.8", "1"),
    Requirement("nibabel", "nibabel", "5.0", "6"),
    Requirement("SimpleITK", "SimpleITK", "2.2.1", "3"),
    Requirement("slicerio", "slicerio", "1.4", "2"),
    Requirement("numpy", "numpy", "1.25", "3"),
    Requirement("scipy", "scipy", "1.11", "2"),  # evaluation statistics (Wilcoxon)
    Requirement("matplotlib", "matplotlib", "3.7", "4"),  # evaluation plots
    Requirement("torch-pruning", "torch_pruning", "1.6", "1.7"),  # the filter-pruning methods
    # the CPU runtime; without it PyTorch runs the network (runtime.inference says so)
    Requirement("openvino", "openvino", "2026.0", "2027", recommended=True),
    Requirement("nncf", "nncf", "3.4", "4", recommended=True),  # OpenVINO's quantizer: the int8 precision
)


@dataclass(frozen=True)
class Problem:
    """A requirement that is not met: missing (``installed`` None) or of another version."""

    requirement: Requirement
    installed: str | None

    @property
    def blocking(self) -> bool:
        """Whether the engine cannot run without it (a recommended package only makes it faster)."""
        return not self.requirement.recommended

    def __str__(self) -> str:
        if self.installed is None:
            return f"{self.requirement.distribution} is not installed"
        return f"{self.requirement.distribution} {self.installed} is installed; TuckerSegment needs {self.requirement.pip}"


def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or ``None``."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def openvino_missing() -> str | None:
    """Why OpenVINO cannot run here, or None."""
    if importlib.util.find_spec("openvino") is None:
        return "OpenVINO is not installed (pip install openvino)"
    return None


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading numbers of a version: ``2.13.0+cpu`` -> (2, 13, 0); ``2.9.0rc1`` -> (2, 9, 0)."""
    numbers = []
    for part in text.split("+")[0].split("."):
        digits = re.match(r"\d+", part)
        if digits is None:
            break
        numbers.append(int(digits.group()))
    return tuple(numbers)


def satisfies(requirement: Requirement, version: str) -> bool:
    """Whether ``version`` lies in the requirement's range."""
    have = version_tuple(version)
    excluded = version_tuple(requirement.excluded) if requirement.excluded else None
    return (have >= version_tuple(requirement.minimum)
            and (requirement.below is None or have < version_tuple(requirement.below))
            and (excluded is None or have[:len(excluded)] != excluded))


def problems(version_of: Callable[[str], str | None] = installed_version) -> list[Problem]:
    """Every requirement that is missing or of a version outside the tested range."""
    found = []
    for requirement in REQUIREMENTS:
        version = version_of(requirement.distribution)
        if version is None or not satisfies(requirement, version):
            found.append(Problem(requirement, version))
    return found



def platform_problem(python: tuple[int, ...], slicer: tuple[int, int] | None = None) -> str | None:
    """Why this Python (or this 3D Slicer) cannot run TuckerSegment, or None. Parses under Python 3.9, so
    an old Slicer can load the module and show this message."""
    if slicer is not None and tuple(slicer) < SLICER_MINIMUM:
        return (f"TuckerSegment needs 3D Slicer {SLICER_MINIMUM[0]}.{SLICER_MINIMUM[1]} or newer (Python "
                f"{PYTHON_MINIMUM}+); this is Slicer {slicer[0]}.{slicer[1]} with Python "
                f"{python[0]}.{python[1]}: install a current Slicer from download.slicer.org")
    if tuple(python[:2]) < version_tuple(PYTHON_MINIMUM):
        return (f"TuckerSegment needs Python {PYTHON_MINIMUM} or newer; this is Python {python[0]}.{python[1]}"
                + (": install a current 3D Slicer from download.slicer.org" if slicer is not None else ""))
    return None
