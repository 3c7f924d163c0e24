#!/usr/bin/env python
"""Bundle the trained demo model and its Tucker-compressed variants, and measure them.

Copies the nnU-Net results folder written by ``train_demo_model.py`` to
``TuckerSegment/Resources/Models/chest-demo`` (without it, the bundled original is kept), then
compresses it into:

- ``chest-demo-tucker-balanced`` and ``chest-demo-tucker-fast``: TuckerSegment's default policy
  (activation-aware budgets: 70 % of the original's time per patch, timed in the runtime segmentation
  uses on this CPU; 30 % of the FLOPs), calibrated on the training half of the sample CT only: the
  checkerboard blocks the model trained on (``holdout_mask``), never the blocks that are scored; then
  distilled from the original (``DISTILL_ITERATIONS``, no labels) on the sample CT whose held-out blocks
  are replaced by their mirror image from the training half (``demo_data.training_half_ct``), as
  ``tuckersegment distill`` does in ``docs/recovery.md``;
- ``chest-demo-tucker-0.7/0.5/0.3``: the paper's uniform rule, weight-only, as references.

Each is measured as ``tuckersegment build-variants`` measures a user's variant
(``variants.measure.measure_variant``: agreement with the original per structure on the held-out
half, seconds per volume interleaved with the original, peak memory, in the runtime ``auto`` runs),
plus Dice per structure on the held-out half against the sample's reference segmentation.
Writes ``Resources/Models/models.json`` (then ``build_catalogue.py --entries-only``) and
``docs/demo_model.md``.

Usage: python scripts/build_demo_variants.py [TRAINED_RESULTS_DIR] [--rounds 7]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from TuckerSegmentLib.compress.calibration_data import CalibrationVolume
from TuckerSegmentLib.compress.folder import compress_model_folder, describe_model
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.paths import BUNDLED_MODELS
from TuckerSegmentLib.policies.base import RankPolicy
from TuckerSegmentLib.policies.budget import BudgetPolicy
from TuckerSegmentLib.policies.uniform import UniformPolicy
from TuckerSegmentLib.recovery.compress_distill import compress_and_distill
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import ChestSample, chest_sample, holdout_mask, training_half_ct
from TuckerSegmentLib.tucker.network_stats import FLOP_CONVENTION
from TuckerSegmentLib.variants.choice import BUNDLED_CATALOGUE
from TuckerSegmentLib.runtime.hardware import cpu_device
from TuckerSegmentLib.variants.measure import ScoredVolume, measure_variant

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_ID = "chest-demo"
# TotalSegmentator's default variants are latency budgets (70 % and 50 % of the original's time). On this
# small network OpenVINO spends a third or more of the time outside convolutions, so no rank choice reaches
# 50 % (the planner refuses it); its fast variant is the default policy at 30 % of the FLOPs instead.
DEFAULT_POLICIES = {"balanced": BudgetPolicy(target_latency=0.7), "fast": BudgetPolicy(target_flops=0.3)}
UNIFORM_FACTORS = (0.7, 0.5, 0.3)
DISTILL_ITERATIONS = 200  # the default-policy variants are distilled; docs/recovery.md measured this setting
HOW = "held-out half of the bundled sample CT (calibrated on the other half)"


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def held_out_dice(folder: Path, sample, held_out: np.ndarray) -> dict[str, float | None]:
    """Dice per structure against the reference on the held-out half (the runtime ``auto`` runs)."""
    result = Segmenter(folder, device="cpu").segment(sample.ct)
    return {s.name: dice(result.labels[held_out] == s.value, sample.labels[held_out] == s.value)
            for s in result.segments}


def variants(sample, held_out: np.ndarray) -> dict[str, tuple[RankPolicy, list[CalibrationVolume] | None]]:
    calibration = [CalibrationVolume(sample.ct, ~held_out)]  # the training half only
    made: dict[str, tuple[RankPolicy, list[CalibrationVolume] | None]] = {
        f"{ORIGINAL_ID}-tucker-{name}": (policy, calibration) for name, policy in DEFAULT_POLICIES.items()}
    made.update({f"{ORIGINAL_ID}-tucker-{factor:g}": (UniformPolicy(factor, rank_min=8), None)
                 for factor in UNIFORM_FACTORS})
    return made


def distilled_variant(original: Path, folder: Path, policy: RankPolicy, calibration: list[CalibrationVolume],
                      sample: ChestSample, held_out: np.ndarray) -> dict[str, Any]:
    """``folder``: ``original`` compressed with ``policy`` (calibrated on ``calibration``), then distilled on the
    training-half CT (``recovery.compress_distill``); what the distillation did."""
    _, record = compress_and_distill(
        lambda out: compress_model_folder(original, out, policy, calibration=calibration), original, folder,
        [training_half_ct(sample, held_out)], DISTILL_ITERATIONS, {"policy": policy.to_dict()}, device="cpu")
    return {"method": "distill", "iterations": DISTILL_ITERATIONS, "trained": record["trained"],
            "seconds": record["seconds"], "agreement": record["agreement"],
            "data": "the sample CT, its held-out blocks replaced by their mirror image from the training half "
                    "(no labels)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trained", type=Path, nargs="?", help="results folder written by train_demo_model.py")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds per model (median)")
    args = parser.parse_args()
    torch.manual_seed(0)
    original_dir = BUNDLED_MODELS / ORIGINAL_ID
    if args.trained is not None:
        dataset_dir = ModelFolder.open(args.trained).path.parent
        shutil.rmtree(original_dir, ignore_errors=True)
        shutil.copytree(dataset_dir, original_dir / dataset_dir.name)
    for stale in BUNDLED_MODELS.glob(f"{ORIGINAL_ID}-tucker-*"):
        shutil.rmtree(stale)
    sample = chest_sample()
    held_out = holdout_mask(sample.labels.shape)
    scored = [ScoredVolume("the sample CT", sample.ct, held_out)]
    device = cpu_device()
    entries: list[dict[str, Any]] = []
    distilled = {f"{ORIGINAL_ID}-tucker-{name}" for name in DEFAULT_POLICIES}
    for model_id, (policy, calibration) in {ORIGINAL_ID: (None, None), **variants(sample, held_out)}.items():
        folder = original_dir if policy is None else BUNDLED_MODELS / model_id
        recovery = None
        if model_id in distilled:
            recovery = distilled_variant(original_dir, folder, policy, calibration, sample, held_out)
        elif policy is not None:
            compress_model_folder(original_dir, folder, policy, calibration=calibration,
                                  weight_only=calibration is None)
        info = describe_model(folder)
        per_class = held_out_dice(folder, sample, held_out)
        scores = [v for v in per_class.values() if v is not None]
        measurement = None if policy is None else measure_variant(
            [original_dir], [folder], scored, device, HOW, rounds=args.rounds)
        entries.append({"id": model_id, "folder": folder.name,
                        "policy": "original" if policy is None else policy.to_dict(),
                        "calibration": "none (the paper's rule, weight-only)" if policy is not None and calibration is None
                        else None if policy is None else "training half of the sample CT"
                        + (f"; distilled {DISTILL_ITERATIONS} iterations" if recovery else ""),
                        **{k: info[k] for k in ("params", "flops", "weights_bytes", "file_bytes")},
                        "recovery": recovery, "held_out_dice": per_class, "mean_dice": float(np.mean(scores)),
                        "agreement_with_original": None if measurement is None else measurement["mean_agreement"],
                        "measurement": measurement})
        speed = "" if measurement is None else f", {measurement['speedup']:.2f}x, agreement {measurement['mean_agreement']}"
        print(f"{model_id}: mean held-out Dice {entries[-1]['mean_dice']:.4f}{speed}", flush=True)
    counts = {s["name"]: {"train": int(((sample.labels == s["labelValue"]) & ~held_out).sum()),
                          "held_out": int(((sample.labels == s["labelValue"]) & held_out).sum())}
              for s in sample.segments}
    measured_on = next(e["measurement"]["context"] for e in entries if e["measurement"])
    catalogue = {"schema": 1, "sample": "slicerio CTChest4.nrrd + Segmentation.seg.nrrd",
                 "quality": "Dice per structure on the held-out checkerboard half (demo_data.holdout_mask), "
                            "segmenting the whole sample CT with Segmenter (tile step 0.8, no mirroring, the runtime "
                            "auto runs); agreement and speed as tuckersegment build-variants measures them",
                 "measured_on": f"{measured_on['device']}, {measured_on['runtime']}, engine {measured_on['engine']}",
                 "flop_convention": FLOP_CONVENTION, "voxel_counts": counts, "models": entries}
    BUNDLED_CATALOGUE.write_text(json.dumps(catalogue, indent=1) + "\n")
    write_markdown(catalogue, ROOT / "docs" / "demo_model.md")


def write_markdown(catalogue: dict, path: Path) -> None:
    models = catalogue["models"]
    names = list(models[0]["held_out_dice"])
    lines = ["# Bundled demo model: measured", "",
             f"Written by `scripts/build_demo_variants.py` ({catalogue['measured_on']}). Quality: "
             f"{catalogue['quality']}. FLOPs: {catalogue['flop_convention']}.", "",
             "| model | calibration | params | FLOPs/patch | weights | seconds per volume | speed-up | mean held-out Dice "
             "| agreement with original (lowest structure) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        measured = m["measurement"]
        if measured is None:
            seconds, speedup, agreement = "(reference)", "1.00", "—"
        else:
            low = min(measured["structures"].items(), key=lambda item: item[1]["dice"])
            seconds, speedup = f"{measured['seconds']:.3f}", f"{measured['speedup']:.2f}"
            agreement = f"{measured['mean_agreement']:.3f} ({low[1]['dice']:.3f} {low[0]})"
        lines.append(f"| {m['id']} | {m['calibration'] or '—'} | {m['params'] / 1e6:.3f} M | {m['flops'] / 1e9:.2f} G "
                     f"| {m['weights_bytes'] / 1e6:.2f} MB | {seconds} | {speedup} | {m['mean_dice']:.3f} | {agreement} |")
    original = next(m for m in models if m["measurement"])["measurement"]
    lines += ["", f"Seconds: {original['timing']}; the original took {original['original_seconds']:.3f} s per volume in "
                  "the same rounds.", "",
              "Held-out Dice per structure and reference voxel counts (training half / held-out half):", "",
              "| structure | voxels train | voxels held out | " + " | ".join(m["id"] for m in models) + " |",
              "|---|---:|---:|" + "---:|" * len(models)]
    for name in names:
        count = catalogue["voxel_counts"][name]
        cells = ["—" if m["held_out_dice"][name] is None else f"{m['held_out_dice'][name]:.3f}" for m in models]
        lines.append(f"| {name} | {count['train']} | {count['held_out']} | " + " | ".join(cells) + " |")
    path.parent.mkdir(exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
