"""Evaluation: Dice on known masks, Wilcoxon and Holm on textbook numbers, case pairing, and the evaluate
command on the bundled demo model (real CT crops with their reference labels)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import bundled, tree_digest
from TuckerSegmentLib.cli import main
from TuckerSegmentLib.errors import CacheWarning, TuckerSegmentError, VolumeError
from TuckerSegmentLib.evaluation.cases import Scan, pair_scans, reference_labels
from TuckerSegmentLib.evaluation.report import JSON_NAME, pareto_plot
from TuckerSegmentLib.evaluation.run import evaluate
from TuckerSegmentLib.evaluation.saved import evaluation_curves, save_evaluation, saved_path
from TuckerSegmentLib.evaluation.statistics import dice_per_class, holm, wilcoxon
from TuckerSegmentLib.image.volume import Volume, volume_to_image
from TuckerSegmentLib.testing.demo_data import chest_sample

# Darwin's Zea mays: cross minus self-fertilised heights (eighths of an inch), the shared reference's check.
DARWIN = [6, 8, 14, 16, 23, 24, 28, 29, 41, -48, 49, 56, 60, -67, 75]
CLASSES = {1: "a", 2: "b", 3: "c"}


def test_dice_of_known_masks() -> None:
    prediction, reference = np.zeros((4, 5, 6), np.uint8), np.zeros((4, 5, 6), np.uint8)
    prediction.flat[:10] = 1  # 10 voxels of a
    reference.flat[6:12] = 1  # 6 voxels of a, 4 of them shared
    prediction.flat[20:23] = 2  # b only in the prediction: Dice 0
    dice = dice_per_class(prediction, reference, CLASSES)
    assert dice["a"] == pytest.approx(2 * 4 / (10 + 6))
    assert dice["b"] == 0.0
    assert math.isnan(dice["c"])  # in neither map: no Dice
    region = np.zeros_like(prediction, dtype=bool)
    region.flat[8:12] = True  # a: prediction 8, 9; reference 8..11
    assert dice_per_class(prediction, reference, CLASSES, region)["a"] == pytest.approx(2 * 2 / (2 + 4))


def test_wilcoxon_on_darwins_data() -> None:
    test = wilcoxon(DARWIN, [0] * len(DARWIN))
    assert test.statistic == 24  # ranks 10 + 14 of the two negative differences
    assert test.p == pytest.approx(0.0413, abs=5e-5)
    assert test.n == 15
    # paired values give the same test as their differences; a nan pair is left out
    assert wilcoxon([d + 100 for d in DARWIN] + [np.nan], [100] * 16).p == pytest.approx(test.p)


def test_wilcoxon_needs_six_cases_and_says_so() -> None:
    few = wilcoxon([0.5, 0.6, 0.7, 0.8, 0.9], [0.6, 0.7, 0.8, 0.9, 1.0])
    assert (few.n, few.p, few.note) == (5, None, "too few cases")
    same = wilcoxon([0.9] * 6, [0.9] * 6)
    assert (same.p, same.statistic) == (1.0, 0.0)


def test_holm_on_hand_made_p_values() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> monotone 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, None, 0.005]) == pytest.approx([0.03, 0.06, 0.06, None, 0.02])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1


def _write(volume: Volume, path: Path) -> Path:
    sitk.WriteImage(volume_to_image(volume), str(path))
    return path


def _crop(volume: Volume, k: slice, j: slice, i: slice) -> Volume:
    matrix = volume.ijk_to_ras.copy()
    matrix[:3, 3] += matrix[:3, :3] @ np.array([i.start or 0, j.start or 0, k.start or 0])
    return Volume(np.ascontiguousarray(volume.array[k, j, i]), matrix)


CROPS = [(slice(0, 34), slice(0, 80), slice(0, 80)), (slice(0, 34), slice(48, 128), slice(0, 80)),
         (slice(0, 34), slice(0, 80), slice(48, 128)), (slice(0, 34), slice(48, 128), slice(48, 128)),
         (slice(0, 20), slice(0, 128), slice(0, 128)), (slice(14, 34), slice(0, 128), slice(0, 128))]


@pytest.fixture(scope="module")
def demo_cases(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Six crops of the sample chest CT in nnU-Net naming, with their reference labels."""
    root = tmp_path_factory.mktemp("cases")
    sample = chest_sample()
    (root / "images").mkdir()
    (root / "labels").mkdir()
    for index, crop in enumerate(CROPS):
        _write(_crop(sample.ct, *crop), root / "images" / f"chest_{index:03d}_0000.nii.gz")
        labels = _crop(Volume(sample.labels.astype(np.uint8), sample.ct.ijk_to_ras), *crop)
        _write(labels, root / "labels" / f"chest_{index:03d}.nii.gz")
    return root / "images", root / "labels"


def test_cases_pair_by_nnunet_naming_and_by_name(tmp_path: Path, demo_cases: tuple[Path, Path]) -> None:
    images, labels = demo_cases
    scans = pair_scans(images, labels)
    assert [s.name for s in scans] == [f"chest_{i:03d}" for i in range(6)]
    assert all(Path(s.reference).name == f"{s.name}.nii.gz" for s in scans)
    plain = tmp_path / "plain"
    (plain / "img").mkdir(parents=True)
    (plain / "lab").mkdir()
    for name in ("a.nrrd", "b.nrrd"):
        (plain / "img" / name).write_bytes(b"x")
        (plain / "lab" / name).write_bytes(b"x")
    assert [(s.name, Path(s.reference).name) for s in pair_scans(plain / "img", plain / "lab")] == [
        ("a", "a.nrrd"), ("b", "b.nrrd")]


def test_case_pairing_refuses_what_cannot_be_scored(tmp_path: Path, demo_cases: tuple[Path, Path]) -> None:
    images, labels = demo_cases
    with pytest.raises(VolumeError, match="holds no NIfTI or NRRD"):
        pair_scans(tmp_path)
    with pytest.raises(VolumeError, match="does not exist"):
        pair_scans(tmp_path / "missing")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "chest_000.nii.gz").write_bytes((labels / "chest_000.nii.gz").read_bytes())
    with pytest.raises(VolumeError, match=r"no label file for chest_001, chest_002, chest_003 and 2 more"):
        pair_scans(images, partial)
    second = tmp_path / "second"
    second.mkdir()
    for name in ("x_0000.nii.gz", "x_0001.nii.gz"):
        (second / name).write_bytes(b"x")
    with pytest.raises(VolumeError, match="x_0001.nii.gz is input channel 1"):
        pair_scans(second)
    twice = tmp_path / "twice"
    twice.mkdir()
    for name in ("y.nii.gz", "y.nrrd"):
        (twice / name).write_bytes(b"x")
    with pytest.raises(VolumeError, match="two images"):
        pair_scans(twice)


def test_reference_labels_are_checked_against_image_and_model(tmp_path: Path) -> None:
    volume = Volume(np.zeros((4, 5, 6), np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    labels = np.zeros((4, 5, 6), np.uint8)
    assert reference_labels(Scan("s", volume, labels), volume, CLASSES, None) is not None
    with pytest.raises(VolumeError, match=r"label values \[9\]"):
        reference_labels(Scan("s", volume, np.full((4, 5, 6), 9, np.uint8)), volume, CLASSES, None)
    assert reference_labels(Scan("s", volume, np.full((4, 5, 6), 9, np.uint8)), volume, CLASSES, 9).max() == 9
    with pytest.raises(VolumeError, match=r"has \(4, 5, 5\) voxels"):
        reference_labels(Scan("s", volume, np.zeros((4, 5, 5), np.uint8)), volume, CLASSES, None)
    with pytest.raises(VolumeError, match="non-integer"):
        reference_labels(Scan("s", volume, np.full((4, 5, 6), 0.5)), volume, CLASSES, None)
    shifted = _write(Volume(labels, np.diag([2.0, 2.0, 3.5, 1.0])), tmp_path / "shifted.nii.gz")
    with pytest.raises(VolumeError, match="not on the grid"):
        reference_labels(Scan("s", volume, shifted), volume, CLASSES, None)


def test_evaluate_the_demo_model_with_its_variants(tmp_path: Path, demo_cases: tuple[Path, Path],
                                                   capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))  # the saved evaluation stays in this test
    images, labels = demo_cases
    original, balanced, uniform = (bundled(v) for v in ("chest-demo", "chest-demo-tucker-balanced",
                                                         "chest-demo-tucker-0.5"))
    before = tree_digest(balanced)
    out = tmp_path / "report"
    assert main(["evaluate", str(original), str(balanced), str(uniform), "--images", str(images), "--labels",
                 str(labels), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dice_per_class.png", "evaluation.json", "evaluation.md",
                                                    "pareto.png"]
    data = json.loads((out / JSON_NAME).read_text())
    assert data["cases"] == [f"chest_{i:03d}" for i in range(6)] and data["labelled"]
    first, second, third = data["models"]
    assert [m["curve"] for m in data["models"]] == ["original", "budget policy, activation-aware",
                                                     "uniform rule (paper)"]
    assert first["flops_fraction"] == 1.0 and second["flops_fraction"] < 0.6 and third["params"] < first["params"]
    assert all(len(m["seconds"]) == 6 and m["peak_memory_bytes"] > 0 for m in data["models"])
    # the original's Dice of one case, computed here from its own segmentation, is what the report holds
    assert main(["segment", str(images / "chest_000_0000.nii.gz"), str(tmp_path / "seg.nii.gz"), "--model",
                 str(original), "--quiet"]) == 0
    predicted = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "seg.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(labels / "chest_000.nii.gz")))
    assert first["dice"]["tissue"]["chest_000"] == pytest.approx(
        dice_per_class(predicted, reference, {7: "tissue"})["tissue"], abs=1e-4)
    # paired tests with six cases for classes every crop holds; the uniform 0.5 variant loses significantly
    tissue = third["tests"]["tissue"]
    assert tissue["n"] == 6 and tissue["p"] is not None and tissue["median_difference"] < 0
    assert second["pooled_agreement"] > third["pooled_agreement"]
    assert "| chest-demo-tucker-balanced |" in (out / "evaluation.md").read_text()
    assert tree_digest(balanced) == before
    # the panel finds the curves of this evaluation for the original model
    curves = evaluation_curves(original)
    assert set(curves) == {"budget policy, activation-aware", "uniform rule (paper)"}
    assert "wrote" in capsys.readouterr().out


def test_the_pareto_plot_holds_every_curve(tmp_path: Path) -> None:
    def model(curve: str, flops: float, dice: float) -> dict:
        return {"curve": curve, "flops_fraction": flops, "median_seconds": flops, "pooled_dice": dice,
                "pooled_agreement": dice}
    curves = ["original", "uniform rule (paper)", "budget policy, weight-only", "budget policy, activation-aware",
              "prune-l1", "prune-fpgm", "prune-taylor", "original (bf16)"]
    data = {"labelled": True, "models": [model(c, f, 0.5 + f / 3) for c in curves for f in (0.2, 0.3, 0.5)]}
    assert pareto_plot(data, tmp_path / "p.png") == curves
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_saved_evaluation_that_is_damaged_draws_nothing(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "plans.json").write_text("{}")
    data = {"models": [{"path": str(tmp_path / "m"), "curve": "original", "flops_fraction": 1.0,
                        "pooled_agreement": None},
                       {"path": "v", "curve": "prune-l1", "flops_fraction": 0.5, "pooled_agreement": 0.9}]}
    save_evaluation(data, tmp_path)
    assert evaluation_curves(tmp_path / "m", tmp_path) == {"prune-l1": [(0.5, 0.9)]}
    saved_path(tmp_path / "m", tmp_path).write_text("{not json")
    with pytest.warns(CacheWarning, match="is unreadable, or not an evaluation with the sha256 of its models"):
        assert evaluation_curves(tmp_path / "m", tmp_path) == {}


@pytest.mark.parametrize("case", ["out exists", "unknown label", "other structures", "another checkpoint", "rounds",
                                  "no images"])
def test_evaluate_refuses_bad_input_in_one_line(case: str, tmp_path: Path, demo_cases: tuple[Path, Path],
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    images, labels = demo_cases
    original, balanced = bundled("chest-demo"), bundled("chest-demo-tucker-balanced")
    out = tmp_path / "out"
    models = [str(original), str(balanced)]
    extra: list[str] = ["--labels", str(labels)]
    expected = ""
    if case == "out exists":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expected = "exists"
    elif case == "unknown label":
        bad = tmp_path / "bad"
        bad.mkdir()
        for path in labels.iterdir():
            image = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(image)
            array[0, 0, 0] = 42
            copy = sitk.GetImageFromArray(array)
            copy.CopyInformation(image)
            sitk.WriteImage(copy, str(bad / path.name))
        extra = ["--labels", str(bad)]
        expected = "label values [42]"
    elif case == "other structures":
        other = tmp_path / "other"
        import shutil
        shutil.copytree(balanced, other)
        dataset = next(other.rglob("dataset.json"))
        record = json.loads(dataset.read_text())
        record["labels"] = {("lung" if k == "left lung" else k): v for k, v in record["labels"].items()}
        dataset.write_text(json.dumps(record))
        models[1] = str(other)
        expected = "segments other structures"
    elif case == "another checkpoint":  # same plans and labels, another training run: not the variant's original
        import shutil

        import torch
        retrained = tmp_path / "retrained"
        shutil.copytree(original, retrained)
        checkpoint = next(retrained.rglob("checkpoint_final.pth"))
        saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
        first = next(iter(saved["network_weights"]))
        saved["network_weights"][first] = saved["network_weights"][first] + 1e-3
        torch.save(saved, checkpoint)
        models[0] = str(retrained)
        expected = "was compressed from another checkpoint than"
    elif case == "rounds":
        extra += ["--rounds", "0"]
        expected = "rounds must be a whole number"
    else:
        images = tmp_path / "empty"
        images.mkdir()
        expected = "holds no NIfTI or NRRD"
    code = main(["evaluate", *models, "--images", str(images), "--out", str(out), "--no-memory", "--quiet", *extra])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and expected in error[0]
    assert (not out.exists()) if case != "out exists" else [p.name for p in out.iterdir()] == ["keep.txt"]


def test_evaluate_refuses_labels_for_some_scans_only() -> None:
    sample = chest_sample()
    scans = [Scan("labelled", sample.ct, sample.labels), Scan("unlabelled", sample.ct)]
    with pytest.raises(TuckerSegmentError, match="labels for all or none"):
        evaluate(bundled("chest-demo"), [bundled("chest-demo-tucker-fast")], scans, memory=False)
