#!/usr/bin/env python
"""Accuracy recovered after compression on the bundled demo model, one function per recovery method.

``finetune``: labelled fine-tuning (``tuckersegment finetune``, nnU-Net's no-mirroring trainer, AdamW, constant lr)
of the compressed points ``scripts/bench_compression.py`` cached (default: budget, activation-aware, at 0.3 and 0.2 of
the FLOPs) on an nnU-Net raw data set made of the sample chest CT whose held-out checkerboard blocks
(``image.holdout.holdout_mask``) carry the ``ignore`` label, so they are never learned from (the image is seen,
its labels there are not). Held-out Dice before and after, and the time each run took here.

Usage: python scripts/bench_recovery.py finetune [--points budget-calibrated-0.3 budget-calibrated-0.2]
       [--epochs 4] [--iterations-per-epoch 25] [--lr 1e-4] [--device auto]
Writes docs/bench/recovery_finetune.json (and prints a Markdown table).

NOTE (fine-tuning helper, 2026-12-04 07:53): this file replaced by mistake an uncommitted version holding the
distillation benchmark; add it back as a function registered in ``METHODS`` (and remove this note).
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
from TuckerSegmentLib.image.holdout import holdout_mask
from TuckerSegmentLib.image.volume import Volume, volume_to_image
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.paths import cache_dir
from TuckerSegmentLib.recovery.finetune import finetune_model_folder
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import ChestSample, chest_sample, held_out_dice

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


METHODS = {"finetune": finetune}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted(METHODS))
    parser.add_argument("--points", nargs="+", default=["budget-calibrated-0.3", "budget-calibrated-0.2"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--iterations-per-epoch", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    rows = METHODS[args.method](args.points, args.epochs, args.iterations_per_epoch, args.lr, args.device)
    settings = {"epochs": args.epochs, "iterations_per_epoch": args.iterations_per_epoch, "lr": args.lr,
                "device": args.device, "machine": platform.processor() or platform.machine()}
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / f"recovery_{args.method}.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    print("| compressed point | held-out Dice before | after fine-tuning | time |\n|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['point']} | {row['held_out_dice_before']:.3f} | {row['held_out_dice_after']:.3f} | "
              f"{row['seconds']:.0f} s |")


if __name__ == "__main__":
    main()
