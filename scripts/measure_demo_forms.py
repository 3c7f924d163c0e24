#!/usr/bin/env python
"""The bundled demo models' precision forms, as ``build-variants`` makes and measures a user's: for each bundled
model, its int8 form quantized on the training half of the sample CT (``demo_data.training_half_ct``: the
held-out blocks never seen) and stored in its folder, then every form this CPU runs natively (bf16, int8)
measured against the original in f32 (agreement, seconds per volume, interleaved) with its held-out Dice per
structure against the reference labels, which is what ``auto`` judges the demo's forms by.

Writes ``measurement.forms`` into ``Resources/Models/models.json`` and the catalogue's demo entries
(``Resources/variants.json``). Usage: python scripts/measure_demo_forms.py [--rounds N]
"""
from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np
from TuckerSegmentLib.compress.calibration_data import CalibrationVolume
from TuckerSegmentLib.compress.int8_form import build_int8_form
from TuckerSegmentLib.paths import BUNDLED_MODELS, CATALOGUE_JSON
from TuckerSegmentLib.runtime.hardware import cpu_device
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import chest_sample, holdout_mask, training_half_ct
from TuckerSegmentLib.variants.choice import BUNDLED_CATALOGUE
from TuckerSegmentLib.variants.forms import cpu_forms
from TuckerSegmentLib.variants.measure import ScoredVolume, measure_variant

HOW = "held-out half of the bundled sample CT (calibrated on the other half)"
CALIBRATED_ON = "the training half of the sample CT"


def held_out_quality(folder, precision: str, sample, held: np.ndarray, original: dict[str, Any]) -> dict[str, Any]:
    """Held-out Dice per structure of ``folder`` run in ``precision``, beside the original's (catalogue form)."""
    result = Segmenter(folder, device="cpu", precision=precision).segment(sample.ct)
    structures = {}
    for segment in result.segments:
        a, b = result.labels[held] == segment.value, sample.labels[held] == segment.value
        total = int(a.sum()) + int(b.sum())
        structures[segment.name] = {"dice": None if total == 0 else 2.0 * int((a & b).sum()) / total,
                                    "original_dice": original[segment.name], "voxels": int(b.sum())}
    scores = [s["dice"] for s in structures.values() if s["dice"] is not None]
    return {"mean_dice": round(float(np.mean(scores)), 4), "structures": structures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per model (median)")
    args = parser.parse_args()
    sample, device = chest_sample(), cpu_device()
    held = holdout_mask(sample.labels.shape)
    forms = cpu_forms(device)
    record = json.loads(BUNDLED_CATALOGUE.read_text())
    original_entry = record["models"][0]
    original_dir = BUNDLED_MODELS / original_entry["folder"]
    for entry in record["models"]:
        folder = BUNDLED_MODELS / entry["folder"]
        if "int8" in forms:
            build_int8_form(next(p for p in folder.rglob("fold_0") if p.is_dir()).parent, "0",
                            [CalibrationVolume(training_half_ct(sample, held))], CALIBRATED_ON)
        measured = measure_variant([original_dir], [folder], [ScoredVolume("the sample CT", sample.ct, held)], device,
                                   HOW, rounds=args.rounds, forms=forms)
        for precision in forms:
            measured["forms"][precision]["quality"] = held_out_quality(folder, precision, sample, held,
                                                                       original_entry["held_out_dice"])
        entry["measurement"] = {**(entry.get("measurement") or measured), "forms": measured["forms"]}
        print(entry["id"], {p: (f["speedup"], f["mean_agreement"], f["quality"]["mean_dice"])
                            for p, f in measured["forms"].items()}, flush=True)
    BUNDLED_CATALOGUE.write_text(json.dumps(record, indent=1) + "\n")
    catalogue = json.loads(CATALOGUE_JSON.read_text())
    by_folder = {m["id"]: m["measurement"] for m in record["models"]}
    for variant in catalogue["variants"]:
        if variant["id"] in by_folder and "bundled" in variant["source"]:
            variant["measured"] = by_folder[variant["id"]]
    CATALOGUE_JSON.write_text(json.dumps(catalogue, indent=1) + "\n")


if __name__ == "__main__":
    main()
