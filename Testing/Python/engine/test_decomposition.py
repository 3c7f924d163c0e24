"""Tucker-2 and one-sided factorisation of single convolutions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from TuckerSegmentLib import TuckerConv, decompose_conv
from TuckerSegmentLib.errors import DecompositionError
from TuckerSegmentLib.tucker.decomposition import reconstruct_weight, relative_error

GEOMETRIES = [
    pytest.param(lambda: nn.Conv3d(6, 10, 3, padding=1), (2, 6, 7, 7, 7), id="conv3x3x3"),
    pytest.param(lambda: nn.Conv3d(6, 10, (3, 1, 5), stride=(2, 1, 2), padding=(1, 0, 2), dilation=(1, 1, 2)),
                 (1, 6, 9, 8, 11), id="conv-anisotropic-strided-dilated"),
    pytest.param(lambda: nn.Conv3d(5, 7, 3, padding="same", padding_mode="reflect"), (1, 5, 6, 6, 6), id="conv-same-reflect"),
    pytest.param(lambda: nn.Conv3d(1, 12, 3, padding=1), (1, 1, 6, 6, 6), id="conv-1-channel-stem"),
    pytest.param(lambda: nn.Conv3d(12, 4, 1), (1, 12, 5, 5, 5), id="conv-1x1x1-head"),
    pytest.param(lambda: nn.ConvTranspose3d(10, 6, 2, stride=2), (2, 10, 4, 4, 4), id="convT-2x2x2"),
    pytest.param(lambda: nn.ConvTranspose3d(6, 9, 3, stride=2, padding=1, output_padding=1, dilation=2),
                 (1, 6, 5, 4, 3), id="convT-output-padding-dilated"),
    pytest.param(lambda: nn.Conv2d(6, 10, 3, padding=1), (1, 6, 8, 8), id="conv2d"),
]


def _relative_max_diff(reference: torch.Tensor, other: torch.Tensor) -> float:
    return ((reference - other).abs().max() / reference.abs().max()).item()


@pytest.mark.parametrize("make, shape", GEOMETRIES)
@pytest.mark.parametrize("sides", ["tucker2", "input", "output"])
def test_full_rank_reproduces_the_layer(make, shape, sides):
    torch.manual_seed(0)
    conv = make()
    x = torch.randn(shape)
    rank_out = conv.out_channels if sides in ("tucker2", "output") else None
    rank_in = conv.in_channels if sides in ("tucker2", "input") else None
    module = decompose_conv(conv, rank_out, rank_in)
    assert module.plan.form == sides
    with torch.no_grad():
        assert _relative_max_diff(conv(x), module(x)) < 1e-4
    assert relative_error(conv, module) < 1e-6


def test_structure_of_the_three_convolutions():
    conv = nn.Conv3d(16, 24, 3, stride=2, padding=1, dilation=1)
    module = decompose_conv(conv, rank_out=5, rank_in=7)
    assert isinstance(module, nn.Sequential) and list(module._modules) == ["input_factor", "core", "output_factor"]
    first, core, last = module
    assert (first.in_channels, first.out_channels, first.kernel_size, first.bias) == (16, 7, (1, 1, 1), None)
    assert (core.in_channels, core.out_channels, core.kernel_size, core.stride, core.padding) == (7, 5, (3, 3, 3), (2, 2, 2), (1, 1, 1))
    assert core.bias is None
    assert (last.in_channels, last.out_channels, last.kernel_size) == (5, 24, (1, 1, 1))
    assert torch.equal(last.bias, conv.bias)
    assert sum(p.numel() for p in module.parameters()) == 16 * 7 + 7 * 5 * 27 + 5 * 24 + 24


def test_transposed_core_keeps_its_type_and_geometry():
    conv = nn.ConvTranspose3d(32, 16, 2, stride=2, bias=False)
    module = decompose_conv(conv, rank_out=8, rank_in=12)
    assert isinstance(module.core, nn.ConvTranspose3d)
    assert (module.core.in_channels, module.core.out_channels, module.core.stride) == (12, 8, (2, 2, 2))
    assert module.output_factor.bias is None
    assert module(torch.randn(1, 32, 3, 3, 3)).shape == (1, 16, 6, 6, 6)


def test_planted_low_rank_kernel_is_recovered_at_its_rank():
    torch.manual_seed(1)
    conv = nn.Conv3d(20, 30, 3, padding=1)
    core = torch.randn(4, 3, 3, 3, 3)
    u_out, u_in = torch.randn(30, 4), torch.randn(20, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("oa,abxyz,ib->oixyz", u_out, core, u_in))
    module = decompose_conv(conv, rank_out=4, rank_in=3)
    assert relative_error(conv, module) < 1e-5
    x = torch.randn(1, 20, 6, 6, 6)
    with torch.no_grad():
        assert _relative_max_diff(conv(x), module(x)) < 1e-4
    assert relative_error(conv, decompose_conv(conv, rank_out=3, rank_in=3)) > 0.05


def test_error_shrinks_as_rank_grows_and_matches_the_executed_kernel():
    torch.manual_seed(2)
    conv = nn.Conv3d(24, 24, 3, padding=1)
    errors = [relative_error(conv, decompose_conv(conv, r, r)) for r in (4, 8, 16, 24)]
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.5 and errors[-1] < 1e-6
    module = decompose_conv(conv, 6, 9)
    x = torch.randn(1, 24, 5, 5, 5)
    with torch.no_grad():
        direct = F.conv3d(x, reconstruct_weight(module).float(), conv.bias, padding=1)
        assert _relative_max_diff(direct, module(x)) < 1e-5


def test_grouped_convolution_is_refused_with_the_reason():
    with pytest.raises(DecompositionError, match="groups=4"):
        decompose_conv(nn.Conv3d(8, 8, 3, groups=4), 4, 4)


@pytest.mark.parametrize("rank_out, rank_in, message", [(0, 4, "rank_out=0"), (4, 9, "rank_in=9"),
                                                        (None, None, "nothing to decompose")])
def test_invalid_ranks_are_refused(rank_out, rank_in, message):
    with pytest.raises(DecompositionError, match=message):
        decompose_conv(nn.Conv3d(8, 8, 3), rank_out, rank_in)


def test_non_convolution_is_refused():
    with pytest.raises(DecompositionError, match="not a convolution"):
        decompose_conv(nn.Linear(4, 4), 2, 2)


def test_plan_reports_the_ranks():
    module = decompose_conv(nn.Conv3d(8, 12, 3), rank_out=None, rank_in=5)
    assert isinstance(module, TuckerConv)
    assert (module.plan.form, module.plan.rank_out, module.plan.rank_in) == ("input", None, 5)
