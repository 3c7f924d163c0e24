"""Whole-network compression: identity-based replacement, the uniform rule, the report."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from TuckerSegmentLib import ModelFolder, TuckerConv, UniformPolicy, compress_network, policy_from_dict
from TuckerSegmentLib.errors import PolicyError
from TuckerSegmentLib.tucker.layers import LayerInfo


@pytest.fixture()
def tiny_network(tiny_model):
    folder = ModelFolder.open(tiny_model)
    return folder, folder.load_network(0)


def _expected_params(c_out: int, c_in: int, kernel: int, policy: UniformPolicy, bias: bool = True) -> int:
    r_out, r_in = policy.rank(c_out), policy.rank(c_in)
    return c_in * r_in + r_in * r_out * kernel + r_out * c_out + (c_out if bias else 0)


def test_full_rank_network_reproduces_the_original(tiny_network):
    folder, network = tiny_network
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        reference = network(x)
        compress_network(network, UniformPolicy(1.0, rank_min=1), folder.example_input())
        compressed = network(x)
    assert ((reference - compressed).abs().max() / reference.abs().max()).item() < 1e-4


def test_each_layer_is_replaced_once_and_aliases_follow(tiny_network):
    folder, network = tiny_network
    convs_before = {id(m) for m in network.modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)}
    block = network.encoder.stages[0][0].convs[0]
    assert block.conv is block.all_modules[0] and network.decoder.encoder is network.encoder
    report = compress_network(network, UniformPolicy(0.5), folder.example_input())

    assert block.conv is block.all_modules[0] and isinstance(block.conv, TuckerConv)
    assert network.decoder.encoder is network.encoder
    factorised = {id(m): m for m in network.modules() if isinstance(m, TuckerConv)}
    assert len(factorised) == len(report.plans) == len(convs_before) - len(report.unused_layers)
    for module in factorised.values():  # no factorisation inside a factorisation
        assert not any(isinstance(child, TuckerConv) for child in module.modules() if child is not module)
    assert len({layer.name for layer in report.layers}) == len(report.layers)


def test_uniform_rule_parameters_match_the_formula(tiny_network):
    folder, network = tiny_network
    policy = UniformPolicy(0.5, rank_min=2)
    before = {name: m for name, m in network.named_modules() if isinstance(m, nn.Conv3d | nn.ConvTranspose3d)}
    report = compress_network(network, policy, folder.example_input())
    for layer in report.layers:
        conv = before[layer.name]
        kernel = math.prod(conv.kernel_size)
        assert (layer.plan.rank_out, layer.plan.rank_in) == (policy.rank(conv.out_channels), policy.rank(conv.in_channels))
        assert layer.params_after == _expected_params(conv.out_channels, conv.in_channels, kernel, policy)
    unused = sum(sum(p.numel() for p in before[name].parameters()) for name in report.unused_layers)
    others = report.before.params - sum(layer.params_before for layer in report.layers)
    assert report.after.params == others + sum(layer.params_after for layer in report.layers)
    assert unused > 0  # deep-supervision heads exist but are not counted


def test_report_flops_add_up_to_the_network_flops(tiny_network):
    folder, network = tiny_network
    report = compress_network(network, UniformPolicy(0.3, rank_min=2), folder.example_input())
    assert sum(layer.flops_before for layer in report.layers) == report.before.flops
    assert sum(layer.flops_after for layer in report.layers) == report.after.flops
    assert report.after.flops < 0.5 * report.before.flops
    assert all(0 < layer.rel_error < 1 for layer in report.layers if layer.plan.rank_in < layer.weight_shape[1])


def test_unused_deep_supervision_heads_stay_dense(tiny_network):
    folder, network = tiny_network
    report = compress_network(network, UniformPolicy(0.5), folder.example_input())
    assert report.unused_layers == ["decoder.seg_layers.0"]
    assert isinstance(network.decoder.seg_layers[0], nn.Conv3d)
    assert isinstance(network.decoder.seg_layers[1], TuckerConv)


def test_any_module_with_shared_layers_compresses_once():
    shared = nn.Conv3d(16, 16, 3, padding=1)
    network = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.ReLU(), shared, nn.ReLU(), shared,
                            nn.ConvTranspose3d(16, 4, 2, stride=2))
    report = compress_network(network, UniformPolicy(0.5, rank_min=4))
    assert network[2] is network[4] and isinstance(network[2], TuckerConv)
    assert [layer.name for layer in report.layers] == ["0", "2", "5"]
    assert all(layer.flops_before is None for layer in report.layers) and report.before is None
    assert network(torch.randn(1, 1, 6, 6, 6)).shape == (1, 4, 12, 12, 12)


def test_dense_plans_leave_layers_untouched():
    class OnlyFirst(UniformPolicy):
        name = "test-only-first"

        def plan(self, layers, calibration=None):
            return {layers[0].name: super().plan(layers)[layers[0].name]}

    network = nn.Sequential(nn.Conv3d(8, 8, 3), nn.Conv3d(8, 8, 3))
    second = network[1]
    report = compress_network(network, OnlyFirst(0.5, rank_min=2))
    assert isinstance(network[0], TuckerConv) and network[1] is second
    assert [layer.plan.form for layer in report.layers] == ["tucker2", "dense"]


@pytest.mark.parametrize("channels, factor, rank_min, expected", [
    (320, 0.7, 8, 224), (320, 0.5, 8, 160), (256, 0.3, 8, 77), (32, 0.1, 8, 8), (4, 0.1, 8, 4), (1, 0.5, 8, 1),
    (25, 0.3, 8, 8), (64, 0.9, 16, 58),
])
def test_uniform_rank_rule(channels, factor, rank_min, expected):
    assert UniformPolicy(factor, rank_min).rank(channels) == expected


@pytest.mark.parametrize("factor", [0, -0.5, 1.01, "0.5", True, float("nan")])
def test_uniform_policy_refuses_factors_outside_0_1(factor):
    with pytest.raises(PolicyError, match="factor must be a number in"):
        UniformPolicy(factor)


def test_uniform_policy_refuses_bad_rank_min():
    with pytest.raises(PolicyError, match="rank_min"):
        UniformPolicy(0.5, rank_min=0)


def test_policy_round_trips_through_its_record():
    policy = policy_from_dict(UniformPolicy(0.3, rank_min=16).to_dict())
    assert isinstance(policy, UniformPolicy) and policy.params() == {"factor": 0.3, "rank_min": 16}
    with pytest.raises(PolicyError, match="unknown rank policy 'nope'"):
        policy_from_dict({"name": "nope"})


def test_policies_see_every_layer_at_once(tiny_network):
    folder, network = tiny_network
    seen: list[LayerInfo] = []

    class Recorder(UniformPolicy):
        name = "test-recorder"

        def plan(self, layers, calibration=None):
            seen.extend(layers)
            return {}

    report = compress_network(network, Recorder(0.5), folder.example_input())
    assert [info.name for info in seen] == [layer.name for layer in report.layers]
    stem = seen[0]
    assert (stem.c_in, stem.c_out, stem.kernel_size, stem.input_shape) == (1, 8, (3, 3, 3), (1, 1, 32, 32, 32))
    assert stem.flops == 2 * 8 * 1 * 27 * 32 ** 3


def test_plans_for_unknown_layers_are_refused():
    class Typo(UniformPolicy):
        name = "test-typo"

        def plan(self, layers, calibration=None):
            return {"not.a.layer": super().plan(layers)[layers[0].name]}

    network = nn.Sequential(nn.Conv3d(8, 8, 3))
    with pytest.raises(PolicyError, match="not.a.layer"):
        compress_network(network, Typo(0.5))
    assert isinstance(network[0], nn.Conv3d)
