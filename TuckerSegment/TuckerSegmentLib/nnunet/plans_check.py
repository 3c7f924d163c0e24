"""What a model folder's ``plans.json`` and ``dataset.json`` may say, checked before nnU-Net reads them.

nnU-Net builds a network by importing the dotted names its plans give (the architecture class and the
building blocks it is passed), so a hostile folder could name any function of any installed package.
Here, without importing anything: the architecture must be one of dynamic-network-architectures'
U-Nets, every imported building block a ``torch.nn`` convolution, normalisation, dropout or
nonlinearity, every other name nnU-Net looks up (normalisation scheme, resampling function, label
manager, image reader, preprocessor) one that nnU-Net ships, and every number within the limits
below (docs/guide/safety.md). The first problem found is named, with its field, in a ``ModelFolderError``.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ModelFolderError
from ..paths import is_plain_name

_DNA = "dynamic_network_architectures.architectures"
ARCHITECTURES = {f"{_DNA}.unet.PlainConvUNet": "PlainConvUNet", f"{_DNA}.unet.ResidualEncoderUNet": "ResidualEncoderUNet",
                 f"{_DNA}.residual_unet.ResidualEncoderUNet": "ResidualEncoderUNet"}  # the last: old plans' name
OLD_ARCHITECTURES = ("PlainConvUNet", "ResidualEncoderUNet")  # pre-2.3 plans: "UNet_class_name"


def _torch_names(module: str, classes: tuple[str, ...]) -> frozenset[str]:
    return frozenset(name for cls in classes for name in (f"torch.nn.{cls}", f"torch.nn.modules.{module}.{cls}"))


BUILDING_BLOCKS = {  # keyword -> the torch.nn classes it may name (or null)
    "conv_op": _torch_names("conv", ("Conv1d", "Conv2d", "Conv3d")),
    "norm_op": _torch_names("instancenorm", ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"))
    | _torch_names("batchnorm", ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d"))
    | _torch_names("normalization", ("GroupNorm", "LayerNorm")),
    "dropout_op": _torch_names("dropout", ("Dropout", "Dropout1d", "Dropout2d", "Dropout3d")),
    "nonlin": _torch_names("activation", ("LeakyReLU", "ReLU", "PReLU", "ELU", "GELU", "SiLU", "Tanh", "Sigmoid")),
}
ARCH_KWARGS = {  # what each architecture's constructor takes from the plans
    "PlainConvUNet": {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_conv_per_stage",
                      "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                      "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "deep_supervision", "nonlin_first"},
    "ResidualEncoderUNet": {"n_stages", "features_per_stage", "conv_op", "kernel_sizes", "strides", "n_blocks_per_stage",
                            "n_conv_per_stage_decoder", "conv_bias", "norm_op", "norm_op_kwargs", "dropout_op",
                            "dropout_op_kwargs", "nonlin", "nonlin_kwargs", "deep_supervision", "bottleneck_channels",
                            "stem_channels"},
}
NORMALIZATIONS = ("CTNormalization", "ZScoreNormalization", "NoNormalization", "RescaleTo01Normalization",
                  "RGBTo01Normalization")
RESAMPLING = ("resample_data_or_seg_to_shape", "resample_torch_fornnunet", "resample_torch_simple", "no_resampling_hack")
LABEL_MANAGERS = ("LabelManager",)
READERS = ("SimpleITKIO", "SimpleITKIOWithReorient", "NibabelIO", "NibabelIOWithReorient", "Tiff3DIO",
           "NaturalImage2DIO")
PREPROCESSORS = ("DefaultPreprocessor",)
CT_PROPERTIES = ("mean", "std", "percentile_00_5", "percentile_99_5")
# Limits (docs/guide/safety.md): wide enough for any nnU-Net plan seen in practice, narrow enough that no
# value makes the engine allocate absurd memory or loop.
PATCH = (8, 512)  # voxels per axis
STAGES = (1, 10)
SPACING_MM = (0.05, 50.0)
FEATURES = (1, 4096)
KERNEL = (1, 7)
STRIDE = (1, 8)
CONVS = (1, 16)
LABEL_VALUE = (0, 65535)
CHANNELS = (1, 16)
INTENSITY = (-1e6, 1e6)  # CT foreground statistics, HU


def _fail(field: str, problem: str) -> ModelFolderError:
    return ModelFolderError(f"{field} {problem}; nothing from the folder was imported or run: restore the model's "
                            "original plans.json/dataset.json or use a model trained with standard nnU-Net v2")


def _int(value: Any, field: str, limits: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not limits[0] <= value <= limits[1]:
        raise _fail(field, f"is {value!r}, not a whole number in {limits[0]}–{limits[1]}")
    return value


def _number(value: Any, field: str, limits: tuple[float, float]) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not limits[0] <= value <= limits[1]:
        raise _fail(field, f"is {value!r}, not a number in {limits[0]}–{limits[1]}")
    return float(value)


def _list(value: Any, field: str, length: int | tuple[int, int]) -> list[Any]:
    low, high = (length, length) if isinstance(length, int) else length
    if not isinstance(value, list) or not low <= len(value) <= high:
        want = f"{low}" if low == high else f"{low}–{high}"
        raise _fail(field, f"is {value!r}, not a list of {want} entries")
    return value


def _dict(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _fail(field, f"is {type(value).__name__}, not a JSON object")
    return value


def _one_of(value: Any, field: str, allowed: tuple[str, ...] | frozenset[str] | Mapping[str, Any]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise _fail(field, f"names {value!r}, which is not allowed here (allowed: {', '.join(sorted(allowed))})")
    return value


def _plain_name(value: Any, field: str) -> str:
    """A name the engine or nnU-Net joins to a folder (data set, plans, data identifier): one plain component."""
    if not is_plain_name(value):
        raise _fail(field, f"is {value!r}, not a plain name such as Dataset123_Name (letters, digits, _ . + -; no "
                           "folder separators, no leading dot): it becomes part of a file path")
    return value


def _plain_json(value: Any, field: str, depth: int = 0) -> None:
    """Keyword values handed to constructors: numbers, strings, booleans, null, lists and objects of them."""
    if depth > 4:
        raise _fail(field, "is nested too deeply")
    if isinstance(value, dict):
        for key, item in value.items():
            _plain_json(item, f"{field}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _plain_json(item, f"{field}[{index}]", depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise _fail(field, f"is {value!r}, not a finite number")


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """The configuration ``name`` with what it ``inherits_from`` filled in (as nnU-Net resolves it), refusing
    unknown parents and cycles."""
    configurations = _dict(plans.get("configurations"), "plans.json: configurations")
    chain: list[str] = []
    resolved: dict[str, Any] = {}
    while name is not None:
        if name in chain:
            raise _fail(f"plans.json: configurations[{chain[0]!r}]", f"inherits in a circle ({' -> '.join(chain)} -> {name})")
        if name not in configurations:
            raise _fail(f"plans.json: configurations[{chain[-1]!r}].inherits_from" if chain else "configuration",
                        f"names {name!r}, which is not in plans.json (there: {', '.join(configurations)})")
        chain.append(name)
        entry = _dict(configurations[name], f"plans.json: configurations[{name!r}]")
        resolved = {**entry, **resolved}
        name = entry.get("inherits_from")
    resolved.pop("inherits_from", None)
    return resolved


def check_architecture(config: dict[str, Any], where: str) -> int:
    """Refuse any name or keyword the network would be built from that is not on the lists above; the
    number of dimensions (2 or 3) of the network."""
    if "architecture" not in config and "UNet_class_name" not in config:
        raise _fail(where, "has neither 'architecture' nor (older plans) 'UNet_class_name': these are not nnU-Net v2 "
                           "plans")
    if "architecture" not in config:  # pre-2.3 plans: nnU-Net converts them with fixed names
        _one_of(config.get("UNet_class_name"), f"{where}.UNet_class_name", OLD_ARCHITECTURES)
        for key in ("UNet_base_num_features", "unet_max_num_features"):
            _int(config.get(key), f"{where}.{key}", FEATURES)
        stages = len(_list(config.get("n_conv_per_stage_encoder"), f"{where}.n_conv_per_stage_encoder", STAGES))
        dims = len(_list(config.get("patch_size"), f"{where}.patch_size", (2, 3)))
        _check_stages(config, where, stages, dims, "n_conv_per_stage_encoder",
                      {"conv_kernel_sizes": KERNEL, "pool_op_kernel_sizes": STRIDE})
        return dims
    arch = _dict(config["architecture"], f"{where}.architecture")
    kind = ARCHITECTURES[_one_of(arch.get("network_class_name"), f"{where}.architecture.network_class_name",
                                 ARCHITECTURES)]
    kwargs = _dict(arch.get("arch_kwargs"), f"{where}.architecture.arch_kwargs")
    field = f"{where}.architecture.arch_kwargs"
    unknown = sorted(set(kwargs) - ARCH_KWARGS[kind])
    if unknown:
        raise _fail(f"{field}.{unknown[0]}", f"is not a parameter of {kind}")
    imported = _list(arch.get("_kw_requires_import"), f"{where}.architecture._kw_requires_import", (0, 8))
    for key in imported:
        _one_of(key, f"{where}.architecture._kw_requires_import", BUILDING_BLOCKS)
    for key, allowed in BUILDING_BLOCKS.items():
        value = kwargs.get(key)
        if value is not None:
            if key not in imported:
                raise _fail(f"{field}.{key}", "is not listed in _kw_requires_import")
            _one_of(value, f"{field}.{key}", allowed)
    for key, value in kwargs.items():
        if key not in BUILDING_BLOCKS:
            _plain_json(value, f"{field}.{key}")
    stages = _int(kwargs.get("n_stages"), f"{field}.n_stages", STAGES)
    dims = len(_list(config.get("patch_size"), f"{where}.patch_size", (2, 3)))
    for index, width in enumerate(_list(kwargs.get("features_per_stage"), f"{field}.features_per_stage", stages)):
        _int(width, f"{field}.features_per_stage[{index}]", FEATURES)
    blocks = "n_conv_per_stage" if kind == "PlainConvUNet" else "n_blocks_per_stage"
    _check_stages(kwargs, field, stages, dims, blocks, {"kernel_sizes": KERNEL, "strides": STRIDE})
    return dims


def _check_stages(entries: dict[str, Any], field: str, stages: int, dims: int, blocks: str,
                  geometry: dict[str, tuple[int, int]]) -> None:
    """Per-stage kernel sizes and strides (one per axis) and convolution counts within their limits."""
    for key, limits in geometry.items():
        for stage, sizes in enumerate(_list(entries.get(key), f"{field}.{key}", stages)):
            for axis, size in enumerate(_list(sizes, f"{field}.{key}[{stage}]", dims)):
                _int(size, f"{field}.{key}[{stage}][{axis}]", limits)
    for key, count in ((blocks, stages), ("n_conv_per_stage_decoder", stages - 1)):
        for index, value in enumerate(_list(entries.get(key), f"{field}.{key}", count)):
            _int(value, f"{field}.{key}[{index}]", CONVS)


def check_configuration(plans: dict[str, Any], configuration: str, channels: int) -> None:
    """Every name and number of ``configuration`` that nnU-Net or the engine will use."""
    _plain_name(configuration, "plans.json: configuration name")
    config = resolve_configuration(plans, configuration)
    where = f"plans.json: configurations[{configuration!r}]"
    dims = check_architecture(config, where)
    _plain_name(config.get("data_identifier"), f"{where}.data_identifier")
    for key in ("previous_stage", "next_stage"):  # cascade stages: nnU-Net's trainer makes folders of them
        stages = config.get(key)
        for stage in stages if isinstance(stages, list) else [] if stages is None else [stages]:
            _plain_name(stage, f"{where}.{key}")
    for axis, size in enumerate(_list(config.get("patch_size"), f"{where}.patch_size", dims)):
        _int(size, f"{where}.patch_size[{axis}]", PATCH)
    for axis, spacing in enumerate(_list(config.get("spacing"), f"{where}.spacing", dims)):
        _number(spacing, f"{where}.spacing[{axis}]", SPACING_MM)
    schemes = _list(config.get("normalization_schemes"), f"{where}.normalization_schemes", channels)
    for index, scheme in enumerate(schemes):
        _one_of(scheme, f"{where}.normalization_schemes[{index}]", NORMALIZATIONS)
    for key in ("resampling_fn_data", "resampling_fn_seg", "resampling_fn_probabilities"):
        if key in config:
            _one_of(config[key], f"{where}.{key}", RESAMPLING)
            _plain_json(config.get(f"{key}_kwargs"), f"{where}.{key}_kwargs")
    _one_of(config.get("preprocessor_name", "DefaultPreprocessor"), f"{where}.preprocessor_name", PREPROCESSORS)
    properties = _dict(plans.get("foreground_intensity_properties_per_channel", {}),
                       "plans.json: foreground_intensity_properties_per_channel")
    for channel, scheme in enumerate(schemes):
        if scheme == "CTNormalization":
            field = f"plans.json: foreground_intensity_properties_per_channel[{str(channel)!r}]"
            stats = _dict(properties.get(str(channel)), field)
            for key in CT_PROPERTIES:
                _number(stats.get(key), f"{field}.{key}", INTENSITY)


def check_plans(plans: dict[str, Any], dataset_json: dict[str, Any], configuration: str) -> None:
    """Refuse plans and dataset.json that name code or hold values outside the limits (see the module
    docstring); the configuration the folder will run is checked in full."""
    channels = check_dataset_json(dataset_json)
    _one_of(plans.get("label_manager", "LabelManager"), "plans.json: label_manager", LABEL_MANAGERS)
    _one_of(plans.get("image_reader_writer", "SimpleITKIO"), "plans.json: image_reader_writer", READERS)
    for key in ("transpose_forward", "transpose_backward"):
        order = plans.get(key, [0, 1, 2])
        if not isinstance(order, list) or sorted(order) != list(range(len(order))) or len(order) not in (2, 3):
            raise _fail(f"plans.json: {key}", f"is {order!r}, not an order of the axes such as [0, 1, 2]")
    check_configuration(plans, configuration, channels)
    for key in ("dataset_name", "plans_name"):
        _plain_name(plans.get(key), f"plans.json: {key}")


def check_dataset_json(dataset_json: dict[str, Any]) -> int:
    """Refuse a dataset.json whose channels or labels are not what nnU-Net writes; the number of channels."""
    names = _dict(dataset_json.get("channel_names", dataset_json.get("modality")), "dataset.json: channel_names")
    _int(len(names), "dataset.json: channel_names (count)", CHANNELS)
    labels = _dict(dataset_json.get("labels"), "dataset.json: labels")
    if not labels:
        raise _fail("dataset.json: labels", "is empty")
    for name, value in labels.items():
        values = value if isinstance(value, list) else [value]  # region-based models list several labels
        for item in values:
            _int(item, f"dataset.json: labels[{name!r}]", LABEL_VALUE)
    return len(names)
