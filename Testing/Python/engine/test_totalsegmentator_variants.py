"""TotalSegmentator tasks, weights discovery, variant builds and the variants CLI, on TotalSegmentator-shaped
model folders: the five 1.5 mm parts with scaled-down widths, and one full-size Dataset297."""
from __future__ import annotations

import csv
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from TuckerSegmentLib.progress import listening
from TuckerSegmentLib.runtime.stage_log import StageLog
from TuckerSegmentLib.cli import main
from TuckerSegmentLib.errors import CacheWarning, CheckpointError, ModelFolderError
from TuckerSegmentLib.image.volume import Volume
from TuckerSegmentLib.paths import BUNDLED_MODELS
from TuckerSegmentLib.segment.labels import TOTALSEGMENTATOR_CSV, segment_labels
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.example_models import EXAMPLE_SPECS, example_model, write_totalsegmentator_task
from TuckerSegmentLib.tucker.network_stats import network_stats
from TuckerSegmentLib.compress import folder as compress_folder
from TuckerSegmentLib.variants import build as variant_build
from TuckerSegmentLib.variants.catalogue import MANIFEST, catalogue, find_variant, load_catalogue, variant_dir, verify_built
from TuckerSegmentLib.variants.choice import choose_model
from TuckerSegmentLib.variants.guard import SafeTask
from TuckerSegmentLib.runtime.hardware import GB, DeviceInfo
from TuckerSegmentLib.variants.task_weights import check_task_weights, weights_record
from TuckerSegmentLib.variants.totalsegmentator import find_task, tasks, weights_dirs

CPU = DeviceInfo("cpu", "CPU", 32 * GB, 16 * GB, cores=2)


@pytest.fixture(scope="module")
def fast_297(tmp_path_factory) -> Path:
    """A full-size Dataset297 (TotalSegmentator 3 mm) results folder, random weights."""
    results = tmp_path_factory.mktemp("ts297") / "results"
    write_totalsegmentator_task(results, "fast")
    return results


def test_task_descriptions_match_totalsegmentator():
    total = tasks()["total"]
    assert [m.task_id for m in total.models] == [291, 292, 293, 294, 295]
    assert [len(m.labels) for m in total.models] == [24, 26, 18, 23, 26]
    assert len(total.structures) == len(set(total.structures)) == 117
    merged = [name for m in total.models for name in m.labels.values()]
    assert sorted(merged) == sorted(total.structures)  # the five parts cover the 117 exactly once
    maps = total.label_maps()
    assert maps[0][1] == (1, "spleen") and maps[1][1] == (total.structures.index("sacrum") + 1, "sacrum")
    for name in ("fast", "fastest"):
        (model,) = tasks()[name].models
        assert model.trainer == "nnUNetTrainer_4000epochs_NoMirroring"
        assert [model.labels[i] for i in range(1, 118)] == list(total.structures)
    with open(TOTALSEGMENTATOR_CSV) as handle:
        named = {row["Name"] for row in csv.DictReader(handle)}
    assert set(total.structures) <= named  # every structure gets TotalSegmentator's terminology and colour


def test_architectures_reproduce_the_published_sizes():
    """Dataset291 31.19 M and Dataset297 16.55 M parameters (Weber et al. table); the catalogue agrees."""
    for name, published in (("Dataset291", 31.19e6), ("Dataset297", 16.55e6)):
        folder = example_model(name)
        params = network_stats(folder.build_network(), folder.example_input()).params
        assert params == pytest.approx(published, rel=2e-3), name
    entries = {v.id: v for v in load_catalogue()}
    assert entries["fast"].params == pytest.approx(16.55e6, rel=2e-3)
    assert entries["fast-tucker-0.5"].params == pytest.approx(4.92e6, rel=5e-3)
    assert entries["fast-tucker-0.3"].params == pytest.approx(1.98e6, rel=5e-3)


def test_weights_are_discovered_where_totalsegmentator_keeps_them(ts_home, fast_297, monkeypatch):
    fast = tasks()["fast"]
    assert find_task(fast) is None
    assert {v.id: v.availability for v in catalogue()}["fast-tucker-0.3"] == "missing"
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(fast_297))
    assert weights_dirs()[0] == fast_297
    assert find_task(fast) == [fast_297 / fast.models[0].relative_path]
    availability = {v.id: v.availability for v in catalogue()}
    assert availability["fast"] == "built" and availability["fast-tucker-0.3"] == "buildable"
    assert availability["total"] == "missing"
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH")
    shutil.copytree(fast_297, ts_home)  # ~/.totalsegmentator layout, as the Slicer extension fills it
    assert find_task(fast) == [ts_home / fast.models[0].relative_path]


def test_full_size_297_builds_verifies_and_segments(ts_home, fast_297, capsys):
    shutil.copytree(fast_297, ts_home)
    assert main(["build-variants", "--variant", "fast-tucker-0.3", "--quiet", "--no-measure"]) == 0
    variant = find_variant(catalogue(), "fast-tucker-0.3")
    assert variant.availability == "built"
    manifest = json.loads((variant_dir(variant) / MANIFEST).read_text())
    assert {Path(f).name for f in manifest["models"][0]["files"]} >= {"tucker.json", "weights.safetensors", "plans.json"}
    assert (manifest["models"][0]["params"], manifest["models"][0]["flops"]) == (variant.params, variant.flops)
    verify_built(variant)
    choice = choose_model("fast-tucker-0.3", variants=catalogue(), devices=[CPU])
    segmenter = Segmenter(choice.folders[0], device="cpu")
    assert len(segmenter.segments) == 117 and segmenter.policy == "UniformPolicy(factor=0.3, rank_min=8)"
    assert segmenter.segments[0].name == "spleen" and segmenter.segments[0].terminology is not None
    # the figures recorded in the catalogue are the built network's
    built = network_stats(*segmenter_network(choice.folders[0]))
    assert built.params == variant.params and built.flops == variant.flops
    # corruption is detected, and the variant no longer counts as built
    weights = next(choice.folders[0].rglob("weights.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since it was built"):
        SafeTask(choice, catalogue(), [CPU])  # checked before loading
    damaged = find_variant(catalogue(), "fast-tucker-0.3")
    assert damaged.availability == "damaged" and "build-variants --variant fast-tucker-0.3 to finish or rebuild" in \
        damaged.detail
    auto = choose_model("auto", task="fast", variants=catalogue(), devices=[CPU])  # falls back, and says so
    assert auto.id == "fast" and auto.reason.endswith(
        "; not fast-tucker-0.3: its build is incomplete or damaged here (run tuckersegment build-variants --variant "
        "fast-tucker-0.3 to rebuild)")


def segmenter_network(folder: Path):
    from TuckerSegmentLib.nnunet.model_folder import ModelFolder
    model = ModelFolder.open(folder)
    return model.fold_structure(model.folds[0])[0], model.example_input()


def test_total_merges_five_parts_into_117_global_labels(ts_home):
    write_totalsegmentator_task(ts_home, "total", divisor=8)
    choice = choose_model("auto", task="total", variants=catalogue(), devices=[CPU])
    assert choice.id == "total" and len(choice.folders) == 5
    runner = SafeTask(choice, catalogue(), [CPU])
    assert [s.value for s in runner.segments] == list(range(1, 118))
    assert [s.name for s in runner.segments] == list(tasks()["total"].structures)
    assert runner.segments[0].color == pytest.approx((157 / 255, 108 / 255, 162 / 255))  # TotalSegmentator's spleen
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 300, (48, 48, 48)).astype(np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    result = runner.segment(volume)
    assert runner.loaded() == [True] * 5
    per_part = []
    for folder, mapping in zip(choice.folders, choice.label_maps, strict=True):
        own = Segmenter(folder, device="cpu").segment(volume).labels
        per_part.append(np.where(own > 0, np.vectorize(lambda v, m=mapping: m.get(v, (0,))[0])(own), 0))
    expected = np.zeros_like(result.labels)
    for part in per_part:  # later parts win where two claim a voxel, as TotalSegmentator merges
        expected = np.where(part > 0, part, expected)
    assert np.array_equal(result.labels, expected) and len(np.unique(result.labels)) > 2
    ribs = SafeTask(choice, catalogue(), [CPU])
    only = ribs.segment(volume, subset=["rib_left_1", "spleen"])
    assert ribs.loaded() == [True, False, False, False, True]  # parts without a requested structure never load
    assert set(np.unique(only.labels)) <= {0, 1, tasks()["total"].structures.index("rib_left_1") + 1}


def test_interrupted_build_is_not_used_and_resumes(ts_home, monkeypatch):
    write_totalsegmentator_task(ts_home, "total", divisor=8)
    variant = find_variant(catalogue(), "total-tucker-0.5")
    real = compress_folder.compress_model_folder  # what every build's model writer calls
    calls = []

    def flaky(source, target, *args, **kwargs):
        calls.append(Path(target).name)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the user stops the build midway
        return real(source, target, *args, **kwargs)

    monkeypatch.setattr(compress_folder, "compress_model_folder", flaky)
    with pytest.raises(KeyboardInterrupt):
        variant_build.build_variant(variant, measure=False)
    assert find_variant(catalogue(), "total-tucker-0.5").availability == "damaged"  # half-built: never used
    assert not (variant_dir(variant) / MANIFEST).exists()
    with pytest.raises(ModelFolderError, match="not .completely. built"):
        verify_built(variant)
    messages = []
    variant_build.build_variant(variant, report=messages.append, measure=False)
    assert sum("kept from an earlier" in m for m in messages) == 2  # the two finished models were reused
    assert calls[3:] == [m.dataset for m in tasks()["total"].models[2:]]
    built = find_variant(catalogue(), "total-tucker-0.5")
    assert built.availability == "built" and len(built.folders) == 5
    verify_built(built)


def test_wrong_source_weights_are_refused_and_nothing_is_built(ts_home, tmp_path):
    write_totalsegmentator_task(ts_home, "fast", divisor=8)  # Dataset297 with other widths than its plans say
    folder = ts_home / tasks()["fast"].models[0].relative_path
    plans = json.loads((folder / "plans.json").read_text())
    arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
    arch["features_per_stage"] = [2 * f for f in arch["features_per_stage"]]
    (folder / "plans.json").write_text(json.dumps(plans))
    with pytest.raises(CheckpointError, match="do not fit the architecture"):
        variant_build.build_variant(find_variant(catalogue(), "fast-tucker-0.7"))
    assert not variant_dir(find_variant(catalogue(), "fast-tucker-0.7")).joinpath(MANIFEST).exists()
    with pytest.raises(CheckpointError, match="corrupt or from another release"):
        check_task_weights(tasks()["fast"].models[0], folder, "0" * 64)


def _foreign_labels(folder: Path) -> None:
    """Give a TotalSegmentator-named folder another model's labels: two names changed, one value swapped."""
    dataset = json.loads((folder / "dataset.json").read_text())
    labels = dataset["labels"]
    labels["tumour"] = labels.pop("spleen")
    labels["kidney_right"], labels["kidney_left"] = labels["kidney_left"], labels["kidney_right"]
    (folder / "dataset.json").write_text(json.dumps(dataset))


def test_a_foreign_model_under_a_totalsegmentator_name_is_refused_naming_the_labels(ts_home, tmp_path, capsys):
    (folder,) = write_totalsegmentator_task(ts_home, "fast", divisor=8)
    _foreign_labels(folder)
    ct = BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd"  # refused before it is read
    assert main(["segment", str(ct), str(tmp_path / "out.seg.nrrd"), "--task", "fast", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tuckersegment: error: ") and "labels are not that model's" in err
    assert "spleen=1" in err and "kidney_right=2, kidney_left=3" in err and "tumour=1" in err
    assert not (tmp_path / "out.seg.nrrd").exists()
    assert main(["build-variants", "--variant", "fast-tucker-0.7", "--quiet", "--no-measure"]) == 2
    assert "labels are not that model's" in capsys.readouterr().err
    assert not variant_dir(find_variant(catalogue(), "fast-tucker-0.7")).joinpath(MANIFEST).exists()


def test_totalsegmentator_weights_are_recorded_when_first_verified_and_a_change_is_refused(ts_home, tmp_path):
    (folder,) = write_totalsegmentator_task(ts_home, "fast", divisor=8)
    model = tasks()["fast"].models[0]
    record = weights_record()
    assert not record.exists()
    choice = choose_model("auto", task="fast", variants=catalogue(), devices=[CPU])
    SafeTask(choice, catalogue(), [CPU])  # first use: verified and recorded
    first = json.loads(record.read_text())[model.dataset]["sha256"]
    assert first == check_task_weights(model, folder)  # the same weights pass again
    write_totalsegmentator_task(tmp_path / "other", "fast", divisor=8, seed=7)  # other weights, same plans and labels
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    shutil.copy2(next((tmp_path / "other").rglob("checkpoint_final.pth")), checkpoint)
    with pytest.raises(CheckpointError, match=r"not the .* recorded when these weights were first verified here"):
        SafeTask(choice, catalogue(), [CPU])
    assert json.loads(record.read_text())[model.dataset]["sha256"] == first  # the record is not replaced
    record.write_text("{not json")  # a damaged record is said and started again
    with pytest.warns(CacheWarning, match="not a record of TotalSegmentator checksums"):
        assert check_task_weights(model, folder) != first
    assert json.loads(record.read_text())[model.dataset]["sha256"] != first


def test_missing_weights_without_totalsegmentator_say_where_and_how(ts_home, capsys):
    assert main(["build-variants", "--variant", "fast-tucker-0.7"]) == 2
    err = capsys.readouterr().err
    assert "were not found in" in err and "pip install TotalSegmentator" in err and "TOTALSEG_WEIGHTS_PATH" in err


def test_totalsegmentator_download_is_used_when_installed(ts_home, tmp_path, monkeypatch):
    """TotalSegmentator's own downloader is called with the dataset id; it fills the weights folder."""
    package = tmp_path / "site" / "totalsegmentator"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "libs.py").write_text(
        "import os\n"
        "from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task\n"
        "calls = []\n"
        "def download_pretrained_weights(task_id):\n"
        "    calls.append(task_id)\n"
        "    write_totalsegmentator_task(os.environ['FAKE_DOWNLOAD_TO'], 'fast', divisor=8)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("FAKE_DOWNLOAD_TO", str(ts_home))
    try:
        assert find_variant(catalogue(), "fast-tucker-0.5").availability == "buildable"
        variant_build.build_variant(find_variant(catalogue(), "fast-tucker-0.5"), measure=False)
        import totalsegmentator.libs as fake
        assert fake.calls == [297]
        assert find_variant(catalogue(), "fast-tucker-0.5").availability == "built"
    finally:  # later tests must not see the stand-in package
        for name in ("totalsegmentator.libs", "totalsegmentator"):
            sys.modules.pop(name, None)


def test_variants_json_lists_every_entry_and_the_auto_choice(ts_home, capsys):
    assert main(["variants", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    rows = {row["id"]: row for row in listing["variants"]}
    assert len(rows) == len(load_catalogue()) == 24
    for row in rows.values():
        assert set(row) >= {"id", "task", "policy", "availability", "params", "flops"}
        assert row["availability"] in ("bundled", "built", "damaged", "buildable", "missing")
    assert rows["fast"]["policy"] == "original" and rows["fast-tucker-0.7"]["policy"]["params"]["factor"] == 0.7
    assert rows["chest-demo"]["availability"] == "bundled" and rows["total"]["availability"] == "missing"
    assert listing["auto"]["id"] == "chest-demo-tucker-balanced" and listing["auto"]["device"] == "cpu"
    assert listing["auto"]["reason"].startswith("demo / chest-demo-tucker-balanced: CPU")
    assert rows["chest-demo-tucker-balanced"]["auto_eligible"] and not rows["chest-demo-tucker-fast"]["auto_eligible"]
    assert rows["fast-tucker-balanced"]["params"] is None and rows["fast-tucker-balanced"]["measured"] is None
    from TuckerSegmentLib.dependencies import installed_version
    runtime = listing["cpu_runtime"]  # what OpenVINO's CPU plugin runs natively here: the precisions on offer
    assert runtime["openvino"] == installed_version("openvino") and "FP32" in runtime["cpu_capabilities"]
    assert main(["variants"]) == 0
    text = capsys.readouterr().out
    assert f"CPU runtime: OpenVINO {runtime['openvino']} on the CPU ({', '.join(runtime['cpu_capabilities'])})" in text
    assert "auto: chest-demo-tucker-balanced: demo / chest-demo-tucker-balanced: CPU" in text
    assert "fast-tucker-0.3" in text and "fast-tucker-balanced" in text


def test_standard_volume_memory_grows_with_outputs_and_spacing():
    entries = {v.id: v for v in load_catalogue()}
    total, fastest = entries["total"], entries["fastest"]
    voxels = math.prod(math.ceil(e / 1.5) for e in (409.6, 409.6, 450.0))
    assert total.memory_bytes("cpu")[0] == total.peak_memory["cpu"]["tile_bytes"] + \
        total.peak_memory["cpu"]["bytes_per_voxel"] * voxels
    assert fastest.memory_bytes("cpu")[0] < total.memory_bytes("cpu")[0]
    assert EXAMPLE_SPECS["Dataset298"].spacing == (6.0, 6.0, 6.0)
    assert segment_labels({"labels": {"background": 0, "liver": 1}})[0].terminology is not None


def test_build_variants_cli_builds_what_the_found_weights_allow(ts_home, tmp_path, capsys):
    elsewhere = tmp_path / "weights"
    write_totalsegmentator_task(elsewhere, "fast", divisor=8)
    assert main(["build-variants", "--ts-weights", str(elsewhere), "--variant", "fast-tucker-0.7", "fast-tucker-0.3",
                 "--no-measure", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fast-tucker-0.7: built in" in out and "fast-tucker-0.3: built in" in out
    assert "not measured on this machine" in out and "auto will not choose it" in out
    availability = {v.id: v.availability for v in catalogue()}
    assert [availability[f"fast-tucker-{f}"] for f in (0.7, 0.5, 0.3)] == ["built", "missing", "built"]
    assert availability["fast"] == "missing"  # the original stays where it was, outside the default folders
    assert main(["build-variants", "--task", "total"]) == 2
    assert "nothing to build: no TotalSegmentator weights found" in capsys.readouterr().err


def test_every_catalogue_cpu_time_names_the_runtime_and_cpu_it_was_measured_on():
    timed = [v for v in catalogue() if v.speed.get("cpu")]
    assert len(timed) >= 9  # three uniform variants for each of total, fast and the demo at least
    for variant in timed:
        cpu = variant.speed["cpu"]
        assert cpu["runtime"].startswith(("OpenVINO", "PyTorch")) and cpu["device"], variant.id
        assert cpu["runtime"] in cpu["source"] and 0 < cpu["relative_time"] < 5, variant.id


class StopAt:
    """A stage listener that stops the work (as a user's Ctrl-C) when the stage ``name`` begins."""

    def __init__(self, name: str) -> None:
        self.name = name

    def begin(self, name: str, steps: int, announce: bool = False) -> None:
        if name == self.name:
            raise KeyboardInterrupt

    def step(self, name: str, done: int, steps: int) -> None: ...

    def end(self, name: str) -> None: ...


def test_a_build_interrupted_in_any_stage_is_not_used_and_resumes(ts_home):
    write_totalsegmentator_task(ts_home, "fast", divisor=8)
    variant = find_variant(catalogue(), "fast-tucker-0.5")
    for stage, kept in (("checking source weights", 0), ("decomposing", 0), ("measuring", 0)):  # each goes further
        messages: list[str] = []
        with pytest.raises(KeyboardInterrupt), listening(StopAt(stage)):
            variant_build.build_variant(variant, report=messages.append)
        assert sum("kept from an earlier" in m for m in messages) == kept
        assert find_variant(catalogue(), variant.id).availability == "damaged"  # never used half-built
    messages = []
    log = StageLog()
    with listening(log):
        variant_build.build_variant(variant, report=messages.append)
    assert sum("kept from an earlier" in m for m in messages) == 1  # the model compressed before is not redone
    assert any(r.name.endswith("measuring") for r in log.records)
    built = find_variant(catalogue(), variant.id)
    assert built.availability == "built" and built.measured is not None
    verify_built(built)


def test_weights_looked_for_in_the_folder_named_are_said_missing_there_not_elsewhere(ts_home, tmp_path, capsys):
    write_totalsegmentator_task(ts_home, "fast", divisor=8)  # found in the default place, but not where the user said
    named = tmp_path / "my weights"
    named.mkdir()
    for argv in (["--variant", "fast-tucker-0.5"], []):
        assert main(["build-variants", "--ts-weights", str(named), "--no-measure", "--quiet", *argv]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and f"are not in {named}; point --ts-weights at the folder" in error
        assert str(ts_home) not in error
    assert not (tmp_path / "cache" / "variants").exists()
