"""The inference runtimes: which one runs where and why, OpenVINO's network against PyTorch's (logits of
random-weight networks, labels of the demo model on the sample CT), its cache, and the fallback."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from TuckerSegmentLib.compress.network import compress_network
from TuckerSegmentLib.errors import TuckerSegmentError
from TuckerSegmentLib.image.volume import read_volume
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.paths import BUNDLED_MODELS, cache_dir
from TuckerSegmentLib.policies.uniform import UniformPolicy
from TuckerSegmentLib.runtime import inference
from TuckerSegmentLib.runtime.inference import OpenVINONetwork, choose_runtime, folder_key
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
                ("auto", "int4", CPU, "unknown precision 'int4'; choose one of auto, f32, bf16, fp16"),
                ("torch", "bf16", CPU, "PyTorch runs bf16 slowly or not at all on the CPU; choose f32"),
                ("openvino", "fp16", CPU, "OpenVINO on this CPU runs f32 or bf16"),
                ("auto", "bf16", torch.device("mps"), "bf16 is not offered on Apple GPUs")]
    for runtime, precision, device, message in refusals:
        with pytest.raises(TuckerSegmentError, match=f"^{message}"):
            choose_runtime(runtime, precision, device)
    monkeypatch.setattr(inference, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(TuckerSegmentError, match="^this CPU has no native bf16"):
        choose_runtime("openvino", "bf16", CPU)
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


def test_openvino_segments_the_sample_ct_as_pytorch_does_and_its_conversion_is_cached():
    volume = read_volume(BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd")
    torch_labels = Segmenter(DEMO_SOURCE, device="cpu", runtime="torch", execution="reference").segment(volume).labels
    segmenter = Segmenter(DEMO_SOURCE, device="cpu", runtime="openvino", precision="f32")
    result = segmenter.segment(volume)
    assert result.runtime == "OpenVINO f32 (asked)"
    assert (result.labels == torch_labels).mean() >= 0.999
    key = folder_key(segmenter._source_files(), segmenter.model.patch_size)
    converted = cache_dir() / "openvino" / f"{key}.xml"
    assert converted.is_file() and converted.with_suffix(".bin").is_file()
    weights = next(f for f in segmenter._source_files() if f.suffix in (".pth", ".safetensors"))
    stat = weights.stat()
    try:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a changed file is converted again
        assert folder_key(segmenter._source_files(), segmenter.model.patch_size) != key
    finally:
        os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    again = Segmenter(DEMO_SOURCE, device="cpu", runtime="openvino", precision="f32").segment(volume)
    assert np.array_equal(again.labels, result.labels)  # read back from the cache: the same network
    converted.write_text("<net>not a network")  # a damaged cache file: converted again and replaced
    repaired = Segmenter(DEMO_SOURCE, device="cpu", runtime="openvino", precision="f32").segment(volume)
    assert np.array_equal(repaired.labels, result.labels) and converted.read_text().startswith("<?xml")


def test_without_openvino_the_cpu_runs_pytorch_and_says_why(monkeypatch):
    monkeypatch.setattr(inference, "openvino_missing", lambda: "OpenVINO is not installed (pip install openvino)")
    segmenter = Segmenter(DEMO_SOURCE, device="cpu", execution="reference")
    assert isinstance(segmenter._predictor.network, torch.nn.Module)
    assert not isinstance(segmenter._predictor.network, OpenVINONetwork)
    result = segmenter.segment(read_volume(BUNDLED_MODELS.parent / "SampleData" / "CTChest4.nrrd"))
    assert result.runtime == "PyTorch f32 (auto on the CPU, but OpenVINO is not installed (pip install openvino))"
