"""One typed request per use case: segment, compress, build, evaluate, distil, fine-tune.

Each is a frozen dataclass whose defaults are defined here (or in ``defaults``) once, validated once when it
is made (a one-line ``TuckerSegmentError`` naming the field and the fix) and round-tripping through JSON for
the worker protocol. The CLI parses arguments into a request, the worker reads one from a JSON line, Slicer's
Logic builds one from its parameters: none of them composes the steps (``usecases.run`` does). Importable
without torch (Slicer's GUI process builds requests)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..defaults import (DISTILL_ITERATIONS, DISTILL_LR, DISTILL_TRAINED, FINETUNE_EPOCHS,
                        FINETUNE_ITERATIONS_PER_EPOCH, FINETUNE_LR, MAX_TRAINING_ITERATIONS, RANK_MIN, TILE_STEP,
                        TRAINING_LIMIT, check_tile_step, distill_iterations)
from ..errors import PolicyError, TuckerSegmentError
from ..policies.methods import DEFAULT_METHOD, PRUNING_METHODS, method
from ..runtime.devices import EXECUTIONS, PRECISIONS, RUNTIMES, parse_device
from ..variants.totalsegmentator import tasks

COMPRESS_METHODS = ("tucker", *(m.key for m in PRUNING_METHODS))
OUTPUT_FORMATS = ("seg.nrrd", "nii.gz")
Fold = int | str  # a fold number, or "all"
R = TypeVar("R", bound="Request")


def segment_tasks() -> tuple[str, ...]:
    """What ``SegmentRequest.task`` may name: auto, TotalSegmentator's tasks, the bundled demo."""
    return ("auto", *tasks(), "demo")


class RequestError(TuckerSegmentError):
    """A request field with a value it cannot take."""


def _refuse(name: str, value: Any, expected: str) -> RequestError:
    return RequestError(f"{name} must be {expected}, not {value!r}")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise RequestError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
    return value


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _refuse(name, value, "true or false")
    return value


def _number(name: str, value: Any, low: float, high: float, whole: bool = False) -> float:
    kind = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not (math.isfinite(value) and low <= value <= high):
        raise _refuse(name, value, f"a {'whole ' if whole else ''}number from {low:g} to {high:g}")
    return value


def _text(name: str, value: Any, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _refuse(name, value, "a non-empty name or path")
    return value


def _texts(name: str, value: Any, optional: bool = False) -> tuple[str, ...] | None:
    if value is None and optional:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise _refuse(name, value, "a list of names or paths")
    return tuple(_text(name, item) for item in value)


def _fold(name: str, value: Any, optional: bool = True) -> Fold | None:
    if value is None and optional:
        return None
    if value == "all" or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1000):
        return value
    raise _refuse(name, value, "a fold number or 'all'")


def _device(value: Any) -> str:
    parse_device(value)  # the one reader of device names, the one error
    return value


class Request:
    """What every request can do: be written as JSON and read back, field by field validated."""

    COMMAND: ClassVar[str]

    def __post_init__(self) -> None:
        for name, value in self._checked().items():
            object.__setattr__(self, name, value)

    def _checked(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        """The request as JSON values (tuples as lists)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_json(cls: type[R], data: Any) -> R:
        """A request from the JSON a client sent: unknown fields and wrong types are refused, missing ones take
        their defaults."""
        if not isinstance(data, dict):
            raise RequestError(f"a {cls.COMMAND} request is a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in data if key not in known)
        if unknown:
            raise RequestError(f"a {cls.COMMAND} request has no field {', '.join(unknown)}; known: "
                               f"{', '.join(sorted(known))}")
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in data
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise RequestError(f"a {cls.COMMAND} request needs {', '.join(missing)}")
        return cls(**data)

    def replace(self: R, **changes: Any) -> R:
        return dataclasses.replace(self, **changes)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class SegmentRequest(Request):
    """Segment CTs: which model (a variant id, a model folder, several folders as one task, or ``auto``) runs
    where and how. The inputs and outputs travel beside it (files, scene nodes, the worker's transfer files)."""

    COMMAND: ClassVar[str] = "segment"
    model: str | tuple[str, ...] = "auto"
    task: str = "auto"
    device: str = "auto"
    subset: tuple[str, ...] | None = None
    crop: bool = True
    fold: Fold | None = None
    tile_step: float = TILE_STEP
    mirroring: bool = False
    execution: str = "fastest"
    runtime: str = "auto"
    precision: str = "auto"

    def _checked(self) -> dict[str, Any]:
        model = _texts("model", self.model) if isinstance(self.model, (list, tuple)) else _text("model", self.model)
        if isinstance(model, tuple) and not model:
            raise RequestError("model must name a model, a variant or auto, not an empty list")
        return {"model": model, "task": _choice("task", self.task, segment_tasks()),
                "device": _device(self.device), "subset": _texts("subset", self.subset, optional=True) or None,
                "crop": _flag("crop", self.crop), "fold": _fold("fold", self.fold),
                "tile_step": check_tile_step(self.tile_step), "mirroring": _flag("mirroring", self.mirroring),
                "execution": _choice("execution", self.execution, EXECUTIONS),
                "runtime": _choice("runtime", self.runtime, RUNTIMES),
                "precision": _choice("precision", self.precision, PRECISIONS)}

    def segmenter_options(self) -> dict[str, Any]:
        """The options a segmenter is opened with (the model and device aside)."""
        return {"fold": self.fold, "tile_step": self.tile_step, "mirroring": self.mirroring,
                "execution": self.execution, "runtime": self.runtime, "precision": self.precision}


RANK_ONLY = {"weight_only": "--weight-only", "rank_min": "--rank-min"}  # fields only Tucker ranks use


@dataclass(frozen=True)
class CompressRequest(Request):
    """Compress ``source`` into the new folder ``output``: Tucker ranks by a rank ``policy`` (``flops``, ``params``,
    ``latency``, ``uniform``, ``energy``, ``vbmf``) or filter pruning (``prune-*``) to ``target``; then, with
    ``distill`` N, N label-free distillation iterations; with ``review``, a comparison with the original."""

    COMMAND: ClassVar[str] = "compress"
    source: str
    output: str
    policy: str = DEFAULT_METHOD  # a rank method or a pruning method (policies.methods.METHODS)
    target: float | None = None
    rank_min: int = RANK_MIN
    weight_only: bool = False
    calibration: tuple[str, ...] = ()  # unlabeled CTs (NIfTI/NRRD, or the worker's transfer files)
    labels: tuple[str, ...] = ()  # prune-taylor: one label map per calibration CT
    distill: int = 0
    device: str = "auto"  # where a latency target is timed, distillation trains, the review runs
    runtime: str = "auto"  # what a latency target and the review time
    folds: tuple[Fold, ...] = (0,)
    configuration: str | None = None
    overwrite: bool = False
    trust_checkpoint: bool = False
    review: bool = False  # then compare with the original: sizes, agreement on the calibration CTs, time
    measure: bool = True  # the review times both models

    def _checked(self) -> dict[str, Any]:
        checked = {"source": _text("source", self.source), "output": _text("output", self.output),
                   "policy": method(_text("policy", self.policy)).key,
                   "target": _target(self.target),
                   "rank_min": int(_number("rank_min", self.rank_min, 1, 4096, whole=True)),
                   "weight_only": _flag("weight_only", self.weight_only),
                   "calibration": _texts("calibration", self.calibration), "labels": _texts("labels", self.labels),
                   "distill": distill_iterations(self.distill), "device": _device(self.device),
                   "runtime": _choice("runtime", self.runtime, RUNTIMES),
                   "folds": tuple(_fold("folds", fold, optional=False) for fold in _listed("folds", self.folds)),
                   "configuration": _text("configuration", self.configuration, optional=True),
                   **{name: _flag(name, getattr(self, name)) for name in ("overwrite", "trust_checkpoint", "review",
                                                                          "measure")}}
        _check_compress(checked)
        return checked

    @property
    def prunes(self) -> bool:
        return method(self.policy).prunes


def _target(value: Any) -> float | None:
    """A method's target as a number (its range is the method's: ``policies.methods``, ``compress.pruning``)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise _refuse("target", value, "a number")
    return value


def _listed(name: str, value: Any) -> tuple[Any, ...]:
    if not isinstance(value, (list, tuple)) or not value:
        raise _refuse(name, value, "a non-empty list")
    return tuple(value)


def _check_compress(request: dict[str, Any]) -> None:
    """The combinations a compression cannot work with, named in the command line's words."""
    chosen = method(request["policy"])
    if request["distill"] and request["weight_only"]:
        raise PolicyError("distillation trains on calibration CTs and weight-only compression uses none; drop "
                          "--weight-only (compression then calibrates on the CTs distillation uses) or --distill")
    if request["distill"] and len(request["folds"]) != 1:
        raise PolicyError("--distill trains one fold; compress one (--fold N), or distil each compressed fold with "
                          "tuckersegment distill --fold N")
    if not chosen.prunes:
        if not chosen.target and request["target"] is not None:
            raise PolicyError(f"the {chosen.key} method chooses its ranks itself; give it no target")
        if request["labels"]:
            raise PolicyError("--labels is for --method prune-taylor; Tucker compression calibrates on unlabeled CTs "
                              "(--calibration CT...)")
        return
    given = [flag for name, flag in RANK_ONLY.items() if request[name] != _DEFAULTS[name]]
    if given:
        raise PolicyError(f"--policy chooses Tucker ranks only: --method {chosen.key} takes no {', '.join(given)}; "
                          "give its budget as --target-flops T (default 0.5)")
    if not request["review"] and ((request["device"] != "auto" and not request["distill"])
                                  or request["runtime"] != "auto"):
        raise PolicyError(f"--device and --runtime time latency budgets; --method {chosen.key} prunes to a FLOP "
                          "budget and times nothing: leave them out (with --distill, --device is where distillation "
                          "trains)")
    if chosen.needs_labels and not (request["calibration"] and request["labels"]):
        raise PolicyError(f"--method {chosen.key} needs labelled CTs: --calibration CT... --labels LABELMAP... (one "
                          "label map per CT, in the same order; the Slicer panel does not take labels)")


@dataclass(frozen=True)
class BuildRequest(Request):
    """Build catalogue variants (ids; none: each task's default-policy variants, or ``task``'s) from
    TotalSegmentator weights into the user cache, calibrated on ``calibration`` and scored on ``holdout``."""

    COMMAND: ClassVar[str] = "build"
    variants: tuple[str, ...] = ()
    task: str | None = None
    weights: str | None = None  # the folder holding TotalSegmentator's Dataset29x folders
    calibration: tuple[str, ...] = ()
    holdout: tuple[str, ...] = ()
    names: tuple[str, ...] | None = None  # how to call the CTs (calibration then holdout): default their paths
    device: str = "auto"
    distill: int | None = None  # None: a new build is not distilled, a built variant stays as built
    measure: bool = True
    precisions: tuple[str, ...] | None = None  # forms besides f32 (bf16, int8); None: each this CPU runs natively

    def _checked(self) -> dict[str, Any]:
        calibration, holdout = _texts("calibration", self.calibration), _texts("holdout", self.holdout)
        precisions = _texts("precisions", self.precisions, optional=True)
        names = _texts("names", self.names, optional=True)
        if names is not None and len(names) != len(calibration) + len(holdout):
            raise RequestError("names must name each calibration and held-out CT, in that order")
        if holdout and not calibration:
            raise RequestError("--holdout needs --calibration: give the CTs to calibrate on too (the held-out ones "
                               "are only scored)")
        task = None if self.task is None else _choice("task", self.task, tuple(tasks()))
        return {"variants": _texts("variants", self.variants), "task": task,
                "weights": _text("weights", self.weights, optional=True), "calibration": calibration,
                "holdout": holdout, "names": names, "device": _device(self.device),
                "distill": None if self.distill is None else distill_iterations(self.distill),
                "measure": _flag("measure", self.measure),
                "precisions": None if precisions is None else tuple(
                    dict.fromkeys(_choice("precision", p, BUILD_PRECISIONS) for p in precisions))}


BUILD_PRECISIONS = ("f32", "bf16", "int8")  # f32 is always built; naming it alone builds no other form


@dataclass(frozen=True)
class EvaluateRequest(Request):
    """Segment every image of ``images`` with the original (``models[0]``) and each variant made from it; write
    Dice (against ``labels`` and the original), paired tests and costs into the new folder ``out``."""

    COMMAND: ClassVar[str] = "evaluate"
    models: tuple[str, ...]
    images: str
    out: str
    labels: str | None = None
    device: str = "auto"
    runtime: str = "auto"
    precision: str = "auto"
    rounds: int = 1
    memory: bool = True
    overwrite: bool = False

    def _checked(self) -> dict[str, Any]:
        return {"models": _texts("models", _listed("models", self.models)), "images": _text("images", self.images),
                "out": _text("out", self.out), "labels": _text("labels", self.labels, optional=True),
                "device": _device(self.device), "runtime": _choice("runtime", self.runtime, RUNTIMES),
                "precision": _choice("precision", self.precision, PRECISIONS),
                "rounds": int(_number("rounds", self.rounds, 1, 100, whole=True)),
                "memory": _flag("memory", self.memory), "overwrite": _flag("overwrite", self.overwrite)}


@dataclass(frozen=True)
class DistillRequest(Request):
    """Train the compressed folder ``compressed`` to reproduce its original ``teacher`` on the unlabeled
    ``calibration`` CTs; write the result to the new folder ``output``."""

    COMMAND: ClassVar[str] = "distill"
    compressed: str
    teacher: str
    calibration: tuple[str, ...]
    output: str
    iterations: int = DISTILL_ITERATIONS
    lr: float = DISTILL_LR
    temperature: float = 1.0
    batch_size: int | None = None  # default 1 on a CPU, the plans' on a GPU
    trained: str = "auto"
    device: str = "auto"
    fold: Fold | None = None
    overwrite: bool = False
    trust_checkpoint: bool = False

    def _checked(self) -> dict[str, Any]:
        batch = None if self.batch_size is None else int(_number("batch_size", self.batch_size, 1, 1024, whole=True))
        return {"compressed": _text("compressed", self.compressed), "teacher": _text("teacher", self.teacher),
                "calibration": _texts("calibration", _listed("calibration", self.calibration)),
                "output": _text("output", self.output),
                "iterations": int(_number("iterations", self.iterations, 1, MAX_TRAINING_ITERATIONS, whole=True)),
                "lr": _number("lr", self.lr, 0, 1), "temperature": _number("temperature", self.temperature, 1e-3, 1e3),
                "batch_size": batch, "trained": _choice("trained", self.trained, DISTILL_TRAINED),
                "device": _device(self.device), "fold": _fold("fold", self.fold),
                "overwrite": _flag("overwrite", self.overwrite),
                "trust_checkpoint": _flag("trust_checkpoint", self.trust_checkpoint)}


@dataclass(frozen=True)
class FinetuneRequest(Request):
    """Fine-tune fold 0 of the compressed folder ``compressed`` on the labelled nnU-Net data set ``dataset``
    (nnU-Net's trainer); write the new folder ``output``."""

    COMMAND: ClassVar[str] = "finetune"
    compressed: str
    dataset: str
    output: str
    epochs: int = FINETUNE_EPOCHS
    iterations_per_epoch: int = FINETUNE_ITERATIONS_PER_EPOCH
    lr: float = FINETUNE_LR
    device: str = "auto"
    original: str | None = None
    overwrite: bool = False

    def _checked(self) -> dict[str, Any]:
        epochs = int(_number("epochs", self.epochs, 1, MAX_TRAINING_ITERATIONS, whole=True))
        per_epoch = int(_number("iterations_per_epoch", self.iterations_per_epoch, 1, MAX_TRAINING_ITERATIONS, whole=True))
        if epochs * per_epoch > MAX_TRAINING_ITERATIONS:
            raise _refuse("epochs", epochs, f"at most {MAX_TRAINING_ITERATIONS // per_epoch} at {per_epoch} iterations per "
                                            f"epoch ({MAX_TRAINING_ITERATIONS} iterations in all, {TRAINING_LIMIT})")
        return {"compressed": _text("compressed", self.compressed), "dataset": _text("dataset", self.dataset),
                "output": _text("output", self.output), "epochs": epochs, "iterations_per_epoch": per_epoch,
                "lr": _number("lr", self.lr, 0, 1), "device": _device(self.device),
                "original": _text("original", self.original, optional=True),
                "overwrite": _flag("overwrite", self.overwrite)}


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CompressRequest)}
REQUESTS: dict[str, type[Request]] = {r.COMMAND: r for r in (SegmentRequest, CompressRequest, BuildRequest,
                                                              EvaluateRequest, DistillRequest, FinetuneRequest)}
