"""One source of dependency versions: ``dependencies.py`` ranges, the same ranges and Python floor in
``pyproject.toml``, exact pins inside them in ``requirements/constraints.txt`` (and ``requirements.txt``)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

from TuckerSegmentLib.dependencies import PYTHON_MINIMUM, REQUIREMENTS, TORCH, Requirement, satisfies

ROOT = Path(__file__).resolve().parents[3]


def pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a requirements file, by normalised name."""
    found = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if match:
            found[normalise(match.group(1))] = match.group(2)
    return found


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_pyproject_lists_exactly_the_ranges_of_dependencies_py():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert sorted(project["dependencies"]) == sorted(r.pip for r in REQUIREMENTS)
    assert project["requires-python"] == f">={PYTHON_MINIMUM}"


def test_every_pin_lies_inside_its_range():
    constraints = pins(ROOT / "requirements" / "constraints.txt")
    for requirement in REQUIREMENTS:
        pinned = constraints.get(normalise(requirement.distribution))
        assert pinned is not None, f"{requirement.distribution} is not pinned in constraints.txt"
        assert satisfies(requirement, pinned), f"{requirement.distribution}=={pinned} is outside {requirement.pip}"


def test_requirements_txt_pins_what_constraints_pin():
    constraints = pins(ROOT / "requirements" / "constraints.txt")
    direct = pins(ROOT / "requirements" / "requirements.txt")
    assert {normalise(r.distribution) for r in REQUIREMENTS} <= set(direct)
    for name, version in direct.items():
        assert constraints.get(name) == version, f"{name}: requirements.txt {version}, constraints.txt {constraints.get(name)}"


def test_ranges_exclude_what_the_dependencies_themselves_exclude():
    assert TORCH.pip == "torch>=2.5,!=2.9.*"
    assert not satisfies(TORCH, "2.9.1+cu126") and satisfies(TORCH, "2.13.0+cpu") and not satisfies(TORCH, "2.4.1")
    bounded = Requirement("nnunetv2", "nnunetv2", "2.8.1", "2.9")
    assert satisfies(bounded, "2.8.1") and not satisfies(bounded, "2.9.0") and not satisfies(bounded, "2.8.0")
