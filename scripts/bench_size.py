#!/usr/bin/env python3
"""Parameters, FLOPs and weight size of TotalSegmentator architectures under the paper's uniform rule.

Counts come from the engine itself: the policy's per-layer plans applied to the architecture built
from plans (structure only: counts do not depend on weight values), measured by
``TuckerSegmentLib.tucker.network_stats``. Writes docs/size_uniform.json and docs/size_uniform.md.

    .venv/bin/python scripts/bench_size.py
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from TuckerSegmentLib import UniformPolicy
from TuckerSegmentLib.compress.network import plan_layers
from TuckerSegmentLib.tucker.layers import apply_plans
from TuckerSegmentLib.testing.example_models import example_model
from TuckerSegmentLib.tucker.network_stats import FLOP_CONVENTION, network_stats

FACTORS = (0.9, 0.7, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
# Weber et al. 2024 as collected in ../shared/reference/README.md (millions of parameters).
PUBLISHED_PARAMS_M = {
    "Dataset291": {"original": 31.19, 0.9: 27.92, 0.7: 17.35, 0.5: 9.24, 0.4: 6.18, 0.3: 3.69, 0.2: 1.85, 0.1: 0.62, 0.05: 0.25},
    "Dataset297": {"original": 16.55, 0.9: 14.87, 0.7: 9.25, 0.5: 4.92, 0.4: 3.30, 0.3: 1.98, 0.2: 1.00, 0.1: 0.34, 0.05: 0.15},
}


def measure(name: str, factor: float | None, rank_min: int) -> dict:
    model = example_model(name)
    network = model.build_network()
    x = model.example_input()
    if factor is not None:
        apply_plans(network, plan_layers(network, UniformPolicy(factor, rank_min), x))
    stats = network_stats(network, x)
    published = PUBLISHED_PARAMS_M[name]["original" if factor is None else factor]
    return {"architecture": name, "factor": factor, "rank_min": rank_min, "params": stats.params,
            "flops": stats.flops, "weight_bytes": stats.weight_bytes, "patch_size": list(model.patch_size),
            "published_params_m": published}


def markdown(rows: list[dict]) -> str:
    lines = [f"FLOPs: {FLOP_CONVENTION}, one patch, batch 1. Weights: float32 tensors used in inference.", "",
             "| architecture | factor | params (M) | published (M) | Δ | GFLOPs/patch | weights (MB) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        delta = r["params"] / 1e6 / r["published_params_m"] - 1
        lines.append(f"| {r['architecture']} | {r['factor'] or 'original'} | {r['params'] / 1e6:.2f} | "
                     f"{r['published_params_m']:.2f} | {delta:+.1%} | {r['flops'] / 1e9:.1f} | "
                     f"{r['weight_bytes'] / 1e6:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-min", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs")
    args = parser.parse_args()
    rows = [measure(name, factor, args.rank_min) for name in PUBLISHED_PARAMS_M for factor in (None, *FACTORS)]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "size_uniform.json").write_text(json.dumps({"machine": platform.platform(), "rows": rows}, indent=1) + "\n")
    table = markdown(rows)
    (args.out / "size_uniform.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
