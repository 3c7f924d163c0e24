"""The engine's shape: one import direction between its sub-packages, no cycle, and what the Slicer panel
needs before its dependencies are installed importable without torch, tensorly or nnU-Net."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
LIB = ROOT / "TuckerSegment" / "TuckerSegmentLib"
PACKAGE = "TuckerSegmentLib"
# Each unit may import units of its own layer and of layers above it, never below.
LAYERS = (
    {PACKAGE, "paths", "errors", "progress", "atomic", "dependencies", "checksums", "defaults", "interrupts"},
    {"image"}, {"tucker"}, {"runtime"}, {"policies"}, {"nnunet"}, {"segment"}, {"compress"},
    {"recovery"},  # training a compressed network back towards its original (distillation, fine-tuning)
    {"variants"},
    {"evaluation"},  # evaluate models side by side: Dice, paired tests, costs, plots
    {"usecases"},  # one typed request per use case and the one function that runs it
    {"worker"},  # the worker process and its client (Slicer's Logic drives it)
    {"cli"},
    {"testing"},  # example models, demo data: scripts and tests only
)
LAYER_OF = {unit: index for index, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(LIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(LIB.rglob("*.py"))}


def imports_of(name: str) -> set[str]:
    """Every engine module ``name`` imports, wherever the statement stands (module level, in functions,
    under ``TYPE_CHECKING``), read from the source without executing it."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        found |= {target for target in targets if target == PACKAGE or target.startswith(PACKAGE + ".")}
    return {target if target in MODULES else target.rpartition(".")[0] for target in found} - {name}


def unit(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else PACKAGE


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_belongs_to_a_layer():
    assert {unit(name) for name in MODULES} <= set(LAYER_OF), "a new sub-package needs its place in LAYERS"


def test_imports_follow_the_one_direction():
    against = [f"{name} imports {target}" for name, targets in GRAPH.items() for target in sorted(targets)
               if LAYER_OF[unit(target)] > LAYER_OF[unit(name)]]
    assert not against, "imports against the direction:\n" + "\n".join(against)


def test_there_is_no_import_cycle():
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, [*path, target])
        state[name] = "done"
    for name in MODULES:
        if name not in state:
            visit(name, [name])


def test_the_checker_sees_imports_in_functions_and_under_type_checking(tmp_path):
    # the checker must not be blind to the imports that once closed a cycle
    assert "TuckerSegmentLib.compress.figures" in GRAPH["TuckerSegmentLib.variants.user_variants"]  # TYPE_CHECKING
    assert "TuckerSegmentLib.policies.budget" in GRAPH["TuckerSegmentLib.policies.methods"]  # inside a function
    assert "TuckerSegmentLib" in GRAPH["TuckerSegmentLib.segment.provenance"]  # from .. import __version__


def test_the_product_never_imports_the_testing_helpers():
    users = [name for name, targets in GRAPH.items() if unit(name) != "testing"
             and any(unit(target) == "testing" for target in targets)]
    assert users == []


BLOCKED = ("torch", "tensorly", "nnunetv2")
WITHOUT_TORCH = textwrap.dedent(f"""
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ImportError(f"{{name}} is blocked in this test")
    sys.meta_path.insert(0, Block())
    sys.path.insert(0, {str(LIB.parent)!r})
    from TuckerSegmentLib import dependencies, errors, paths
    from TuckerSegmentLib.policies.methods import METHODS
    from TuckerSegmentLib.variants.catalogue import catalogue
    from TuckerSegmentLib.runtime.hardware import detect_devices, undetected_devices
    from TuckerSegmentLib.variants.panel import structure_names, task_choices, variant_choices
    # what Slicer's Logic uses to drive the worker and read its answers back into MRML
    from TuckerSegmentLib.worker import client, process, protocol
    from TuckerSegmentLib.segment import provenance, result
    from TuckerSegmentLib.compress import figures
    from TuckerSegmentLib.evaluation import saved
    # the requests the Logic builds from the panel's parameters
    from TuckerSegmentLib.usecases.requests import BuildRequest, CompressRequest, SegmentRequest
    SegmentRequest(task="demo", subset=("ribs",)), CompressRequest("m", "o", review=True), BuildRequest(("x",))
    variants, devices = catalogue(), detect_devices()
    print(json.dumps({{
        "tasks": [c.key for c in task_choices(variants, [])],
        "demo_variants": [c.label for c in variant_choices("demo", variants, devices, "auto", [])],
        "demo_structures": structure_names("demo", "auto", "auto", undetected_devices()),
        "fast_structures": len(structure_names("fast", "auto", "auto", undetected_devices())),
        "undetected": [c.label for c in variant_choices("demo", variants, None, "auto", [])][:2],
        "devices": [d.describe() for d in devices],
        "missing": [str(p) for p in dependencies.problems()],
        "methods": [m.key for m in METHODS],
        "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}),
    }}))
""")


def test_what_the_panel_needs_before_installing_works_without_torch_tensorly_and_nnunet():
    import json
    run = subprocess.run([sys.executable, "-c", WITHOUT_TORCH], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    assert seen["loaded"] == []
    assert seen["tasks"][0] == "auto" and {"total", "fast", "fastest", "demo"} <= set(seen["tasks"])
    assert seen["demo_variants"][0].startswith("Auto: chest-demo")  # auto still picks, on the CPU
    assert seen["undetected"] == ["Auto: detecting devices…", "chest-demo (bundled)"]
    assert seen["demo_structures"][:2] == ["ribs", "cervical vertebral column"] and len(seen["demo_structures"]) == 7
    assert seen["fast_structures"] == 117
    assert len(seen["devices"]) == 1 and seen["devices"][0].startswith("CPU")
    assert "GPU unknown until PyTorch is installed" in seen["devices"][0]
    assert seen["missing"] == []  # read from the installed metadata, without importing any of them
    assert seen["methods"] == ["flops", "params", "latency", "uniform", "energy", "vbmf", "prune-l1", "prune-fpgm",
                              "prune-taylor"]


def test_the_public_api_names_resolve_lazily():
    script = (f"import sys; sys.path.insert(0, {str(LIB.parent)!r})\n"
              "import TuckerSegmentLib as T\n"
              "assert 'torch' not in sys.modules, 'importing the package must not load torch'\n"
              "print(sorted(n for n in T.__all__ if getattr(T, n) is None))")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
    import TuckerSegmentLib
    for name in ("Segmenter", "TaskSegmenter", "read_volume", "write_result", "compress_model_folder",
                 "compress_network", "calibration_patches", "policy_for", "BudgetPolicy", "ModelFolder", "load_network"):
        assert name in TuckerSegmentLib.__all__
    assert TuckerSegmentLib.Segmenter.__module__ == "TuckerSegmentLib.segment.predictor"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        TuckerSegmentLib.nope  # noqa: B018


SEGMENT_PATH = textwrap.dedent(f"""
    import json, sys
    sys.path.insert(0, {str(LIB.parent)!r})
    from TuckerSegmentLib.usecases.requests import SegmentRequest
    from TuckerSegmentLib.usecases.segmenting import plan_segmenter, segment_with
    from TuckerSegmentLib.worker import server
    plan_segmenter(SegmentRequest(task="demo"))
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(("TuckerSegmentLib.compress",
        "TuckerSegmentLib.recovery", "torch_pruning")))))
""")


def test_segmenting_imports_no_compression_distillation_or_pruning_module():
    import json
    run = subprocess.run([sys.executable, "-c", SEGMENT_PATH], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == []


MAX_FUNCTION_LINES = 80


def function_lengths() -> list[tuple[int, str]]:
    """Every product function and method (the Slicer module included), longest first: (lines, where)."""
    found = []
    for path in sorted((ROOT / "TuckerSegment").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return sorted(found, reverse=True)


def test_no_product_function_is_longer_than_the_limit():
    lengths = function_lengths()
    top = "\n".join(f"{lines:4} lines  {where}" for lines, where in lengths[:5])
    assert lengths[0][0] <= MAX_FUNCTION_LINES, f"functions over {MAX_FUNCTION_LINES} lines; the longest:\n{top}"
