"""Calibration on part of a CT: masked statistics, sensitivity and agreement, masked calibration patches, and
the held-out blocks that let one CT both calibrate (one half) and score (the other) without leakage."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from TuckerSegmentLib.compress.calibration_data import CalibrationVolume, calibration_patches
from TuckerSegmentLib.errors import PolicyError, VolumeError
from TuckerSegmentLib.image.holdout import holdout_mask
from TuckerSegmentLib.image.volume import Volume
from TuckerSegmentLib.nnunet.model_folder import ModelFolder
from TuckerSegmentLib.testing.demo_data import chest_sample
from TuckerSegmentLib.tucker.calibration import (
    CalibrationPatch,
    collect_statistics,
    cropped,
    output_sensitivity,
    prediction_agreement,
)


def second_moment(values: torch.Tensor) -> torch.Tensor:
    """E[v vᵀ] over the columns of a (C, N) tensor, in float64."""
    values = values.to(torch.float64)
    return values @ values.T / values.shape[1]


def three_layers() -> nn.Sequential:
    """Full resolution, a stride-2 convolution (nnU-Net's down-sampling), a transposed one back up."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(2, 3, 3, padding=1), nn.Conv3d(3, 4, 3, stride=2, padding=1),
                         nn.ConvTranspose3d(4, 3, 2, stride=2)).eval()


def layers_of(network: nn.Sequential) -> list[tuple[str, nn.Module]]:
    return [(str(i), m) for i, m in enumerate(network)]


def test_masked_statistics_are_the_moments_of_exactly_the_masked_voxels():
    network = three_layers()
    x = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    mask[..., :5, 2:, 1:7] = True  # 5 × 6 × 6 = 180 voxels at full resolution
    stats = collect_statistics(network, layers_of(network), [CalibrationPatch(x, mask)])
    with torch.no_grad():
        h0 = network[0](x)
        h1 = network[1](h0)
        h2 = network[2](h1)
    full, coarse = mask[0, 0], mask[0, 0, ::2, ::2, ::2]  # stride 2: output voxel o is centred on input voxel 2·o
    assert (int(full.sum()), int(coarse.sum())) == (180, 27)

    def unbiased(y: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        return (y - layer.bias.reshape(1, -1, 1, 1, 1))[0]
    expected = {"0": (x[0][:, full], unbiased(h0, network[0])[:, full]),
                "1": (h0[0][:, full], unbiased(h1, network[1])[:, coarse]),
                "2": (h1[0][:, coarse], unbiased(h2, network[2])[:, full])}
    for name, (inputs, outputs) in expected.items():
        entry = stats[name]
        assert torch.allclose(entry.in_cov, second_moment(inputs), rtol=1e-6, atol=1e-9), name
        assert torch.allclose(entry.out_cov, second_moment(outputs), rtol=1e-6, atol=1e-9), name
        assert (entry.voxels, entry.out_voxels, entry.calls) == (inputs.shape[1], outputs.shape[1], 1)
    assert (stats["1"].voxels, stats["1"].out_voxels) == (180, 27)


def test_an_all_true_mask_is_the_same_as_no_mask():
    network = three_layers()
    inputs = [torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(s)) for s in (2, 3)]
    masked = [CalibrationPatch(x, torch.ones(1, 1, 8, 8, 8, dtype=torch.bool)) for x in inputs]
    plain, full = (collect_statistics(network, layers_of(network), c) for c in (inputs, masked))
    for name in plain:
        assert torch.equal(plain[name].in_cov, full[name].in_cov) and torch.equal(plain[name].out_cov, full[name].out_cov)
        assert (plain[name].voxels, plain[name].out_voxels, plain[name].calls) == \
               (full[name].voxels, full[name].out_voxels, 2)
    assert output_sensitivity(network, layers_of(network), inputs) == output_sensitivity(network, layers_of(network), masked)
    other = three_layers()
    with torch.no_grad():
        other[2].weight.mul_(-1)
    assert prediction_agreement(network, other, inputs) == prediction_agreement(network, other, masked) < 1


def test_a_layer_without_masked_voxels_contributes_nothing_for_that_input():
    network = three_layers()
    x = torch.randn(1, 2, 8, 8, 8, generator=torch.Generator().manual_seed(4))
    odd = torch.zeros(1, 1, 8, 8, 8, dtype=torch.bool)
    odd[..., 1, 1, 1] = True  # a voxel the stride-2 grid never reads (it reads even ones)
    stats = collect_statistics(network, layers_of(network), [CalibrationPatch(x, odd), x])
    assert stats["0"].calls == 2 and stats["0"].voxels == 1 + 512
    assert stats["1"].calls == 1 and stats["1"].out_voxels == 64  # the masked input left it out
    assert stats["2"].calls == 1 and stats["2"].voxels == 64


def test_sensitivity_is_the_output_energy_a_layer_s_noise_adds_per_unit_of_its_energy():
    """On a linear network the first-order gain is exact: σ²‖J‖²_F / ‖y‖², with J the pointwise maps after the
    layer, times the voxels (the estimate comes from one backward pass with a random probe, hence the tolerance)."""
    torch.manual_seed(1)
    first, second = nn.Conv3d(2, 6, 1), nn.Conv3d(6, 5, 1)
    network = nn.Sequential(first, second).eval()
    x = torch.randn(1, 2, 12, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden, y = first(x), network(x)
    voxels, energy = 12 ** 3, float(y.pow(2).sum())
    expected = {"0": float(hidden.var()) * voxels * float(second.weight.detach().pow(2).sum()) / energy,
                "1": float(y.var()) * voxels * 5 / energy}
    gains = output_sensitivity(network, [("0", first), ("1", second)], [x])
    assert gains == pytest.approx(expected, rel=0.1)
    assert all(p.requires_grad for p in network.parameters()) and not network.training  # left as it was
    again = output_sensitivity(network, [("0", first), ("1", second)], [x])
    assert again == gains  # the probe is seeded: the same inputs give the same gains


def test_sensitivity_crops_keep_the_masked_voxels_and_the_whole_of_small_inputs():
    image = torch.arange(16 * 20 * 24, dtype=torch.float32).reshape(1, 1, 16, 20, 24)
    mask = torch.zeros(1, 1, 16, 20, 24, dtype=torch.bool)
    mask[..., 12:16, 16:20, 20:24] = True  # in a corner: the window is clamped into the image
    crop = cropped(CalibrationPatch(image, mask), (8, 8, 8))
    assert crop.image.shape == crop.mask.shape == (1, 1, 8, 8, 8) and int(crop.mask.sum()) == 64
    assert torch.equal(crop.image, image[..., 8:16, 12:20, 16:24])
    centred = cropped(image, (8, 8, 8))
    assert torch.equal(centred.image, image[..., 4:12, 6:14, 8:16]) and centred.mask is None
    spread = torch.zeros(1, 1, 16, 20, 24, dtype=torch.bool)
    spread[..., 0, 0, 0] = spread[..., 15, 19, 23] = True  # centred between two far corners: no voxel of it
    assert cropped(CalibrationPatch(image, spread), (8, 8, 8)).mask.any()
    assert cropped(image, (16, 32, 32)) is image


class ClassAtPositions(nn.Module):
    """``network``'s logits with class 1 forced (by a large margin) at the voxels of ``where``."""

    def __init__(self, network: nn.Module, where: torch.Tensor) -> None:
        super().__init__()
        self.network, self.where = network, where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x).clone()
        logits[:, 1][self.where[:, 0]] = 1e3
        return logits


def test_prediction_agreement_ignores_disagreement_outside_the_mask():
    reference = nn.Conv3d(1, 3, 1).eval()  # logits (-x, 0.5, x): class 0 below -0.5, 1 up to 0.5, 2 above
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([-1.0, 0.0, 1.0]).reshape(3, 1, 1, 1, 1))
        reference.bias.copy_(torch.tensor([0.0, 0.5, 0.0]))
    x = torch.randn(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(6))
    kept = torch.zeros(1, 1, 6, 6, 6, dtype=torch.bool)
    kept[..., :3] = True
    disagreeing = ClassAtPositions(reference, ~kept)
    with torch.no_grad():
        a, b = disagreeing(x).argmax(1), reference(x).argmax(1)
    assert set(b[kept[:, 0]].tolist()) == {0, 1, 2}  # inside the mask both predict all three classes, alike
    assert prediction_agreement(disagreeing, reference, [CalibrationPatch(x, kept)]) == 1.0
    scores = [2 * float(((a == c) & (b == c)).sum()) / float((a == c).sum() + (b == c).sum()) for c in (1, 2)]
    assert all(0.1 < score < 0.9 for score in scores)  # outside it, class 1 takes every voxel
    assert prediction_agreement(disagreeing, reference, [x]) == pytest.approx(sum(scores) / 2)


class CorruptHeldOut(nn.Module):
    """Random values (fresh each call) wherever ``held`` is True: what the held-out half may hold."""

    def __init__(self, held: torch.Tensor) -> None:
        super().__init__()
        self.held = held
        self.generator = torch.Generator().manual_seed(7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        noise = 100 * torch.randn(x.shape, generator=self.generator)
        return torch.where(self.held, noise, x)


def test_the_held_out_half_cannot_reach_statistics_sensitivity_or_agreement_of_the_training_half():
    shape = (8, 6, 6)
    held = holdout_mask(shape)
    assert held.sum() == (~held).sum() == 144 and not (held & ~held).any() and (held | ~held).all()
    assert all(held[k].any() and (~held[k]).any() for k in range(shape[0]))  # every slab has both halves
    held_t = torch.from_numpy(held)[None, None]
    train = CalibrationPatch(torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(8)), ~held_t)
    corrupted_input = CalibrationPatch(torch.where(held_t, 1e4 * torch.rand(1, 1, *shape), train.image), ~held_t)
    torch.manual_seed(9)
    # 1×1×1 convolutions: no voxel sees another, so any leak would show
    clean = nn.Sequential(nn.Conv3d(1, 4, 1), nn.ReLU(), nn.Conv3d(4, 5, 1), nn.ReLU(), nn.Conv3d(5, 3, 1)).eval()
    corrupted = nn.Sequential(*clean[:2], CorruptHeldOut(held_t), *clean[2:]).eval()
    layers = [("0", clean[0]), ("2", clean[2]), ("4", clean[4])]
    reference = collect_statistics(clean, layers, [train])
    for network, patch in ((clean, corrupted_input), (corrupted, train), (corrupted, corrupted_input)):
        stats = collect_statistics(network, layers, [patch])
        for name, entry in reference.items():
            assert torch.allclose(stats[name].in_cov, entry.in_cov, rtol=1e-12, atol=0), name
            assert torch.allclose(stats[name].out_cov, entry.out_cov, rtol=1e-12, atol=0), name
            assert stats[name].voxels == entry.voxels == 144
        gains = output_sensitivity(network, layers, [patch])
        assert gains == pytest.approx(output_sensitivity(clean, layers, [train]), rel=1e-9)
        assert prediction_agreement(network, clean, [patch]) == 1.0
    unmasked = collect_statistics(corrupted, layers, [train.image])  # without the mask it does leak
    assert not torch.allclose(unmasked["2"].in_cov, reference["2"].in_cov)


@pytest.fixture(scope="module")
def sample_ct() -> Volume:
    return chest_sample().ct


def test_masked_calibration_patches_keep_only_windows_with_usable_voxels(tiny_model, sample_ct):
    model = ModelFolder.open(tiny_model)
    plain = list(calibration_patches(model, [sample_ct], patches_per_volume=1000))
    assert len(plain) == 7 * 8 * 8 and all(p.mask is None for p in plain)  # every window of the grid
    corner = np.zeros(sample_ct.array.shape, dtype=bool)
    corner[:8, :24, :24] = True  # 8 of 34 slices, a 24 × 24 corner of each: near one window only
    patches = list(calibration_patches(model, [CalibrationVolume(sample_ct, corner)], patches_per_volume=1000))
    assert len(patches) == 8 and all(p.mask.dtype == torch.bool and p.mask.any() for p in patches)  # 2 per axis
    assert all(p.mask.shape == p.image.shape == (1, 1, 32, 32, 32) for p in patches)
    images = {p.image.numpy().tobytes() for p in plain}
    assert all(p.image.numpy().tobytes() in images for p in patches)  # the same windows, the image unchanged
    spread = list(calibration_patches(model, [CalibrationVolume(sample_ct, corner)]))  # 4 of those 8, not of all
    assert len(spread) == 4 and all(p.mask.any() for p in spread)
    half = ~holdout_mask(sample_ct.array.shape)
    training = list(calibration_patches(model, [CalibrationVolume(sample_ct, half)]))
    assert len(training) == 4 and 0.3 < float(sum(p.mask.float().mean() for p in training)) / 4 < 0.7


def test_a_calibration_mask_follows_its_image_through_reorientation(tiny_model, sample_ct):
    model = ModelFolder.open(tiny_model)
    mask = ~holdout_mask(sample_ct.array.shape)
    flip = np.diag([-1.0, 1.0, -1.0, 1.0])  # i and k reversed, the same physical image
    flip[:3, 3] = [sample_ct.array.shape[2] - 1, 0, sample_ct.array.shape[0] - 1]
    flipped = CalibrationVolume(Volume(np.ascontiguousarray(sample_ct.array[::-1, :, ::-1]), sample_ct.ijk_to_ras @ flip),
                                np.ascontiguousarray(mask[::-1, :, ::-1]))
    a = list(calibration_patches(model, [CalibrationVolume(sample_ct, mask)]))
    b = list(calibration_patches(model, [flipped]))
    assert len(a) == len(b) == 4
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p.image, q.image) and torch.equal(p.mask, q.mask)


def test_bad_masks_are_refused_in_one_line(tiny_model, sample_ct):
    shape = sample_ct.array.shape
    cases = [(lambda: CalibrationVolume(sample_ct, np.ones(shape, dtype=np.uint8)), "must be a bool array"),
             (lambda: CalibrationVolume(sample_ct, np.ones((2, 2, 2), dtype=bool)), "pass a mask on the volume's grid"),
             (lambda: CalibrationVolume(sample_ct, np.zeros(shape, dtype=bool)), "selects no voxel"),
             (lambda: CalibrationVolume("ct.nrrd", None), "holds a Volume, not str")]
    for make, message in cases:
        with pytest.raises(VolumeError, match=message) as caught:
            make()
        assert "\n" not in str(caught.value)
    fine = Volume(sample_ct.array, np.diag([0.5, 0.5, 0.5, 1.0]))  # 0.5 mm voxels: the 3 mm grid reads every 6th
    one = np.zeros(shape, dtype=bool)
    one[0, 0, 0] = True  # a voxel the 3 mm grid never reads
    with pytest.raises(VolumeError, match="^the calibration mask of volume 1 keeps no voxel at the model's spacing "
                                          "\\(3×3×3 mm\\); mark a larger region$"):
        list(calibration_patches(ModelFolder.open(tiny_model), [CalibrationVolume(fine, one)]))
    image = torch.zeros(1, 1, 4, 4, 4)
    for mask, message in ((torch.ones(1, 1, 4, 4, 4), "must be a bool tensor"),
                          (torch.ones(1, 1, 4, 4, 2, dtype=torch.bool), "cut the mask with the image"),
                          (torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool), "selects no voxel")):
        with pytest.raises(PolicyError, match=message):
            CalibrationPatch(image, mask)
    for blocks in ((0, 2, 2), (4, 2), (4, 2, 200), (4.5, 2, 2)):
        with pytest.raises(ValueError, match="holdout_mask takes|must be whole numbers"):
            holdout_mask(shape, blocks)
