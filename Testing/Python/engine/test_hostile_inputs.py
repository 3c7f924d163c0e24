"""Hostile and clumsy model folders: nothing named by plans.json is imported or run, impossible values are
refused with the field named, and the CLI ends each case in one line, exit 2, nothing written, the source
untouched (folders generated here, nothing downloaded)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import CONFIG, arch, hostile_copy, hub_payload, tree_digest
from TuckerSegmentLib import ModelFolder
from TuckerSegmentLib.errors import CheckpointError, ModelFolderError
from TuckerSegmentLib.nnunet.checkpoint import load_checkpoint
from TuckerSegmentLib.runtime.hardware import cpu_device
from TuckerSegmentLib.variants.panel import structure_names

Edit = Callable[[dict[str, Any], Path], None]


def truncating_logger(plans: dict[str, Any], folder: Path) -> None:
    """logging.basicConfig opens (and truncates) the file it is given before it complains."""
    arch(plans)["network_class_name"] = "logging.basicConfig"
    arch(plans)["arch_kwargs"] = {"filename": str(folder.parent / "victim.txt"), "filemode": "w"}
    arch(plans)["_kw_requires_import"] = []


def configuration(key: str, value: Any) -> Edit:
    def edit(plans: dict[str, Any], folder: Path) -> None:
        plans["configurations"][CONFIG][key] = value
    return edit


def arch_kwarg(key: str, value: Any) -> Edit:
    def edit(plans: dict[str, Any], folder: Path) -> None:
        arch(plans)["arch_kwargs"][key] = value
    return edit


def top(key: str, value: Any) -> Edit:
    def edit(plans: dict[str, Any], folder: Path) -> None:
        plans[key] = value
    return edit


def circular(plans: dict[str, Any], folder: Path) -> None:
    plans["configurations"]["other"] = {"inherits_from": CONFIG}
    plans["configurations"][CONFIG]["inherits_from"] = "other"


def no_ct_statistics(plans: dict[str, Any], folder: Path) -> None:
    del plans["foreground_intensity_properties_per_channel"]["0"]["percentile_99_5"]


CASES: dict[str, tuple[Edit, str]] = {
    "torch.hub.load runs the folder's code": (hub_payload, "network_class_name names 'torch.hub.load'"),
    "logging.basicConfig truncates a file": (truncating_logger, "network_class_name names 'logging.basicConfig'"),
    "os.system as the convolution": (arch_kwarg("conv_op", "os.system"), "conv_op names 'os.system'"),
    "a class outside torch.nn as nonlinearity": (arch_kwarg("nonlin", "subprocess.Popen"),
                                                 "nonlin names 'subprocess.Popen'"),
    "an extra imported keyword": (lambda p, f: arch(p)["_kw_requires_import"].append("block"),
                                  "_kw_requires_import names 'block'"),
    "an unknown constructor keyword": (arch_kwarg("command", "rm -rf /"), "arch_kwargs.command is not a parameter"),
    "an unknown normalisation": (configuration("normalization_schemes", ["os.system"]),
                                 "normalization_schemes[0] names 'os.system'"),
    "an unknown resampling function": (configuration("resampling_fn_data", "eval"), "resampling_fn_data names 'eval'"),
    "an unknown label manager": (top("label_manager", "os.system"), "label_manager names 'os.system'"),
    "an unknown image reader": (top("image_reader_writer", "PickleIO"), "image_reader_writer names 'PickleIO'"),
    "circular inheritance": (circular, "inherits in a circle"),
    "patch size 0": (configuration("patch_size", [0, 32, 32]), "patch_size[0] is 0, not a whole number in 8–512"),
    "patch size as text": (configuration("patch_size", ["32", 32, 32]), "patch_size[0] is '32'"),
    "99 stages": (arch_kwarg("n_stages", 99), "n_stages is 99, not a whole number in 1–10"),
    "spacing 0": (configuration("spacing", [0, 3.0, 3.0]), "spacing[0] is 0, not a number in 0.05–50.0"),
    "spacing 1e-9": (configuration("spacing", [3.0, 1e-9, 3.0]), "spacing[1] is 1e-09"),
    "missing CT statistics": (no_ct_statistics, "foreground_intensity_properties_per_channel['0'].percentile_99_5 is None"),
    "an absolute data set name": (top("dataset_name", "/home/victim"), "dataset_name is '/home/victim', not a plain name"),
    "a data set name that climbs": (top("dataset_name", "../../victim"), "dataset_name is '../../victim', not a plain"),
    "a plans name with a separator": (top("plans_name", "plans/../../x"), "plans_name is 'plans/../../x', not a plain"),
    "a missing plans name": (top("plans_name", None), "plans_name is None, not a plain name"),
    "a data identifier that climbs": (configuration("data_identifier", "../x"), "data_identifier is '../x', not a plain"),
    "a cascade stage with a separator": (configuration("next_stage", ["3d_cascade_fullres", "a/b"]),
                                         "next_stage is 'a/b', not a plain name"),
    "stages and widths disagree": (arch_kwarg("features_per_stage", [8, 16]), "features_per_stage is [8, 16], not a list of 3"),
}


@pytest.mark.parametrize("case", CASES)
def test_plans_that_name_code_or_impossible_values_are_refused_before_anything_is_imported(tiny_model, tmp_path, case):
    edit, message = CASES[case]
    folder = hostile_copy(tiny_model, tmp_path, edit)
    victim = tmp_path / "models" / "victim.txt"
    victim.write_text("precious")
    before = tree_digest(folder)
    with pytest.raises(ModelFolderError, match="nothing from the folder was imported or run") as raised:
        ModelFolder.open(folder)
    assert message in str(raised.value) and str(folder) in str(raised.value)
    assert "\n" not in str(raised.value)
    assert not (folder / "PWNED").exists() and victim.read_text() == "precious" and tree_digest(folder) == before


@pytest.mark.parametrize("command", ["info", "segment", "compress"])
def test_the_cli_refuses_code_in_plans_for_every_command(tiny_model, tmp_path, command):
    folder = hostile_copy(tiny_model, tmp_path, hub_payload)
    before = tree_digest(folder)
    out = tmp_path / "out"
    ct = tmp_path / "ct.nii.gz"  # a readable CT, so the model is what fails
    sitk.WriteImage(sitk.GetImageFromArray(np.random.default_rng(0).normal(-500, 300, (16, 32, 32)).astype(np.float32)),
                    str(ct))
    args = {"info": [str(folder)], "compress": [str(folder), str(out)],
            "segment": [str(ct), str(tmp_path / "ct.seg.nrrd"), "--model", str(folder)]}
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", command, *args[command]],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr
    assert "network_class_name names 'torch.hub.load'" in run.stderr and "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 2  # the model line, then one error line
    assert not (folder / "PWNED").exists() and not out.exists() and not (tmp_path / "ct.seg.nrrd").exists()
    assert tree_digest(folder) == before


def test_the_panel_refuses_a_dataset_json_with_impossible_labels(tiny_model, tmp_path):
    folder = hostile_copy(tiny_model, tmp_path, lambda plans, folder: None)
    dataset = json.loads((folder / "dataset.json").read_text())
    dataset["labels"]["structure_1"] = "os.system"
    (folder / "dataset.json").write_text(json.dumps(dataset))
    with pytest.raises(ModelFolderError, match=r"dataset.json: labels\['structure_1'\] is 'os.system'"):
        structure_names("folder:" + str(folder), "auto", "auto", [cpu_device()])
    with pytest.raises(ModelFolderError, match=r"dataset.json: labels\['structure_1'\]"):
        ModelFolder.open(folder)


def test_old_format_plans_are_checked_too(tiny_model, tmp_path):
    def old(plans: dict[str, Any], folder: Path) -> None:
        config = plans["configurations"][CONFIG]
        del config["architecture"]
        config["UNet_class_name"] = "os.system"
    with pytest.raises(ModelFolderError, match="UNet_class_name names 'os.system'"):
        ModelFolder.open(hostile_copy(tiny_model, tmp_path / "name", old))

    def huge(plans: dict[str, Any], folder: Path) -> None:
        config = plans["configurations"][CONFIG]
        arch_kwargs = config.pop("architecture")["arch_kwargs"]
        config.update({"UNet_class_name": "PlainConvUNet", "UNet_base_num_features": 10 ** 9,
                       "unet_max_num_features": 320, "n_conv_per_stage_encoder": arch_kwargs["n_conv_per_stage"],
                       "n_conv_per_stage_decoder": arch_kwargs["n_conv_per_stage_decoder"],
                       "conv_kernel_sizes": arch_kwargs["kernel_sizes"], "pool_op_kernel_sizes": arch_kwargs["strides"]})
    with pytest.raises(ModelFolderError, match="UNet_base_num_features is 1000000000, not a whole number in 1–4096"):
        ModelFolder.open(hostile_copy(tiny_model, tmp_path / "size", huge))


class _RunsCode:
    """Pickles as a call of os.system (what a hostile checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_that_would_run_code_is_refused_as_code_not_as_corrupt(tiny_model, tmp_path):
    import torch
    folder = hostile_copy(tiny_model, tmp_path, lambda plans, folder: None)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    marker = tmp_path / "PWNED"
    state = load_checkpoint(checkpoint)
    torch.save({**state, "trainer_name": _RunsCode(marker)}, checkpoint)
    before = tree_digest(folder)
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "compress", str(folder), str(out), "--quiet"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr and not out.exists()
    assert "holds code: unpickling it would call" in run.stderr and "system; it was refused and nothing ran" in run.stderr
    assert "corrupt" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not marker.exists() and tree_digest(folder) == before
    with pytest.warns(UserWarning, match="fully unpickling"):  # what --trust-checkpoint means: the code runs
        ModelFolder.open(folder).load_network(0, trust=True)
    assert marker.exists()


def write_ct(path: Path, shape=(16, 32, 32)) -> Path:
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(-500, 300, shape).astype(np.float32))
    image.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("name, keep", [("ct.nii", 0.5), ("ct.nii.gz", 0.5), ("ct.nii.gz", 200)])
def test_a_truncated_nifti_is_refused_not_filled_with_zeros(tiny_model, tmp_path, name, keep):
    ct = write_ct(tmp_path / name)
    data = ct.read_bytes()
    ct.write_bytes(data[:int(len(data) * keep) if keep < 1 else keep])
    out = tmp_path / "out.nii.gz"
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "segment", str(ct), str(out),
                          "--model", str(tiny_model), "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert f"cannot read {ct}: " in run.stderr and "cut short; copy or export it again" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no output, no partial file


# a child under a file size limit must not write .pyc files: they would be cut short and break later imports
NO_BYTECODE = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}


def limited(limit: int) -> Callable[[], None]:
    """For a child process: files may grow to ``limit`` bytes, as on a full disk (and no SIGXFSZ kill)."""
    def apply() -> None:
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.parametrize("name", ["labels.nii", "labels.nii.gz", "labels.seg.nrrd"])
def test_a_full_disk_while_writing_a_segmentation_fails_cleanly(tiny_model, tmp_path, name):
    ct = write_ct(tmp_path / "ct.nrrd")
    out = tmp_path / "out"
    out.mkdir()
    empty_cache = {**NO_BYTECODE, "TUCKERSEGMENT_CACHE": str(tmp_path / "cache")}  # the OpenVINO cache's writes fail too
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "segment", str(ct), str(out / name),
                          "--model", str(tiny_model), "--quiet", "--execution", "reference"],
                         capture_output=True, text=True, timeout=300, preexec_fn=limited(300), env=empty_cache)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert f"{out / name}" in run.stderr and "disk space" in run.stderr
    assert list(out.iterdir()) == []  # neither a truncated file nor a partial one


def test_compress_on_a_full_disk_fails_cleanly_and_leaves_no_partial_folder(tiny_model, tmp_path):
    before = tree_digest(tiny_model)
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "compress", str(tiny_model),
                          str(tmp_path / "out"), "--factor", "0.5", "--quiet"],
                         capture_output=True, text=True, timeout=300, preexec_fn=limited(20_000),
                         env=NO_BYTECODE)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert "weights.safetensors" in run.stderr and "disk space" in run.stderr
    assert list(tmp_path.iterdir()) == [] and tree_digest(tiny_model) == before


@pytest.mark.parametrize("damage, message", [
    ("nan", "holds NaN or infinite values"), ("dtype", "is torch.float64, the network needs torch.float32")])
def test_compressed_weights_with_nan_or_another_dtype_are_refused(tiny_model, tmp_path, damage, message):
    import hashlib

    from safetensors.torch import load_file, save_file
    from TuckerSegmentLib import UniformPolicy, compress_model_folder
    out = tmp_path / "small"
    compress_model_folder(tiny_model, out, UniformPolicy(0.5, rank_min=2), weight_only=True)
    weights = out / "fold_0" / "weights.safetensors"
    tensors = load_file(str(weights))
    first = next(iter(tensors))
    tensors[first] = tensors[first].double() if damage == "dtype" else tensors[first] * float("nan")
    save_file(tensors, str(weights))
    record = json.loads((out / "fold_0" / "tucker.json").read_text())
    record["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # a consistent, altered folder
    (out / "fold_0" / "tucker.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match=f"holds weights TuckerSegment did not write \\({first} {message}"):
        ModelFolder.open(out).load_network(0)


def test_an_original_checkpoint_with_nan_weights_is_refused(tiny_model, tmp_path):
    import torch
    folder = hostile_copy(tiny_model, tmp_path, lambda plans, folder: None)
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    state = load_checkpoint(checkpoint)
    name = next(iter(state["network_weights"]))
    state["network_weights"][name] = state["network_weights"][name] * float("inf")
    torch.save(state, checkpoint)
    with pytest.raises(CheckpointError, match=f"hold NaN or infinite values \\({name}\\)"):
        ModelFolder.open(folder).load_network(0)


@pytest.mark.parametrize("args, message", [
    (["--tile-step", "0"], "tile step 0.0 is outside [0.25, 1]"), (["--tile-step", "-1"], "tile step -1.0 is outside"),
    (["--tile-step", "1e-9"], "tile step 1e-09 is outside [0.25, 1]"),
    (["--tile-step", "5"], "tile step 5.0 is outside"), (["--tile-step", "nan"], "tile step nan is outside"),
    (["--tile-step", "x"], "argument --tile-step: invalid float value: 'x'"),
    (["--task", "nope"], "argument --task: invalid choice: 'nope'"),
    (["--fold", "7"], "has no fold 7; available folds: 0, 1"), (["--fold", "x"], "a fold is a number or 'all', not 'x'")])
def test_bad_segment_options_are_refused_in_one_line_before_any_work(tiny_model, tmp_path, args, message):
    ct = write_ct(tmp_path / "ct.nrrd")
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "segment", str(ct), str(tmp_path / "o.seg.nrrd"),
                          "--model", str(tiny_model), *args], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr
    assert "loading" not in run.stderr and len(run.stderr.strip().splitlines()) <= 2  # the model line at most
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd"]


def test_a_fold_named_twice_is_refused_before_any_work(tiny_model, tmp_path):
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "compress", str(tiny_model), str(tmp_path / "o"),
                          "--fold", "0", "0", "--factor", "0.5"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "fold 0 is named more than once; name each fold once" in run.stderr
    assert "Traceback" not in run.stderr and list(tmp_path.iterdir()) == []


def test_segment_keeps_an_existing_output_unless_told_to_overwrite(tiny_model, tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    out = tmp_path / "ct.seg.nrrd"
    out.write_bytes(b"an earlier result")

    def segment(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "segment", str(ct), str(out), "--model",
                               str(tiny_model), "--quiet", *extra], capture_output=True, text=True, timeout=300)
    refused = segment()
    assert refused.returncode == 2 and f"{out} exists; pass --overwrite" in refused.stderr
    assert out.read_bytes() == b"an earlier result"
    replaced = segment("--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert out.read_bytes().startswith(b"NRRD") and sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd",
                                                                                                    "ct.seg.nrrd"]


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_compress_cancels_cleanly_and_leaves_no_partial(tmp_path, signal_name, status):
    import signal

    from TuckerSegmentLib.paths import BUNDLED_MODELS
    out = tmp_path / "out"
    child = subprocess.Popen([sys.executable, "-m", "TuckerSegmentLib.cli", "compress", str(BUNDLED_MODELS / "chest-demo"),
                              str(out), "--factor", "0.5"], stderr=subprocess.PIPE, text=True)
    for line in child.stderr:  # the staging folder exists once layers are being decomposed
        if "decomposing" in line:
            break
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())
    child.send_signal(getattr(signal, signal_name))
    rest = child.stderr.read()
    assert child.wait(timeout=120) == status
    assert f"tuckersegment: cancelled ({signal_name}); nothing partial was written" in rest and "Traceback" not in rest
    assert list(tmp_path.iterdir()) == []  # no output, no staging folder, no lock


def test_leftovers_of_dead_runs_are_removed_and_a_live_runs_are_kept(tiny_model, tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    dead, live = dead_pid(), os.getpid()
    leftovers = {name: tmp_path / name for name in (f".ct.seg.nrrd.{dead}.a1b2c3d4.partial.seg.nrrd",
                                                     f".ct.seg.nrrd.{live}.e5f6g7h8.partial.seg.nrrd",
                                                     f".ct.seg.nrrd.old-{dead}", ".ct.seg.nrrd.unknown.partial")}
    for path in leftovers.values():
        path.write_text("left over")
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", "segment", str(ct), str(tmp_path / "ct.seg.nrrd"),
                          "--model", str(tiny_model), "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ct.nrrd", "ct.seg.nrrd", f".ct.seg.nrrd.{live}.e5f6g7h8.partial.seg.nrrd", ".ct.seg.nrrd.unknown.partial"])


def test_a_second_run_writing_the_same_output_folder_is_refused(tiny_model, tmp_path):
    lock = tmp_path / ".out.lock"
    lock.write_text(str(os.getpid()))  # this (live) process holds the output
    compress = [sys.executable, "-m", "TuckerSegmentLib.cli", "compress", str(tiny_model), str(tmp_path / "out"),
                "--factor", "0.5", "--quiet"]
    run = subprocess.run(compress, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and f"another TuckerSegment run (process {os.getpid()}) is writing" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]
    lock.write_text(str(dead_pid()))  # a run that died: its lock is taken over
    run = subprocess.run(compress, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def cli(*args: str | bytes) -> subprocess.CompletedProcess:
    """The CLI with arguments that may be bytes (file names that are not valid UTF-8)."""
    command = [os.fsencode(sys.executable), b"-m", b"TuckerSegmentLib.cli", *(os.fsencode(a) for a in args)]
    return subprocess.run(command, capture_output=True, timeout=300, env=NO_BYTECODE)


def one_error_line(run: subprocess.CompletedProcess, message: str) -> None:
    err = os.fsdecode(run.stderr)
    assert run.returncode == 2 and message in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


def test_a_model_folder_with_a_non_ascii_name_simply_works(tiny_model, tmp_path):
    import slicerio
    folder = tmp_path / "modèle_ü 肺"
    shutil.copytree(tiny_model, folder)
    ct = write_ct(tmp_path / "ct.nrrd")
    run = cli("segment", str(ct), str(tmp_path / "ct.seg.nrrd"), "--model", str(folder), "--quiet")
    assert run.returncode == 0, run.stderr
    tags = slicerio.read_segmentation(str(tmp_path / "ct.seg.nrrd"))["segments"][0]["tags"]
    assert tags["TuckerSegment.Model"] == "modele_u \\u80ba"  # NRRD headers are ASCII: accents dropped, rest escaped


def test_file_names_that_are_not_utf8_are_refused_not_crashed_on(tiny_model, tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    odd_input = os.fsencode(tmp_path) + b"/\xff.nrrd"
    shutil.copy(ct, odd_input)
    one_error_line(cli("segment", odd_input, str(tmp_path / "a.seg.nrrd"), "--model", str(tiny_model), "--quiet"),
                   "has a name that is not valid UTF-8, which the imaging libraries cannot open; rename it")
    one_error_line(cli("segment", str(ct), os.fsencode(tmp_path) + b"/\xfe.seg.nrrd", "--model", str(tiny_model), "--quiet"),
                   "has a name that is not valid UTF-8")
    assert sorted(os.listdir(os.fsencode(tmp_path))) == sorted([b"ct.nrrd", b"\xff.nrrd"])  # no partial, no output


def test_symbolic_link_loops_are_named_as_such(tiny_model, tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    for args, role in ((["segment", str(ct), str(loop), "--model", str(tiny_model)], "output"),
                       (["segment", str(ct), str(loop / "x.seg.nrrd"), "--model", str(tiny_model)], "output"),
                       (["compress", str(tiny_model), str(loop), "--factor", "0.5"], "output"),
                       (["info", str(loop)], "model folder"), (["segment", str(loop), str(tmp_path / "o.seg.nrrd")], "input")):
        one_error_line(cli(*args), f"the {role} {loop}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd", "loop"]


def test_odd_inputs_and_outputs_get_messages_that_say_what_is_wrong(tiny_model, tmp_path):
    ct = write_ct(tmp_path / "ct.nrrd")
    (tmp_path / "empty").mkdir()
    one_error_line(cli("segment", str(tmp_path / "empty"), str(tmp_path / "out"), "--model", str(tiny_model)),
                   f"{tmp_path / 'empty'} holds no NIfTI or NRRD volume")
    one_error_line(cli("segment", str(ct), "/dev/full", "--model", str(tiny_model)),
                   "/dev/full is not a folder; name the output .seg.nrrd (Slicer segmentation) or .nii.gz")
    singular = tmp_path / "singular.nrrd"
    singular.write_bytes(ct.read_bytes().replace(b"space directions: (3,0,0) (0,3,0) (0,0,3)",
                                                 b"space directions: (3,0,0) (0,3,0) (0,3,0)"))
    assert singular.read_bytes() != ct.read_bytes()
    one_error_line(cli("segment", str(singular), str(tmp_path / "s.seg.nrrd"), "--model", str(tiny_model)),
                   "Bad direction, determinant is 0: the file's orientation (direction matrix) is singular")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nrrd", "empty", "singular.nrrd"]


@pytest.mark.parametrize("command", ["compress", "distill"])
def test_a_label_map_given_as_calibration_is_refused_not_calibrated_on(tiny_model, tiny_compressed, tmp_path, command):
    labels = np.zeros((16, 32, 32), np.uint8)
    labels[4:12, 8:24, 8:24], labels[6:10, 12:20, 12:20] = 1, 2  # what a segmentation looks like
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing((3.0, 3.0, 3.0))
    sitk.WriteImage(image, str(tmp_path / "labels.nii.gz"))
    out = tmp_path / "out"
    calibration = ["--calibration", str(tmp_path / "labels.nii.gz")]
    argv = (["compress", str(tiny_model), str(out), "--factor", "0.5", *calibration] if command == "compress" else
            ["distill", str(tiny_compressed), "--teacher", str(tiny_model), *calibration, str(out)])
    run = subprocess.run([sys.executable, "-m", "TuckerSegmentLib.cli", *argv, "--quiet"], capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 2 and run.stderr.count("\n") == 1, run.stderr
    assert "labels.nii.gz looks like a label map (whole values 0 … 2, none below 0), not a CT" in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]
