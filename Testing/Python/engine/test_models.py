"""Model choice: a named folder, a variant id, or auto (the catalogue and this machine's devices)."""
from __future__ import annotations

import pytest
from TuckerSegmentLib.errors import DeviceError, ModelFolderError
from TuckerSegmentLib.variants.catalogue import catalogue
from TuckerSegmentLib.variants.choice import bundled_models, choose_model, usable_devices
from TuckerSegmentLib.runtime.hardware import GB, DeviceInfo

CPU = DeviceInfo("cpu", "CPU", 16 * GB, 8 * GB, cores=4)


def test_bundled_models_are_listed_with_measurements():
    entries = bundled_models()
    assert entries, "the bundled demo model is missing: run scripts/train_demo_model.py + build_demo_variants.py"
    original = [e for e in entries if e["policy"] == "original"]
    assert len(original) == 1 and len(entries) >= 4
    for e in entries:
        assert e["path"].is_dir() and 0 < e["mean_dice"] <= 1 and e["flops"] > 0
        assert e["policy"] == "original" or e["flops"] < original[0]["flops"]
    assert choose_model(entries[1]["id"], devices=[CPU]).folders == (entries[1]["path"],)


def test_auto_without_totalsegmentator_runs_the_measured_demo_variant(monkeypatch, tmp_path):
    """Of the bundled demo variants, the balanced one is measured faster with held-out Dice within 1 point
    (models.json): auto takes it and says why with the figures."""
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    entries = {e["id"]: e for e in bundled_models()}
    balanced = entries["chest-demo-tucker-balanced"]
    assert balanced["mean_dice"] >= entries["chest-demo"]["mean_dice"] - 0.01 and balanced["measurement"]["speedup"] > 1
    choice = choose_model("auto", devices=[CPU])
    assert choice.id == "chest-demo-tucker-balanced" and choice.device == "cpu" and choice.label_maps is None
    assert choice.reason.startswith("demo / chest-demo-tucker-balanced: CPU, 8.0 GiB free, needs")
    assert f"{balanced['measurement']['speedup']:.2f}x faster than the original (measured on" in choice.reason
    loss = 100 * (entries["chest-demo"]["mean_dice"] - balanced["mean_dice"])
    assert f"held-out Dice loss {loss:.1f} points" in choice.reason and "fast is not ready here" in choice.reason


def test_named_folder_and_unknown_names(tmp_path):
    choice = choose_model(tmp_path, devices=[CPU])
    assert choice.folders == (tmp_path,) and choice.selection is None
    with pytest.raises(ModelFolderError, match="no such folder and no variant of that id"):
        choose_model("no-such-model", devices=[CPU])


def test_device_requests_that_cannot_be_met_are_errors():
    assert usable_devices("cpu", [CPU]) == [CPU]
    with pytest.raises(DeviceError, match="device cuda requested but not found"):
        usable_devices("cuda", [CPU])
    gpu = DeviceInfo("cuda", "GPU", 8 * GB, 7 * GB, (8, 6), index=1)
    assert usable_devices("cuda:1", [gpu, CPU]) == [gpu]
    for bad in ("gpu", "cuda:x", "mps:0"):
        with pytest.raises(DeviceError, match="unknown device"):
            usable_devices(bad, [gpu, CPU])
    with pytest.raises(DeviceError, match="not ready|not found"):
        choose_model("chest-demo", device="mps", devices=[CPU], variants=catalogue())
