"""Rank policies beyond the paper: energy, VBMF, global budgets, activation-aware decomposition."""
from __future__ import annotations

import json

import pytest
import slicerio
import torch
from torch import nn
from TuckerSegmentLib import (
    BudgetPolicy,
    EnergyPolicy,
    UniformPolicy,
    VBMFPolicy,
    collect_statistics,
    compress_network,
    network_stats,
    policy_from_dict,
)
from TuckerSegmentLib.cli import main
from TuckerSegmentLib.compress.network import SENSITIVITY_EXPONENTS, decomposable_layers, survey
from TuckerSegmentLib.errors import PolicyError
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.segment.predictor import Segmenter
from TuckerSegmentLib.testing.example_models import EXAMPLE_SPECS, example_model
from TuckerSegmentLib.tucker.decomposition import decompose_conv
from TuckerSegmentLib.variants.choice import bundled_models


class SmallUNet3d(nn.Module):
    """A plain 3D U-Net that is not nnU-Net's: Conv3d, BatchNorm, ReLU, max pooling, ConvTranspose3d, a skip."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv3d(1, 16, 3, padding=1), nn.BatchNorm3d(16), nn.ReLU(),
                                  nn.Conv3d(16, 16, 3, padding=1), nn.ReLU())
        self.bottom = nn.Sequential(nn.MaxPool3d(2), nn.Conv3d(16, 32, 3, padding=1), nn.ReLU(),
                                    nn.Conv3d(32, 32, 3, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose3d(32, 16, 2, stride=2)
        self.head = nn.Sequential(nn.Conv3d(32, 16, 3, padding=1), nn.ReLU(), nn.Conv3d(16, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(x)
        return self.head(torch.cat([skip, self.up(self.bottom(skip))], dim=1))


def smooth_inputs(n: int, shape=(1, 1, 16, 16, 16), seed: int = 0) -> list[torch.Tensor]:
    """Spatially correlated random volumes (so activations have structure, like images)."""
    generator = torch.Generator().manual_seed(seed)
    kernel = torch.ones(1, 1, 5, 5, 5) / 125
    return [nn.functional.conv3d(torch.randn(*shape, generator=generator), kernel, padding=2) * 10 for _ in range(n)]


def planted_conv(r_out: int, r_in: int, c_out: int = 32, c_in: int = 24, noise: float = 0.0, seed: int = 0) -> nn.Conv3d:
    generator = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, 3, 3, 3, generator=generator)
    u_out = torch.linalg.qr(torch.randn(c_out, r_out, generator=generator))[0]
    u_in = torch.linalg.qr(torch.randn(c_in, r_in, generator=generator))[0]
    weight = torch.einsum("abxyz,oa,ib->oixyz", core, u_out, u_in)
    weight = weight + noise * weight.std() * torch.randn(weight.shape, generator=generator)
    conv = nn.Conv3d(c_in, c_out, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


def test_energy_and_vbmf_recover_a_planted_rank():
    exact = planted_conv(5, 3)
    layers = survey(nn.Sequential(exact)).infos
    assert EnergyPolicy(0.999).plan(layers)["0"].to_dict() == {"form": "tucker2", "rank_out": 5, "rank_in": 3}
    noisy = planted_conv(6, 4, noise=0.02, seed=1)
    layers = survey(nn.Sequential(noisy)).infos
    plan = VBMFPolicy().plan(layers)["0"]
    assert (plan.rank_out, plan.rank_in) == (6, 4)
    assert EnergyPolicy(0.99).plan(layers)["0"].rank_out <= 6


@pytest.mark.parametrize("target", [0.5, 0.3, 0.2])
def test_flop_budgets_are_met_within_one_rank_step(target):
    network = SmallUNet3d().eval()
    x = torch.zeros(1, 1, 16, 16, 16)
    before = network_stats(network, x).flops
    report = compress_network(network, BudgetPolicy(target_flops=target), x, calibration=smooth_inputs(2))
    ratio = report.after.flops / before
    assert ratio <= target + 1e-9
    steps = [r.flops_before / before / min(r.weight_shape[:2]) for r in report.layers]  # one rank of each layer
    assert ratio >= target - 2 * max(steps), (ratio, target)
    assert network(x).shape == (1, 4, 16, 16, 16)


def test_parameter_budget_and_a_layer_left_dense_where_decomposing_does_not_pay():
    network = SmallUNet3d().eval()
    x = torch.zeros(1, 1, 16, 16, 16)
    before = network_stats(network, x)
    report = compress_network(network, BudgetPolicy(target_params=0.4), x)
    assert report.after.params <= 0.4 * before.params
    forms = {r.name: r.plan.form for r in report.layers}
    assert forms["down.0"] == "dense"  # 1 input channel: no factorisation can make it cheaper


def test_full_budget_reproduces_the_original_exactly():
    network = SmallUNet3d().eval()
    x = smooth_inputs(1)[0]
    expected = network(x)
    report = compress_network(network, BudgetPolicy(target_flops=1.0), torch.zeros(1, 1, 16, 16, 16),
                              calibration=smooth_inputs(2))
    assert all(r.plan.form == "dense" for r in report.layers) and report.calibration_inputs == 2
    assert torch.equal(network(x), expected)


def test_activation_aware_output_error_beats_weight_only_on_correlated_inputs():
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 16, 3, padding=1)
    mixing = torch.randn(16, 3) @ torch.randn(3, 16) + 0.05 * torch.randn(16, 16)  # channels strongly correlated

    def inputs(n: int, seed: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return [torch.einsum("dc,bcxyz->bdxyz", mixing, torch.randn(1, 16, 12, 12, 12, generator=generator))
                for _ in range(n)]

    stats = collect_statistics(nn.Sequential(conv), [("0", conv)], inputs(4, 1))["0"]
    aware = decompose_conv(conv, None, 3, in_cov=stats.in_cov, out_cov=stats.out_cov)
    weight_only = decompose_conv(conv, None, 3)
    test = torch.cat(inputs(3, 2))
    with torch.no_grad():
        reference = conv(test)
        error = {name: float((module(test) - reference).norm() / reference.norm())
                 for name, module in (("aware", aware), ("weight", weight_only))}
    assert error["aware"] <= error["weight"]
    assert error["aware"] < 0.5 * error["weight"], error  # not a tie: the whitening matters here


def test_activation_aware_full_rank_is_exact():
    conv = planted_conv(32, 24)
    stats = collect_statistics(nn.Sequential(conv), [("0", conv)], [torch.randn(1, 24, 8, 8, 8)])["0"]
    module = decompose_conv(conv, 32, 24, in_cov=stats.in_cov, out_cov=stats.out_cov)
    x = torch.randn(1, 24, 8, 8, 8)
    with torch.no_grad():
        assert torch.allclose(module(x), conv(x), rtol=1e-4, atol=1e-4)


def test_totalsegmentator_shaped_network_compresses_and_runs():
    folder = example_model(EXAMPLE_SPECS["Dataset291"].scaled(8))
    network = folder.build_network().eval()
    x = torch.zeros(1, 1, 64, 64, 64)
    before = network_stats(network, x)
    patches = smooth_inputs(2, (1, 1, 64, 64, 64))
    report = compress_network(network, BudgetPolicy(target_flops=0.3), x, calibration=patches)
    assert report.after.flops <= 0.3 * before.flops
    assert len(report.unused_layers) == 4  # nnU-Net's deep-supervision heads stay dense
    with torch.no_grad():
        assert network(patches[0]).shape == (1, 25, 64, 64, 64)


def test_policies_round_trip_and_refuse_bad_parameters():
    for policy in (EnergyPolicy(0.9), VBMFPolicy(), BudgetPolicy(target_flops=0.3), BudgetPolicy(target_params=0.2),
                   UniformPolicy(0.5)):
        assert repr(policy_from_dict(json.loads(json.dumps(policy.to_dict())))) == repr(policy)
    for bad in (lambda: BudgetPolicy(), lambda: BudgetPolicy(target_flops=1.5), lambda: EnergyPolicy(0),
                lambda: BudgetPolicy(target_params=True)):
        with pytest.raises(PolicyError):
            bad()
    with pytest.raises(PolicyError, match="pass example_input"):
        compress_network(SmallUNet3d(), BudgetPolicy(target_flops=0.5))
    with pytest.raises(PolicyError, match="calibration gave no input"):
        compress_network(SmallUNet3d(), EnergyPolicy(0.9), calibration=[])


def test_compress_cli_default_is_an_activation_aware_budget(tmp_path, capsys):
    source = next(e["path"] for e in bundled_models() if e["policy"] == "original")
    out = tmp_path / "budget"
    ct = slicerio.get_testdata_file("CTChest4.nrrd")
    assert main(["compress", str(source), str(out), "--calibration", ct, "--quiet"]) == 0
    text = capsys.readouterr().out
    record = json.loads(next(out.rglob("tucker.json")).read_text())
    chosen = record["policy"]["params"]["sensitivity"]
    assert chosen in SENSITIVITY_EXPONENTS  # "auto" resolved, label-free, to one exponent
    assert record["policy"] == {"name": "budget",
                                "params": {"target_flops": 0.5, "target_params": None, "sensitivity": chosen}}
    assert f"(activation-aware, 4 calibration patches; agreement with the original {record['agreement']:.3f})" in text
    assert record["calibration_inputs"] == 4 and record["after"]["flops"] <= 0.5 * record["before"]["flops"]
    assert 0.5 < record["agreement"] <= 1
    segmenter = Segmenter(out, device="cpu")
    assert segmenter.policy == f"BudgetPolicy(target_flops=0.5, target_params=None, sensitivity={chosen})"
    with torch.no_grad():
        assert torch.isfinite(ModelFolder.open(out).load_network(0)(torch.zeros(1, 1, 16, 128, 128))).all()
    assert main(["compress", str(source), str(tmp_path / "bad"), "--calibration", str(tmp_path / "none.nrrd")]) == 2
    assert "none.nrrd" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["compress", str(source), str(tmp_path / "u"), "--policy", "uniform"]) == 2
    assert "the uniform method needs a target: the fraction of channels each factor keeps" in capsys.readouterr().err


def seeded_unet() -> SmallUNet3d:
    torch.manual_seed(0)
    return SmallUNet3d().eval()


def test_sensitivity_selection_keeps_the_plan_that_agrees_best_with_the_original():
    network = seeded_unet()
    x = torch.zeros(1, 1, 16, 16, 16)
    inputs = smooth_inputs(2)
    report = compress_network(network, BudgetPolicy(target_flops=0.3), x, calibration=inputs)
    chosen = report.policy["params"]["sensitivity"]
    assert chosen in SENSITIVITY_EXPONENTS and report.agreement is not None
    for exponent in SENSITIVITY_EXPONENTS:  # every other exponent agrees no better on the calibration inputs
        trial = seeded_unet()
        other = compress_network(trial, BudgetPolicy(target_flops=0.3, sensitivity=exponent), x, calibration=inputs)
        assert other.agreement <= report.agreement + 1e-9
    assert compress_network(SmallUNet3d(), BudgetPolicy(target_flops=0.5), x).policy["params"]["sensitivity"] is None


def test_layers_report_their_shapes_for_budget_costs():
    network = SmallUNet3d()
    infos = survey(network, torch.zeros(1, 1, 16, 16, 16)).infos
    up = next(i for i in infos if i.name == "up")
    assert up.transposed and up.input_shape == (1, 32, 8, 8, 8) and up.output_shape == (1, 16, 16, 16, 16)
    assert len(infos) == len(decomposable_layers(network))
