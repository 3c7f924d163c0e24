"""Compression followed by label-free distillation into one output: ``compress --distill N`` (Tucker and pruning),
the worker's compress request, ``build-variants --distill N``; interrupted runs resume, other settings start over,
and bad values are refused in one line with nothing written and the source untouched."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from conftest import tree_digest
from test_distill import phantom
from TuckerSegmentLib import cli
from TuckerSegmentLib.errors import Interrupted, TuckerSegmentError
from TuckerSegmentLib.image.volume import volume_to_image
from TuckerSegmentLib.nnunet.layout import TUCKER_JSON
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.recovery import compress_distill
from TuckerSegmentLib.paths import distill_source_folder
from TuckerSegmentLib.paths import state_folder
from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task
from TuckerSegmentLib.variants.build import build_variant
from TuckerSegmentLib.variants.catalogue import MANIFEST, catalogue, find_variant, variant_dir
from TuckerSegmentLib.runtime.hardware import cpu_device
from TuckerSegmentLib.variants.panel import variant_choices
from TuckerSegmentLib.worker import protocol
from TuckerSegmentLib.worker.client import WorkerClient, worker_command
from TuckerSegmentLib.worker.process import SubprocessChild


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ct") / "phantom.nii.gz"
    sitk.WriteImage(volume_to_image(phantom()), str(path))
    return path


def record(folder: Path) -> dict:
    return json.loads((folder / "fold_0" / TUCKER_JSON).read_text())


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return ModelFolder.open(folder).load_network(0).state_dict()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name) and p != out)


def test_compress_distill_writes_the_compressed_model_trained_towards_the_original(tiny_model, ct_file, tmp_path,
                                                                                 capsys):
    source_before = tree_digest(tiny_model)
    base = ["compress", str(tiny_model), "--factor", "0.5", "--calibration", str(ct_file)]
    assert cli.main([*base[:2], str(tmp_path / "plain"), *base[2:], "--quiet"]) == 0
    capsys.readouterr()
    out = tmp_path / "distilled"
    assert cli.main([*base[:2], str(out), *base[2:], "--distill", "2", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "calibration: your 1 CT volume(s) (phantom.nii.gz)" in printed.out
    assert "distilled 2 iterations (all parameters trained" in printed.out and f"wrote {out}" in printed.out
    assert "distilling [  2/2] loss" in printed.err
    plain, distilled = record(tmp_path / "plain"), record(out)
    recovery = distilled["recovery"]
    assert recovery["method"] == "distillation" and recovery["iterations"] == 2 and len(recovery["log"]) == 2
    assert recovery["calibration"] == ["phantom.nii.gz"] and recovery["device"] == "cpu"
    assert recovery["teacher"]["sha256"] == plain["source"]["sha256"] == distilled["source"]["sha256"]
    assert {"before", "after"} <= set(recovery["agreement"]) and recovery["kl"]["before"] > 0
    assert distilled["layers"] == plain["layers"] and distilled["policy"] == plain["policy"]
    assert distilled["calibration"] == plain["calibration"]  # compressed as plain compress does, then trained
    a, b = weights(tmp_path / "plain"), weights(out)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert len(changed) > len(a) // 2  # every parameter trained: the weights moved
    assert leftovers(out) == [] and tree_digest(tiny_model) == source_before
    assert cli.main(["compress", str(tiny_model), str(tmp_path / "json"), "--factor", "0.5", "--distill", "1",
                     "--device", "cpu", "--quiet", "--json"]) == 0  # the bundled sample CT for both steps
    printed = json.loads(capsys.readouterr().out)
    assert printed["0"]["recovery"]["calibration"] == ["CTChest4.nrrd"] and printed["0"]["calibration"]["source"] == "sample"


def test_pruned_models_distil_on_the_calibration_cts_they_did_not_need(tiny_model, ct_file, tmp_path, capsys):
    out = tmp_path / "l1"
    assert cli.main(["compress", str(tiny_model), str(out), "--method", "prune-l1", "--target-flops", "0.5",
                     "--calibration", str(ct_file), "--distill", "1", "--device", "cpu", "--quiet"]) == 0
    pruned = record(out)
    assert "pruning" in pruned and pruned["calibration"]["source"] == "none"  # pruning itself used the weights alone
    assert pruned["recovery"]["calibration"] == ["phantom.nii.gz"] and pruned["recovery"]["trained"] == "all"
    assert "data: weight-only" in capsys.readouterr().out


def interrupt_first_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """The next distillation stops after its first iteration, as Ctrl-C would (its state is saved)."""
    real = compress_distill.distill_model_folder

    def stopped(*args, **kwargs):
        def stop(done: int, total: int, message: str) -> None:
            raise Interrupted(signal.SIGINT)
        monkeypatch.setattr(compress_distill, "distill_model_folder", real)
        return real(*args, **{**kwargs, "progress": stop})
    monkeypatch.setattr(compress_distill, "distill_model_folder", stopped)


def test_an_interrupted_compress_distill_resumes_and_other_settings_start_over(tiny_model, ct_file, tmp_path, capsys,
                                                                               monkeypatch):
    out = tmp_path / "out"
    argv = ["compress", str(tiny_model), str(out), "--factor", "0.5", "--calibration", str(ct_file), "--distill", "3",
            "--device", "cpu", "--quiet"]
    interrupt_first_run(monkeypatch)
    assert cli.main(argv) == 128 + signal.SIGINT
    assert "cancelled (SIGINT)" in capsys.readouterr().err
    assert not out.exists() and leftovers(out) == ["out.distill-source", "out.distill-state"]
    assert cli.main([*argv[:-1]]) == 0  # not quiet: says what it kept
    printed = capsys.readouterr()
    assert "compressed model kept from an interrupted run" in printed.err
    assert "compression: kept from an interrupted run of the same command" in printed.out
    assert record(out)["recovery"]["resumed"] == 1 and record(out)["recovery"]["iterations"] == 3
    assert leftovers(out) == []

    other = tmp_path / "other"
    interrupt_first_run(monkeypatch)
    assert cli.main([*argv[:2], str(other), *argv[3:]]) == 128 + signal.SIGINT
    assert (state_folder(other, "distill") / "state.json").is_file() and distill_source_folder(other).is_dir()
    capsys.readouterr()
    assert cli.main([*argv[:2], str(other), "--factor", "0.7", *argv[5:]]) == 0  # another compression: fresh
    assert record(other)["recovery"]["resumed"] == 0 and record(other)["policy"]["params"]["factor"] == 0.7
    assert leftovers(other) == []


@pytest.mark.parametrize("value", ["-1", "1.5", "abc", ""])
def test_a_distill_value_that_is_not_a_count_is_a_usage_error(tiny_model, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stop:
        cli.main(["compress", str(tiny_model), str(tmp_path / "out"), "--distill", value])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and len(err.splitlines()) == 1
    assert "argument --distill: a whole number of distillation iterations (0: none)" in err
    assert list(tmp_path.iterdir()) == []


def test_distill_options_that_cannot_work_are_refused_in_one_line_with_nothing_written(tiny_model, ct_file, tmp_path,
                                                                                      capsys):
    source_before = tree_digest(tiny_model)
    base = ["compress", str(tiny_model), str(tmp_path / "out"), "--distill", "2"]
    for extra, words in ((["--weight-only"], "weight-only compression uses none"),
                         (["--fold", "0", "1"], "--distill trains one fold"),
                         (["--distill", "100001"], "from 0 (none) to 100000 (about a day at a second an iteration), not 100001"),
                         (["--method", "prune-l1", "--runtime", "torch"], "with --distill, --device is where"),
                         (["--calibration", str(tmp_path / "missing.nii.gz")], "missing.nii.gz")):
        assert cli.main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("tuckersegment: error:") and words in err, err
        assert list(tmp_path.iterdir()) == []
    assert tree_digest(tiny_model) == source_before


def test_the_worker_compresses_then_distils_and_refuses_bad_counts(tiny_model, tmp_path):
    volume = phantom()
    protocol.save_volume(tmp_path / "ct.npz", volume.array, volume.ijk_to_ras)
    source_before = tree_digest(tiny_model)
    request = {"source": str(tiny_model), "policy": "uniform", "target": 0.5, "calibration": [str(tmp_path / "ct.npz")],
               "device": "cpu", "measure": False}
    worker = WorkerClient(SubprocessChild, *worker_command())
    try:
        for bad in (-1, 1.5, "2", True, None, 10 ** 9, [2]):
            with pytest.raises(TuckerSegmentError, match="^distillation takes a whole number of iterations"):
                worker.run("compress", {**request, "output": str(tmp_path / "bad"), "distill": bad})
        with pytest.raises(TuckerSegmentError, match="weight-only compression uses none"):
            worker.run("compress", {**request, "output": str(tmp_path / "bad"), "distill": 1, "weight_only": True})
        assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.npz"]
        messages = []
        review = worker.run("compress", {**request, "output": str(tmp_path / "out"), "distill": 2},
                            progress=lambda fraction, message: messages.append((fraction, message)))
    finally:
        worker.shutdown()
    recovery = record(tmp_path / "out")["recovery"]
    assert recovery["iterations"] == 2 and recovery["calibration"] == ["volume 1"]
    assert review["output"] == str((tmp_path / "out").resolve()) and 0 <= review["agreement"] <= 1
    assert review["notes"] == [f"distilled 2 iterations from the original (label-free, {recovery['seconds']:.0f} s on "
                               f"cpu): held-out agreement {recovery['agreement']['before']} -> "
                               f"{recovery['agreement']['after']}"]
    distilling = [f for f, m in messages if m.startswith("distilling, iteration ")]
    assert [m for _, m in messages if m.startswith("distilling, iteration ")][-1].startswith("distilling, iteration 2/2")
    assert distilling == sorted(distilling) and 0.3 < distilling[0] <= distilling[-1] == pytest.approx(0.6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.npz", "out"] and tree_digest(tiny_model) == source_before


def test_build_variants_distils_each_variant_before_measuring_it_and_resumes(ts_home, capsys, monkeypatch):
    write_totalsegmentator_task(ts_home, "fastest", divisor=8)
    argv = ["build-variants", "--variant", "fastest-tucker-0.5", "--device", "cpu", "--quiet"]
    interrupt_first_run(monkeypatch)
    with pytest.raises(Interrupted):
        build_variant(find_variant(catalogue(), "fastest-tucker-0.5"), measure=False, distill=2,
                          device=cpu_device())
    variant = find_variant(catalogue(), "fastest-tucker-0.5")
    built = variant_dir(variant) / "Dataset298_TotalSegmentator_total_6mm_1559subj"
    assert variant.availability == "damaged" and not built.exists()  # half-built: never used
    assert leftovers(built) == [f"{built.name}.distill-source", f"{built.name}.distill-state"]
    assert cli.main([*argv, "--distill", "2"]) == 0
    printed = capsys.readouterr().out
    variant = find_variant(catalogue(), "fastest-tucker-0.5")
    manifest = json.loads((variant_dir(variant) / MANIFEST).read_text())
    assert variant.availability == "built" and variant.distilled == 2 and leftovers(built) == []
    assert manifest["distillation"]["iterations"] == 2 and manifest["distillation"]["device"] == "cpu"
    assert manifest["distillation"]["on"] == "the other blocks of the bundled sample chest CT"
    recovery = record(built)["recovery"]
    assert recovery["iterations"] == 2 and recovery["resumed"] == 1
    assert recovery["calibration"][0].startswith("volume 1 (") and "of its voxels" in recovery["calibration"][0]
    assert manifest["models"][0]["distillation"]["agreement"] == recovery["agreement"]
    assert variant.measured is not None and variant.measured["how"].startswith("held-out blocks of the bundled")
    assert "fastest-tucker-0.5: built in" in printed and "; distilled 2 iterations; " in printed

    assert cli.main(["variants", "--json"]) == 0
    row = next(r for r in json.loads(capsys.readouterr().out)["variants"] if r["id"] == "fastest-tucker-0.5")
    assert row["distilled"] == 2
    assert cli.main(["variants"]) == 0
    assert "distilled after compression (label-free, from the original): fastest-tucker-0.5 (2 iterations)" in \
        capsys.readouterr().out
    choice = next(c for c in variant_choices("fastest", catalogue(), [cpu_device()], "cpu", []) if c.key == variant.id)
    assert choice.label == "fastest-tucker-0.5 (built, distilled)" and "distilled 2 iterations" in choice.tooltip

    files = tree_digest(built)
    assert cli.main(argv) == 0 and tree_digest(built) == files  # without --distill: kept as built
    assert cli.main([*argv, "--distill", "0", "--no-measure"]) == 0  # 0: rebuilt without distillation
    variant = find_variant(catalogue(), "fastest-tucker-0.5")
    assert variant.distilled == 0 and "recovery" not in record(built) and variant.measured is None
