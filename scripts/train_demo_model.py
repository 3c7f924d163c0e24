#!/usr/bin/env python
"""Train the bundled demo model: a small nnU-Net v2 PlainConvUNet on slicerio's real chest CT.

One case only, so half of it is held out: a checkerboard of blocks (``demo_data.holdout_mask``)
in which every structure appears. The loss ignores held-out voxels; the network still sees their
intensities as context, never their labels. Geometry and normalisation are nnU-Net's: the image is
reoriented to canonical RAS (as TotalSegmentator trains), kept at its own spacing (10 × 3.05 × 3.05
mm, z y x) and normalised with nnU-Net's CTNormalization using foreground statistics of the
training half. Patches span whole slices; augmentation: rotation about S, in-plane scaling,
intensity jitter. No mirroring (left and right lung are different classes).

Writes an nnU-Net results folder with nnU-Net's checkpoint entries (interoperable with nnU-Net's
predictor; no optimizer state, to stay small):
``OUT/Dataset901_ChestDemo/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/`` with plans.json,
dataset.json, terminology.csv (SNOMED CT codes and colours from the sample segmentation) and
fold_0/checkpoint_final.pth. ``scripts/build_demo_variants.py`` then compresses and evaluates it.

Usage: python scripts/train_demo_model.py OUT [--minutes 25] [--seed 0]
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from nnunetv2.preprocessing.normalization.default_normalization_schemes import CTNormalization
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch.nn import functional
from TuckerSegmentLib.image.geometry import to_canonical
from TuckerSegmentLib.nnunet.layout import CHECKPOINT_NAME
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.nnunet.layout import TERMINOLOGY_CSV
from TuckerSegmentLib.segment.labels import TERMINOLOGY_COLUMNS, terminology_row
from TuckerSegmentLib.testing.demo_data import chest_sample, holdout_mask
from TuckerSegmentLib.testing.example_models import CONFIGURATION, NNUNET_RESAMPLING, PLANS_NAME, TRAINER

DATASET = "Dataset901_ChestDemo"
FEATURES = (16, 32, 64, 96)
KERNELS = ([1, 3, 3], [1, 3, 3], [3, 3, 3], [3, 3, 3])
STRIDES = ([1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2])
PATCH = (16, 128, 128)  # whole slices: left and right lung are told apart by their place in the body
BATCH = 2


def intensity_properties(image: np.ndarray, foreground: np.ndarray) -> dict[str, float]:
    """nnU-Net's foreground intensity statistics (what its fingerprint extractor records)."""
    values = image[foreground].astype(np.float64)
    return {"max": float(values.max()), "mean": float(values.mean()), "median": float(np.median(values)),
            "min": float(values.min()), "percentile_00_5": float(np.percentile(values, 0.5)),
            "percentile_99_5": float(np.percentile(values, 99.5)), "std": float(values.std())}


def plans(spacing: list[float], properties: dict[str, float], shape: list[int]) -> dict:
    n = len(FEATURES)
    arch = {"n_stages": n, "features_per_stage": list(FEATURES), "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [list(k) for k in KERNELS], "strides": [list(s) for s in STRIDES],
            "n_conv_per_stage": [2] * n, "n_conv_per_stage_decoder": [2] * (n - 1), "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    configuration = {"data_identifier": f"{PLANS_NAME}_{CONFIGURATION}", "preprocessor_name": "DefaultPreprocessor",
                     "batch_size": BATCH, "patch_size": list(PATCH), "median_image_size_in_voxels": shape,
                     "spacing": spacing, "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                     **NNUNET_RESAMPLING, "batch_dice": True,
                     "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                      "arch_kwargs": arch,
                                      "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}
    return {"dataset_name": DATASET, "plans_name": PLANS_NAME, "original_median_spacing_after_transp": spacing,
            "original_median_shape_after_transp": shape, "image_reader_writer": "SimpleITKIO",
            "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "configurations": {CONFIGURATION: configuration}, "experiment_planner_used": "train_demo_model.py",
            "label_manager": "LabelManager", "foreground_intensity_properties_per_channel": {"0": properties}}


def random_patch(image: torch.Tensor, target: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random patch, rotated about S (±12°) and scaled in-plane (0.85-1.15), with intensity jitter."""
    angle, scale = np.radians(rng.uniform(-12, 12)), rng.uniform(0.85, 1.15)
    c, s = np.cos(angle) / scale, np.sin(angle) / scale
    theta = torch.tensor([[[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]]], dtype=torch.float32)  # x y z
    grid = functional.affine_grid(theta, [1, 1, *image.shape], align_corners=False)
    image = functional.grid_sample(image[None, None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    target = functional.grid_sample(target[None, None].float(), grid, mode="nearest", padding_mode="border",
                                    align_corners=False)[0, 0].long()
    starts = [int(rng.integers(0, max(0, n - p) + 1)) for n, p in zip(image.shape, PATCH, strict=True)]
    index = tuple(slice(s, s + p) for s, p in zip(starts, PATCH, strict=True))
    patch = image[index] * float(rng.uniform(0.9, 1.1)) + float(rng.normal(0, 0.1))
    patch = patch + torch.randn_like(patch) * float(rng.uniform(0, 0.1))
    return patch, target[index]


def train(out: Path, minutes: float, seed: int) -> Path:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sample = chest_sample()
    ct, _ = to_canonical(sample.ct)
    labels = np.ascontiguousarray(np.asarray(to_canonical(sample.ct.with_array(sample.labels))[0].array))
    held_out = holdout_mask(sample.labels.shape)
    held_out = to_canonical(sample.ct.with_array(held_out))[0].array
    spacing = [float(s) for s in ct.spacing[::-1]]  # z y x
    properties = intensity_properties(ct.array, (labels > 0) & ~held_out)
    plan = plans(spacing, properties, list(ct.array.shape))
    names = {segment["labelValue"]: segment["name"] for segment in sample.segments}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0} | {names[v]: v for v in sorted(names)},
                    "numTraining": 1, "file_ending": ".nii.gz",
                    "source": "slicerio CTChest4.nrrd + Segmentation.seg.nrrd (one case, checkerboard hold-out)"}
    folder = out / DATASET / f"{TRAINER}__{PLANS_NAME}__{CONFIGURATION}"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plan, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    with open(folder / TERMINOLOGY_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(TERMINOLOGY_COLUMNS)
        writer.writerows(terminology_row(segment) for segment in sample.segments)

    model = ModelFolder(path=folder, plans=plan, dataset_json=dataset_json, configuration=CONFIGURATION)
    image = CTNormalization(use_mask_for_norm=False, intensityproperties=properties).run(
        ct.array[None].astype(np.float32))[0]
    ignore = len(names) + 1
    target = np.where(held_out, ignore, labels).astype(np.int64)
    image_t, target_t = torch.from_numpy(image.astype(np.float32)), torch.from_numpy(target)

    network = model.build_network()
    network.apply(network.initialize)
    print(f"{sum(p.numel() for p in network.parameters()) / 1e6:.3f} M parameters; training for {minutes} min")
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                             weight_ce=1, weight_dice=1, ignore_label=ignore, dice_class=MemoryEfficientSoftDiceLoss)
    optimizer = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=3e-5)
    start, step, losses = time.time(), 0, []
    budget = minutes * 60
    network.train()
    while (elapsed := time.time() - start) < budget:
        for group in optimizer.param_groups:
            group["lr"] = 3e-3 * (1 - elapsed / budget) ** 0.9
        batch = [random_patch(image_t, target_t, rng) for _ in range(BATCH)]
        x = torch.stack([b[0] for b in batch])[:, None]
        y = torch.stack([b[1] for b in batch])[:, None]
        loss = loss_fn(network(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
        optimizer.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 50 == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {np.mean(losses[-50:]):.4f}", flush=True)
    checkpoint = {"network_weights": network.state_dict(), "optimizer_state": None, "grad_scaler_state": None,
                  "logging": {"train_losses": losses}, "_best_ema": None, "current_epoch": step,
                  "init_args": {"plans": plan, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset_json,
                                "device": torch.device("cpu")},
                  "trainer_name": TRAINER, "inference_allowed_mirroring_axes": None}
    torch.save(checkpoint, folder / "fold_0" / CHECKPOINT_NAME)
    print(f"wrote {folder} after {step} steps ({(time.time() - start) / 60:.1f} min)")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--minutes", type=float, default=25.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train(args.out, args.minutes, args.seed)


if __name__ == "__main__":
    main()
