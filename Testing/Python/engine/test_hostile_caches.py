"""Caches are data that can be wrong: a cache folder that cannot be created or written is worked without (one
warning line naming the folder and the fix), or refused in one line where the cache is the product; a cached
artefact that is damaged, of the wrong shape or made from something else is said, rebuilt or left unused, never
a traceback, never a wrong result (folders generated here, nothing downloaded)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from TuckerSegmentLib.checksums import sealed
from TuckerSegmentLib.compress.figures import CompressionReview, ModelFigures
from TuckerSegmentLib.errors import CacheWarning, ModelFolderError, OutputPathError
from TuckerSegmentLib.evaluation.saved import evaluation_curves, save_evaluation, saved_path
from TuckerSegmentLib.paths import BUNDLED_MODELS
from TuckerSegmentLib.runtime.latency import TABLE_VERSION, LatencyTable
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task
from TuckerSegmentLib.variants.task_weights import check_task_weights
from TuckerSegmentLib.variants.totalsegmentator import tasks
from TuckerSegmentLib.variants.user_variants import add_user_variant, registry_path, user_variants

SAMPLE_CT = BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd"
DEMO_SOURCE = BUNDLED_MODELS / "chest-demo" / "Dataset901_ChestDemo"
FIX = "set TUCKERSEGMENT_CACHE to a writable folder"


def under_a_file(tmp_path: Path) -> Path:
    """A cache folder that cannot be created: its parent is a regular file."""
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path / "afile" / "cache"


def cache_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, CacheWarning)]


def write_ct(path: Path) -> Path:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(-500, 300, (16, 32, 32)).astype(np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


def child_env(**overrides: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("TUCKERSEGMENT_CACHE", "XDG_CACHE_HOME")}
    return {**env, **overrides}


# 1. a cache folder that cannot be created: worked without, or refused where the cache is the product

@pytest.mark.parametrize("variable", ["TUCKERSEGMENT_CACHE", "XDG_CACHE_HOME"])
def test_segment_works_without_a_cache_that_cannot_be_created_and_says_so_in_one_line(tmp_path, variable):
    cache = under_a_file(tmp_path)
    out = tmp_path / "out.seg.nrrd"
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "segment", str(SAMPLE_CT), str(out),
                          "--task", "demo", "--quiet"], capture_output=True, text=True, timeout=300,
                         env=child_env(**{variable: str(cache)}))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert out.is_file()  # OpenVINO converted in memory
    said = [line for line in run.stderr.splitlines() if "cache folder" in line]
    folder = cache if variable == "TUCKERSEGMENT_CACHE" else cache / "tuckersegment"
    assert len(said) == 1 and f"the cache folder {folder} cannot be created" in said[0] and FIX in said[0], run.stderr


def test_evaluate_writes_its_report_without_a_cache_to_keep_it_in(tiny_model, tiny_compressed, tmp_path):
    cache = under_a_file(tmp_path)
    images = tmp_path / "images"
    images.mkdir()
    write_ct(images / "case_0000.nii.gz")
    out = tmp_path / "report"
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "evaluate", str(tiny_model), str(tiny_compressed),
                          "--images", str(images), "--out", str(out), "--rounds", "1", "--no-memory", "--quiet"],
                         capture_output=True, text=True, timeout=600, env=child_env(TUCKERSEGMENT_CACHE=str(cache)))
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    assert (out / "evaluation.json").is_file()
    said = [line for line in run.stderr.splitlines() if "cache folder" in line]
    assert len(said) == 1 and said[0].startswith(f"tuckersegment: warning: the cache folder {cache} cannot be created")
    assert FIX in said[0], run.stderr


def test_build_variants_is_refused_in_one_line_when_the_cache_cannot_keep_what_it_builds(tmp_path):
    from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task
    cache = under_a_file(tmp_path)
    write_totalsegmentator_task(tmp_path / "totalseg" / "nnunet" / "results", "fast", divisor=8)
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "build-variants", "--variant", "fast-tucker-0.5",
                          "--device", "cpu", "--no-measure", "--quiet"], capture_output=True, text=True, timeout=600,
                         env=child_env(TUCKERSEGMENT_CACHE=str(cache), TOTALSEG_HOME_DIR=str(tmp_path / "totalseg")))
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"tuckersegment: error: cannot keep built variants: the cache folder {cache} cannot be created (Not a "
        f"directory); {FIX}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "totalseg"]


def test_what_the_cache_only_speeds_up_is_measured_or_made_and_not_kept(tiny_model, tmp_path):
    cache = under_a_file(tmp_path)
    with pytest.warns(CacheWarning, match=re.escape(f"the cache folder {cache} cannot be created")):
        table = LatencyTable.for_device("cpu", cache=cache)
    assert table.path is None
    table.record("conv", 0.25)
    table.save()  # nowhere to keep it: not an error
    curve = {"path": str(tiny_model), "flops_fraction": 0.5, "pooled_agreement": 0.9, "curve": "tucker"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert save_evaluation({"models": [{"path": str(tiny_model)}, curve]}, cache) is None
    assert cache_warnings(caught) == []  # said once for this folder, not at every use
    (tmp_path / "afile").unlink()
    (tmp_path / "afile").mkdir()  # the folder can be made now: used again
    assert LatencyTable.for_device("cpu", cache=cache).path.parent == cache / "latency"


def test_a_cache_that_is_a_file_or_not_writable_is_named(tmp_path):
    cache = tmp_path / "cache"
    cache.write_text("a file where the cache should be")
    with pytest.warns(CacheWarning, match=re.escape(f"the cache folder {cache} is a file, not a folder")):
        assert LatencyTable.for_device("cpu", cache=cache).path is None
    if os.geteuid() != 0:  # root may write anywhere
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o555)
        with pytest.warns(CacheWarning, match=re.escape(f"the cache folder {read_only} is not writable")):
            assert LatencyTable.for_device("cpu", cache=read_only).path is None


def test_totalsegmentator_weights_are_checked_without_a_cache_to_record_them_in(tmp_path):
    (folder,) = write_totalsegmentator_task(tmp_path / "weights", "fast", divisor=8)
    cache = under_a_file(tmp_path)
    with pytest.warns(CacheWarning, match=re.escape(f"the cache folder {cache} cannot be created")):
        digest = check_task_weights(tasks()["fast"].models[0], folder, cache=cache)
    assert digest == hashlib.sha256(next(folder.rglob("checkpoint_final.pth")).read_bytes()).hexdigest()


def review_of(tmp_path: Path) -> CompressionReview:
    (tmp_path / "out").mkdir(exist_ok=True)
    return CompressionReview(str(tmp_path / "source"), str(tmp_path / "out"), {"name": "uniform", "params": {}}, "cpu",
                             ModelFigures(1000, 100, 4000), ModelFigures(500, 40, 2000), agreement=0.8)


def test_my_variants_are_refused_in_one_line_when_the_cache_cannot_keep_them(tmp_path):
    cache = under_a_file(tmp_path)
    with pytest.raises(OutputPathError) as raised:
        add_user_variant(review_of(tmp_path), cache)
    message = str(raised.value)
    assert f"the cache folder {cache} cannot be created" in message and FIX in message and "\n" not in message
    assert (tmp_path / "afile").read_text() == "not a folder"


@pytest.mark.parametrize("registry", ['["a", "list"]', '{"variants": {"id": "x"}}', '{"variants": [1]}',
                                      '{"variants": [{"id": "x", "folder": "/tmp"}]}'])
def test_a_list_of_my_variants_of_the_wrong_shape_is_named_not_a_traceback(tmp_path, registry):
    registry_path(tmp_path).write_text(registry)
    for call in (lambda: user_variants(tmp_path), lambda: add_user_variant(review_of(tmp_path), tmp_path)):
        with pytest.raises(ModelFolderError, match="delete it to start a new"):
            call()
    assert registry_path(tmp_path).read_text() == registry  # never replaced behind the user's back


# 2. a cached OpenVINO network that is garbage under a record rewritten to vouch for it

def openvino_labels(model: Path, ct: Path) -> tuple[np.ndarray, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        labels = Segmenter(model, device="cpu", runtime="openvino", precision="f32").segment(ct).labels
    return labels, cache_warnings(caught)


def vouch_for(folder: Path, name: str, data: bytes) -> None:
    """Put ``data`` in the cached file ``name`` and rewrite the record so that its sha256 matches."""
    (folder / name).write_bytes(data)
    record = json.loads((folder / "record.json").read_text())
    record["files"][name] = hashlib.sha256(data).hexdigest()
    (folder / "record.json").write_text(json.dumps(record))


EMPTY_IR = b"<?xml version='1.0'?><net name='empty' version='11'><layers/><edges/></net>"


# random bytes and invalid XML were already refused (OpenVINO's read fails, quietly): kept as a regression guard
@pytest.mark.parametrize("garbage", [os.urandom(4096), b"<net><layers><layer id='0' type='Parameter'", EMPTY_IR],
                         ids=["random bytes", "invalid XML", "a valid IR of no network"])
def test_a_garbage_converted_network_that_the_record_vouches_for_is_converted_again(tiny_model, tmp_path, monkeypatch,
                                                                                    capfd, garbage):
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    ct = write_ct(tmp_path / "ct.nrrd")
    expected, said = openvino_labels(tiny_model, ct)
    (folder,) = (tmp_path / "cache" / "openvino").iterdir()
    for blob in folder.glob("*.blob"):
        blob.unlink()  # so the converted network is read
    vouch_for(folder, "model.xml", garbage)
    capfd.readouterr()
    labels, said = openvino_labels(tiny_model, ct)
    assert np.array_equal(labels, expected)
    assert len(said) == 1 and "model.xml cannot be read" in said[0] and "\n" not in said[0]
    assert capfd.readouterr().err == ""  # nothing of OpenVINO's parser on stderr
    assert openvino_labels(tiny_model, ct)[1] == []  # rebuilt: used again


def test_a_compiled_blob_of_another_network_that_the_record_vouches_for_is_not_imported(tiny_model, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    ct = write_ct(tmp_path / "ct.nrrd")
    expected, _ = openvino_labels(tiny_model, ct)
    (ours,) = (tmp_path / "cache" / "openvino").iterdir()
    openvino_labels(DEMO_SOURCE, ct)  # another network, compiled for another patch shape
    (theirs,) = (folder for folder in (tmp_path / "cache" / "openvino").iterdir() if folder != ours)
    (blob,) = ours.glob("*.blob")
    vouch_for(ours, blob.name, next(theirs.glob("*.blob")).read_bytes())
    labels, said = openvino_labels(tiny_model, ct)
    assert np.array_equal(labels, expected)
    assert len(said) == 1 and f"{blob.name} cannot be imported as the compiled network" in said[0]


def test_a_file_in_place_of_a_networks_cache_folder_is_worked_around(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    ct = write_ct(tmp_path / "ct.nrrd")
    expected, _ = openvino_labels(tiny_model, ct)
    (folder,) = (tmp_path / "cache" / "openvino").iterdir()
    shutil.rmtree(folder)
    folder.write_text("not a folder")
    assert np.array_equal(openvino_labels(tiny_model, ct)[0], expected)
    assert folder.read_text() == "not a folder"


# 3. damaged latency tables and saved evaluations: said, and measured again or not used

def table_file(tmp_path: Path, seconds: object) -> Path:
    """A sealed latency table of this machine's CPU holding ``seconds``."""
    path = tmp_path / "latency.json"
    name = LatencyTable("cpu").name
    path.write_text(json.dumps(sealed({"version": TABLE_VERSION, "device": name, "seconds": seconds})))
    return path


@pytest.mark.parametrize("damage", ["not JSON", "a list", "seconds as a list", "seconds as text", "NaN as text",
                                    "a negative time", "a boolean"])
def test_a_damaged_latency_table_is_said_and_measured_again(tmp_path, damage):
    path = {"not JSON": lambda: tmp_path / "latency.json",
            "a list": lambda: tmp_path / "latency.json",
            "seconds as a list": lambda: table_file(tmp_path, [0.25]),
            "seconds as text": lambda: table_file(tmp_path, {"conv": "fast"}),
            "NaN as text": lambda: table_file(tmp_path, {"conv": "nan"}),
            "a negative time": lambda: table_file(tmp_path, {"conv": -1.0}),
            "a boolean": lambda: table_file(tmp_path, {"conv": True})}[damage]()
    if damage == "not JSON":
        path.write_text('{"version": 1, "seconds": {"conv"')
    elif damage == "a list":
        path.write_text("[0.25]")
    with pytest.warns(CacheWarning, match="latency.json .*it is not used: measuring again"):
        table = LatencyTable("cpu", path)
    assert table.recorded("conv") is None
    table.record("conv", 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)  # said once, when loaded
        table.save()
        assert LatencyTable("cpu", path).recorded("conv") == 0.25  # replaced by what was measured


def saved_models(tiny_model: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``tiny_model`` as an original and another as its variant."""
    original, variant = tmp_path / "original", tmp_path / "variant"
    shutil.copytree(tiny_model, original)
    shutil.copytree(tiny_model, variant)
    return original, variant


def evaluation(original: Path, variant: Path, **figures: object) -> dict:
    point = {"path": str(variant), "curve": "tucker", "flops_fraction": 0.5, "pooled_agreement": 0.9, **figures}
    return {"models": [{"path": str(original), "curve": "original", "flops_fraction": 1.0, "pooled_agreement": 1.0},
                       point]}


@pytest.mark.parametrize(("record", "why"), [
    ("{not json", "unreadable"),
    ("[1, 2]", "unreadable"),
    (sealed({"models": {"path": "x"}}), "not an evaluation"),
    (sealed({"models": [{"path": "x"}]}), "not an evaluation"),  # no sha256 of the models (an earlier version's)
])
def test_a_damaged_saved_evaluation_is_said_and_not_used(tiny_model, tmp_path, record, why):
    original, variant = saved_models(tiny_model, tmp_path)
    save_evaluation(evaluation(original, variant), tmp_path)
    assert evaluation_curves(original, tmp_path) == {"tucker": [(0.5, 0.9)]}
    path = saved_path(original, tmp_path)
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    with pytest.warns(CacheWarning, match=f"the saved evaluation {re.escape(str(path))} .*{why}"):
        assert evaluation_curves(original, tmp_path) == {}


@pytest.mark.parametrize("figures", [{"flops_fraction": "0.5"}, {"pooled_agreement": "0.9"}, {"pooled_agreement": True},
                                     {"curve": 7}, {"flops_fraction": None}])
def test_a_saved_evaluation_holding_a_value_of_the_wrong_type_is_not_used(tiny_model, tmp_path, figures):
    original, variant = saved_models(tiny_model, tmp_path)
    path = save_evaluation(evaluation(original, variant, **figures), tmp_path)
    with pytest.warns(CacheWarning, match=f"the saved evaluation {re.escape(str(path))} .*not an evaluation"):
        assert evaluation_curves(original, tmp_path) == {}


def test_a_saved_evaluation_of_models_changed_since_is_not_believed(tiny_model, tmp_path):
    original, variant = saved_models(tiny_model, tmp_path)
    save_evaluation(evaluation(original, variant), tmp_path)
    weights = variant / "fold_0" / "checkpoint_final.pth"
    weights.write_bytes(weights.read_bytes() + b"retrained")  # the variant changed in place
    with pytest.warns(CacheWarning, match=re.escape(f"changed or went since ({variant}); their results are not used")):
        assert evaluation_curves(original, tmp_path) == {}
    save_evaluation(evaluation(original, variant), tmp_path)
    assert evaluation_curves(original, tmp_path) == {"tucker": [(0.5, 0.9)]}
    plans = json.loads((original / "plans.json").read_text())
    (original / "plans.json").write_text(json.dumps({**plans, "note": "edited"}))  # the original changed
    with pytest.warns(CacheWarning, match=re.escape(f"changed or went since ({original})")):
        assert evaluation_curves(original, tmp_path) == {}
