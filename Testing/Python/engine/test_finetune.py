"""Labelled fine-tuning with nnU-Net's own trainer (issue 21): a tiny nnU-Net raw data set written here, a few
iterations on the CPU; the loss goes down, the output loads and segments, the source stays byte-identical, an
interrupted run resumes, and bad data sets or options end in one line with nothing written."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import tree_digest
from TuckerSegmentLib.cli import main
from TuckerSegmentLib.image.volume import Volume
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.recovery.dataset import DatasetError, find_dataset
from TuckerSegmentLib.recovery.finetune import finetune_model_folder, state_dir
from TuckerSegmentLib.segment.predictor import Segmenter


SHAPE = (40, 40, 40)  # k, j, i at the tiny model's 3 mm: a little more than its 32³ patch
IGNORE = 4


def _case(rng: np.random.Generator, channels: int, labels: int) -> tuple[list[np.ndarray], np.ndarray]:
    """A CT-like volume with three box-shaped structures brighter than their surroundings (learnable), and a slab
    marked ``ignore``."""
    label = np.zeros(SHAPE, np.uint8)
    for value in range(1, labels + 1):
        start = rng.integers(2, 24, size=3)
        size = rng.integers(6, 14, size=3)
        label[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = value
    label[:, :, :3] = IGNORE
    image = rng.normal(-900, 60, SHAPE) + 400.0 * (label % IGNORE)
    return [image.astype(np.float32) + 5 * c for c in range(channels)], label


def write_raw_dataset(root: Path, name: str = "Dataset901_TinyCT", cases: int = 5, channels: int = 1,
                      labels: dict[str, int] | None = None, seed: int = 0) -> Path:
    """``root/<name>`` in nnU-Net raw format: imagesTr/<case>_000c.nii.gz, labelsTr/<case>.nii.gz, dataset.json."""
    labels = labels or {"background": 0, "structure_1": 1, "structure_2": 2, "structure_3": 3, "ignore": IGNORE}
    folder = root / name
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    for number in range(cases):
        images, label = _case(rng, channels, 3)
        for c, image in enumerate(images):
            itk = sitk.GetImageFromArray(image)
            itk.SetSpacing((3.0, 3.0, 3.0))
            sitk.WriteImage(itk, str(folder / "imagesTr" / f"case{number:02d}_{c:04d}.nii.gz"))
        itk = sitk.GetImageFromArray(label)
        itk.SetSpacing((3.0, 3.0, 3.0))
        sitk.WriteImage(itk, str(folder / "labelsTr" / f"case{number:02d}.nii.gz"))
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(c): "CT" if c == 0 else f"CT{c}" for c in range(channels)}, "labels": labels,
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return folder


@pytest.fixture(scope="module")
def raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nnUNet_raw")
    write_raw_dataset(root)
    return root


SMALL = {"epochs": 3, "iterations_per_epoch": 6, "lr": 3e-3, "device": "cpu", "data_workers": 0}


def test_finetune_lowers_the_loss_and_writes_a_model_that_segments(tiny_compressed: Path, tiny_model: Path, raw_root: Path,
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("nnUNet_raw", str(raw_root))
    before = tree_digest(tiny_compressed)
    messages: list[str] = []
    out = tmp_path / "finetuned"
    report = finetune_model_folder(tiny_compressed, "901", out, original=tiny_model,
                                   progress=lambda fraction, message: messages.append(message), **SMALL)
    assert tree_digest(tiny_compressed) == before  # the source is never modified
    assert report.train_losses[-1] < report.train_losses[0], report.train_losses
    assert [m for m in messages if m.startswith("epoch ")][-1].startswith("epoch 3/3: train loss")
    assert set(report.validation_dice) == {"original", "compressed", "finetuned"}
    assert set(report.validation_dice["finetuned"]) == {"structure_1", "structure_2", "structure_3"}
    record = json.loads((out / "fold_0" / "tucker.json").read_text())
    recovery = record["recovery"]
    assert recovery["method"] == "finetune" and recovery["dataset"] == "Dataset901_TinyCT"
    assert (recovery["epochs"], recovery["iterations_per_epoch"], recovery["lr"], recovery["device"]) == (3, 6, 3e-3,
                                                                                                          "cpu")
    assert recovery["seconds"] > 0 and recovery["validation_dice"] == report.validation_dice
    assert record["layers"] == json.loads((tiny_compressed / "fold_0" / "tucker.json").read_text())["layers"]
    training = out / "fold_0" / "training"
    assert (training / "progress.png").is_file() and list(training.glob("training_log_*.txt"))
    assert {"validation_original.json", "validation_compressed.json", "validation_finetuned.json"} <= {
        p.name for p in training.iterdir()}
    assert (out / "plans.json").read_bytes() == (tiny_compressed / "plans.json").read_bytes()
    assert not list(out.rglob("*.pth")) and not state_dir(out).exists()
    tuned, start = ModelFolder.open(out).load_network(0), ModelFolder.open(tiny_compressed).load_network(0)
    assert any((a != b).any() for a, b in zip(tuned.state_dict().values(), start.state_dict().values(), strict=True))
    image = sitk.ReadImage(str(raw_root / "Dataset901_TinyCT" / "imagesTr" / "case00_0000.nii.gz"))
    volume = Volume(sitk.GetArrayFromImage(image).astype(np.int16), np.diag([3.0, 3.0, 3.0, 1.0]))
    labels = Segmenter(out, device="cpu", runtime="torch").segment(volume).labels
    assert labels.shape == SHAPE and set(np.unique(labels)) <= {0, 1, 2, 3}


def test_an_interrupted_run_resumes_from_its_last_epoch(tiny_compressed: Path, raw_root: Path, tmp_path: Path) -> None:
    dataset = raw_root / "Dataset901_TinyCT"
    out = tmp_path / "resumed"

    def stop_after_first_epoch(fraction: float, message: str) -> None:
        if message.startswith("epoch 1/"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune_model_folder(tiny_compressed, dataset, out, progress=stop_after_first_epoch, **SMALL)
    state = state_dir(out)
    assert not out.exists() and (state / "resume" / "state.json").is_file()
    assert json.loads((state / "resume" / "state.json").read_text())["record"]["epochs_done"] == 1
    messages: list[str] = []
    report = finetune_model_folder(tiny_compressed, dataset, out, progress=lambda f, m: messages.append(m), **SMALL)
    assert report.resumed_from_epoch == 1 and len(report.train_losses) == 3
    assert not any(m.startswith("epoch 1/") for m in messages) and any(m.startswith("epoch 3/") for m in messages)
    assert "compressed" in report.validation_dice and not state.exists()
    assert ModelFolder.open(out).tucker_record(0)["recovery"]["resumed_from_epoch"] == 1


def _fails(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    try:
        code = main(argv)
    except SystemExit as stop:  # a usage mistake, refused by the argument parser
        code = stop.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_bad_data_sets_and_options_end_in_one_line_with_nothing_written(tiny_compressed: Path, raw_root: Path,
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_digest(tiny_compressed)
    out = tmp_path / "out"
    other_labels = write_raw_dataset(tmp_path / "raw", "Dataset902_Other", cases=2,
                                     labels={"background": 0, "liver": 1, "structure_2": 2, "structure_3": 3})
    two_channels = write_raw_dataset(tmp_path / "raw", "Dataset903_TwoChannels", cases=2, channels=2)
    bad_values = write_raw_dataset(tmp_path / "raw", "Dataset904_BadValues", cases=2,
                                   labels={"background": 0, "structure_1": 1, "structure_2": 2, "structure_3": 3})
    run = ["finetune", str(tiny_compressed), "--device", "cpu", "--epochs", "1", "--iterations-per-epoch", "1"]
    err = _fails([*run, "--dataset", str(other_labels), str(out)], capsys)
    assert "labels differ from the model's: missing or renumbered structure_1=1; not in the model liver=1" in err
    err = _fails([*run, "--dataset", str(two_channels), str(out)], capsys)
    assert "has 2 input channel(s)" in err and "the model 1" in err
    err = _fails([*run, "--dataset", str(bad_values), str(out)], capsys)  # value 4 without an "ignore" label
    assert "holds value(s) [4]" in err
    err = _fails([*run, "--dataset", "Dataset999_Missing", str(out)], capsys)
    assert "data set 'Dataset999_Missing' not found" in err
    err = _fails([*run, "--dataset", str(tmp_path / "nowhere"), str(out)], capsys)
    assert "not found" in err
    err = _fails([*run, "--dataset", str(raw_root / "Dataset901_TinyCT"), str(tiny_compressed)], capsys)
    assert "is the compressed model folder" in err
    err = _fails([*run, "--dataset", str(raw_root / "Dataset901_TinyCT"), "--epochs", "0", str(out)], capsys)
    assert "--epochs" in err and "at least 1" in err
    err = _fails(["finetune", str(other_labels), "--dataset", str(raw_root / "Dataset901_TinyCT"), str(out)], capsys)
    assert "Dataset902_Other" in err  # a data set is not a model folder
    assert not out.exists() and not state_dir(out).exists()
    assert tree_digest(tiny_compressed) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_data_sets_are_found_by_id_name_or_path(raw_root: Path, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.setenv("nnUNet_raw", str(raw_root))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    assert find_dataset("901").path == find_dataset("Dataset901_TinyCT").path == (raw_root / "Dataset901_TinyCT")
    assert find_dataset(raw_root / "Dataset901_TinyCT").kind == "raw"
    shutil.copytree(raw_root / "Dataset901_TinyCT", tmp_path / "copy")
    assert find_dataset(tmp_path / "copy").name == "copy"
    for wildcard in ("Dataset*", "Dataset90?_TinyCT", "Dataset[9]01_TinyCT"):  # never "whichever matched first"
        with pytest.raises(DatasetError, match=f"^data set '{re.escape(wildcard)}' not found: give a folder, a name"):
            find_dataset(wildcard)
    shutil.copytree(raw_root / "Dataset901_TinyCT", raw_root / "Dataset901_TinyCTagain")
    with pytest.raises(DatasetError, match="^data set id 901 names several folders in \\$nnUNet_raw: Dataset901_TinyCT, "
                                           "Dataset901_TinyCTagain; give the name or the folder"):
        find_dataset("901")
    assert find_dataset("Dataset901_TinyCTagain").name == "Dataset901_TinyCTagain"
    shutil.rmtree(raw_root / "Dataset901_TinyCTagain")
