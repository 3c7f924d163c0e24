"""One request per use case: the command line, a worker JSON line and the Slicer Logic's parameters make equal
requests; each default is defined once; requests round-trip through JSON and refuse hostile fields in one line."""
from __future__ import annotations

import ast
import json
import types
from pathlib import Path

import headless_slicer
import pytest
from TuckerSegmentLib.cli.commands import build_request, compress_request, segment_request
from TuckerSegmentLib.cli.parser import build_parser
from TuckerSegmentLib.defaults import TILE_STEP
from TuckerSegmentLib.errors import TuckerSegmentError
from TuckerSegmentLib.usecases.requests import (REQUESTS, BuildRequest, CompressRequest, DistillRequest,
                                                EvaluateRequest, FinetuneRequest, SegmentRequest)
from TuckerSegmentLib.worker.protocol import decode, encode

headless_slicer.setup()
from TuckerSegmentModule.Logic import compressRequest, segmentRequest  # noqa: E402
from TuckerSegmentModule.Parameters import TuckerSegmentParameterNode  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
PARSER = build_parser({name: (lambda args: 0) for name in ("compress", "distill", "info", "segment", "variants",
                                                           "build-variants", "evaluate", "finetune")})


def cli(*argv: str):
    return PARSER.parse_args(list(argv))


def over_the_wire(request) -> dict:
    """The request as the worker reads it: one protocol line, decoded."""
    return decode(encode({"id": 1, "command": request.COMMAND, "args": request.to_json()}))["args"]


def parameters(**changes):
    """A parameter node with the panel's defaults (the class Slicer wraps), then ``changes``."""
    fields = {name: getattr(TuckerSegmentParameterNode, name, None)
              for name in TuckerSegmentParameterNode.__annotations__}
    return types.SimpleNamespace(**{**fields, **changes})


def test_the_cli_the_worker_and_the_logic_make_the_same_segment_request():
    defaults = SegmentRequest()
    from_cli = segment_request(cli("segment", "ct.nii.gz", "out.seg.nrrd"))
    from_worker = SegmentRequest.from_json(over_the_wire(defaults))
    from_logic = segmentRequest(parameters())
    assert from_cli == from_worker == from_logic == defaults
    assert from_cli.tile_step == TILE_STEP
    chosen = segment_request(cli("segment", "ct.nii.gz", "out/", "--task", "demo", "--device", "cpu", "--subset",
                                 "ribs", "sternum", "--tile-step", "0.5", "--runtime", "torch", "--precision", "f32"))
    assert chosen == SegmentRequest(task="demo", device="cpu", subset=("ribs", "sternum"), tile_step=0.5,
                                    runtime="torch", precision="f32")
    assert SegmentRequest.from_json(over_the_wire(chosen)) == chosen
    assert segmentRequest(parameters(task="demo", device="cpu", tileStep=0.5, runtime="torch", precision="f32"),
                          ["ribs", "sternum"]) == chosen


def test_the_cli_and_the_logic_make_the_same_compress_and_build_requests(tmp_path):
    from_cli = compress_request(cli("compress", "model", "out", "--target-flops", "0.3", "--distill", "5",
                                    "--device", "cpu", "--calibration", "a.npz", "b.npz"))
    expected = CompressRequest("model", "out", policy="flops", target=0.3, distill=5, device="cpu",
                               calibration=("a.npz", "b.npz"))
    assert from_cli == expected == CompressRequest.from_json(over_the_wire(expected))
    panel = compressRequest("model", "out", "flops", 0.3, device="cpu", distill=5).replace(calibration=("a.npz", "b.npz"))
    assert panel == expected.replace(review=True)  # the panel's compression is reviewed against the original
    no_target = compress_request(cli("compress", "model", "out", "--policy", "vbmf"))
    assert compressRequest("model", "out", "vbmf", 0.5) == no_target.replace(review=True)  # the spin box's number
    assert no_target.target is None  # is not vbmf's: it takes none
    pruning = compress_request(cli("compress", "model", "out", "--method", "prune-l1", "--target-flops", "0.4"))
    assert (pruning.policy, pruning.target) == ("prune-l1", 0.4)
    built = build_request(cli("build-variants", "--variant", "fast-tucker-balanced", "--calibration", "a.nii.gz",
                              "--holdout", "b.nii.gz", "--no-measure"))
    assert built == BuildRequest(("fast-tucker-balanced",), calibration=("a.nii.gz",), holdout=("b.nii.gz",),
                                 measure=False)
    assert BuildRequest.from_json(over_the_wire(built)) == built


def tile_step_literals(tree: ast.AST) -> list[int]:
    """Lines where a name about tiles (tile_step, tileStep, TILE_STEP, --tile-step) is given a number literal: as a
    default, an assignment, a keyword or a dict entry."""
    pairs = []
    for node in ast.walk(tree):
        if isinstance(node, ast.arguments):
            named = [*node.posonlyargs, *node.args]
            pairs += [(a.arg, d) for a, d in zip(named[len(named) - len(node.defaults):], node.defaults, strict=True)]
            pairs += [(a.arg, d) for a, d in zip(node.kwonlyargs, node.kw_defaults, strict=True) if d is not None]
        elif isinstance(node, ast.Assign):
            pairs += [(ast.unparse(target), node.value) for target in node.targets]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            pairs.append((ast.unparse(node.target), node.value))
        elif isinstance(node, ast.keyword) and node.arg:
            pairs.append((node.arg, node.value))
        elif isinstance(node, ast.Dict):
            pairs += [(ast.unparse(k), v) for k, v in zip(node.keys, node.values, strict=True) if k is not None]
    return [value.lineno for name, value in pairs if "tilestep" in name.lower().replace("_", "").replace("-", "")
            and any(isinstance(n, ast.Constant) and isinstance(n.value, float) for n in ast.walk(value))]


def test_the_tile_step_default_is_written_once_in_the_product():
    # every place that states a tile step (TotalSegmentator's 0.8, the lower bound), a default or a range bound, in code
    hits = [f"{path.relative_to(ROOT)}:{line}" for path in sorted((ROOT / "TuckerSegment").rglob("*.py"))
            for line in tile_step_literals(ast.parse(path.read_text()))]
    assert hits == ["TuckerSegment/TuckerSegmentLib/defaults.py:9", "TuckerSegment/TuckerSegmentLib/defaults.py:10"], hits
    assert TuckerSegmentParameterNode.tileStep == TILE_STEP == SegmentRequest().tile_step


@pytest.mark.parametrize("request_type", list(REQUESTS.values()))
def test_every_request_round_trips_through_json(request_type):
    examples = {SegmentRequest: SegmentRequest(model=("a", "b"), subset=("ribs",), fold="all", crop=False),
                CompressRequest: CompressRequest("m", "o", policy="uniform", target=0.5, folds=(0, 1)),
                BuildRequest: BuildRequest(("x",), calibration=("a.npz",), names=("scene CT",)),
                EvaluateRequest: EvaluateRequest(("m", "v"), "images", "out", labels="labels", rounds=3),
                DistillRequest: DistillRequest("c", "t", ("ct.nii.gz",), "o", iterations=7, trained="all"),
                FinetuneRequest: FinetuneRequest("c", "Dataset001_X", "o", epochs=2)}
    example = examples[request_type]
    line = json.loads(json.dumps(example.to_json()))
    assert request_type.from_json(line) == example


@pytest.mark.parametrize("request_type, fields, words", [
    (SegmentRequest, {"tile_step": "0.8"}, "tile step '0.8' is outside [0.25, 1]"),
    (SegmentRequest, {"tile_step": 1e-9}, "tile step 1e-09 is outside [0.25, 1]"),
    (SegmentRequest, {"tile_step": True}, "tile step True is outside"),
    (DistillRequest, {"compressed": "c", "teacher": "t", "calibration": ["ct"], "output": "o", "iterations": 10 ** 12},
     "iterations must be a whole number from 1 to 100000, not 1000000000000"),
    (FinetuneRequest, {"compressed": "c", "dataset": "d", "output": "o", "epochs": 1000, "iterations_per_epoch": 250},
     "epochs must be at most 400 at 250 iterations per epoch (100000 iterations in all, about a day"),
    (SegmentRequest, {"crop": "yes"}, "crop must be true or false, not 'yes'"),
    (SegmentRequest, {"device": "gpu"}, "unknown device 'gpu'; choose auto, cpu, cuda, cuda:N or mps"),
    (SegmentRequest, {"device": ["cpu"]}, "unknown device ['cpu']"),
    (SegmentRequest, {"runtime": "tensorrt"}, "unknown runtime 'tensorrt'; choose one of auto, torch, openvino"),
    (SegmentRequest, {"subset": "ribs"}, "subset must be a list of names or paths, not 'ribs'"),
    (SegmentRequest, {"model": []}, "model must name a model"),
    (SegmentRequest, {"model": "x\0y"}, "model must be a non-empty name or path"),
    (SegmentRequest, {"fold": -1}, "fold must be a fold number or 'all', not -1"),
    (SegmentRequest, {"format_disk": True}, "a segment request has no field format_disk"),
    (CompressRequest, {"source": "m", "output": "o", "distill": 1.5}, "distillation takes a whole number"),
    (CompressRequest, {"source": "m", "output": "o", "policy": "zip"}, "zip"),
    (CompressRequest, {"source": "m", "output": "o", "folds": []}, "folds must be a non-empty list"),
    (CompressRequest, {"source": "m", "output": "o", "target": "half"}, "target must be a number, not 'half'"),
    (CompressRequest, {"source": "m", "output": "o", "policy": "prune-taylor"}, "prune-taylor needs labelled CTs"),
    (CompressRequest, {"source": "m"}, "a compress request needs output"),
    (CompressRequest, {"source": "m", "output": "o", "policy": "vbmf", "target": 0.5}, "vbmf method chooses its ranks"),
    (BuildRequest, {"holdout": ["a"]}, "--holdout needs --calibration"),
    (BuildRequest, {"calibration": ["a"], "names": ["x", "y"]}, "names must name each calibration and held-out CT"),
    (EvaluateRequest, {"models": [], "images": "i", "out": "o"}, "models must be a non-empty list"),
    (EvaluateRequest, {"models": ["m"], "images": "i", "out": "o", "rounds": 0}, "rounds must be a whole number"),
    (DistillRequest, {"compressed": "c", "teacher": "t", "calibration": [], "output": "o"}, "calibration must be"),
    (FinetuneRequest, {"compressed": "c", "dataset": "d", "output": "o", "lr": float("nan")}, "lr must be a number"),
])
def test_hostile_request_fields_are_refused_in_one_line(request_type, fields, words):
    with pytest.raises(TuckerSegmentError) as error:
        request_type.from_json(fields)
    assert words in str(error.value) and "\n" not in str(error.value)


def test_a_request_that_is_not_an_object_is_refused():
    for value in ([], "segment", None, 3):
        with pytest.raises(TuckerSegmentError, match="^a segment request is a JSON object"):
            SegmentRequest.from_json(value)
