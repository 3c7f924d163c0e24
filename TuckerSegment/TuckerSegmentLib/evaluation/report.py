"""An evaluation written out: ``evaluation.json`` (everything), ``evaluation.md`` (tables) and PNG plots
(per-class Dice, and the Pareto plot of quality against FLOPs and measured seconds, one curve per method).
The folder is written whole or not at all. Plots read the JSON form, so a saved evaluation can be drawn
again."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import Input, atomic_output_dir, check_output_dir

JSON_NAME, MARKDOWN_NAME, DICE_PLOT, PARETO_PLOT = "evaluation.json", "evaluation.md", "dice_per_class.png", "pareto.png"
QUALITY = (("pooled_dice", "Dice vs reference labels (pooled over cases)"),
           ("pooled_agreement", "Dice vs the original's labels (pooled)"))
COSTS = (("flops_fraction", "FLOPs per patch (fraction of the original)"),
         ("median_seconds", "seconds per volume (measured)"))


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _significance(model: Mapping[str, Any]) -> str:
    tests = model["tests"].values()
    if not tests:
        return ""
    tested = [t for t in tests if t["p"] is not None]
    if not tested:
        return "too few cases"
    worse = sum(t["significant"] and t["median_difference"] < 0 for t in tested)
    better = sum(t["significant"] and t["median_difference"] > 0 for t in tested)
    return f"{worse} worse, {better} better of {len(tested)}"


def markdown(data: Mapping[str, Any]) -> str:
    """The evaluation as Markdown: a summary row per model, then Dice per class."""
    models = data["models"]
    original = models[0]
    lines = [f"Evaluated on {len(data['scans'])} scan(s), {len(data['cases'])} case(s), device {data['device']}; "
             f"{data['timing']}. FLOPs: {data['flop_convention']}. Test: {data['test']}. Mean Dice: per case, then "
             "over classes; pooled Dice: each class's voxels of all cases pooled, then over classes; agreement: mean "
             "Dice against the original's labels.", ""]
    lines += [f"- {note}" for note in data["notes"]] + ([""] if data["notes"] else [])
    lines += ["| model | method | params (M) | GFLOPs/patch (fraction) | weights (MB) | peak memory (MB) | s/volume | "
              "speed-up | mean Dice | Δ Dice (points) | pooled Dice | agreement | classes differing (Holm) |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for m in models:
        delta = (100 * (m["mean_dice"] - original["mean_dice"])
                 if m["mean_dice"] is not None and original["mean_dice"] is not None else None)
        peak = None if m["peak_memory_bytes"] is None else m["peak_memory_bytes"] / 1e6
        lines.append(f"| {m['name']} | {m['curve']} | {m['params'] / 1e6:.3f} | {m['flops'] / 1e9:.1f} "
                     f"({m['flops_fraction']:.2f}) | {m['weights_bytes'] / 1e6:.2f} | {_number(peak, 0)} | "
                     f"{_number(m['median_seconds'])} | {_number(m['speedup'], 2)} | {_number(m['mean_dice'])} | "
                     f"{'' if delta is None else f'{delta:+.1f}'} | {_number(m['pooled_dice'])} | {_number(m['mean_agreement'])} | "
                     f"{_significance(m)} |")
    if data["labelled"]:
        lines += ["", "Mean Dice per class over cases (p: Holm-corrected Wilcoxon vs the original; * below "
                  f"{0.05}):", "",
                  "| class | " + " | ".join(m["name"] for m in models) + " |",
                  "|---|" + "---:|" * len(models)]
        for name in data["classes"]:
            cells = []
            for m in models:
                values = [v for v in m["dice"].get(name, {}).values() if v is not None]
                cell = _number(sum(values) / len(values)) if values else ""
                test = m["tests"].get(name)
                if test and test["p_holm"] is not None:
                    cell += f" (p {test['p_holm']:.3f}{'*' if test['significant'] else ''})"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _curves(models: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for m in models:
        curves.setdefault(m["curve"], []).append(m)
    return curves


def pareto_plot(data: Mapping[str, Any], path: Path, title: str = "", quality: bool = True) -> list[str]:
    """Quality (Dice vs reference when labelled, agreement with the original) against FLOPs and measured
    seconds, one curve per method; ``quality=False`` (random weights): seconds against FLOPs only.
    Returns the curves the legend names."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib import colormaps
    curves = _curves(data["models"])
    colours = colormaps["tab10" if len(curves) <= 10 else "tab20"]
    rows = [q for q in QUALITY if q[0] != "pooled_dice" or data["labelled"]] if quality else [COSTS[1]]
    columns = COSTS if quality else COSTS[:1]
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(6.5 * len(columns), 4.5 * len(rows)), squeeze=False)
    for r, (y_key, y_label) in enumerate(rows):
        for c, (x_key, x_label) in enumerate(columns):
            axis = axes[r][c]
            for index, (curve, models) in enumerate(curves.items()):
                points = sorted((m[x_key], 1.0 if curve == "original" and y_key == "pooled_agreement" else m[y_key])
                                for m in models if m[x_key] is not None)  # the original agrees with itself
                points = [p for p in points if p[1] is not None]
                if not points:
                    continue
                xs, ys = zip(*points, strict=True)
                marker = "*" if curve.startswith("original") else "os^vDPXh<>"[index % 10]
                axis.plot(xs, ys, marker=marker, markersize=11 if marker == "*" else 6, label=curve,
                          color=colours(index), linestyle="-" if len(points) > 1 else "none")
            axis.set_xlabel(x_label)
            axis.set_ylabel(y_label)
            axis.grid(alpha=0.3)
    legend = axes[0][0].legend(fontsize=8, loc="best")
    figure.suptitle(title or "Quality against cost, per compression method")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return [text.get_text() for text in legend.get_texts()]


def dice_plot(data: Mapping[str, Any], path: Path) -> None:
    """Mean Dice per class (against the reference labels, or the original's without them), one marker per model."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    key = "dice" if data["labelled"] else "agreement"
    classes = data["classes"]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.35 * len(classes) + 3), 4.5))
    for index, m in enumerate(data["models"]):
        if not m[key]:
            continue
        means = []
        for name in classes:
            values = [v for v in m[key].get(name, {}).values() if v is not None]
            means.append(sum(values) / len(values) if values else math.nan)
        axis.plot(range(len(classes)), means, marker="os^vDPXh*<>"[index % 11], linestyle="none", label=m["name"])
    axis.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7 if len(classes) > 30 else 9)
    axis.set_ylabel("mean Dice over cases" + ("" if key == "dice" else " vs the original"))
    axis.set_ylim(0, 1.02)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(data: Mapping[str, Any], out_dir: str | Path, overwrite: bool = False, title: str = "",
                 quality: bool = True, inputs: Sequence[Input] = ()) -> Path:
    """Write the evaluation (``Evaluation.to_json()``) into ``out_dir``: whole or not at all, never over any of
    ``inputs`` (the models, images and labels evaluated)."""
    target = check_output_dir(Path(out_dir), overwrite, inputs)
    with atomic_output_dir(target, overwrite) as staging:
        (staging / JSON_NAME).write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
        (staging / MARKDOWN_NAME).write_text(markdown(data))
        pareto_plot(data, staging / PARETO_PLOT, title, quality)
        if quality:
            dice_plot(data, staging / DICE_PLOT)
    return target
