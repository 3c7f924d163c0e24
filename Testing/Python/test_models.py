"""Model choice: a named folder, a bundled id, or auto (TotalSegmentator weights, else the bundled demo)."""
from __future__ import annotations

from pathlib import Path

import pytest

from TuckerSegmentLib.errors import ModelFolderError
from TuckerSegmentLib.models import TOTALSEGMENTATOR_FAST, auto_bundled, bundled_models, choose_model


def entry(model_id: str, flops: float, dice: float | None, policy="uniform") -> dict:
    return {"id": model_id, "path": Path(model_id), "policy": policy, "flops": flops, "mean_dice": dice}


def test_auto_takes_the_cheapest_variant_within_one_dice_point():
    entries = [entry("orig", 10e9, 0.900, "original"), entry("t0.7", 6e9, 0.895), entry("t0.5", 3e9, 0.891),
               entry("t0.3", 1e9, 0.850), entry("unmeasured", 0.5e9, None)]
    choice = auto_bundled(entries)
    assert choice.id == "t0.5"
    assert "3.0 vs 10.0 G" in choice.reason and "0.891" in choice.reason


def test_auto_keeps_the_original_when_every_variant_loses_accuracy():
    choice = auto_bundled([entry("orig", 10e9, 0.9, "original"), entry("t0.3", 1e9, 0.7)])
    assert choice.id == "orig" and "no compressed variant keeps" in choice.reason


def test_auto_without_any_bundled_model_says_how_to_fix_it():
    with pytest.raises(ModelFolderError, match="pass --model"):
        auto_bundled([])


def test_auto_prefers_installed_totalsegmentator_weights(tmp_path, monkeypatch):
    folder = tmp_path / "nnunet" / "results" / TOTALSEGMENTATOR_FAST[0] / TOTALSEGMENTATOR_FAST[1]
    (folder / "fold_0").mkdir(parents=True)
    (folder / "plans.json").write_text("{}")
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    assert choose_model("auto").id != "totalsegmentator-fast"  # no weights file yet: not usable
    (folder / "fold_0" / "checkpoint_final.pth").write_bytes(b"weights")
    choice = choose_model("auto")
    assert choice.id == "totalsegmentator-fast" and choice.path == folder
    assert str(tmp_path / "nnunet" / "results") in choice.reason


def test_bundled_models_are_listed_with_measurements():
    entries = bundled_models()
    assert entries, "the bundled demo model is missing: run scripts/train_demo_model.py + build_demo_variants.py"
    original = [e for e in entries if e["policy"] == "original"]
    assert len(original) == 1 and len(entries) >= 4
    for e in entries:
        assert e["path"].is_dir() and 0 < e["mean_dice"] <= 1 and e["flops"] > 0
        assert e["policy"] == "original" or e["flops"] < original[0]["flops"]
    assert choose_model(entries[1]["id"]).path == entries[1]["path"]


def test_named_folder_and_unknown_names(tmp_path):
    assert choose_model(tmp_path).path == tmp_path
    with pytest.raises(ModelFolderError, match="no such folder and no bundled model"):
        choose_model("no-such-model")
