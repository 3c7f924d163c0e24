"""TuckerSegment's engine: Tucker compression of nnU-Net v2 models, without Slicer or Qt.

Names are imported on first use, so ``TuckerSegmentLib.dependencies`` works before torch and
nnU-Net are installed."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compression": ("CompressionReport", "LayerRecord", "compress_network"),
    "decomposition": ("LayerPlan", "TuckerConv", "decompose_conv"),
    "errors": ("TuckerSegmentError",),
    "folder_compression": ("compress_model_folder", "describe_model"),
    "model_folder": ("ModelFolder", "load_network"),
    "calibration": ("LayerStatistics", "collect_statistics"),
    "policies": ("BudgetPolicy", "EnergyPolicy", "LayerInfo", "RankPolicy", "UniformPolicy", "VBMFPolicy",
                 "policy_from_dict"),
    "stats": ("NetworkStats", "network_stats"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value
    return value
