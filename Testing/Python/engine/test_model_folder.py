"""nnU-Net v2 model folders: opening, checkpoints, compressed folders, and refusing bad input."""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tree_digest
from safetensors.torch import load_file
from torch import nn
from TuckerSegmentLib import ModelFolder, TuckerConv, UniformPolicy, compress_model_folder, compress_network, describe_model, load_network
from TuckerSegmentLib.errors import CheckpointError, ModelFolderError, OutputPathError, RankMismatchError
from TuckerSegmentLib.nnunet.checkpoint import load_checkpoint
from TuckerSegmentLib.testing.example_models import write_example_model


@pytest.fixture(scope="module")
def tiny_compressed(tiny_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compressed") / "tiny_uniform05"
    compress_model_folder(tiny_model, out, UniformPolicy(0.5, rank_min=2), folds=(0, 1), weight_only=True)
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / folder.name))


def test_open_reads_configuration_and_shapes(tiny_model):
    model = ModelFolder.open(tiny_model)
    assert (model.configuration, model.trainer_name, model.folds) == ("3d_fullres", "nnUNetTrainerNoMirroring", ["0", "1"])
    assert (model.patch_size, model.num_input_channels, model.num_outputs) == ((32, 32, 32), 1, 4)
    assert not model.compressed
    assert ModelFolder.open(tiny_model.parent).path == tiny_model  # a dataset folder with one trained model


@pytest.mark.filterwarnings("ignore:Detected old nnU-Net plans format")
def test_old_plans_format_builds_the_same_network(tmp_path):
    new = ModelFolder.open(write_example_model(tmp_path / "new", "Dataset291")).build_network()
    old_model = ModelFolder.open(write_example_model(tmp_path / "old", "Dataset291", old_format=True))
    assert "UNet_class_name" in json.loads((old_model.path / "plans.json").read_text())["configurations"]["3d_fullres"]
    old = old_model.build_network()
    assert {k: v.shape for k, v in old.state_dict().items()} == {k: v.shape for k, v in new.state_dict().items()}
    assert old_model.load_network(0) is not None


def test_nnunet_checkpoint_needs_numpy_allowlist_and_loads_with_it(tiny_model):
    path = tiny_model / "fold_0" / "checkpoint_final.pth"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    checkpoint = load_checkpoint(path)
    assert isinstance(checkpoint["logging"]["train_losses"][0], np.float32)
    assert checkpoint["trainer_name"] == "nnUNetTrainerNoMirroring"


def test_checkpoint_with_foreign_objects_needs_trust(tmp_path):
    path = tmp_path / "checkpoint_final.pth"
    torch.save({"network_weights": {}, "extra": Path("x")}, path)
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_checkpoint(path)
    with pytest.warns(UserWarning, match="fully unpickling"):
        assert load_checkpoint(path, trust=True)["extra"] == Path("x")


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_named_and_nothing_is_written(tiny_model, tmp_path, damage):
    source = _copy(tiny_model, tmp_path)
    checkpoint = source / "fold_0" / "checkpoint_final.pth"
    data = checkpoint.read_bytes()
    checkpoint.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"not a checkpoint" * 100, "empty": b""}[damage])
    before = tree_digest(source)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        compress_model_folder(source, tmp_path / "out", UniformPolicy(0.5))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert tree_digest(source) == before


def test_failure_in_a_later_fold_leaves_no_output(tiny_model, tmp_path):
    source = _copy(tiny_model, tmp_path)
    (source / "fold_1" / "checkpoint_final.pth").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError):
        compress_model_folder(source, tmp_path / "out", UniformPolicy(0.5), folds=(0, 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_weights_from_other_plans_are_refused(tiny_model, tmp_path):
    source = _copy(tiny_model, tmp_path)
    plans = json.loads((source / "plans.json").read_text())
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 64]
    (source / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="do not fit the architecture in plans.json"):
        load_network(source)


@pytest.mark.filterwarnings("ignore:Detected old nnU-Net plans format")
@pytest.mark.parametrize("layout, message", [
    ("missing", "does not exist"), ("empty", "no plans.json"), ("no_dataset", "no dataset.json"),
    ("bad_plans", "not readable JSON"), ("no_folds", "no trained fold"), ("not_plans", "are not nnU-Net v2 plans"),
    ("file", "is a file"),
])
def test_non_nnunet_folders_are_refused(tiny_model, tmp_path, layout, message):
    folder = tmp_path / "model"
    if layout == "file":
        folder.write_text("x")
    elif layout != "missing":
        folder.mkdir()
        if layout != "empty":
            shutil.copy(tiny_model / "plans.json", folder)
            shutil.copytree(tiny_model / "fold_0", folder / "fold_0")
        if layout not in ("empty", "no_dataset"):
            shutil.copy(tiny_model / "dataset.json", folder)
        if layout == "bad_plans":
            (folder / "plans.json").write_text("{not json")
        if layout == "no_folds":
            shutil.rmtree(folder / "fold_0")
        if layout == "not_plans":
            (folder / "plans.json").write_text(json.dumps({"configurations": {"3d_fullres": {"patch_size": [1]}}}))
    with pytest.raises(ModelFolderError, match=message):
        ModelFolder.open(folder)


def test_compressed_folder_layout_and_no_pickles(tiny_model, tiny_compressed):
    assert (tiny_compressed / "plans.json").read_bytes() == (tiny_model / "plans.json").read_bytes()
    assert (tiny_compressed / "dataset.json").read_bytes() == (tiny_model / "dataset.json").read_bytes()
    files = sorted(str(p.relative_to(tiny_compressed)) for p in tiny_compressed.rglob("*") if p.is_file())
    assert files == ["dataset.json", "fold_0/tucker.json", "fold_0/weights.safetensors",
                     "fold_1/tucker.json", "fold_1/weights.safetensors", "plans.json"]
    record = json.loads((tiny_compressed / "fold_0" / "tucker.json").read_text())
    assert record["policy"] == {"name": "uniform", "params": {"factor": 0.5, "rank_min": 2}}
    assert record["format_version"] == 2 and len(record["source"]["sha256"]) == 64
    assert record["after"]["params"] < record["before"]["params"]
    stem = record["layers"][0]
    assert (stem["name"], stem["form"], stem["rank_out"], stem["rank_in"]) == ("encoder.stages.0.0.convs.0.conv", "tucker2", 4, 1)
    model = ModelFolder.open(tiny_compressed)
    assert model.compressed and model.folds == ["0", "1"]


def test_aliases_are_stored_once_and_restored(tiny_compressed):
    stored = load_file(str(tiny_compressed / "fold_0" / "weights.safetensors"))
    network = load_network(tiny_compressed, 0)
    state = network.state_dict()
    aliases = set(state) - set(stored)
    assert aliases and all(".all_modules." in key or key.startswith("decoder.encoder.") for key in aliases)
    block = network.encoder.stages[0][0].convs[0]
    assert block.conv is block.all_modules[0] and isinstance(block.conv, TuckerConv)
    for key, tensor in stored.items():
        assert torch.equal(state[key], tensor)


def test_reloaded_compressed_model_is_bit_identical(tiny_model, tiny_compressed):
    network = ModelFolder.open(tiny_model).load_network(0)
    compress_network(network, UniformPolicy(0.5, rank_min=2))
    reloaded = load_network(tiny_compressed, 0)
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(network.eval()(x), reloaded(x))
    other_fold = load_network(tiny_compressed, 1)
    with torch.no_grad():
        assert not torch.equal(reloaded(x), other_fold(x))


def _edit_record(folder: Path, edit) -> None:
    path = folder / "fold_0" / "tucker.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))


@pytest.mark.parametrize("edit, error, message", [
    (lambda r: r["layers"][1].update(rank_in=999), RankMismatchError, "rank_in=999"),
    (lambda r: r["layers"][1].update(name="encoder.nothing"), RankMismatchError, "does not exist"),
    (lambda r: r["layers"][1].update(rank_out=3), RankMismatchError, "does not fit the layers"),
    (lambda r: r["layers"][1].update(rank_out="4"), RankMismatchError, "not an integer rank"),
    (lambda r: r["layers"][1].update(form="dense"), RankMismatchError, "contradicts ranks"),
    (lambda r: r.update(format_version=99), RankMismatchError, "upgrade TuckerSegment"),
    (lambda r: r.update(format_version="2"), RankMismatchError, "format_version '2', not a whole number from 1: the "
                                                                "record is damaged or was edited"),
    (lambda r: r.pop("weights_sha256"), RankMismatchError, "no valid weights_sha256 .* damaged or was edited"),
    (lambda r: r.update(weights_sha256="ab"), RankMismatchError, "no valid weights_sha256"),
    (lambda r: r["source"].pop("sha256"), RankMismatchError, "no valid source.sha256"),
    (lambda r: r.update(weights_sha256="0" * 64), CheckpointError, "does not match the sha256"),
])
def test_inconsistent_tucker_json_is_refused(tiny_compressed, tmp_path, edit, error, message):
    folder = _copy(tiny_compressed, tmp_path)
    _edit_record(folder, edit)
    with pytest.raises(error, match=message):
        load_network(folder, 0)


def test_missing_weights_file_is_named(tiny_compressed, tmp_path):
    folder = _copy(tiny_compressed, tmp_path)
    (folder / "fold_0" / "weights.safetensors").unlink()
    with pytest.raises(ModelFolderError, match="weights.safetensors is missing"):
        describe_model(folder)
    with pytest.raises(CheckpointError, match="weights.safetensors is missing"):
        load_network(folder, 0)


def test_weights_linked_from_outside_the_folder_are_refused(tiny_compressed, tmp_path):
    folder = _copy(tiny_compressed, tmp_path)
    weights = folder / "fold_0" / "weights.safetensors"
    elsewhere = tmp_path / "elsewhere.safetensors"
    weights.rename(elsewhere)
    weights.symlink_to(elsewhere)  # the very bytes recorded, but not the folder's own file
    with pytest.raises(CheckpointError, match=f"weights.safetensors is a link to {elsewhere}; a compressed folder "
                                              "holds its own weights"):
        load_network(folder, 0)


def test_compressed_folder_refuses_recompression(tiny_compressed, tmp_path):
    with pytest.raises(ModelFolderError, match="already compressed"):
        compress_model_folder(tiny_compressed, tmp_path / "again", UniformPolicy(0.5))


def test_output_paths_that_cannot_be_written(tiny_model, tiny_compressed, tmp_path):
    before = tree_digest(tiny_model)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    cases = [(existing, "already exists"), (tmp_path / "no" / "such" / "parent", "does not exist"),
             (tiny_model / "inside", "lies inside the model folder"), (Path("/proc/tuckersegment-out"), "cannot write")]
    for target, message in cases:
        with pytest.raises(OutputPathError, match=message):
            compress_model_folder(tiny_model, target, UniformPolicy(0.5))
    assert (existing / "keep.txt").read_text() == "mine" and list(existing.iterdir()) == [existing / "keep.txt"]
    assert tree_digest(tiny_model) == before


def test_overwrite_replaces_the_output_whole(tiny_model, tmp_path):
    out = tmp_path / "out"
    compress_model_folder(tiny_model, out, UniformPolicy(0.5), weight_only=True)
    (out / "stale.txt").write_text("old")
    compress_model_folder(tiny_model, out, UniformPolicy(0.3), overwrite=True, weight_only=True)
    assert not (out / "stale.txt").exists()
    assert json.loads((out / "fold_0" / "tucker.json").read_text())["policy"]["params"]["factor"] == 0.3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unknown_fold_is_named(tiny_model, tmp_path):
    with pytest.raises(ModelFolderError, match="no fold 3; available folds: 0, 1"):
        compress_model_folder(tiny_model, tmp_path / "out", UniformPolicy(0.5), folds=(3,))


def test_load_network_returns_eval_mode(tiny_model):
    network = load_network(tiny_model)
    assert isinstance(network, nn.Module) and not network.training
