#!/usr/bin/env python
"""Write ``TuckerSegment/Resources/variants.json``: every task's original, its default-policy variants and the
paper's uniform-rule variants; the bundled demo's models as ``build_demo_variants.py`` measured them.

Per entry: parameters, FLOPs per patch and weight bytes (from the network structure built from the
plans, counted on the meta device); peak CPU memory of a fresh subprocess segmenting a volume of
exactly one patch at the model spacing (its VmHWM); relative CPU time of one patch forward pass
in the runtime segmentation uses on the CPU (OpenVINO f32 when installed, each network as stored;
variants and original interleaved in one run, median of ``--repeats``), recorded with that runtime
and the CPU. TotalSegmentator weights
are not available to this project, so its networks carry random weights: structure, memory and
speed do not depend on the values. Quality figures are the paper's (TotalSegmentator, no fine-
tuning) or this project's own measurement (the bundled demo model, from ``models.json``).
TotalSegmentator's default-policy variants ("balanced": 70 % of the original's time per patch, "fast":
50 %, latency budgets timed in the runtime that will run them, calibrated on the user's CTs) are only
described: their size and quality depend on the machine and CTs they are built with, so they stay
unmeasured until ``tuckersegment build-variants`` measures them there.

Usage: python scripts/build_catalogue.py [--repeats 3] [--skip-measure | --speed-only | --entries-only]
(about 15 min on 2 cores; --speed-only re-measures the CPU times alone and keeps the rest; --entries-only
rewrites the demo entries from models.json and the default-policy entries, keeping the other figures)
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from TuckerSegmentLib.compress.network import plan_layers
from TuckerSegmentLib.tucker.layers import apply_plans
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.paths import BUNDLED_MODELS, CATALOGUE_JSON
from TuckerSegmentLib.policies.budget import BudgetPolicy
from TuckerSegmentLib.policies.uniform import UniformPolicy
from TuckerSegmentLib.runtime.execution import interleaved_seconds, openvino_interleaved_seconds
from TuckerSegmentLib.runtime.inference import choose_runtime
from TuckerSegmentLib.runtime.latency import device_name
from TuckerSegmentLib.testing.example_models import EXAMPLE_SPECS, example_model
from TuckerSegmentLib.tucker.network_stats import FLOP_CONVENTION, network_stats
from TuckerSegmentLib.variants.catalogue import SCHEMA, STANDARD_VOLUME_MM, standard_voxels
from TuckerSegmentLib.variants.totalsegmentator import tasks

FACTORS = (0.7, 0.5, 0.3)
PAPER = "Weber et al. 2024 (arXiv 2404.09683), mean Dice without fine-tuning, read from the paper's plots (approximate)"
# Published mean Dice without fine-tuning (../shared/reference/README.md): factor -> Dice, "original" included.
PUBLISHED_DICE = {"total": {"original": 0.93, 0.7: 0.93, 0.5: 0.88, 0.3: 0.31},
                  "fast": {"original": 0.80, 0.7: 0.18}}
# Published GPU time per 128^3 forward pass of the 1.5 mm model (ms, fp32): class -> {factor: ms}.
PAPER_GPU_MS = {"GTX 1080": {"original": 237.7, 0.7: 230.9, 0.5: 179.0},
                "RTX 2080 Ti": {"original": 127.8, 0.7: 121.2, 0.5: 84.6},
                "RTX 3090": {"original": 60.1, 0.7: 96.8, 0.5: 63.2},
                "A100": {"original": 32.1, 0.7: 41.6, 0.5: 28.0}}
# The part with the largest output head stands for the five 1.5 mm parts (same plans otherwise).
MEASURED_SPEC = {"total": "Dataset292", "fast": "Dataset297", "fastest": "Dataset298"}
DEMO_ID = "chest-demo"
DEFAULT_TARGETS = {"balanced": 0.7, "fast": 0.5}  # latency targets: fraction of the original's time per patch
DOCS = Path(__file__).resolve().parents[1] / "docs" / "variants.md"
CPU_RUNTIME = choose_runtime("auto", "auto", torch.device("cpu"))  # what segmentation runs on a CPU here


def bytes_per_voxel(outputs: int) -> int:
    """Per-voxel buffers at the model spacing: the float32 sum of logits (float16 on a GPU) with room for
    argmax temporaries per output, the weights, the image and the labels (an estimate; the tile term is
    measured)."""
    return 6 * outputs + 16


def network_for(folder: ModelFolder, policy: UniformPolicy | None, device: str = "meta") -> torch.nn.Module:
    with torch.device(device):
        network = folder.build_network()
    if policy is not None:
        apply_plans(network, plan_layers(network, policy, folder.example_input()))
    return network.eval()


def policy_dict(factor: float | None) -> Any:
    return "original" if factor is None else UniformPolicy(factor).to_dict()


def child_peak_memory(spec: str, factor: float | None, device: str) -> None:
    """(Child process) segment one patch-sized volume on ``device``; print the peak in bytes: resident
    memory on the CPU, ``torch.cuda.max_memory_allocated`` on CUDA."""
    from TuckerSegmentLib.image.volume import Volume
    from TuckerSegmentLib.segment.predictor import Segmenter
    torch.set_num_threads(2)
    folder = ModelFolder.open(BUNDLED_MODELS / DEMO_ID) if spec == DEMO_ID else example_model(spec)
    policy = UniformPolicy(factor) if factor is not None else None
    if spec == DEMO_ID:
        network = folder.load_network(folder.folds[0])
        if policy is not None:
            from TuckerSegmentLib.compress.network import compress_network
            compress_network(network, policy, folder.example_input())
    else:
        network = network_for(folder, policy, "cpu")
    segmenter = Segmenter(folder, device=device, network=network, policy=repr(policy))
    spacing = np.asarray(folder.configuration_manager.spacing, dtype=float)
    shape = tuple(folder.patch_size)
    affine = np.diag([*spacing[::-1], 1.0])
    image = np.random.default_rng(0).normal(0, 300, shape).astype(np.float32)
    segmenter.segment(Volume(image, affine))
    print(torch.cuda.max_memory_allocated() if device == "cuda" else peak_rss())


def peak_rss() -> int:
    """This process's peak resident memory in bytes. Linux: VmHWM (``ru_maxrss`` would carry over the
    parent's peak through fork and exec); elsewhere ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.is_file():
        line = next(line for line in status.read_text().splitlines() if line.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory(spec: str, factor: float | None, device: str = "cpu") -> int:
    command = [sys.executable, __file__, "--child", spec, "original" if factor is None else str(factor), device]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def relative_times(spec: str, repeats: int) -> dict[Any, float]:
    """Median time of one patch forward per policy, relative to the original, interleaved, in the runtime
    segmentation uses on this CPU (``CPU_RUNTIME``)."""
    folder = ModelFolder.open(BUNDLED_MODELS / DEMO_ID) if spec == DEMO_ID else example_model(spec)
    networks = {f: network_for(folder, UniformPolicy(f) if f else None, "cpu") for f in (None, *FACTORS)}
    example = folder.example_input("cpu")
    if CPU_RUNTIME.runtime == "openvino":
        timed = openvino_interleaved_seconds(list(networks.values()), example, CPU_RUNTIME.precision, repeats)
    else:
        timed = interleaved_seconds(list(networks.values()), torch.randn(example.shape), torch.device("cpu"), repeats)
    times = dict(zip(networks, timed, strict=True))
    base = statistics.median(times[None])
    return {f: statistics.median(t) / base for f, t in times.items()}


def structure_stats(spec: str, factor: float | None) -> dict[str, int]:
    folder = ModelFolder.open(BUNDLED_MODELS / DEMO_ID) if spec == DEMO_ID else example_model(spec)
    stats = network_stats(network_for(folder, UniformPolicy(factor) if factor else None), folder.example_input())
    return {"params": stats.params, "flops": stats.flops, "weights_bytes": stats.weight_bytes}


def quality(task: str, factor: float | None) -> dict[str, Any]:
    published = PUBLISHED_DICE.get(task, {})
    key = factor if factor is not None else "original"
    if key in published:
        return {"kind": "published", "mean_dice": published[key], "original_dice": published["original"],
                "how": PAPER}
    return {"kind": "unmeasured", "mean_dice": None, "original_dice": published.get("original"),
            "how": "no published or local measurement without fine-tuning"}


def speed(task: str, factor: float | None, cpu: dict[Any, float]) -> dict[str, Any]:
    if factor is None:
        return {}
    entries = {"cpu": {"relative_time": round(cpu[factor], 3), "runtime": CPU_RUNTIME.describe(),
                       "device": device_name(torch.device("cpu"), CPU_RUNTIME),
                       "source": f"measured here: one patch forward in {CPU_RUNTIME.describe()}, {platform.machine()} "
                                 "CPU, 2 threads"}}
    if task == "total":
        for cls, ms in PAPER_GPU_MS.items():
            if factor in ms:
                entries[cls] = {"relative_time": round(ms[factor] / ms["original"], 3),
                                "source": "Weber et al. 2024, 128^3 forward pass, fp32"}
    return entries


def default_entries(original: dict[str, Any]) -> list[dict[str, Any]]:
    """The task's default-policy variants: latency budgets, activation-aware, sized where they are built."""
    return [{**original, "id": f"{original['task']}-tucker-{name}",
             "policy": BudgetPolicy(target_latency=target).to_dict(), "params": None, "flops": None,
             "weights_bytes": None,
             "quality": {"kind": "unmeasured", "mean_dice": None, "original_dice": original["quality"]["original_dice"],
                         "how": "measured by tuckersegment build-variants on the machine and CTs it is built with"},
             "speed": {}, "notes": f"default policy: {100 * target:.0f} % of the original's time per patch in the "
                                   "runtime that runs it, calibrated on your CTs (--calibration) or the sample CT"}
            for name, target in DEFAULT_TARGETS.items()]


def demo_entries(original_peak: dict[str, Any]) -> list[dict[str, Any]]:
    """The bundled demo models as ``build_demo_variants.py`` measured them (``models.json``)."""
    record = json.loads((BUNDLED_MODELS / "models.json").read_text())
    original = record["models"][0]
    result = []
    for m in record["models"]:
        measured = m.get("measurement")
        speed = {} if measured is None else {"cpu": {
            "relative_time": round(1 / measured["speedup"], 3), "runtime": measured["context"]["runtime"],
            "device": measured["context"]["device"],
            "source": f"measured here: whole sample CT per volume, {measured['context']['runtime']}"}}
        result.append({
            "id": m["id"], "task": "demo", "policy": m["policy"], "source": {"bundled": m["folder"]},
            "spacing_mm": 3.0, "outputs": len(record["voxel_counts"]) + 1,
            **{k: m[k] for k in ("params", "flops", "weights_bytes")}, "peak_memory": original_peak,
            "quality": {"kind": "measured", "mean_dice": round(m["mean_dice"], 4),
                        "original_dice": round(original["mean_dice"], 4),
                        "structures": {name: {"dice": m["held_out_dice"][name],
                                              "original_dice": original["held_out_dice"][name],
                                              "voxels": record["voxel_counts"][name]["held_out"]}
                                       for name in original["held_out_dice"]},
                        "how": "held-out half of the bundled sample CT (7 structures), scripts/build_demo_variants.py; "
                               "per-structure Dice in Resources/Models/models.json"},
            "speed": speed, "notes": m.get("notes", ""), **({"measured": measured} if measured else {})})
    return result


def entries(repeats: int, measure: bool) -> list[dict[str, Any]]:
    result = []
    for task in tasks():
        spec = MEASURED_SPEC[task]
        ts_task = tasks()[task]
        cpu = relative_times(spec, repeats) if measure else {f: None for f in FACTORS}
        for factor in (None, *FACTORS):
            name = "original" if factor is None else f"tucker-{factor}"
            specs = [f"Dataset{m.task_id}" for m in ts_task.models]
            parts = [structure_stats(s, factor) for s in specs]
            figures = {k: sum(p[k] for p in parts) for k in ("params", "flops", "weights_bytes")}
            source = {"release": ts_task.release, "datasets": [m.dataset for m in ts_task.models], "sha256": {}}
            outputs = max(EXAMPLE_SPECS[s].num_foreground + 1 for s in specs)
            tile = peak_memory(spec, factor) if measure else None
            cuda = ({"tile_bytes": peak_memory(spec, factor, "cuda"), "bytes_per_voxel": bytes_per_voxel(outputs),
                     "measured_on": spec, "device": torch.cuda.get_device_name()}
                    if measure and torch.cuda.is_available() else None)
            result.append({
                "id": task if factor is None else f"{task}-{name}", "task": task, "policy": policy_dict(factor),
                "source": source, "spacing_mm": ts_task.spacing_mm, "outputs": outputs, **figures,
                "peak_memory": {"cpu": {"tile_bytes": tile, "bytes_per_voxel": bytes_per_voxel(outputs),
                                        "measured_on": spec},
                                "cuda": cuda},
                "quality": quality(task, factor),
                "speed": speed(task, factor, cpu) if measure else {},
                "notes": "figures from an assumed architecture (Dataset298 plans unavailable)" if task == "fastest" else "",
            })
            print(f"{result[-1]['id']}: {figures['params'] / 1e6:.2f} M params, peak {tile} bytes", flush=True)
            if factor is None:
                result += default_entries(result[-1])
    demo_peak = {"cpu": {"tile_bytes": peak_memory(DEMO_ID, None) if measure else None, "bytes_per_voxel":
                         bytes_per_voxel(len(json.loads((BUNDLED_MODELS / "models.json").read_text())["voxel_counts"])
                                         + 1), "measured_on": f"{DEMO_ID} (the original; its variants need no more)"},
                 "cuda": None}
    return result + demo_entries(demo_peak)


def refresh_entries(catalogue: dict[str, Any]) -> None:
    """Rewrite the demo and default-policy entries in place (the demo's peak memory kept), the rest kept."""
    variants = catalogue["variants"]
    demo_peak = next(v["peak_memory"] for v in variants if v["id"] == DEMO_ID)
    kept = [v for v in variants if v["task"] != "demo" and (v["policy"] == "original" or v["policy"]["name"] == "uniform")]
    result = []
    for task in tasks():
        original = next(v for v in kept if v["id"] == task)
        result += [original, *default_entries(original), *(v for v in kept if v["task"] == task and v is not original)]
    catalogue["variants"] = result + demo_entries(demo_peak)


def remeasure_speed(catalogue: dict[str, Any], repeats: int) -> None:
    """Replace every entry's CPU time (and the paper's GPU figures) by a new measurement, in place."""
    measured = {}
    for v in catalogue["variants"]:
        if v["task"] == "demo" or v["policy"] != "original" and v["policy"]["name"] != "uniform":
            continue  # measured by build_demo_variants.py / by the user's build
        spec = MEASURED_SPEC[v["task"]]
        if spec not in measured:
            measured[spec] = relative_times(spec, repeats)
        factor = None if v["policy"] == "original" else v["policy"]["params"]["factor"]
        v["speed"] = speed(v["task"], factor, measured[spec])
        print(f"{v['id']}: {v['speed'].get('cpu', {}).get('relative_time')}", flush=True)


def cpu_runtimes(catalogue: dict[str, Any]) -> str:
    """The runtimes and CPUs the catalogue's CPU times were measured in, as a phrase."""
    found = sorted({f"{cpu.get('runtime', 'PyTorch f32, stored form')} on {cpu.get('device', 'this CPU')}"
                    for v in catalogue["variants"] if (cpu := v["speed"].get("cpu"))})
    return "; ".join(found) or "no runtime (unmeasured)"


def write_docs(catalogue: dict[str, Any], path: Path) -> None:
    """The catalogue as a Markdown table (docs/variants.md)."""
    gib = 2 ** 30
    lines = ["# Variants catalogue", "",
             f"Generated by `scripts/build_catalogue.py` from `TuckerSegment/Resources/variants.json` "
             f"({catalogue['measured_on']}). FLOPs: {catalogue['flop_convention']}.", "",
             f"Peak memory: {catalogue['peak_memory']}", "",
             "CPU time: one patch forward pass relative to the original, interleaved in one run (median of "
             f"repeats), in {cpu_runtimes(catalogue)}. TotalSegmentator networks carry random weights (same "
             "structure, memory and speed). "
             "Dice loss: points below the original, published (Weber et al. 2024, read from plots, no "
             "fine-tuning) or measured here (demo model).", "",
             "| id | params (M) | GFLOPs/patch | weights (MB) | peak RAM, one tile (GiB) | standard volume (GiB) "
             "| CPU time vs original | Dice loss (points) |",
             "|---|---|---|---|---|---|---|---|"]
    for v in catalogue["variants"]:
        cpu = v["peak_memory"]["cpu"]
        standard = cpu["tile_bytes"] + cpu["bytes_per_voxel"] * standard_voxels(v["spacing_mm"])
        q = v["quality"]
        loss = ("reference" if v["policy"] == "original" else "unmeasured" if q["mean_dice"] is None
                else f"{100 * (q['original_dice'] - q['mean_dice']):.1f} ({q['kind']})")
        speed = v["speed"].get("cpu", {}).get("relative_time")
        sizes = ("where built",) * 3 if v["params"] is None else \
            (f"{v['params'] / 1e6:.2f}", f"{v['flops'] / 1e9:.1f}", f"{v['weights_bytes'] / 1e6:.1f}")
        lines.append(f"| {v['id']} | {' | '.join(sizes)} | {cpu['tile_bytes'] / gib:.2f} | {standard / gib:.2f} "
                     f"| {'where built' if speed is None and v['policy'] != 'original' else f'{speed or 1.0:.2f}'} "
                     f"| {loss} |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-measure", action="store_true", help="structure figures only (no memory/speed)")
    parser.add_argument("--docs-only", action="store_true", help="only rewrite docs/variants.md from the catalogue")
    parser.add_argument("--speed-only", action="store_true", help="re-measure the CPU times, keep the other figures")
    parser.add_argument("--entries-only", action="store_true",
                        help="rewrite the demo entries (models.json) and the default-policy entries, keep the rest")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_peak_memory(args.child[0], None if args.child[1] == "original" else float(args.child[1]), args.child[2])
        return
    if args.docs_only:
        write_docs(json.loads(CATALOGUE_JSON.read_text()), DOCS)
        return
    if args.entries_only:
        catalogue = json.loads(CATALOGUE_JSON.read_text())
        refresh_entries(catalogue)
        CATALOGUE_JSON.write_text(json.dumps(catalogue, indent=1) + "\n")
        write_docs(catalogue, DOCS)
        print(f"wrote {CATALOGUE_JSON} and {DOCS}")
        return
    torch.set_num_threads(2)
    if args.speed_only:
        catalogue = json.loads(CATALOGUE_JSON.read_text())
        remeasure_speed(catalogue, args.repeats)
        catalogue["speed_measured_on"] = (f"{platform.machine()}, 2 CPU threads, {CPU_RUNTIME.describe()}, "
                                          f"{date.today().isoformat()}")
        CATALOGUE_JSON.write_text(json.dumps(catalogue, indent=1) + "\n")
        write_docs(catalogue, DOCS)
        print(f"wrote {CATALOGUE_JSON} and {DOCS}")
        return
    catalogue = {
        "schema": SCHEMA,
        "generated_by": "scripts/build_catalogue.py",
        "measured_on": f"{platform.machine()}, 2 CPU threads, torch {torch.__version__}, {date.today().isoformat()}",
        "flop_convention": FLOP_CONVENTION,
        "peak_memory": "cpu.tile_bytes: peak RSS of a fresh process segmenting one patch-sized volume at the model "
                       "spacing (measured on the network named in measured_on: the task's model with the largest "
                       "output head); expected peak for a volume = tile_bytes + bytes_per_voxel x voxels at the model "
                       f"spacing (an estimate of nnU-Net's buffers); standard volume {STANDARD_VOLUME_MM} mm. "
                       + ("cuda: the same volume, torch.cuda.max_memory_allocated on the named device"
                          if torch.cuda.is_available() else
                          "cuda: unmeasured (no GPU here); selection then uses the CPU figure"),
        "variants": entries(args.repeats, not args.skip_measure),
    }
    CATALOGUE_JSON.write_text(json.dumps(catalogue, indent=1) + "\n")
    write_docs(catalogue, DOCS)
    print(f"wrote {CATALOGUE_JSON} and {DOCS}")


if __name__ == "__main__":
    main()
