"""The tuckersegment command line, run as a user runs it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import tree_digest


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", *args], capture_output=True, text=True)


def test_info_json_of_an_original_folder(tiny_model):
    result = run("info", str(tiny_model), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["compressed"] is False and info["policy"] == "original"
    assert info["patch_size"] == [32, 32, 32] and info["outputs"] == 4
    assert info["params"] > 0 and info["flops"] > 0 and info["weights_bytes"] == 4 * info["params"]


def test_compress_then_info(tiny_model, tmp_path):
    out = tmp_path / "tiny_05"
    result = run("compress", str(tiny_model), str(out), "--factor", "0.5", "--rank-min", "2")
    assert result.returncode == 0, result.stderr
    assert "[  1/" in result.stderr and "encoder.stages.0.0.convs.0.conv" in result.stderr
    assert "parameters" in result.stdout and "FLOPs/patch" in result.stdout
    original = json.loads(run("info", str(tiny_model), "--json").stdout)
    compressed = json.loads(run("info", str(out), "--json").stdout)
    assert compressed["compressed"] is True
    assert compressed["policy"] == {"name": "uniform", "params": {"factor": 0.5, "rank_min": 2}}
    assert compressed["params"] < original["params"] and compressed["flops"] < original["flops"]
    human = run("info", str(out))
    assert "Compressed     yes: uniform" in human.stdout and "Parameters" in human.stdout


def test_bad_factor_is_a_clear_error_and_writes_nothing(tiny_model, tmp_path):
    before = tree_digest(tiny_model)
    for factor in ("0", "1.5", "-0.2"):
        result = run("compress", str(tiny_model), str(tmp_path / "out"), "--factor", factor)
        assert result.returncode == 2
        assert "error: factor must be a number in (0, 1]" in result.stderr and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == [] and tree_digest(tiny_model) == before


def test_compression_method_options_must_name_one_method_and_one_target(tiny_model, tmp_path):
    before = tree_digest(tiny_model)
    out = tmp_path / "out"
    for args, message in ((["--factor", "0.5", "--target-flops", "0.3"], "more than one compression method"),
                          (["--policy", "flops", "--keep", "0.9"], "more than one compression method"),
                          (["--target-flops", "0.3", "--target", "0.5"], "or two targets"),
                          (["--policy", "vbmf", "--target", "0.5"], "the vbmf method chooses its ranks itself"),
                          (["--policy", "energy", "--target", "1.5"], "keep must be a fraction in (0, 1]")):
        result = run("compress", str(tiny_model), str(out), *args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, args
    result = run("compress", str(tiny_model), str(out), "--policy", "budget")  # the old name is not a method
    assert result.returncode == 2 and "invalid choice: 'budget'" in result.stderr
    assert not out.exists() and tree_digest(tiny_model) == before


def test_policy_and_target_name_the_same_policy_as_the_shortcuts(tiny_model, tmp_path):
    shortcut = run("compress", str(tiny_model), str(tmp_path / "a"), "--factor", "0.5", "--rank-min", "2", "--json")
    method = run("compress", str(tiny_model), str(tmp_path / "b"), "--policy", "uniform", "--target", "0.5",
                 "--rank-min", "2", "--json")
    assert shortcut.returncode == method.returncode == 0, shortcut.stderr + method.stderr
    a, b = json.loads(shortcut.stdout), json.loads(method.stdout)
    assert a["0"]["policy"] == b["0"]["policy"] == {"name": "uniform", "params": {"factor": 0.5, "rank_min": 2}}
    assert a["0"]["after"] == b["0"]["after"]


def test_missing_folder_is_a_clear_error(tmp_path):
    result = run("info", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "does not exist" in result.stderr and "Traceback" not in result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).with_name("tuckersegment")
    result = subprocess.run([str(script), "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("tuckersegment ")


def write_ct(path: Path, shape=(16, 32, 30), seed=0) -> Path:
    import numpy as np
    import SimpleITK as sitk
    rng = np.random.default_rng(seed)
    array = np.full(shape, -1000.0, np.float32)
    array[:, 6:26, 5:25] = 40 + rng.normal(0, 20, (shape[0], 20, 20))
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


def test_segment_a_batch_into_a_folder_with_one_model_load(tiny_model, tmp_path):
    inputs = [write_ct(tmp_path / "a.nii.gz"), write_ct(tmp_path / "b.nrrd", seed=1)]
    out = tmp_path / "labels"
    result = run("segment", *map(str, inputs), str(out), "--model", str(tiny_model), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "b.seg.nrrd"]
    assert result.stderr.count("model: ") == 1 and "model folder named on the command line" in result.stderr
    assert "a.nii.gz ->" in result.stdout and "structures" in result.stdout and "on cpu" in result.stdout
    assert "50% 1/2 a.nii.gz: done" in result.stderr and "100% 2/2 b.nrrd: done" in result.stderr  # per volume


def test_a_model_s_first_conversion_for_openvino_is_announced_once(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))  # the command inherits an empty cache
    ct = write_ct(tmp_path / "a.nii.gz")
    first = run("segment", str(ct), str(tmp_path / "first.seg.nrrd"), "--model", str(tiny_model), "--device", "cpu")
    assert first.returncode == 0, first.stderr
    assert first.stderr.count("converting for OpenVINO, once for this model…") == 1
    again = run("segment", str(ct), str(tmp_path / "again.seg.nrrd"), "--model", str(tiny_model), "--device", "cpu")
    assert again.returncode == 0 and "converting for OpenVINO" not in again.stderr  # loaded from the cache
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "other-cache"))  # converted again, silently
    quiet = run("segment", str(ct), str(tmp_path / "quiet.seg.nrrd"), "--model", str(tiny_model), "--quiet")
    assert quiet.returncode == 0 and "converting" not in quiet.stderr
    assert any((tmp_path / "other-cache" / "openvino").iterdir())


def test_segment_batch_reports_a_bad_input_and_writes_the_others(tiny_model, tmp_path):
    good = write_ct(tmp_path / "good.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    out = tmp_path / "labels"
    result = run("segment", str(good), str(bad), str(out), "--model", str(tiny_model), "--format", "nii.gz")
    assert result.returncode == 2
    assert "bad.nii.gz: cannot read" in result.stderr and "it cannot be decompressed" in result.stderr
    assert "1 of 2 inputs failed" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz"]


def test_segment_refuses_bad_arguments_before_loading_a_model(tmp_path):
    ct = write_ct(tmp_path / "ct.nii.gz")
    for args, message in ((["segment", str(ct)], "at least one CT volume and an output"),
                          (["segment", str(ct), str(tmp_path / "out.txt.gz")], "cannot tell the output format"),
                          (["segment", str(ct), str(tmp_path / "x.seg.nrrd"), "--model", str(tmp_path / "none")],
                           "no such folder and no variant of that id")):
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def run_on_a_terminal(*args: str) -> tuple[int, str]:
    """Run the command with a pseudo-terminal as its stderr (as in a shell); its exit status and what it showed."""
    import os
    import pty
    main, follower = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "TuckerSegmentLib.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the terminal closed with the process (EIO on Linux)
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    return process.wait(timeout=600), shown.decode(errors="replace")


def test_progress_is_a_bar_with_eta_on_a_terminal_and_plain_lines_otherwise(tiny_model, tmp_path):
    command = ("compress", str(tiny_model), "--factor", "0.5", "--rank-min", "2", "--weight-only")
    code, shown = run_on_a_terminal(command[0], command[1], str(tmp_path / "on_terminal"), *command[2:])
    assert code == 0, shown
    assert "decomposing: 100%|" in shown and "elapsed, ETA" in shown and "\r" in shown  # one bar, redrawn
    plain = run(command[0], command[1], str(tmp_path / "in_a_log"), *command[2:])
    assert plain.returncode == 0, plain.stderr
    lines = plain.stderr.splitlines()
    assert "ETA" not in plain.stderr and "\r" not in plain.stderr
    assert lines[0].startswith("decomposing [  1/") and all(line.startswith("decomposing [") for line in lines)
    quiet = run(command[0], command[1], str(tmp_path / "quiet"), *command[2:], "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
