#!/usr/bin/env python
"""Held-out Dice of the bundled demo model at FLOP budgets, per rank policy, without fine-tuning.

For each budget (fraction of the original FLOPs per patch): the paper's uniform rule (rank_min 8)
at the largest factor within the budget; the global budget policy weight-only; and the budget
policy activation-aware (TuckerSegment's default: ``compress --calibration``), calibrated on
patches of the sample CT's *image* only (no labels: the unlabeled-CT setting of a user who
calibrates on their own scans). Dice is measured on the held-out checkerboard half of the sample's
reference segmentation, as in ``build_demo_variants.py``. Writes ``docs/policies.md`` and ``.json``.

Usage: python scripts/bench_policies.py [--budgets 0.5 0.3 0.2]   (about 2 min on 2 CPU cores)
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
from TuckerSegmentLib.compress.calibration_data import calibration_patches
from TuckerSegmentLib.compress.network import compress_network, plan_layers
from TuckerSegmentLib.tucker.layers import apply_plans
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.policies.base import RankPolicy
from TuckerSegmentLib.policies.budget import BudgetPolicy
from TuckerSegmentLib.policies.methods import policy_from_dict
from TuckerSegmentLib.policies.uniform import UniformPolicy
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import chest_sample, holdout_mask
from TuckerSegmentLib.testing.demo_data import held_out_dice as mean_dice
from TuckerSegmentLib.tucker.network_stats import FLOP_CONVENTION, network_stats
from TuckerSegmentLib.variants.choice import bundled_models

DOCS = Path(__file__).resolve().parents[1] / "docs"


def uniform_within(folder: ModelFolder, budget: float, base_flops: int) -> UniformPolicy:
    """The uniform rule with the largest factor (to 0.001) whose FLOPs stay within ``budget``."""
    def flops(factor: float) -> int:
        with torch.device("meta"):
            network = folder.build_network()
        apply_plans(network, plan_layers(network, UniformPolicy(factor), folder.example_input()))
        return network_stats(network, folder.example_input()).flops
    low, high = 0.001, 1.0
    for _ in range(20):
        middle = (low + high) / 2
        low, high = (middle, high) if flops(middle) <= budget * base_flops else (low, middle)
    return UniformPolicy(math.floor(low * 1000) / 1000)


def held_out_dice(folder: ModelFolder, network: torch.nn.Module, policy: RankPolicy, sample, held) -> float:
    labels = Segmenter(folder, device="cpu", network=network, policy=repr(policy)).segment(sample.ct).labels
    return mean_dice(labels, sample, held)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.3, 0.2])
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = ModelFolder.open(next(e["path"] for e in bundled_models() if e["policy"] == "original"))
    sample = chest_sample()
    held = holdout_mask(sample.ct.array.shape)
    patches = list(calibration_patches(folder, [sample.ct]))
    base = network_stats(folder.load_network(0), folder.example_input()).flops
    rows = [{"budget": 1.0, "method": "original", "flops_fraction": 1.0,
             "dice": held_out_dice(folder, folder.load_network(0), UniformPolicy(1.0), sample, held)}]
    for budget in args.budgets:
        for method, policy, calibration in (("uniform (paper)", uniform_within(folder, budget, base), None),
                                            ("budget, weight-only", BudgetPolicy(target_flops=budget), None),
                                            ("budget, activation-aware (default)", BudgetPolicy(target_flops=budget),
                                             patches)):
            network = folder.load_network(0)
            start = time.perf_counter()
            report = compress_network(network, policy, folder.example_input(), calibration=calibration)
            chosen = policy_from_dict(report.policy)  # "auto" resolved to the exponent compress_network picked
            rows.append({"budget": budget, "method": method, "policy": repr(chosen),
                         "flops_fraction": report.after.flops / base, "params": report.after.params,
                         "compress_seconds": round(time.perf_counter() - start, 1),
                         "dice": held_out_dice(folder, network, policy, sample, held)})
            print(rows[-1], flush=True)
    machine = f"{platform.machine()}, 2 CPU threads, torch {torch.__version__}"
    (DOCS / "policies.json").write_text(json.dumps({"machine": machine, "calibration_patches": len(patches),
                                                    "flop_convention": FLOP_CONVENTION, "rows": rows}, indent=1) + "\n")
    original = rows[0]["dice"]
    lines = ["# Rank policies on the demo model (no fine-tuning)", "",
             f"Generated by `scripts/bench_policies.py` ({machine}). Held-out mean Dice of the bundled demo model "
             f"(7 structures) on the sample CT; activation-aware compression calibrated on {len(patches)} patches of "
             f"the same CT's image (no labels). FLOPs: {FLOP_CONVENTION}.", "",
             "| FLOP budget | method | policy | FLOPs kept | held-out Dice | Δ vs original (points) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['budget']:.2f} | {row['method']} | {row.get('policy', 'original')} | "
                     f"{row['flops_fraction']:.3f} | {row['dice']:.3f} | {100 * (row['dice'] - original):+.1f} |")
    (DOCS / "policies.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {DOCS / 'policies.md'}")


if __name__ == "__main__":
    main()
