"""Ranks from each layer's spectrum: the energy a truncation keeps (of the kernel, or of the layer output
with calibration statistics), or empirical VBMF."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import PolicyError
from ..tucker.decomposition import LayerPlan, contract_mode, sqrt_and_inverse, unfold_mode
from ..tucker.layers import LayerInfo
from .base import RankPolicy


def channel_modes(info: LayerInfo) -> tuple[int, int]:
    """Weight modes holding (output, input) channels."""
    return (1, 0) if info.transposed else (0, 1)


def kernel64(info: LayerInfo) -> torch.Tensor:
    """The layer's kernel in float64 on the CPU."""
    return info.weight.detach().to("cpu", torch.float64)


def mode_energies(info: LayerInfo, stats: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Per channel mode, the energy of each rank-one direction in descending order: (output, input).

    Without statistics these are the squared singular values of the kernel's mode unfoldings (what a
    truncation removes from the kernel); with calibration ``stats`` they are what a truncation removes
    from the layer's output: eigenvalues of the output covariance, and squared singular values of the
    kernel whitened by the input covariance (see ``decomposition.output_aware_factors``).
    """
    mode_out, mode_in = channel_modes(info)
    weight = kernel64(info)
    if stats is None:
        out = torch.linalg.svdvals(unfold_mode(weight, mode_out)) ** 2
        inp = torch.linalg.svdvals(unfold_mode(weight, mode_in)) ** 2
    else:
        out = torch.linalg.eigvalsh(stats.out_cov).flip(0).clamp_min(0)
        root = sqrt_and_inverse(stats.in_cov.to(torch.float64))[0]
        inp = torch.linalg.svdvals(unfold_mode(contract_mode(weight, mode_in, root), mode_in)) ** 2
    return out.numpy(), inp.numpy()


def discarded_energy(energies: np.ndarray) -> np.ndarray:
    """Fraction of the total energy lost when keeping rank r, for r = 0 … len(energies)."""
    total = float(energies.sum())
    tail = np.concatenate([np.cumsum(energies[::-1])[::-1], [0.0]])
    return tail / total if total > 0 else np.zeros_like(tail)


def plan_for_ranks(r_out: int, r_in: int, info: LayerInfo) -> LayerPlan:
    """A plan with these ranks; a rank equal to the channel count leaves that mode unfactorised."""
    return LayerPlan(rank_out=r_out if r_out < info.c_out else None, rank_in=r_in if r_in < info.c_in else None)


class EnergyPolicy(RankPolicy):
    """Per layer and channel mode, the smallest rank keeping a fraction ``keep`` of the energy: of the
    kernel (weight-only) or, with calibration, of the layer's output."""

    name = "energy"

    def __init__(self, keep: float = 0.95) -> None:
        if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0 < keep <= 1:
            raise PolicyError(f"keep must be a fraction in (0, 1], got {keep!r} (e.g. 0.95 keeps 95 % of the energy)")
        self.keep = float(keep)

    def params(self) -> dict[str, Any]:
        return {"keep": self.keep}

    def rank(self, energies: np.ndarray) -> int:
        kept = 1.0 - discarded_energy(energies)
        return int(np.argmax(kept >= self.keep - 1e-12)) or 1

    def plan(self, layers: Sequence[LayerInfo], calibration: Mapping[str, Any] | None = None) -> dict[str, LayerPlan]:
        plans = {}
        for layer in layers:
            out, inp = mode_energies(layer, (calibration or {}).get(layer.name))
            plans[layer.name] = plan_for_ranks(self.rank(out), self.rank(inp), layer)
        return plans


def _evb_objective(noise: float, rows: int, cols: int, s2: np.ndarray, residual: float, x_bar: float) -> float:
    """Nakajima et al. (2013) free energy of empirical VBMF as a function of the noise variance."""
    alpha = rows / cols
    x = s2 / (cols * noise)
    big, small = x[x > x_bar], x[x <= x_bar]
    tau = 0.5 * (big - (1 + alpha) + np.sqrt((big - (1 + alpha)) ** 2 - 4 * alpha))
    return float(np.sum(small - np.log(small)) + np.sum(big - tau) + np.sum(np.log((tau + 1) / big))
                 + alpha * np.sum(np.log(tau / alpha + 1)) + residual / (cols * noise)
                 + (rows - len(s2)) * np.log(noise))


def evbmf_rank(matrix: np.ndarray) -> int:
    """The rank empirical variational Bayesian matrix factorisation keeps (Nakajima et al. 2013, global
    analytic solution): singular values above the EVB threshold for the estimated noise variance."""
    from scipy.optimize import minimize_scalar
    rows, cols = matrix.shape
    if rows > cols:
        matrix, (rows, cols) = matrix.T, (cols, rows)
    s = np.linalg.svd(matrix, compute_uv=False)
    s2 = s ** 2
    alpha = rows / cols
    tau_bar = 2.5129 * np.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = max(float((matrix ** 2).sum() - s2.sum()), 0.0)
    h_bar = min(int(np.ceil(rows / (1 + alpha))) - 1, len(s) - 1)
    upper = (s2.sum() + residual) / (rows * cols)
    lower = max(s2[h_bar] / (cols * x_bar) if h_bar >= 0 else 0.0, float(np.mean(s2[h_bar:])) / cols if h_bar >= 0 else 0.0)
    if not 0 < lower < upper:
        return len(s)
    noise = minimize_scalar(_evb_objective, args=(rows, cols, s2, residual, x_bar), bounds=(lower, upper),
                            method="bounded").x
    threshold = np.sqrt(cols * noise * (1 + tau_bar) * (1 + alpha / tau_bar))
    return max(1, int(np.sum(s > threshold)))


class VBMFPolicy(RankPolicy):
    """Ranks from empirical VBMF on each channel-mode unfolding of the kernel, as Kim et al. (2016) and
    MUSCO choose Tucker-2 ranks."""

    name = "vbmf"

    def params(self) -> dict[str, Any]:
        return {}

    def plan(self, layers: Sequence[LayerInfo], calibration: Mapping[str, Any] | None = None) -> dict[str, LayerPlan]:
        plans = {}
        for layer in layers:
            mode_out, mode_in = channel_modes(layer)
            r_out = evbmf_rank(unfold_mode(kernel64(layer), mode_out).numpy())
            r_in = evbmf_rank(unfold_mode(kernel64(layer), mode_in).numpy())
            plans[layer.name] = plan_for_ranks(r_out, r_in, layer)
        return plans
