"""Measure a built variant against its original on this machine, as ``segment`` would run both.

Which CTs calibrate and which are scored (``plan_measurement``): with ``--holdout`` CTs, the
calibration CTs are used whole and only the held-out CTs are scored; without, each calibration CT is
split into a checkerboard of blocks (``image.holdout``): the compression calibrates on one half and
agreement is scored on the other, so no scored voxel was ever calibrated on. Without any CT, the
bundled sample chest CT is split the same way.

``measure_variant`` segments every scored CT with the original and the variant in the runtime
``auto`` runs on the device (OpenVINO on a CPU when installed): once both are loaded (converted, compiled),
rounds interleave the two; it records the agreement per structure in the scored region,
seconds per volume (median of the rounds), the speed-up, the peak memory of the first segmentation
once loaded, and the context (``measured.measurement_context``).
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..compress.calibration_data import CalibrationVolume
from ..compress.calibration_source import sample_ct
from ..errors import ModelFolderError
from ..image.holdout import holdout_mask
from ..image.volume import Volume, read_volume
from ..progress import stage
from ..runtime.memory import PeakMemory
from ..segment.task import TaskSegmenter
from .agreement import Overlap, mean_agreement
from ..runtime.hardware import DeviceInfo
from .measured import measurement_context

ROUNDS = 3
SAMPLE_NAME = "the bundled sample chest CT"


@dataclass(frozen=True)
class ScoredVolume:
    """A CT agreement is scored on, and where (``region`` True; None: everywhere)."""

    name: str
    volume: Volume
    region: np.ndarray | None


@dataclass(frozen=True)
class MeasurementPlan:
    """The calibration inputs of a build and the CTs its variants are scored on, kept apart."""

    calibration: list[CalibrationVolume]
    scored: list[ScoredVolume]
    how: str  # e.g. "held-out blocks of 1 of your CTs (calibrated on the other blocks)"
    calibrated_on: str  # e.g. "the other blocks of 1 of your CTs"
    record: dict[str, Any]  # what the manifest keeps to measure again: source and paths


CT = str | Path | tuple[str, Volume]  # a file, or a named volume already read (e.g. from the Slicer scene)


def _read(items: Sequence[CT], role: str) -> list[tuple[Path, Volume]]:
    read = []
    for item in items:
        if isinstance(item, tuple):
            read.append((Path(item[0]), item[1]))
            continue
        resolved = Path(item).expanduser().resolve()
        if not resolved.is_file():
            raise ModelFolderError(f"{role} CT {item} does not exist; pass existing NIfTI or NRRD files")
        read.append((resolved, read_volume(resolved)))
    return read


def _same_scan(a: Volume, b: Volume) -> bool:
    return a.array.shape == b.array.shape and np.array_equal(a.ijk_to_ras, b.ijk_to_ras) and \
        np.array_equal(a.array, b.array)


def plan_measurement(calibration: Sequence[CT] = (), holdout: Sequence[CT] = ()) -> MeasurementPlan:
    """Split the CTs into calibration inputs and scored volumes (see the module docstring); a CT given
    twice, or as both calibration and held-out, is refused before anything is built."""
    if holdout and not calibration:
        raise ModelFolderError("--holdout needs --calibration: give the CTs to calibrate on too (the held-out ones "
                               "are only scored)")
    mine = _read(calibration, "calibration")
    kept = _read(holdout, "held-out")
    everything = mine + kept
    for index, (path, volume) in enumerate(everything):
        for other, other_volume in everything[:index]:
            if path == other or _same_scan(volume, other_volume):
                raise ModelFolderError(f"{path} is the same CT as {other}: a CT is either calibrated on or held out "
                                       "(scored), once; remove the repeat")
    if kept:
        return MeasurementPlan([CalibrationVolume(v, None) for _, v in mine],
                               [ScoredVolume(p.name, v, None) for p, v in kept],
                               f"{len(kept)} of your CTs never used for calibration", f"{len(mine)} of your CTs",
                               {"source": "user", "calibration": [str(p) for p, _ in mine],
                                "holdout": [str(p) for p, _ in kept]})
    source = "user" if mine else "sample"
    if not mine:
        mine = [(Path(sample_ct()), read_volume(sample_ct()))]
    calibrate, scored = [], []
    for path, volume in mine:
        held = holdout_mask(volume.array.shape)
        calibrate.append(CalibrationVolume(volume, ~held))
        scored.append(ScoredVolume(path.name if source == "user" else SAMPLE_NAME, volume, held))
    whose = f"{len(mine)} of your CTs" if source == "user" else SAMPLE_NAME
    return MeasurementPlan(calibrate, scored, f"held-out blocks of {whose} (calibrated on the other blocks)",
                           f"the other blocks of {whose}",
                           {"source": source, "calibration": [str(p) for p, _ in mine] if source == "user" else [],
                            "holdout": []})


def replan(record: Mapping[str, Any]) -> MeasurementPlan:
    """The plan a manifest's ``record`` was measured with (its CTs must still exist)."""
    if record.get("source") != "user":
        return plan_measurement()
    paths = [*record.get("calibration", []), *record.get("holdout", [])]
    gone = [path for path in paths if not Path(path).is_file()]
    if gone:
        raise ModelFolderError(f"the CTs this variant was built and measured with are gone ({', '.join(gone[:3])}); "
                               "build it again with --calibration CT... (and --holdout CT...)")
    return plan_measurement(record.get("calibration", []), record.get("holdout", []))


def _segmenters(original: Sequence[Path], variant: Sequence[Path], device: DeviceInfo,
                label_maps: Sequence[Mapping[int, tuple[int, str]]] | None,
                forms: Sequence[str]) -> dict[str, TaskSegmenter]:
    """The original and the variant as ``auto`` runs them on ``device``, and the variant in each of ``forms``."""
    models = {name: TaskSegmenter(folders, label_maps=label_maps, device=device.torch_device)
              for name, folders in (("original", original), ("variant", variant))}
    for precision in forms:
        models[precision] = TaskSegmenter(variant, label_maps=label_maps, device=device.torch_device,
                                          precision=precision)
    for segmenter in models.values():
        segmenter.load()  # loading, conversion and compilation are not the cost (the median of rounds drops the first)
    return models


def measure_variant(original: Sequence[Path], variant: Sequence[Path], scored: Sequence[ScoredVolume],
                    device: DeviceInfo, how: str, label_maps: Sequence[Mapping[int, tuple[int, str]]] | None = None,
                    rounds: int = ROUNDS, say: Callable[[str], None] | None = None,
                    forms: Sequence[str] = ()) -> dict[str, Any]:
    """Agreement, seconds, speed-up and peak memory of ``variant`` against ``original`` on ``scored``; ``forms``:
    the variant's other precisions (bf16, int8) measured the same way, under ``forms`` in the result."""
    if not scored:
        raise ModelFolderError("nothing to score the variant on: give held-out CTs or calibration CTs to split")
    models = _segmenters(original, variant, device, label_maps, forms)
    names = {s.value: s.name for s in models["original"].segments}
    figures = {name: {"overlap": Overlap(), "seconds": [], "peak": 0, "runtime": ""} for name in models}
    with stage("segmenting with the original and the variant", len(scored) * rounds) as step:
        for index, item in enumerate(scored, start=1):
            (say or (lambda message: None))(f"measuring on {item.name} ({index}/{len(scored)}): {rounds} "
                                            "interleaved rounds")
            labels = _interleaved(models, item, rounds, figures, step)
            for name in models:
                if name != "original":
                    figures[name]["overlap"].add(labels[name], labels["original"], names, item.region)
    total = sum(figures["original"]["seconds"])
    result = {"how": how, "volumes": len(scored), **_figures(figures["variant"], total),
              "original_seconds": round(total / len(scored), 3),
              "original_peak_memory_bytes": figures["original"]["peak"],
              "timing": f"seconds per volume, median of {rounds} interleaved rounds once loaded, "
                        f"{figures['variant']['runtime']}; peak memory: resident memory added during the first "
                        "segmentation once loaded",
              "context": measurement_context(device), "device_kind": device.kind, "measured": time.strftime("%Y-%m-%d")}
    if forms:
        result["forms"] = {p: {**_figures(figures[p], total), "runtime": figures[p]["runtime"]} for p in forms}
    return result


def _interleaved(models: Mapping[str, TaskSegmenter], item: ScoredVolume, rounds: int, figures: dict[str, Any],
                 step: Callable[[], None]) -> dict[str, np.ndarray]:
    """``rounds`` rounds of every model on ``item``, one after the other; the median seconds and the first round's
    peak memory go into ``figures``; the labels of the last round come back."""
    times: dict[str, list[float]] = {name: [] for name in models}
    labels: dict[str, np.ndarray] = {}
    for round_index in range(rounds):
        for name, segmenter in models.items():
            with PeakMemory() as memory:
                result = segmenter.segment(item.volume)
            if round_index == 0 and memory.peak is not None:
                figures[name]["peak"] = max(figures[name]["peak"], memory.peak)
            times[name].append(result.seconds)
            labels[name], figures[name]["runtime"] = result.labels, result.runtime
        step()
    for name in models:
        figures[name]["seconds"].append(statistics.median(times[name]))
    return labels


def _figures(figures: dict[str, Any], original_seconds: float) -> dict[str, Any]:
    """Agreement, seconds per volume, speed-up and peak memory of one model from its ``figures``."""
    structures = figures["overlap"].structures()
    return {"structures": structures, "mean_agreement": mean_agreement(structures),
            "seconds": round(sum(figures["seconds"]) / len(figures["seconds"]), 3),
            "speedup": round(original_seconds / sum(figures["seconds"]), 3), "peak_memory_bytes": figures["peak"]}
