"""Label-free recovery by distillation: the compressed network moves towards its original on patches it never
trained on, the original stays byte-identical, the output is a loadable compressed folder, an interrupted run
resumes, and bad inputs are refused in one line with nothing written."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import tree_digest
from TuckerSegmentLib import cli
from TuckerSegmentLib.compress.calibration_data import CalibrationVolume, calibration_patches
from TuckerSegmentLib.errors import Interrupted, ModelFolderError
from TuckerSegmentLib.image.holdout import holdout_mask
from TuckerSegmentLib.image.volume import Volume, volume_to_image
from TuckerSegmentLib.nnunet.layout import TUCKER_JSON
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.recovery.distill import distill_model_folder, distillation_loss
from TuckerSegmentLib.paths import state_folder
from TuckerSegmentLib.recovery.resume import NETWORK_FILE, ResumeStateError
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.example_models import write_example_model


def phantom(shape=(40, 48, 48), spacing=3.0, seed=0) -> Volume:
    """Air around a soft-tissue body holding a bone block, a fat disc and a contrast-filled sphere (HU)."""
    rng = np.random.default_rng(seed)
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    array = np.full(shape, -1000.0)
    array[(j / 0.8) ** 2 + (i / 0.9) ** 2 < 1] = 40.0
    array[(np.abs(i - 0.4) < 0.2) & (np.abs(j) < 0.3)] = 700.0
    array[((i + 0.4) ** 2 + j ** 2 < 0.1) & (np.abs(k) < 0.5)] = -100.0
    array[(i + 0.1) ** 2 + (j - 0.4) ** 2 + k ** 2 < 0.08] = 250.0
    array += rng.normal(0, 20, shape)
    return Volume(array.astype(np.float32), np.diag([spacing, spacing, spacing, 1.0]))


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ct") / "phantom.nii.gz"
    sitk.WriteImage(volume_to_image(phantom()), str(path))
    return path


def held_out_error(model_dir: Path, teacher_dir: Path, volume: Volume) -> float:
    """Mean KL divergence of a folder's network from the teacher's on the held-out half of ``volume``."""
    model = ModelFolder.open(model_dir)
    student, teacher = model.load_network(0), ModelFolder.open(teacher_dir).load_network(0)
    patches = list(calibration_patches(model, [CalibrationVolume(volume, holdout_mask(volume.array.shape))], 4))
    with torch.no_grad():
        return float(np.mean([float(distillation_loss(student(p.image), teacher(p.image), p.mask[:, 0].float()))
                              for p in patches]))


def test_distillation_moves_the_network_towards_the_original_on_held_out_patches(tiny_model, tiny_compressed, tmp_path):
    volume = phantom()
    teacher_before, student_before = tree_digest(tiny_model), tree_digest(tiny_compressed)
    training_half = CalibrationVolume(volume, ~holdout_mask(volume.array.shape))
    out = tmp_path / "distilled"
    steps = []
    record = distill_model_folder(tiny_compressed, tiny_model, [training_half], out, iterations=40, lr=1e-3,
                                  device="cpu", log_every=10, progress=lambda *step: steps.append(step))
    before, after = held_out_error(tiny_compressed, tiny_model, volume), held_out_error(out, tiny_model, volume)
    assert after < 0.8 * before, (before, after)
    assert tree_digest(tiny_model) == teacher_before and tree_digest(tiny_compressed) == student_before
    assert [s[0] for s in steps] == list(range(1, 41)) and all(s[1] == 40 for s in steps)  # a bar with ETA
    assert [s[2] for s in steps[:10]] == [""] * 9 + [f"loss {record['log'][0]['loss']:.4f}"]
    assert not state_folder(out, "distill").exists()
    tucker = json.loads((out / "fold_0" / TUCKER_JSON).read_text())
    source = json.loads((tiny_compressed / "fold_0" / TUCKER_JSON).read_text())
    assert tucker["layers"] == source["layers"] and tucker["policy"] == source["policy"]
    assert tucker["recovery"] == record and record["method"] == "distillation"
    assert record["teacher"]["sha256"] == source["source"]["sha256"] and record["iterations"] == 40
    assert record["trained"] in ("factorised", "all") and len(record["log"]) == 4
    assert record["kl"]["after"] < record["kl"]["before"]
    assert {"before", "after"} <= set(record["agreement"])
    result = Segmenter(out, device="cpu", runtime="torch", execution="reference").segment(volume)
    assert result.labels.shape == volume.array.shape


def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(tiny_model, tiny_compressed, ct_file, tmp_path):
    settings = dict(iterations=8, lr=1e-3, device="cpu", log_every=2)
    whole = distill_model_folder(tiny_compressed, tiny_model, [ct_file], tmp_path / "whole", **settings)

    def stop_after_four(done: int, total: int, message: str) -> None:
        if done == 4:
            raise Interrupted(signal.SIGINT)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        distill_model_folder(tiny_compressed, tiny_model, [ct_file], out, progress=stop_after_four, **settings)
    state = state_folder(out, "distill")
    assert not out.exists() and json.loads((state / "state.json").read_text())["record"]["iteration"] == 4
    seen = []
    record = distill_model_folder(tiny_compressed, tiny_model, [ct_file], out, progress=lambda d, t, m: seen.append(d),
                                  **settings)
    assert seen == [5, 6, 7, 8] and record["resumed"] == 1 and record["iterations"] == 8
    assert [e["iteration"] for e in record["log"]] == [2, 4, 6, 8]
    assert not state.exists() and out.is_dir()
    assert [e["loss"] for e in record["log"]] == pytest.approx([e["loss"] for e in whole["log"]], rel=1e-4)
    a, b = ModelFolder.open(out).load_network(0), ModelFolder.open(tmp_path / "whole").load_network(0)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)


def refused(argv: list[str], capsys: pytest.CaptureFixture[str], root: Path) -> str:
    """Run the CLI, expect one error line and exit status 2, and nothing new under ``root``."""
    before = sorted(p for p in root.rglob("*"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("tuckersegment: error:"), err
    assert sorted(p for p in root.rglob("*")) == before
    return err


def test_hostile_inputs_are_refused_in_one_line_with_nothing_written(tiny_model, tiny_compressed, ct_file, tmp_path,
                                                                     capsys):
    out = tmp_path / "out"
    base = ["distill", str(tiny_compressed), "--teacher", str(tiny_model), "--device", "cpu", "--quiet"]
    teacher_digest = tree_digest(tiny_model)
    assert "is the compressed model folder" in refused([*base, "--calibration", str(ct_file), str(tiny_compressed)],
                                                        capsys, tmp_path)
    assert "lies inside the compressed model folder" in refused(
        [*base, "--calibration", str(ct_file), str(tiny_compressed / "inside")], capsys, tmp_path)
    assert "lies inside the teacher model folder" in refused([*base, "--calibration", str(ct_file),
                                                              str(tiny_model / "x")], capsys, tmp_path)
    other = tmp_path / "models" / tiny_model.name
    shutil.copytree(tiny_model, other)
    dataset = json.loads((other / "dataset.json").read_text())
    dataset["labels"] = {(k if k == "background" else "other " + k): v for k, v in dataset["labels"].items()}
    (other / "dataset.json").write_text(json.dumps(dataset))
    err = refused(["distill", str(tiny_compressed), "--teacher", str(other), "--calibration", str(ct_file), str(out)],
                  capsys, tmp_path)
    assert "another model" in err
    retrained = write_example_model(tmp_path / "retrained", "tiny", seed=7)
    assert "another checkpoint" in refused(["distill", str(tiny_compressed), "--teacher", str(retrained), "--calibration",
                                            str(ct_file), str(out)], capsys, tmp_path)
    assert "missing.nii.gz" in refused([*base, "--calibration", str(tmp_path / "missing.nii.gz"), str(out)], capsys,
                                       tmp_path)
    long_name = tmp_path / ("n" * 230)  # fits the file system, but its .distill-state beside it would not
    assert f"output name {'n' * 40}... is 230 bytes long; at most 207 leave room for the files written beside it" in \
        refused([*base, "--calibration", str(ct_file), str(long_name)], capsys, tmp_path)
    assert "iterations" in refused([*base, "--calibration", str(ct_file), str(out), "--iterations", "0"], capsys,
                                   tmp_path)
    assert "not compressed" in refused(["distill", str(tiny_model), "--teacher", str(tiny_model), "--calibration",
                                        str(ct_file), str(out)], capsys, tmp_path)
    assert tree_digest(tiny_model) == teacher_digest


def test_a_state_made_for_other_inputs_or_altered_is_refused(tiny_model, tiny_compressed, ct_file, tmp_path, capsys):
    out = tmp_path / "out"

    def stop(done: int, total: int, message: str) -> None:
        raise Interrupted(signal.SIGTERM)
    with pytest.raises(Interrupted):
        distill_model_folder(tiny_compressed, tiny_model, [ct_file], out, iterations=4, lr=1e-3, device="cpu",
                             log_every=1, progress=stop)  # log_every as the command line's for 4 iterations
    state = state_folder(out, "distill")
    argv = ["distill", str(tiny_compressed), "--teacher", str(tiny_model), "--calibration", str(ct_file), str(out),
            "--iterations", "4", "--device", "cpu", "--quiet"]
    err = refused([*argv, "--lr", "0.01"], capsys, tmp_path)  # other settings than the saved state's
    assert str(state) in err and "lr" in err
    data = bytearray((state / NETWORK_FILE).read_bytes())
    data[-5] ^= 0xFF
    (state / NETWORK_FILE).write_bytes(bytes(data))
    err = refused([*argv, "--lr", "0.001"], capsys, tmp_path)
    assert str(state) in err and NETWORK_FILE in err
    with pytest.raises(ResumeStateError):
        distill_model_folder(tiny_compressed, tiny_model, [ct_file], out, iterations=4, lr=1e-3, device="cpu", log_every=1)
    shutil.rmtree(state)
    with pytest.raises(ModelFolderError):
        distill_model_folder(tiny_compressed, tiny_compressed, [ct_file], out, iterations=4, device="cpu")


def test_ctrl_c_mid_iteration_keeps_a_whole_state_and_says_where(tiny_model, tiny_compressed, ct_file, tmp_path):
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "TuckerSegmentLib.cli", "distill", str(tiny_compressed), "--teacher", str(tiny_model),
            "--calibration", str(ct_file), str(out), "--device", "cpu"]
    too_many = subprocess.run([*argv, "--iterations", str(10 ** 12)], capture_output=True, text=True, timeout=120)
    assert too_many.returncode == 2 and "iterations must be a whole number from 1 to 100000" in too_many.stderr
    run = subprocess.Popen([*argv, "--iterations", "100000"], stderr=subprocess.PIPE, text=True)
    first = run.stderr.readline()  # without a terminal: a line each time a loss is logged (every 25 iterations here)
    assert first.startswith("distilling [ 25/100000] loss "), first
    run.send_signal(signal.SIGINT)  # mid-iteration, almost surely: the state saved must still be whole
    started = time.monotonic()
    rest = run.communicate(timeout=60)[1]
    assert time.monotonic() - started < 10 and run.returncode == 128 + signal.SIGINT
    saved = json.loads((state_folder(out, "distill") / "state.json").read_text())["record"]["iteration"]
    assert saved >= 25 and not out.exists()
    assert rest.strip().splitlines()[-1] == (
        f"tuckersegment: cancelled (SIGINT); nothing partial was written; the distillation's state after iteration "
        f"{saved} is in {state_folder(out, 'distill')}: run the same command again to resume from it")
    again = subprocess.Popen([*argv, "--iterations", "100000"], stderr=subprocess.PIPE, text=True)
    line = again.stderr.readline()  # the saved state loads (every file's hash checked) and training goes on from it
    assert line.startswith(f"distilling [{saved + 1:>3}/100000] loss "), line
    again.send_signal(signal.SIGTERM)
    assert again.communicate(timeout=60)[1].strip().endswith("run the same command again to resume from it")
    assert again.returncode == 128 + signal.SIGTERM
