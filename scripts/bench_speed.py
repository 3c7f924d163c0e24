#!/usr/bin/env python
"""Speed of original and compressed networks, side by side in one run, on this machine's CPU or GPU.

For the TotalSegmentator Dataset291 (1.5 mm, 128³ patch) and Dataset297 (3 mm) architectures with
random weights (their trained weights are not available here: speed depends on shapes, not values)
and the bundled demo model (trained): the original as nnU-Net runs it, the original with the fastest
exact execution, the paper's uniform rule 0.7 / 0.5 / 0.3 (0.5 also in its stored three-convolution
form), TuckerSegment's default budget (50 % FLOPs) and a latency budget of 50 %. All compressed
variants run their fastest exact execution (``execution.optimise_execution``) unless marked
"reference". Timings are interleaved (one run of each variant per round), median of ``--runs``:
one patch forward (random input of the patch size) and end to end (``Segmenter.segment`` on a CT:
resampling, nnU-Net's sliding window and labels back on the input grid). For the demo model the
held-out Dice of each variant is reported too (budget variants calibrated on the sample's image).
Writes ``docs/speed.json`` and ``docs/speed.md``.

Usage: python scripts/bench_speed.py [--runs 5] [--models Dataset291 Dataset297 demo] [--device cpu]
(Dataset291 alone takes about 30 min on 2 CPU cores, Dataset297 longer: its 117-class end-to-end runs
dominate; the first run also times each layer's forms and the latency budget's options, cached
afterwards; results are written after each model)
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from TuckerSegmentLib.compress.calibration_data import calibration_patches
from TuckerSegmentLib.compress.network import compress_network
from TuckerSegmentLib.image.volume import Volume
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.policies.base import RankPolicy
from TuckerSegmentLib.policies.budget import BudgetPolicy
from TuckerSegmentLib.policies.methods import policy_from_dict
from TuckerSegmentLib.policies.uniform import UniformPolicy
from TuckerSegmentLib.runtime.devices import resolve_device
from TuckerSegmentLib.runtime.execution import interleaved_seconds, optimise_execution
from TuckerSegmentLib.runtime.latency import LatencyTable, device_name
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import chest_sample, held_out_dice, holdout_mask
from TuckerSegmentLib.testing.example_models import write_example_model
from TuckerSegmentLib.tucker.network_stats import FLOP_CONVENTION, network_stats
from TuckerSegmentLib.variants.choice import bundled_models

DOCS = Path(__file__).resolve().parents[1] / "docs"
LATENCY_TARGETS = {"demo": 0.7}  # the small demo network cannot reach 0.5 on a CPU (the policy says so)
END_TO_END = ("original (nnU-Net)", "original, fastest execution", "uniform 0.5", "budget FLOPs 0.5 (default)",
              "budget latency 0.5", "budget latency 0.7")


@dataclass
class Variant:
    name: str
    network: torch.nn.Module
    execution: str
    policy: str
    flops: int
    params: int
    patch_seconds: list[float] = field(default_factory=list)
    volume_seconds: list[float] = field(default_factory=list)
    segmenter: Segmenter | None = None
    labels: np.ndarray | None = None  # of the last end-to-end run
    dice: float | None = None


def cropped(volume: Volume, start: tuple[int, int, int], stop: tuple[int, int, int]) -> Volume:
    """The part ``array[k0:k1, j0:j1, i0:i1]`` of ``volume`` with its geometry."""
    (k0, j0, i0), (k1, j1, i1) = start, stop
    matrix = volume.ijk_to_ras.copy()
    matrix[:3, 3] = (volume.ijk_to_ras @ np.array([i0, j0, k0, 1.0]))[:3]
    return Volume(np.ascontiguousarray(volume.array[k0:k1, j0:j1, i0:i1]), matrix)


def model_folder(name: str, root: Path) -> ModelFolder:
    if name == "demo":
        return ModelFolder.open(next(e["path"] for e in bundled_models() if e["policy"] == "original"))
    return ModelFolder.open(write_example_model(root, name))


def policies(device: torch.device, latency: float) -> list[tuple[str, RankPolicy | None, str]]:
    return [("original (nnU-Net)", None, "reference"), ("original, fastest execution", None, "fastest"),
            ("uniform 0.7", UniformPolicy(0.7), "fastest"),
            ("uniform 0.5, reference execution", UniformPolicy(0.5), "reference"),
            ("uniform 0.5", UniformPolicy(0.5), "fastest"), ("uniform 0.3", UniformPolicy(0.3), "fastest"),
            ("budget FLOPs 0.5 (default)", BudgetPolicy(target_flops=0.5), "fastest"),
            (f"budget latency {latency}", BudgetPolicy(target_latency=latency, device=str(device)), "fastest")]


def build_variants(folder: ModelFolder, device: torch.device, calibration: list[torch.Tensor] | None,
                   latency: float) -> list[Variant]:
    example = folder.example_input()
    table = LatencyTable.for_device(device)
    compressed: dict[str, tuple[torch.nn.Module, str]] = {}
    variants = []
    for name, policy, execution in policies(device, latency):
        key = repr(policy)
        if key not in compressed:
            network = folder.load_network(0)
            label = "original"
            if policy is not None:
                start = time.perf_counter()
                report = compress_network(network, policy, example,
                                          calibration=calibration if isinstance(policy, BudgetPolicy) else None)
                label = repr(policy_from_dict(report.policy))
                print(f"  compressed {name}: {label} in {time.perf_counter() - start:.0f} s", flush=True)
            compressed[key] = (network.eval(), label)
        network, label = compressed[key]
        stats = network_stats(network, example)
        network = copy.deepcopy(network)
        if execution == "fastest":
            start = time.perf_counter()
            report = optimise_execution(network, example, table)
            print(f"  {name}: fastest execution chosen in {time.perf_counter() - start:.0f} s "
                  f"({report.measured} operations timed)", flush=True)
        variants.append(Variant(name, network.to(device).eval(), execution, label, stats.flops, stats.params))
    return variants


def time_patches(variants: list[Variant], shape: tuple[int, ...], device: torch.device, runs: int) -> None:
    times = interleaved_seconds([v.network for v in variants], torch.randn(shape, device=device), device, runs)
    for variant, seconds in zip(variants, times, strict=True):
        variant.patch_seconds = seconds


def time_volumes(variants: list[Variant], folder: ModelFolder, volume: Volume, device: torch.device,
                 runs: int) -> None:
    chosen = [v for v in variants if v.name in END_TO_END]
    for variant in chosen:
        # the network already runs its chosen execution; "reference" keeps it as stored
        variant.segmenter = Segmenter(folder, device=str(device), network=variant.network, policy=variant.policy,
                                      execution="reference")
        variant.segmenter.segment(volume)  # warm-up
    for _ in range(runs):
        for variant in chosen:
            result = variant.segmenter.segment(volume)
            variant.volume_seconds.append(result.seconds)
            variant.labels = result.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["Dataset291", "Dataset297", "demo"])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)
    machine = device_name(device)
    sample = chest_sample()
    held = holdout_mask(sample.ct.array.shape)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            print(f"{model}:", flush=True)
            folder = model_folder(model, Path(tmp))
            calibration = list(calibration_patches(folder, [sample.ct])) if model == "demo" else None
            # 1.5 mm networks: a 180 × 180 × 200 mm crop of the sample (2 tiles); coarser ones: the whole CT
            volume = cropped(sample.ct, (7, 35, 35), (27, 94, 94)) if model == "Dataset291" else sample.ct
            variants = build_variants(folder, device, calibration, LATENCY_TARGETS.get(model, 0.5))
            time_patches(variants, tuple(folder.example_input().shape), device, args.runs)
            time_volumes(variants, folder, volume, device, args.runs)
            base = variants[0]
            for variant in variants:
                if model == "demo" and variant.volume_seconds:
                    variant.dice = held_out_dice(variant.labels, sample, held)
                patch = statistics.median(variant.patch_seconds)
                row = {"model": model, "variant": variant.name, "policy": variant.policy,
                       "execution": variant.execution, "flops_fraction": variant.flops / base.flops,
                       "params_fraction": variant.params / base.params, "patch_seconds": patch,
                       "patch_ratio": patch / statistics.median(base.patch_seconds),
                       "patch_runs": variant.patch_seconds, "volume_runs": variant.volume_seconds,
                       "volume_shape": list(volume.array.shape), "dice": variant.dice}
                if variant.volume_seconds:
                    row["volume_seconds"] = statistics.median(variant.volume_seconds)
                    row["volume_ratio"] = row["volume_seconds"] / statistics.median(base.volume_seconds)
                results.append(row)
                print(f"  {variant.name}: FLOPs {row['flops_fraction']:.3f}, patch {patch:.3f} s ({row['patch_ratio']:.2f}×)"
                      + (f", volume {row['volume_seconds']:.2f} s ({row['volume_ratio']:.2f}×)"
                         if variant.volume_seconds else "") + (f", Dice {variant.dice:.3f}" if variant.dice else ""),
                      flush=True)
            write_results(results, machine, args.runs)  # after each model: a long run leaves what it measured
    print(f"wrote {DOCS / 'speed.md'}")


def write_results(results: list[dict[str, Any]], machine: str, runs: int) -> None:
    DOCS.mkdir(exist_ok=True)
    (DOCS / "speed.json").write_text(json.dumps({"machine": machine, "runs": runs,
                                                 "flop_convention": FLOP_CONVENTION, "rows": results}, indent=1) + "\n")
    write_markdown(results, machine, runs)


def write_markdown(rows: list[dict[str, Any]], machine: str, runs: int) -> None:
    lines = ["# Speed: compressed vs original, side by side", "",
             f"Generated by `scripts/bench_speed.py` on **{machine}**. Interleaved runs, median of {runs}. "
             "Ratio = time / time of the original as nnU-Net runs it (< 1: faster). Patch: one forward pass on "
             "a random input of the patch size. Volume: `Segmenter.segment` end to end (Dataset291: a 180×180×200 mm "
             "crop of the sample CT; others: the whole sample CT, 128×128×34 voxels at 3.05×3.05×10 mm). "
             "Dataset291/297: TotalSegmentator architectures with random weights; demo: the bundled trained model "
             "(held-out Dice; budget variants calibrated on the sample's image). Compressed variants run their "
             "fastest exact execution unless marked reference.", "",
             "| model | variant | FLOPs kept | params kept | patch s | patch ratio | volume s | volume ratio | Dice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        volume = (f"{row['volume_seconds']:.2f} | {row['volume_ratio']:.2f}" if "volume_seconds" in row else "– | –")
        dice = f"{row['dice']:.3f}" if row["dice"] is not None else "–"
        lines.append(f"| {row['model']} | {row['variant']} | {row['flops_fraction']:.3f} | {row['params_fraction']:.3f} | "
                     f"{row['patch_seconds']:.3f} | {row['patch_ratio']:.2f} | {volume} | {dice} |")
    (DOCS / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
