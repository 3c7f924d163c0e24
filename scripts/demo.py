#!/usr/bin/env python3
"""Demo: segment the bundled sample chest CT with the auto-chosen model, as a user would.

1. ``tuckersegment segment CTChest4.nrrd demo_output/chest.seg.nrrd`` (model ``auto``: the choice and
   its reason are printed) and a PNG overlay of a few slices of the result.
2. The original demo model and each bundled compressed variant on the same CT, side by side (the
   runtime ``auto`` runs, OpenVINO on a CPU when installed): device, seconds (median of interleaved
   runs after a warm-up), structures found, Dice on the half of the CT the model never trained on,
   agreement with the original (mean Dice over structures), and which one ``auto`` chose.
3. ``tuckersegment compress`` of the bundled original and ``info`` of the result.
Outputs go to ``demo_output/``.
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import slicerio
from TuckerSegmentLib.compress.review import label_agreement
from TuckerSegmentLib.image.volume import read_volume
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import SAMPLE_CT, chest_sample, held_out_dice, holdout_mask
from TuckerSegmentLib.testing.overlay import write_overlay_png
from TuckerSegmentLib.variants.choice import bundled_models, choose_model

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "demo_output"
ROUNDS = 5


def tuckersegment(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("tuckersegment")), *args]
    print(f"\n$ tuckersegment {' '.join(args)}", flush=True)
    subprocess.run(command, check=True)


def main() -> None:
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir()
    sample = slicerio.get_testdata_file(SAMPLE_CT)
    output = OUT / "chest.seg.nrrd"
    tuckersegment("segment", sample, str(output), "--quiet")

    choice = choose_model("auto")
    sample_data = chest_sample()
    held = holdout_mask(sample_data.labels.shape)
    ct = read_volume(sample)
    models = [(entry, Segmenter(entry["path"], device="auto")) for entry in bundled_models()]
    results = {}
    for _, segmenter in models:
        segmenter.segment(ct)  # warm-up: loading, conversion, first-call allocations
    seconds = {entry["id"]: [] for entry, _ in models}
    for _ in range(ROUNDS):  # interleaved, so that a busy moment of the machine hits every model alike
        for entry, segmenter in models:
            results[entry["id"]] = segmenter.segment(ct)
            seconds[entry["id"]].append(results[entry["id"]].seconds)
    original = results[models[0][0]["id"]].labels
    rows = []
    for entry, _ in models:
        result = results[entry["id"]]
        rows.append((entry["id"] + (" (auto)" if entry["id"] == choice.id else ""), result.device,
                     f"{statistics.median(seconds[entry['id']]):.3f}", f"{len(result.found())}/{len(result.segments)}",
                     f"{entry['params'] / 1e6:.2f} M", f"{held_out_dice(result.labels, sample_data, held):.3f}",
                     f"{label_agreement(result.labels, original):.3f}"))
    shown = results.get(choice.id, results[models[0][0]["id"]])  # the auto choice, else the bundled original
    header = ("variant", "device", "seconds", "found", "params", "held-out Dice", "Dice vs original")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    png = write_overlay_png(ct, shown, OUT / "chest_overlay.png")
    print(f"\nThe bundled models on the same CT ({shown.runtime}; seconds: median of {ROUNDS} interleaved runs "
          "after a warm-up; held-out Dice: the half of the CT the model never trained on):")
    for row in [header, *rows]:
        print("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)))
    print(f"auto: {choice.reason}")
    print(f"\nwrote {output} (open it in 3D Slicer with {sample}) and {png}")

    compressed = OUT / "chest-demo-budget-0.3"
    original_dir = next(e["path"] for e in bundled_models() if e["policy"] == "original")
    tuckersegment("compress", str(original_dir), str(compressed), "--target-flops", "0.3", "--calibration", sample,
                  "--quiet")
    tuckersegment("info", str(compressed))
    tuckersegment("variants")


if __name__ == "__main__":
    main()
