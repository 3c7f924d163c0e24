"""Where compression's calibration comes from: the user's CTs, the bundled sample CT for CT models when none
are given, weight-only only when asked for; recorded in tucker.json, said by the CLI, passed by the worker."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from conftest import CONFIG, hostile_copy, tree_digest
from TuckerSegmentLib import ModelFolder, UniformPolicy, compress_model_folder
from TuckerSegmentLib.cli import main
from TuckerSegmentLib.compress.calibration_data import calibration_patches
from TuckerSegmentLib.compress.calibration_source import SAMPLE_CT, sample_ct
from TuckerSegmentLib.errors import PolicyError, TuckerSegmentError
from TuckerSegmentLib.checksums import sha256_file
from TuckerSegmentLib.tucker.calibration import prediction_agreement
from TuckerSegmentLib.worker.server import Worker

POLICY = UniformPolicy(0.5, rank_min=2)


def record(folder: Path) -> dict:
    return json.loads((folder / "fold_0" / "tucker.json").read_text())


def test_a_ct_model_is_calibrated_on_the_sample_ct_by_default_and_better_than_weight_only(tiny_model, tmp_path):
    default = compress_model_folder(tiny_model, tmp_path / "default", POLICY)["0"]
    weight_only = compress_model_folder(tiny_model, tmp_path / "weights", POLICY, weight_only=True)["0"]
    assert record(tmp_path / "default")["calibration"] == {
        "source": "sample", "volumes": [SAMPLE_CT], "description": "the bundled sample chest CT (no calibration volumes given)"}
    assert record(tmp_path / "default")["calibration_inputs"] == default.calibration_inputs == 4
    assert record(tmp_path / "weights")["calibration"]["source"] == "none"
    assert record(tmp_path / "weights")["calibration_inputs"] == 0 and weight_only.agreement is None
    assert [r.plan for r in default.layers] == [r.plan for r in weight_only.layers]  # uniform: same ranks,
    assert sha256_file(tmp_path / "default" / "fold_0" / "weights.safetensors") != \
        sha256_file(tmp_path / "weights" / "fold_0" / "weights.safetensors")  # other factors
    model = ModelFolder.open(tiny_model)
    patches = list(calibration_patches(model, [sample_ct()]))
    original = model.load_network(0)
    calibrated = prediction_agreement(ModelFolder.open(tmp_path / "default").load_network(0), original, patches)
    uncalibrated = prediction_agreement(ModelFolder.open(tmp_path / "weights").load_network(0), original, patches)
    assert calibrated == pytest.approx(default.agreement) and calibrated > uncalibrated + 0.02


def test_user_volumes_are_recorded_by_name(tiny_model, tmp_path):
    report = compress_model_folder(tiny_model, tmp_path / "out", POLICY, calibration=[sample_ct()])["0"]
    assert report.calibration == {"source": "user", "volumes": [SAMPLE_CT], "description": "your 1 CT volume(s)"}
    assert record(tmp_path / "out")["calibration"] == report.calibration


@pytest.fixture
def zscore_model(tiny_model, tmp_path) -> Path:
    """The tiny model normalised by z-score (as for MR): the sample CT does not fit it."""
    def zscore(plans: dict, folder: Path) -> None:
        plans["configurations"][CONFIG]["normalization_schemes"] = ["ZScoreNormalization"]
    return hostile_copy(tiny_model, tmp_path, zscore)


def test_contradictory_or_missing_calibration_is_refused_before_anything_is_written(tiny_model, zscore_model, tmp_path):
    before = tree_digest(tiny_model)
    cases = [(tiny_model, {"calibration": [sample_ct()], "weight_only": True}, "not both"),
             (tiny_model, {"weight_only": "yes"}, "weight_only is true or false, not 'yes'"),
             (zscore_model, {}, "calibration volumes are required for this model (its normalisation is "
                                "ZScoreNormalization, not CT")]
    for source, options, message in cases:
        with pytest.raises(PolicyError, match="--weight-only|weight_only") as caught:
            compress_model_folder(source, tmp_path / "out", POLICY, **options)
        assert message in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() and tree_digest(tiny_model) == before
    compress_model_folder(zscore_model, tmp_path / "out", POLICY, weight_only=True)
    assert record(tmp_path / "out")["calibration"]["source"] == "none"


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """``tuckersegment compress ARGS --quiet``: exit status, stdout, stderr."""
    status = main(["compress", *args, "--quiet"])
    out, err = capsys.readouterr()
    return status, out, err


def test_the_cli_says_where_calibration_came_from(tiny_model, tmp_path, capsys):
    status, out, err = cli(capsys, str(tiny_model), str(tmp_path / "default"), "--factor", "0.5", "--rank-min", "2")
    assert status == 0, err
    assert out.splitlines()[0] == ("calibration: the bundled sample chest CT (no --calibration given; pass "
                                   "--calibration with CTs like yours for ranks fitted to them)")
    assert "(activation-aware, 4 calibration patches; agreement with the original" in out
    status, out, err = cli(capsys, str(tiny_model), str(tmp_path / "weights"), "--factor", "0.5", "--weight-only")
    assert status == 0, err
    assert out.splitlines()[0] == "calibration: none (--weight-only: ranks and factors from the weights alone)"
    assert "(weight-only)" in out
    status, out, err = cli(capsys, str(tiny_model), str(tmp_path / "mine"), "--factor", "0.5",
                           "--calibration", str(sample_ct()), "--json")
    assert json.loads(out)["0"]["calibration"] == {"source": "user", "volumes": [SAMPLE_CT],
                                                   "description": "your 1 CT volume(s)"}


def test_the_cli_refuses_weight_only_with_calibration_and_a_non_ct_model_without_either(tiny_model, zscore_model,
                                                                                       tmp_path, capsys):
    for args, message in (([str(tiny_model), "--weight-only", "--calibration", str(sample_ct())], "not both"),
                          ([str(zscore_model)], "pass images like the ones it segments (--calibration CT...) or ask "
                                                "for weight-only (--weight-only)")):
        status, out, err = cli(capsys, *args[:1], str(tmp_path / "out"), *args[1:])
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1 and out == "", err
        assert err.startswith("tuckersegment: error: ") and not (tmp_path / "out").exists()


def test_the_worker_calibrates_on_the_sample_ct_by_default_and_passes_weight_only(tiny_model, tmp_path):
    worker = Worker(io.BytesIO())
    request = {"source": str(tiny_model), "policy": "uniform", "target": 0.5, "measure": False}
    review = worker.compress(request | {"output": str(tmp_path / "default")}, lambda fraction, message: None)
    assert review["compressed"]["params"] < review["original"]["params"]
    assert record(tmp_path / "default")["calibration"]["source"] == "sample"
    worker.compress(request | {"output": str(tmp_path / "weights"), "weight_only": True}, lambda fraction, message: None)
    assert record(tmp_path / "weights")["calibration"]["source"] == "none"
    with pytest.raises(TuckerSegmentError, match="^weight_only must be true or false, not 1$"):  # the request's check
        worker.compress(request | {"output": str(tmp_path / "bad"), "weight_only": 1}, lambda fraction, message: None)
    assert not (tmp_path / "bad").exists()
