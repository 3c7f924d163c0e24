#!/usr/bin/env python
"""Speed of original and compressed networks, side by side in one run, on this machine's CPU or GPU.

For the TotalSegmentator Dataset291 (1.5 mm, 128³ patch) and Dataset297 (3 mm) architectures with
random weights (their trained weights are not available here: speed depends on shapes, not values)
and the bundled demo model (trained): the original as nnU-Net runs it, the original with the fastest
exact execution, the paper's uniform rule 0.7 / 0.5 / 0.3 (0.5 also in its stored three-convolution
form), TuckerSegment's default budget (50 % FLOPs) and a latency budget of 50 %. All compressed
variants run their fastest exact execution (``execution.optimise_execution``) unless marked
"reference". On a CPU each variant's stored network also runs in OpenVINO (f32 and bf16; ``--runtimes``),
under the same nnU-Net predictor. Timings are interleaved (one run of each variant per round), median
of ``--runs``: one patch forward (random input of the patch size) and end to end (``Segmenter.segment``
on a CT: resampling, nnU-Net's sliding window and labels back on the input grid; ``--volume large`` is
the sample resampled to 512 × 512 × 227 voxels, a clinical chest CT's size), with a breakdown of one
more run by stage (cProfile) and its peak memory (resident memory above the level before the call,
sampled every 5 ms; Linux). The latency budget is timed in the runtime inference uses by default (OpenVINO
f32 on a CPU when installed). For the demo model the held-out Dice of each variant on the sample is
reported too (budget variants calibrated on the sample's image). Writes ``docs/speed.json`` and
``docs/speed.md``.

Usage: python scripts/bench_speed.py [--runs 5] [--models Dataset291 Dataset297 demo] [--device cpu]
       [--variants NAME...] [--runtimes torch openvino-f32 openvino-bf16] [--volume sample|large]
       [--patch-only MODEL...]
(Dataset291 alone takes about 30 min on 2 CPU cores, Dataset297 longer: its 117-class end-to-end runs
dominate; the first run also times each layer's forms and the latency budget's options, cached
afterwards; results are written after each model)
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import json
import pstats
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
from TuckerSegmentLib.runtime.inference import OpenVINONetwork, openvino_missing
from TuckerSegmentLib.runtime.latency import LatencyTable, device_name
from TuckerSegmentLib.runtime.memory import PeakMemory
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import chest_sample, held_out_dice, holdout_mask, large_chest_ct
from TuckerSegmentLib.testing.example_models import write_example_model
from TuckerSegmentLib.tucker.network_stats import FLOP_CONVENTION, network_stats
from TuckerSegmentLib.variants.choice import bundled_models

DOCS = Path(__file__).resolve().parents[1] / "docs"
LATENCY_TARGETS = {"demo": 0.7}  # the small demo network cannot reach 0.5 on a CPU (the policy says so)
END_TO_END = ("original (nnU-Net)", "budget FLOPs 0.5 (default)", "budget latency 0.5", "budget latency 0.7")
# pieces of Segmenter.segment, by the function whose cumulative time they are (cProfile)
STAGES = {"resample in": "resample_image", "preprocess": "run_case_npy",
          "network": "_internal_maybe_mirror_and_predict",
          "sliding-window aggregation": "_internal_predict_sliding_window_return_logits",
          "argmax and export": "convert_predicted_logits_to_segmentation_with_correct_shape",
          "labels back": "resample_labels_nearest", "total": "predict"}


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
    runtime: str = "torch"
    stages: dict[str, float] = field(default_factory=dict)
    peak_bytes: int | None = None  # resident memory above the level before one end-to-end run


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
                   latency: float, wanted: list[str] | None, runtimes: list[str]) -> list[Variant]:
    example = folder.example_input()
    table = LatencyTable.for_device(device)
    compressed: dict[str, tuple[torch.nn.Module, str]] = {}
    variants = []
    for name, policy, execution in policies(device, latency):
        if wanted and name not in wanted and name != "original (nnU-Net)":
            continue
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
            if device.type == "cpu":  # the stored form, in OpenVINO too
                variants += openvino_variants(name, network, folder, label, runtimes)
        network, label = compressed[key]
        stats = network_stats(network, example)
        if "torch" not in runtimes and name != "original (nnU-Net)":
            continue
        network = copy.deepcopy(network)
        if execution == "fastest":
            start = time.perf_counter()
            report = optimise_execution(network, example, table)
            print(f"  {name}: fastest execution chosen in {time.perf_counter() - start:.0f} s "
                  f"({report.measured} operations timed)", flush=True)
        variants.append(Variant(name, network.to(device).eval(), execution, label, stats.flops, stats.params))
    return sorted(variants, key=lambda v: v.runtime != "torch")  # the baseline (PyTorch, stored original) first


def openvino_variants(name: str, network: torch.nn.Module, folder: ModelFolder, policy: str,
                      runtimes: list[str]) -> list[Variant]:
    """``network`` (stored form) compiled by OpenVINO at each precision of ``runtimes``."""
    stats, found = network_stats(network, folder.example_input()), []
    base = name.replace(" (nnU-Net)", "").replace(", fastest execution", "").replace(", reference execution", "")
    for runtime in (r for r in runtimes if r.startswith("openvino-")):
        precision = runtime.split("-")[1]
        start = time.perf_counter()
        converted = OpenVINONetwork(network, folder.example_input("cpu"), precision)
        print(f"  {base}: OpenVINO {precision} compiled in {time.perf_counter() - start:.0f} s", flush=True)
        found.append(Variant(f"{base} · OpenVINO {precision}", converted, "openvino", policy, stats.flops,
                             stats.params, runtime=f"OpenVINO {precision}"))
    return found


def time_patches(variants: list[Variant], shape: tuple[int, ...], device: torch.device, runs: int) -> None:
    times = interleaved_seconds([v.network for v in variants], torch.randn(shape, device=device), device, runs)
    for variant, seconds in zip(variants, times, strict=True):
        variant.patch_seconds = seconds


def time_volumes(variants: list[Variant], folder: ModelFolder, volume: Volume, device: torch.device,
                 runs: int) -> None:
    chosen = [v for v in variants if v.name in END_TO_END or v.runtime != "torch"]
    for variant in chosen:
        # the network already runs its chosen execution (or is OpenVINO's); "reference" keeps it as it is
        variant.segmenter = Segmenter(folder, device=str(device), network=variant.network, policy=variant.policy,
                                      execution="reference", runtime="torch", precision="f32")
        profile = cProfile.Profile()  # the warm-up run, profiled, its peak memory sampled
        with PeakMemory() as memory:
            profile.runcall(variant.segmenter.segment, volume)
        variant.peak_bytes = memory.peak
        cumulative = {key[2]: value[3] for key, value in pstats.Stats(profile).stats.items()}
        stages = {stage: cumulative.get(function, 0.0) for stage, function in STAGES.items()}
        stages["sliding-window aggregation"] -= stages["network"]  # the window's own work, around the network
        stages["other"] = stages["total"] - sum(v for k, v in stages.items() if k != "total")
        variant.stages = stages
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
    parser.add_argument("--variants", nargs="+", help="variant names to run (default: all; the original always)")
    parser.add_argument("--runtimes", nargs="+", default=["torch", "openvino-f32", "openvino-bf16"],
                        choices=["torch", "openvino-f32", "openvino-bf16"])
    parser.add_argument("--patch-only", nargs="*", default=[], metavar="MODEL",
                        help="models timed per patch only (the 1.5 mm network's volume takes minutes per run)")
    parser.add_argument("--volume", choices=("sample", "large"), default="sample",
                        help="end-to-end CT for the 3 mm networks: the sample (128×128×34) or it resampled to "
                             "512×512×227 voxels")
    args = parser.parse_args()
    if openvino_missing() and any(r.startswith("openvino") for r in args.runtimes):
        parser.error(openvino_missing())
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
            volume = (cropped(sample.ct, (7, 35, 35), (27, 94, 94)) if model == "Dataset291"
                      else large_chest_ct(sample) if args.volume == "large" else sample.ct)
            variants = build_variants(folder, device, calibration, LATENCY_TARGETS.get(model, 0.5), args.variants,
                                      args.runtimes)
            time_patches(variants, tuple(folder.example_input().shape), device, args.runs)
            if model not in args.patch_only:
                time_volumes(variants, folder, volume, device, args.runs)
            base = variants[0]
            for variant in variants:
                if model == "demo" and variant.segmenter is not None:  # on the sample, whichever CT was timed
                    variant.dice = held_out_dice(variant.segmenter.segment(sample.ct).labels, sample, held)
                patch = statistics.median(variant.patch_seconds)
                row = {"model": model, "variant": variant.name, "runtime": variant.runtime, "policy": variant.policy,
                       "execution": variant.execution, "flops_fraction": variant.flops / base.flops,
                       "params_fraction": variant.params / base.params, "patch_seconds": patch,
                       "patch_ratio": patch / statistics.median(base.patch_seconds),
                       "patch_runs": variant.patch_seconds, "volume_runs": variant.volume_seconds,
                       "volume_shape": list(volume.array.shape), "dice": variant.dice, "stages": variant.stages,
                       "peak_memory_bytes": variant.peak_bytes}
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
    """``docs/speed.json`` and ``.md``: this run's rows, and the rows of models it did not run kept."""
    DOCS.mkdir(exist_ok=True)
    path = DOCS / "speed.json"
    models = {row["model"] for row in results}
    kept = [row for row in json.loads(path.read_text())["rows"] if row["model"] not in models] if path.is_file() else []
    for row in results:
        row.setdefault("machine", machine)
        row.setdefault("runs", runs)
    rows = kept + results
    path.write_text(json.dumps({"flop_convention": FLOP_CONVENTION, "rows": rows}, indent=1) + "\n")
    write_markdown(rows)


def write_markdown(rows: list[dict[str, Any]]) -> None:
    machines = sorted({f"{row.get('machine', '?')} (median of {row.get('runs', '?')})" for row in rows})
    lines = ["# Speed: compressed vs original, PyTorch vs OpenVINO, side by side", "",
             f"Generated by `scripts/bench_speed.py` on **{'; '.join(machines)}**. Interleaved runs. Ratio = the "
             "original's time as nnU-Net runs it (PyTorch, stored form) / this time (> 1: faster). Patch: one forward "
             "pass on a random input of the patch size. Volume: `Segmenter.segment` end to end (Dataset291: a "
             "180×180×200 mm crop of the sample CT; others: the CT named in the volume column: the sample, 128×128×34 "
             "voxels at 3.05×3.05×10 mm, or it resampled to 512×512×227 voxels at 0.76×0.76×1.5 mm). Dataset291/297: "
             "TotalSegmentator architectures with random weights; demo: the bundled trained model (held-out Dice on "
             "the sample; budget variants calibrated on the sample's image). PyTorch variants run their fastest "
             "exact execution unless marked reference; OpenVINO runs the stored network under the same nnU-Net "
             "predictor.", "",
             "| model | variant | runtime | FLOPs kept | patch s | patch speed-up | volume | volume s | volume speed-up "
             "| Dice |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        volume = "×".join(str(n) for n in row["volume_shape"][::-1])
        timed = (f"{row['volume_seconds']:.2f} | {1 / row['volume_ratio']:.2f}×" if "volume_seconds" in row
                 else "– | –")
        dice = f"{row['dice']:.4f}" if row.get("dice") is not None else "–"
        lines.append(f"| {row['model']} | {row['variant']} | {row.get('runtime', 'torch')} | {row['flops_fraction']:.3f} "
                     f"| {row['patch_seconds']:.3f} | {1 / row['patch_ratio']:.2f}× | {volume} | {timed} | {dice} |")
    staged = [row for row in rows if row.get("stages")]
    if staged:
        names = [*STAGES, "other"]
        lines += ["", "Where a volume's time goes (one more run, profiled with cProfile, seconds; \"other\": "
                  "reading, reorientation, nnU-Net's bookkeeping) and its peak memory (resident memory above the "
                  "level before the run, sampled every 5 ms):", "",
                  "| model | variant | " + " | ".join(names) + " | peak memory GiB |",
                  "|---|---|" + "---|" * (len(names) + 1)]
        for row in staged:
            peak = row.get("peak_memory_bytes")
            lines.append(f"| {row['model']} | {row['variant']} | "
                         + " | ".join(f"{row['stages'].get(n, 0.0):.2f}" for n in names)
                         + (f" | {peak / 2**30:.2f} |" if peak is not None else " | – |"))
    (DOCS / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
