"""Tucker decomposition of one convolution over its two channel modes.

A kernel W of a convolution (Cout, Cin, k...) is factorised as
``W ≈ core ×_out U_out ×_in U_in`` (Tucker-2, Weber et al. 2024) and executed as three
convolutions: 1×…×1 Cin→r_in (no bias), the original convolution type r_in→r_out with the
original geometry (no bias), 1×…×1 r_out→Cout (original bias). Either factor may be omitted
(one-sided Tucker); a layer with neither factor stays dense.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import tensorly as tl
import torch
from tensorly.decomposition import partial_tucker
from torch import nn
from torch.nn.modules.conv import _ConvNd

from ..errors import DecompositionError

Form = Literal["dense", "tucker2", "input", "output"]

_POINTWISE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is executed: the rank of each channel factor, ``None`` for no factor."""

    rank_out: int | None = None
    rank_in: int | None = None

    @property
    def form(self) -> Form:
        if self.rank_out is None and self.rank_in is None:
            return "dense"
        if self.rank_out is not None and self.rank_in is not None:
            return "tucker2"
        return "input" if self.rank_in is not None else "output"

    def to_dict(self) -> dict:
        return {"form": self.form, "rank_out": self.rank_out, "rank_in": self.rank_in}

    @classmethod
    def from_dict(cls, data: dict) -> LayerPlan:
        plan = cls(rank_out=data.get("rank_out"), rank_in=data.get("rank_in"))
        if "form" in data and data["form"] != plan.form:
            raise ValueError(f"form {data['form']!r} contradicts ranks {plan.rank_out}/{plan.rank_in}")
        return plan


class TuckerConv(nn.Sequential):
    """A factorised convolution: ``input_factor`` → ``core`` → ``output_factor`` (factors optional)."""

    @property
    def plan(self) -> LayerPlan:
        rank_in = self.input_factor.out_channels if "input_factor" in self._modules else None
        rank_out = self.output_factor.in_channels if "output_factor" in self._modules else None
        return LayerPlan(rank_out=rank_out, rank_in=rank_in)


def is_decomposable(module: nn.Module) -> bool:
    """True for convolutions this module can factorise (any dimensionality, plain or transposed)."""
    return isinstance(module, _ConvNd)


def channel_dims(conv: _ConvNd) -> tuple[int, int]:
    """(Cout, Cin) of a convolution, whatever its weight layout."""
    return conv.out_channels, conv.in_channels


def _modes(conv: _ConvNd) -> tuple[int, int]:
    """Weight modes holding (output, input) channels: transposed convs store (Cin, Cout, k...)."""
    return (1, 0) if conv.transposed else (0, 1)


def _check(conv: nn.Module, plan: LayerPlan) -> None:
    if not is_decomposable(conv):
        raise DecompositionError(f"{type(conv).__name__} is not a convolution; only Conv/ConvTranspose layers decompose")
    if conv.groups != 1:
        raise DecompositionError(
            f"{type(conv).__name__} with groups={conv.groups} has no Tucker-2 channel decomposition "
            "(grouped/depthwise kernels are block-diagonal over channels); leave it dense")
    if plan.form == "dense":
        raise DecompositionError("rank_out and rank_in are both None: nothing to decompose, keep the layer dense")
    c_out, c_in = channel_dims(conv)
    for label, rank, channels in (("rank_out", plan.rank_out, c_out), ("rank_in", plan.rank_in, c_in)):
        if rank is not None and not 1 <= rank <= channels:
            raise DecompositionError(f"{label}={rank} is outside [1, {channels}] for {type(conv).__name__}"
                                     f"({c_in}→{c_out})")


def factorized_like(conv: _ConvNd, plan: LayerPlan) -> TuckerConv:
    """The factorised structure for ``conv`` under ``plan``, weights uninitialised (for loading)."""
    _check(conv, plan)
    c_out, c_in = channel_dims(conv)
    has_bias = conv.bias is not None
    core_in = plan.rank_in if plan.rank_in is not None else c_in
    core_out = plan.rank_out if plan.rank_out is not None else c_out
    parts: OrderedDict[str, nn.Module] = OrderedDict()
    if plan.rank_in is not None:
        parts["input_factor"] = pointwise_like(conv, c_in, plan.rank_in, bias=False)
    parts["core"] = conv_like(conv, core_in, core_out, bias=has_bias and plan.rank_out is None)
    if plan.rank_out is not None:
        parts["output_factor"] = pointwise_like(conv, plan.rank_out, c_out, bias=has_bias)
    return TuckerConv(parts)


def conv_like(conv: _ConvNd, c_in: int, c_out: int, bias: bool) -> _ConvNd:
    """A convolution of ``conv``'s type, geometry, device and dtype with other channels, weights uninitialised."""
    kwargs = dict(kernel_size=conv.kernel_size, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  bias=bias, padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
    if conv.transposed:
        return type(conv)(c_in, c_out, output_padding=conv.output_padding, **kwargs)
    return type(conv)(c_in, c_out, **kwargs)


def pointwise_like(conv: _ConvNd, c_in: int, c_out: int, bias: bool) -> _ConvNd:
    """A 1×…×1 convolution with ``conv``'s dimensionality, device and dtype."""
    return _POINTWISE[len(conv.kernel_size)](c_in, c_out, 1, bias=bias, device=conv.weight.device,
                                             dtype=conv.weight.dtype)


def tucker_factors(conv: _ConvNd, plan: LayerPlan) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Partial Tucker (HOOI, SVD init) of the kernel: (core, U_out (Cout×r_out), U_in (Cin×r_in)).

    The core keeps the weight layout of ``conv`` (transposed convs: input channels first).
    Computed in float64 with tensorly's numpy backend.
    """
    _check(conv, plan)
    mode_out, mode_in = _modes(conv)
    requested = sorted((mode, rank) for mode, rank in ((mode_out, plan.rank_out), (mode_in, plan.rank_in))
                       if rank is not None)  # partial_tucker expects ascending modes
    modes = [mode for mode, _ in requested]
    ranks = [rank for _, rank in requested]
    weight = conv.weight.detach().to("cpu", torch.float64).numpy()
    with tl.backend_context("numpy"), warnings.catch_warnings():
        # A rank above what the kernel's other modes allow (e.g. r_in 10 on a 1×1×1 head with r_out 8)
        # is the paper's rule, not an error: tensorly pads the factor and says so.
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs", category=UserWarning)
        (core, factors), _ = partial_tucker(weight, rank=ranks, modes=modes, init="svd")
    by_mode = dict(zip(modes, factors, strict=True))
    as_tensor = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return as_tensor(core), as_tensor(by_mode.get(mode_out)), as_tensor(by_mode.get(mode_in))


def unfold_mode(tensor: torch.Tensor, mode: int) -> torch.Tensor:
    """The mode-``mode`` unfolding: a (size of that mode) × (everything else) matrix."""
    return tensor.movedim(mode, 0).reshape(tensor.shape[mode], -1)


def contract_mode(tensor: torch.Tensor, mode: int, matrix: torch.Tensor) -> torch.Tensor:
    """``tensor`` with its ``mode`` replaced by ``matrix``ᵀ applied to it: out[..j..] = Σ_c tensor[..c..] matrix[c, j]."""
    return torch.tensordot(tensor, matrix, dims=([mode], [0])).movedim(-1, mode)


def sqrt_and_inverse(cov: torch.Tensor, floor: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ^½ and Σ^-½ of a covariance, with eigenvalues floored relative to the largest (rank-deficient inputs)."""
    values, vectors = torch.linalg.eigh(cov)
    values = values.clamp_min(float(values.max().clamp_min(1e-30)) * floor)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def output_aware_factors(conv: _ConvNd, plan: LayerPlan, in_cov: torch.Tensor | None,
                         out_cov: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Factors that minimise the layer's *output* error on calibration data rather than the kernel error.

    Input mode: the kernel is whitened by the input-channel covariance Σ_in (W' = W ×_in Σ_in^½), its
    best rank-r_in input subspace V is taken, and the input factor A = Vᵀ Σ_in^-½ maps inputs to it, so
    ‖(W − Ŵ) x‖ is minimal for inputs with that covariance. Output mode: the top r_out principal
    directions of the layer's output covariance (before bias). ``None`` covariances fall back to the
    kernel itself (identity input covariance, the kernel's output Gram), i.e. a truncated HOSVD.
    Returns (core, U_out (Cout×r_out), Aᵀ (Cin×r_in)) in the layout of ``tucker_factors``.
    """
    _check(conv, plan)
    mode_out, mode_in = _modes(conv)
    weight = conv.weight.detach().to("cpu", torch.float64)
    core, u_out, a_t = weight, None, None
    if plan.rank_in is not None:
        c_in = weight.shape[mode_in]
        root, inverse_root = (torch.eye(c_in, dtype=torch.float64),) * 2 if in_cov is None else \
            sqrt_and_inverse(in_cov.to(torch.float64))
        whitened = contract_mode(weight, mode_in, root)
        basis = torch.linalg.svd(unfold_mode(whitened, mode_in), full_matrices=False)[0][:, :plan.rank_in]  # Cin × r_in
        if basis.shape[1] < plan.rank_in:  # a rank above the unfolding's (e.g. r_in 12 on a 16→8 1×1×1 head)
            basis = torch.cat([basis, basis.new_zeros(c_in, plan.rank_in - basis.shape[1])], dim=1)
        core = contract_mode(whitened, mode_in, basis)
        a_t = inverse_root @ basis  # Cin × r_in: the input factor's weight, transposed
    if plan.rank_out is not None:
        if out_cov is None:
            unfolded = unfold_mode(weight, mode_out)
            out_cov = unfolded @ unfolded.T
        values, vectors = torch.linalg.eigh(out_cov.to(torch.float64))
        u_out = vectors[:, values.argsort(descending=True)[:plan.rank_out]]  # Cout × r_out
        core = contract_mode(core, mode_out, u_out)
    return core, u_out, a_t


def decompose_conv(conv: _ConvNd, rank_out: int | None, rank_in: int | None,
                   in_cov: torch.Tensor | None = None, out_cov: torch.Tensor | None = None) -> TuckerConv:
    """Tucker-2 (or one-sided, when a rank is ``None``) factorisation of ``conv`` as a ``TuckerConv``.

    By default the kernel is decomposed by HOOI (the paper's ``partial_tucker``); with calibration
    covariances by ``output_aware_factors``. At full rank either
    computes the same function as ``conv`` up to float rounding.
    """
    plan = LayerPlan(rank_out=rank_out, rank_in=rank_in)
    module = factorized_like(conv, plan)
    if in_cov is not None or out_cov is not None:
        core, u_out, u_in = output_aware_factors(conv, plan, in_cov, out_cov)
    else:
        core, u_out, u_in = tucker_factors(conv, plan)
    dtype = conv.weight.dtype
    extra = (1,) * len(conv.kernel_size)
    with torch.no_grad():
        module.core.weight.copy_(core.to(dtype))
        if u_in is not None:
            module.input_factor.weight.copy_(u_in.T.reshape(u_in.shape[1], u_in.shape[0], *extra).to(dtype))
        if u_out is not None:
            module.output_factor.weight.copy_(u_out.reshape(*u_out.shape, *extra).to(dtype))
        if conv.bias is not None:
            (module.output_factor if u_out is not None else module.core).bias.copy_(conv.bias.detach())
    return module


def reconstruct_weight(module: TuckerConv, inputs: bool = True, outputs: bool = True) -> torch.Tensor:
    """The kernel of ``module``'s core with its input and/or output factor folded in (float64, in the layout
    of the core's type); both folded, the dense kernel the ``TuckerConv`` computes."""
    core = module.core
    weight = core.weight.detach().to(torch.float64)
    mode_out, mode_in = _modes(core)
    if inputs and "input_factor" in module._modules:
        u_in = module.input_factor.weight.detach().to(torch.float64).flatten(1)  # r_in × Cin
        weight = contract_mode(weight, mode_in, u_in)
    if outputs and "output_factor" in module._modules:
        u_out = module.output_factor.weight.detach().to(torch.float64).flatten(1).T  # r_out × Cout
        weight = contract_mode(weight, mode_out, u_out)
    return weight


def relative_error(conv: _ConvNd, module: TuckerConv) -> float:
    """‖W − Ŵ‖ / ‖W‖ between the original kernel and the factorised one."""
    original = conv.weight.detach().to(torch.float64)
    norm = torch.linalg.vector_norm(original).item()
    diff = torch.linalg.vector_norm(original - reconstruct_weight(module)).item()
    return diff / norm if norm > 0 else diff


def replace_modules(network: nn.Module, replacements: Mapping[int, nn.Module]) -> int:
    """Swap children by identity: every attribute that holds ``old`` now holds ``replacements[id(old)]``.

    Returns the number of attributes rewritten (≥ the number of replaced modules when aliased).
    """
    parents = [module for _, module in network.named_modules()]  # each parent once, before any swap
    rewritten = 0
    for parent in parents:
        for key, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[key] = replacements[id(child)]
                rewritten += 1
    return rewritten
