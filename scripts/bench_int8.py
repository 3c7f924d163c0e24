#!/usr/bin/env python
"""INT8 against float on this machine's CPU: the original and TuckerSegment's default compressed variant (FLOP
budget 0.5, calibrated on the sample CT) of a network, each run by OpenVINO in f32 and in int8 (quantized by NNCF on
the sample CT's patches, first and last convolution in float, as ``segment --precision int8`` does), beside
nnU-Net's PyTorch original. Interleaved, median of ``--runs``: one patch forward, and end to end
(``Segmenter.segment``, resampling and sliding window included) on the sample CT resampled to 512 × 512 × 227
voxels; the share of voxels whose label matches the same network in OpenVINO f32 (random weights for
TotalSegmentator's architectures: a numerical check, not an accuracy). Writes ``docs/int8.md`` and ``.json``.

Usage: python scripts/bench_int8.py [--model Dataset297|demo] [--runs 3]   (Dataset297: about 15 min on 2 cores)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from bench_speed import model_folder
from TuckerSegmentLib.compress.calibration_data import calibration_patches
from TuckerSegmentLib.compress.calibration_source import int8_calibration
from TuckerSegmentLib.compress.network import compress_network
from TuckerSegmentLib.policies.budget import BudgetPolicy
from TuckerSegmentLib.runtime.execution import interleaved_seconds
from TuckerSegmentLib.runtime.hardware import cpu_capabilities
from TuckerSegmentLib.runtime.inference import OpenVINONetwork
from TuckerSegmentLib.runtime.latency import device_name
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import chest_sample, large_chest_ct

DOCS = Path(__file__).resolve().parents[1] / "docs"


def networks(folder, sample) -> dict[str, torch.nn.Module]:  # noqa: ANN001
    """The original and the default budget variant, both in their stored form (OpenVINO runs them)."""
    original = folder.load_network(folder.folds[0]).eval()
    compressed = folder.load_network(folder.folds[0]).eval()
    compress_network(compressed, BudgetPolicy(target_flops=0.5), example_input=folder.example_input(),
                     calibration=list(calibration_patches(folder, [sample.ct])))
    return {"original": original, "budget FLOPs 0.5 (default)": compressed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Dataset297", choices=["Dataset297", "demo"])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    sample = chest_sample()
    volume = large_chest_ct(sample)
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(args.model, Path(tmp))
        example = folder.example_input("cpu")
        runners = {"original · PyTorch f32 (nnU-Net)": Segmenter(folder, device="cpu", runtime="torch",
                                                                 precision="f32", execution="reference")}
        patches = {}
        for name, network in networks(folder, sample).items():
            for precision in ("f32", "int8"):
                converted = OpenVINONetwork(network, example, precision,
                                            calibration=lambda: int8_calibration(folder))
                patches[f"{name} · OpenVINO {precision}"] = converted
                runners[f"{name} · OpenVINO {precision}"] = Segmenter(folder, device="cpu", network=converted,
                                                                      execution="reference", runtime="torch")
        patch_times = interleaved_seconds(list(patches.values()), torch.randn(example.shape), torch.device("cpu"),
                                          max(5, args.runs))
        seconds = {name: [] for name in runners}
        labels = {name: runner.segment(volume).labels for name, runner in runners.items()}  # warm-up
        for _ in range(args.runs):
            for name, runner in runners.items():
                seconds[name].append(runner.segment(volume).seconds)
    rows = []
    base = statistics.median(seconds["original · PyTorch f32 (nnU-Net)"])
    for name in runners:
        f32 = name.replace("int8", "f32")
        row = {"variant": name, "volume_seconds": statistics.median(seconds[name]), "volume_runs": seconds[name],
               "volume_speedup": base / statistics.median(seconds[name]),
               "same_labels_as_f32": float((labels[name] == labels[f32]).mean()) if "int8" in name else None}
        if name in patches:
            row["patch_seconds"] = statistics.median(patch_times[list(patches).index(name)])
        rows.append(row)
        print(row, flush=True)
    write(args.model, rows, tuple(volume.array.shape), args.runs)


def write(model: str, rows: list[dict], shape: tuple[int, ...], runs: int) -> None:
    machine = device_name(torch.device("cpu"))
    features = ", ".join(cpu_capabilities())
    (DOCS / "int8.json").write_text(json.dumps({"machine": machine, "cpu_capabilities": features, "model": model,
                                                "volume_shape": list(shape), "runs": runs, "rows": rows}, indent=1))
    lines = ["# INT8 on the CPU", "",
             f"Generated by `scripts/bench_int8.py --model {model}` on **{machine}** (OpenVINO CPU capabilities: "
             f"{features}): per patch (one forward, interleaved, median) and per volume ({' × '.join(map(str, shape))} "
             f"voxels, median of {runs}, after a warm-up), speed-up against nnU-Net's PyTorch original; same labels: "
             "share of voxels labelled as the same network in OpenVINO f32.", "",
             "| variant | patch (s) | volume (s) | volume speed-up | same labels as f32 |", "|---|---|---|---|---|"]
    for row in rows:
        patch = f"{row['patch_seconds']:.3f}" if "patch_seconds" in row else "–"
        same = f"{100 * row['same_labels_as_f32']:.2f} %" if row["same_labels_as_f32"] is not None else "–"
        lines.append(f"| {row['variant']} | {patch} | {row['volume_seconds']:.1f} | {row['volume_speedup']:.2f}× | "
                     f"{same} |")
    (DOCS / "int8.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'int8.md'}")


if __name__ == "__main__":
    main()
