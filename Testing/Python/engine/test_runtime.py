"""The inference runtimes: which one runs where and why, OpenVINO's network against PyTorch's (logits of
random-weight networks, labels of the demo model on the sample CT), its cache, and the fallback."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from TuckerSegmentLib.compress.network import compress_network
from TuckerSegmentLib.errors import CacheWarning, TuckerSegmentError
from TuckerSegmentLib.image.volume import read_volume
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.paths import BUNDLED_MODELS, cache_dir
from TuckerSegmentLib.policies.uniform import UniformPolicy
from TuckerSegmentLib.runtime import inference
from TuckerSegmentLib.runtime.inference import OpenVINONetwork, choose_runtime, folder_key
from TuckerSegmentLib.runtime.quantization import INT8_FORM
from TuckerSegmentLib.testing.example_models import example_model
from TuckerSegmentLib.tucker.layers import crop_edges, smallest_same_input
from TuckerSegmentLib.segment.predictor import Segmenter

pytest.importorskip("openvino")
DEMO_SOURCE = BUNDLED_MODELS / "chest-demo" / "Dataset901_ChestDemo"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_openvino_on_the_cpu_and_pytorch_on_a_gpu_and_every_refusal_names_the_fix(monkeypatch):
    assert choose_runtime("auto", "auto", CPU).describe() == "OpenVINO f32 (auto on the CPU)"
    if inference.cpu_has_native_bf16():
        assert choose_runtime("auto", "bf16", CPU) == inference.RuntimeChoice("openvino", "bf16", "asked")
    assert choose_runtime("torch", "auto", CPU) == inference.RuntimeChoice("torch", "f32", "asked")
    assert choose_runtime("auto", "auto", CUDA) == inference.RuntimeChoice("torch", "fp16",
                                                                           "fp16 autocast as nnU-Net does, on cuda")
    assert choose_runtime("auto", "bf16", CUDA).precision == "bf16"
    refusals = [("openvino", "auto", CUDA, "OpenVINO runs on the CPU here, not on cuda"),
                ("tensorrt", "auto", CPU, "unknown runtime 'tensorrt'; choose one of auto, torch, openvino"),
                ("auto", "int4", CPU, "unknown precision 'int4'; choose one of auto, f32, bf16, fp16, int8"),
                ("torch", "bf16", CPU, "PyTorch runs bf16 slowly or not at all on the CPU; choose f32"),
                ("torch", "int8", CPU, "PyTorch runs int8 slowly or not at all on the CPU; choose f32, or the "
                                       "openvino runtime for bf16 or int8"),
                ("openvino", "fp16", CPU, "OpenVINO on this CPU runs f32, bf16 or int8"),
                ("auto", "int8", CUDA, "int8 runs in OpenVINO on the CPU, not on cuda"),
                ("auto", "bf16", torch.device("mps"), "bf16 is not offered on Apple GPUs")]
    for runtime, precision, device, message in refusals:
        with pytest.raises(TuckerSegmentError, match=f"^{message}"):
            choose_runtime(runtime, precision, device)
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(TuckerSegmentError, match="^this CPU has no native bf16"):
        choose_runtime("openvino", "bf16", CPU)
    from TuckerSegmentLib.runtime import quantization
    if quantization.int8_problem() is None:  # this machine: an AMD EPYC with VNNI
        assert choose_runtime("auto", "int8", CPU).describe() == (
            f"OpenVINO int8 (asked; {INT8_FORM})")
    monkeypatch.setattr(quantization, "cpu_capabilities", lambda: ("FP32", "BIN"))  # a CPU without VNNI or AMX
    with pytest.raises(TuckerSegmentError, match="^this CPU has no int8 support in OpenVINO"):
        choose_runtime("auto", "int8", CPU)
    found = quantization.importlib.util.find_spec
    monkeypatch.setattr(quantization.importlib.util, "find_spec", lambda name: None if name == "nncf" else found(name))
    with pytest.raises(TuckerSegmentError, match=r"^INT8 needs NNCF, OpenVINO's quantizer \(pip install nncf\)"):
        choose_runtime("openvino", "int8", CPU)
    monkeypatch.setattr(inference, "openvino_missing", lambda: "OpenVINO is not installed (pip install openvino)")
    fallback = choose_runtime("auto", "auto", CPU)
    assert fallback.describe() == "PyTorch f32 (auto on the CPU, but OpenVINO is not installed (pip install openvino))"
    with pytest.raises(TuckerSegmentError, match=r"^OpenVINO is not installed \(pip install openvino\); or choose"):
        choose_runtime("openvino", "auto", CPU)


@pytest.mark.parametrize("form", ["original", "uniform 0.5"])
def test_openvino_logits_match_pytorch_on_random_weight_networks(tiny_model, form):
    folder = ModelFolder.open(tiny_model)
    network, _ = folder.load_original(folder.folds[0])
    network.eval()
    example = folder.example_input("cpu")
    if form != "original":
        compress_network(network, UniformPolicy(0.5, rank_min=2), example_input=folder.example_input())
    x = torch.randn(example.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = network(x)
    got = OpenVINONetwork(network, example, "f32")(x)
    assert got.shape == expected.shape and got.dtype == torch.float32
    span = float(expected.max() - expected.min())
    assert float((got - expected).abs().max()) <= 1e-3 * span
    with pytest.raises(TuckerSegmentError, match="was compiled for"):
        OpenVINONetwork(network, example, "f32")(x[..., :-1])


@pytest.mark.parametrize(("spec", "expected"), [("Dataset297", (1, 1, 32, 32, 32)), ("Dataset291", (1, 1, 64, 64, 64)),
                                                 ("tiny", (1, 1, 8, 8, 8))])
def test_networks_are_traced_on_the_smallest_input_of_the_same_operations(spec, expected):
    folder = example_model(spec)
    network = folder.build_network()
    assert smallest_same_input(network, tuple(folder.example_input().shape)) == expected
    assert smallest_same_input(network, (1, 1, 4, 96, 96)) == (1, 1, 4, *expected[3:])  # never more than the patch
    plain = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3, padding=1))
    assert smallest_same_input(plain, (1, 1, 40, 40, 40)) == (1, 1, 40, 40, 40)


@pytest.mark.parametrize(("spec", "voxels", "expected"), [("Dataset297", 64 ** 3, (64, 64, 64)),
                                                          ("Dataset291", 64 ** 3, (64, 64, 64)),
                                                          ("Dataset297", 10, (32, 32, 32)), ("tiny", 64 ** 3, (32, 32, 32))])
def test_crops_are_whole_downsampling_steps_within_the_voxel_budget(spec, voxels, expected):
    folder = example_model(spec)
    network = folder.build_network()
    assert crop_edges(network, tuple(folder.patch_size), voxels) == expected
    x = torch.zeros(1, 1, *expected)
    with torch.no_grad():
        assert network.eval()(x).shape[2:] == x.shape[2:]  # a window the network runs as it is
    assert crop_edges(torch.nn.Conv3d(1, 1, 1), (100, 100, 100), 10) == (100, 100, 100)


def _flip_bytes_in_place(path: Path) -> None:
    """Change a file's content in its middle, keeping its size and modification time."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0x5A for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size


CHANGED = "changed since it was written (sha256 mismatch)"


def _openvino_labels(volume, expect_warnings: tuple[str, ...] = (), why: str = CHANGED) -> np.ndarray:
    """Labels of the demo model in OpenVINO f32, asserting which cached files were refused (and rebuilt) and why."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CacheWarning)
        labels = Segmenter(DEMO_SOURCE, device="cpu", runtime="openvino", precision="f32").segment(volume).labels
    refused = sorted(str(w.message) for w in caught if issubclass(w.category, CacheWarning))
    assert len(refused) == len(expect_warnings), refused
    for message, name in zip(refused, sorted(expect_warnings), strict=True):
        assert name in message and why in message and message.endswith("it is not used: building it again")
    return labels


def test_openvino_segments_the_sample_ct_as_pytorch_does_and_its_cache_is_verified():
    volume = read_volume(BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd")
    torch_labels = Segmenter(DEMO_SOURCE, device="cpu", runtime="torch", execution="reference").segment(volume).labels
    old = cache_dir() / "openvino"  # what earlier versions kept there, unverified: removed, never read
    (old / "compiled").mkdir(parents=True, exist_ok=True)
    for name in ("0123abcd.xml", "0123abcd.bin", "compiled/blob"):
        (old / name).write_text("unverified")
    segmenter = Segmenter(DEMO_SOURCE, device="cpu", runtime="openvino", precision="f32")
    assert not any((old / name).exists() for name in ("0123abcd.xml", "0123abcd.bin", "compiled"))
    result = segmenter.segment(volume)
    assert result.runtime == "OpenVINO f32 (asked)"
    assert (result.labels == torch_labels).mean() >= 0.999
    key = folder_key(segmenter._source_files(), segmenter.model.patch_size)
    folder = cache_dir() / "openvino" / key[:32]
    blob = next(folder.glob("f32-*.blob"))
    assert (folder / "model.xml").is_file() and (folder / "model.bin").is_file()
    weights = next(f for f in segmenter._source_files() if f.suffix in (".pth", ".safetensors"))
    stat = weights.stat()
    try:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the key is the content, not the date
        assert folder_key(segmenter._source_files(), segmenter.model.patch_size) == key
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert np.array_equal(_openvino_labels(volume), result.labels)  # imported from the cache: the same network
    _flip_bytes_in_place(blob)  # a compiled blob changed in place (same size, same date): compiled again
    assert np.array_equal(_openvino_labels(volume, (blob.name,)), result.labels)
    _flip_bytes_in_place(blob)
    _flip_bytes_in_place(folder / "model.bin")  # and the converted weights: converted again too
    assert np.array_equal(_openvino_labels(volume, (blob.name, "model.bin")), result.labels)
    assert np.array_equal(_openvino_labels(volume), result.labels)  # the rebuilt files pass their checks
    (folder / "model.xml").write_text("<net>not a network")  # damaged and not compiled yet: converted again
    blob.unlink()
    assert np.array_equal(_openvino_labels(volume, ("model.xml",)), result.labels)
    assert (folder / "model.xml").read_text().startswith("<?xml")
    (folder / "record.json").write_text('{"format": 1, "files": [1, 2]')  # a damaged record vouches for nothing
    assert np.array_equal(_openvino_labels(volume, (blob.name, "model.xml"), "is not in the cache's record"),
                          result.labels)
    assert np.array_equal(_openvino_labels(volume), result.labels)  # and is written again whole


def test_without_openvino_the_cpu_runs_pytorch_and_says_why(monkeypatch):
    monkeypatch.setattr(inference, "openvino_missing", lambda: "OpenVINO is not installed (pip install openvino)")
    segmenter = Segmenter(DEMO_SOURCE, device="cpu", execution="reference")
    assert isinstance(segmenter._predictor.network, torch.nn.Module)
    assert not isinstance(segmenter._predictor.network, OpenVINONetwork)
    result = segmenter.segment(read_volume(BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd"))
    assert result.runtime == "PyTorch f32 (auto on the CPU, but OpenVINO is not installed (pip install openvino))"


def test_openvino_with_test_time_mirroring_agrees_with_pytorch():
    """Mirroring holds one output while the network computes the next: OpenVINO's shared output buffer would
    turn the sum into twice the mirrored prediction (85 % agreement before this was handled)."""
    volume = read_volume(BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd")
    expected = Segmenter(DEMO_SOURCE, device="cpu", runtime="torch", execution="reference", mirroring=True)
    mirrored = Segmenter(DEMO_SOURCE, device="cpu", runtime="openvino", precision="f32", mirroring=True)
    assert not mirrored._predictor.network.share_output
    assert (mirrored.segment(volume).labels == expected.segment(volume).labels).mean() >= 0.999


def test_the_cpu_sums_tiles_in_float32_closer_to_the_exact_sum_than_nnunets_float16():
    """Same slicers, Gaussian and weighted sum as nnU-Net's own loop, in float32: against a float64 sum our
    logits are exact to float32 rounding, while nnU-Net's float16 sum rounds them to whole numbers where the
    Gaussian weights underflow (the volume's edges: weight 6e-8, float16's smallest step)."""
    segmenter = Segmenter(DEMO_SOURCE, device="cpu", runtime="torch", execution="reference")
    predictor = segmenter._predictor
    image = torch.randn((1, 60, 150, 170), generator=torch.Generator().manual_seed(1))
    slicers = predictor._internal_get_sliding_window_slicers(image.shape[1:])
    assert len(slicers) > 1  # overlapping tiles, so the weighting matters
    gaussian = compute_gaussian(tuple(predictor.configuration_manager.patch_size), sigma_scale=1. / 8,
                                value_scaling_factor=10, dtype=torch.float64, device=CPU)
    with torch.inference_mode():
        ours = predictor._internal_predict_sliding_window_return_logits(image, slicers, False)
        nnunets = super(type(predictor), predictor)._internal_predict_sliding_window_return_logits(image, slicers, False)
        exact = torch.zeros(ours.shape, dtype=torch.float64)
        weights = torch.zeros(ours.shape[1:], dtype=torch.float64)
        for tile in slicers:
            exact[tile] += predictor._internal_maybe_mirror_and_predict(image[tile][None])[0].double() * gaussian
            weights[tile[1:]] += gaussian
        exact /= weights
    assert ours.dtype == torch.float32 and nnunets.dtype == torch.float16 and ours.shape == exact.shape
    span = float(exact.max() - exact.min())
    assert float((ours - exact).abs().max()) <= 1e-5 * span
    assert float((nnunets.double() - exact).abs().max()) >= 0.3  # rounded to whole numbers at the edges
    assert (ours.argmax(0) == exact.argmax(0)).float().mean() >= 0.9999


@pytest.mark.parametrize("openvino_first", [False, True])
def test_openvino_sends_nothing_and_writes_nothing_in_the_home_folder(tmp_path, openvino_first):
    """OpenVINO's telemetry writes ~/intel/openvino_ga_cid and sends usage statistics on import and conversion
    unless the user opted out; through the engine it does neither, whichever was imported first."""
    script = textwrap.dedent(f"""
        import shutil
        from pathlib import Path
        if {openvino_first}:
            import openvino  # its own import event is not ours to stop; what the engine does after it is
            shutil.rmtree(Path.home() / "intel", ignore_errors=True)
        import torch
        from TuckerSegmentLib.runtime.inference import OpenVINONetwork
        OpenVINONetwork(torch.nn.Conv3d(1, 2, 3, padding=1), torch.zeros(1, 1, 8, 8, 8))
        print(sorted(str(p.relative_to(Path.home())) for p in Path.home().rglob("*")))
    """)
    home = tmp_path / "home"
    home.mkdir()
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HOME": str(home)})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_nncf_the_int8_quantizer_sends_nothing_either():
    """NNCF sends usage statistics through OpenVINO's telemetry package on every quantization unless it runs in
    its own CI or under pytest; through the engine that package is absent, so NNCF takes its no-op stub."""
    script = textwrap.dedent("""
        import TuckerSegmentLib
        from unittest.mock import MagicMock
        from nncf.telemetry import wrapper
        print(isinstance(wrapper.telemetry, MagicMock), "pytest" in __import__("sys").modules)
    """)
    environment = {k: v for k, v in os.environ.items() if k not in ("NNCF_CI", "NNCF_DEV")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environment)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["True", "False"]


class Stages:
    """The names of the engine's stages as they begin (``progress.listening``)."""

    def __init__(self) -> None:
        self.begun: list[str] = []

    def begin(self, name: str, steps: int, announce: bool = False) -> None:
        self.begun.append(name)

    def step(self, name: str, done: int, steps: int) -> None:
        pass

    def end(self, name: str) -> None:
        pass


def test_int8_is_quantized_once_keeps_its_first_and_last_convolution_in_float_and_agrees_with_f32(tmp_path,
                                                                                                 monkeypatch):
    import openvino as ov
    from TuckerSegmentLib.compress.calibration_source import int8_calibration, sample_ct
    from TuckerSegmentLib.progress import listening
    from TuckerSegmentLib.runtime.quantization import int8_problem, kept_in_float
    if int8_problem():
        pytest.skip(int8_problem())
    monkeypatch.setenv("TUCKERSEGMENT_CACHE", str(tmp_path / "cache"))
    variant, ct = BUNDLED_MODELS / "chest-demo-tucker-balanced", read_volume(sample_ct())

    def int8_run() -> tuple[np.ndarray, list[str]]:
        stages = Stages()
        with listening(stages):
            labels = Segmenter(variant, device="cpu", precision="int8", calibration=int8_calibration).segment(ct).labels
        return labels, [name for name in stages.begun if name.startswith("quantizing")]
    labels, quantized = int8_run()
    assert quantized == ["quantizing to int8 on 4 calibration patches, once for this model"]  # all the sample CT has
    f32 = Segmenter(variant, device="cpu", precision="f32").segment(ct).labels
    assert (labels == f32).mean() >= 0.99 and ((labels == f32) & (f32 > 0)).sum() >= 0.98 * (f32 > 0).sum()
    again, quantized = int8_run()
    assert quantized == [] and np.array_equal(again, labels)  # reloaded from the cache, not quantized again
    xml = next((tmp_path / "cache" / "openvino").glob("*/int8-*.xml"))
    model = ov.Core().read_model(xml)
    convolutions = [op for op in model.get_ordered_ops()
                    if op.get_type_name() in ("Convolution", "ConvolutionBackpropData")]
    weights = [op.input_value(1).get_node().get_type_name() for op in convolutions]  # int8 weights: dequantized
    assert kept_in_float(model) == [convolutions[0].get_friendly_name(), convolutions[-1].get_friendly_name()]
    assert weights == ["Constant", *["Multiply"] * (len(convolutions) - 2), "Constant"], weights
    for blob in xml.parent.glob("int8-*.blob"):
        blob.unlink()  # the compiled form gone: the quantized IR is read back
    weights = xml.with_suffix(".bin")
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))  # changed in place
    with pytest.warns(CacheWarning, match="changed since it was written"):
        relabelled, quantized = int8_run()
    assert len(quantized) == 1 and np.array_equal(relabelled, labels)  # refused, quantized again, same result
