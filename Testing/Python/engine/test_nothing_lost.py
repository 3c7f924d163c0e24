"""Nothing deleted, nothing wrong with exit 0 (the second hostile-input sweep's four data-losing defects): names read
from files that become paths are plain names, and no command writes over, inside or around anything it reads."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import SimpleITK as sitk
from conftest import tree_digest
from test_distill import phantom
from test_finetune import write_raw_dataset
from TuckerSegmentLib import ModelFolder, cli
from TuckerSegmentLib.recovery.dataset import DatasetError, check_dataset, find_dataset, prepare_dataset
from TuckerSegmentLib.recovery.finetune import state_dir
from TuckerSegmentLib.image.volume import volume_to_image
from TuckerSegmentLib.checksums import sealed
from TuckerSegmentLib.errors import CacheWarning, ModelFolderError
from TuckerSegmentLib.variants import build as variant_build
from TuckerSegmentLib.evaluation.saved import evaluation_curves, save_evaluation
from TuckerSegmentLib.runtime.latency import LatencyTable
from TuckerSegmentLib.variants.catalogue import (MANIFEST, Variant, find_variant, load_catalogue, read_manifest,
                                                 variant_dir)

@pytest.fixture(scope="module")
def raw_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("nnUNet_raw")
    write_raw_dataset(root)
    return root


FINETUNE = ["finetune", "--device", "cpu", "--epochs", "1", "--iterations-per-epoch", "1", "--quiet"]


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ct") / "phantom.nii.gz"
    sitk.WriteImage(volume_to_image(phantom()), str(path))
    return path


def one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the CLI; expect exit status 2 and one error line, which is returned."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tuckersegment: error:"), err
    return err


def victim_folder(root: Path) -> Path:
    victim = root / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    return victim


def with_plans(folder: Path, target: Path, **fields: object) -> Path:
    """A copy of a model folder whose plans.json has ``fields`` replaced."""
    shutil.copytree(folder, target)
    plans = json.loads((target / "plans.json").read_text())
    plans.update(fields)
    (target / "plans.json").write_text(json.dumps(plans))
    return target


@pytest.mark.parametrize("name", ["absolute", "parent"])
def test_finetune_never_touches_the_folder_a_hostile_dataset_name_names(tiny_compressed, raw_root, tmp_path, capsys,
                                                                        name):
    """Before: finetune removed (rmtree) and refilled ``<state>/preprocessed/<dataset_name>``, anywhere."""
    victim = victim_folder(tmp_path)
    hostile = str(victim) if name == "absolute" else "../../victim"
    model = with_plans(tiny_compressed, tmp_path / "models" / "compressed", dataset_name=hostile)
    out = tmp_path / "models" / "out"
    err = one_line([*FINETUNE, str(model), "--dataset", str(raw_root / "Dataset901_TinyCT"), str(out)], capsys)
    assert "plans.json: dataset_name is" in err and "not a plain name" in err
    assert (victim / "precious.txt").read_text() == "keep me" and [p.name for p in victim.iterdir()] == ["precious.txt"]
    assert not out.exists() and not state_dir(out).exists()


def test_data_set_names_that_become_file_names_are_plain(tiny_compressed, tmp_path, capsys):
    victim = victim_folder(tmp_path)
    out = tmp_path / "out"
    run = [*FINETUNE, str(tiny_compressed)]
    ending = write_raw_dataset(tmp_path / "raw", "Dataset905_Ending", cases=2)
    dataset = json.loads((ending / "dataset.json").read_text())
    (ending / "dataset.json").write_text(json.dumps({**dataset, "file_ending": "/../../victim/x"}))
    assert "file_ending '/../../victim/x', not a file suffix" in one_line([*run, "--dataset", str(ending), str(out)],
                                                                          capsys)
    cases = write_raw_dataset(tmp_path / "raw", "Dataset907_Cases", cases=2)
    dataset = json.loads((cases / "dataset.json").read_text())
    image, label = cases / "imagesTr" / "case00_0000.nii.gz", cases / "labelsTr" / "case00.nii.gz"
    dataset["dataset"] = {"../../victim/x": {"images": [str(image)], "label": str(label)}}
    (cases / "dataset.json").write_text(json.dumps(dataset))
    assert "names a case '../../victim/x'" in one_line([*run, "--dataset", str(cases), str(out)], capsys)
    splits = write_raw_dataset(tmp_path / "raw", "Dataset906_Splits", cases=2)
    (splits / "splits_final.json").write_text(json.dumps([{"train": ["case00"], "val": [str(victim / "x")]}]))
    assert "naming only the data set's cases" in one_line([*run, "--dataset", str(splits), str(out)], capsys)
    assert [p.name for p in victim.iterdir()] == ["precious.txt"]
    assert not out.exists() and not state_dir(out).exists()


def test_a_configuration_name_that_climbs_is_refused(tiny_model, tmp_path):
    plans = json.loads((tiny_model / "plans.json").read_text())
    model = with_plans(tiny_model, tmp_path / "model", configurations={
        **plans["configurations"], "../x": plans["configurations"]["3d_fullres"]})
    with pytest.raises(ModelFolderError, match=r"configuration name is '\.\./x', not a plain name"):
        ModelFolder.open(model, configuration="../x")


def test_a_tucker_record_naming_weights_outside_its_fold_is_never_reused(tiny_compressed, tmp_path):
    """An interrupted variant build keeps a finished model only when its record's names stay inside it."""
    target = tmp_path / "built"
    shutil.copytree(tiny_compressed, target)
    record_file = target / "fold_0" / "tucker.json"
    record = json.loads(record_file.read_text())
    (target / variant_build.BUILD_RECORD).write_text(json.dumps({"calibration": "same"}))
    source = record["source"]["sha256"]
    assert variant_build._reusable(target, source, {"calibration": "same"})
    weights = target / "fold_0" / record["weights"]
    shutil.copy2(weights, tmp_path / "outside.safetensors")  # the same bytes outside: only the names can refuse
    shutil.copy2(weights, tmp_path / record["weights"])
    for field, value in (("weights", "../../outside.safetensors"), ("fold", "0/../..")):
        record_file.write_text(json.dumps({**record, field: value}))
        assert not variant_build._reusable(target, source, {"calibration": "same"})


def test_a_manifest_naming_files_outside_its_variant_is_not_a_build(tmp_path):
    variant = find_variant(load_catalogue(), "fast-tucker-0.7")
    folder = variant_dir(variant, tmp_path)
    victim = victim_folder(tmp_path)
    (folder / "model").mkdir(parents=True)
    size = (victim / "precious.txt").stat().st_size  # the named files exist with these sizes: only names can refuse
    for name, files in (("../../victim", {"precious.txt": size}), ("model", {"../../../victim/precious.txt": size})):
        manifest = {"id": variant.id, "policy": variant.policy,
                    "models": [{"folder": name, "files": {f: {"bytes": b, "sha256": "0"} for f, b in files.items()}}]}
        (folder / MANIFEST).write_text(json.dumps(sealed(manifest)))  # sealed: only the names can refuse it
        assert read_manifest(variant, tmp_path) is None


def written_manifest(root: Path) -> tuple[Variant, Path]:
    """A variant 'built' in ``root``: one model file and its sealed manifest with a measurement."""
    variant = find_variant(load_catalogue(), "fast-tucker-0.7")
    folder = variant_dir(variant, root)
    (folder / "Dataset297" / "fold_0").mkdir(parents=True)
    (folder / "Dataset297" / "fold_0" / "weights.safetensors").write_bytes(b"weights")
    manifest = {"id": variant.id, "policy": variant.policy, "measurement": {"mean_agreement": 0.52},
                "models": [{"folder": "Dataset297", "files": {"fold_0/weights.safetensors": {"bytes": 7, "sha256": "0"}}}]}
    (folder / MANIFEST).write_text(json.dumps(sealed(manifest), indent=1))
    return variant, folder / MANIFEST


def test_measured_figures_changed_in_place_are_not_believed(tiny_model, tmp_path):
    variant, manifest = written_manifest(tmp_path)
    assert read_manifest(variant, tmp_path)["measurement"] == {"mean_agreement": 0.52}
    manifest.write_text(manifest.read_text().replace("0.52", "0.99"))  # a better agreement, same size
    with pytest.warns(CacheWarning, match=r"variant.json changed since it was written \(checksum mismatch\)"):
        assert read_manifest(variant, tmp_path) is None  # not built: auto never chooses it on that figure
    table = LatencyTable("cpu", tmp_path / "latency.json")
    table.record("conv", 0.25)
    table.save()
    assert LatencyTable("cpu", tmp_path / "latency.json").recorded("conv") == 0.25
    (tmp_path / "latency.json").write_text((tmp_path / "latency.json").read_text().replace("0.25", "0.01"))
    with pytest.warns(CacheWarning, match="latency.json changed since it was written"):
        assert LatencyTable("cpu", tmp_path / "latency.json").recorded("conv") is None  # measured again
    curve = {"path": str(tiny_model), "flops_fraction": 0.5, "pooled_agreement": 0.9, "curve": "tucker"}
    saved = save_evaluation({"models": [{"path": str(tiny_model)}, curve]}, tmp_path)
    assert evaluation_curves(tiny_model, tmp_path) == {"tucker": [(0.5, 0.9)]}
    saved.write_text(saved.read_text().replace("0.9", "1.0"))
    with pytest.warns(CacheWarning, match="changed since it was written"):
        assert evaluation_curves(tiny_model, tmp_path) == {}


def test_finetune_refuses_to_write_over_its_data_set_or_original(tiny_compressed, tiny_model, raw_root, tmp_path,
                                                                 capsys):
    dataset = raw_root / "Dataset901_TinyCT"
    before = tree_digest(dataset)
    base = [*FINETUNE, str(tiny_compressed), "--dataset", str(dataset), "--overwrite"]
    assert "is the data set" in one_line([*base, str(dataset)], capsys)
    assert "lies inside the data set" in one_line([*base, str(dataset / "imagesTr")], capsys)
    assert "contains the data set" in one_line([*base, str(raw_root)], capsys)
    err = one_line([*base, "--original", str(tiny_model), str(tiny_model)], capsys)
    assert "is the original model folder" in err
    assert tree_digest(dataset) == before


def test_evaluate_refuses_to_write_over_its_images_labels_or_variants(tiny_model, tiny_compressed, ct_file, tmp_path,
                                                                      capsys):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    shutil.copy2(ct_file, images / "case_0000.nii.gz")
    shutil.copy2(ct_file, labels / "case.nii.gz")
    before = {p: tree_digest(p) for p in (images, labels, tiny_compressed, tiny_model)}
    base = ["evaluate", str(tiny_model), str(tiny_compressed), "--images", str(images), "--labels", str(labels),
            "--overwrite", "--quiet", "--out"]
    assert "is the image folder" in one_line([*base, str(images)], capsys)
    assert "is the label folder" in one_line([*base, str(labels)], capsys)
    assert "contains the image folder" in one_line([*base, str(tmp_path)], capsys)
    assert "is the variant folder" in one_line([*base, str(tiny_compressed)], capsys)
    assert "data set folder of the model folder" in one_line([*base, str(tiny_model.parent / "report")], capsys)
    assert {p: tree_digest(p) for p in before} == before


def test_distill_refuses_to_write_inside_the_teacher_given_as_its_data_set(tiny_model, tiny_compressed, ct_file,
                                                                           tmp_path, capsys):
    """Before: the output landed in the teacher's data set folder, which then held several trained models."""
    teacher = tmp_path / "Dataset900_Teacher"  # the data set folder, as given
    shutil.copytree(tiny_model.parent, teacher)
    before = tree_digest(teacher)
    base = ["distill", str(tiny_compressed), "--teacher", str(teacher), "--device", "cpu", "--quiet", "--overwrite",
            "--calibration", str(ct_file)]
    assert "lies inside the teacher model folder" in one_line([*base, str(teacher / "distilled")], capsys)
    assert "is the calibration CT" in one_line([*base, str(ct_file)], capsys)
    assert "contains the calibration CT" in one_line([*base, str(ct_file.parent)], capsys)
    assert tree_digest(teacher) == before and ct_file.is_file()


def test_compress_refuses_to_write_over_its_calibration_cts_and_label_maps(tiny_model, ct_file, tmp_path, capsys):
    options = ["--factor", "0.5", "--quiet", "--overwrite", "--calibration", str(ct_file)]
    assert "is the calibration CT" in one_line(["compress", str(tiny_model), str(ct_file), *options], capsys)
    assert "contains the calibration CT" in one_line(["compress", str(tiny_model), str(ct_file.parent), *options],
                                                     capsys)
    labels = tmp_path / "labels.nii.gz"
    shutil.copy2(ct_file, labels)
    taylor = ["--method", "prune-taylor", "--quiet", "--overwrite", "--calibration", str(ct_file), "--labels",
              str(labels)]
    assert "is the label map" in one_line(["compress", str(tiny_model), str(labels), *taylor], capsys)
    assert ct_file.is_file() and labels.read_bytes() == ct_file.read_bytes()


class _Payload:
    """Unpickled, runs a shell command (what a hostile preprocessed case could hold)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return os.system, (f"touch {self.marker}",)


def test_preprocessed_cases_whose_properties_pickle_code_are_refused_unrun(tiny_compressed, raw_root, tmp_path):
    """nnU-Net unpickles a preprocessed case's properties fully; only plain data gets that far."""
    model = ModelFolder.open(tiny_compressed)
    raw = find_dataset(raw_root / "Dataset901_TinyCT")
    made = prepare_dataset(raw, model, tmp_path / "made", check_dataset(raw, model))
    (made / "plans.json").rename(made / f"{model.plans_manager.plans_name}.json")  # as nnU-Net lays it out
    preprocessed = find_dataset(made)
    assert preprocessed.kind == "preprocessed"
    again = prepare_dataset(preprocessed, model, tmp_path / "again", check_dataset(preprocessed, model))
    assert sorted(p.name for p in again.rglob("*.pkl")) == sorted(p.name for p in made.rglob("*.pkl"))
    case = next(made.rglob("*.pkl"))
    marker = tmp_path / "PWNED"
    case.write_bytes(pickle.dumps({"spacing": [3.0, 3.0, 3.0], "payload": _Payload(marker)}))
    with pytest.raises(DatasetError, match=rf"{case.name}: it is not plain data \(it names (posix|nt)\.system\)"):
        prepare_dataset(preprocessed, model, tmp_path / "third", check_dataset(preprocessed, model))
    assert not marker.exists()
