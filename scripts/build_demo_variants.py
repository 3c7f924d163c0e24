#!/usr/bin/env python
"""Bundle the trained demo model and its Tucker-compressed variants, and measure them.

Copies the nnU-Net results folder written by ``train_demo_model.py`` to
``TuckerSegment/Resources/Models/chest-demo``, compresses it with the paper's uniform rule
(factors 0.7, 0.5, 0.3; rank_min 8) into ``chest-demo-tucker-<factor>``, then segments the sample
CT with each through the product's own pipeline (``Segmenter``) and records, per model:
parameters, FLOPs per patch, weight bytes, seconds, Dice per structure on the held-out half
(against the sample's reference segmentation) and agreement with the original's labels.
Writes ``Resources/Models/models.json`` (read by ``--model auto``) and ``docs/demo_model.md``.

Usage: python scripts/build_demo_variants.py TRAINED_RESULTS_DIR [--factors 0.7 0.5 0.3]
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from TuckerSegmentLib.compress.folder import compress_model_folder, describe_model
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.paths import BUNDLED_MODELS
from TuckerSegmentLib.policies.uniform import UniformPolicy
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import chest_sample, holdout_mask
from TuckerSegmentLib.tucker.network_stats import FLOP_CONVENTION
from TuckerSegmentLib.variants.choice import BUNDLED_CATALOGUE

ROOT = Path(__file__).resolve().parents[1]
ORIGINAL_ID = "chest-demo"


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = int(a.sum()) + int(b.sum())
    return None if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def evaluate(folder: Path, reference: np.ndarray, held_out: np.ndarray, original_labels: np.ndarray | None,
             ct) -> tuple[dict, np.ndarray]:
    segmenter = Segmenter(folder, device="cpu")
    segmenter.segment(ct)  # warm-up: first-call allocations are not the model's cost
    result = segmenter.segment(ct)
    labels = result.labels
    per_class = {s.name: dice(labels[held_out] == s.value, reference[held_out] == s.value) for s in result.segments}
    scores = [v for v in per_class.values() if v is not None]
    agreement = None
    if original_labels is not None:
        values = [dice(labels == s.value, original_labels == s.value) for s in result.segments]
        agreement = float(np.mean([v for v in values if v is not None]))
    return {"seconds": round(result.seconds, 2), "tiles": result.tiles, "held_out_dice": per_class,
            "mean_dice": float(np.mean(scores)), "agreement_with_original": agreement}, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trained", type=Path, help="results folder written by train_demo_model.py")
    parser.add_argument("--factors", type=float, nargs="+", default=[0.7, 0.5, 0.3])
    args = parser.parse_args()
    torch.manual_seed(0)
    source = ModelFolder.open(args.trained)
    dataset_dir = source.path.parent
    BUNDLED_MODELS.mkdir(parents=True, exist_ok=True)
    original_dir = BUNDLED_MODELS / ORIGINAL_ID
    shutil.rmtree(original_dir, ignore_errors=True)
    shutil.copytree(dataset_dir, original_dir / dataset_dir.name)
    folders = {ORIGINAL_ID: (original_dir, "original")}
    for factor in args.factors:
        variant = f"{ORIGINAL_ID}-tucker-{factor:g}"
        policy = UniformPolicy(factor, rank_min=8)
        compress_model_folder(original_dir, BUNDLED_MODELS / variant, policy, overwrite=True)
        folders[variant] = (BUNDLED_MODELS / variant, policy.to_dict())

    sample = chest_sample()
    held_out = holdout_mask(sample.labels.shape)
    entries, original_labels = [], None
    for model_id, (folder, policy) in folders.items():
        info = describe_model(folder)
        measured, labels = evaluate(folder, sample.labels, held_out, original_labels, sample.ct)
        if original_labels is None:
            original_labels = labels
        entries.append({"id": model_id, "folder": folder.name, "policy": policy, "params": info["params"],
                        "flops": info["flops"], "weights_bytes": info["weights_bytes"],
                        "file_bytes": info["file_bytes"], **measured})
        print(f"{model_id}: mean held-out Dice {measured['mean_dice']:.3f}, {measured['seconds']} s", flush=True)
    counts = {s["name"]: {"train": int(((sample.labels == s["labelValue"]) & ~held_out).sum()),
                          "held_out": int(((sample.labels == s["labelValue"]) & held_out).sum())}
              for s in sample.segments}
    catalogue = {"schema": 1, "sample": "slicerio CTChest4.nrrd + Segmentation.seg.nrrd",
                 "quality": "Dice per structure on the held-out checkerboard half (demo_data.holdout_mask), "
                            "segmenting the whole sample CT with Segmenter (tile step 0.8, no mirroring)",
                 "measured_on": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads, "
                                f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
                 "flop_convention": FLOP_CONVENTION, "voxel_counts": counts, "models": entries}
    BUNDLED_CATALOGUE.write_text(json.dumps(catalogue, indent=1) + "\n")
    write_markdown(catalogue, ROOT / "docs" / "demo_model.md")


def write_markdown(catalogue: dict, path: Path) -> None:
    models = catalogue["models"]
    names = list(models[0]["held_out_dice"])
    lines = ["# Bundled demo model: measured", "",
             f"Written by `scripts/build_demo_variants.py` ({catalogue['measured_on']}). Quality: "
             f"{catalogue['quality']}. FLOPs: {catalogue['flop_convention']}.", "",
             "| model | params | FLOPs/patch | weights | seconds (CPU) | mean held-out Dice | agreement with original |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in models:
        agreement = "—" if m["agreement_with_original"] is None else f"{m['agreement_with_original']:.3f}"
        lines.append(f"| {m['id']} | {m['params'] / 1e6:.3f} M | {m['flops'] / 1e9:.2f} G | {m['weights_bytes'] / 1e6:.2f} MB "
                     f"| {m['seconds']:.1f} | {m['mean_dice']:.3f} | {agreement} |")
    lines += ["", "Held-out Dice per structure and reference voxel counts (training half / held-out half):", "",
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
