"""The on-disk form of a pruned fold: ``tucker.json`` with a ``"pruning"`` record + ``weights.safetensors``.

No pickle: the network is built from plans.json, then every convolution and norm the record names is
replaced by an identical module (same kernel, stride, padding, bias, eps, affine …) with the recorded
channel counts, by object identity, so nnU-Net's aliases (``decoder.encoder`` is ``encoder``, a block's
``conv`` is its ``all_modules[0]``) follow. Every value is checked before anything is built; the weights
are then loaded (and their shapes checked) by ``tucker_format.load_weights``.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import RankMismatchError
from ..tucker.decomposition import replace_modules
from ..tucker.network_stats import trace

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
NORM_TYPES = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm)
CONV_KEYS = ("in_channels", "out_channels")
NORM_KEYS = ("num_features",)
AGAIN = "compress the model again"


def is_pruned(record: Mapping[str, Any]) -> bool:
    """Whether a ``tucker.json`` record describes a pruned (not a factorised) network."""
    return "pruning" in record


def _fail(source: str, problem: str) -> RankMismatchError:
    return RankMismatchError(f"{source}: {problem}; {AGAIN}")


def _count(source: str, name: str, key: str, value: Any, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, f"module {name!r} has {key}={value!r}, not a whole number of channels")
    if not 0 < value <= limit:
        raise _fail(source, f"module {name!r} has {key}={value}, outside 1..{limit} (the plans' width)")
    return value


def checked_counts(network: nn.Module, pruning: Any, source: str) -> dict[str, dict[str, int]]:
    """The ``pruning`` record's per-module channel counts, every value checked against ``network`` (built from the
    plans): names exist and are convolutions/norms as recorded, counts are whole, positive and no wider than the
    plans, and each norm has as many features as the convolution before it outputs."""
    if not isinstance(pruning, dict):
        raise _fail(source, "'pruning' is not an object")
    if not isinstance(pruning.get("criterion"), str):
        raise _fail(source, f"'pruning' has criterion {pruning.get('criterion')!r}, not a name")
    target = pruning.get("target_flops")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise _fail(source, f"'pruning' has target_flops {target!r}, not a fraction in (0, 1]")
    modules = pruning.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise _fail(source, "'pruning' has no 'modules' object of channel counts")
    named = dict(network.named_modules())
    counts: dict[str, dict[str, int]] = {}
    for name, entry in modules.items():
        module = named.get(name)
        if module is None:
            raise _fail(source, f"module {name!r} is not in the network plans.json describes")
        keys = CONV_KEYS if isinstance(module, CONV_TYPES) else NORM_KEYS if isinstance(module, NORM_TYPES) else None
        if keys is None:
            raise _fail(source, f"module {name!r} is a {type(module).__name__}, neither a convolution nor a norm")
        if not isinstance(entry, dict) or set(entry) != set(keys):
            raise _fail(source, f"module {name!r} is a {type(module).__name__}: its entry needs exactly "
                                f"{', '.join(keys)}, not {sorted(entry) if isinstance(entry, dict) else entry!r}")
        if isinstance(module, CONV_TYPES) and module.groups != 1:
            raise _fail(source, f"module {name!r} is a grouped convolution, which pruning does not change")
        counts[name] = {key: _count(source, name, key, entry[key], getattr(module, key)) for key in keys}
    heads = getattr(getattr(network, "decoder", None), "seg_layers", None)
    for head in heads.modules() if heads is not None else ():
        entry = counts.get(next((n for n, m in named.items() if m is head), ""), {})
        if entry.get("out_channels", head.out_channels if isinstance(head, CONV_TYPES) else None) != getattr(
                head, "out_channels", None):
            raise _fail(source, "a segmentation head is recorded with fewer outputs than the model has classes")
    by_id = {id(module): counts[name] for name, module in named.items() if name in counts}
    outputs = None
    for name, module in named.items():
        recorded = by_id.get(id(module), {})
        if isinstance(module, CONV_TYPES):
            outputs = recorded.get("out_channels", module.out_channels)
        elif isinstance(module, NORM_TYPES):
            features = recorded.get("num_features", module.num_features)
            if outputs is not None and features != outputs:
                raise _fail(source, f"norm {name!r} has {features} features but the convolution before it outputs "
                                    f"{outputs} channels")
    return counts


def _conv_like(module: nn.Module, in_channels: int, out_channels: int) -> nn.Module:
    extra = {"output_padding": module.output_padding} if module.transposed else {}
    return type(module)(in_channels, out_channels, kernel_size=module.kernel_size, stride=module.stride,
                        padding=module.padding, dilation=module.dilation, groups=module.groups,
                        bias=module.bias is not None, padding_mode=module.padding_mode,
                        dtype=module.weight.dtype, **extra)


def _norm_like(module: nn.Module, num_features: int) -> nn.Module:
    dtype = module.weight.dtype if module.weight is not None else torch.float32
    return type(module)(num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                        track_running_stats=module.track_running_stats, dtype=dtype)


def apply_pruning_record(network: nn.Module, pruning: Any, source: str, example_input: torch.Tensor) -> int:
    """Give ``network`` (built from the plans) the channel counts of a ``pruning`` record, in place; returns the
    number of modules replaced. ``example_input`` (meta is enough): a shape-only forward proves the counts fit
    together (e.g. a convolution reading as many channels as the one before outputs)."""
    counts = checked_counts(network, pruning, source)
    named = dict(network.named_modules())
    replacements: dict[int, nn.Module] = {}
    for name, entry in counts.items():
        module = named[name]
        if isinstance(module, CONV_TYPES):
            if (entry["in_channels"], entry["out_channels"]) != (module.in_channels, module.out_channels):
                replacements[id(module)] = _conv_like(module, entry["in_channels"], entry["out_channels"])
        elif entry["num_features"] != module.num_features:
            replacements[id(module)] = _norm_like(module, entry["num_features"])
    replace_modules(network, replacements)
    try:
        trace(network, example_input)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(source, f"the recorded channel counts do not fit together ({first[:200]})") from exc
    return len(replacements)
