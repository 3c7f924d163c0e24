#!/usr/bin/env python
"""Time and peak memory of building a TotalSegmentator variant on this machine, stage by stage.

TotalSegmentator-shaped weights (the real plans and label names, random weights:
``testing.example_models.write_totalsegmentator_task``) are written into a scratch nnU-Net results folder, and
``variants.build.build_variant`` builds the variant from them into a scratch cache (empty: every latency table,
conversion and compilation is paid, as on a user's first build), calibrated and measured on the bundled sample CT
(the default without ``--calibration``). Every stage the engine names (``progress.stage``) is recorded with its
seconds and the process's peak resident memory while it ran (``runtime.stage_log``), and the whole build with the
process's peak resident memory (``getrusage``). Then the built variant segments the sample CT in a new process,
twice: its first use (cache as the build left it) against its warm time.

Writes ``docs/bench/build_<variant>.json`` (``--out`` to change) and prints a Markdown table for docs/speed.md.

Usage: python scripts/bench_build.py [--task fast] [--variant fast-tucker-balanced] [--divisor 1]
       python scripts/bench_build.py --compress Dataset291   (``compress`` of one 1.5 mm model: about 4 min)
(``fast-tucker-balanced`` at full size: about 11 min on 2 CPU cores; ``--task total``: five 1.5 mm parts, not timed yet)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FIRST_USE = """
import sys, time
from TuckerSegmentLib.compress.calibration_source import sample_ct
from TuckerSegmentLib.image.volume import read_volume
from TuckerSegmentLib.segment.task import TaskSegmenter
from TuckerSegmentLib.variants.catalogue import catalogue, find_variant, task_of, variant_dir
volume = read_volume(sample_ct())
start = time.perf_counter()
variant = find_variant(catalogue(weights_roots=[sys.argv[1]]), sys.argv[2])
segmenter = TaskSegmenter([variant_dir(variant) / m for m in sys.argv[3:]], label_maps=task_of(variant).label_maps(),
                          device="cpu")
first = segmenter.segment(volume)
first_total = time.perf_counter() - start
warm = segmenter.segment(volume)
print(first_total, first.seconds, warm.seconds)
"""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def build(task: str, variant_id: str, divisor: int, scratch: Path) -> dict:
    """Build ``variant_id`` from TotalSegmentator-shaped weights in ``scratch``; its stages and peak memory."""
    os.environ["TUCKERSEGMENT_CACHE"] = str(scratch / "cache")
    from TuckerSegmentLib.progress import listening
    from TuckerSegmentLib.runtime.stage_log import StageLog
    from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task
    from TuckerSegmentLib.variants.build import build_variant
    from TuckerSegmentLib.variants.catalogue import catalogue, find_variant
    results = scratch / "results"
    write_totalsegmentator_task(results, task, divisor=divisor)
    variant = find_variant(catalogue(weights_roots=[results]), variant_id)
    log = StageLog(lambda message: print(message, flush=True))
    started = time.perf_counter()
    with listening(log):
        folder = build_variant(variant, weights_roots=[results], report=lambda m: print(m, flush=True))
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    models = sorted(p.name for p in folder.iterdir() if p.is_dir())
    return {"seconds": round(seconds, 1), "peak_bytes": peak, "stages": [r.to_dict() for r in log.records],
            "results": str(results), "models": models}


def first_use(results: str, variant_id: str, models: list[str]) -> dict:
    """Seconds of the built variant's first segmentation in a new process (loading included) and of its second."""
    out = subprocess.run([sys.executable, "-c", FIRST_USE, results, variant_id, *models], check=True,
                         capture_output=True, text=True, env=os.environ)
    first_total, first, warm = (float(v) for v in out.stdout.split()[-3:])
    return {"first_use_seconds": round(first_total, 2), "first_segment_seconds": round(first, 2),
            "warm_seconds": round(warm, 2), "ratio": round(first_total / warm, 2)}


def compress(dataset: str, scratch: Path) -> dict:
    """``compress`` of a TotalSegmentator-shaped ``dataset`` model with the default policy (calibrated on the sample
    CT, as the command does without --calibration): its stages and the process's peak memory."""
    from TuckerSegmentLib.compress.folder import compress_model_folder
    from TuckerSegmentLib.policies.methods import DEFAULT_METHOD, policy_for
    from TuckerSegmentLib.progress import listening
    from TuckerSegmentLib.runtime.stage_log import StageLog
    from TuckerSegmentLib.testing.example_models import write_example_model
    source = write_example_model(scratch / "source", dataset)
    log = StageLog(lambda message: print(message, flush=True))
    started = time.perf_counter()
    with listening(log):
        compress_model_folder(source, scratch / "compressed", policy_for(DEFAULT_METHOD))
    return {"seconds": round(time.perf_counter() - started, 1),
            "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "stages": [r.to_dict() for r in log.records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="fast", choices=("fast", "total", "fastest"))
    parser.add_argument("--variant", help="catalogue id (default: the task's balanced variant)")
    parser.add_argument("--divisor", type=int, default=1, help="divide every width by this (1: full size)")
    parser.add_argument("--compress", metavar="DATASET", help="time `compress` of this TotalSegmentator-shaped model "
                        "(e.g. Dataset291) with the default policy instead of a variant build")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    variant = args.compress or args.variant or f"{args.task}-tucker-balanced"
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix="bench-build-") as scratch:
        if args.compress:
            row = compress(args.compress, Path(scratch)) | {"first_use_seconds": None, "warm_seconds": None,
                                                             "ratio": None}
        else:
            row = build(args.task, variant, args.divisor, Path(scratch))
            row |= first_use(row.pop("results"), variant, row.pop("models"))
    row |= {"variant": variant, "task": args.task, "divisor": args.divisor, "cpu": cpu_model(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    kind = "compress" if args.compress else "build"
    out = args.out or Path(__file__).resolve().parents[1] / "docs" / "bench" / f"{kind}_{variant}.json"
    out.write_text(json.dumps(row, indent=1))
    print(f"\n{variant}: {row['seconds'] / 60:.1f} min, peak {row['peak_bytes'] / 2**30:.2f} GiB; first use "
          f"{row['first_use_seconds']} s against {row['warm_seconds']} s warm ({row['ratio']}x)")
    print("| stage | seconds | peak GiB |\n|---|---:|---:|")
    for entry in row["stages"]:
        if entry["seconds"] >= 1:
            peak = "—" if entry["peak_bytes"] is None else f"{entry['peak_bytes'] / 2**30:.2f}"
            print(f"| {entry['stage']} | {entry['seconds']:.1f} | {peak} |")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
