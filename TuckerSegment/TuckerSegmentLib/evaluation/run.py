"""Evaluate an original model and its compressed variants on the same scans, as users would run them.

Every model is loaded once as a ``Segmenter`` (the runtime and precision segmentation uses), warmed up on
the first scan, then each scan is segmented by every model in turn (the order rotates from round to
round), so that times are taken side by side under the same machine load. Scored per case and class:
Dice against the reference labels (when given) and against the original's labels; per class Wilcoxon's
signed-rank test of each variant's Dice against the original's over cases, Holm-corrected across
classes (``statistics``).
"""
from __future__ import annotations

import statistics as stats
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..compress.folder import describe_model
from ..errors import TuckerSegmentError
from ..compress.calibration_source import int8_calibration
from ..nnunet.model_folder import ModelFolder
from ..progress import Progress
from ..segment.predictor import Segmenter
from ..tucker.network_stats import FLOP_CONVENTION
from .memory_probe import peak_memory
from .cases import Scan, label_classes, reference_labels
from .statistics import ALPHA, MIN_CASES, PairedTest, dice, holm, overlaps, wilcoxon


@dataclass(frozen=True)
class Candidate:
    """A model to evaluate: its folder, the name shown, the precision it runs at, and the curve it belongs
    to in plots (default: derived from how it was compressed)."""

    path: Path
    name: str = ""
    precision: str = "auto"
    curve: str = ""


def curve_of(info: dict[str, Any], precision: str) -> str:
    """The method family of a model folder (``describe_model``): original, the uniform rule, the budget
    policy weight-only or activation-aware, a pruning criterion; bf16/fp16 runs are their own curve."""
    policy = info["policy"]
    if policy == "original":
        family = "original"
    elif policy["name"] == "uniform":
        family = "uniform rule (paper)"
    elif policy["name"] == "budget":
        calibrated = (info.get("calibration") or {}).get("source", "none") != "none"
        family = f"budget policy, {'activation-aware' if calibrated else 'weight-only'}"
    else:
        family = policy["name"]
    return family if precision in ("auto", "f32") else f"{family} ({precision})"


Counts = dict[str, dict[str, tuple[int, int]]]  # class -> case -> Dice's numerator and denominator


def _per_case(counts: Counts) -> dict[str, dict[str, float]]:
    return {name: {case: dice(c) for case, c in cases.items()} for name, cases in counts.items()}


def _mean_per_case(counts: Counts) -> float | None:
    """Mean over classes of each class's mean Dice over cases (classes without a Dice anywhere left out)."""
    means = [float(np.nanmean(values)) for cases in _per_case(counts).values()
             if (values := list(cases.values())) and not np.all(np.isnan(values))]
    return float(np.mean(means)) if means else None


def _pooled(counts: Counts) -> dict[str, float]:
    """Per class Dice pooled over cases (sums of numerators and denominators)."""
    return {name: dice((sum(c[0] for c in cases.values()), sum(c[1] for c in cases.values())))
            for name, cases in counts.items()}


def _mean(values: dict[str, float]) -> float | None:
    finite = [v for v in values.values() if not np.isnan(v)]
    return float(np.mean(finite)) if finite else None


def _finite(table: dict[str, dict[str, float]] | dict[str, float]) -> dict[str, Any]:
    """Dice for JSON, rounded: ``None`` where a class is in neither label map."""
    return {k: _finite(v) if isinstance(v, dict) else (None if np.isnan(v) else round(v, 5)) for k, v in table.items()}


@dataclass
class ModelResult:
    """One model's figures: costs, times, and per class and case Dice counts against the reference labels and
    against the original's labels."""

    name: str
    path: str
    curve: str
    precision: str
    info: dict[str, Any]
    runtime: str = ""
    seconds: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    reference: Counts = field(default_factory=dict)
    versus_original: Counts = field(default_factory=dict)
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def median_seconds(self) -> float | None:
        return stats.median(self.seconds) if self.seconds else None

    def to_json(self, original: ModelResult) -> dict[str, Any]:
        base = original.info
        return {"name": self.name, "path": self.path, "curve": self.curve, "precision": self.precision,
                "runtime": self.runtime, "policy": self.info["policy"], "params": self.info["params"],
                "flops": self.info["flops"], "weights_bytes": self.info["weights_bytes"],
                "flops_fraction": self.info["flops"] / base["flops"], "params_fraction": self.info["params"] / base["params"],
                "seconds": self.seconds, "median_seconds": self.median_seconds,
                "speedup": (original.median_seconds / self.median_seconds
                            if self.median_seconds and original.median_seconds else None),
                "peak_memory_bytes": self.peak_bytes,
                "mean_dice": _mean_per_case(self.reference), "pooled_dice": _mean(_pooled(self.reference)),
                "mean_agreement": _mean_per_case(self.versus_original),
                "pooled_agreement": _mean(_pooled(self.versus_original)),
                "dice": _finite(_per_case(self.reference)), "dice_pooled": _finite(_pooled(self.reference)),
                "agreement": _finite(_per_case(self.versus_original)),
                "agreement_pooled": _finite(_pooled(self.versus_original)), "tests": self.tests}


@dataclass
class Evaluation:
    """An evaluation's results: the original first, then each variant."""

    models: list[ModelResult]
    scans: list[str]
    cases: list[str]
    classes: list[str]
    labelled: bool
    device: str
    rounds: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        original = self.models[0]
        return {"tuckersegment_version": __version__, "date": time.strftime("%Y-%m-%d"), "device": self.device,
                "flop_convention": FLOP_CONVENTION, "scans": self.scans, "cases": self.cases, "classes": self.classes,
                "labelled": self.labelled, "rounds": self.rounds,
                "timing": f"seconds per volume: median over {len(self.scans)} scan(s) x {self.rounds} round(s), every "
                          "model in turn (order rotating), after one warm-up segmentation each; peak memory: resident "
                          "memory a fresh process adds to load the model and segment the first scan",
                "test": f"Wilcoxon signed-rank (two-sided, exact for small samples) of each class's Dice against the "
                        f"reference labels, variant vs original over cases; Holm correction across classes; alpha "
                        f"{ALPHA}; no test below {MIN_CASES} cases",
                "notes": self.notes, "models": [m.to_json(original) for m in self.models]}


def _test_classes(variant: ModelResult, original: ModelResult, cases: Sequence[str]) -> dict[str, dict[str, Any]]:
    tests: dict[str, PairedTest] = {}
    ours, theirs = _per_case(variant.reference), _per_case(original.reference)
    for name, table in ours.items():
        tests[name] = wilcoxon([table.get(c, np.nan) for c in cases], [theirs[name].get(c, np.nan) for c in cases])
    adjusted = holm([t.p for t in tests.values()])
    return {name: {"n": t.n, "statistic": t.statistic, "p": t.p, "p_holm": p, "median_difference": t.median_difference,
                   "significant": p is not None and p < ALPHA, "note": t.note}
            for (name, t), p in zip(tests.items(), adjusted, strict=True)}


def _load(candidates: Sequence[Candidate], folders: Sequence[ModelFolder], device: str, runtime: str,
          report: Progress) -> tuple[list[ModelResult], list[Segmenter]]:
    """Every model loaded once, with its figures; variants must be of the original (given first)."""
    if folders[0].compressed:
        raise TuckerSegmentError(f"{folders[0].path} is compressed; give the original model first, then its variants")
    for folder in folders[1:]:
        if folder.dataset_json.get("labels") != folders[0].dataset_json.get("labels"):
            raise TuckerSegmentError(f"{folder.path} segments other structures than {folders[0].path}; compare "
                                     "variants of one original model")
        for fold in filter(folder.is_compressed_fold, folder.folds):  # its speed-up and Dice are against this original
            folder.compressed_from(folders[0], fold)
    results, segmenters = [], []
    for index, (candidate, folder) in enumerate(zip(candidates, folders, strict=True)):
        report(0.02 * index / len(candidates), f"loading {folder.path.name}")
        info = describe_model(folder.path)
        info["calibration"] = folder.tucker_record(folder.folds[0]).get("calibration") if folder.compressed else None
        segmenters.append(Segmenter(folder, device=device, runtime=runtime, precision=candidate.precision,
                                    calibration=int8_calibration))  # int8: quantized on the sample CT, as segment
        results.append(ModelResult(candidate.name or folder.name, str(folder.path),
                                   candidate.curve or curve_of(info, candidate.precision), candidate.precision, info))
    return results, segmenters


def evaluate(original: Candidate | str | Path, variants: Sequence[Candidate | str | Path], scans: Sequence[Scan], *,
             device: str = "auto", runtime: str = "auto", rounds: int = 1, memory: bool = True,
             progress: Progress | None = None) -> Evaluation:
    """Segment ``scans`` with the original and every variant and score them (see the module docstring);
    ``memory``: also measure each model's peak memory on the first scan, in a fresh process each."""
    if not scans:
        raise TuckerSegmentError("nothing to evaluate: give at least one image")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise TuckerSegmentError(f"rounds must be a whole number of at least 1, not {rounds!r}")
    candidates = [c if isinstance(c, Candidate) else Candidate(Path(c)) for c in (original, *variants)]
    if not variants:
        raise TuckerSegmentError("give at least one variant to compare with the original")
    report = progress or (lambda fraction, message: None)
    labelled = all(scan.reference is not None for scan in scans)
    if not labelled and any(scan.reference is not None for scan in scans):
        raise TuckerSegmentError("some scans have reference labels and some do not; give labels for all or none")
    folders = [ModelFolder.open(c.path) for c in candidates]
    classes, ignore = label_classes(folders[0].dataset_json)
    results, segmenters = _load(candidates, folders, device, runtime, report)
    case_names: list[str] = []
    steps, done = len(scans) * rounds * len(candidates), 0
    for scan_index, scan in enumerate(scans):
        volume = scan.volume()
        reference = reference_labels(scan, volume, classes, ignore) if labelled else None
        if scan_index == 0:
            for segmenter in segmenters:  # loading, conversion and first-call allocations are not the cost
                segmenter.segment(volume)
        labels: list[np.ndarray] = [np.empty(0)] * len(candidates)
        for round_index in range(rounds):
            shift = scan_index * rounds + round_index
            for position in range(len(candidates)):
                index = (position + shift) % len(candidates)
                result = segmenters[index].segment(volume)
                model = results[index]
                model.seconds.append(result.seconds)
                model.runtime = result.runtime
                labels[index] = result.labels
                done += 1
                report(0.05 + 0.9 * done / steps, f"{scan.name}: {model.name} ({result.seconds:.1f} s)")
        for case, region in scan.cases(volume.array.shape).items():
            if case in case_names:
                raise TuckerSegmentError(f"case {case!r} appears twice; give every case its own name")
            case_names.append(case)
            scored = region if reference is None or ignore is None else (
                (reference != ignore) if region is None else region & (reference != ignore))
            for index, model in enumerate(results):
                if reference is not None:
                    for name, counts in overlaps(labels[index], reference, classes, scored).items():
                        model.reference.setdefault(name, {})[case] = counts
                if index:
                    for name, counts in overlaps(labels[index], labels[0], classes, scored).items():
                        model.versus_original.setdefault(name, {})[case] = counts
    for model in results[1:]:
        if labelled:
            model.tests = _test_classes(model, results[0], case_names)
    for index, (model, candidate) in enumerate(zip(results, candidates, strict=True)):
        if memory:
            report(0.95 + 0.05 * index / len(results), f"peak memory of {model.name} (a fresh process)")
            model.peak_bytes = peak_memory(Path(model.path), scans[0].image, device, runtime, candidate.precision)
    notes = [] if labelled else ["no reference labels: Dice against the original's labels only, no paired test"]
    report(1.0, "evaluated")
    return Evaluation(results, [s.name for s in scans], case_names, list(classes.values()), labelled,
                      str(segmenters[0].device), rounds, notes)
