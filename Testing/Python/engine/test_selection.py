"""Variant selection over simulated devices, and GPU out-of-memory fallback down to a real CPU run."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from TuckerSegmentLib.errors import ModelFolderError, NotEnoughMemoryError
from TuckerSegmentLib.segment.task import TaskSegmenter
from TuckerSegmentLib.testing.demo_data import chest_sample
from TuckerSegmentLib.variants.catalogue import Variant, catalogue, load_catalogue
from TuckerSegmentLib.variants.choice import choose_model
from TuckerSegmentLib.variants.guard import SafeTask, cpu_slab_voxels
from TuckerSegmentLib.runtime.hardware import GB, DeviceInfo, detect_devices
from TuckerSegmentLib.variants.measured import measurement_context
from TuckerSegmentLib.variants.selection import MEMORY_MARGIN, fallback_chain, select_variant

CPU = DeviceInfo("cpu", "CPU", 32 * GB, 16 * GB, cores=8)
LOW_RAM_CPU = DeviceInfo("cpu", "CPU", 4 * GB, int(0.5 * GB), cores=2)


def gpu(name: str, free_gb: float) -> DeviceInfo:
    return DeviceInfo("cuda", name, int((free_gb + 0.5) * GB), int(free_gb * GB), (8, 6))


def ts_ready() -> list[Variant]:
    """The real catalogue as if every TotalSegmentator variant were installed or built."""
    return [replace(v, availability="built" if "bundled" not in v.source else "bundled") for v in load_catalogue()]


def need(variant_id: str, kind: str = "cuda") -> float:
    variant = next(v for v in load_catalogue() if v.id == variant_id)
    return variant.memory_bytes(kind)[0] / (1 - MEMORY_MARGIN) / GB


@pytest.fixture(scope="module")
def variants() -> list[Variant]:
    return ts_ready()


def test_catalogue_has_every_figure_selection_needs(variants):
    for v in variants:
        if v.params is not None:  # latency-target variants are sized where they are built
            assert v.params > 0 and v.flops > 0 and v.weights_bytes == 4 * v.params, v.id
        assert v.peak_memory["cpu"]["tile_bytes"] > 200e6, v.id  # measured: at least the torch process
        assert v.quality["kind"] in ("published", "measured", "unmeasured"), v.id
    by_task = {}
    for v in variants:
        by_task.setdefault(v.task, []).append(
            v.policy if v.original else v.policy["params"].get("factor") or v.policy["params"].get("target_latency")
            or v.policy["params"]["target_flops"])
    assert by_task == {**{t: ["original", 0.7, 0.5, 0.7, 0.5, 0.3] for t in ("total", "fast", "fastest")},
                       "demo": ["original", 0.7, 0.3, 0.7, 0.5, 0.3]}  # fast: 30 % of the FLOPs
    for v in variants:
        if not v.original and v.policy["name"] == "budget":
            assert v.id.endswith(("-tucker-balanced", "-tucker-fast")) and v.policy["params"]["sensitivity"] == "auto"


def measured_on(device: DeviceInfo, speedup: float, mean: float = 0.99) -> dict:
    """A measurement as build-variants records it, taken on ``device`` (figures chosen by the test)."""
    return {"how": "held-out blocks of 1 of your CTs (calibrated on the other blocks)", "volumes": 1,
            "structures": {"liver": {"dice": mean, "voxels": 90000}, "spleen": {"dice": mean, "voxels": 20000}},
            "mean_agreement": mean, "speedup": speedup, "seconds": 60 / speedup, "original_seconds": 60.0,
            "context": measurement_context(device), "device_kind": device.kind}


def measured(variants: list[Variant], **figures: dict) -> list[Variant]:
    return [replace(v, measured=figures[v.id.replace("-", "_").replace(".", "")])
            if v.id.replace("-", "_").replace(".", "") in figures else v for v in variants]


@pytest.fixture(scope="module")
def cpu_measured(variants) -> list[Variant]:
    """Every variant ready; the total task's balanced and 0.5 variants built and measured on this CPU."""
    return measured(variants, total_tucker_balanced=measured_on(CPU, 1.6),
                    total_tucker_05=measured_on(CPU, 2.1, mean=0.95))


@pytest.mark.parametrize("device, task, expected_id, device_kind", [
    # no GPU: the CPU, where the balanced variant measured 1.6x faster with agreement 0.99 (0.5: 0.95, too low)
    (None, "total", "total-tucker-balanced", "cpu"),
    # 4 GB GPU: the 1.5 mm models do not fit (peak memory is set by activations, not weights): the CPU
    (gpu("NVIDIA GeForce GTX 1650", 3.8), "total", "total-tucker-balanced", "cpu"),
    # 8 GB GPU: the five 1.5 mm models need more than 7 GB with the margin, the 3 mm model fits
    (gpu("NVIDIA GeForce GTX 1080", 7.0), "total", "total-tucker-balanced", "cpu"),
    (gpu("NVIDIA GeForce GTX 1080", 7.0), "fast", "fast", "cuda"),
    # 24 GB RTX 3090: the measurements were taken on the CPU, they say nothing about this GPU (the paper
    # even measured factor 0.7 slower there): the original
    (gpu("NVIDIA GeForce RTX 3090", 23.0), "total", "total", "cuda"),
    # Apple silicon: unified memory, the CPU figures for memory; measured on the CPU only: the original
    (DeviceInfo("mps", "Apple GPU (MPS)", 16 * GB, 10 * GB), "total", "total", "mps"),
])
def test_selection_per_device(cpu_measured, device, task, expected_id, device_kind):
    devices = [CPU] if device is None else [device, CPU]
    chosen = select_variant(cpu_measured, devices, task)
    assert (chosen.variant.id, chosen.device.kind) == (expected_id, device_kind)
    assert chosen.reason.startswith(f"{task} / {expected_id}: {chosen.device.name}, ")
    assert f"{chosen.device.free_bytes / GB:.1f} GiB free" in chosen.reason and "needs" in chosen.reason
    if device is not None and device_kind == "cpu":
        assert f"{device.name}: nothing fits in {device.free_bytes / GB:.1f} GiB free" in chosen.reason
    if expected_id == "total-tucker-balanced":
        assert "1.60x faster than the original (measured here in" in chosen.reason
        assert "agreement 0.990 (lowest 0.990, liver) on held-out blocks of 1 of your CTs" in chosen.reason


def test_a_variant_measured_on_this_gpu_is_chosen_there():
    rtx = gpu("NVIDIA GeForce RTX 2080 Ti", 10.5)
    variants = measured(ts_ready(), total_tucker_balanced=measured_on(rtx, 1.3), total_tucker_fast=measured_on(rtx, 0.9))
    chosen = select_variant(variants, [rtx, CPU], "total")
    assert (chosen.variant.id, chosen.device.kind) == ("total-tucker-balanced", "cuda")
    assert "1.30x faster than the original (measured here in PyTorch" in chosen.reason


def test_a_gpu_too_small_falls_to_the_cpu_and_says_why(cpu_measured):
    small = gpu("NVIDIA GeForce GTX 1650", need("total") * 0.5)
    chosen = select_variant(cpu_measured, [small, CPU], "total")
    assert chosen.device.kind == "cpu" and chosen.variant.id == "total-tucker-balanced"
    assert "GTX 1650: nothing fits" in chosen.reason


def test_a_cpu_time_measured_in_openvino_does_not_count_where_openvino_is_missing(variants, monkeypatch):
    """PyTorch runs the network there, and in PyTorch's stored form factor 0.7 was 1.6x slower."""
    import TuckerSegmentLib.variants.selection as selection
    uniform = next(v for v in variants if v.id == "total-tucker-0.7")
    time, source = selection.expected_time(uniform, CPU)
    assert time == uniform.speed["cpu"]["relative_time"] < 1 and "OpenVINO f32" in source
    monkeypatch.setattr(selection, "openvino_missing", lambda: "OpenVINO is not installed (pip install openvino)")
    assert selection.expected_time(uniform, CPU) == (None, None)


def test_no_variant_fits_little_ram_and_the_error_says_what_to_do(variants):
    with pytest.raises(ModelFolderError, match="fits in free memory.*lighter task"):
        select_variant(variants, [LOW_RAM_CPU], "total")


def test_unmeasured_and_published_variants_are_never_picked_automatically(variants):
    for task in ("total", "fast", "fastest"):  # nothing measured on this machine: the original
        assert select_variant(variants, [CPU], task).variant.original


def test_the_user_can_always_override_and_is_told_the_caveats(variants, cpu_measured):
    chosen = select_variant(variants, [CPU], "fast", preference="fast-tucker-0.3")
    assert chosen.variant.id == "fast-tucker-0.3" and "chosen by the user" in chosen.reason
    assert "quality NOT within auto's limits: not measured on this machine (unmeasured; run:" in chosen.reason
    lossy = select_variant(cpu_measured, [CPU], "total", preference="total-tucker-0.5")
    assert "quality NOT within auto's limits: agreement 0.950 (lowest 0.950, liver): mean below 0.97" in lossy.reason


def test_variants_not_ready_are_not_chosen_and_the_error_names_how_to_get_them():
    missing = load_catalogue()  # availability unknown = missing
    with pytest.raises(ModelFolderError, match="no model of task 'total' is ready"):
        select_variant(missing, [CPU], "total")
    with pytest.raises(ModelFolderError, match="is missing here"):
        select_variant(missing, [CPU], "total", preference="total-tucker-0.7")


def test_fallback_chain_goes_to_smaller_variants_then_the_cpu():
    rtx = gpu("NVIDIA GeForce RTX 2080 Ti", 10.5)
    variants = measured(ts_ready(), total_tucker_07=measured_on(rtx, 1.4), total_tucker_balanced=measured_on(rtx, 1.2),
                        total_tucker_fast=measured_on(rtx, 1.1))
    first = select_variant(variants, [rtx, CPU], "total")
    chain = fallback_chain(first, variants, [CPU])
    ids = [(s.variant.id, s.device.kind) for s in chain]
    assert ids[0] == ("total-tucker-0.7", "cuda") and ids[-1] == ("total", "cpu")  # measured on the GPU only
    gpu_ids = [i for i, kind in ids[1:-1]]
    assert set(gpu_ids) <= {"total", "total-tucker-balanced", "total-tucker-fast"}
    memory = [next(v for v in variants if v.id == i).memory_bytes("cuda")[0] for i in ["total-tucker-0.7", *gpu_ids]]
    assert memory == sorted(memory, reverse=True) and len(set(memory)) == len(memory)


def test_auto_picks_the_task_by_device_kind(variants):
    assert choose_model("auto", devices=[CPU], variants=variants).id == "fast"  # TotalSegmentator's CPU advice
    assert choose_model("auto", devices=[gpu("NVIDIA GeForce RTX 3090", 23.0), CPU], variants=variants).id == "total"
    demo_only = [v for v in variants if v.task == "demo"]
    choice = choose_model("auto", devices=[CPU], variants=demo_only)
    assert choice.id == "chest-demo-tucker-balanced" and "fast is not ready here" in choice.reason


def test_cpu_ram_check_splits_or_refuses(variants):
    fast = next(v for v in variants if v.id == "fast")
    voxels = 150 * 150 * 150
    need_bytes = fast.memory_bytes("cpu", voxels)[0]
    assert cpu_slab_voxels(fast, voxels, int(need_bytes / (1 - MEMORY_MARGIN)) + 1) is None  # fits whole
    slab = cpu_slab_voxels(fast, voxels, int(need_bytes * 0.95 / (1 - MEMORY_MARGIN)))
    assert voxels // 64 <= slab < voxels and fast.memory_bytes("cpu", slab)[0] <= need_bytes * 0.95
    with pytest.raises(NotEnoughMemoryError, match="too little even in slabs"):
        cpu_slab_voxels(fast, voxels, fast.peak_memory["cpu"]["tile_bytes"])


def test_detected_devices_describe_this_machine():
    devices = detect_devices()
    assert devices[-1].kind == "cpu" and devices[-1].cores >= 1
    assert 0 < devices[-1].free_bytes <= devices[-1].total_bytes
    assert [d.kind for d in devices].count("cuda") == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


def test_gpu_out_of_memory_falls_back_and_the_cpu_run_is_real(monkeypatch):
    """A simulated 8 GB GPU runs out of memory on every variant; the run ends on the real CPU path."""
    here = catalogue()
    demo = [v for v in here if v.task == "demo"]
    fake_gpu = gpu("NVIDIA GeForce RTX 2080 Ti", 10.5)
    choice = choose_model("chest-demo", variants=demo, devices=[fake_gpu, CPU])
    assert choice.device == "cuda:0"
    real_segment = TaskSegmenter.segment
    attempts = []

    def segment(self, volume, *args, **kwargs):
        attempts.append((self.name, self._options["device"]))
        if self._options["device"].startswith("cuda"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_segment(self, volume, *args, **kwargs)

    monkeypatch.setattr(TaskSegmenter, "segment", segment)
    messages = []
    runner = SafeTask(choice, demo, [fake_gpu, CPU], notify=messages.append)
    ct = chest_sample().ct
    result = runner.segment(ct)
    assert attempts[0] == ("chest-demo", "cuda:0") and attempts[-1][1] == "cpu"
    assert all(device.startswith("cuda") for _, device in attempts[:-1])
    assert len(messages) == len(attempts) - 1 and "ran out of memory on NVIDIA GeForce RTX 2080 Ti" in messages[0]
    assert result.device == "cpu" and {s.name for s in result.found()} >= {"right lung", "left lung"}
    on_cpu = choose_model("auto", task="demo", variants=demo, devices=[CPU])  # the CPU's own pick
    assert attempts[-1] == (on_cpu.id, "cpu")
    assert np.array_equal(result.labels, TaskSegmenter(list(on_cpu.folders), device="cpu").segment(ct).labels)


def test_the_workers_device_facts_round_trip_and_a_damaged_answer_is_refused():
    import json

    from TuckerSegmentLib.errors import TuckerSegmentError
    from TuckerSegmentLib.runtime.hardware import MachineFacts, cpu_device
    facts = MachineFacts((gpu("NVIDIA H100", 70), cpu_device()), "2026.4.1", ("FP32", "BF16", "INT8"))
    sent = json.loads(json.dumps(facts.to_json()))  # as the worker's answer line carries it
    assert MachineFacts.from_json(sent) == facts
    assert facts.describe().splitlines() == [facts.devices[0].describe(), facts.devices[1].describe(),
                                             "OpenVINO 2026.4.1 on the CPU (FP32, BF16, INT8)"]
    gpu_entry, cpu_entry = sent["devices"]
    damaged = [None, [], {}, {**sent, "devices": []}, {**sent, "devices": [cpu_entry, gpu_entry]},
               {**sent, "openvino": 5}, {**sent, "cpu_capabilities": [1]}, {**sent, "cpu_capabilities": "FP32"},
               *({**sent, "devices": [{**gpu_entry, **change}, cpu_entry]} for change in (
                   {"free_bytes": -1}, {"index": True}, {"capability": [9, 0, 1]}, {"kind": "tpu"},
                   {"name": None}, {"total_bytes": 1.5}, {"note": 3}, {"cores": "many"}))]
    for answer in damaged:
        with pytest.raises(TuckerSegmentError, match="^the worker's device facts are damaged"):
            MachineFacts.from_json(answer)


def with_forms(measurement: dict, **forms: tuple[float, float]) -> dict:
    """``measurement`` with precision forms measured as build-variants records them: precision=(speedup, mean)."""
    return {**measurement, "forms": {precision: {**measured_on(CPU, speedup, mean), "runtime": f"OpenVINO {precision}"}
                                     for precision, (speedup, mean) in forms.items()}}


@pytest.mark.parametrize("capabilities, int8, expected", [
    (["FP32", "BF16", "INT8"], (4.0, 0.95), "bf16"),  # int8 fastest but below the rule: never auto's choice
    (["FP32", "BF16", "INT8"], (4.0, 0.99), "int8"),
    (["FP32", "BF16"], (4.0, 0.99), "bf16"),  # a CPU without int8 never gets the int8 form
    (["FP32"], (4.0, 0.99), "auto"),  # nor bf16 without bf16: the variant in f32
])
def test_auto_chooses_the_fastest_measured_precision_form_that_qualifies_on_this_cpu(variants, monkeypatch,
                                                                                   capabilities, int8, expected):
    from TuckerSegmentLib.variants import forms
    monkeypatch.setattr(forms, "cpu_capabilities", lambda: capabilities)
    ready = measured(variants, total_tucker_balanced=with_forms(measured_on(CPU, 1.6), bf16=(2.5, 0.99), int8=int8))
    choice = choose_model("auto", "total", "cpu", ready, [CPU])
    assert choice.id == "total-tucker-balanced" and choice.precision == expected
    speed = {"bf16": "2.50x", "int8": "4.00x", "auto": "1.60x"}[expected]
    assert f"{speed} faster than the original" in choice.reason
    if expected != "auto":
        assert f"total / total-tucker-balanced in {expected}:" in choice.reason
        assert f"measured here in OpenVINO {expected}" in choice.reason and f"{expected} form: " in choice.reason
    preferred = choose_model("total-tucker-balanced", "auto", "cpu", ready, [CPU])  # the variant named, precision auto
    assert preferred.precision == expected


def test_precision_forms_of_a_measurement_taken_elsewhere_never_qualify(variants, monkeypatch):
    from TuckerSegmentLib.variants import forms
    monkeypatch.setattr(forms, "cpu_capabilities", lambda: ["FP32", "BF16", "INT8"])
    elsewhere = {**measured_on(CPU, 1.6), "context": {**measurement_context(CPU), "device": "another CPU (4 cores)"}}
    ready = measured(variants, total_tucker_balanced=with_forms(elsewhere, int8=(4.0, 0.99)))
    choice = choose_model("auto", "total", "cpu", ready, [CPU])
    assert choice.precision == "auto" and choice.id != "total-tucker-balanced"


def test_precision_forms_are_judged_by_the_workers_cpu_facts_without_looking_them_up_here(variants, monkeypatch):
    from TuckerSegmentLib.runtime.hardware import MachineFacts, undetected_devices
    from TuckerSegmentLib.variants import forms

    def looked_up():
        raise AssertionError("cpu_capabilities looked up (imports OpenVINO) in the process that asked the worker")
    monkeypatch.setattr(forms, "cpu_capabilities", looked_up)
    ready = measured(variants, total_tucker_balanced=with_forms(measured_on(CPU, 1.6), bf16=(2.5, 0.99), int8=(4, 0.99)))
    for capabilities, expected in ((("FP32", "BF16", "INT8"), "int8"), (("FP32", "BF16"), "bf16")):
        facts = MachineFacts((CPU,), "2026.4.1", capabilities)
        assert choose_model("auto", "total", "cpu", ready, list(facts.devices)).precision == expected
        assert MachineFacts.from_json(facts.to_json()) == facts  # the worker's answer carries them
    assert choose_model("auto", "total", "cpu", ready, undetected_devices()).precision == "auto"  # not known yet
