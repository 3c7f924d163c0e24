#!/usr/bin/env python
"""Accuracy recovered after compression on the bundled demo model: before, after distillation, after fine-tuning.

``table`` (the table in ``docs/guide/recovering.md``, ``docs/recovery.md``): for each compressed point (default: the budget policy,
activation-aware, at 0.3 and 0.2 of the FLOPs, cached by ``scripts/bench_compression.py``; the uniform rule at
factor 0.5 and at the smallest factor ``--rank-min`` 8 allows, compressed here with ``tuckersegment compress``),
runs the user's commands one after the other, alone, and times each:

- ``tuckersegment distill POINT OUT --teacher chest-demo --calibration chest_train_half.nii.gz`` (no labels): the
  sample CT whose held-out checkerboard blocks (``image.holdout.holdout_mask``) are replaced by their left-right mirror
  image, which lies in the training half (``demo_data.training_half_ct``), so the held-out half is never seen, as
  labels or as images;
- ``tuckersegment finetune POINT OUT --dataset Dataset990_ChestDemoHoldout``: nnU-Net raw data set of the sample CT
  whose held-out blocks carry nnU-Net's ``ignore`` label (the image is seen there, its labels are not).

Held-out mean Dice (7 structures, the held-out half, ``testing.demo_data.held_out_dice``) of each folder.

``distill --compare-trained``: the Python API on the training half's voxels, the 0.3 point with only the
factorised layers trained, then all parameters (same iterations and learning rate): the measurement behind
``distill.DEFAULT_TRAINED`` (``docs/bench/recovery_distill.json``).

Usage: python scripts/bench_recovery.py table [--points ...] [--iterations 200] [--epochs 4]
       [--iterations-per-epoch 25] [--lr 1e-4] [--docs-only]
       python scripts/bench_recovery.py distill [--points ...] [--iterations 60] [--lr 1e-4] [--compare-trained]
Writes docs/bench/recovery_<method>.json; table also docs/recovery.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from TuckerSegmentLib.compress.calibration_data import CalibrationVolume
from TuckerSegmentLib.compress.folder import describe_model
from TuckerSegmentLib.image.holdout import holdout_mask
from TuckerSegmentLib.image.volume import Volume, volume_to_image
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.paths import cache_dir
from TuckerSegmentLib.runtime.latency import device_name
from TuckerSegmentLib.recovery.distill import distill_model_folder
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import ChestSample, chest_sample, held_out_dice, training_half_ct
from TuckerSegmentLib.variants.choice import bundled_models

DOCS = Path(__file__).resolve().parents[1] / "docs" / "bench"
POINTS = cache_dir() / "bench_compression" / "demo"
DATASET = "Dataset990_ChestDemoHoldout"


def write_holdout_dataset(root: Path, sample: ChestSample, labels: dict[str, int]) -> Path:
    """``root/Dataset990_ChestDemoHoldout`` (nnU-Net raw): the sample CT, its labels with the held-out blocks set to
    an ``ignore`` label one above the model's highest value."""
    folder = root / DATASET
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    ignore = max(labels.values()) + 1
    label = sample.labels.astype(np.uint8).copy()
    label[holdout_mask(label.shape)] = ignore
    sitk.WriteImage(volume_to_image(sample.ct), str(folder / "imagesTr" / "chest_0000.nii.gz"))
    sitk.WriteImage(volume_to_image(Volume(label, sample.ct.ijk_to_ras)), str(folder / "labelsTr" / "chest.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {**labels, "ignore": ignore}, "numTraining": 1,
        "file_ending": ".nii.gz", "description": "slicerio sample chest CT; held-out checkerboard blocks = ignore"}))
    return folder


def _held_out(folder: Path, sample: ChestSample, held: np.ndarray) -> float:
    return held_out_dice(Segmenter(folder, device="cpu", runtime="torch").segment(sample.ct).labels, sample, held)


ORIGINAL_ID = "chest-demo"
TRAIN_HALF_CT = "chest_train_half.nii.gz"


def original_folder() -> Path:
    return Path(next(e["path"] for e in bundled_models() if e["policy"] == "original"))


def write_train_half_ct(work: Path, sample: ChestSample, held: np.ndarray) -> Path:
    """The sample CT as distillation may see it (``demo_data.training_half_ct``), as a file."""
    path = work / TRAIN_HALF_CT
    sitk.WriteImage(volume_to_image(training_half_ct(sample, held)), str(path))
    return path


def smallest_uniform_factor(model: Path, rank_min: int) -> float:
    """The smallest uniform factor ``rank_min`` allows: every rank is ``rank_min`` (or the layer's channels) at it,
    and any smaller factor gives the same network (rounded down to four decimals)."""
    widest = max(ModelFolder.open(model).configuration_manager.network_arch_init_kwargs["features_per_stage"])
    return math.floor(rank_min / widest * 1e4) / 1e4


def flops(folder: Path) -> int:
    return int(describe_model(folder)["flops"])


def timed(command: list[str], shown: str) -> dict:
    """Run one ``tuckersegment`` command, exit on failure; its wall time and the command as shown in the docs."""
    print(f"$ {shown}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {shown}")
    print(done.stdout, file=sys.stderr)
    return {"command": shown, "seconds": round(seconds, 1), "load_average_1min_after": round(os.getloadavg()[0], 2)}


def table(points: list[str], rank_min: int, iterations: int, epochs: int, per_epoch: int,
          lr: float) -> tuple[float, list[dict]]:
    """The original's held-out Dice, and each point's before, after ``tuckersegment distill`` and after
    ``tuckersegment finetune``, commands timed."""
    sample = chest_sample()
    held = holdout_mask(sample.ct.array.shape)
    original = original_folder()
    cli = str(Path(sys.executable).with_name("tuckersegment"))
    names = {str(original): ORIGINAL_ID}
    factor = smallest_uniform_factor(original, rank_min)
    original_flops = flops(original)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as scratch:
        work = Path(scratch)
        labels = {k: v for k, v in ModelFolder.open(original).dataset_json["labels"].items() if isinstance(v, int)}
        dataset = write_holdout_dataset(work, sample, labels)
        ct = write_train_half_ct(work, sample, held)
        names.update({str(dataset): DATASET, str(ct): TRAIN_HALF_CT})

        def run(*arguments: str) -> dict:
            shown = " ".join(shlex.quote(names.get(a, Path(a).name if a.startswith(scratch) else a)) for a in arguments)
            return timed([cli, *arguments, "--quiet"], f"tuckersegment {shown}")

        for point in points:
            source, made = POINTS / point, None
            if point.startswith("uniform-min"):
                source = work / f"uniform-{factor:g}"
                made = run("compress", str(original), str(source), "--factor", f"{factor:g}", "--rank-min",
                           str(rank_min), "--weight-only")
            elif not source.is_dir():
                sys.exit(f"{source} is missing: run python scripts/bench_compression.py --model demo --build-only")
            names[str(source)] = source.name
            row = {"point": source.name, "flops_fraction": round(flops(source) / original_flops, 3),
                   "compress": made or {"command": "python scripts/bench_compression.py --model demo --build-only"},
                   "before": round(_held_out(source, sample, held), 4)}
            distilled, finetuned = work / f"{source.name}-distilled", work / f"{source.name}-finetuned"
            row["distill"] = run("distill", str(source), str(distilled), "--teacher", str(original), "--calibration",
                                 str(ct), "--iterations", str(iterations), "--lr", f"{lr:g}", "--device", "cpu")
            row["distill"]["held_out_dice"] = round(_held_out(distilled, sample, held), 4)
            row["finetune"] = run("finetune", str(source), str(finetuned), "--dataset", str(dataset), "--epochs",
                                  str(epochs), "--iterations-per-epoch", str(per_epoch), "--lr", f"{lr:g}",
                                  "--original", str(original), "--device", "cpu")
            row["finetune"]["held_out_dice"] = round(_held_out(finetuned, sample, held), 4)
            rows.append(row)
            print(f"{source.name}: {row['before']:.3f} -> distilled {row['distill']['held_out_dice']:.3f}, "
                  f"fine-tuned {row['finetune']['held_out_dice']:.3f}", file=sys.stderr, flush=True)
    return round(_held_out(original, sample, held), 4), rows


def _distil_one(source: Path, original: Path, sample: ChestSample, held: np.ndarray, scratch: Path, iterations: int,
                lr: float, device: str, trained: str = "auto") -> dict:
    before = _held_out(source, sample, held)
    out = scratch / f"{source.name}-distilled-{trained}"
    start = time.perf_counter()
    record = distill_model_folder(source, original, [CalibrationVolume(sample.ct, ~held)], out, iterations=iterations,
                                  lr=lr, trained=trained, device=device, overwrite=True,
                                  progress=lambda d, t, m, p=source.name: print(f"  {p} [{d}/{t}] {m}", file=sys.stderr))
    seconds = time.perf_counter() - start
    after = _held_out(out, sample, held)
    print(f"{source.name} ({record['trained']}): held-out Dice {before:.3f} -> {after:.3f} in {seconds:.0f} s",
          file=sys.stderr)
    return {"point": source.name, "held_out_dice_before": round(before, 4), "held_out_dice_after": round(after, 4),
            "seconds": round(seconds, 1), "training_seconds": record["seconds"], "iterations": iterations, "lr": lr,
            "trained": record["trained"], "trained_params": record["trained_params"], "device": record["device"],
            "agreement": record["agreement"], "kl": record["kl"], "log": record["log"]}


def distill(points: list[str], iterations: int, lr: float, device: str, compare_trained: bool) -> list[dict]:
    """Distil each cached compressed point from the original on the training half of the sample CT (no labels);
    held-out Dice before/after. ``compare_trained``: first the 0.3 point with factorised-only and all parameters."""
    sample = chest_sample()
    held = holdout_mask(sample.ct.array.shape)
    original = original_folder()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-distill-") as scratch:
        chosen = "auto"
        if compare_trained:
            for trained in ("factorised", "all"):
                rows.append({"comparison": True, **_distil_one(POINTS / "budget-calibrated-0.3", original, sample, held,
                                                               Path(scratch), iterations, lr, device, trained)})
            # the points then train what agreed better with the original on the held-out quarter (label-free)
            chosen = max(rows, key=lambda r: (r["agreement"]["after"], -r["kl"]["after"]))["trained"]
        for point in points:
            source = POINTS / point
            if not source.is_dir():
                sys.exit(f"{source} is missing: run python scripts/bench_compression.py --model demo first")
            rows.append(_distil_one(source, original, sample, held, Path(scratch), iterations, lr, device, chosen))
    return rows


LABELS = {"budget-calibrated-0.3": "budget, activation-aware, 30 % of the FLOPs",
          "budget-calibrated-0.2": "budget, activation-aware, 20 % of the FLOPs",
          "uniform-0.5": "uniform rule, factor 0.5 (weight-only)"}


def label(point: str) -> str:
    """How the docs name a compressed point."""
    if point in LABELS:
        return LABELS[point]
    return f"uniform rule, factor {point.split('-')[1]}: the smallest rank_min 8 allows (every rank 8)"


def write_table_docs(rows: list[dict], settings: dict) -> None:
    """docs/recovery.md: the table with each command and its time, and the trained-parameters comparison."""
    original = settings["original_held_out_dice"]
    lines = ["# Recovering accuracy on the demo model: distillation (no labels) and fine-tuning (labels)", "",
             f"Generated by `python scripts/bench_recovery.py table` ({settings['machine']}, {settings['cores']} "
             "cores, each command run alone). Held-out mean Dice (7 structures) on the held-out checkerboard "
             f"half of the sample CT; the original: {original:.3f}. Distillation sees only `{TRAIN_HALF_CT}` (the "
             "sample CT whose held-out blocks show their mirror image from the training half: never seen as labels "
             "or images); fine-tuning sees "
             f"`{DATASET}` (the sample CT, the held-out blocks labelled `ignore`: never learned from). "
             "The budget points are cached by `scripts/bench_compression.py` (calibrated on the training half).", "",
             "| compressed point | FLOPs kept | held-out Dice before | after distillation | after fine-tuning |",
             "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {label(row['point'])} | {row['flops_fraction']:.0%} | {row['before']:.3f} | "
                     f"{row['distill']['held_out_dice']:.3f} ({row['distill']['seconds']:.0f} s) | "
                     f"{row['finetune']['held_out_dice']:.3f} ({row['finetune']['seconds']:.0f} s) |")
    lines += ["", "The commands, as run (paths shortened; the time includes loading, the held-out agreement or "
              "nnU-Net's validations, and writing the folder):", "", "```"]
    for row in rows:
        for step in ("compress", "distill", "finetune"):
            if step == "compress" and not row[step]["command"].startswith("tuckersegment"):
                continue
            lines.append(f"{row[step]['command']}   # {row[step]['seconds']:.0f} s")
    lines += ["```", "", "What trains in distillation (`distill.DEFAULT_TRAINED`), from `python scripts/bench_recovery.py "
              "distill --compare-trained` (`docs/bench/recovery_distill.json`, Python API, the training half's voxels "
              "scored while the held-out blocks stayed visible as context, an earlier protocol; 60 iterations):", ""]
    compared = json.loads((DOCS / "recovery_distill.json").read_text())["rows"]
    for row in (r for r in compared if r.get("comparison")):
        lines.append(f"- {row['trained']} ({row['trained_params']} parameters): held-out Dice {row['held_out_dice_before']:.3f} → "
                     f"{row['held_out_dice_after']:.3f}, agreement {row['agreement']['before']} → {row['agreement']['after']}")
    (DOCS.parent / "recovery.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=("table", "distill"))
    parser.add_argument("--docs-only", action="store_true",
                        help="table: rewrite docs/recovery.md from docs/bench/recovery_table.json, run nothing")
    parser.add_argument("--points", nargs="+",
                        help="table default: budget-calibrated-0.3 budget-calibrated-0.2 uniform-0.5 uniform-min; "
                             "distill default: budget-calibrated-0.3 budget-calibrated-0.2")
    parser.add_argument("--rank-min", type=int, default=8, help="table: the uniform-min point's rank_min")
    parser.add_argument("--iterations", type=int, default=200, help="distillation iterations")
    parser.add_argument("--epochs", type=int, default=4, help="table: fine-tuning epochs")
    parser.add_argument("--iterations-per-epoch", type=int, default=25, help="table: fine-tuning iterations per epoch")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--compare-trained", action="store_true",
                        help="distill: also the 0.3 point with factorised-only and all parameters trained")
    args = parser.parse_args()
    machine = {"machine": device_name(torch.device("cpu")), "cores": os.cpu_count()}
    DOCS.mkdir(parents=True, exist_ok=True)
    if args.method == "table" and args.docs_only:
        saved = json.loads((DOCS / "recovery_table.json").read_text())
        write_table_docs(saved["rows"], saved["settings"])
    elif args.method == "table":
        points = args.points or ["budget-calibrated-0.3", "budget-calibrated-0.2", "uniform-0.5", "uniform-min"]
        original, rows = table(points, args.rank_min, args.iterations, args.epochs, args.iterations_per_epoch,
                               args.lr)
        settings = {"original_held_out_dice": original, "iterations": args.iterations, "epochs": args.epochs,
                    "iterations_per_epoch": args.iterations_per_epoch, "lr": args.lr, "device": "cpu", **machine}
        (DOCS / "recovery_table.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
        write_table_docs(rows, settings)
    else:
        points = args.points or ["budget-calibrated-0.3", "budget-calibrated-0.2"]
        rows = distill(points, args.iterations, args.lr, "auto", args.compare_trained)
        settings = {"iterations": args.iterations, "lr": args.lr, "device": "auto", **machine}
        (DOCS / "recovery_distill.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
