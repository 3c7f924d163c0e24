"""INT8: label-free accuracy control, and the int8 form stored in a model folder (quantized once, run as it is,
refused when it or its source changed)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from TuckerSegmentLib.errors import TuckerSegmentError
from TuckerSegmentLib.image.volume import read_volume
from TuckerSegmentLib.paths import BUNDLED_MODELS
from TuckerSegmentLib.segment.predictor import Segmenter

pytest.importorskip("openvino")
pytest.importorskip("nncf")


class SensitiveNet(nn.Module):
    """Four convolutions; ``c``'s input holds one channel of about 1000 that ``c`` ignores (zero weights): quantized
    per tensor, that range crushes the channels ``c`` does use, so ``c`` is the layer that costs agreement."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv3d(1, 8, 3, padding=1), nn.Conv3d(8, 8, 3, padding=1)
        self.c, self.d = nn.Conv3d(8, 8, 3, padding=1), nn.Conv3d(8, 4, 1)
        with torch.no_grad():
            self.b.bias[0] = 1000.0
            self.c.weight[:, 0] = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        return self.d(torch.relu(self.c(torch.relu(self.b(x)))))


def test_accuracy_control_keeps_the_layer_that_costs_agreement_in_float_and_says_which():
    import openvino as ov
    from TuckerSegmentLib.runtime.quantization import int8_problem, quantize
    if int8_problem():
        pytest.skip(int8_problem())
    shape = (1, 1, 16, 16, 16)
    model = ov.convert_model(SensitiveNet().eval(), example_input=torch.zeros(shape), input=[shape])
    rng = np.random.default_rng(0)
    statistics = [rng.normal(size=shape).astype(np.float32) for _ in range(4)]
    validation = [rng.normal(size=shape).astype(np.float32) for _ in range(4)]
    plain = quantize(model, statistics)
    assert plain.float_layers == ["a", "d"] and plain.agreement is None  # first and last, as always
    plain_agreement = quantize(model, statistics, validation[:1]).agreement  # one patch: control, cheaply
    controlled = quantize(model, statistics, validation)
    assert controlled.float_layers == ["a", "c", "d"], controlled.float_layers
    assert controlled.agreement >= 0.98
    core = ov.Core()
    reference = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    uncontrolled = core.compile_model(plain.model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    agreement = np.mean([(np.asarray(uncontrolled(p)[0]).argmax(1) == np.asarray(reference(p)[0]).argmax(1)).mean()
                         for p in validation])
    assert agreement < 0.9 and plain_agreement is not None  # without control, c's int8 input costs the agreement


@pytest.fixture(scope="module")
def int8_demo(tmp_path_factory):
    """A copy of the bundled balanced demo variant with its int8 form built on the sample CT."""
    from TuckerSegmentLib.compress.calibration_source import sample_ct
    from TuckerSegmentLib.compress.int8_form import build_int8_form
    from TuckerSegmentLib.runtime.quantization import int8_problem
    if int8_problem():
        pytest.skip(int8_problem())
    folder = tmp_path_factory.mktemp("int8") / "balanced"
    shutil.copytree(BUNDLED_MODELS / "chest-demo-tucker-balanced", folder)
    record = build_int8_form(folder, "0", [sample_ct()], "the sample CT")
    return folder, record


def test_a_stored_int8_form_runs_as_stored_without_converting_or_quantizing(int8_demo, tmp_path, monkeypatch):
    from TuckerSegmentLib.compress.calibration_source import sample_ct
    from TuckerSegmentLib.runtime import inference, quantization
    folder, record = int8_demo
    assert "encoder.stages.0.0.convs.0" in record["float_layers"][0] and record["agreement"] >= 0.98
    assert set(record["files"]) == {"model.xml", "model.bin"} and record["calibration"] == "the sample CT"
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    ct = read_volume(sample_ct())
    f32 = Segmenter(folder, device="cpu", precision="f32").segment(ct)

    def refuse(*args, **kwargs):
        raise AssertionError("converted or quantized again")
    monkeypatch.setattr(inference, "_convert", refuse)
    monkeypatch.setattr(quantization, "quantize", refuse)
    monkeypatch.setattr(inference, "quantize", refuse)
    for _ in range(2):  # the first run compiles the stored IR, the second loads the compiled blob
        result = Segmenter(folder, device="cpu", precision="int8").segment(ct)
        assert (result.labels == f32.labels).mean() >= 0.98
        assert "quantized when built on the sample CT" in result.runtime and "int8" in result.runtime


@pytest.mark.parametrize("damage, message", [
    ("weights", "changed since it was quantized"),
    ("xml", "changed since it was quantized"),
    ("source", "quantized from other weights or plans"),
    ("record", "is not an int8 form record"),
    ("unreadable record", "cannot be read"),
])
def test_a_changed_int8_form_or_source_is_refused_in_one_line(int8_demo, tmp_path, monkeypatch, damage, message):
    from TuckerSegmentLib.runtime.stored_int8 import form_folder
    folder = tmp_path / "copy"
    shutil.copytree(int8_demo[0], folder)
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    form = form_folder(folder, "0")
    if damage == "weights":
        data = bytearray((form / "model.bin").read_bytes())
        data[len(data) // 2] ^= 1
        (form / "model.bin").write_bytes(bytes(data))
    elif damage == "xml":
        (form / "model.xml").write_text((form / "model.xml").read_text().replace("</net>", "</net> "))
    elif damage == "source":
        plans = json.loads((folder / "plans.json").read_text())
        (folder / "plans.json").write_text(json.dumps(plans, indent=3))  # the same plans, other bytes
    elif damage == "record":
        record = json.loads((form / "int8.json").read_text())
        (form / "int8.json").write_text(json.dumps({**record, "float_layers": "all"}))
    else:
        (form / "int8.json").write_bytes(b"\xff\xfe not json")
    with pytest.raises(TuckerSegmentError, match=message) as error:
        Segmenter(folder, device="cpu", precision="int8")
    assert "\n" not in str(error.value) and str(form) in str(error.value)
    assert Segmenter(folder, device="cpu", precision="f32") is not None  # f32 does not read the int8 form


def test_int8_without_a_stored_form_or_calibration_is_refused_naming_the_fix(tmp_path, monkeypatch):
    from TuckerSegmentLib.runtime.quantization import int8_problem
    if int8_problem():
        pytest.skip(int8_problem())
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(TuckerSegmentError, match="holds no int8 form for fold 0; build one"):
        Segmenter(BUNDLED_MODELS / "chest-demo-tucker-fast", device="cpu", precision="int8")


def test_build_variants_makes_measures_and_stores_the_precision_forms_and_int8_runs_without_converting(
        ts_home, capsys, monkeypatch):
    from TuckerSegmentLib import cli
    from TuckerSegmentLib.compress.calibration_source import sample_ct
    from TuckerSegmentLib.runtime import inference, quantization
    from TuckerSegmentLib.runtime.quantization import int8_problem
    from TuckerSegmentLib.testing.example_models import write_totalsegmentator_task
    from TuckerSegmentLib.usecases.requests import SegmentRequest
    from TuckerSegmentLib.usecases.segmenting import plan_segmenter, segment_with
    from TuckerSegmentLib.variants.catalogue import MANIFEST, catalogue, find_variant, variant_dir, verify_built
    from TuckerSegmentLib.variants.forms import runs_here
    from TuckerSegmentLib.runtime.hardware import cpu_device
    if int8_problem() or runs_here("bf16", cpu_device()):
        pytest.skip("this CPU runs neither int8 nor bf16 natively")
    write_totalsegmentator_task(ts_home, "fastest", divisor=8)
    assert cli.main(["build-variants", "--variant", "fastest-tucker-0.5", "--device", "cpu", "--quiet",
                     "--precisions", "int8", "bf16"]) == 0
    printed = capsys.readouterr().out
    variant = find_variant(catalogue(), "fastest-tucker-0.5")
    manifest = json.loads((variant_dir(variant) / MANIFEST).read_text())
    assert manifest["forms"] == ["bf16", "int8"] and set(variant.measured["forms"]) == {"bf16", "int8"}
    assert {"int8/fold_0/model.xml", "int8/fold_0/model.bin", "int8/fold_0/int8.json"} <= set(
        manifest["models"][0]["files"])  # sha256 in the manifest: verify_built checks them
    for precision, figures in variant.measured["forms"].items():
        assert figures["runtime"].startswith(f"OpenVINO {precision}") and figures["seconds"] > 0
        assert 0 < figures["mean_agreement"] <= 1 and figures["speedup"] > 0
        assert f"; in {precision}: {figures['speedup']:.2f}x, auto " in printed
    verify_built(variant)
    shutil.rmtree(ts_home.parents[2] / "cache" / "openvino")  # nothing compiled or converted is left to reuse

    def refuse(*args, **kwargs):
        raise AssertionError("converted or quantized again")
    monkeypatch.setattr(inference, "_convert", refuse)
    monkeypatch.setattr(inference, "quantize", refuse)
    monkeypatch.setattr(quantization, "quantize", refuse)
    request = SegmentRequest(model="fastest-tucker-0.5", device="cpu", precision="int8")
    result = segment_with(plan_segmenter(request).open(), request, sample_ct())
    assert "int8 (asked; quantized when built on the other blocks of the bundled sample chest CT" in result.runtime
    form = variant_dir(variant) / manifest["models"][0]["folder"] / "int8" / "fold_0" / "model.bin"
    form.write_bytes(form.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(Exception, match="changed since it was built"):
        plan_segmenter(request).open()  # a changed int8 file fails the variant's own check first


@pytest.mark.parametrize("precisions, message", [
    (("fp8",), "unknown precision 'fp8'; choose one of f32, bf16, int8"),
    ("int8", "precisions must be a list of names or paths"),
])
def test_a_bad_build_precision_is_refused_in_one_line(precisions, message):
    from TuckerSegmentLib.usecases.requests import BuildRequest, RequestError
    with pytest.raises(RequestError) as error:
        BuildRequest(precisions=precisions).checked()
    assert message.split(" must")[0] in str(error.value) and "\n" not in str(error.value)


def test_a_precision_this_cpu_lacks_is_refused_before_building(monkeypatch):
    from TuckerSegmentLib.errors import ModelFolderError
    from TuckerSegmentLib.runtime.hardware import cpu_device
    from TuckerSegmentLib.variants import forms
    monkeypatch.setattr(forms, "cpu_capabilities", lambda: ["FP32"])
    assert forms.cpu_forms(cpu_device()) == ()  # by default: only what this CPU runs
    with pytest.raises(ModelFolderError, match="cannot build the bf16 form: this CPU has no native bf16"):
        forms.cpu_forms(cpu_device(), ["bf16"])
