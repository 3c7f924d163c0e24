#!/usr/bin/env python
"""Accuracy recovered after compression on the bundled demo model, one function per recovery method.

``finetune``: labelled fine-tuning (``tuckersegment finetune``, nnU-Net's no-mirroring trainer, AdamW, constant lr)
of the compressed points ``scripts/bench_compression.py`` cached (default: budget, activation-aware, at 0.3 and 0.2 of
the FLOPs) on an nnU-Net raw data set made of the sample chest CT whose held-out checkerboard blocks
(``image.holdout.holdout_mask``) carry the ``ignore`` label, so they are never learned from (the image is seen,
its labels there are not). Held-out Dice before and after, and the time each run took here.

``distill``: label-free distillation (``tuckersegment distill``, ``recovery.distill.distill_model_folder``) of the
same cached points from the original, on the *training* half of the sample CT only (``CalibrationVolume(ct,
~holdout_mask)``: the held-out blocks are never scored; they may appear as unscored context inside a training
patch). No labels. ``--compare-trained`` first distils the 0.3 point with only the factorised layers trained, then
with all parameters (same iterations and learning rate): the measurement behind ``distill.DEFAULT_TRAINED``.

Usage: python scripts/bench_recovery.py finetune [--points budget-calibrated-0.3 budget-calibrated-0.2]
       [--epochs 4] [--iterations-per-epoch 25] [--lr 1e-4] [--device auto]
       python scripts/bench_recovery.py distill [--points ...] [--iterations 200] [--lr 1e-4] [--compare-trained]
Writes docs/bench/recovery_<method>.json (and prints a Markdown table); distill also writes docs/recovery.md and
docs/recovery.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from TuckerSegmentLib.compress.calibration_data import CalibrationVolume
from TuckerSegmentLib.image.holdout import holdout_mask
from TuckerSegmentLib.image.volume import Volume, volume_to_image
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.paths import cache_dir
from TuckerSegmentLib.recovery.distill import distill_model_folder
from TuckerSegmentLib.recovery.finetune import finetune_model_folder
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import ChestSample, chest_sample, held_out_dice
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


def finetune(points: list[str], epochs: int, iterations: int, lr: float, device: str) -> list[dict]:
    """Fine-tune each cached compressed point on the training half of the sample CT; held-out Dice before/after."""
    sample = chest_sample()
    held = holdout_mask(sample.ct.array.shape)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as scratch:
        first = ModelFolder.open(POINTS / points[0])
        labels = {k: v for k, v in first.dataset_json["labels"].items() if isinstance(v, int)}
        dataset = write_holdout_dataset(Path(scratch), sample, labels)
        for point in points:
            source = POINTS / point
            if not source.is_dir():
                sys.exit(f"{source} is missing: run python scripts/bench_compression.py --model demo first")
            out = Path(scratch) / f"{point}-finetuned"
            before = _held_out(source, sample, held)
            start = time.perf_counter()
            report = finetune_model_folder(source, dataset, out, epochs=epochs, iterations_per_epoch=iterations,
                                           lr=lr, device=device, data_workers=0,
                                           progress=lambda f, m, p=point: print(f"  {p}: {m}", file=sys.stderr))
            seconds = time.perf_counter() - start
            after = _held_out(out, sample, held)
            rows.append({"point": point, "held_out_dice_before": round(before, 4), "held_out_dice_after": round(after, 4),
                         "seconds": round(seconds, 1), "training_seconds": round(report.seconds, 1),
                         "train_losses": report.train_losses, "validation_dice": report.validation_dice})
            print(f"{point}: held-out Dice {before:.3f} -> {after:.3f} in {seconds:.0f} s", file=sys.stderr)
    return rows


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
    original = Path(next(e["path"] for e in bundled_models() if e["policy"] == "original"))
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


def write_distill_docs(rows: list[dict], settings: dict) -> None:
    """docs/recovery.md and .json: the distillation rows (and the trained-parameters comparison)."""
    docs = DOCS.parent
    (docs / "recovery.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1) + "\n")
    lines = ["# Label-free recovery by distillation (demo model)", "",
             f"Generated by `python scripts/bench_recovery.py distill` ({settings['machine']}, device "
             f"{settings['device']}). Held-out mean Dice of the bundled demo model (7 structures) on the held-out "
             "checkerboard half of the sample CT, before and after distilling each cached compressed point "
             "(`scripts/bench_compression.py`) from the original on the other half's voxels (no labels; the held-out "
             "blocks are never scored). Agreement: label-free Dice with the original on the held-out quarter of the "
             "training half (what `tucker.json` records).", "",
             "| compressed point | trained | iterations | held-out Dice before | after | agreement before → after | "
             "time (s) |", "|---|---|---:|---:|---:|---|---:|"]
    for row in rows:
        lines.append(f"| {row['point']}{' (comparison)' if row.get('comparison') else ''} | {row['trained']} "
                     f"({row['trained_params']} params) | {row['iterations']} | {row['held_out_dice_before']:.3f} | "
                     f"{row['held_out_dice_after']:.3f} | {row['agreement']['before']} → {row['agreement']['after']} | "
                     f"{row['seconds']:.0f} |")
    (docs / "recovery.md").write_text("\n".join(lines) + "\n")


METHODS = {"finetune": lambda a: finetune(a.points, a.epochs, a.iterations_per_epoch, a.lr, a.device),
           "distill": lambda a: distill(a.points, a.iterations, a.lr, a.device, a.compare_trained)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--points", nargs="+", default=["budget-calibrated-0.3", "budget-calibrated-0.2"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations-per-epoch", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--iterations", type=int, default=200, help="distill: training iterations")
    parser.add_argument("--compare-trained", action="store_true",
                        help="distill: also the 0.3 point with factorised-only and all parameters trained")
    args = parser.parse_args()
    rows = METHODS[args.method](args)
    settings = {"epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch, "lr": args.lr,
                "device": args.device, "machine": platform.processor() or platform.machine()}
    if args.method == "distill":
        settings = {"iterations": args.iterations, "lr": args.lr, "device": args.device,
                    "machine": settings["machine"]}
        write_distill_docs(rows, settings)
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"recovery_{args.method}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print("| compressed point | held-out Dice before | after fine-tuning | time |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['point']} | {row['held_out_dice_before']:.3f} | {row['held_out_dice_after']:.3f} | "
              f"{row['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
