"""Fast exact execution of factorised layers, per-device timing tables, and latency budgets."""
from __future__ import annotations

import copy
import itertools
import json
import random

import numpy as np
import pytest
import torch
from test_policies import SmallUNet3d, seeded_unet
from torch import nn
from TuckerSegmentLib.checksums import SEAL, sealed
from TuckerSegmentLib import BudgetPolicy, UniformPolicy, compress_network, policy_from_dict
from TuckerSegmentLib.cli import main
from TuckerSegmentLib.compress.folder import compress_model_folder
from TuckerSegmentLib.compress.network import CompressionReport, survey
from TuckerSegmentLib.errors import CacheWarning, PolicyError, TuckerSegmentError
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.runtime.execution import (
    ExecutedConv,
    Execution,
    NetworkLatency,
    dense_op,
    execute_as,
    execution_seconds,
    executions,
    fastest,
    latency_grid,
    optimise_execution,
    primitives,
    rank_anchors,
    reference_execution,
)
from TuckerSegmentLib.runtime.inference import RuntimeChoice, openvino_missing
from TuckerSegmentLib.runtime.latency import LatencyTable
from TuckerSegmentLib.runtime.openvino_timing import compile_op
from TuckerSegmentLib.tucker.layers import ConvOp, conv_op, matmul_applies
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.demo_data import chest_sample
from TuckerSegmentLib.tucker.decomposition import LayerPlan, decompose_conv
from TuckerSegmentLib.variants.choice import bundled_models

GEOMETRIES = [  # (layer, input shape)
    (nn.Conv3d(12, 10, 3, padding=1), (2, 12, 6, 7, 5)),
    (nn.Conv3d(12, 10, 3, stride=2, padding=1, dilation=1), (1, 12, 9, 8, 7)),
    (nn.Conv3d(12, 10, 3, padding=2, dilation=2, bias=False), (1, 12, 8, 8, 8)),
    (nn.Conv3d(12, 10, 1), (1, 12, 5, 6, 7)),  # pointwise: the core can run as a matmul
    (nn.ConvTranspose3d(12, 10, 2, stride=2), (2, 12, 4, 5, 3)),  # nnU-Net's upsampling: patch matmul
    (nn.ConvTranspose3d(12, 10, 3, stride=2, padding=1, output_padding=1), (1, 12, 4, 4, 4)),
    (nn.Conv2d(12, 10, 3, padding=1), (1, 12, 9, 9)),
    (nn.ConvTranspose2d(12, 10, 2, stride=2, bias=False), (1, 12, 5, 4)),
]
PLANS = [LayerPlan(rank_out=4, rank_in=5), LayerPlan(rank_out=None, rank_in=5), LayerPlan(rank_out=4, rank_in=None)]


@pytest.mark.parametrize("layer, shape", GEOMETRIES, ids=lambda g: type(g).__name__ if isinstance(g, nn.Module) else "")
def test_every_execution_computes_the_reference_outputs(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    with torch.no_grad():
        layer.weight.normal_()
        for plan in [*PLANS, LayerPlan()]:
            module = layer if plan.form == "dense" else decompose_conv(layer, plan.rank_out, plan.rank_in).eval()
            reference = module(x)
            dense = dense_op(module, tuple(shape))
            forms = executions(plan, dense)
            assert len(forms) == (3 if plan.rank_in else 1) * (3 if plan.rank_out else 1) * (2 if matmul_applies(dense) else 1)
            for execution in forms:
                executed = execute_as(module, execution)
                assert isinstance(executed, ExecutedConv) and executed.plan == plan
                out = executed(x)
                assert out.shape == reference.shape
                torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()),
                                           msg=f"{type(layer).__name__} {plan} {execution.label}")


def test_matmul_applies_only_where_the_function_is_a_channel_product():
    x = (1, 4, 8, 8, 8)
    assert matmul_applies(conv_op(nn.Conv3d(4, 4, 1), x))
    assert not matmul_applies(conv_op(nn.Conv3d(4, 4, 1, stride=2), x))
    assert not matmul_applies(conv_op(nn.Conv3d(4, 4, 3, padding=1), x))
    assert matmul_applies(conv_op(nn.ConvTranspose3d(4, 4, 2, stride=2), x))
    assert not matmul_applies(conv_op(nn.ConvTranspose3d(4, 4, 3, stride=2), x))
    assert not matmul_applies(conv_op(nn.ConvTranspose3d(4, 4, 2, stride=2, padding=1), x))


def random_table(seed: int):
    """Seconds per operation drawn at random (each op key gets one fixed value): any device could behave so."""
    rng = random.Random(seed)
    cache: dict[str, float] = {}
    return lambda op: cache.setdefault(op.key(), rng.uniform(0.001, 1.0))


@pytest.mark.parametrize("seed", range(20))
def test_chooser_never_picks_a_slower_form_on_a_timing_table(seed):
    seconds = random_table(seed)
    dense = conv_op(nn.ConvTranspose3d(32, 16, 2, stride=2) if seed % 2 else nn.Conv3d(32, 16, 3, padding=1),
                    (1, 32, 16, 16, 16))
    out_shape = (1, 16, 32, 32, 32) if seed % 2 else (1, 16, 16, 16, 16)
    for plan in [*PLANS, LayerPlan(rank_out=8, rank_in=8), LayerPlan()]:
        chosen, time = fastest(dense, out_shape, plan, seconds)
        all_times = {e: execution_seconds(dense, out_shape, plan, e, seconds) for e in executions(plan, dense)}
        assert time == all_times[chosen] == min(all_times.values())
        assert time <= seconds(dense)  # never slower than the original layer (both factors folded)
        assert time <= all_times[reference_execution(plan)]


def test_chooser_follows_the_table_not_a_fixed_preference():
    dense = conv_op(nn.Conv3d(32, 32, 3, padding=1), (1, 32, 16, 16, 16))
    plan = LayerPlan(rank_out=8, rank_in=8)

    def table(pointwise: dict[str, float], small_core: float | None = None):
        def seconds(op: ConvOp) -> float:
            if op.kernel_size == (1, 1, 1):
                return pointwise[op.kind]
            if small_core is not None and min(op.c_in, op.c_out) < 32:
                return small_core
            return 0.5 * op.c_in * op.c_out / 32 ** 2  # a core costs in proportion to its channels
        return seconds

    shape = (1, 32, 16, 16, 16)
    assert fastest(dense, shape, plan, table({"matmul": 1.0, "conv": 0.05}))[0] == Execution("conv", "conv")
    assert fastest(dense, shape, plan, table({"matmul": 0.01, "conv": 0.05}))[0] == Execution("matmul", "matmul")
    # a core that is slow at small ranks: folding the factors back (the dense layer) wins
    slow = table({"matmul": 0.01, "conv": 0.05}, small_core=5.0)
    assert fastest(dense, shape, plan, slow)[0] == Execution("folded", "folded")


def flop_seconds(op: ConvOp) -> float:
    """A deterministic stand-in device: time ∝ multiply-adds, matmuls twice as fast as convolutions."""
    taps = int(np.prod(op.kernel_size))
    voxels = int(np.prod(op.input_shape[2:]))
    return op.c_in * op.c_out * taps * voxels * (0.5 if op.kind in ("matmul", "patchmatmul") else 1.0) * 1e-12


def test_optimised_network_matches_and_is_never_predicted_slower():
    network = seeded_unet()
    x = torch.randn(1, 1, 16, 16, 16)
    compress_network(network, UniformPolicy(0.5), x)
    with torch.no_grad():
        reference = network(x)
    table = LatencyTable("cpu", measure=flop_seconds)
    report = optimise_execution(network, x, table)
    assert report.layers and report.measured > 0
    assert any(isinstance(m, ExecutedConv) for m in network.modules())
    for layer in report.layers:
        assert layer.seconds <= layer.dense_seconds and layer.seconds <= layer.reference_seconds
    assert report.seconds < report.reference_seconds
    with torch.no_grad():
        torch.testing.assert_close(network(x), reference, rtol=1e-4, atol=1e-4)
    again = optimise_execution(network, x, table)  # already optimised: nothing new to time or replace
    assert again.measured == 0 and again.seconds <= report.seconds


def test_latency_table_is_kept_per_device(tmp_path):
    calls = []
    measure = lambda op: calls.append(op) or 0.25  # noqa: E731
    path = tmp_path / "table.json"
    op = conv_op(nn.Conv3d(4, 8, 3, padding=1), (1, 4, 8, 8, 8))
    table = LatencyTable("cpu", path, measure=measure)
    assert table.seconds(op) == 0.25 and table.seconds(op) == 0.25 and len(calls) == 1
    table.save()
    assert json.loads(path.read_text())["device"] == table.name
    again = LatencyTable("cpu", path, measure=measure)
    assert again.seconds(op) == 0.25 and len(calls) == 1  # read back, not measured
    other = conv_op(nn.Conv3d(4, 2, 1), (1, 4, 8, 8, 8))
    again.seconds(other)
    again.save()
    table.save()  # an older instance saving later keeps what the newer one added
    assert LatencyTable("cpu", path, measure=measure).seconds(other) == 0.25 and len(calls) == 2
    data = {key: value for key, value in json.loads(path.read_text()).items() if key != SEAL}
    path.write_text(json.dumps(sealed(data | {"device": "another machine"})))  # written there, intact
    assert LatencyTable("cpu", path, measure=measure).seconds(op) == 0.25 and len(calls) == 3  # other device: re-timed
    path.write_text("{not json")
    with pytest.warns(CacheWarning, match="cannot be read; it is not used: measuring again"):
        assert LatencyTable("cpu", path, measure=measure).seconds(op) == 0.25 and len(calls) == 4  # corrupt: re-timed
    real = LatencyTable("cpu")  # a real measurement of a small convolution
    assert 0 < real.seconds(op) < 5


def test_latency_budget_meets_its_target_on_the_timing_model():
    network = SmallUNet3d()
    x = torch.randn(1, 1, 16, 16, 16)
    infos = survey(network, x).infos
    table = LatencyTable("cpu", measure=flop_seconds)
    latency = NetworkLatency(table, network_seconds=1.0, other_seconds=1e-6)
    original = latency.other_seconds + sum(latency.original_seconds(i) for i in infos)
    for target in (0.8, 0.5, 0.3):
        plans = BudgetPolicy(target_latency=target, device="cpu", sensitivity=None).with_latency(latency).plan(infos)
        predicted = latency.other_seconds + sum(latency.layer_seconds(i, plans[i.name]) for i in infos)
        assert predicted <= target * original * 1.0001
        assert any(p.form != "dense" for p in plans.values())
    with pytest.raises(PolicyError, match="needs measured timings"):
        BudgetPolicy(target_latency=0.5).plan(infos)
    slow_rest = NetworkLatency(table, network_seconds=1.0, other_seconds=original)
    with pytest.raises(PolicyError, match=r"cannot be reached on cpu.*other than convolutions alone 50%"):
        BudgetPolicy(target_latency=0.5, device="cpu").with_latency(slow_rest).plan(infos)
    policy = BudgetPolicy(target_latency=0.4, device="cpu")
    assert policy_from_dict(json.loads(json.dumps(policy.to_dict()))).params() == policy.params()
    with pytest.raises(PolicyError, match="target_latency must be a fraction"):
        BudgetPolicy(target_latency=1.5)


@pytest.mark.parametrize("runtime", ["auto", "torch"])
def test_compress_cli_target_latency_measures_in_the_runtime_and_reports(tiny_model, tmp_path, capsys, runtime):
    out = tmp_path / "fast"
    assert main(["compress", str(tiny_model), str(out), "--target-latency", "0.9", "--device", "cpu", "--quiet",
                 "--json", "--runtime", runtime]) == 0
    report = json.loads(capsys.readouterr().out)["0"]
    assert report["policy"]["params"]["target_latency"] == 0.9 and report["policy"]["params"]["runtime"] == runtime
    timing = report["latency"]
    assert timing["original_seconds"] > 0 and timing["compressed_seconds"] > 0 and 1 <= timing["attempts"] <= 3
    assert timing["ratio"] == pytest.approx(timing["compressed_seconds"] / timing["original_seconds"])
    openvino = runtime == "auto" and openvino_missing() is None  # auto on a CPU: OpenVINO when installed
    assert ("OpenVINO" in timing["device"]) == openvino and ("torch" in timing["device"]) != openvino
    record = json.loads((out / "fold_0" / "tucker.json").read_text())
    assert record["policy"]["params"]["target_latency"] == 0.9
    assert ModelFolder.open(out).load_network(0) is not None


def test_compress_refuses_an_unknown_runtime_and_writes_nothing(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["compress", str(tiny_model), str(tmp_path / "a"), "--target-latency", "0.9", "--runtime", "tensorrt"])
    assert "invalid choice: 'tensorrt'" in capsys.readouterr().err
    policy = BudgetPolicy(target_latency=0.9, device="cpu", runtime="tensorrt")
    with pytest.raises(TuckerSegmentError, match="^unknown runtime 'tensorrt'; choose one of auto, torch, openvino"):
        compress_model_folder(tiny_model, tmp_path / "b", policy)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("module, shape", [
    (nn.Conv3d(4, 8, 3, padding=1, bias=True), (1, 4, 8, 10, 12)),
    (nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1, bias=False), (1, 4, 8, 10, 12)),
    (nn.ConvTranspose3d(8, 4, (1, 2, 2), stride=(1, 2, 2), bias=False), (1, 8, 4, 5, 6))])
def test_openvino_times_the_operation_pytorch_describes(module, shape):
    """An operation built in OpenVINO's operation set computes what PyTorch's does (same output shape and,
    with the same weights, the same values), so its timing is of the right operation."""
    pytest.importorskip("openvino")
    op = conv_op(module, shape)
    request = compile_op(op, "f32", weight=module.weight.detach().numpy(),
                         bias=None if module.bias is None else module.bias.detach().numpy())
    x = torch.randn(shape)
    got = request.infer([x.numpy()])[0]
    with torch.no_grad():
        expected = module(x).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()
    table = LatencyTable("cpu", runtime=RuntimeChoice("openvino", "f32", "asked"))
    assert table.stored_form_only and "OpenVINO" in table.name and "f32" in table.name
    assert 0 < table.seconds(op) < 5


def test_segmenter_fastest_execution_gives_the_reference_labels():
    entry = next(e for e in bundled_models() if e["policy"] != "original")
    ct = chest_sample().ct
    fast = Segmenter(entry["path"], device="cpu", runtime="torch")  # execution forms are PyTorch's
    reference = Segmenter(entry["path"], device="cpu", runtime="torch", execution="reference")
    assert fast.execution is not None and fast.execution.layers and reference.execution is None
    assert any(isinstance(m, ExecutedConv) for m in fast._predictor.network.modules())
    a, b = fast.segment(ct).labels, reference.segment(ct).labels
    assert (a == b).mean() > 0.9999
    with pytest.raises(TuckerSegmentError, match="unknown execution 'quick'"):
        Segmenter(entry["path"], device="cpu", execution="quick")


def test_all_plans_of_a_grid_execute_exactly():
    """Every rank pair of a small layer, every execution: same outputs (a sweep, not a sample)."""
    torch.manual_seed(1)
    conv = nn.Conv3d(6, 5, 3, padding=1)
    x = torch.randn(1, 6, 5, 5, 5)
    for r_out, r_in in itertools.product([None, 1, 3, 5], [None, 1, 4, 6]):
        if r_out is None and r_in is None:
            continue
        module = decompose_conv(conv, r_out, r_in).eval()
        with torch.no_grad():
            reference = module(x)
            for execution in executions(module.plan, dense_op(module, tuple(x.shape))):
                torch.testing.assert_close(execute_as(module, execution)(x), reference, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("ratios, kept", [([0.35, 0.55, 0.48], 2), ([0.35, 0.60, 0.62], 0), ([0.51], 0),
                                          ([0.7, 0.6, 0.58], 2)])
def test_a_latency_budget_replans_when_it_misses_either_way_and_keeps_the_slowest_plan_that_met_it(
        monkeypatch, ratios, kept):
    """Faster than asked gives accuracy away, slower misses the target: both re-plan (up to three plans);
    the network keeps the slowest plan within the target, or the last when none met it."""
    import TuckerSegmentLib.compress.network as compression
    original, x = SmallUNet3d(), torch.randn(1, 1, 16, 16, 16)
    latency = NetworkLatency(LatencyTable("cpu", measure=flop_seconds), network_seconds=1.0, other_seconds=1e-6)
    policy = BudgetPolicy(target_latency=0.5, device="cpu", sensitivity=None).with_latency(latency)
    network = copy.deepcopy(original)
    report = compression._apply(network, policy, survey(network, x), {}, x, None)
    measured, seen = iter(ratios), []

    def scripted(base_network, compressed, example, table):
        seen.append(compressed._modules)
        return 1.0, next(measured)
    monkeypatch.setattr(compression, "compare_latency", scripted)
    monkeypatch.setattr(compression, "_apply", lambda net, pol, *args: seen.append(pol.latency.scale) or
                        CompressionReport(policy=pol.to_dict(), before=report.before))
    final = compression._meet_latency(network, original, policy, report, {}, x)
    assert final.latency["attempts"] == len(ratios) and final.latency["ratio"] == ratios[kept]
    plans = [m for m in seen if isinstance(m, dict)]
    assert network._modules is plans[kept]
    corrections = [s for s in seen if isinstance(s, float)]  # each re-plan seen the budget by target / ratio
    assert corrections == pytest.approx(np.cumprod([0.5 / r for r in ratios[:-1]]).tolist())


def test_a_latency_budget_times_each_layer_at_its_anchor_ranks_only_and_interpolates_between_them():
    dense = ConvOp("conv", 320, 256, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0, 0), True, (1, 320, 8, 8, 8))
    timed: set[tuple[int, int, int]] = set()

    def cost(op: ConvOp) -> float:  # memory traffic on each side and multiply-adds of both, per tap
        return 1e-3 + 2e-5 * op.c_in + 3e-5 * op.c_out + 1e-7 * op.c_in * op.c_out * op.kernel_size[0] ** 3

    def bilinear(op: ConvOp) -> float:
        timed.add((op.c_in, op.c_out, op.kernel_size[0]))
        return cost(op)
    plans = [LayerPlan(rank_out=r_out, rank_in=r_in) for r_in in latency_grid(320)[:-1]
             for r_out in latency_grid(256)[:-1]]
    assert len(plans) == 7 * 7
    for plan in plans:
        stored = reference_execution(plan)
        exact = sum(cost(op) for op in primitives(dense, dense.input_shape, plan, stored))
        assert execution_seconds(dense, dense.input_shape, plan, stored, bilinear, anchored=True) == \
            pytest.approx(exact, rel=1e-9)
    cores = {t for t in timed if t[2] == 3}
    assert cores == {(a, b, 3) for a in rank_anchors(320) for b in rank_anchors(256)}  # 9 cores, not 49
    assert len(timed - cores) == 6  # each factor at its side's 3 anchors, not 7


def test_large_operations_are_timed_on_a_part_of_their_input_scaled_by_the_voxels_left_out():
    from TuckerSegmentLib.runtime.openvino_timing import reduced
    big = ConvOp("conv", 32, 32, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0, 0), True, (1, 32, 112, 112, 128))
    part, scale = reduced(big, 64 ** 3)
    assert part.input_shape[:2] == (1, 32) and np.prod(part.input_shape[2:]) <= 64 ** 3
    assert scale * np.prod(part.input_shape[2:]) == np.prod(big.input_shape[2:]) and scale == 8
    assert part.key() != big.key() and part.c_in == big.c_in and part.kernel_size == big.kernel_size
    strided = ConvOp("conv", 32, 64, (3, 3, 3), (2, 2, 2), (1, 1, 1), (1, 1, 1), (0, 0, 0), True, (1, 32, 6, 6, 6))
    assert reduced(strided, 8) == (strided, 1.0)  # halving 6 would leave half a stride: kept whole
    small = ConvOp("conv", 8, 8, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1), (0, 0, 0), True, (1, 8, 16, 16, 16))
    assert reduced(small) == (small, 1.0)
