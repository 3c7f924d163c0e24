"""Filter pruning baselines: budgets met within one channel, aliases kept, pruned folders that reload exactly
and segment, Taylor on labelled CTs, and hostile records and options refused in one line."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bundled, tree_digest
from TuckerSegmentLib import cli
from TuckerSegmentLib.compress.calibration_data import CalibrationVolume, labelled_patches
from TuckerSegmentLib.compress.folder import describe_model, prune_model_folder
from TuckerSegmentLib.compress.pruning import LabelledPatch, apply_pruning, plan_pruning, prune_network, trace_input
from TuckerSegmentLib.errors import PolicyError, RankMismatchError, TuckerSegmentError, VolumeError
from TuckerSegmentLib.image.volume import Volume
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.nnunet.tucker_format import canonical_tensors
from TuckerSegmentLib.policies.methods import METHODS, describe_policy, method, policy_for
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import chest_sample, holdout_mask
from TuckerSegmentLib.testing.example_models import write_example_model
from TuckerSegmentLib.tucker.network_stats import network_stats, trace


def _small(model: ModelFolder) -> torch.Tensor:
    return trace_input(model.patch_size, model.configuration_manager.network_arch_init_kwargs["strides"],
                       model.num_input_channels)


def _check_aliases(network: torch.nn.Module) -> None:
    assert network.decoder.encoder is network.encoder
    blocks = [m for m in network.modules() if hasattr(m, "all_modules") and hasattr(m, "conv")]
    assert blocks
    for block in blocks:
        assert block.conv is block.all_modules[0]
        assert any(part is block.norm for part in block.all_modules)


def _one_channel_less(model: ModelFolder, original: torch.nn.Module, criterion: str, report) -> int:
    """FLOPs of the original pruned by one channel less in every group than ``report`` pruned."""
    trial = copy.deepcopy(original)
    plan = plan_pruning(trial, criterion, _small(model))
    apply_pruning(trial, plan, {name: max(0, before - after - 1) for name, (before, after) in report.groups.items()},
                  _small(model))
    return network_stats(trial, model.example_input()).flops


@pytest.mark.parametrize(("criterion", "target"), [("l1", 0.5), ("fpgm", 0.3), ("l1", 0.2)])
def test_pruned_tiny_network_meets_its_budget_within_one_channel_keeps_shape_and_aliases(tiny_model, criterion, target):
    model = ModelFolder.open(tiny_model)
    original, _ = model.load_original("0")
    network = copy.deepcopy(original)
    report = prune_network(network, criterion, target, model.example_input(), _small(model))
    budget = target * report.before.flops
    assert report.after.flops == network_stats(network, model.example_input()).flops <= budget
    assert _one_channel_less(model, original, criterion, report) > budget  # not one channel more than needed
    assert report.before.flops == network_stats(original, model.example_input()).flops
    # every group prunes the same fraction (floor), the heads and the input are never pruned
    assert all(after == before - min(before - 1, int(before * report.ratio + 1e-9))
               for before, after in report.groups.values())
    assert not any(name.startswith("decoder.seg_layers") for name in report.groups)
    assert report.modules["encoder.stages.0.0.convs.0.conv"]["in_channels"] == 1
    assert report.modules["decoder.seg_layers.1"]["out_channels"] == 4
    assert report.unused_layers == ["decoder.seg_layers.0"]  # the deep-supervision head, kept whole
    _check_aliases(network)
    x = torch.randn(1, 1, *model.patch_size)
    with torch.no_grad():
        assert network(x).shape == original(x).shape == (1, 4, 32, 32, 32)


def test_bad_targets_and_criteria_are_refused(tiny_model):
    model = ModelFolder.open(tiny_model)
    network, _ = model.load_original("0")
    for target in (0.0, 1.5, True, "0.5"):
        with pytest.raises(PolicyError, match=r"\(0, 1\]"):
            prune_network(network, "l1", target, model.example_input(), _small(model))
    with pytest.raises(PolicyError, match="unknown pruning criterion 'l2'; choose one of l1, fpgm, taylor"):
        prune_network(network, "l2", 0.5, model.example_input(), _small(model))
    with pytest.raises(PolicyError, match="even one channel per layer keeps"):
        prune_network(network, "l1", 0.001, model.example_input(), _small(model))
    with pytest.raises(PolicyError, match="taylor criterion needs labelled patches"):
        prune_network(network, "taylor", 0.5, model.example_input(), _small(model))
    assert network_stats(network, model.example_input()).params == network_stats(
        model.load_original("0")[0], model.example_input()).params  # refused before anything changed


@pytest.mark.parametrize("criterion", ["l1", "fpgm"])
def test_demo_model_pruned_to_three_budgets(criterion):
    model = ModelFolder.open(bundled("chest-demo"))
    original, _ = model.load_original("0")
    seen = {}
    for target in (0.5, 0.3, 0.2):
        network = copy.deepcopy(original)
        report = prune_network(network, criterion, target, model.example_input(), _small(model))
        seen[target] = report.after.flops / report.before.flops
        assert report.after.flops <= target * report.before.flops < _one_channel_less(model, original, criterion, report)
        _check_aliases(network)
    # measured: the same fractions for both criteria (the uniform ratio depends on the widths alone)
    assert seen == pytest.approx({0.5: 0.4742, 0.3: 0.2932, 0.2: 0.1932}, abs=5e-4)


def test_l1_and_fpgm_keep_different_filters_of_the_demo_model():
    model = ModelFolder.open(bundled("chest-demo"))
    network, _ = model.load_original("0")
    l1, fpgm = (plan_pruning(network, c, _small(model)) for c in ("l1", "fpgm"))
    assert l1.rankings.keys() == fpgm.rankings.keys() and len(l1.rankings) == 17  # 18 convolutions but the head
    differ = [n for n in l1.rankings if not torch.equal(l1.rankings[n][:len(l1.rankings[n]) // 2],
                                                        fpgm.rankings[n][:len(fpgm.rankings[n]) // 2])]
    assert len(differ) >= 10


@pytest.mark.parametrize("criterion", ["l1", "fpgm"])
def test_totalsegmentator_3mm_architecture_at_full_width(tmp_path_factory, criterion):
    folder = tmp_path_factory.getbasetemp() / "ts297"
    if not folder.exists():
        write_example_model(folder, "Dataset297")
    model = ModelFolder.open(next(folder.glob("*/*")))
    network, _ = model.load_original("0")
    assert tuple(_small(model).shape) == (1, 1, 32, 32, 32)
    report = prune_network(network, criterion, 0.5, model.example_input(), _small(model))
    assert report.before.params == 16_550_518 and report.after.flops <= 0.5 * report.before.flops
    assert report.after.flops / report.before.flops == pytest.approx(0.477, abs=2e-3)
    assert report.trials == 10  # measured: 8 s on 2 idle CPU cores, ~35 s while other tests ran beside it
    _check_aliases(network)
    probe = trace(network, model.example_input())
    assert probe.output_shapes[id(network)] == (1, 118, 112, 112, 128)


@pytest.fixture(scope="module")
def pruned_tiny(tiny_model, tmp_path_factory):
    before = tree_digest(tiny_model)
    out = tmp_path_factory.mktemp("pruned") / "tiny-l1"
    reports = prune_model_folder(tiny_model, out, "l1", 0.5, folds=(0, 1))
    assert tree_digest(tiny_model) == before
    return out, reports


def test_pruned_folder_reloads_bit_identically_and_describes_itself(tiny_model, pruned_tiny):
    out, reports = pruned_tiny
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == ["dataset.json", "fold_0/tucker.json", "fold_0/weights.safetensors",
                     "fold_1/tucker.json", "fold_1/weights.safetensors", "plans.json"]
    record = json.loads((out / "fold_0" / "tucker.json").read_text())
    assert record["format_version"] == 2 and record["layers"] == []
    assert record["policy"] == {"name": "prune-l1", "params": {"target_flops": 0.5}}
    assert record["pruning"]["criterion"] == "l1" and record["pruning"]["target_flops"] == 0.5
    assert record["pruning"]["modules"]["encoder.stages.0.0.convs.0.norm"] == {"num_features": 5}
    assert record["pruning"]["modules"]["decoder.seg_layers.1"] == {"in_channels": 5, "out_channels": 4}
    assert record["calibration"]["source"] == "none" and len(record["source"]["sha256"]) == 64
    assert record["after"]["flops"] == reports["0"].after.flops <= 0.5 * record["before"]["flops"]

    model = ModelFolder.open(tiny_model)
    expected, _ = model.load_original("0")
    prune_network(expected, "l1", 0.5, model.example_input(), _small(model))
    loaded = ModelFolder.open(out).load_network("0")
    _check_aliases(loaded)
    assert all(torch.equal(a, b) for a, b in zip(canonical_tensors(expected).values(),
                                                 canonical_tensors(loaded).values(), strict=True))
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(expected(x), loaded(x))
    info = describe_model(out)
    assert info["compressed"] is True and info["flops"] == reports["0"].after.flops
    assert info["params"] == reports["0"].after.params and info["policy"]["name"] == "prune-l1"


def test_pruned_folder_segments_in_torch_and_openvino(tiny_model, pruned_tiny):
    out, _ = pruned_tiny
    before = tree_digest(tiny_model)
    full = chest_sample().ct
    ct = Volume(full.array[:12, :64, :64], full.ijk_to_ras)  # a corner of the sample CT: a few dozen tiles
    model = ModelFolder.open(tiny_model)
    network, _ = model.load_original("0")
    prune_network(network, "l1", 0.5, model.example_input(), _small(model))
    in_memory = Segmenter(tiny_model, network=network, runtime="torch").segment(ct)
    torch_run = Segmenter(out, runtime="torch")
    assert torch_run.policy == "prune-l1(target_flops=0.5)"
    labels = torch_run.segment(ct).labels
    assert labels.shape == ct.array.shape and np.array_equal(labels, in_memory.labels)
    openvino = Segmenter(out)
    assert "OpenVINO" in openvino.runtime.describe()
    agree = (openvino.segment(ct).labels == labels).mean()
    assert agree > 0.99
    assert tree_digest(tiny_model) == before


def test_refuses_to_prune_a_compressed_or_pruned_folder(pruned_tiny, tmp_path):
    with pytest.raises(TuckerSegmentError, match="already compressed or pruned; start from the original"):
        prune_model_folder(pruned_tiny[0], tmp_path / "again", "l1")
    assert not (tmp_path / "again").exists()


def _labelled_tiny(mask: np.ndarray | None = None, labels: np.ndarray | None = None):
    sample = chest_sample()
    labels = sample.labels % 4 if labels is None else labels  # the tiny model has classes 0..3
    return [CalibrationVolume(sample.ct, mask)], [Volume(labels.astype(np.int16), sample.ct.ijk_to_ras)]


def test_taylor_with_labels_prunes_other_filters_than_l1(tiny_model, pruned_tiny, tmp_path):
    sample = chest_sample()
    training = ~holdout_mask(sample.ct.array.shape)
    volumes, labels = _labelled_tiny(training)
    out = tmp_path / "taylor"
    report = prune_model_folder(tiny_model, out, "taylor", 0.5, calibration=volumes, labels=labels)["0"]
    assert report.calibration_inputs == 4 and report.calibration["source"] == "user"
    assert report.after.flops == pruned_tiny[1]["0"].after.flops  # same widths as l1 ...
    taylor = canonical_tensors(ModelFolder.open(out).load_network("0"))
    l1 = canonical_tensors(ModelFolder.open(pruned_tiny[0]).load_network("0"))
    assert [t.shape for t in taylor.values()] == [t.shape for t in l1.values()]
    assert sum(not torch.equal(a, b) for a, b in zip(taylor.values(), l1.values(), strict=True)) > 10  # ... other filters
    assert Segmenter(out, runtime="torch").policy == "prune-taylor(target_flops=0.5)"


def test_taylor_reads_only_the_labels_inside_the_mask(tiny_model):
    model = ModelFolder.open(tiny_model)
    sample = chest_sample()
    training = ~holdout_mask(sample.ct.array.shape)
    base = sample.labels % 4
    changed_outside = np.where(training, base, (base + 1) % 4)
    changed_inside = np.where(training, (base + 1) % 4, base)

    def ranking(labels):
        volumes, maps = _labelled_tiny(training, labels)
        patches = [LabelledPatch(i, t) for i, t in labelled_patches(model, volumes, maps)]
        network, _ = model.load_original("0")
        return plan_pruning(network, "taylor", _small(model), patches).rankings

    reference = ranking(base)
    assert all(torch.equal(reference[n], r) for n, r in ranking(changed_outside).items())
    assert not all(torch.equal(reference[n], r) for n, r in ranking(changed_inside).items())


def test_labelled_patches_refuse_bad_label_maps(tiny_model):
    model = ModelFolder.open(tiny_model)
    volumes, labels = _labelled_tiny()
    with pytest.raises(VolumeError, match=r"2 label map\(s\) for 1 calibration CT\(s\)"):
        labelled_patches(model, volumes, labels * 2)
    with pytest.raises(VolumeError, match="label map 1 holds value.* 7, not labels of"):
        labelled_patches(model, volumes, [chest_sample().labels])
    with pytest.raises(VolumeError, match="label map 1 has shape"):
        labelled_patches(model, volumes, [np.zeros((3, 4, 5), np.int16)])


def test_methods_vocabulary_knows_the_pruning_baselines():
    pruning = {m.key: m for m in METHODS if m.prunes}
    assert list(pruning) == ["prune-l1", "prune-fpgm", "prune-taylor"]
    assert [m.criterion for m in pruning.values()] == ["l1", "fpgm", "taylor"]
    assert [m.needs_labels for m in pruning.values()] == [False, False, True]
    assert all(m.default == 0.5 and "FLOPs" in m.target for m in pruning.values())
    assert method("flops").criterion is None and not method("flops").prunes
    with pytest.raises(PolicyError, match="prune-fpgm prunes filters, it sets no Tucker ranks"):
        policy_for("prune-fpgm", 0.5)
    assert describe_policy({"name": "prune-l1", "params": {"target_flops": 0.3}}) == "prune-l1(target_flops=0.3)"


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as stop:  # argparse
        code = stop.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_prunes_and_prints_the_report(tiny_model, tmp_path, capsys):
    out = tmp_path / "fpgm"
    code, stdout, stderr = _cli(capsys, "compress", tiny_model, out, "--method", "prune-fpgm", "--target-flops", "0.3")
    assert code == 0, stderr
    assert "fold 0: prune-fpgm to 0.3 of the FLOPs" in stdout and "FLOPs/patch" in stdout
    assert "pruning [  1/" in stderr
    ratio = float(next(line for line in stdout.splitlines() if "FLOPs/patch" in line).split()[-1])
    assert ratio == pytest.approx(0.255, abs=2e-3)
    info = json.loads((out / "fold_0" / "tucker.json").read_text())
    assert info["policy"] == {"name": "prune-fpgm", "params": {"target_flops": 0.3}}


def test_cli_hostile_options_each_one_line_nothing_written(tiny_model, tmp_path, capsys):
    before = tree_digest(tiny_model)
    out = tmp_path / "out"
    sample = chest_sample()
    ct, lab = tmp_path / "ct.nrrd", tmp_path / "labels.nrrd"
    import SimpleITK as sitk  # the sample written to files, as a user passes them
    for array, path in ((sample.ct.array, ct), ((sample.labels % 4).astype(np.int16), lab)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(float(s) for s in sample.ct.spacing))
        sitk.WriteImage(image, str(path))
    cases = (
        (["--method", "prune-l2"], "invalid choice: 'prune-l2'"),
        (["--method", "prune-taylor"], "--method prune-taylor needs labelled CTs: --calibration CT... --labels"),
        (["--method", "prune-taylor", "--calibration", ct], "needs labelled CTs"),
        (["--method", "prune-taylor", "--calibration", ct, "--labels", lab, lab], r"2 label map(s) for 1 calibration CT(s)"),
        (["--method", "prune-l1", "--policy", "flops"], "--policy chooses Tucker ranks only"),
        (["--method", "prune-l1", "--factor", "0.5"], "--policy chooses Tucker ranks only"),
        (["--method", "prune-fpgm", "--weight-only"], "--policy chooses Tucker ranks only"),
        (["--method", "prune-l1", "--calibration", ct], "ranks filters by their weights alone"),
        (["--method", "prune-l1", "--target-flops", "1.5"], "(0, 1]"),
        (["--method", "prune-l1", "--device", "cpu"], "--device and --runtime time latency budgets"),
        (["--labels", lab], "--labels is for --method prune-taylor"),
        (["--policy", "prune-l1"], "prune-l1 prunes filters, it sets no Tucker ranks"),
    )
    for args, message in cases:
        code, stdout, stderr = _cli(capsys, "compress", tiny_model, out, *args)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, (args, stderr)
        assert "Traceback" not in stderr and not out.exists()
    assert tree_digest(tiny_model) == before


def _tampered(source: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "tampered"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(source, folder)
    path = folder / "fold_0" / "tucker.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return folder


def _modules(record):
    return record["pruning"]["modules"]


TAMPERED = [
    (lambda r: _modules(r)["encoder.stages.0.0.convs.0.conv"].update(out_channels=9), "out_channels=9, outside 1..8"),
    (lambda r: _modules(r)["encoder.stages.0.0.convs.0.conv"].update(out_channels=5.0), "not a whole number"),
    (lambda r: _modules(r)["encoder.stages.0.0.convs.0.conv"].update(out_channels=True), "not a whole number"),
    (lambda r: _modules(r)["encoder.stages.0.0.convs.0.conv"].update(in_channels=0), "in_channels=0, outside 1..1"),
    (lambda r: _modules(r).update({"encoder.stages.9.conv": {"num_features": 4}}), "'encoder.stages.9.conv' is not in"),
    (lambda r: _modules(r).update({"encoder.stages.0.0.convs.0.norm": {"in_channels": 5, "out_channels": 5}}),
     "is a InstanceNorm3d: its entry needs exactly num_features"),
    (lambda r: _modules(r).update({"encoder.stages.0.0.convs.0.nonlin": {"num_features": 5}}),
     "is a LeakyReLU, neither a convolution nor a norm"),
    (lambda r: _modules(r)["encoder.stages.0.0.convs.0.norm"].update(num_features=6),
     "has 6 features but the convolution before it outputs 5"),
    (lambda r: _modules(r)["decoder.seg_layers.1"].update(out_channels=3), "segmentation head is recorded with fewer"),
    (lambda r: _modules(r)["encoder.stages.0.0.convs.1.conv"].update(in_channels=6), "do not fit together"),
    (lambda r: r["pruning"].update(modules={}), "no 'modules' object"),
    (lambda r: r["pruning"].update(target_flops=2), "not a fraction in (0, 1]"),
    (lambda r: r.update(layers=[{"name": "x", "form": "tucker2"}]), "both pruned channels and factorised layers"),
    (lambda r: r.update(format_version=1), "under format_version 1, which has none"),
    (lambda r: r.update(format_version=3), "this TuckerSegment reads up to 2: upgrade TuckerSegment"),
]


@pytest.mark.parametrize(("edit", "message"), TAMPERED)
def test_tampered_pruning_records_are_refused_in_one_line(pruned_tiny, tmp_path, capsys, edit, message):
    folder = _tampered(pruned_tiny[0], tmp_path, edit)
    with pytest.raises(RankMismatchError, match=None) as caught:
        ModelFolder.open(folder).load_network("0")
    text = str(caught.value)
    assert message in text and "\n" not in text
    assert "compress the model again" in text or "upgrade TuckerSegment" in text
    code, _, stderr = _cli(capsys, "info", folder)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1


def test_weights_that_do_not_fit_the_channel_record_are_refused(tiny_model, pruned_tiny, tmp_path):
    other = tmp_path / "other"
    prune_model_folder(tiny_model, other, "l1", 0.3)
    folder = _tampered(pruned_tiny[0], tmp_path, lambda r: None)
    shutil.copy2(other / "fold_0" / "weights.safetensors", folder / "fold_0" / "weights.safetensors")
    record = json.loads((other / "fold_0" / "tucker.json").read_text())
    path = folder / "fold_0" / "tucker.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"weights_sha256": record["weights_sha256"]}))
    with pytest.raises(RankMismatchError, match="does not fit the layers recorded in tucker.json .*compress the model again"):
        ModelFolder.open(folder).load_network("0")


def test_version_1_tucker_records_still_load(tiny_model, tmp_path):
    from TuckerSegmentLib.compress.folder import compress_model_folder
    from TuckerSegmentLib.policies.uniform import UniformPolicy
    out = tmp_path / "tucker"
    compress_model_folder(tiny_model, out, UniformPolicy(0.5, rank_min=2), weight_only=True)
    path = out / "fold_0" / "tucker.json"
    record = json.loads(path.read_text())
    assert record["format_version"] == 2
    path.write_text(json.dumps(record | {"format_version": 1}))
    network = ModelFolder.open(out).load_network("0")
    assert network_stats(network, ModelFolder.open(out).example_input()).flops == record["after"]["flops"]


def test_panel_worker_prunes_with_l1_and_refuses_taylor(tiny_model, tmp_path):
    import io

    from TuckerSegmentLib.worker.server import Worker
    worker = Worker(io.BytesIO())
    review = worker.compress({"source": str(tiny_model), "output": str(tmp_path / "panel"), "policy": "prune-l1",
                              "target": 0.3, "measure": False}, lambda fraction, message: None)
    assert review["policy"] == {"name": "prune-l1", "params": {"target_flops": 0.3}}
    assert review["compressed"]["flops"] <= 0.3 * review["original"]["flops"]
    assert ModelFolder.open(tmp_path / "panel").tucker_record("0")["pruning"]["criterion"] == "l1"
    with pytest.raises(PolicyError, match="prune-taylor needs labelled CTs: .*the Slicer panel does not take labels"):
        worker.compress({"source": str(tiny_model), "output": str(tmp_path / "taylor"), "policy": "prune-taylor"},
                        lambda fraction, message: None)
    assert not (tmp_path / "taylor").exists()
