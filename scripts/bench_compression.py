#!/usr/bin/env python
"""Every compression method on one plot: the uniform rule, our budget policy (weight-only and
activation-aware), filter pruning (L1, FPGM, Taylor) and the runtime's precisions, judged as the
compression literature does (``tuckersegment evaluate``'s engine: per-class Dice per case, Wilcoxon with
Holm correction, costs measured side by side).

- ``demo``: the bundled demo model on the sample chest CT. Compression that looks at data (activation-aware
  ranks, Taylor pruning with its labels) sees only the *training* half of the CT; the cases are the
  held-out half's checkerboard blocks (8 blocks of one CT: a weak basis for statistics, said in the report).
- ``ts3mm``: TotalSegmentator's 3 mm architecture (Dataset297 plans) with random weights: parameters, FLOPs
  and seconds per volume only (agreement of random networks means nothing).

Points are compressed once and cached (``--cache``); every point shown is timed in one run, models in turn.
Writes ``docs/bench/<model>/`` (evaluation.json/.md, pareto.png, dice_per_class.png).

Usage: python scripts/bench_compression.py [--model demo ts3mm] [--budgets 0.5 0.3 0.2] [--rounds 5]
Run it alone: anything else on the machine slows the timed segmentations.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from TuckerSegmentLib.compress.calibration_data import CalibrationVolume
from TuckerSegmentLib.compress.folder import compress_model_folder, prune_model_folder
from TuckerSegmentLib.evaluation.cases import Scan
from TuckerSegmentLib.evaluation.report import JSON_NAME, write_report
from TuckerSegmentLib.evaluation.run import Candidate, evaluate
from TuckerSegmentLib.image.holdout import holdout_blocks, holdout_mask
from TuckerSegmentLib.image.volume import Volume
from TuckerSegmentLib.paths import cache_dir
from TuckerSegmentLib.policies.methods import policy_for
from TuckerSegmentLib.runtime.inference import cpu_has_native_bf16
from TuckerSegmentLib.testing.demo_data import chest_sample
from TuckerSegmentLib.testing.example_models import write_example_model
from TuckerSegmentLib.variants.choice import bundled_models

ROOT = Path(__file__).resolve().parents[1]
UNIFORM_FACTORS = (0.7, 0.5, 0.3)  # the paper's factors; their FLOPs fall where the rule puts them
DEFAULT_VARIANT = "chest-demo-tucker-balanced"  # what auto runs on this machine for the demo task
TITLES = {"demo": "Bundled demo model (held-out blocks of the sample CT): quality against cost, CPU, OpenVINO",
          "ts3mm": "TotalSegmentator 3 mm architecture (random weights): seconds per volume against FLOPs, CPU"}


def bundled(model_id: str) -> Path:
    return next(Path(e["path"]) for e in bundled_models() if e["id"] == model_id)


def cached(folder: Path, make: Callable[[Path], Any], say: Callable[[str], None]) -> Path:
    """``folder``, compressed by ``make`` the first time (a complete folder is reused)."""
    if not (folder / "fold_0" / "tucker.json").is_file():
        start = time.perf_counter()
        make(folder)
        say(f"built {folder.name} in {time.perf_counter() - start:.0f} s")
    return folder


def points(source: Path, work: Path, budgets: list[float], calibration: list[CalibrationVolume] | None,
           labels: list[Volume] | None, say: Callable[[str], None]) -> list[Candidate]:
    """Each method at each budget, compressed once into ``work``."""
    made: list[Candidate] = []

    def add(name: str, curve: str, make: Callable[[Path], Any]) -> None:
        made.append(Candidate(cached(work / name, make, say), name, curve=curve))
    for factor in UNIFORM_FACTORS:
        add(f"uniform-{factor}", "uniform rule (paper)", lambda out, f=factor: compress_model_folder(
            source, out, policy_for("uniform", f), weight_only=True, overwrite=True))
    for budget in budgets:
        add(f"budget-weight-only-{budget}", "budget policy, weight-only", lambda out, b=budget: compress_model_folder(
            source, out, policy_for("flops", b), weight_only=True, overwrite=True))
        if calibration is not None:
            add(f"budget-calibrated-{budget}", "budget policy, activation-aware",
                lambda out, b=budget: compress_model_folder(source, out, policy_for("flops", b),
                                                            calibration=calibration, overwrite=True))
        for criterion in ("l1", "fpgm", "taylor"):
            if criterion == "taylor" and labels is None:
                continue
            add(f"prune-{criterion}-{budget}", f"prune-{criterion}",
                lambda out, b=budget, c=criterion: prune_model_folder(
                    source, out, c, b, overwrite=True, calibration=calibration if c == "taylor" else None,
                    labels=labels if c == "taylor" else None))
    return made


def precisions(folder: Path, name: str, curve: str) -> list[Candidate]:
    """``folder`` at f32 and, where the CPU runs it natively, bf16."""
    chosen = [Candidate(folder, f"{name} f32", "f32", curve)]
    if cpu_has_native_bf16():
        chosen.append(Candidate(folder, f"{name} bf16", "bf16", f"{curve} (bf16)"))
    return chosen


def winners(data: dict[str, Any], budgets: list[float], key: str) -> list[str]:
    """Per budget, the method whose point at or below it scores best (``key``: pooled_dice or pooled_agreement)."""
    lines = []
    for budget in budgets:
        best = max((m for m in data["models"][1:] if m["flops_fraction"] <= budget + 0.02 and m[key] is not None
                    and m["precision"] in ("auto", "f32")), key=lambda m: m[key], default=None)
        if best is not None:
            lines.append(f"FLOP budget {budget}: best {key.replace('_', ' ')} {best[key]:.3f} by {best['name']} "
                         f"({best['curve']}, {best['flops_fraction']:.2f} of the FLOPs, {best['speedup']:.2f}x faster "
                         "per volume)")
    return lines


def bench_demo(budgets: list[float], rounds: int, work: Path, say: Callable[[str], None],
               build_only: bool = False) -> dict[str, Any] | None:
    sample = chest_sample()
    held = holdout_mask(sample.ct.array.shape)
    training = [CalibrationVolume(sample.ct, ~held)]
    labels = [Volume(sample.labels, sample.ct.ijk_to_ras)]
    source = bundled("chest-demo")
    candidates = points(source, work, budgets, training, labels, say)
    if build_only:
        return None
    original_f32, *original_bf16 = precisions(source, "original", "original")
    candidates += original_bf16 + precisions(bundled(DEFAULT_VARIANT), DEFAULT_VARIANT, "default variant")
    scan = Scan("sample chest CT", sample.ct, sample.labels,
                {f"held-out block {i + 1}": block for i, block in enumerate(holdout_blocks(sample.ct.array.shape))})
    result = evaluate(original_f32, candidates, [scan], device="cpu", rounds=rounds,
                      progress=lambda f, m: say(f"{f:4.0%} {m}"))
    data = result.to_json()
    data["notes"] += [
        "cases: the 8 held-out checkerboard blocks of the one sample CT (the demo model trained on the other half; "
        "activation-aware ranks and Taylor pruning saw only that training half); blocks of one scan are not "
        "independent patients, so the tests say how consistent a difference is across regions, no more",
        "mean Dice: per case, then over classes; pooled Dice (the demo's usual held-out Dice): voxels of all "
        "blocks pooled per class",
        f"uniform rule at the paper's factors {', '.join(map(str, UNIFORM_FACTORS))} (FLOPs where the rule puts "
        "them); budget policy and pruning at the FLOP budgets",
        *winners(data, budgets, "pooled_dice")]
    write_report(data, ROOT / "docs" / "bench" / "demo", overwrite=True, title=TITLES["demo"])
    return data


def bench_ts3mm(budgets: list[float], rounds: int, work: Path, say: Callable[[str], None],
                build_only: bool = False) -> dict[str, Any] | None:
    """Timed curve by curve, each with the original: a dozen TotalSegmentator-size networks compiled at once
    (each with its activation buffers) do not fit in 24 GiB."""
    source_root = work / "source"
    if not source_root.exists():
        write_example_model(source_root, "Dataset297", seed=0)
    source = next(source_root.rglob("plans.json")).parent
    candidates = points(source, work, budgets, None, None, say)
    if build_only:
        return None
    original_f32, *original_bf16 = precisions(source, "original", "original")
    groups: dict[str, list[Candidate]] = {"original (bf16)": original_bf16} if original_bf16 else {}
    for candidate in candidates:
        groups.setdefault(candidate.curve, []).append(candidate)
    scan = [Scan("sample chest CT", chest_sample().ct)]
    data: dict[str, Any] | None = None
    for curve, members in groups.items():
        say(f"timing {curve} beside the original")
        part = evaluate(original_f32, members, scan, device="cpu", rounds=rounds, memory=False,
                        progress=lambda f, m: say(f"{f:4.0%} {m}")).to_json()
        data = part if data is None else {**data, "models": data["models"] + part["models"][1:]}
    assert data is not None
    data["notes"] += ["TotalSegmentator 3 mm architecture (Dataset297 plans) with random weights: parameters, FLOPs "
                      "and seconds only; agreement of random networks means nothing",
                      "seconds per volume: the sample chest CT resampled to 3 mm by the predictor; each curve timed "
                      "in its own run beside the original (its speed-up is against that run's original; the "
                      "original's row is from the first run)"]
    write_report(data, ROOT / "docs" / "bench" / "ts3mm", overwrite=True, quality=False, title=TITLES["ts3mm"])
    return data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", choices=("demo", "ts3mm"), default=["demo", "ts3mm"])
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.5, 0.3, 0.2])
    parser.add_argument("--rounds", type=int, default=5, help="timed segmentations per model (median)")
    parser.add_argument("--cache", type=Path, default=cache_dir() / "bench_compression",
                        help="where compressed points are kept between runs")
    parser.add_argument("--rebuild", action="store_true", help="compress every point again")
    parser.add_argument("--report-only", action="store_true",
                        help="draw docs/bench/<model>/ again from its evaluation.json (nothing segmented)")
    parser.add_argument("--build-only", action="store_true",
                        help="compress the points into the cache and stop (nothing timed: may run beside other work)")
    args = parser.parse_args()

    def say(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)
    for model in args.model:
        if args.report_only:
            folder = ROOT / "docs" / "bench" / model
            write_report(json.loads((folder / JSON_NAME).read_text()), folder, overwrite=True,
                         title=TITLES[model], quality=model == "demo")
            continue
        work = args.cache / model
        if args.rebuild and work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True, exist_ok=True)
        (ROOT / "docs" / "bench").mkdir(parents=True, exist_ok=True)
        data = (bench_demo if model == "demo" else bench_ts3mm)(args.budgets, args.rounds, work, say, args.build_only)
        for line in data["notes"] if data else []:
            say(line)


if __name__ == "__main__":
    main()
