"""Packaging checks for the Slicer extension (standard library only, no Slicer, no Qt).

The panel (.ui) against the module that loads it, the module's CMake file lists against the files
Slicer needs, the extension's CMake metadata and the Extensions Index entry (TuckerSegment.json)
against Slicer's catalog-entry schema v1.0.1.
"""
from __future__ import annotations

import ast
import json
import re
import struct
import subprocess
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path, PurePosixPath

import pytest

ROOT = Path(__file__).resolve().parents[3]
MODULE_DIR = ROOT / "TuckerSegment"
MODULE_PY = MODULE_DIR / "TuckerSegment.py"
PARAMETERS_PY = MODULE_DIR / "TuckerSegmentModule" / "Parameters.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "TuckerSegment.ui"
INDEX_ENTRY = ROOT / "TuckerSegment.json"
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json"
# Slicer/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json: "additionalProperties": false.
SCHEMA_PROPERTIES = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                     "build_subdirectory", "enabled", "tier"}
SCHEMA_REQUIRED = {"$schema", "category", "scm_url"}

# What the panel must offer, whatever the widget code looks up today.
REQUIRED_WIDGETS = [
    "applyButton", "cancelButton", "progressBar", "statusLabel", "inputVolumeSelector", "outputSegmentationSelector",
    "taskComboBox", "variantComboBox", "deviceComboBox", "structureListWidget", "structureSearchBox",
    "tileStepSliderWidget", "runtimeComboBox", "precisionComboBox", "showStatisticsButton", "compressCollapsibleButton",
    "modelFolderPathLineEdit", "policyComboBox", "targetSpinBox", "calibrationVolumesSelector", "outputParentPathLineEdit",
    "outputNameLineEdit", "dependenciesLabel", "installButton",
    "compressButton", "compressCancelButton", "compressProgressBar", "reportTableView", "paretoPlotWidget", "addVariantButton",
]
# Widget name suffix -> classes a widget so named may be (or derive from); the longest suffix wins.
SUFFIX_CLASSES: dict[str, set[str]] = {
    "Button": {"QPushButton", "QToolButton", "ctkCollapsibleButton", "ctkMenuButton"},
    "CollapsibleButton": {"ctkCollapsibleButton"},
    "CheckBox": {"QCheckBox", "ctkCheckBox"},
    "ComboBox": {"QComboBox", "ctkComboBox"},
    "Selector": {"qMRMLNodeComboBox"},
    "Label": {"QLabel"},
    "LineEdit": {"QLineEdit", "ctkPathLineEdit"},
    "PathLineEdit": {"ctkPathLineEdit"},
    "SearchBox": {"ctkSearchBox"},
    "SpinBox": {"QSpinBox", "QDoubleSpinBox", "ctkDoubleSpinBox"},
    "SliderWidget": {"ctkSliderWidget"},
    "ListWidget": {"QListWidget"},
    "TableView": {"QTableView"},
    "PlotWidget": {"qMRMLPlotWidget"},
    "ProgressBar": {"QProgressBar"},
}
# Slicer/CTK-only members: a lookup that uses one needs a widget of these classes.
MEMBER_CLASSES: dict[str, set[str]] = {
    "setMRMLScene": {"qMRMLWidget", "qMRMLNodeComboBox", "qMRMLTableView", "qMRMLPlotWidget"},
    "currentNode": {"qMRMLNodeComboBox"},
    "setCurrentNode": {"qMRMLNodeComboBox"},
    "currentNodeID": {"qMRMLNodeComboBox"},
    "checkedNodes": {"qMRMLCheckableNodeComboBox"},
    "currentPath": {"ctkPathLineEdit"},
    "collapsed": {"ctkCollapsibleButton"},
}


# ---------------------------------------------------------------------------------------------- .ui


@cache
def ui_root() -> ET.Element:
    return ET.parse(UI_FILE).getroot()


def ui_widgets() -> dict[str, str]:
    """Widget name -> class, for every widget in the .ui."""
    return {w.get("name", ""): w.get("class", "") for w in ui_root().iter("widget")}


def ui_bases() -> dict[str, str]:
    """Custom class -> the class it extends, from <customwidgets>."""
    return {cw.findtext("class", ""): cw.findtext("extends", "") for cw in ui_root().iter("customwidget")}


def lineage(cls: str) -> set[str]:
    """``cls`` and every class it derives from, as far as the .ui declares (plus the standard Qt ones used here)."""
    qt_bases = {"QTableWidget": "QTableView", "QDoubleSpinBox": "QAbstractSpinBox", "QSpinBox": "QAbstractSpinBox"}
    bases, seen = ui_bases(), set()
    while cls and cls not in seen:
        seen.add(cls)
        cls = bases.get(cls) or qt_bases.get(cls, "")
    return seen


def module_source() -> str:
    """The Slicer side: the module file and its parts in TuckerSegmentModule/."""
    files = [MODULE_PY, *sorted((MODULE_DIR / "TuckerSegmentModule").glob("*.py"))]
    return "\n".join(path.read_text(encoding="utf-8") for path in files)


def test_ui_has_one_qmrmlwidget_at_the_top() -> None:
    root = ui_root()
    assert root.tag == "ui"
    top = root.findall("widget")
    assert [w.get("class") for w in top] == ["qMRMLWidget"]
    assert root.findtext("class") == top[0].get("name")


def test_ui_names_are_unique() -> None:
    names = [e.get("name", "") for tag in ("widget", "layout", "spacer") for e in ui_root().iter(tag)]
    assert all(names), "every widget, layout and spacer needs a name"
    duplicates = sorted({n for n in names if names.count(n) > 1})
    assert not duplicates


def test_ui_custom_classes_are_declared() -> None:
    declared = ui_bases()
    used = {e.get("class", "") for tag in ("widget", "layout") for e in ui_root().iter(tag)}
    undeclared = sorted(c for c in used if not re.fullmatch(r"Q[A-Z]\w*", c) and c not in declared)
    assert not undeclared
    for cls, base in declared.items():
        assert re.fullmatch(r"Q[A-Z]\w*", base) or base in declared, f"{cls} extends undeclared {base}"
    for cw in ui_root().iter("customwidget"):
        assert cw.findtext("header") == f"{cw.findtext('class')}.h"


def test_ui_offers_the_required_widgets() -> None:
    missing = sorted(set(REQUIRED_WIDGETS) - set(ui_widgets()))
    assert not missing


def test_widget_classes_follow_their_names() -> None:
    widgets = ui_widgets()
    for name, cls in widgets.items():
        suffixes = [s for s in SUFFIX_CLASSES if name.endswith(s)]
        if suffixes:
            allowed = SUFFIX_CLASSES[max(suffixes, key=len)]
            assert lineage(cls) & allowed, f"{name} is a {cls}, expected one of {sorted(allowed)}"


def test_module_lookups_exist_in_ui() -> None:
    """Every ``self.ui.<name>`` of the module names a .ui widget whose class supports what is used."""
    source, widgets = module_source(), ui_widgets()
    missing = sorted({n for n in re.findall(r"self\.ui\.(\w+)", source) if n not in widgets})
    assert not missing, f"looked up by the module but not in the .ui: {missing}"
    for name, member in set(re.findall(r"self\.ui\.(\w+)\.(\w+)", source)):
        if member in MEMBER_CLASSES:
            assert lineage(widgets[name]) & MEMBER_CLASSES[member], f"self.ui.{name}.{member}: {name} is a {widgets[name]}"


def parameter_node_fields() -> set[str]:
    tree = ast.parse(PARAMETERS_PY.read_text(encoding="utf-8"), filename=str(PARAMETERS_PY))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "TuckerSegmentParameterNode":
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    pytest.fail("Parameters.py has no class TuckerSegmentParameterNode")


def test_slicer_parameter_names_are_parameter_node_fields() -> None:
    bound = {p.findtext("string", ""): w.get("name") for w in ui_root().iter("widget")
             for p in w.findall("property") if p.get("name") == "SlicerParameterName"}
    assert bound, "the .ui binds no widget to the parameter node"
    unknown = sorted(set(bound) - parameter_node_fields())
    assert not unknown, f"SlicerParameterName without a TuckerSegmentParameterNode field: {unknown}"


# ------------------------------------------------------------------------------------ CMake lists


def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command, arguments) of each command in a CMake file; comments dropped, quotes removed."""
    text = re.sub(r"#[^\n]*", "", path.read_text(encoding="utf-8"))
    return [(m.group(1).lower(), [a.strip('"') for a in re.findall(r'"[^"]*"|[^\s"]+', m.group(2))])
            for m in re.finditer(r"(\w+)\s*\(((?:[^()]|\$\{\w+\})*)\)", text)]


def cmake_variables(path: Path) -> dict[str, str]:
    """``set(NAME "value")`` of a CMake file (one-argument sets only)."""
    return {args[0]: args[1] for cmd, args in cmake_commands(path) if cmd == "set" and len(args) == 2}


@cache
def repository_files() -> frozenset[str]:
    """Tracked plus untracked-but-not-ignored files (repository-relative), so build leftovers don't count."""
    try:
        out = [subprocess.run(["git", "ls-files", *extra], cwd=ROOT, check=True, capture_output=True, text=True).stdout
               for extra in ([], ["--others", "--exclude-standard"])]
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return frozenset(line for chunk in out for line in chunk.splitlines() if (ROOT / line).is_file())


def module_files() -> set[str]:
    """Files Slicer installs from TuckerSegment/, relative to it (no caches, no egg-info)."""
    return {p.split("/", 1)[1] for p in repository_files() if p.startswith("TuckerSegment/")
            and not any(part == "__pycache__" or part.endswith(".egg-info") for part in PurePosixPath(p).parts)}


def module_lists() -> tuple[list[str], list[str], dict[str, list[str]]]:
    """MODULE_PYTHON_SCRIPTS, MODULE_PYTHON_RESOURCES (``${...}`` expanded, globs kept apart) and the
    GLOB_RECURSE patterns of each file() variable, from TuckerSegment/CMakeLists.txt."""
    variables: dict[str, list[str]] = {}
    globs: dict[str, list[str]] = {}

    def expand(args: list[str]) -> list[str]:
        out = []
        for arg in args:
            whole = re.fullmatch(r"\$\{(\w+)\}", arg)
            if whole and whole.group(1) in globs:
                out.append(arg)  # a glob list: kept as is, evaluated by the caller
            else:
                out.append(re.sub(r"\$\{(\w+)\}", lambda m: " ".join(variables.get(m.group(1), [m.group(0)])), arg))
        return out

    for cmd, args in cmake_commands(MODULE_DIR / "CMakeLists.txt"):
        if cmd == "set":
            variables[args[0]] = expand(args[1:])
        elif cmd == "file" and args[0] == "GLOB_RECURSE":
            patterns = args[2:]
            if patterns[:1] == ["RELATIVE"]:
                assert patterns[1] == "${CMAKE_CURRENT_SOURCE_DIR}", "globs are evaluated relative to the module folder"
                patterns = patterns[2:]
            globs[args[1]] = patterns
    return variables["MODULE_PYTHON_SCRIPTS"], variables["MODULE_PYTHON_RESOURCES"], globs


def glob_recurse(pattern: str) -> set[str]:
    """CMake's file(GLOB_RECURSE) of one pattern: the file name part matched in the folder and below it."""
    folder, name = pattern.rsplit("/", 1) if "/" in pattern else (".", pattern)
    return {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / folder).rglob(name) if p.is_file()}


def test_every_python_file_is_a_module_script() -> None:
    scripts, _, _ = module_lists()
    python = {f for f in module_files() if f.endswith(".py")}
    testing = {f for f in python if f.startswith("TuckerSegmentLib/testing/")}
    assert testing, "the testing helpers moved: update this test"
    assert not sorted(python - testing - set(scripts)), "add these to MODULE_PYTHON_SCRIPTS"
    assert not sorted(testing & set(scripts)), "TuckerSegmentLib/testing/ is for tests and scripts, not the extension"
    assert len(scripts) == len(set(scripts))


def test_every_resource_is_a_module_resource() -> None:
    _, resources, globs = module_lists()
    covered: set[str] = set()
    for entry in resources:
        glob_var = re.fullmatch(r"\$\{(\w+)\}", entry)
        if glob_var:
            for pattern in globs[glob_var.group(1)]:
                matched = glob_recurse(pattern) & module_files()
                assert matched, f"GLOB_RECURSE pattern {pattern} matches no file"
                covered |= matched
        else:
            covered.add(entry)
    needed = {f for f in module_files() if f.startswith("Resources/")}
    assert not sorted(needed - covered), "add these to MODULE_PYTHON_RESOURCES (or a GLOB_RECURSE pattern)"


def test_every_listed_file_exists() -> None:
    scripts, resources, _ = module_lists()
    listed = scripts + [r for r in resources if not r.startswith("${")]
    assert not [f for f in listed if "${" in f], "unexpanded CMake variable"
    missing = sorted(f for f in listed if f not in module_files())
    assert not missing, "listed in TuckerSegment/CMakeLists.txt but not in the repository"


# ------------------------------------------------------------------------- extension metadata


def extension() -> dict[str, str]:
    return cmake_variables(ROOT / "CMakeLists.txt")


def depends() -> list[str]:
    value = extension()["EXTENSION_DEPENDS"]
    return [] if value == "NA" else value.replace(";", " ").split()


def repository_path(url: str) -> str:
    """The repository path a raw.githubusercontent.com URL of this extension's main branch points at."""
    owner_repo = extension()["EXTENSION_HOMEPAGE"].removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert url.startswith(prefix), f"{url} is not under {prefix}"
    return url.removeprefix(prefix)


def test_extension_metadata() -> None:
    ext = extension()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", ext["EXTENSION_HOMEPAGE"])
    assert ext["EXTENSION_CATEGORY"] == "Segmentation"
    assert ext["EXTENSION_CONTRIBUTORS"].strip()
    description = ext["EXTENSION_DESCRIPTION"]
    assert description.endswith(".") and description.count(". ") == 0, "one sentence"
    assert {"PyTorch", "NNUNet"} <= set(depends())
    screenshots = ext["EXTENSION_SCREENSHOTURLS"].split()
    assert screenshots, "EXTENSION_SCREENSHOTURLS is empty"
    for url in [ext["EXTENSION_ICONURL"], *screenshots]:
        assert repository_path(url) in repository_files(), f"{url} points at no file of the repository"
    assert all(u.endswith(".png") for u in screenshots)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_icon_is_a_128_pixel_png() -> None:
    icon = ROOT / repository_path(extension()["EXTENSION_ICONURL"])
    assert icon == MODULE_DIR / "Resources" / "Icons" / "TuckerSegment.png"  # also the module's own icon
    assert png_size(icon) == (128, 128)


def test_extensions_index_entry() -> None:
    entry = json.loads(INDEX_ENTRY.read_text(encoding="utf-8"))
    ext = extension()
    assert not sorted(set(entry) - SCHEMA_PROPERTIES), "not a property of the catalog-entry schema"
    assert set(entry) >= SCHEMA_REQUIRED
    assert entry["$schema"].removesuffix("#") == SCHEMA_URL
    assert entry["category"] == ext["EXTENSION_CATEGORY"]
    assert entry["scm_url"].removesuffix(".git") == ext["EXTENSION_HOMEPAGE"]
    assert entry["scm_revision"] == "main"
    assert entry.get("scm_type", "git") == "git"
    assert entry.get("build_subdirectory", ".") == "."
    assert entry["build_dependencies"] == depends()
    assert type(entry["tier"]) is int and entry["tier"] == 1


def test_the_repository_root_holds_the_apache_license() -> None:
    """The Extensions Index refuses a submission without a LICENSE file at the repository root."""
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "LICENSE" in repository_files()
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
