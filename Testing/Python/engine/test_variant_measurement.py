"""Variants measured on the user's machine: agreement per structure, the rule auto applies to it, held-out
separation of calibration and scored CTs, and builds that measure (TotalSegmentator-shaped 3 mm and 6 mm
folders with random weights, small CTs)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from TuckerSegmentLib.checksums import SEAL, sealed
from TuckerSegmentLib.cli import main
from TuckerSegmentLib.errors import ModelFolderError
from TuckerSegmentLib.image.volume import Volume, volume_to_image
from TuckerSegmentLib.testing.demo_data import chest_sample
from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task
from TuckerSegmentLib.variants import measured as measured_module
from TuckerSegmentLib.variants.agreement import Overlap, ground_truth_verdict, verdict
from TuckerSegmentLib.variants.catalogue import MANIFEST, catalogue, find_variant, load_catalogue, variant_dir
from TuckerSegmentLib.variants.choice import choose_model
from TuckerSegmentLib.runtime.hardware import GB, DeviceInfo, cpu_device
from TuckerSegmentLib.variants.measure import plan_measurement
from TuckerSegmentLib.variants.measured import measurement_context
from TuckerSegmentLib.variants.selection import qualifies, select_variant

CPU = DeviceInfo("cpu", "CPU", 32 * GB, 16 * GB, cores=2)


def write_part(path: Path, k: slice) -> Path:
    """Slices ``k`` of the sample chest CT (its geometry kept) as a CT file."""
    ct = chest_sample().ct
    matrix = ct.ijk_to_ras.copy()
    matrix[:3, 3] = ct.ijk_to_ras[:3, :3] @ np.array([0, 0, k.start]) + ct.ijk_to_ras[:3, 3]
    sitk.WriteImage(volume_to_image(Volume(ct.array[k], matrix)), str(path))
    return path


def structures(**dice_and_voxels: tuple[float, int]) -> dict:
    return {name: {"dice": dice, "voxels": voxels} for name, (dice, voxels) in dice_and_voxels.items()}


def test_agreement_is_dice_per_structure_pooled_over_volumes_inside_the_scored_region():
    original = np.array([[1, 1, 2, 0], [1, 1, 2, 2]])
    variant = np.array([[1, 0, 2, 0], [1, 1, 1, 2]])
    overlap = Overlap()
    overlap.add(variant, original, {1: "a", 2: "b", 3: "c"})
    region = np.array([[True, True, False, False], [False, False, True, True]])
    overlap.add(variant, original, {1: "a", 2: "b", 3: "c"}, region)
    found = overlap.structures()
    # a: original 4+2, variant 4+2, both 3+1 -> 8/12; b: original 3+2, variant 2+1, both 2+1 -> 6/8; c: never labelled
    assert found == {"a": {"dice": 0.6667, "voxels": 6}, "b": {"dice": 0.75, "voxels": 5}}


def test_the_rule_needs_the_mean_and_every_large_structure():
    assert verdict(structures(liver=(0.99, 50000), spleen=(0.98, 8000)))[0]
    ok, text = verdict(structures(liver=(0.99, 50000), spleen=(0.98, 8000), adrenal=(0.85, 1500)))
    assert not ok and "adrenal below 0.90" in text  # mean 0.94 < 0.97 too, but the structure is named
    ok, text = verdict(structures(**{f"s{i}": (0.99, 5000) for i in range(20)}, adrenal=(0.85, 1500)))
    assert not ok and "lowest 0.850, adrenal" in text and "adrenal below 0.90" in text  # mean 0.983 passes
    assert verdict(structures(**{f"s{i}": (0.99, 5000) for i in range(20)}, adrenal=(0.85, 999)))[0]  # too small
    assert not verdict(structures(liver=(0.96, 50000)))[0]
    assert not verdict({})[0]


def test_where_reference_labels_exist_the_held_out_dice_decides():
    def scored(**items: tuple[float, float, int]) -> dict:
        return {name: {"dice": d, "original_dice": o, "voxels": n} for name, (d, o, n) in items.items()}
    ok, text = ground_truth_verdict(scored(lung=(0.80, 0.78, 30000), ribs=(0.76, 0.77, 4000)), 0.01)
    assert ok and text == "held-out Dice loss -0.5 points (largest 1.0, ribs)"
    ok, text = ground_truth_verdict(scored(lung=(0.70, 0.78, 30000), ribs=(0.80, 0.77, 4000)), 0.01)
    assert not ok and "over the 1-point limit" in text  # mean loss 2.5 points
    ok, text = ground_truth_verdict(scored(lung=(0.95, 0.78, 30000), ribs=(0.60, 0.77, 4000)), 0.01)
    assert not ok and text.endswith("ribs loses more than 10 points")  # the mean gains 0 points
    assert ground_truth_verdict(scored(lung=(0.95, 0.78, 30000), ribs=(0.60, 0.77, 999)), 0.01)[0]  # too small


def measured(device: DeviceInfo, speedup: float, **dice_and_voxels: tuple[float, int]) -> dict:
    found = structures(**dice_and_voxels)
    return {"how": "held-out blocks of 1 of your CTs (calibrated on the other blocks)", "volumes": 1,
            "structures": found, "mean_agreement": float(np.mean([s["dice"] for s in found.values()])),
            "speedup": speedup, "seconds": 10 / speedup, "original_seconds": 10.0,
            "context": measurement_context(device), "device_kind": device.kind}


def fastest_built(**measurements: dict | None) -> list:
    """The real catalogue's ``fastest`` task as if installed, with the named variants built and measured."""
    return [replace(v, availability="built", measured=measurements.get(v.id)) for v in load_catalogue()
            if v.task == "fastest" and (v.original or v.id in measurements)]


def test_a_variant_below_the_per_structure_floor_is_never_auto_however_fast():
    many = {f"s{i}": (0.99, 5000) for i in range(20)}
    weak = fastest_built(**{"fastest-tucker-0.3": measured(CPU, 3.0, **many, liver=(0.85, 20000)),
                            "fastest-tucker-0.7": measured(CPU, 1.2, **many, liver=(0.97, 20000))})
    chosen = select_variant(weak, [CPU], "fastest")
    assert chosen.variant.id == "fastest-tucker-0.7"
    assert "1.20x faster than the original (measured here in" in chosen.reason and "agreement 0.989" in chosen.reason
    assert "of your CTs" in chosen.reason
    alone = [v for v in weak if v.id != "fastest-tucker-0.7"]
    assert select_variant(alone, [CPU], "fastest").variant.id == "fastest"
    ok, why = qualifies(next(v for v in alone if not v.original), CPU)
    assert not ok and "liver below 0.90" in why
    user = select_variant(alone, [CPU], "fastest", preference="fastest-tucker-0.3")  # the user may still choose it
    assert user.variant.id == "fastest-tucker-0.3" and "NOT within auto's limits" in user.reason


def test_published_or_unmeasured_variants_are_never_auto():
    variants = [replace(v, availability="built") for v in load_catalogue() if v.task == "total"]
    assert any(v.quality["kind"] == "published" and v.dice_loss() == 0 for v in variants if not v.original)
    assert select_variant(variants, [CPU], "total").variant.id == "total"
    published = next(v for v in variants if v.id == "total-tucker-0.7")
    assert qualifies(published, CPU) == (False, "not measured on this machine (only a published figure; run: "
                                                "tuckersegment build-variants --variant total-tucker-0.7)")


def test_a_measurement_from_another_runtime_device_or_engine_does_not_count(monkeypatch):
    many = {f"s{i}": (0.99, 5000) for i in range(5)}
    good = measured(CPU, 2.0, **many)
    variants = fastest_built(**{"fastest-tucker-0.5": good})
    assert select_variant(variants, [CPU], "fastest").variant.id == "fastest-tucker-0.5"
    older = {**good, "context": {**good["context"], "engine": "0.0.1"}}
    variants = fastest_built(**{"fastest-tucker-0.5": older})
    assert select_variant(variants, [CPU], "fastest").variant.id == "fastest"
    ok, why = qualifies(variants[-1], CPU)
    assert not ok and "engine 0.0.1 -> " in why and "build-variants --variant fastest-tucker-0.5" in why
    variants = fastest_built(**{"fastest-tucker-0.5": good})
    monkeypatch.setattr(measured_module, "openvino_missing", lambda: "OpenVINO is not installed")
    assert select_variant(variants, [CPU], "fastest").variant.id == "fastest"  # PyTorch would run it now
    assert "runtime OpenVINO" in qualifies(variants[-1], CPU)[1]
    monkeypatch.undo()
    other_cpu = replace(CPU, cores=64)
    assert "device " in qualifies(variants[-1], other_cpu)[1]


def test_one_ct_is_split_into_calibration_and_scored_blocks_that_never_meet(tmp_path):
    plan = plan_measurement([write_part(tmp_path / "a.nrrd", slice(0, 20))])
    (calibration,), (scored,) = plan.calibration, plan.scored
    assert calibration.mask.shape == scored.region.shape == scored.volume.array.shape == (20, 128, 128)
    assert not np.any(calibration.mask & scored.region) and np.all(calibration.mask | scored.region)
    assert 0.45 < scored.region.mean() < 0.55 and calibration.volume is scored.volume
    assert plan.record == {"source": "user", "calibration": [str((tmp_path / "a.nrrd").resolve())], "holdout": []}
    default = plan_measurement()
    assert default.record["source"] == "sample" and "sample chest CT" in default.how
    assert not np.any(default.calibration[0].mask & default.scored[0].region)


def test_held_out_cts_are_scored_whole_and_never_calibrated_on(tmp_path):
    a, b = write_part(tmp_path / "a.nrrd", slice(0, 17)), write_part(tmp_path / "b.nii.gz", slice(17, 34))
    plan = plan_measurement([a], [b])
    assert [c.mask for c in plan.calibration] == [None] and [s.region for s in plan.scored] == [None]
    assert plan.calibration[0].volume.array.shape == plan.scored[0].volume.array.shape == (17, 128, 128)
    assert not np.array_equal(plan.calibration[0].volume.array, plan.scored[0].volume.array)
    assert plan.scored[0].name == "b.nii.gz" and "never used for calibration" in plan.how


def test_repeated_missing_or_unpaired_cts_are_refused(tmp_path, ts_home, capsys):
    a = write_part(tmp_path / "a.nrrd", slice(0, 17))
    copy = write_part(tmp_path / "copy.nrrd", slice(0, 17))  # the same scan under another name
    for calibration, holdout, message in (([a], [a], "is the same CT as"), ([a], [copy], "is the same CT as"),
                                          ([a, copy], [], "is the same CT as"), ([], [a], "--holdout needs --calibration"),
                                          ([tmp_path / "none.nrrd"], [], "does not exist")):
        with pytest.raises(ModelFolderError, match=message):
            plan_measurement(calibration, holdout)
    write_totalsegmentator_task(ts_home, "fastest", divisor=8)
    assert main(["build-variants", "--variant", "fastest-tucker-0.5", "--calibration", str(a), "--holdout", str(a)]) == 2
    assert "is the same CT as" in capsys.readouterr().err
    assert not variant_dir(find_variant(catalogue(), "fastest-tucker-0.5")).exists()  # refused before any work
    assert main(["build-variants", "--variant", "fastest-tucker-0.5", "--device", "quantum"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "unknown device 'quantum'" in error and "Traceback" not in error
    assert not variant_dir(find_variant(catalogue(), "fastest-tucker-0.5")).exists()


def unseal(record: dict) -> dict:
    return {key: value for key, value in record.items() if key != SEAL}


def test_build_variants_measures_on_held_out_cts_and_remeasures_when_the_engine_changes(ts_home, tmp_path, capsys):
    write_totalsegmentator_task(ts_home, "fastest", divisor=8)
    a, b = write_part(tmp_path / "a.nrrd", slice(0, 17)), write_part(tmp_path / "b.nrrd", slice(17, 34))
    assert main(["build-variants", "--variant", "fastest-tucker-0.5", "--calibration", str(a), "--holdout", str(b),
                 "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    variant = find_variant(catalogue(), "fastest-tucker-0.5")
    manifest = json.loads((variant_dir(variant) / MANIFEST).read_text())
    found = manifest["measurement"]
    assert manifest["calibration"] == {"source": "user", "calibration": [str(a.resolve())],
                                       "holdout": [str(b.resolve())], "weight_only": True}
    assert found["volumes"] == 1 and found["how"] == "1 of your CTs never used for calibration"
    assert found["structures"] and all(0 <= s["dice"] <= 1 and s["voxels"] >= 0 for s in found["structures"].values())
    assert found["mean_agreement"] == pytest.approx(np.mean([s["dice"] for s in found["structures"].values()]), abs=1e-4)
    assert found["seconds"] > 0 and found["original_seconds"] > 0
    assert found["speedup"] == pytest.approx(found["original_seconds"] / found["seconds"], rel=0.01)
    assert found["peak_memory_bytes"] > 0 and found["original_peak_memory_bytes"] > 0
    assert found["context"] == measurement_context(cpu_device()) and "OpenVINO" in found["timing"]
    assert variant.measured == found and variant.params == manifest["models"][0]["params"]
    ok, quality = qualifies(variant, cpu_device())
    assert f"agreement {found['mean_agreement']:.3f}" in quality and "1 of your CTs never used" in quality
    assert f"fastest-tucker-0.5: built in {variant_dir(variant)}; {quality}" in printed
    assert ("auto may choose it" if ok else "auto will not choose it") in printed
    chosen = choose_model("fastest-tucker-0.5", variants=catalogue(), devices=[cpu_device()])
    assert f"agreement {found['mean_agreement']:.3f}" in chosen.reason
    # the engine that measured it changes: auto drops it, and the next build measures it again on the same CTs
    manifest["measurement"]["context"]["engine"] = "0.0.1"
    (variant_dir(variant) / MANIFEST).write_text(json.dumps(sealed(unseal(manifest))))  # as an older engine wrote it
    assert "engine 0.0.1 -> " in qualifies(find_variant(catalogue(), "fastest-tucker-0.5"), cpu_device())[1]
    assert main(["build-variants", "--variant", "fastest-tucker-0.5", "--device", "cpu"]) == 0
    assert "measuring again (engine 0.0.1 -> " in capsys.readouterr().err
    again = find_variant(catalogue(), "fastest-tucker-0.5").measured
    assert again["context"] == measurement_context(cpu_device()) and again["structures"] == found["structures"]
    # the CTs it was measured on are gone: a stale measurement says how to build it again
    manifest = json.loads((variant_dir(variant) / MANIFEST).read_text())
    manifest["measurement"]["context"]["engine"] = "0.0.1"
    (variant_dir(variant) / MANIFEST).write_text(json.dumps(sealed(unseal(manifest))))
    b.unlink()
    assert main(["build-variants", "--variant", "fastest-tucker-0.5"]) == 2
    assert "are gone" in capsys.readouterr().err


def test_a_3mm_build_without_cts_measures_on_the_sample_blocks_and_lists_its_figures(ts_home, capsys):
    write_totalsegmentator_task(ts_home, "fast", divisor=8)
    assert main(["build-variants", "--variant", "fast-tucker-0.7", "--no-measure", "--quiet"]) == 0
    variant = find_variant(catalogue(), "fast-tucker-0.7")
    assert variant.availability == "built" and variant.measured is None
    assert qualifies(variant, CPU) == (False, "not measured on this machine (only a published figure; run: "
                                              "tuckersegment build-variants --variant fast-tucker-0.7)")
    capsys.readouterr()
    assert main(["build-variants", "--variant", "fast-tucker-0.7", "--quiet"]) == 0  # measured, not rebuilt
    variant = find_variant(catalogue(), "fast-tucker-0.7")
    assert variant.measured["how"] == "held-out blocks of the bundled sample chest CT (calibrated on the other blocks)"
    assert json.loads((variant_dir(variant) / MANIFEST).read_text())["calibration"]["source"] == "sample"
    capsys.readouterr()
    assert main(["variants", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["variants"] if r["id"] == "fast-tucker-0.7")
    assert row["measured"]["mean_agreement"] == variant.measured["mean_agreement"]
    assert row["auto_quality"].startswith(f"agreement {variant.measured['mean_agreement']:.3f}")
    assert main(["variants"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("fast-tucker-0.7 "))
    assert f"agree {variant.measured['mean_agreement']:.3f}" in line and f"{variant.measured['speedup']:.2f}x" in line


def test_the_panel_builds_the_chosen_variant_or_the_task_defaults(ts_home):
    from TuckerSegmentLib.errors import TuckerSegmentError
    from TuckerSegmentLib.variants.panel import build_targets
    write_totalsegmentator_task(ts_home, "fastest", divisor=8)
    variants = catalogue()
    assert build_targets("fastest", "fastest-tucker-0.3", variants) == ["fastest-tucker-0.3"]
    assert build_targets("fastest", "auto", variants) == ["fastest-tucker-balanced", "fastest-tucker-fast"]
    assert build_targets("fastest", "fastest", variants) == ["fastest-tucker-balanced", "fastest-tucker-fast"]
    for task, variant in (("fast", "auto"), ("demo", "auto"), ("folder:/models/mine", "/models/mine")):
        with pytest.raises(TuckerSegmentError, match="choose a TotalSegmentator task whose weights are installed"):
            build_targets(task, variant, variants)
